//! Topology files: the gray-box description of one protected application (docs/design.md §2).
//!
//! A topology file is TOML. It names the protection group, the backup server, the
//! policies, the primary hosts, the protected machines and their protected disks.
//! This module is pure: [`Topology::parse`] takes the file's text and a file name
//! (used only in messages); reading the file is the caller's job.
//!
//! Parsing collects **every** error it can find (not just the first) and each
//! [`TopologyError`] names the file, line, column and field and says what was
//! expected, e.g.
//!
//! ```text
//! topology/shop.toml:19:6: field `machine[2].ip`: duplicate IPv4 address 10.10.0.3 (already used by machine `web` at line 12); expected a unique address per machine
//! ```
//!
//! Array indices in field paths (`machine[2]`) count from 0 in file order.
//! A TOML syntax error stops parsing at once (there is no document to check yet).
//!
//! # Example (every key)
//!
//! ```toml
//! [group]
//! name = "shop"              # [A-Za-z0-9_.-], 1..=64 characters, not "." or ".."
//! id = 7                     # u16, carried in the IPv4 option of tagged packets
//! mode = "pipelined"         # async | sync | pipelined (default) | checkpoint (later)
//!
//! [backup]
//! endpoint = "10.99.0.2:7800"              # HOST:PORT of the backup server (TLS)
//! server_name = "backup.pipecloud.test"    # TLS name to verify (default: endpoint host)
//! ca = "certs/ca.pem"                      # relative paths: relative to the topology file
//! cert = "certs/shop-agent.pem"
//! key = "certs/shop-agent.key"
//!
//! [policy]                                 # optional, every key has a default
//! on_backup_loss = "stall"                 # stall (default) | degrade-to-async
//! # degrade_after_s = 30                   # required with degrade-to-async, 1..=86400
//! max_inflight_bytes = "64MiB"             # unacked replication bytes before writes slow down
//! netqueue_max_packets = 65536             # held client-bound packets, 1..=65536 (kernel limit)
//! netqueue_max_bytes = "256MiB"            # held client-bound bytes
//! replication_coalesce_us = 200            # 0..=10000: longest a write waits for earlier writes'
//!                                          # acks before it is sent anyway (0: send at once)
//! replication_async_batch_us = 1000        # 0..=10000, async mode only: writes are sent in
//!                                          # batches at most this old (0: send at once)
//! heartbeat_interval_ms = 1000             # 10..=60000: how often the agent sends the backup a
//!                                          # heartbeat (RTT figure, liveness)
//! heartbeat_timeout_ms = 5000              # 100..=600000, at least twice the interval: a backup
//!                                          # silent this long is disconnected and dialled again
//!
//! [[host]]
//! name = "dom0-a"
//! nbd_dir = "/run/pipecloud/dom0-a"        # absolute; the agent's NBD sockets: <nbd_dir>/<disk>.sock
//! ctl_socket = "/run/pipecloud/dom0-a/ctl.sock"   # optional, default <nbd_dir>/ctl.sock
//! busy_poll_us = 0                         # optional, 0..=10000 (0: off): network-path busy polling
//! netpath_priority = 1                     # optional, 0..=99: SCHED_FIFO priority of the network-path
//!                                          # thread (0: normal scheduling); not with busy_poll_us > 0
//! kernel_tagger = true                     # optional: tagging and hold fast path in eBPF (false: NFQUEUE only)
//! metrics_listen = "127.0.0.1:9701"        # optional: Prometheus `/metrics` over HTTP (absent: none)
//!
//! [[machine]]
//! name = "web"
//! ip = "10.10.0.2"
//! mac = "02:00:00:00:00:02"               # optional, unicast
//! host = "dom0-a"
//! outbound = true                          # may talk to clients: its replies are held
//!
//! [machine.vm]                             # optional: the machine is a QEMU guest that
//! kernel = "guest/vmlinux"                 # `pipecloud vm start` launches (every key: `vm`)
//! initrd = "guest/initrd.cpio"
//! ram_mib = 256
//!
//! [[machine]]
//! name = "db"
//! ip = "10.10.0.3"
//! host = "dom0-a"
//! writer = true                            # optional check: must (true) / must not (false) own a disk
//!
//! [[disk]]
//! name = "db-data"
//! machine = "db"
//! image = "/var/lib/pipecloud/db-data.img" # absolute
//! size = "1GiB"                            # bytes, or K/M/G/T (10^n) / Ki/Mi/Gi/Ti (2^n), optional B;
//!                                          # > 0 and a multiple of 512
//! ```
//!
//! # Model
//!
//! *Writers* are the machines that own at least one protected disk. They are
//! numbered `0..n` ([`WriterId`](crate::vector::WriterId)) in the order their
//! `[[machine]]` tables appear in the file. **Reordering machines renumbers
//! writers**, and writer ids are what the backup server keys its journal by: do
//! not reorder the machines of a group that already has state at the backup. At
//! most [`MAX_WRITERS`](crate::vector::MAX_WRITERS) machines may write (the IPv4
//! option carries at most that many entries).
//!
//! A machine is *outbound* when it may talk to clients outside the group (its
//! client-bound packets are held in the netqueue); a machine that is neither a
//! writer nor outbound is an *intermediate* (it only relays causality). At least
//! one machine must be outbound and at least one disk must be protected.
//!
//! A machine with a `[machine.vm]` table is a QEMU guest (`vm`): the launcher
//! (`pipecloud vm`) writes its command line from the topology, and the agent
//! finds its QMP socket and RAM file there. `mode = "checkpoint"` (full-state,
//! Remus-style) needs every machine to be such a guest; the agent does not
//! implement the mode yet.
//!
//! # Limits
//!
//! A file is at most [`MAX_TOPOLOGY_BYTES`]; a group has at most [`MAX_HOSTS`]
//! hosts, [`MAX_MACHINES`] machines and [`MAX_DISKS`] disks, and one host at most
//! [`MAX_DISKS_PER_HELLO`](crate::wire::MAX_DISKS_PER_HELLO) disks (an agent
//! announces all of its disks in one hello).
//! Unix socket paths derived from the file must fit `sun_path`
//! ([`MAX_UNIX_SOCKET_PATH`] bytes).
//!
//! # Where things are
//!
//! One concept per file; reading runs `document` → `convert` → `read` →
//! `validate`, driven by `parse`:
//!
//! - `model`: the validated [`Topology`] and its parts, the limits and defaults,
//!   and the questions the rest of the workspace asks of a topology.
//! - `values`: how single values are spelled (names, sizes, MACs, host names).
//! - `error`: [`TopologyError`] and the collector that turns byte offsets into
//!   `file:line:column` and gathers every error.
//! - `document`: a TOML document that keeps the span of every value, and a table
//!   reader that reports unknown keys.
//! - `convert`: one function per kind of value, saying what is wrong with it.
//! - `read`: each section (`[group]`, `[[host]]`, ...) read into typed values
//!   with their spans; the rules within one section.
//! - `validate`: the rules across records (unique names and addresses, known
//!   references, writer numbering, per-host limits).
//! - `vm`: the `[machine.vm]` section (a machine that is a QEMU guest): its
//!   model [`Vm`], reading, defaults and the rules across guests.
//! - `parse`: [`Topology::parse`], which runs the stages and builds the model.

mod convert;
mod document;
mod error;
mod model;
mod parse;
mod quorum;
mod read;
#[cfg(test)]
mod test_fixture;
mod validate;
mod values;
mod vm;

pub use crate::mode::{BackupLossPolicy, Mode, UnknownMode};
pub use error::{TopologyError, TopologyErrors};
pub use model::{
    default_ctl_socket, nbd_socket_path, Backup, Disk, Endpoint, Group, Host, Machine, Policy,
    Topology, DEFAULT_BUSY_POLL_US, DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_HEARTBEAT_TIMEOUT_MS,
    DEFAULT_KERNEL_TAGGER, DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_NETPATH_PRIORITY,
    DEFAULT_NETQUEUE_MAX_BYTES, DEFAULT_NETQUEUE_MAX_PACKETS, DEFAULT_REPLICATION_ASYNC_BATCH_US,
    DEFAULT_REPLICATION_COALESCE_US, MAX_BUSY_POLL_US, MAX_DEGRADE_AFTER_S, MAX_DISKS,
    MAX_DISK_SIZE, MAX_HEARTBEAT_INTERVAL_MS, MAX_HEARTBEAT_TIMEOUT_MS, MAX_HOSTS, MAX_MACHINES,
    MAX_NETPATH_PRIORITY, MAX_NETQUEUE_PACKETS, MAX_REPLICATION_ASYNC_BATCH_US,
    MAX_REPLICATION_COALESCE_US, MAX_TOPOLOGY_BYTES, MAX_UNIX_SOCKET_PATH,
    MIN_HEARTBEAT_INTERVAL_MS, MIN_HEARTBEAT_TIMEOUT_MS, MIN_NETQUEUE_BYTES, SECTOR_SIZE,
};
pub use quorum::{FailoverPolicy, Quorum, DEFAULT_LEASE_MS, MAX_QUORUM_ENDPOINTS};
pub use values::{check_name, format_mac, format_size, parse_mac, parse_size};
pub use vm::{
    default_console, default_pidfile, default_qmp, default_ram_file, default_tap, Accel, Platform,
    Vm, DEFAULT_VM_APPEND, DEFAULT_VM_CPUS, DEFAULT_VM_PREFIX_LEN, DEFAULT_VM_QEMU,
    DEFAULT_VM_RAM_MIB, MAX_IFNAME_LEN, MAX_VM_CPUS, MAX_VM_EXTRA_ARGS, MAX_VM_RAM_MIB,
    MIN_VM_RAM_MIB,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::WriterId;

    #[test]
    fn topology_module_doc_example_is_valid() {
        let source = include_str!("mod.rs");
        let example: String = source
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start_matches(' ')))
            .collect();
        assert!(example.contains("[[disk]]"), "example not found");
        let t = Topology::parse(&example, "doc").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.writer_of("db"), Some(WriterId(0)));
        assert_eq!(t.policy.max_inflight_bytes, 64 << 20);
        assert_eq!(t.vm("web").map(|v| v.ram_mib), Some(256));
        assert!(t.vm("db").is_none());
    }
}
