//! One client's request/response time, the measure of figures (b) and (c).
//!
//! A single client sends requests one after the other to the front tier of a
//! site for a fixed time; each request carries a fresh id (so each tier with a
//! database inserts a new row) and its round trip is summarised as [`LatStats`]
//! (mean, median, p99). With one client and no queueing, the response time
//! shows directly what the replication mode adds to each request.

use crate::app::HttpClient;
use crate::client::percentile;
use crate::netns::spawn_in;
use crate::run::ms;
use anyhow::{anyhow, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Latency summary of one-client request/response measurements.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct LatStats {
    pub(super) n: usize,
    pub(super) mean_ms: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
}

impl LatStats {
    /// Summarises raw latencies.
    pub(super) fn of(mut v: Vec<Duration>) -> LatStats {
        v.sort_unstable();
        LatStats {
            n: v.len(),
            mean_ms: ms(crate::client::mean(&v)),
            p50_ms: ms(percentile(&v, 0.5)),
            p99_ms: ms(percentile(&v, 0.99)),
        }
    }
}

static NEXT_ID: AtomicI64 = AtomicI64::new(1_000_000_000);

/// One client's request/response latencies against `addr` for `secs` (after 3
/// warm-up requests that open every tier's connections).
pub(super) fn measure_http(client_ns: &str, addr: SocketAddr, secs: u64) -> Result<LatStats> {
    let dur = Duration::from_secs(secs);
    let v = spawn_in(client_ns, move || {
        let mut c = HttpClient::connect(addr)?;
        c.set_timeout(Some(Duration::from_secs(60)))?;
        for _ in 0..3 {
            c.get(&format!("/req/{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)))?;
        }
        let end = Instant::now() + dur;
        let mut v = Vec::new();
        while Instant::now() < end && v.len() < 1_000_000 {
            let t0 = Instant::now();
            c.get(&format!("/req/{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)))?;
            v.push(t0.elapsed());
        }
        Ok(v)
    })
    .join()
    .map_err(|_| anyhow!("client thread panicked"))??;
    Ok(LatStats::of(v))
}
