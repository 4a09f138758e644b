//! `backup-server bench`: ingest throughput and ack latency of a real server (TLS on
//! loopback, journal in the bench directory), against a raw `pwrite + fdatasync`
//! baseline of 4 KiB writes on the same file system, measured in the same run.
//!
//! Prints:
//! - baseline: raw 4 KiB write + fdatasync, one at a time: writes/s, p50, p99;
//! - ack latency at queue depth 1 (send one write, wait for its ack): p50, p99 and
//!   their ratios to the baseline;
//! - throughput with 256 writes in flight: MB/s, writes/s (ratio to the baseline's
//!   writes/s, i.e. what group commit buys), ack latency p50/p99, writes per fdatasync.

use anyhow::Context;
use backup_server::config::{Config, Limits, TlsConfig};
use backup_server::daemon::Daemon;
use pipecloud_core::wire::{DiskHello, Frame, Hello, Write, WriteKind, PROTOCOL_VERSION};
use pipecloud_core::{CountVector, WriterId};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const BS: usize = 4096;
const WINDOW: u64 = 256;

pub(crate) fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs the benchmark and prints the figures.
pub fn run(writes: u64, dir: Option<PathBuf>) -> anyhow::Result<()> {
    in_dir(dir, "backup-bench", |d| measure(writes, d))
}

/// Runs `f` in `dir`, or in a temporary directory removed afterwards.
pub(crate) fn in_dir(
    dir: Option<PathBuf>,
    tag: &str,
    f: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (dir, temporary) = match dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("{tag}-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir)?;
    let r = f(&dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

/// A benchmark server in `dir` (fresh PKI and data) and what an agent needs to
/// connect: group `bench`, one disk `d` of `disk_size` bytes owned by writer 0.
pub(crate) struct BenchServer {
    pub daemon: Daemon,
    pub tls: std::sync::Arc<rustls::ClientConfig>,
    pub hello: Hello,
    pub data: PathBuf,
}

impl BenchServer {
    pub(crate) fn start(dir: &Path, disk_size: u64) -> anyhow::Result<BenchServer> {
        let pki = dir.join("pki");
        let _ = std::fs::remove_dir_all(&pki);
        backup_server::certs::generate(&pki, "localhost", &["bench".to_string()], "127.0.0.1:0")?;
        let data = dir.join("data");
        let _ = std::fs::remove_dir_all(&data);
        let cfg = Config {
            listen: "127.0.0.1:0".parse()?,
            data_dir: data.clone(),
            metrics: None,
            tls: TlsConfig {
                ca: pki.join("ca.pem"),
                cert: pki.join("server.pem"),
                key: pki.join("server.key"),
            },
            limits: Limits::default(),
        };
        let daemon = Daemon::start(&cfg).map_err(|e| anyhow::anyhow!(e))?;
        let tls = backup_server::tls::client_config(
            &pki.join("ca.pem"),
            &pki.join("bench-agent.pem"),
            &pki.join("bench-agent.key"),
        )?;
        let hello = Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            group: "bench".into(),
            group_id: 1,
            agent: "bench".into(),
            disks: vec![DiskHello {
                name: "d".into(),
                size: disk_size,
                writer: WriterId(0),
                generation: 1,
            }],
        };
        Ok(BenchServer {
            daemon,
            tls,
            hello,
            data,
        })
    }
}

fn measure(writes: u64, dir: &std::path::Path) -> anyhow::Result<()> {
    let qd1 = writes.clamp(100, 5000);

    // Baseline.
    let raw_path = dir.join("raw-baseline.img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw_path)?;
    let block = vec![0xabu8; BS];
    let mut raw = Vec::with_capacity(qd1 as usize);
    let t0 = Instant::now();
    for i in 0..qd1 {
        let t = Instant::now();
        f.write_all_at(&block, (i % 4096) * BS as u64)?;
        f.sync_data()?;
        raw.push(t.elapsed());
    }
    let raw_rate = qd1 as f64 / t0.elapsed().as_secs_f64();
    let (raw50, raw99) = (pct(&mut raw, 0.5), pct(&mut raw, 0.99));
    drop(f);
    let _ = std::fs::remove_file(&raw_path);

    // Server.
    let BenchServer {
        daemon,
        tls,
        hello,
        data,
    } = BenchServer::start(dir, 4096 * BS as u64)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addr = daemon.addr;
    let metrics = daemon.metrics.clone();
    let snap = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64)));
    let snap2 = snap.clone();
    let (lat1, tput) = rt.block_on(async move {
        let (mut w, mut r, _) = backup_server::client::connect(addr, "localhost", tls, &hello)
            .await
            .context("connect")?;
        let mk = |seq: u64| {
            Frame::Write(Write {
                writer: WriterId(0),
                generation: 1,
                seq,
                disk: 0,
                offset: (seq % 4096) * BS as u64,
                vector: CountVector::from_slice(&[seq]),
                kind: WriteKind::Data(vec![(seq % 251) as u8; BS]),
            })
        };
        // QD1.
        let mut lat = Vec::with_capacity(qd1 as usize);
        for seq in 1..=qd1 {
            let t = Instant::now();
            w.send(&[mk(seq)]).await?;
            loop {
                match r.recv().await? {
                    Some(Frame::Ack(a)) if a.last >= seq => break,
                    Some(_) => {}
                    None => anyhow::bail!("server closed"),
                }
            }
            lat.push(t.elapsed());
        }
        // Pipelined.
        if let Ok(mut g) = snap2.lock() {
            *g = (
                metrics.writes.load(Ordering::Relaxed),
                metrics.fsyncs.load(Ordering::Relaxed),
            );
        }
        let first = qd1 + 1;
        let last = qd1 + writes;
        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        let mut lat_p = Vec::with_capacity(writes as usize);
        let mut next = first;
        let mut acked = first - 1;
        let t0 = Instant::now();
        while acked < last {
            let mut batch = Vec::new();
            while next <= last && next - acked <= WINDOW && batch.len() < 32 {
                sent_at.insert(next, Instant::now());
                batch.push(mk(next));
                next += 1;
            }
            if !batch.is_empty() {
                w.send(&batch).await?;
            }
            match r.recv().await? {
                Some(Frame::Ack(a)) => {
                    for s in a.first..=a.last {
                        if let Some(t) = sent_at.remove(&s) {
                            lat_p.push(t.elapsed());
                        }
                    }
                    acked = acked.max(a.last);
                }
                Some(_) => {}
                None => anyhow::bail!("server closed"),
            }
        }
        let el = t0.elapsed();
        Ok::<_, anyhow::Error>((lat, (el, lat_p)))
    })?;
    let mut lat1 = lat1;
    let (el, mut latp) = tput;
    let (a50, a99) = (pct(&mut lat1, 0.5), pct(&mut lat1, 0.99));
    let rate = writes as f64 / el.as_secs_f64();
    let mbs = rate * BS as f64 / 1e6;
    let (w0, f0) = snap.lock().map(|g| *g).unwrap_or((0, 0));
    let fsyncs = (daemon.metrics.fsyncs.load(Ordering::Relaxed) - f0).max(1);
    let total_writes = daemon.metrics.writes.load(Ordering::Relaxed) - w0;
    drop(daemon);
    let _ = std::fs::remove_dir_all(&data);

    println!(
        "backup-server bench (4 KiB writes, TLS over loopback, journal in {})",
        dir.display()
    );
    println!("baseline raw pwrite+fdatasync, QD1, {qd1} writes: {raw_rate:.0} writes/s, p50 {:.0} us, p99 {:.0} us", us(raw50), us(raw99));
    println!(
        "ack latency QD1, {qd1} writes: p50 {:.0} us ({:.2}x raw), p99 {:.0} us ({:.2}x raw)",
        us(a50),
        us(a50) / us(raw50).max(1e-9),
        us(a99),
        us(a99) / us(raw99).max(1e-9)
    );
    println!(
        "ingest, {writes} writes, {WINDOW} in flight: {mbs:.1} MB/s, {rate:.0} writes/s ({:.2}x raw fdatasync writes/s), ack p50 {:.0} us, p99 {:.0} us, {:.1} writes per fdatasync",
        rate / raw_rate,
        us(pct(&mut latp, 0.5)),
        us(pct(&mut latp, 0.99)),
        total_writes as f64 / fsyncs as f64
    );
    Ok(())
}
