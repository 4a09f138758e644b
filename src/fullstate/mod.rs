//! Full-state (checkpoint) mode on the primary host (docs/design.md §9): the
//! agent pauses each QEMU guest of a group at every epoch, captures the RAM pages
//! written since the previous epoch and the device state, resumes the guest, and
//! ships the epoch to the backup in the background; the epoch rule itself (which
//! epoch a packet belongs to, when it may leave) is pure and lives in
//! `pipecloud_core::epoch`.
//!
//! - [`pagemap`]: `PAGEMAP_SCAN` on QEMU's `/proc/PID/pagemap` (dirty pages, from outside).

pub mod pagemap;
