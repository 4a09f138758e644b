//! The replication client's send policy: whether the sender writes the unsent
//! write frames to the socket now, at a deadline, or has nothing to send, and
//! whether a newly issued write must wake it.
//!
//! Sending each write alone as soon as it is issued costs a TLS record, a
//! wake-up of the backup and NIC work per write; waiting too long adds to the
//! guest's latency (in sync and pipelined modes a reply waits for the ack).
//! The rule ([`Coalesce`] under a [`SendRule`]) balances the two. It is kept
//! apart from the client's buffer ([`super::state`]) so that it can be read
//! and changed alone: it is pure, sees only the unsent writes (their issue
//! time and cost) and whether sent writes still wait for their ack, and is
//! given the time. `State::send_decision` and `State::wake_sender_for` feed it
//! from the buffer and keep its answer.

use std::time::{Duration, Instant};

/// In `async` mode no completion waits for an ack, so the latency of a send does
/// not matter, only its cost: writes then go in batches by age (`async_delay`,
/// or `bytes`), whatever the acks do. That takes the per-write send (TLS record,
/// loopback/NIC work, a wake-up of the backup) off the guest's path, which
/// measured clearly better at queue depth 1 than the ack-clocked rule in a
/// same-run A/B against `nbdkit file` (`docs/machine.md`, "Block path, sessions 7–8").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coalesce {
    /// Longest a write waits for earlier writes' acks before it is sent anyway.
    pub delay: Duration,
    /// Unsent bytes (write cost) that make the sender go at once.
    pub bytes: u64,
    /// In async mode: longest a write waits for a batch (zero: at once).
    pub async_delay: Duration,
}

/// Which coalescing rule `decide` applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendRule {
    /// Nagle's rule with a deadline (`Coalesce::delay`): sync and pipelined.
    AckClocked,
    /// Batches by age (`Coalesce::async_delay`): async.
    ByAge,
    /// Whatever is unsent goes now: a guest FLUSH asked for it (any mode).
    AtOnce,
}

/// What `decide` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendDecision {
    /// No unsent write.
    Nothing,
    /// Send the unsent writes now.
    Now,
    /// Wait for an ack, more writes, or this instant, whichever comes first.
    At(Instant),
}

/// An unsent write, as the rule sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Unsent {
    /// When it was issued.
    pub(super) issued_at: Instant,
    /// Its cost ([`super::write_cost`]).
    pub(super) cost: u64,
}

/// The coalescing rule: `outstanding` says whether a sent write still waits
/// for its ack, `unsent` lists the writes not sent yet (stops reading them at
/// the byte bound). Also returns the unsent bytes counted.
pub(super) fn decide(
    outstanding: bool,
    unsent: impl IntoIterator<Item = Unsent>,
    coalesce: Coalesce,
    rule: SendRule,
    now: Instant,
) -> (SendDecision, u64) {
    let mut oldest: Option<Instant> = None;
    let mut bytes = 0u64;
    for e in unsent {
        oldest = Some(oldest.map_or(e.issued_at, |o| o.min(e.issued_at)));
        bytes += e.cost;
        if bytes >= coalesce.bytes {
            return (SendDecision::Now, bytes);
        }
    }
    let Some(oldest) = oldest else {
        return (SendDecision::Nothing, 0);
    };
    let (delay, ack_clocked) = match rule {
        SendRule::AckClocked => (coalesce.delay, true),
        SendRule::ByAge => (coalesce.async_delay, false),
        SendRule::AtOnce => return (SendDecision::Now, bytes),
    };
    let due = oldest.checked_add(delay).unwrap_or(oldest);
    let decision = if (ack_clocked && !outstanding) || due <= now {
        SendDecision::Now
    } else {
        SendDecision::At(due)
    };
    (decision, bytes)
}

/// Whether a new write must wake the sender. Armed when [`decide`] answered
/// [`SendDecision::At`]: the sender sleeps until a deadline that covers every
/// newer write too, so a new write need not wake it unless it fills the byte
/// bound; the value is the room left before that bound. `None`: a new write
/// must wake the sender (it is idle, sending, or between sessions).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SenderArm(Option<u64>);

impl SenderArm {
    /// Remembers the answer of [`decide`] (`bytes`: the unsent bytes it counted).
    pub(super) fn after_decision(
        &mut self,
        decision: SendDecision,
        coalesce: Coalesce,
        bytes: u64,
    ) {
        self.0 = match decision {
            SendDecision::At(_) => Some(coalesce.bytes.saturating_sub(bytes)),
            SendDecision::Now | SendDecision::Nothing => None,
        };
    }

    /// The next write must wake the sender (a session started or ended).
    pub(super) fn disarm(&mut self) {
        self.0 = None;
    }

    /// A write of `cost` was just issued: whether it must wake the sender.
    pub(super) fn wake_for(&mut self, cost: u64) -> bool {
        match &mut self.0 {
            Some(room) if *room > cost => {
                *room -= cost;
                false
            }
            _ => {
                self.0 = None;
                true
            }
        }
    }
}
