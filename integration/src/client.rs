//! The recording client: issues numbered requests and records every request
//! whose reply it received (the *client view*, CV), with its latency.
//!
//! Two targets: `Sql` inserts `id` into the database directly (single-tier, like the
//! paper's MySQL insert client), `Http` calls the CompDB front tier.

use crate::app::HttpClient;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the client talks to.
#[derive(Clone, Debug)]
pub enum Target {
    Sql { conninfo: String },
    Http { addr: SocketAddr },
}

/// One acknowledged request.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)] // latency is read by the figures' reports
pub struct Acked {
    pub id: i64,
    pub latency: Duration,
    /// Completion time since the run started.
    pub at: Duration,
}

/// Shared state of a run.
pub struct Recorder {
    next_id: AtomicI64,
    pub stop: AtomicBool,
    pub acked: Mutex<Vec<Acked>>,
    pub errors: AtomicI64,
    started: Instant,
}

impl Recorder {
    pub fn new(first_id: i64) -> Arc<Recorder> {
        Arc::new(Recorder {
            next_id: AtomicI64::new(first_id),
            stop: AtomicBool::new(false),
            acked: Mutex::new(Vec::new()),
            errors: AtomicI64::new(0),
            started: Instant::now(),
        })
    }

    /// Highest id handed out so far (requests issued: first_id..this).
    pub fn issued_upto(&self) -> i64 {
        self.next_id.load(Ordering::SeqCst)
    }

    /// Ids whose reply was received.
    pub fn client_view(&self) -> Vec<i64> {
        let g = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<i64> = g.iter().map(|a| a.id).collect();
        v.sort_unstable();
        v
    }

    /// Latencies of acknowledged requests, sorted.
    #[allow(dead_code)]
    pub fn latencies(&self) -> Vec<Duration> {
        let g = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Duration> = g.iter().map(|a| a.latency).collect();
        v.sort_unstable();
        v
    }
}

/// Starts `workers` client threads against `target`; they run until `rec.stop`.
pub fn start(
    target: Target,
    workers: usize,
    rec: &Arc<Recorder>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..workers)
        .map(|_| {
            let rec = Arc::clone(rec);
            let target = target.clone();
            std::thread::spawn(move || {
                if let Err(e) = worker(&target, &rec) {
                    if !rec.stop.load(Ordering::SeqCst) {
                        eprintln!("client worker ended: {e:#}");
                    }
                    rec.errors.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect()
}

enum Conn {
    Sql(Box<postgres::Client>),
    Http(HttpClient),
}

fn worker(target: &Target, rec: &Recorder) -> Result<()> {
    let mut conn = match target {
        Target::Sql { conninfo } => {
            let mut c = postgres::Client::connect(conninfo, postgres::NoTls)
                .with_context(|| format!("connecting to {conninfo}"))?;
            c.batch_execute("SET statement_timeout = 0")?;
            Conn::Sql(Box::new(c))
        }
        Target::Http { addr } => Conn::Http(HttpClient::connect(*addr)?),
    };
    while !rec.stop.load(Ordering::SeqCst) {
        let id = rec.next_id.fetch_add(1, Ordering::SeqCst);
        let t0 = Instant::now();
        match &mut conn {
            Conn::Sql(c) => {
                c.execute("INSERT INTO req (id, tier) VALUES ($1, 'db')", &[&id])?;
            }
            Conn::Http(c) => {
                c.get(&format!("/req/{id}"))?;
            }
        }
        let latency = t0.elapsed();
        let mut g = rec.acked.lock().unwrap_or_else(|e| e.into_inner());
        g.push(Acked {
            id,
            latency,
            at: rec.started.elapsed(),
        });
    }
    Ok(())
}

/// Percentile of a sorted slice (0.0..=1.0).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Mean of durations.
pub fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}
