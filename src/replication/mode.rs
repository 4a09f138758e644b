//! The run-time mode switch of a protection group.
//!
//! The mode types themselves ([`Mode`], [`UnknownMode`], [`BackupLossPolicy`]) and
//! their one parsing rule live in the core (`pipecloud_core::mode`); they are
//! re-exported here so the agent names them in one place. Disk writes complete
//! in `checkpoint` as in `pipelined`; what `checkpoint` adds (the epoch loop) is
//! in `crate::fullstate`, and switches into or out of it go through the group's
//! epoch loop (docs/design.md §13), not straight through [`ModeSwitch::set`].
//!
//! In every mode a write is assigned its seq and vector before it completes and is
//! replicated; the modes only differ in what completion waits for (and in what the
//! network path holds). The mode of a group is a [`ModeSwitch`]: one value shared
//! by every replicated disk of the group, the network path and the control
//! interface, switchable at run time without dropping guest I/O.

pub use pipecloud_core::mode::{BackupLossPolicy, Mode, UnknownMode};
use std::sync::Arc;
use tokio::sync::watch;

/// The mode of one protection group, shared by its disks, its network path and
/// the control interface. Cloning shares the same value.
///
/// A switch takes effect for writes that start completing after it: a sync
/// write already waiting for its ack completes as soon as the mode is no longer
/// sync; a write that already completed stays completed. Guest I/O is never
/// dropped or failed by a switch.
#[derive(Clone, Debug)]
pub struct ModeSwitch {
    tx: Arc<watch::Sender<Mode>>,
}

impl ModeSwitch {
    /// A switch starting in `mode`.
    pub fn new(mode: Mode) -> Self {
        let (tx, _) = watch::channel(mode);
        ModeSwitch { tx: Arc::new(tx) }
    }

    /// The current mode.
    pub fn get(&self) -> Mode {
        *self.tx.borrow()
    }

    /// Switches to `mode`; returns the previous mode.
    pub fn set(&self, mode: Mode) -> Mode {
        self.tx.send_replace(mode)
    }

    /// Subscribes to mode changes (the network path and waiting sync writes use this).
    pub fn subscribe(&self) -> watch::Receiver<Mode> {
        self.tx.subscribe()
    }
}

impl Default for ModeSwitch {
    fn default() -> Self {
        ModeSwitch::new(Mode::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_is_shared_and_notifies() {
        let a = ModeSwitch::new(Mode::Async);
        let b = a.clone();
        let mut rx = b.subscribe();
        assert_eq!(a.set(Mode::Sync), Mode::Async);
        assert_eq!(b.get(), Mode::Sync);
        assert!(rx.has_changed().unwrap_or(false));
        assert_eq!(*rx.borrow_and_update(), Mode::Sync);
    }
}
