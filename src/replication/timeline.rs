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
//!
//! For the tail events (`crate::netpath` tails, docs/design.md §8) each slot
//! also keeps the writer's cumulative payload bytes up to that write, and each
//! ring its newest seq, so that the state of the stream at a past instant is a
//! binary search away: bytes issued but not yet handed to the stream, issued but
//! not yet acked, and issued in a window before it ([`WriteTimeline::stream_at`]).
//! Searches assume a writer's writes are issued, sent and acked in seq order
//! (true but for a resend after a reconnect, which only moves a boundary).

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
    /// The writer's payload bytes issued up to and including this write.
    cum_bytes: AtomicU64,
}

/// One writer's ring, its newest seq and its running byte total.
struct Ring {
    slots: Box<[Slot]>,
    /// Newest seq issued (0: none yet).
    newest: AtomicU64,
    /// Payload bytes issued so far (the replication thread's running total).
    total_bytes: AtomicU64,
}

/// The stream of this agent's writers at one instant, summed over them
/// ([`WriteTimeline::stream_at`]); bytes as the replication buffer counts them
/// (payload plus a fixed per-write overhead). Lower bounds when writes older
/// than half the ring are involved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamAt {
    /// Issued but not yet handed to the TLS stream.
    pub unsent_bytes: u64,
    /// Issued but not yet known durable (queued, in flight, at the backup).
    pub outstanding_bytes: u64,
    /// Issued in the window before the instant.
    pub window_bytes: u64,
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
    rings: Vec<Option<Ring>>,
    /// The last heartbeat round trip to the backup, µs (0: none yet).
    rtt_us: AtomicU64,
}

impl std::fmt::Debug for WriteTimeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTimeline").finish_non_exhaustive()
    }
}

impl WriteTimeline {
    /// A timeline for `writers` (the ones this agent serves).
    pub fn new(writers: impl IntoIterator<Item = WriterId>, epoch: Instant) -> Self {
        let mut rings: Vec<Option<Ring>> = (0..MAX_WRITERS).map(|_| None).collect();
        for w in writers {
            if let Some(r) = rings.get_mut(w.index()) {
                *r = Some(Ring {
                    slots: (0..SLOTS)
                        .map(|_| Slot {
                            seq: AtomicU64::new(INVALID),
                            ..Slot::default()
                        })
                        .collect(),
                    newest: AtomicU64::new(0),
                    total_bytes: AtomicU64::new(0),
                });
            }
        }
        WriteTimeline {
            epoch,
            rings,
            rtt_us: AtomicU64::new(0),
        }
    }

    /// The instant `ns` (as [`ns`](Self::ns) gives it) stands for.
    pub fn instant(&self, ns: u64) -> Instant {
        self.epoch + std::time::Duration::from_nanos(ns.saturating_sub(1))
    }

    /// A heartbeat measured the round trip to the backup.
    pub fn set_rtt(&self, rtt: std::time::Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.rtt_us.store(us, Relaxed);
    }

    /// The last measured round trip to the backup (µs), if any.
    pub fn rtt_us(&self) -> Option<u64> {
        Some(self.rtt_us.load(Relaxed)).filter(|&r| r != 0)
    }

    /// Nanoseconds of `t` since the epoch (0 before it), plus one so that 0 means "not yet".
    pub fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(INVALID - 1)
            .saturating_add(1)
            .min(INVALID - 1)
    }

    fn ring(&self, w: WriterId) -> Option<&Ring> {
        self.rings.get(w.index())?.as_ref()
    }

    fn slot(&self, w: WriterId, seq: Seq) -> Option<&Slot> {
        self.ring(w)?.slots.get((seq as usize) & (SLOTS - 1))
    }

    /// Whether this timeline follows writer `w` (one of this agent's).
    pub fn follows(&self, w: WriterId) -> bool {
        self.rings.get(w.index()).is_some_and(Option::is_some)
    }

    /// Write `seq` of `w`, of `bytes`, was issued at `now`.
    pub fn issued(&self, w: WriterId, seq: Seq, now: Instant, bytes: u64) {
        let Some(ring) = self.ring(w) else { return };
        let Some(s) = self.slot(w, seq) else { return };
        // One thread issues: a load and a store, not a read-modify-write.
        let cum = ring.total_bytes.load(Relaxed).saturating_add(bytes);
        ring.total_bytes.store(cum, Relaxed);
        s.seq.store(INVALID, Release);
        s.sent.store(0, Relaxed);
        s.acked.store(0, Relaxed);
        s.issued.store(self.ns(now), Relaxed);
        s.cum_bytes.store(cum, Relaxed);
        s.seq.store(seq, Release);
        ring.newest.fetch_max(seq, Relaxed);
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

/// Which step of a write [`WriteTimeline::cum_upto`] looks at.
#[derive(Clone, Copy)]
enum Step {
    Issued,
    Sent,
    Acked,
}

impl WriteTimeline {
    /// The cumulative bytes of `w`'s newest write whose `step` happened at or
    /// before `t_ns` (0 if none in the searchable half of the ring). A binary
    /// search over seqs (module docs: steps happen in seq order).
    fn cum_upto(&self, w: WriterId, step: Step, t_ns: u64) -> u64 {
        let Some(ring) = self.ring(w) else { return 0 };
        let newest = ring.newest.load(Relaxed);
        if newest == 0 {
            return 0;
        }
        let at = |seq: Seq| -> Option<(u64, u64)> {
            let s = self.slot(w, seq)?;
            if s.seq.load(Acquire) != seq {
                return None;
            }
            let when = match step {
                Step::Issued => s.issued.load(Relaxed),
                Step::Sent => s.sent.load(Relaxed),
                Step::Acked => s.acked.load(Relaxed),
            };
            let cum = s.cum_bytes.load(Relaxed);
            (s.seq.load(Acquire) == seq).then_some((when, cum))
        };
        let done = |seq: Seq| at(seq).is_some_and(|(when, _)| when != 0 && when <= t_ns);
        // Half the ring: the issuing thread may overwrite the oldest slots meanwhile.
        let mut lo = newest.saturating_sub(SLOTS as u64 / 2).max(1);
        let mut hi = newest;
        if !done(lo) {
            return 0;
        }
        // Invariant: done(lo); find the last seq in [lo, hi] that is done.
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if done(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        at(lo).map_or(0, |(_, cum)| cum)
    }

    /// The stream at `t` (module docs), with `window` before it.
    pub fn stream_at(&self, t: Instant, window: std::time::Duration) -> StreamAt {
        let t_ns = self.ns(t);
        let from_ns = self.ns(t.checked_sub(window).unwrap_or(self.epoch));
        let mut out = StreamAt::default();
        for (i, _) in self.rings.iter().enumerate().filter(|(_, r)| r.is_some()) {
            let Ok(w) = u8::try_from(i).map(WriterId) else {
                continue;
            };
            let issued = self.cum_upto(w, Step::Issued, t_ns);
            let sent = self.cum_upto(w, Step::Sent, t_ns).min(issued);
            let acked = self.cum_upto(w, Step::Acked, t_ns).min(issued);
            let before = self.cum_upto(w, Step::Issued, from_ns).min(issued);
            out.unsent_bytes += issued - sent;
            out.outstanding_bytes += issued - acked;
            out.window_bytes += issued - before;
        }
        out
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
        tl.issued(WriterId(1), 5, ms(1), 100);
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
        tl.issued(WriterId(1), 5 + SLOTS as u64, ms(30), 100);
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

    #[test]
    fn the_stream_at_an_instant() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let tl = WriteTimeline::new([WriterId(0), WriterId(2)], t0);
        assert_eq!(tl.rtt_us(), None);
        tl.set_rtt(Duration::from_millis(50));
        assert_eq!(tl.rtt_us(), Some(50_000));
        assert_eq!(
            tl.stream_at(ms(5), Duration::from_millis(200)),
            StreamAt::default()
        );
        // Writer 0: 1..=10 of 1000 bytes issued at 10..=100 ms, the first 6
        // sent at issue + 1 ms, the first 3 acked at issue + 50 ms.
        for s in 1..=10u64 {
            tl.issued(WriterId(0), s, ms(10 * s), 1000);
            if s <= 6 {
                tl.sent(WriterId(0), s, ms(10 * s + 1));
            }
            if s <= 3 {
                tl.acked(WriterId(0), s, ms(10 * s + 50));
            }
        }
        // Writer 2: one big write at 95 ms, unsent.
        tl.issued(WriterId(2), 1, ms(95), 1 << 20);
        let at = tl.stream_at(ms(75), Duration::from_millis(30));
        // At 75 ms: 7 issued, 6 sent, 2 acked (the third at 80); 3 in the window (50, 75].
        assert_eq!(
            at,
            StreamAt {
                unsent_bytes: 1000,
                outstanding_bytes: 5000,
                window_bytes: 3000
            }
        );
        let at = tl.stream_at(ms(200), Duration::from_millis(200));
        assert_eq!(at.unsent_bytes, 4000 + (1 << 20));
        assert_eq!(at.outstanding_bytes, 7000 + (1 << 20));
        assert_eq!(at.window_bytes, 10_000 + (1 << 20));
        assert_eq!(tl.instant(tl.ns(ms(75))), ms(75));
    }
}
