//! The agent's Prometheus metrics: `GET /metrics` on `[[host]] metrics_listen`.
//!
//! Nothing is counted twice: at each scrape the collector reads the same
//! snapshots as `pipecloud ctl status` ([`Control`]: the replication client's
//! status, the group's mode switch, the network path's counters) and encodes
//! them with `prometheus-client` (through [`pipecloud_metrics_http`]).
//!
//! Per disk (labels `group`, `disk`, `writer`; a disk's figures are those of its
//! writer, whose writes are committed in order, except the in-flight ones):
//! `pipecloud_disk_written_seq`, `pipecloud_disk_acked_seq`,
//! `pipecloud_disk_lag_writes` (written - acked), `pipecloud_disk_lag_bytes` and
//! `pipecloud_disk_inflight_writes` (the disk's writes not yet acked),
//! `pipecloud_disk_oldest_unacked_age_seconds` (0 when nothing is unacked),
//! `pipecloud_disk_peak_lag_writes`, `pipecloud_disk_peak_commit_latency_seconds`
//! (worst since the start or `ctl status --reset-peaks`).
//!
//! Per connection to the backup (label `group`): `pipecloud_replication_connected`
//! (1 while a session stands), `pipecloud_replication_late` (1 when a session's
//! backup has been silent for more than two heartbeat intervals),
//! `pipecloud_replication_last_heard_seconds` (since the backup last sent any
//! frame; since the agent started if it never did),
//! `pipecloud_replication_heartbeat_rtt_seconds` (absent until measured),
//! `pipecloud_replication_sessions_total`, `pipecloud_replication_inflight_bytes`.
//!
//! Per group (label `group`): `pipecloud_group_mode` (label `mode`: 1 for the
//! current mode, 0 for the others), `pipecloud_group_degraded`, `pipecloud_group_detached`,
//! `pipecloud_group_degrade_events_total`; where the agent runs the group's
//! network path: `pipecloud_group_held_packets`, `pipecloud_group_held_bytes`,
//! `pipecloud_group_oldest_held_age_seconds` (0 when nothing is held),
//! `pipecloud_group_released_packets_total` (label `when`: `after_hold` or
//! `at_once`), `pipecloud_group_dropped_packets_total` (label `reason`: `full`,
//! `unknown_sender`, `tag_failed`, `kernel_queue`, `kernel_user`,
//! `socket_overrun`), and the hold breakdown (issue 20,
//! `crate::netpath::HoldBreakdown`): the histogram
//! `pipecloud_group_hold_seconds` (label `part`: `hold` for the whole hold of
//! every released packet, `dep_send`, `round`, `release` for its parts,
//! `dep_age` for the age of its newest dependency on arrival) and the histogram
//! `pipecloud_group_hold_waits_for_writes`.
//!
//! With `[quorum]` (docs/design.md §7), per group: `pipecloud_lease_role` (label
//! `role`: 1 for `standby`, `active` or `fenced`, 0 for the others),
//! `pipecloud_lease_generation` (held or last held), `pipecloud_lease_time_left_seconds`
//! (0: the gate is closed).
//!
//! For a group this agent can checkpoint (docs/design.md §9, §13), per group:
//! `pipecloud_checkpoint_phase` (label `phase`: `off`, `seeding`, `on`,
//! `leaving`), `pipecloud_checkpoint_acked_epoch`, `pipecloud_checkpoint_epoch_lag`,
//! `pipecloud_checkpoint_pauses_total`, `pipecloud_checkpoint_stalled_pauses_total`,
//! `pipecloud_checkpoint_seed_round`, `pipecloud_checkpoint_seed_pages`,
//! `pipecloud_checkpoint_alarm`; `pipecloud_group_mode` includes `checkpoint`.

use std::sync::Arc;

use pipecloud_metrics_http::{counters, gauges, seconds, Labels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::ctl::Control;
use crate::replication::{LinkState, Mode};

/// The scrape-time collector over the agent's groups.
struct AgentCollector {
    control: Arc<Control>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

/// Samples of one scrape, family by family (each family is encoded once).
#[derive(Default)]
struct Samples {
    written: Vec<(Labels, u64)>,
    acked: Vec<(Labels, u64)>,
    lag_writes: Vec<(Labels, u64)>,
    lag_bytes: Vec<(Labels, u64)>,
    inflight_writes: Vec<(Labels, u64)>,
    oldest_unacked: Vec<(Labels, f64)>,
    peak_lag: Vec<(Labels, u64)>,
    peak_latency: Vec<(Labels, f64)>,
    connected: Vec<(Labels, u64)>,
    late: Vec<(Labels, u64)>,
    last_heard: Vec<(Labels, f64)>,
    rtt: Vec<(Labels, f64)>,
    sessions: Vec<(Labels, u64)>,
    inflight_bytes: Vec<(Labels, u64)>,
    mode: Vec<(Labels, u64)>,
    degraded: Vec<(Labels, u64)>,
    detached: Vec<(Labels, u64)>,
    degrade_events: Vec<(Labels, u64)>,
    held_packets: Vec<(Labels, u64)>,
    held_bytes: Vec<(Labels, u64)>,
    oldest_held: Vec<(Labels, f64)>,
    released: Vec<(Labels, u64)>,
    dropped: Vec<(Labels, u64)>,
    hold_parts: Vec<(Labels, crate::netpath::HistSnapshot)>,
    hold_waits: Vec<(Labels, crate::netpath::HistSnapshot)>,
    lease_role: Vec<(Labels, u64)>,
    lease_generation: Vec<(Labels, u64)>,
    lease_time_left: Vec<(Labels, f64)>,
    ckpt_phase: Vec<(Labels, u64)>,
    ckpt_acked: Vec<(Labels, u64)>,
    ckpt_lag: Vec<(Labels, u64)>,
    ckpt_pauses: Vec<(Labels, u64)>,
    ckpt_stalls: Vec<(Labels, u64)>,
    ckpt_seed_round: Vec<(Labels, u64)>,
    ckpt_seed_pages: Vec<(Labels, u64)>,
    ckpt_alarm: Vec<(Labels, u64)>,
}

/// Bucket bounds of the hold histograms, µs.
const HOLD_BOUNDS_US: [u64; 18] = [
    100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 55_000, 60_000, 75_000, 100_000,
    150_000, 200_000, 500_000, 1_000_000, 5_000_000,
];
/// Bucket bounds of the waits-for histogram, writes.
const WAITS_BOUNDS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024];

/// Encodes the histogram family `name`, one sample per `(labels, snapshot)`,
/// the snapshot's values scaled by `scale` (µs -> s: 1e-6).
fn histograms(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Labels, crate::netpath::HistSnapshot)],
    bounds: &[u64],
    scale: f64,
) -> std::fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        // Per-bucket counts: the encoder accumulates them.
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = h
            .cumulative(bounds)
            .into_iter()
            .map(|(le, c)| {
                let n = c - below;
                below = c;
                (le as f64 * scale, n)
            })
            .collect();
        buckets.push((f64::INFINITY, h.count() - below));
        m.encode_family(labels)?.encode_histogram::<NoLabelSet>(
            h.sum() as f64 * scale,
            h.count(),
            &buckets,
            None,
        )?;
    }
    Ok(())
}

impl AgentCollector {
    fn gather(&self) -> Samples {
        let mut x = Samples::default();
        for g in self.control.groups() {
            let s = g.client.status();
            let group = || -> Labels { vec![("group", s.group.clone())] };
            for d in &s.disks {
                let labels: Labels = vec![
                    ("group", s.group.clone()),
                    ("disk", d.name.clone()),
                    ("writer", d.writer.0.to_string()),
                ];
                if let Some(w) = s.writers.iter().find(|w| w.writer == d.writer) {
                    x.written.push((labels.clone(), w.written));
                    x.acked.push((labels.clone(), w.acked));
                    x.lag_writes.push((labels.clone(), w.lag()));
                    x.oldest_unacked
                        .push((labels.clone(), w.oldest_unacked_age.map_or(0.0, seconds)));
                    x.peak_lag.push((labels.clone(), w.peaks.lag));
                    x.peak_latency
                        .push((labels.clone(), seconds(w.peaks.commit_latency)));
                }
                x.lag_bytes.push((labels.clone(), d.inflight_bytes));
                x.inflight_writes.push((labels, d.inflight_writes as u64));
            }
            let link = s.link();
            x.connected
                .push((group(), u64::from(link != LinkState::Down)));
            x.late.push((group(), u64::from(link == LinkState::Late)));
            x.last_heard.push((group(), seconds(s.silent_for)));
            if let Some(rtt) = s.last_rtt {
                x.rtt.push((group(), seconds(rtt)));
            }
            x.sessions.push((group(), s.sessions));
            x.inflight_bytes.push((group(), s.inflight_bytes));
            let current = g.mode.get();
            for m in [Mode::Async, Mode::Sync, Mode::Pipelined, Mode::Checkpoint] {
                let mut labels = group();
                labels.push(("mode", m.as_str().to_owned()));
                x.mode.push((labels, u64::from(m == current)));
            }
            x.degraded.push((group(), u64::from(s.degraded)));
            x.detached.push((group(), u64::from(s.detached)));
            x.degrade_events.push((group(), s.degrade_events));
            if let Some(net) = &g.net {
                let n = net.snapshot();
                x.held_packets.push((group(), n.held_packets));
                x.held_bytes.push((group(), n.held_bytes));
                x.oldest_held
                    .push((group(), n.oldest_held_age.map_or(0.0, seconds)));
                for (when, v) in [
                    ("after_hold", n.released),
                    ("at_once", n.released_immediately),
                ] {
                    let mut labels = group();
                    labels.push(("when", when.to_owned()));
                    x.released.push((labels, v));
                }
                for (reason, v) in [
                    ("full", n.hold_full_drops),
                    ("unknown_sender", n.hold_unknown_drops),
                    ("tag_failed", n.tag_failures),
                    ("kernel_queue", n.nfq_queue_dropped),
                    ("kernel_user", n.nfq_user_dropped),
                    ("socket_overrun", n.socket_overruns),
                ] {
                    let mut labels = group();
                    labels.push(("reason", reason.to_owned()));
                    x.dropped.push((labels, v));
                }
                let h = net.hold.snapshot();
                for (part, hist) in [
                    ("hold", &h.hold_us),
                    ("dep_send", &h.dep_send_us),
                    ("round", &h.round_us),
                    ("release", &h.release_us),
                    ("dep_age", &h.dep_age_us),
                ] {
                    let mut labels = group();
                    labels.push(("part", part.to_owned()));
                    x.hold_parts.push((labels, hist.clone()));
                }
                x.hold_waits.push((group(), h.waits_for.clone()));
            }
        }
        for (group, d) in self.control.epochs() {
            use pipecloud_core::epoch::Phase;
            let labels = || -> Labels { vec![("group", group.clone())] };
            let now = match d.phase {
                Some(Phase::Off) | None => "off",
                Some(Phase::Seeding { .. }) => "seeding",
                Some(Phase::On) => "on",
                Some(Phase::Leaving { .. }) => "leaving",
            };
            for phase in ["off", "seeding", "on", "leaving"] {
                let mut l = labels();
                l.push(("phase", phase.to_owned()));
                x.ckpt_phase.push((l, u64::from(phase == now)));
            }
            x.ckpt_acked.push((labels(), d.acked));
            let lag = match d.phase {
                Some(Phase::On | Phase::Leaving { .. }) => d.open.saturating_sub(d.acked + 1),
                _ => 0,
            };
            x.ckpt_lag.push((labels(), lag));
            x.ckpt_pauses.push((labels(), d.pauses));
            x.ckpt_stalls.push((labels(), d.stalls));
            x.ckpt_seed_round.push((labels(), u64::from(d.seed_round)));
            x.ckpt_seed_pages.push((labels(), d.seed_pages));
            x.ckpt_alarm.push((labels(), u64::from(d.alarm.is_some())));
        }
        if let Some((group, l)) = self.control.lease() {
            let labels = || -> Labels { vec![("group", group.to_owned())] };
            for role in ["standby", "active", "fenced"] {
                let mut with_role = labels();
                with_role.push(("role", role.to_owned()));
                x.lease_role.push((with_role, u64::from(l.role == role)));
            }
            x.lease_generation.push((labels(), l.generation));
            x.lease_time_left
                .push((labels(), l.time_left_ms as f64 / 1e3));
        }
        x
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let x = self.gather();
        let e = &mut enc;
        gauges(
            e,
            "pipecloud_disk_written_seq",
            "Highest seq issued by the disk's writer",
            &x.written,
        )?;
        gauges(
            e,
            "pipecloud_disk_acked_seq",
            "Committed seq of the disk's writer: every write up to it is durable at the backup",
            &x.acked,
        )?;
        gauges(
            e,
            "pipecloud_disk_lag_writes",
            "Writes of the disk's writer issued but not committed at the backup",
            &x.lag_writes,
        )?;
        gauges(e, "pipecloud_disk_lag_bytes", "Bytes of the disk's writes not yet acked by the backup (payload plus per-write overhead)", &x.lag_bytes)?;
        gauges(
            e,
            "pipecloud_disk_inflight_writes",
            "The disk's writes not yet acked by the backup",
            &x.inflight_writes,
        )?;
        gauges(
            e,
            "pipecloud_disk_oldest_unacked_age_seconds",
            "Age of the oldest write of the disk's writer not yet acked (0: none)",
            &x.oldest_unacked,
        )?;
        gauges(e, "pipecloud_disk_peak_lag_writes", "Most writes of the disk's writer unacked at once since the start or the last peak reset", &x.peak_lag)?;
        gauges(e, "pipecloud_disk_peak_commit_latency_seconds", "Longest wait of a write of the disk's writer for its ack since the start or the last peak reset", &x.peak_latency)?;
        gauges(
            e,
            "pipecloud_replication_connected",
            "1 while a session with the backup stands",
            &x.connected,
        )?;
        gauges(
            e,
            "pipecloud_replication_late",
            "1 while a session's backup has been silent for more than two heartbeat intervals",
            &x.late,
        )?;
        gauges(
            e,
            "pipecloud_replication_last_heard_seconds",
            "Time since the backup last sent any frame (since the agent started if it never did)",
            &x.last_heard,
        )?;
        gauges(
            e,
            "pipecloud_replication_heartbeat_rtt_seconds",
            "Round-trip time of the latest answered heartbeat",
            &x.rtt,
        )?;
        counters(
            e,
            "pipecloud_replication_sessions",
            "Sessions established with the backup",
            &x.sessions,
        )?;
        gauges(
            e,
            "pipecloud_replication_inflight_bytes",
            "Bytes of unacked writes buffered for the backup (bounded by max_inflight_bytes)",
            &x.inflight_bytes,
        )?;
        gauges(
            e,
            "pipecloud_group_mode",
            "1 for the group's current replication mode",
            &x.mode,
        )?;
        gauges(e, "pipecloud_group_degraded", "1 while the group is degraded to async (backup lost, replies released without durable writes)", &x.degraded)?;
        gauges(e, "pipecloud_group_detached", "1 while the agent serves detached (started without its backup, nothing replicated until `ctl attach`)", &x.detached)?;
        counters(
            e,
            "pipecloud_group_degrade_events",
            "Times the group degraded to async",
            &x.degrade_events,
        )?;
        gauges(
            e,
            "pipecloud_group_held_packets",
            "Client-bound packets held until their writes are committed",
            &x.held_packets,
        )?;
        gauges(
            e,
            "pipecloud_group_held_bytes",
            "Bytes of held client-bound packets",
            &x.held_bytes,
        )?;
        gauges(
            e,
            "pipecloud_group_oldest_held_age_seconds",
            "Age of the oldest held client-bound packet (0: none)",
            &x.oldest_held,
        )?;
        counters(
            e,
            "pipecloud_group_released_packets",
            "Client-bound packets released, after a hold or at once",
            &x.released,
        )?;
        counters(
            e,
            "pipecloud_group_dropped_packets",
            "Packets dropped by the network path, by reason",
            &x.dropped,
        )?;
        histograms(
            e,
            "pipecloud_group_hold_seconds",
            "Hold of released client-bound packets and its parts (issue 20 breakdown)",
            &x.hold_parts,
            &HOLD_BOUNDS_US,
            1e-6,
        )?;
        histograms(
            e,
            "pipecloud_group_hold_waits_for_writes",
            "Writes beyond the committed vector a held packet's tag needed on arrival",
            &x.hold_waits,
            &WAITS_BOUNDS,
            1.0,
        )?;
        gauges(
            e,
            "pipecloud_lease_role",
            "1 for this site's role for the group's lease (standby, active, fenced)",
            &x.lease_role,
        )?;
        gauges(
            e,
            "pipecloud_lease_generation",
            "The generation (fencing token) this site holds or last held",
            &x.lease_generation,
        )?;
        gauges(
            e,
            "pipecloud_lease_time_left_seconds",
            "How long this site may still release output without a renewal (0: gate closed)",
            &x.lease_time_left,
        )?;
        gauges(e, "pipecloud_checkpoint_phase", "1 for the group's checkpointing phase (off: disk-only; seeding: switching in; on; leaving: switching out)", &x.ckpt_phase)?;
        gauges(
            e,
            "pipecloud_checkpoint_acked_epoch",
            "Last checkpoint epoch the backup acknowledged (this run)",
            &x.ckpt_acked,
        )?;
        gauges(
            e,
            "pipecloud_checkpoint_epoch_lag",
            "Epochs captured or open but not yet acknowledged by the backup",
            &x.ckpt_lag,
        )?;
        counters(
            e,
            "pipecloud_checkpoint_pauses",
            "Checkpoint pauses of the group's guests",
            &x.ckpt_pauses,
        )?;
        counters(
            e,
            "pipecloud_checkpoint_stalled_pauses",
            "Pauses skipped because shipping or acks were behind",
            &x.ckpt_stalls,
        )?;
        gauges(
            e,
            "pipecloud_checkpoint_seed_round",
            "Pre-copy round of the last or current switch to checkpoint",
            &x.ckpt_seed_round,
        )?;
        gauges(
            e,
            "pipecloud_checkpoint_seed_pages",
            "Pages pre-copied by the last or current switch to checkpoint",
            &x.ckpt_seed_pages,
        )?;
        gauges(
            e,
            "pipecloud_checkpoint_alarm",
            "1 once the group's checkpoint epochs failed (output held)",
            &x.ckpt_alarm,
        )
    }
}

/// The registry behind the agent's endpoint.
pub fn registry(control: Arc<Control>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector { control }));
    registry
}

/// The agent's metrics now (Prometheus text format 0.0.4).
pub fn render(control: Arc<Control>) -> String {
    pipecloud_metrics_http::encode(&registry(control))
}

/// Serves `GET /metrics` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, control: Arc<Control>) {
    pipecloud_metrics_http::serve(listener, Arc::new(registry(control))).await
}
