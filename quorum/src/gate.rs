//! The lease gate: what the data path asks before it releases a client-bound
//! packet or completes a guest write (docs/design.md §7).
//!
//! The lease keeper publishes the local deadline of its lease
//! (`LeaseState::release_deadline`); the gate is open while the gate's own
//! monotonic clock is before it. The data path reads the clock itself, so a
//! keeper stuck in an etcd call cannot keep the gate open past the deadline:
//! the gate closes on time whatever the keeper does (fail-closed).

use pipecloud_core::lease::Millis;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Open until a published deadline; shared by the keeper and the data path.
#[derive(Debug)]
pub struct LeaseGate {
    origin: Instant,
    /// Exclusive deadline in [`LeaseGate::now_ms`] units; 0: closed.
    deadline_ms: AtomicU64,
}

impl LeaseGate {
    /// A closed gate.
    pub fn new() -> Arc<LeaseGate> {
        Arc::new(LeaseGate {
            origin: Instant::now(),
            deadline_ms: AtomicU64::new(0),
        })
    }

    /// The gate's clock: milliseconds since it was made, starting at 1 (so
    /// that 0 can mean "closed").
    pub fn now_ms(&self) -> Millis {
        self.origin.elapsed().as_millis() as Millis + 1
    }

    /// The keeper's deadline (`None`: close now).
    pub fn publish(&self, deadline: Option<Millis>) {
        self.deadline_ms
            .store(deadline.unwrap_or(0), Ordering::SeqCst);
    }

    /// Whether output may be released and writes completed now.
    pub fn is_open(&self) -> bool {
        self.now_ms() < self.deadline_ms.load(Ordering::SeqCst)
    }

    /// How long the gate stays open without a renewal (`None`: closed).
    pub fn time_left(&self) -> Option<Duration> {
        let d = self.deadline_ms.load(Ordering::SeqCst);
        let now = self.now_ms();
        (now < d).then(|| Duration::from_millis(d - now))
    }
}

/// Two gates are equal when they are the same gate (configurations that hold
/// one compare by identity).
impl PartialEq for LeaseGate {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for LeaseGate {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_at_the_deadline_without_help() {
        let g = LeaseGate::new();
        assert!(!g.is_open());
        g.publish(Some(g.now_ms() + 30));
        assert!(g.is_open());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!g.is_open() && g.time_left().is_none());
    }
}
