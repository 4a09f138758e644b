//! `backup-server bench-checkpoint`: how fast the backup makes checkpoint epochs
//! durable and acknowledges them. A real server (TLS on loopback, data in the
//! bench directory) gets from one agent: a full first epoch of a `--ram-mib` guest,
//! then `--epochs` delta epochs of `--dirty-pages` random pages and ~4 KB of device
//! state, each with one 4 KiB disk write inside its barrier, one epoch at a time
//! (send, wait for its `Ack`: what bounds an agent's checkpoint rate when shipping
//! is on the critical path).
//!
//! Interleaved with the epochs, in the same run, the baseline: the same bytes
//! written to a file on the same file system and fdatasync'ed once (the least a
//! durable epoch costs). Prints the full epoch's time, per delta epoch the
//! commit-to-ack latency p50/p99 and its ratio to the baseline, epochs/s, bytes per
//! epoch, and the load average.

use crate::bench::{pct, BenchServer};
use anyhow::Context;
use pipecloud_core::wire::{Checkpoint, Frame, PageEncoding, Write, WriteKind, PAGE_SIZE};
use pipecloud_core::{CountVector, WriterId};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Pages per `Pages` frame (1 MiB).
const RUN: u64 = 256;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the benchmark and prints the figures.
pub fn run(ram_mib: u64, dirty: u64, epochs: u64, dir: Option<PathBuf>) -> anyhow::Result<()> {
    crate::bench::in_dir(dir, "backup-bench-ckpt", |d| {
        measure(ram_mib, dirty, epochs, d)
    })
}

fn frames(epoch: u64, ram: u64, pages: &[u64], dev: &[u8], seq: u64) -> Vec<Frame> {
    let mut f = vec![Frame::Checkpoint(Checkpoint::Begin {
        machine: "vm".into(),
        epoch,
        ram_bytes: ram,
    })];
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 && (j - i) < RUN as usize {
            j += 1;
        }
        let n = (j - i) as u64;
        f.push(Frame::Checkpoint(Checkpoint::Pages {
            epoch,
            offset: pages[i] * PAGE_SIZE,
            encoding: PageEncoding::Raw,
            data: vec![(epoch % 251) as u8; (n * PAGE_SIZE) as usize],
        }));
        i = j;
    }
    f.push(Frame::Checkpoint(Checkpoint::Device {
        epoch,
        offset: 0,
        data: dev.to_vec(),
    }));
    f.push(Frame::Checkpoint(Checkpoint::End {
        epoch,
        pages: pages.len() as u64,
        device_bytes: dev.len() as u64,
    }));
    f.push(Frame::Write(Write {
        writer: WriterId(0),
        generation: 1,
        seq,
        disk: 0,
        offset: (seq % 256) * 4096,
        vector: CountVector::from_slice(&[seq]),
        kind: WriteKind::Data(vec![seq as u8; 4096]),
    }));
    f.push(Frame::Checkpoint(Checkpoint::Commit {
        epoch,
        barrier: CountVector::from_slice(&[seq]),
    }));
    f
}

fn baseline(path: &Path, bytes: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut f = std::fs::File::create(path)?;
    f.write_all(&vec![7u8; bytes])?;
    f.sync_data()?;
    Ok(t.elapsed())
}

fn measure(ram_mib: u64, dirty: u64, epochs: u64, dir: &Path) -> anyhow::Result<()> {
    let ram = ram_mib << 20;
    let ram_pages = ram / PAGE_SIZE;
    anyhow::ensure!(
        dirty > 0 && dirty <= ram_pages,
        "--dirty-pages must be 1..={ram_pages}"
    );
    let BenchServer {
        daemon,
        tls,
        hello,
        data,
    } = BenchServer::start(dir, 1 << 20)?;
    let dev: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
    let base_path = dir.join("baseline.bin");
    let addr = daemon.addr;
    let (dev, base_path) = (&dev, &base_path);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (full, lat, base, el, bytes) = rt.block_on(async move {
        let (mut w, mut r, _) = backup_server::client::connect(addr, "localhost", tls, &hello)
            .await
            .context("connect")?;
        let mut wait = async |e: u64| -> anyhow::Result<()> {
            loop {
                match r.recv().await? {
                    Some(Frame::Checkpoint(Checkpoint::Ack { epoch })) if epoch >= e => {
                        return Ok(())
                    }
                    Some(Frame::Reject { reason }) => anyhow::bail!("rejected: {reason}"),
                    Some(_) => {}
                    None => anyhow::bail!("server closed"),
                }
            }
        };
        let all: Vec<u64> = (0..ram_pages).collect();
        let t = Instant::now();
        for chunk in frames(1, ram, &all, dev, 1).chunks(16) {
            w.send(chunk).await?;
        }
        wait(1).await?;
        let full = t.elapsed();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut lat = Vec::new();
        let mut base = Vec::new();
        let mut bytes = 0u64;
        let t0 = Instant::now();
        for e in 2..epochs + 2 {
            let mut pages = std::collections::BTreeSet::new();
            while (pages.len() as u64) < dirty {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                pages.insert(x % ram_pages);
            }
            let pages: Vec<u64> = pages.into_iter().collect();
            bytes += dirty * PAGE_SIZE + dev.len() as u64;
            let f = frames(e, ram, &pages, dev, e);
            let t = Instant::now();
            for chunk in f.chunks(16) {
                w.send(chunk).await?;
            }
            wait(e).await?;
            lat.push(t.elapsed());
            base.push(baseline(
                base_path,
                (dirty * PAGE_SIZE) as usize + dev.len(),
            )?);
        }
        Ok::<_, anyhow::Error>((full, lat, base, t0.elapsed(), bytes))
    })?;
    drop(daemon);
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_file(base_path);
    let (mut lat, mut base) = (lat, base);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (l50, l99, b50, b99) = (
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut base, 0.5),
        pct(&mut base, 0.99),
    );
    println!(
        "backup-server bench-checkpoint ({ram_mib} MiB guest, TLS over loopback, data in {})",
        dir.display()
    );
    println!(
        "full first epoch ({ram_mib} MiB): acked after {:.0} ms",
        ms(full)
    );
    println!(
        "delta epochs: {epochs} x {dirty} dirty pages + {} B device state + one 4 KiB disk write, one at a time",
        dev.len()
    );
    println!(
        "send-to-ack latency: p50 {:.2} ms ({:.2}x baseline), p99 {:.2} ms ({:.2}x baseline)",
        ms(l50),
        ms(l50) / ms(b50).max(1e-9),
        ms(l99),
        ms(l99) / ms(b99).max(1e-9)
    );
    println!(
        "baseline (same bytes written + one fdatasync, interleaved): p50 {:.2} ms, p99 {:.2} ms",
        ms(b50),
        ms(b99)
    );
    let total = el.as_secs_f64();
    let bench = lat.iter().map(|d| d.as_secs_f64()).sum::<f64>();
    println!(
        "{:.0} epochs/s acked back to back (excluding the baseline), {:.1} MB per epoch shipped",
        epochs as f64 / bench.max(1e-9),
        bytes as f64 / epochs as f64 / 1e6
    );
    println!(
        "wall time {total:.1} s; load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
