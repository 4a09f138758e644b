//! Tail events (issue 20): the held replies that waited far longer than one
//! round trip, kept one by one so that each can be set against what else
//! happened at that moment (a checkpoint of the database, a burst of writes).
//!
//! The hold histograms ([`super::breakdown`]) say how long the tail is, not
//! when it happened or what the replication stream carried then. A released
//! packet is a *tail packet* when its hold exceeds the last heartbeat round
//! trip to the backup by more than [`TAIL_EXCESS_US`] (half the issue's
//! `hold_extra_p99` floor of 50 ms). Tail packets whose arrival falls within
//! [`EPISODE_GAP`] of the previous tail packet's release belong to the same
//! *episode* (one burst delays every client at once: 64 clients give 64 tail
//! packets and one episode). An episode records the wall-clock span, how many
//! packets, its worst packet's hold and breakdown parts, and the state of the
//! replication stream at its packets' arrivals (the maxima over them, from
//! [`WriteTimeline::stream_at`]): bytes issued but not yet sent, issued but not
//! yet durable, and issued in the [`BURST_WINDOW`] before.
//!
//! Bounded: the last [`RING_LEN`] episodes; at the bound the oldest is dropped
//! (the totals still count it). Cheap: a packet below the threshold costs one
//! atomic load; a tail packet takes a mutex only the network-path thread and a
//! `ctl tails` reader contend for. Diagnostics only: nothing that decides a
//! release reads it.

use super::breakdown::Explained;
use crate::replication::WriteTimeline;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// A hold longer than the round trip by more than this is a tail, µs.
pub const TAIL_EXCESS_US: u64 = 25_000;
/// Tail packets arriving within this of the previous one's release share an episode.
pub const EPISODE_GAP: Duration = Duration::from_millis(100);
/// The window before a packet's arrival whose issued bytes an episode records.
pub const BURST_WINDOW: Duration = Duration::from_millis(200);
/// Episodes kept.
pub const RING_LEN: usize = 64;

/// One episode of tail packets (module docs). Times are wall-clock Unix ms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TailEvent {
    /// Earliest arrival of its packets.
    pub first_arrived_ms: u64,
    /// Latest release of its packets.
    pub last_released_ms: u64,
    pub packets: u64,
    /// The round trip the threshold used, µs.
    pub rtt_us: u64,
    /// The worst packet: its hold, how it was classified and its parts, µs.
    pub hold_us: u64,
    pub kind: String,
    pub dep_send_us: u64,
    pub round_us: u64,
    pub release_us: u64,
    /// Maxima over its packets' arrivals ([`crate::replication::StreamAt`]).
    pub unsent_bytes: u64,
    pub outstanding_bytes: u64,
    pub window_bytes: u64,
}

const FIELDS: [&str; 12] = [
    "first_arrived_ms",
    "last_released_ms",
    "packets",
    "rtt_us",
    "hold_us",
    "kind",
    "dep_send_us",
    "round_us",
    "release_us",
    "unsent_bytes",
    "outstanding_bytes",
    "window_bytes",
];

impl TailEvent {
    fn numbers(&self) -> [u64; 11] {
        [
            self.first_arrived_ms,
            self.last_released_ms,
            self.packets,
            self.rtt_us,
            self.hold_us,
            self.dep_send_us,
            self.round_us,
            self.release_us,
            self.unsent_bytes,
            self.outstanding_bytes,
            self.window_bytes,
        ]
    }

    /// `name=value` words (`ctl tails`).
    pub fn to_line(&self) -> String {
        let n = self.numbers();
        let mut vals = n.iter().map(u64::to_string).collect::<Vec<_>>();
        vals.insert(5, self.kind.clone());
        FIELDS
            .iter()
            .zip(vals)
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Parses [`to_line`](Self::to_line); unknown words are ignored, every field is required.
    pub fn parse_line(line: &str) -> Result<TailEvent, String> {
        let mut e = TailEvent::default();
        let mut seen = 0usize;
        for word in line.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            let Some(i) = FIELDS.iter().position(|f| *f == k) else {
                continue;
            };
            seen |= 1 << i;
            if k == "kind" {
                e.kind = v.to_owned();
                continue;
            }
            let n = v.parse::<u64>().map_err(|err| format!("{k}={v}: {err}"))?;
            *match k {
                "first_arrived_ms" => &mut e.first_arrived_ms,
                "last_released_ms" => &mut e.last_released_ms,
                "packets" => &mut e.packets,
                "rtt_us" => &mut e.rtt_us,
                "hold_us" => &mut e.hold_us,
                "dep_send_us" => &mut e.dep_send_us,
                "round_us" => &mut e.round_us,
                "release_us" => &mut e.release_us,
                "unsent_bytes" => &mut e.unsent_bytes,
                "outstanding_bytes" => &mut e.outstanding_bytes,
                _ => &mut e.window_bytes,
            } = n;
        }
        if seen != (1 << FIELDS.len()) - 1 {
            return Err(format!("tail event with missing fields: {line:?}"));
        }
        Ok(e)
    }
}

struct Episodes {
    ring: VecDeque<TailEvent>,
    /// Release instant of the newest episode's latest packet.
    open_until: Option<Instant>,
}

/// The last [`RING_LEN`] tail episodes (module docs).
pub struct TailRing {
    /// A pairing of the monotonic and the wall clock, to stamp episodes.
    clock: (Instant, SystemTime),
    episodes: Mutex<Episodes>,
    episodes_total: AtomicU64,
    packets_total: AtomicU64,
}

impl std::fmt::Debug for TailRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailRing").finish_non_exhaustive()
    }
}

impl Default for TailRing {
    fn default() -> Self {
        TailRing {
            clock: (Instant::now(), SystemTime::now()),
            episodes: Mutex::new(Episodes {
                ring: VecDeque::with_capacity(RING_LEN),
                open_until: None,
            }),
            episodes_total: AtomicU64::new(0),
            packets_total: AtomicU64::new(0),
        }
    }
}

impl TailRing {
    /// Wall-clock Unix ms of `t`.
    fn unix_ms(&self, t: Instant) -> u64 {
        let (i0, s0) = self.clock;
        let wall = if t >= i0 {
            s0 + (t - i0)
        } else {
            s0 - (i0 - t)
        };
        wall.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// One released packet, arrived at `arrived`, held `hold_us`, split as `e`,
    /// released at `released`: recorded if it is a tail packet.
    pub fn observe(
        &self,
        arrived: Instant,
        hold_us: u64,
        e: Explained,
        released: Instant,
        timeline: &WriteTimeline,
    ) {
        let Some(rtt_us) = timeline.rtt_us() else {
            return;
        };
        if hold_us <= rtt_us.saturating_add(TAIL_EXCESS_US) {
            return;
        }
        let stream = timeline.stream_at(arrived, BURST_WINDOW);
        let (kind, [dep_send_us, round_us, release_us]) = match e {
            Explained::Split {
                dep_send_us,
                round_us,
                release_us,
            } => ("split", [dep_send_us, round_us, release_us]),
            Explained::Remote => ("remote", [0; 3]),
            Explained::Unexplained => ("unexplained", [0; 3]),
            Explained::Behind => ("behind", [0; 3]),
        };
        self.packets_total.fetch_add(1, Relaxed);
        let mut eps = self.episodes.lock().unwrap_or_else(|p| p.into_inner());
        let joins = !eps.ring.is_empty()
            && eps
                .open_until
                .is_some_and(|until| arrived <= until + EPISODE_GAP);
        if joins {
            eps.open_until = eps.open_until.map(|u| u.max(released));
        } else {
            self.episodes_total.fetch_add(1, Relaxed);
            if eps.ring.len() == RING_LEN {
                eps.ring.pop_front();
            }
            eps.ring.push_back(TailEvent {
                first_arrived_ms: u64::MAX,
                ..TailEvent::default()
            });
            eps.open_until = Some(released);
        }
        let arrived_ms = self.unix_ms(arrived);
        let released_ms = self.unix_ms(released);
        let Some(ep) = eps.ring.back_mut() else {
            return;
        };
        ep.first_arrived_ms = ep.first_arrived_ms.min(arrived_ms);
        ep.last_released_ms = ep.last_released_ms.max(released_ms);
        ep.packets += 1;
        if hold_us > ep.hold_us {
            ep.hold_us = hold_us;
            ep.rtt_us = rtt_us;
            ep.kind = kind.to_owned();
            (ep.dep_send_us, ep.round_us, ep.release_us) = (dep_send_us, round_us, release_us);
        }
        ep.unsent_bytes = ep.unsent_bytes.max(stream.unsent_bytes);
        ep.outstanding_bytes = ep.outstanding_bytes.max(stream.outstanding_bytes);
        ep.window_bytes = ep.window_bytes.max(stream.window_bytes);
    }

    /// The episodes kept, oldest first.
    pub fn events(&self) -> Vec<TailEvent> {
        let eps = self.episodes.lock().unwrap_or_else(|p| p.into_inner());
        eps.ring.iter().cloned().collect()
    }

    /// Episodes and tail packets since the agent started.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.episodes_total.load(Relaxed),
            self.packets_total.load(Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipecloud_core::WriterId;

    #[test]
    fn tail_packets_group_into_bounded_episodes() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let tl = WriteTimeline::new([WriterId(0)], t0);
        let ring = TailRing::default();
        let split = Explained::Split {
            dep_send_us: 80_000,
            round_us: 51_000,
            release_us: 1_000,
        };
        // No round trip known yet: nothing is a tail.
        ring.observe(ms(0), 500_000, split, ms(500), &tl);
        assert_eq!(ring.totals(), (0, 0));
        tl.set_rtt(Duration::from_millis(50));
        tl.issued(WriterId(0), 1, ms(900), 4 << 20);
        // Below RTT + TAIL_EXCESS_US: not a tail.
        ring.observe(ms(1000), 75_000, split, ms(1075), &tl);
        assert_eq!(ring.totals(), (0, 0));
        // Two packets of one burst, then one a second later.
        ring.observe(ms(1000), 132_000, split, ms(1132), &tl);
        ring.observe(ms(1150), 90_000, Explained::Behind, ms(1240), &tl);
        ring.observe(ms(2500), 80_000, Explained::Remote, ms(2580), &tl);
        assert_eq!(ring.totals(), (2, 3));
        let ev = ring.events();
        assert_eq!(ev.len(), 2);
        let e = &ev[0];
        assert_eq!(e.packets, 2);
        assert_eq!(e.last_released_ms - e.first_arrived_ms, 240);
        assert_eq!(
            (e.hold_us, e.kind.as_str(), e.dep_send_us),
            (132_000, "split", 80_000)
        );
        assert_eq!(e.outstanding_bytes, 4 << 20);
        assert_eq!((e.unsent_bytes, e.window_bytes), (4 << 20, 4 << 20));
        assert_eq!(ev[1].kind, "remote");
        assert_eq!(TailEvent::parse_line(&e.to_line()), Ok(e.clone()));
        assert!(TailEvent::parse_line("packets=3").is_err());
        // Bounded: the oldest episodes go, the totals keep counting.
        for i in 0..(RING_LEN as u64 + 5) {
            let at = ms(10_000 + 1_000 * i);
            ring.observe(at, 90_000, split, at + Duration::from_millis(90), &tl);
        }
        assert_eq!(ring.events().len(), RING_LEN);
        assert_eq!(ring.totals().0, 2 + RING_LEN as u64 + 5);
    }
}
