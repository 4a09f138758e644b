//! Full-state (checkpoint) mode on the primary host (docs/design.md §9): the
//! agent pauses each QEMU guest of a group at every epoch, captures the RAM pages
//! written since the previous epoch and the device state, resumes the guest, and
//! ships the epoch to the backup in the background; the epoch rule itself (which
//! epoch a packet belongs to, when it may leave) is pure and lives in
//! `pipecloud_core::epoch`.
//!
//! - [`pagemap`]: `PAGEMAP_SCAN` on QEMU's `/proc/PID/pagemap` (dirty pages, from outside).
//! - [`qmp`]: a minimal QMP client over QEMU's unix socket (`stop`, `cont`, device state).
//! - [`driver`]: the per-group epoch loop and its shipper (pause, ship, acks → committed vector).
//! - [`capture`]: one pause of a group: stop all → open the epoch → scan, copy, device state → cont all.

pub mod capture;
pub mod driver;
pub mod pagemap;
pub mod qmp;
