//! The `/metrics` endpoint of both daemons (`pipecloud agent` and `backup-server
//! serve`): a minimal HTTP/1.1 responder on tokio in front of a
//! [`prometheus_client`] registry.
//!
//! Each daemon registers a [`Collector`](prometheus_client::collector::Collector)
//! that reads its state snapshots at scrape time (no second bookkeeping), and the
//! crate's encoder writes the Prometheus text exposition format 0.0.4
//! ([`CONTENT_TYPE`]). Only `GET /metrics` is answered (`200`); any other path is
//! `404`, any other method `405`, and the connection is closed after each answer.
//! [`gauges`], [`counters`] and [`counter`] encode families for such collectors.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] scrapes are served at once (more are
//! answered `503` without reading their request), a request head is at most
//! [`MAX_REQUEST_BYTES`] (longer: `431`) and must arrive within
//! [`REQUEST_TIMEOUT`] (else the connection is dropped).

use std::sync::Arc;
use std::time::Duration;

use std::fmt;

use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Content type of the answers (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;
/// Scrapes served concurrently; more are answered `503`.
pub const MAX_CONNECTIONS: usize = 8;
/// Longest request head (request line and headers) read, in bytes.
pub const MAX_REQUEST_BYTES: usize = 8192;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The registry's metrics in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; a collector that fails is logged and its
    // partial output served (a scrape with what could be gathered).
    if let Err(e) = prometheus_text::encode(&mut out, registry) {
        tracing::warn!("encoding metrics: {e}");
    }
    out
}

/// A set of labels, e.g. `vec![("group", name.clone()), ("writer", w.to_string())]`.
pub type Labels = Vec<(&'static str, String)>;

/// Encodes the gauge family `name` with one sample per `(labels, value)`
/// (nothing at all when there is no sample).
pub fn gauges<V: EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> fmt::Result {
    family(enc, name, help, samples, ConstGauge::new)
}

/// Encodes the counter family `name` (the encoder appends `_total`) with one
/// sample per `(labels, value)` (nothing at all when there is no sample).
pub fn counters<V: EncodeCounterValue + Copy>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> fmt::Result {
    family(enc, name, help, samples, ConstCounter::new)
}

fn family<V: Copy, M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
    metric: impl Fn(V) -> M,
) -> fmt::Result {
    let Some((_, first)) = samples.first() else {
        return Ok(());
    };
    let kind = metric(*first).metric_type();
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        metric(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Encodes the unlabelled counter `name` (the encoder appends `_total`).
pub fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

/// Seconds of `d` as a gauge value.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
}

fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut words = line.split(|b| *b == b' ').filter(|w| !w.is_empty());
    match (words.next(), words.next()) {
        (Some(b"GET"), Some(path)) => {
            // The query string (if any) is ignored.
            let path = path.split(|b| *b == b'?').next().unwrap_or_default();
            if path == b"/metrics" {
                Route::Metrics
            } else {
                Route::NotFound
            }
        }
        _ => Route::BadMethod,
    }
}

fn answer(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads a request head (up to the blank line), bounded by [`MAX_REQUEST_BYTES`].
/// `None`: the head is too long.
async fn read_head(sock: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut n = 0;
    loop {
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].ends_with(b"\n\n") {
            buf.truncate(n);
            return Ok(Some(buf));
        }
        if n == buf.len() {
            return Ok(None);
        }
        let k = sock.read(&mut buf[n..]).await?;
        if k == 0 {
            buf.truncate(n);
            return Ok(Some(buf));
        }
        n += k;
    }
}

async fn serve_one(mut sock: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut sock)).await {
        Err(_) => return Ok(()),
        Ok(r) => r?,
    };
    let resp = match head.as_deref().map(route) {
        None => answer(
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too long\n",
        ),
        Some(Route::Metrics) => answer("200 OK", CONTENT_TYPE, &encode(registry)),
        Some(Route::NotFound) => answer("404 Not Found", "text/plain", "try /metrics\n"),
        Some(Route::BadMethod) => answer(
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n",
        ),
    };
    sock.write_all(&resp).await?;
    sock.shutdown().await
}

/// Serves `GET /metrics` from `registry` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "metrics endpoint listening on http://{a}/metrics");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // E.g. out of file descriptors: wait a little instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                let registry = Arc::clone(&registry);
                tokio::spawn(async move {
                    if let Err(e) = serve_one(sock, &registry).await {
                        tracing::debug!(%peer, "metrics request failed: {e}");
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let _ = sock
                        .write_all(&answer("503 Service Unavailable", "text/plain", "busy\n"))
                        .await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b""), Route::BadMethod);
    }

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn answers_scrapes_in_the_crates_text_format() {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        registry.register("pipecloud_test_events", "Events", c.clone());
        c.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(serve(listener, Arc::new(registry)));
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{ok}"
        );
        assert!(
            ok.ends_with(
                "\r\n\r\n# HELP pipecloud_test_events_total Events.\n\
                 # TYPE pipecloud_test_events_total counter\n\
                 pipecloud_test_events_total 3\n"
            ),
            "{ok}"
        );
        assert!(get(addr, b"GET /other HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        // Exactly the bound without the blank line (all of it read: a clean close).
        let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_REQUEST_BYTES, b'a');
        assert!(get(addr, &long).await.starts_with("HTTP/1.1 431"));
        task.abort();
    }
}
