//! Counters and gauges of the network path, and the one-line summary that
//! `ctl status` prints.
//!
//! The driver thread counts every decision it takes (tag-queue events, hold
//! outcomes, releases) and refreshes a few gauges (packets and bytes held,
//! the oldest held packet, the kernel's queue counters); `ctl` and the
//! `/metrics` endpoint read them from other threads. They live apart from the
//! decisions so that a reader of the tag and hold rules does not scroll past
//! bookkeeping, and so that every counter is declared once, in the
//! `metrics!` list below, which generates both the storage index and the
//! [`MetricsSnapshot`] field.

use super::{HoldEngine, HoldOutcome, TagEvent};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Counters and gauges of the network path (all `Relaxed` atomics; read them
/// with [`NetPathMetrics::snapshot`]).
#[derive(Debug)]
pub struct NetPathMetrics {
    epoch: Instant,
    counters: [AtomicU64; COUNTERS],
    /// The kernel tagger, when one runs (its counters live in its map).
    kernel: std::sync::OnceLock<std::sync::Arc<crate::ebpf::KernelTagger>>,
    /// Where the held packets' time went (issue 20).
    pub hold: super::breakdown::HoldBreakdown,
    /// The replication client's write timeline, once attached: without it the
    /// breakdown records only the hold times.
    timeline: std::sync::OnceLock<std::sync::Arc<crate::replication::WriteTimeline>>,
}

macro_rules! metrics {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[derive(Clone, Copy)]
        #[repr(usize)]
        pub(super) enum M { $($name),* , _Count }
        const COUNTERS: usize = M::_Count as usize;

        /// A point-in-time copy of [`NetPathMetrics`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct MetricsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
            /// Age of the oldest held packet.
            pub oldest_held_age: Option<Duration>,
            /// The kernel tagger's counters, when it runs.
            pub kernel: Option<crate::ebpf::KernelTagStats>,
        }

        impl NetPathMetrics {
            /// Copies every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                let at = self.get(M::oldest_held_at_ns);
                let now = self.now_ns();
                MetricsSnapshot {
                    $( $name: self.get(M::$name), )*
                    oldest_held_age: (at != NONE).then(|| Duration::from_nanos(now.saturating_sub(at))),
                    kernel: self.kernel.get().map(|k| k.stats()),
                }
            }
        }
    };
}

/// Marker for "no held packet" in the oldest-held gauge.
const NONE: u64 = u64::MAX;

metrics! {
    /// Packets tagged with their sender's pending vector.
    tagged,
    /// Packets left untagged because the sender's vector was zero.
    untagged_zero,
    /// Tags of our group merged into a local receiver's vector.
    merged,
    /// Options stripped before delivery (ours and foreign).
    stripped,
    /// Tags merged but not stripped.
    merged_unstripped,
    /// Local-to-local packets merged directly.
    merged_local,
    /// Options of another group stripped.
    foreign_stripped,
    /// Passed untagged: other IPv4 options.
    untagged_other_options,
    /// Passed untagged: fragments.
    untagged_fragments,
    /// Passed: not IPv4.
    untagged_non_ipv4,
    /// Pure TCP ACKs passed untagged.
    pure_acks_untagged,
    /// Packets from other hosts that carried no tag.
    arrived_untagged,
    /// Tag-queue packets between no local protected machines.
    not_ours,
    /// Headers the option code could not parse (passed).
    malformed,
    /// Packets dropped because they needed a tag and could not get one.
    tag_failures,
    /// Client-bound packets held (total).
    held_total,
    /// Client-bound packets released after being held (total).
    released,
    /// Client-bound packets accepted at once (committed already covered them).
    released_immediately,
    /// Client-bound packets dropped: netqueue full.
    hold_full_drops,
    /// Client-bound packets dropped: sender not a local protected machine.
    hold_unknown_drops,
    /// Committed-vector updates that released at least one packet.
    release_updates,
    /// Packets released by the latest such update.
    last_release_batch,
    /// Most packets released by one update.
    max_release_batch,
    /// Gauge: packets held now.
    held_packets,
    /// Gauge: bytes held now.
    held_bytes,
    /// Gauge: arrival of the oldest held packet (ns since the metrics epoch; internal).
    oldest_held_at_ns,
    /// Error messages the kernel returned for our verdicts.
    verdict_errors,
    /// Socket receive-buffer overruns (packets the kernel dropped on delivery).
    socket_overruns,
    /// Datagrams that did not parse.
    parse_errors,
    /// Kernel: packets dropped because a queue was full (all our queues).
    nfq_queue_dropped,
    /// Kernel: packets dropped because delivery to the agent failed.
    nfq_user_dropped,
    /// Kernel: packets waiting for a verdict now (all our queues).
    nfq_queued,
    /// Times the driver thread went to sleep in `poll(2)`.
    driver_sleeps,
    /// Microseconds the driver thread spent busy polling without finding work
    /// (the CPU that [`NetPathConfig::busy_poll`](super::NetPathConfig::busy_poll) costs).
    busy_poll_idle_us,
    /// 1 when the kernel refused the driver thread's real-time priority
    /// (`host.netpath_priority`; no `CAP_SYS_NICE`): it runs at normal priority.
    priority_refused,
}

impl Default for NetPathMetrics {
    fn default() -> Self {
        let m = NetPathMetrics {
            epoch: Instant::now(),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            kernel: std::sync::OnceLock::new(),
            hold: Default::default(),
            timeline: std::sync::OnceLock::new(),
        };
        m.set(M::oldest_held_at_ns, NONE);
        m
    }
}

impl NetPathMetrics {
    /// Reports the kernel tagger's counters in snapshots from now on.
    pub fn attach_kernel(&self, k: std::sync::Arc<crate::ebpf::KernelTagger>) {
        let _ = self.kernel.set(k);
    }

    /// Splits the hold times of released packets using `t` (the group's
    /// replication client's [`WriteTimeline`](crate::replication::WriteTimeline)).
    pub fn attach_timeline(&self, t: std::sync::Arc<crate::replication::WriteTimeline>) {
        let _ = self.timeline.set(t);
    }

    /// Records the hold breakdown of `packets`, released at `now`.
    pub(super) fn record_released(&self, packets: &[super::HoldHandle], now: Instant) {
        if packets.is_empty() {
            return;
        }
        match self.timeline.get() {
            Some(t) => self.hold.record(packets, now, t),
            None => {
                for h in packets {
                    let us = now.saturating_duration_since(h.arrived).as_micros();
                    self.hold
                        .hold_us
                        .record(u64::try_from(us).unwrap_or(u64::MAX));
                }
            }
        }
    }

    fn get(&self, m: M) -> u64 {
        self.counters[m as usize].load(Relaxed)
    }

    pub(super) fn add(&self, m: M, n: u64) {
        self.counters[m as usize].fetch_add(n, Relaxed);
    }

    fn set(&self, m: M, v: u64) {
        self.counters[m as usize].store(v, Relaxed);
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    fn at_ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Counts one tag-queue event.
    pub fn count_tag(&self, e: TagEvent) {
        let m = match e {
            TagEvent::Tagged => M::tagged,
            TagEvent::UntaggedZero => M::untagged_zero,
            TagEvent::MergedStripped => {
                self.add(M::stripped, 1);
                M::merged
            }
            TagEvent::MergedUnstripped => M::merged_unstripped,
            TagEvent::MergedLocal => M::merged_local,
            TagEvent::ForeignStripped => {
                self.add(M::stripped, 1);
                M::foreign_stripped
            }
            TagEvent::UntaggedOtherOptions => M::untagged_other_options,
            TagEvent::UntaggedFragment => M::untagged_fragments,
            TagEvent::UntaggedNonIpv4 => M::untagged_non_ipv4,
            TagEvent::PureAckUntagged => M::pure_acks_untagged,
            TagEvent::ArrivedUntagged => M::arrived_untagged,
            TagEvent::NotOurs => M::not_ours,
            TagEvent::Malformed => M::malformed,
            TagEvent::TagFailed => M::tag_failures,
        };
        self.add(m, 1);
    }

    pub(super) fn count_hold(&self, o: HoldOutcome) {
        self.add(
            match o {
                HoldOutcome::ReleasedNow => M::released_immediately,
                HoldOutcome::Held => M::held_total,
                HoldOutcome::DroppedFull => M::hold_full_drops,
                HoldOutcome::DroppedUnknown => M::hold_unknown_drops,
            },
            1,
        );
    }

    pub(super) fn count_release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u64;
        self.add(M::released, n);
        self.add(M::release_updates, 1);
        self.set(M::last_release_batch, n);
        self.counters[M::max_release_batch as usize].fetch_max(n, Relaxed);
    }

    pub(super) fn gauge_hold(&self, engine: &mut HoldEngine) {
        self.set(M::held_packets, engine.held() as u64);
        self.set(M::held_bytes, engine.held_bytes() as u64);
        let at = engine.oldest_since().map_or(NONE, |t| self.at_ns(t));
        self.set(M::oldest_held_at_ns, at);
    }

    /// Sums the kernel counters of the group's queues (`stats` of the namespace).
    pub(super) fn gauge_kernel(&self, stats: &[crate::nfq::QueueStats], queues: &[u16]) {
        let (mut qd, mut ud, mut held) = (0, 0, 0);
        for s in stats.iter().filter(|s| queues.contains(&s.queue)) {
            qd += s.queue_dropped;
            ud += s.user_dropped;
            held += u64::from(s.queued);
        }
        self.set(M::nfq_queue_dropped, qd);
        self.set(M::nfq_user_dropped, ud);
        self.set(M::nfq_queued, held);
    }
}

impl std::fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tagged={} merged={} stripped={} merged_local={} untagged(zero={} options={} fragments={} non_ipv4={} pure_acks={} arrived={}) tag_failures={} \
             held={} ({} B, oldest {:?}) held_total={} released={} released_now={} last_batch={} drops(full={} unknown={} kernel_queue={} kernel_user={} overruns={}) verdict_errors={} \
             driver(sleeps={} busy_poll_idle_ms={} priority_refused={})",
            self.tagged,
            self.merged,
            self.stripped,
            self.merged_local,
            self.untagged_zero,
            self.untagged_other_options,
            self.untagged_fragments,
            self.untagged_non_ipv4,
            self.pure_acks_untagged,
            self.arrived_untagged,
            self.tag_failures,
            self.held_packets,
            self.held_bytes,
            self.oldest_held_age,
            self.held_total,
            self.released,
            self.released_immediately,
            self.last_release_batch,
            self.hold_full_drops,
            self.hold_unknown_drops,
            self.nfq_queue_dropped,
            self.nfq_user_dropped,
            self.socket_overruns,
            self.verdict_errors,
            self.driver_sleeps,
            self.busy_poll_idle_us / 1000,
            self.priority_refused,
        )?;
        if let Some(k) = &self.kernel {
            write!(
                f,
                " kernel(tagged={} stripped={} records={} fallbacks={} zero={} pure_acks={} arrived_untagged={} errors={} hold_passed={} hold_queued={})",
                k.tagged,
                k.stripped,
                k.records,
                k.fallbacks,
                k.untagged_zero,
                k.pure_acks,
                k.arrived_untagged,
                k.errors,
                k.hold_passed,
                k.hold_queued
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_snapshot_counts() {
        let m = NetPathMetrics::default();
        m.count_tag(TagEvent::Tagged);
        m.count_tag(TagEvent::MergedStripped);
        m.count_release(4);
        m.count_release(2);
        let s = m.snapshot();
        assert_eq!((s.tagged, s.merged, s.stripped), (1, 1, 1));
        assert_eq!(
            (
                s.released,
                s.release_updates,
                s.last_release_batch,
                s.max_release_batch
            ),
            (6, 2, 2, 4)
        );
        assert_eq!(s.oldest_held_age, None);
        assert!(!s.to_string().is_empty());
    }
}
