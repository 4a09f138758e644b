//! `pipecloud vm`: start, restore and describe the QEMU guests of a topology.
//!
//! A machine with a `[machine.vm]` table (`pipecloud_core::topology::Vm`) is a
//! QEMU guest that the agent can checkpoint (full-state mode, docs/design.md
//! §10). This module turns that table into a QEMU command line and runs it:
//!
//! - guest RAM on `memory-backend-file,share=on` at the topology's `ram_file`
//!   (a tmpfs such as `/dev/shm`), so another process (the agent) can read it
//!   and a restore can start from a RAM image without copying it through QEMU;
//! - the machine's disks from the agent's NBD export through QEMU's own NBD
//!   client (primary site), or from image files (`vm restore` at the backup
//!   site, from what `backup-server failover` produced);
//! - its NIC on a tap device of the host (`ip route get <guest ip>` names it, so
//!   the agent's rules see the guest's packets like any protected machine's);
//! - a QMP socket, a serial console socket (logged to `<console>.log`) and a
//!   pid file at the topology's paths.
//!
//! `vm start` boots the guest; `vm restore` starts the same configuration with
//! `-incoming defer`, loads a saved device state over QMP (`migrate-incoming`
//! with `x-ignore-shared`: the RAM is already in the RAM file) and resumes it;
//! `vm cmdline` prints the command line instead of running it.
//!
//! `cmdline` is pure (the command line from the topology); `host` does the
//! side effects (tap, files, processes) and talks QMP through the agent's client
//! (`crate::fullstate::qmp`).

pub mod cmdline;
pub mod host;

pub use cmdline::{qemu_command, DiskSource, QemuCommand, Spec};
pub use host::{restore, start, RestoreOptions, StartOptions};
