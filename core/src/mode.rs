//! Replication modes of a protection group and the policy for a lost backup.
//!
//! The mode decides when a guest write completes and what the network path holds
//! (docs/design.md, replication modes):
//!
//! | mode | write completes when | client-bound packets |
//! |---|---|---|
//! | [`Mode::Async`] | the local write is done | leave at once |
//! | [`Mode::Sync`] | the local write is done **and** the backup acked it | leave at once |
//! | [`Mode::Pipelined`] | the local write is done | held until the writes they depend on are committed |
//! | [`Mode::Checkpoint`] | full-state checkpoints (accepted in topology files, not implemented by the agent) | |
//!
//! This is the one definition of the types: topology files, the command line, the
//! agent's control socket and the harness all use it.
//!
//! # Parsing rule
//!
//! A mode name parses only when it is **exactly** one of the lowercase names of
//! [`Mode::ALL`]: no case folding, no trimming. The same name appears in topology
//! files, in `ctl mode`, in `ctl status` and in logs; one spelling everywhere means
//! what an operator greps for is what the program wrote, and a stray character is
//! reported instead of guessed at. The error ([`UnknownMode`]) repeats the input
//! and lists every valid name.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Replication mode of a protection group, switchable at run time (see the module
/// documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Writes complete locally, packets leave at once (baseline; client RPO > 0).
    Async,
    /// Writes complete when the backup acked them (DRBD protocol C).
    Sync,
    /// Writes complete locally; client-bound packets wait for their dependencies.
    #[default]
    Pipelined,
    /// Full-state (Remus-style) checkpoints. Accepted in files; not implemented yet.
    Checkpoint,
}

impl Mode {
    /// Every mode, in the order used by tables and help texts.
    pub const ALL: [Mode; 4] = [Mode::Async, Mode::Sync, Mode::Pipelined, Mode::Checkpoint];

    /// The name used in files, on the command line and on the control socket.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
            Mode::Pipelined => "pipelined",
            Mode::Checkpoint => "checkpoint",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Mode`] (see the module's parsing rule).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode `{0}`; expected one of async, sync, pipelined, checkpoint")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMode(s.to_owned()))
    }
}

/// What a group does while the backup is unreachable (docs/design.md, backup loss).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
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

impl fmt::Display for BackupLossPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackupLossPolicy::Stall => f.write_str("stall"),
            BackupLossPolicy::DegradeToAsync { after } => {
                write!(f, "degrade-to-async after {} s", after.as_secs())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
        }
        assert_eq!(Mode::default(), Mode::Pipelined);
    }

    #[test]
    fn only_exact_lowercase_names_parse() {
        for bad in [
            "",
            " ",
            "SYNC",
            "Sync",
            " sync",
            "sync ",
            "sync\n",
            "syn",
            "synchronous",
            "async,",
        ] {
            assert_eq!(
                bad.parse::<Mode>(),
                Err(UnknownMode(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn error_names_the_input_and_every_valid_mode() {
        let msg = "SYNC".parse::<Mode>().unwrap_err().to_string();
        assert!(msg.contains("`SYNC`"), "{msg}");
        for m in Mode::ALL {
            assert!(msg.contains(m.as_str()), "{msg} lacks {m}");
        }
    }

    #[test]
    fn loss_policy_displays() {
        assert_eq!(BackupLossPolicy::default().to_string(), "stall");
        let d = BackupLossPolicy::DegradeToAsync {
            after: Duration::from_secs(30),
        };
        assert_eq!(d.to_string(), "degrade-to-async after 30 s");
    }
}
