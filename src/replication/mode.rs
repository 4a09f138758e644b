//! Replication modes of a protection group and the policy for a lost backup.
//!
//! The mode decides when a guest write completes (DESIGN §1):
//!
//! | mode | write completes when |
//! |---|---|
//! | [`Mode::Async`] | the local write is done |
//! | [`Mode::Sync`] | the local write is done **and** the backup acked it (DRBD protocol C) |
//! | [`Mode::Pipelined`] | the local write is done (the netqueue holds client-bound packets instead) |
//!
//! In every mode the write is also assigned its seq and vector before it completes
//! and is replicated; the modes only differ in what completion waits for (and in
//! what the network path holds). The mode of a group is a [`ModeSwitch`]: one
//! value shared by every replicated disk of the group, the network path and the
//! control interface, switchable at run time without dropping guest I/O.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// When a guest write completes (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Complete after the local write; client-bound packets are released at once.
    Async,
    /// Complete after the local write and the backup's ack.
    Sync,
    /// Complete after the local write; the netqueue holds client-bound packets
    /// until the writes they depend on are committed (the default).
    #[default]
    Pipelined,
}

impl Mode {
    /// Every mode, in the order used by tables and help texts.
    pub const ALL: [Mode; 3] = [Mode::Async, Mode::Sync, Mode::Pipelined];

    /// The mode's name as written in topology files and on the control socket.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
            Mode::Pipelined => "pipelined",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mode name that is not one of `async`, `sync`, `pipelined`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown replication mode {0:?} (expected async, sync or pipelined)")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownMode(s.to_owned()))
    }
}

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

/// What a group does while its backup is unreachable (DESIGN §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackupLossPolicy {
    /// Keep holding (zero RPO): held packets stay held, sync writes wait, the
    /// bounded buffer eventually stalls every writer until the backup is back.
    #[default]
    Stall,
    /// After the backup has been silent for `after`, raise a loud alarm, count it
    /// and mark the group *degraded*: the network path releases held packets and
    /// sync writes stop waiting for acks (RPO > 0). Writes keep being buffered and
    /// are re-sent on reconnection; the group returns to zero RPO once the backlog
    /// that existed at reconnection is committed.
    DegradeToAsync {
        /// How long the backup may stay silent before degrading.
        after: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_round_trip() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
            assert_eq!(m.to_string().to_uppercase().parse::<Mode>(), Ok(m));
        }
        assert!("checkpoint".parse::<Mode>().is_err());
        assert!("".parse::<Mode>().is_err());
    }

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
