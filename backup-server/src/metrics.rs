//! Prometheus metrics (text exposition format 0.0.4) over a tiny HTTP handler.
//!
//! `GET /metrics` on the configured address. Server-wide counters:
//! `pipecloud_backup_writes_total`, `_write_bytes_total`, `_duplicate_writes_total`,
//! `_acks_total`, `_fsyncs_total`, `_batches_total`, `_rejections_total`,
//! `_connections_total`, `_stalled_writes_total` (backpressure at the journal
//! bound), and the histogram `_ack_latency_seconds` (frame received -> ack queued).
//! Per group (label `group`): `_journal_bytes`, `_connected_agents`, `_fenced`,
//! and per writer (labels `group`, `writer`) `_committed_seq`, `_applied_seq`.

use crate::store::{lock, Store};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

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
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

impl Metrics {
    /// Renders every metric.
    pub fn render(&self, store: &Store) -> String {
        let mut o = String::new();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut o,
            "pipecloud_backup_writes_total",
            "Writes journaled.",
            c(&self.writes),
        );
        counter(
            &mut o,
            "pipecloud_backup_write_bytes_total",
            "Payload bytes journaled.",
            c(&self.write_bytes),
        );
        counter(
            &mut o,
            "pipecloud_backup_duplicate_writes_total",
            "Resent writes that were already journaled.",
            c(&self.duplicates),
        );
        counter(
            &mut o,
            "pipecloud_backup_acks_total",
            "Writes acknowledged.",
            c(&self.acks),
        );
        counter(
            &mut o,
            "pipecloud_backup_fsyncs_total",
            "fdatasync calls of the journal.",
            c(&self.fsyncs),
        );
        counter(
            &mut o,
            "pipecloud_backup_batches_total",
            "Group-commit batches.",
            c(&self.batches),
        );
        counter(
            &mut o,
            "pipecloud_backup_rejections_total",
            "Rejected connections and frames.",
            c(&self.rejections),
        );
        counter(
            &mut o,
            "pipecloud_backup_connections_total",
            "Agent connections accepted.",
            c(&self.connections),
        );
        counter(
            &mut o,
            "pipecloud_backup_stalled_writes_total",
            "Writes held back because a journal was at its bound.",
            c(&self.stalled),
        );
        let h = &self.ack_latency;
        let name = "pipecloud_backup_ack_latency_seconds";
        let _ = writeln!(o, "# HELP {name} Time from receiving a write to queueing its ack.\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cum += c(&h.counts[i]);
            let _ = writeln!(o, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1e6);
        }
        cum += c(&h.counts[BUCKETS_US.len()]);
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(o, "{name}_sum {}", c(&h.sum_us) as f64 / 1e6);
        let _ = writeln!(o, "{name}_count {cum}");
        let _ = writeln!(o, "# TYPE pipecloud_backup_journal_bytes gauge");
        let _ = writeln!(o, "# TYPE pipecloud_backup_connected_agents gauge");
        let _ = writeln!(o, "# TYPE pipecloud_backup_fenced gauge");
        let _ = writeln!(o, "# TYPE pipecloud_backup_committed_seq gauge");
        let _ = writeln!(o, "# TYPE pipecloud_backup_applied_seq gauge");
        for g in store.groups() {
            let st = lock(&g.state);
            let n = &g.name;
            let _ = writeln!(
                o,
                "pipecloud_backup_journal_bytes{{group=\"{n}\"}} {}",
                g.journal_bytes.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                o,
                "pipecloud_backup_connected_agents{{group=\"{n}\"}} {}",
                st.agents.len()
            );
            let _ = writeln!(
                o,
                "pipecloud_backup_fenced{{group=\"{n}\"}} {}",
                u8::from(st.meta.fenced)
            );
            for (w, ix) in &st.writers {
                let _ = writeln!(
                    o,
                    "pipecloud_backup_committed_seq{{group=\"{n}\",writer=\"{}\"}} {}",
                    w.0,
                    ix.durable()
                );
                let _ = writeln!(
                    o,
                    "pipecloud_backup_applied_seq{{group=\"{n}\",writer=\"{}\"}} {}",
                    w.0,
                    ix.base()
                );
            }
        }
        o
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, store: Arc<Store>) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    let k = sock.read(&mut buf[n..]).await?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                warn!(%peer, "metrics request timed out or failed");
                return;
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let resp = if req.starts_with("GET /metrics ") || req.starts_with("GET / ") {
                let body = metrics.render(&store);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
