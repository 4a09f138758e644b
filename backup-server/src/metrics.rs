//! Prometheus metrics of the backup server: `GET /metrics` on the configured
//! address (`metrics` in the config file or `serve --metrics-listen`), encoded by
//! `prometheus-client` through [`pipecloud_metrics_http`]; the per-group values
//! are read from the store at scrape time.
//!
//! Server-wide counters:
//! `pipecloud_backup_writes_total`, `_write_bytes_total`, `_duplicate_writes_total`,
//! `_acks_total`, `_fsyncs_total`, `_batches_total`, `_rejections_total`,
//! `_connections_total`, `_stalled_writes_total` (backpressure at the journal
//! bound), and the histograms `_ack_latency_seconds` (frame received -> ack queued),
//! `_queue_latency_seconds` (frame received -> its group commit starts: the wait
//! behind the previous batch's fsync) and `_journal_latency_seconds` (per batch:
//! journal append + fdatasync).
//! Per group (label `group`): `_journal_bytes`, `_connected_agents`, `_fenced`,
//! `_resyncing` (a failback's resync is writing the base volumes: the journal waits),
//! and per writer (labels `group`, `writer`) `_committed_seq`, `_applied_seq`.
//! Per checkpoint group (label `group`): `_checkpoint_acked_epoch`,
//! `_checkpoint_acked_epochs` (since start), `_checkpoint_bytes` (pages and device
//! state received since start), `_checkpoint_pending_epochs`, `_checkpoint_phase`
//! (0 disk-only, 1 seeding, 2 active: a failover resumes the acknowledged epoch).

use crate::store::{lock, Store};
use pipecloud_metrics_http::{counter, gauges, Labels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Upper bounds of the latency buckets, microseconds.
const BUCKETS_US: [u64; 14] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000,
];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BUCKETS_US.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub duplicates: AtomicU64,
    pub acks: AtomicU64,
    pub fsyncs: AtomicU64,
    pub batches: AtomicU64,
    pub rejections: AtomicU64,
    pub connections: AtomicU64,
    pub stalled: AtomicU64,
    pub ack_latency: Histogram,
    /// Per write: received -> its batch starts.
    pub queue_latency: Histogram,
    /// Per batch: start -> journal appended and synced.
    pub journal_latency: Histogram,
}

/// What a scrape reads: the counters and the store's groups (read at scrape time).
struct Scrape {
    metrics: Arc<Metrics>,
    store: Arc<Store>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.metrics;
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in [
            ("pipecloud_backup_writes", "Writes journaled", &m.writes),
            (
                "pipecloud_backup_write_bytes",
                "Payload bytes journaled",
                &m.write_bytes,
            ),
            (
                "pipecloud_backup_duplicate_writes",
                "Resent writes that were already journaled",
                &m.duplicates,
            ),
            ("pipecloud_backup_acks", "Writes acknowledged", &m.acks),
            (
                "pipecloud_backup_fsyncs",
                "fdatasync calls of the journal",
                &m.fsyncs,
            ),
            (
                "pipecloud_backup_batches",
                "Group-commit batches",
                &m.batches,
            ),
            (
                "pipecloud_backup_rejections",
                "Rejected connections and frames",
                &m.rejections,
            ),
            (
                "pipecloud_backup_connections",
                "Agent connections accepted",
                &m.connections,
            ),
            (
                "pipecloud_backup_stalled_writes",
                "Writes held back because a journal was at its bound",
                &m.stalled,
            ),
        ] {
            counter(&mut enc, name, help, c(v))?;
        }
        for (h, name, help) in [
            (
                &m.ack_latency,
                "pipecloud_backup_ack_latency_seconds",
                "Time from receiving a write to queueing its ack",
            ),
            (
                &m.queue_latency,
                "pipecloud_backup_queue_latency_seconds",
                "Time from receiving a write to the start of its group commit",
            ),
            (
                &m.journal_latency,
                "pipecloud_backup_journal_latency_seconds",
                "Time a group commit takes to append and fdatasync the journal",
            ),
        ] {
            // Per-bucket counts: the encoder accumulates them.
            let mut buckets: Vec<(f64, u64)> = BUCKETS_US
                .iter()
                .zip(&h.counts)
                .map(|(b, n)| (*b as f64 / 1e6, c(n)))
                .collect();
            buckets.push((f64::INFINITY, c(&h.counts[BUCKETS_US.len()])));
            let total = buckets.iter().map(|(_, n)| n).sum();
            enc.encode_descriptor(name, help, None, MetricType::Histogram)?
                .encode_histogram::<NoLabelSet>(c(&h.sum_us) as f64 / 1e6, total, &buckets, None)?;
        }

        let (mut journal, mut agents, mut fenced) = (Vec::new(), Vec::new(), Vec::new());
        let mut resyncing = Vec::new();
        let (mut committed, mut applied) = (Vec::new(), Vec::new());
        let mut ckpt: [Vec<(Labels, u64)>; 5] = Default::default();
        for g in self.store.groups() {
            if let Some(s) = g.checkpoint.status() {
                let group: Labels = vec![("group", g.name.clone())];
                let total = g.checkpoint.acked_total.load(Ordering::Relaxed);
                let phase = match s.phase.as_str() {
                    "active" => 2,
                    "seeding" => 1,
                    _ => 0,
                };
                for (i, v) in [
                    s.acked_epoch,
                    total,
                    s.bytes,
                    s.pending_epochs as u64,
                    phase,
                ]
                .into_iter()
                .enumerate()
                {
                    ckpt[i].push((group.clone(), v));
                }
            }
            let group: Labels = vec![("group", g.name.clone())];
            resyncing.push((group.clone(), u64::from(g.resyncing())));
            let st = lock(&g.state);
            journal.push((group.clone(), g.journal_bytes.load(Ordering::Relaxed)));
            agents.push((group.clone(), st.agents.len() as u64));
            fenced.push((group, u64::from(st.meta.fenced)));
            for (w, ix) in &st.writers {
                let labels: Labels = vec![("group", g.name.clone()), ("writer", w.0.to_string())];
                committed.push((labels.clone(), ix.durable()));
                applied.push((labels, ix.base()));
            }
        }
        gauges(
            &mut enc,
            "pipecloud_backup_journal_bytes",
            "Bytes in the group's journal (not yet applied to its volumes)",
            &journal,
        )?;
        gauges(
            &mut enc,
            "pipecloud_backup_connected_agents",
            "Agents connected for the group",
            &agents,
        )?;
        gauges(
            &mut enc,
            "pipecloud_backup_fenced",
            "1 when the group is fenced (failed over: ingest refused)",
            &fenced,
        )?;
        gauges(
            &mut enc,
            "pipecloud_backup_resyncing",
            "1 while a failback resync writes the group's base volumes (journal apply and images wait)",
            &resyncing,
        )?;
        gauges(
            &mut enc,
            "pipecloud_backup_committed_seq",
            "Writer's durable prefix: every seq up to it is journaled and fsynced",
            &committed,
        )?;
        gauges(
            &mut enc,
            "pipecloud_backup_applied_seq",
            "Writer's seq up to which writes are applied to the volumes",
            &applied,
        )?;
        for ((name, help), v) in [
            (
                "pipecloud_backup_checkpoint_acked_epoch",
                "Last acknowledged checkpoint epoch of the group",
            ),
            (
                "pipecloud_backup_checkpoint_acked_epochs",
                "Checkpoint epochs acknowledged since the server started",
            ),
            (
                "pipecloud_backup_checkpoint_bytes",
                "Checkpoint page and device-state bytes received since the server started",
            ),
            (
                "pipecloud_backup_checkpoint_pending_epochs",
                "Checkpoint epochs held beyond the acknowledged one",
            ),
            (
                "pipecloud_backup_checkpoint_phase",
                "0 disk-only (failover: causal cut), 1 seeding a full-state period, 2 active (failover resumes the acknowledged epoch)",
            ),
        ]
        .into_iter()
        .zip(&ckpt)
        {
            gauges(&mut enc, name, help, v)?;
        }
        Ok(())
    }
}

/// The registry behind the endpoint: the counters and the store, read at scrape time.
pub fn registry(metrics: Arc<Metrics>, store: Arc<Store>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { metrics, store }));
    registry
}

/// Renders every metric (Prometheus text format 0.0.4).
pub fn render(metrics: Arc<Metrics>, store: Arc<Store>) -> String {
    pipecloud_metrics_http::encode(&registry(metrics, store))
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, store: Arc<Store>) {
    pipecloud_metrics_http::serve(listener, Arc::new(registry(metrics, store))).await
}
