//! Where a held reply's time goes (issue 20): for every client-bound packet
//! released from the hold queue, its hold time split into parts, kept in
//! always-on histograms ([`LogHistogram`]) that `ctl status`, `ctl hold` and
//! `/metrics` show.
//!
//! A held packet `p` (arrived at `A`, released at `R`) waits for the writes in
//! its tag. Of those, the *binding* write `b` is the one of this agent's writers
//! whose durability became known last (the [`WriteTimeline`] says when each
//! write was issued `I`, handed to the TLS stream `S` and acked `K`). Then
//!
//! ```text
//! hold       = R - A
//!   dep_send = max(S, A) - A           waiting for b to be sent (coalescing, batching, backpressure)
//!   round    = max(K, A) - max(S, A)   wire to the backup + its queue + journal/fsync + ack's way back
//!   release  = R - max(K, A)           committed vector -> verdict (prefix holes, flow order, wake-up)
//! ```
//!
//! and `dep_age = A - I` (how long before the packet its newest dependency was
//! issued) plus `waits_for` (writes beyond the committed vector its tag needed on
//! arrival) measure the *tag reach*: a reply whose newest dependency is younger
//! than the application's own commit waits for writes of other transactions. The
//! backup's share of `round` is in its own metrics (queue wait, journal write +
//! fsync: `pipecloud_backup_queue_latency_seconds`,
//! `pipecloud_backup_journal_latency_seconds`); `round` minus the WAN RTT minus
//! those is queueing on the way (TLS, socket buffers, the WAN emulator).
//!
//! Packets whose binding write is not known are counted, never guessed:
//! `remote` (a dependency on a writer of another host), `unexplained` (a write
//! no longer in the timeline's ring), `behind` (every dependency was already
//! acked on arrival: the packet waited behind an earlier packet of its flow or
//! an older unacked write of the prefix). Their hold time is in `hold` only.

use super::histogram::{HistSnapshot, LogHistogram};
use super::tails::TailRing;
use super::HoldHandle;
use crate::replication::WriteTimeline;
use pipecloud_core::WriterId;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// The histograms and counters of the breakdown (module docs).
#[derive(Debug, Default)]
pub struct HoldBreakdown {
    /// Hold time of every released packet, µs.
    pub hold_us: LogHistogram,
    /// Parts of the explained ones, µs.
    pub dep_send_us: LogHistogram,
    pub round_us: LogHistogram,
    pub release_us: LogHistogram,
    /// Age of the newest dependency on arrival, µs.
    pub dep_age_us: LogHistogram,
    /// Writes needed beyond the committed vector on arrival.
    pub waits_for: LogHistogram,
    /// The packets held far beyond one round trip, one by one ([`super::tails`]).
    pub tails: TailRing,
    explained: AtomicU64,
    remote: AtomicU64,
    unexplained: AtomicU64,
    behind: AtomicU64,
}

/// How one released packet was classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Explained {
    /// Split into parts.
    Split {
        dep_send_us: u64,
        round_us: u64,
        release_us: u64,
    },
    Remote,
    Unexplained,
    Behind,
}

fn us(ns: u64) -> u64 {
    ns / 1000
}

/// Splits the hold of `h`, released at `released` (module docs). Pure.
pub fn split(h: &HoldHandle, released: Instant, timeline: &WriteTimeline) -> (u64, Explained) {
    let a = timeline.ns(h.arrived);
    let r = timeline.ns(released).max(a);
    let mut binding: Option<(u64, u64)> = None; // (sent, acked)
    let mut remote = false;
    for (j, seq) in h.tag.nonzero() {
        let Ok(w) = u8::try_from(j).map(WriterId) else {
            remote = true;
            continue;
        };
        if !timeline.follows(w) {
            remote = true;
            continue;
        }
        let Some(t) = timeline.times(w, seq) else {
            return (us(r - a), Explained::Unexplained);
        };
        let (Some(s), Some(k)) = (t.sent_ns, t.acked_ns) else {
            return (us(r - a), Explained::Unexplained);
        };
        if k > a && binding.is_none_or(|(_, bk)| k > bk) {
            binding = Some((s, k));
        }
    }
    let e = match (binding, remote) {
        (None, true) => Explained::Remote,
        (None, false) => Explained::Behind,
        (Some((s, k)), _) => {
            let sa = s.max(a);
            let ka = k.max(sa);
            let kr = ka.min(r);
            Explained::Split {
                dep_send_us: us(sa - a),
                round_us: us(kr.saturating_sub(sa)),
                release_us: us(r - kr),
            }
        }
    };
    (us(r - a), e)
}

impl HoldBreakdown {
    /// Records the packets of one release at `released`.
    pub fn record(&self, packets: &[HoldHandle], released: Instant, timeline: &WriteTimeline) {
        for h in packets {
            let (hold, e) = split(h, released, timeline);
            self.hold_us.record(hold);
            self.tails.observe(h.arrived, hold, e, released, timeline);
            self.waits_for.record(h.waits_for);
            let newest = h
                .tag
                .nonzero()
                .filter_map(|(j, seq)| {
                    let w = WriterId(u8::try_from(j).ok()?);
                    timeline.times(w, seq).map(|t| t.issued_ns)
                })
                .max();
            if let Some(i) = newest {
                self.dep_age_us
                    .record(us(timeline.ns(h.arrived).saturating_sub(i)));
            }
            match e {
                Explained::Split {
                    dep_send_us,
                    round_us,
                    release_us,
                } => {
                    self.explained.fetch_add(1, Relaxed);
                    self.dep_send_us.record(dep_send_us);
                    self.round_us.record(round_us);
                    self.release_us.record(release_us);
                }
                Explained::Remote => {
                    self.remote.fetch_add(1, Relaxed);
                }
                Explained::Unexplained => {
                    self.unexplained.fetch_add(1, Relaxed);
                }
                Explained::Behind => {
                    self.behind.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// A copy of everything.
    pub fn snapshot(&self) -> HoldSnapshot {
        HoldSnapshot {
            hold_us: self.hold_us.snapshot(),
            dep_send_us: self.dep_send_us.snapshot(),
            round_us: self.round_us.snapshot(),
            release_us: self.release_us.snapshot(),
            dep_age_us: self.dep_age_us.snapshot(),
            waits_for: self.waits_for.snapshot(),
            explained: self.explained.load(Relaxed),
            remote: self.remote.load(Relaxed),
            unexplained: self.unexplained.load(Relaxed),
            behind: self.behind.load(Relaxed),
        }
    }
}

/// A copy of a [`HoldBreakdown`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HoldSnapshot {
    pub hold_us: HistSnapshot,
    pub dep_send_us: HistSnapshot,
    pub round_us: HistSnapshot,
    pub release_us: HistSnapshot,
    pub dep_age_us: HistSnapshot,
    pub waits_for: HistSnapshot,
    pub explained: u64,
    pub remote: u64,
    pub unexplained: u64,
    pub behind: u64,
}

impl HoldSnapshot {
    /// The histograms by name (as `ctl hold` prints them).
    pub fn histograms(&self) -> [(&'static str, &HistSnapshot); 6] {
        [
            ("hold_us", &self.hold_us),
            ("dep_send_us", &self.dep_send_us),
            ("round_us", &self.round_us),
            ("release_us", &self.release_us),
            ("dep_age_us", &self.dep_age_us),
            ("waits_for", &self.waits_for),
        ]
    }

    /// The counters by name.
    pub fn counters(&self) -> [(&'static str, u64); 4] {
        [
            ("explained", self.explained),
            ("remote", self.remote),
            ("unexplained", self.unexplained),
            ("behind", self.behind),
        ]
    }

    /// What was recorded since `earlier`.
    pub fn since(&self, earlier: &HoldSnapshot) -> HoldSnapshot {
        HoldSnapshot {
            hold_us: self.hold_us.since(&earlier.hold_us),
            dep_send_us: self.dep_send_us.since(&earlier.dep_send_us),
            round_us: self.round_us.since(&earlier.round_us),
            release_us: self.release_us.since(&earlier.release_us),
            dep_age_us: self.dep_age_us.since(&earlier.dep_age_us),
            waits_for: self.waits_for.since(&earlier.waits_for),
            explained: self.explained.saturating_sub(earlier.explained),
            remote: self.remote.saturating_sub(earlier.remote),
            unexplained: self.unexplained.saturating_sub(earlier.unexplained),
            behind: self.behind.saturating_sub(earlier.behind),
        }
    }

    /// The machine-readable form (`ctl hold`): one `name=SUM;BUCKET:COUNT,...`
    /// or `name=N` per word.
    pub fn to_line(&self) -> String {
        let mut out = String::new();
        for (n, h) in self.histograms() {
            out.push_str(&format!("{n}={h} "));
        }
        for (n, c) in self.counters() {
            out.push_str(&format!("{n}={c} "));
        }
        out.trim_end().to_owned()
    }

    /// Parses [`to_line`](Self::to_line) (unknown words are ignored).
    pub fn parse_line(line: &str) -> Result<HoldSnapshot, String> {
        let mut s = HoldSnapshot::default();
        for word in line.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            let count = || v.parse::<u64>().map_err(|e| format!("{k}={v}: {e}"));
            match k {
                "hold_us" => s.hold_us = v.parse()?,
                "dep_send_us" => s.dep_send_us = v.parse()?,
                "round_us" => s.round_us = v.parse()?,
                "release_us" => s.release_us = v.parse()?,
                "dep_age_us" => s.dep_age_us = v.parse()?,
                "waits_for" => s.waits_for = v.parse()?,
                "explained" => s.explained = count()?,
                "remote" => s.remote = count()?,
                "unexplained" => s.unexplained = count()?,
                "behind" => s.behind = count()?,
                _ => {}
            }
        }
        Ok(s)
    }

    /// One human line: p50/p99 of each part in ms, and the counts.
    pub fn summary(&self) -> String {
        let q = |h: &HistSnapshot, q: f64, scale: f64| {
            h.quantile(q)
                .map_or_else(|| "-".to_owned(), |v| format!("{:.1}", v / scale))
        };
        let mut out = format!("released={}", self.hold_us.count());
        for (n, h) in self.histograms() {
            let (name, scale) = match n.strip_suffix("_us") {
                Some(base) => (format!("{base}_ms"), 1000.0),
                None => (n.to_owned(), 1.0),
            };
            out.push_str(&format!(
                " {name}(p50={} p99={})",
                q(h, 0.5, scale),
                q(h, 0.99, scale)
            ));
        }
        for (n, c) in self.counters() {
            out.push_str(&format!(" {n}={c}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipecloud_core::CountVector;
    use std::time::Duration;

    fn handle(tag: &[u64], arrived: Instant) -> HoldHandle {
        HoldHandle {
            queue: 1,
            id: 1,
            ordinal: 0,
            tag: CountVector::from_slice(tag),
            arrived,
            waits_for: 1,
        }
    }

    #[test]
    fn the_binding_write_splits_the_hold() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let tl = WriteTimeline::new([WriterId(0)], t0);
        // Write 1 sent before the packet arrives, write 2 after it.
        tl.issued(WriterId(0), 1, ms(1), 8192);
        tl.sent(WriterId(0), 1, ms(2));
        tl.issued(WriterId(0), 2, ms(3), 8192);
        tl.sent(WriterId(0), 2, ms(14));
        tl.acked(WriterId(0), 1, ms(55));
        tl.acked(WriterId(0), 2, ms(66));
        // Packet at 10 depending on write 2: 4 ms to be sent, 52 ms round, 1 ms release.
        let h = handle(&[2], ms(10));
        let (hold, e) = split(&h, ms(67), &tl);
        assert_eq!(hold, 57_000);
        assert_eq!(
            e,
            Explained::Split {
                dep_send_us: 4_000,
                round_us: 52_000,
                release_us: 1_000
            }
        );
        // Depending on write 1 only, which was in flight: no send wait.
        let (_, e) = split(&handle(&[1], ms(10)), ms(56), &tl);
        assert_eq!(
            e,
            Explained::Split {
                dep_send_us: 0,
                round_us: 45_000,
                release_us: 1_000
            }
        );
        // Everything acked before it arrived: it waited behind something else.
        assert_eq!(
            split(&handle(&[2], ms(70)), ms(71), &tl).1,
            Explained::Behind
        );
        // A writer of another host: not explained here.
        assert_eq!(
            split(&handle(&[0, 4], ms(70)), ms(80), &tl).1,
            Explained::Remote
        );
        // A write the ring does not know: counted, not guessed.
        assert_eq!(
            split(&handle(&[9], ms(70)), ms(80), &tl).1,
            Explained::Unexplained
        );
        let b = HoldBreakdown::default();
        b.record(&[h, handle(&[0, 4], ms(70))], ms(67), &tl);
        let s = b.snapshot();
        assert_eq!((s.explained, s.remote, s.hold_us.count()), (1, 1, 2));
        let age = s.dep_age_us.quantile(0.5).unwrap();
        assert!((age - 7_000.0).abs() < 250.0, "{age}");
        let back = HoldSnapshot::parse_line(&s.to_line()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.since(&s), HoldSnapshot::since(&s, &s));
        assert_eq!(s.since(&s).hold_us.count(), 0);
        assert!(s.summary().contains("round_ms(p50="), "{}", s.summary());
    }
}
