//! The write timeline: when each recent write of this agent was issued, sent to
//! the backup and learned durable, for the network path to explain where a held
//! reply's time went (issue 20, `docs/design.md §8`).
//!
//! A held client-bound packet waits for the newest writes in its tag. Knowing,
//! for that write, when it was issued (`State::issue`), when its frame was
//! handed to the TLS stream (`session::send`) and when its ack or a committed
//! vector covering it arrived (`State::release`), the hold splits into waiting
//! for the write to be sent, the round trip to the backup, and the release
//! itself (`crate::netpath` records the split in its histograms).
//!
//! Bounded: [`SLOTS`] recent writes per writer in a ring indexed by `seq %
//! SLOTS`; an older write's slot is reused and a reader asking for it gets
//! `None` (the hold is then counted as unexplained, never guessed). Lock-free:
//! the replication thread stores, the network-path thread loads, all relaxed
//! atomics plus a seq check before and after reading a slot, so a torn read is
//! detected and reported as `None`. It is diagnostics only: nothing that decides
//! a release reads it.

use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::time::Instant;

use pipecloud_core::vector::MAX_WRITERS;
use pipecloud_core::{Seq, WriterId};

/// Writes remembered per writer (a power of two).
pub const SLOTS: usize = 1 << 14;

/// Marks a slot being rewritten or never written.
const INVALID: u64 = u64::MAX;

#[derive(Default)]
struct Slot {
    seq: AtomicU64,
    issued: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
}

/// When one write was issued, sent and learned durable (nanoseconds since the
/// timeline's epoch; `None`: not yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteTimes {
    pub issued_ns: u64,
    pub sent_ns: Option<u64>,
    pub acked_ns: Option<u64>,
}

/// The timeline of this agent's writers (module docs).
pub struct WriteTimeline {
    epoch: Instant,
    /// Per writer index: its ring, for the writers this agent serves.
    rings: Vec<Option<Box<[Slot]>>>,
}

impl std::fmt::Debug for WriteTimeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTimeline").finish_non_exhaustive()
    }
}

impl WriteTimeline {
    /// A timeline for `writers` (the ones this agent serves).
    pub fn new(writers: impl IntoIterator<Item = WriterId>, epoch: Instant) -> Self {
        let mut rings: Vec<Option<Box<[Slot]>>> = (0..MAX_WRITERS).map(|_| None).collect();
        for w in writers {
            if let Some(r) = rings.get_mut(w.index()) {
                *r = Some(
                    (0..SLOTS)
                        .map(|_| Slot {
                            seq: AtomicU64::new(INVALID),
                            ..Slot::default()
                        })
                        .collect(),
                );
            }
        }
        WriteTimeline { epoch, rings }
    }

    /// Nanoseconds of `t` since the epoch (0 before it), plus one so that 0 means "not yet".
    pub fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(INVALID - 1)
            .saturating_add(1)
            .min(INVALID - 1)
    }

    fn slot(&self, w: WriterId, seq: Seq) -> Option<&Slot> {
        let ring = self.rings.get(w.index())?.as_ref()?;
        ring.get((seq as usize) & (SLOTS - 1))
    }

    /// Whether this timeline follows writer `w` (one of this agent's).
    pub fn follows(&self, w: WriterId) -> bool {
        self.rings.get(w.index()).is_some_and(Option::is_some)
    }

    /// Write `seq` of `w` was issued at `now`.
    pub fn issued(&self, w: WriterId, seq: Seq, now: Instant) {
        let Some(s) = self.slot(w, seq) else { return };
        s.seq.store(INVALID, Release);
        s.sent.store(0, Relaxed);
        s.acked.store(0, Relaxed);
        s.issued.store(self.ns(now), Relaxed);
        s.seq.store(seq, Release);
    }

    /// Write `seq` of `w` was handed to the stream at `now` (a resend moves it later).
    pub fn sent(&self, w: WriterId, seq: Seq, now: Instant) {
        if let Some(s) = self.slot(w, seq).filter(|s| s.seq.load(Acquire) == seq) {
            s.sent.store(self.ns(now), Relaxed);
        }
    }

    /// Write `seq` of `w` became known durable at `now` (the first time counts).
    pub fn acked(&self, w: WriterId, seq: Seq, now: Instant) {
        if let Some(s) = self.slot(w, seq).filter(|s| s.seq.load(Acquire) == seq) {
            let _ = s.acked.compare_exchange(0, self.ns(now), Relaxed, Relaxed);
        }
    }

    /// What is known of write `seq` of `w`; `None` if it is not (or no longer) in the ring.
    pub fn times(&self, w: WriterId, seq: Seq) -> Option<WriteTimes> {
        let s = self.slot(w, seq)?;
        if s.seq.load(Acquire) != seq {
            return None;
        }
        let issued_ns = s.issued.load(Relaxed);
        let sent = s.sent.load(Relaxed);
        let acked = s.acked.load(Relaxed);
        if s.seq.load(Acquire) != seq {
            return None;
        }
        Some(WriteTimes {
            issued_ns,
            sent_ns: (sent != 0).then_some(sent),
            acked_ns: (acked != 0).then_some(acked),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_each_step_and_forgets_overwritten_writes() {
        let t0 = Instant::now();
        let tl = WriteTimeline::new([WriterId(1)], t0);
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(tl.follows(WriterId(1)) && !tl.follows(WriterId(0)));
        tl.issued(WriterId(1), 5, ms(1));
        tl.sent(WriterId(1), 5, ms(2));
        tl.acked(WriterId(1), 5, ms(10));
        tl.acked(WriterId(1), 5, ms(20)); // the first ack counts
        let w = tl.times(WriterId(1), 5).unwrap();
        assert_eq!(w.issued_ns, tl.ns(ms(1)));
        assert_eq!(w.sent_ns, Some(tl.ns(ms(2))));
        assert_eq!(w.acked_ns, Some(tl.ns(ms(10))));
        // Another writer, or a seq never issued: unknown.
        assert_eq!(tl.times(WriterId(0), 5), None);
        assert_eq!(tl.times(WriterId(1), 6), None);
        // The slot is reused SLOTS writes later: the old write is gone.
        tl.issued(WriterId(1), 5 + SLOTS as u64, ms(30));
        assert_eq!(tl.times(WriterId(1), 5), None);
        let w = tl.times(WriterId(1), 5 + SLOTS as u64).unwrap();
        assert_eq!((w.sent_ns, w.acked_ns), (None, None));
        // Steps of a write no longer in the ring are ignored.
        tl.sent(WriterId(1), 5, ms(40));
        assert_eq!(
            tl.times(WriterId(1), 5 + SLOTS as u64).unwrap().sent_ns,
            None
        );
    }
}
