//! CompDB: the paper's multi-tier test application (SoCC'11 §6), one small HTTP
//! service per tier. A request `GET /req/<id>` makes the tier
//! 1. compute for `compute_ms` (busy loop: real CPU work, not a sleep),
//! 2. insert `(id, tier)` into its own tier's PostgreSQL (if it has one; autocommit,
//!    so the reply depends on a durable write),
//! 3. call the next tier with the same id (if any) and wait for its reply,
//! 4. answer `200 ok <id>`.
//!
//! Writes of different tiers are therefore causally linked: tier k's insert happens
//! after tier k-1's insert was acknowledged by its database.
//!
//! The HTTP code is deliberately minimal (HTTP/1.1, keep-alive, GET only): the
//! service runs inside a machine's namespace and is driven by [`crate::client`].

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Configuration of one tier.
#[derive(Clone, Debug)]
pub struct TierConfig {
    pub tier: String,
    pub listen: SocketAddr,
    /// libpq-style connection string of this tier's database, if it has one.
    pub db: Option<String>,
    /// `host:port` of the next tier, if any.
    pub next: Option<SocketAddr>,
    pub compute_ms: u64,
    /// Computation after the next tier replied (overlaps with replication under
    /// pipelined synchrony: figure (b)).
    pub post_compute_ms: u64,
}

/// Busy-computes for `ms` milliseconds.
pub fn compute(ms: u64) {
    if ms == 0 {
        return;
    }
    let t0 = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while t0.elapsed() < Duration::from_millis(ms) {
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    std::hint::black_box(x);
}

/// Creates the table a tier inserts into.
pub fn prepare_db(conninfo: &str) -> Result<()> {
    let mut c = postgres::Client::connect(conninfo, postgres::NoTls)
        .with_context(|| format!("connecting to {conninfo}"))?;
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS req (id bigint NOT NULL, tier text NOT NULL, at timestamptz DEFAULT now())",
    )?;
    Ok(())
}

/// Serves forever (one thread per connection).
pub fn serve(cfg: TierConfig) -> Result<()> {
    let listener =
        TcpListener::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    eprintln!("compdb tier {} listening on {}", cfg.tier, cfg.listen);
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(conn, &cfg) {
                eprintln!("tier {}: connection ended: {e:#}", cfg.tier);
            }
        });
    }
    Ok(())
}

fn handle(conn: TcpStream, cfg: &TierConfig) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut db = match &cfg.db {
        Some(ci) => Some(postgres::Client::connect(ci, postgres::NoTls).context("db connect")?),
        None => None,
    };
    let mut next: Option<HttpClient> = None;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    loop {
        let Some(path) = read_request(&mut reader)? else {
            return Ok(());
        };
        let id: i64 = path
            .strip_prefix("/req/")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad path {path:?}"))?;
        compute(cfg.compute_ms);
        if let Some(db) = db.as_mut() {
            db.execute(
                "INSERT INTO req (id, tier) VALUES ($1, $2)",
                &[&id, &cfg.tier],
            )
            .context("insert")?;
        }
        if let Some(addr) = cfg.next {
            if next.is_none() {
                next = Some(HttpClient::connect(addr)?);
            }
            let c = next.as_mut().ok_or_else(|| anyhow!("no next client"))?;
            c.get(&format!("/req/{id}"))?;
        }
        compute(cfg.post_compute_ms);
        let body = format!("ok {id}\n");
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            body
        )?;
        writer.flush()?;
    }
}

/// Reads one request head; returns its path, or None on a clean EOF.
fn read_request(r: &mut impl BufRead) -> Result<Option<String>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        bail!("bad request line {line:?}");
    };
    if method != "GET" {
        bail!("unsupported method {method}");
    }
    let path = path.to_string();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if h.len() > 8192 {
            bail!("header too long");
        }
    }
    Ok(Some(path))
}

/// A keep-alive HTTP/1.1 client for `GET`.
pub struct HttpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HttpClient {
    /// Connects (10 s timeout).
    pub fn connect(addr: SocketAddr) -> Result<HttpClient> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(HttpClient {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sets a read timeout for replies.
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<()> {
        self.writer.set_read_timeout(t)?;
        Ok(())
    }

    /// Sends `GET path` and returns the body of a 200 reply.
    pub fn get(&mut self, path: &str) -> Result<String> {
        write!(self.writer, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
        self.writer.flush()?;
        let mut status = String::new();
        if self.reader.read_line(&mut status)? == 0 {
            bail!("connection closed");
        }
        if !status.starts_with("HTTP/1.1 200") {
            bail!("bad status {status:?}");
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if self.reader.read_line(&mut h)? == 0 {
                bail!("eof in headers");
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().context("content-length")?;
            }
        }
        if len > 1 << 20 {
            bail!("reply too large");
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}
