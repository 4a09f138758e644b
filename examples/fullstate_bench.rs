//! Figures of the full-state capture (docs/results.md): pause time and checkpoints
//! per second of a TCG guest, light (idle) and heavy (rewriting a 5,000-page
//! tmpfs file with random bytes, sleeping 100 ms between rounds), with shipping included: every epoch is turned into checkpoint
//! frames, encoded with the replication codec (postcard + CRC32C) and written to a
//! loopback TCP connection, in the background while the guest runs. Staging is
//! bounded as in the agent: one buffer in capture, one in shipping; a pause waits
//! for a free buffer.
//!
//! Run (after `cargo build --release -p pipecloud-shim` and scripts/build-guest.sh):
//! `cargo run --release --example fullstate_bench -- [seconds per load] [interval ms] [RAM MiB]`
//! (defaults 10 s, 20 ms, 256 MiB). With `PIPECLOUD_BENCH_BACKUP=1` the agent's own
//! epoch loop ships to a real backup server (`backup-server` binary next to the
//! example or `PIPECLOUD_BACKUP_SERVER_BIN`) and the figure is epochs *acknowledged*
//! per second; each load runs uncompressed (`PIPECLOUD_CKPT_RAW=1`), then compressed.
//! `PIPECLOUD_BENCH_LOADS=light,heavy,byte,record` picks the loads (`byte`/`record`:
//! guest-service's `--dirty-pattern`, docs/design.md §14). The loopback mode also
//! compares page codecs on the same pages (`--features bench-zstd` adds zstd 1 and 3).

#[path = "../tests/support/backup.rs"]
mod backup;
#[path = "../tests/support/qemu_guest.rs"]
#[allow(dead_code)]
mod qemu_guest;

use pipecloud::core::codec::encode_frame;
use pipecloud::core::pagecodec::{Shadow, DEFAULT_SHADOW_BYTES};
use pipecloud::core::wire::{Checkpoint, Frame};
use pipecloud::core::CountVector;
use pipecloud::fullstate::capture::{pause_group, Guest, Staged};
use qemu_guest::{Load, TestGuest};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

struct Run {
    pauses_ms: Vec<f64>,
    waits_ms: Vec<f64>,
    bytes: u64,
    pages: u64,
    epochs: u64,
    elapsed: Duration,
    /// Page bytes captured / shipped after encoding (after the seed).
    raw_shipped: (u64, u64),
    codecs: Codecs,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Page codecs compared on the same dirty pages of every epoch (after the seed),
/// in a rotating order; each XOR variant against the page's previous contents
/// (an unbounded copy, as the agent's shadow would hold with no evictions).
#[derive(Default)]
struct Codecs {
    prev: Vec<u8>,
    raw: u64,
    pages: u64,
    /// (name, compressed bytes, CPU time)
    results: Vec<(&'static str, u64, Duration)>,
    round: usize,
}

impl Codecs {
    fn names() -> Vec<&'static str> {
        let mut v = vec!["lz4", "xor+lz4"];
        if cfg!(feature = "bench-zstd") {
            v.extend(["xor+zstd1", "xor+zstd3"]);
        }
        v
    }

    fn compress(name: &str, raw: &[u8], xored: &[u8]) -> usize {
        match name {
            "lz4" => lz4_flex::block::compress(raw).len(),
            "xor+lz4" => lz4_flex::block::compress(xored).len(),
            #[cfg(feature = "bench-zstd")]
            "xor+zstd1" => zstd::bulk::compress(xored, 1).expect("zstd").len(),
            #[cfg(feature = "bench-zstd")]
            "xor+zstd3" => zstd::bulk::compress(xored, 3).expect("zstd").len(),
            _ => unreachable!("codec {name}"),
        }
    }

    /// One epoch's pages (`seed`: the whole RAM, only remembered).
    fn epoch(&mut self, staged: &Staged, ram_bytes: u64, seed: bool) {
        if self.prev.len() as u64 != ram_bytes {
            self.prev = vec![0; ram_bytes as usize];
        }
        if self.results.is_empty() {
            self.results = Self::names()
                .into_iter()
                .map(|n| (n, 0, Duration::ZERO))
                .collect();
        }
        let mut at = 0usize;
        let mut xored = Vec::new();
        for r in &staged.runs {
            let mut off = r.start as usize;
            while off < r.end as usize {
                let n = (r.end as usize - off).min(1 << 20);
                let raw = &staged.data[at..at + n];
                if !seed {
                    xored.clear();
                    xored.extend_from_slice(raw);
                    pipecloud::core::pagecodec::xor_into(&mut xored, &self.prev[off..off + n]);
                    let k = self.results.len();
                    for i in 0..k {
                        let c = (i + self.round) % k;
                        let t = Instant::now();
                        let len = Self::compress(self.results[c].0, raw, &xored);
                        self.results[c].2 += t.elapsed();
                        self.results[c].1 += (len as u64).min(n as u64);
                    }
                    self.round += 1;
                    self.raw += n as u64;
                    self.pages += (n / 4096) as u64;
                }
                self.prev[off..off + n].copy_from_slice(raw);
                at += n;
                off += n;
            }
        }
    }

    fn report(&self, load: Load) {
        for (name, bytes, cpu) in &self.results {
            println!(
                "  {load:?} codec {name:>9}: {:.3} of raw ({} pages), reduction {:.3}, {:.1} µs CPU/page",
                *bytes as f64 / self.raw.max(1) as f64,
                self.pages,
                1.0 - *bytes as f64 / self.raw.max(1) as f64,
                cpu.as_secs_f64() * 1e6 / self.pages.max(1) as f64
            );
        }
    }
}

/// Ships staged epochs: frames → codec → TCP; hands the buffer back. Returns
/// the frame bytes per epoch, the page bytes (raw, shipped) after the seed
/// and the codec comparison.
fn shipper(
    rx: Receiver<(u64, u64, Staged)>,
    back: SyncSender<Staged>,
    mut sock: TcpStream,
) -> (Vec<u64>, (u64, u64), Codecs) {
    let mut per_epoch = Vec::new();
    let mut buf = Vec::with_capacity(2 << 20);
    let mut shadow = None;
    let mut codecs = Codecs::default();
    let (mut raw, mut shipped) = (0u64, 0u64);
    for (epoch, ram_bytes, staged) in rx {
        let mut total = 0u64;
        codecs.epoch(&staged, ram_bytes, epoch == 1);
        if epoch > 1 {
            raw += staged.data.len() as u64;
        }
        let shadow = shadow.get_or_insert_with(|| Shadow::new(DEFAULT_SHADOW_BYTES, ram_bytes));
        staged
            .frames("bench", epoch, ram_bytes, shadow, |f| {
                if let (Checkpoint::Pages { data, .. }, true) = (&f, epoch > 1) {
                    shipped += data.len() as u64;
                }
                buf.clear();
                encode_frame(&Frame::Checkpoint(f), &mut buf)?;
                sock.write_all(&buf)?;
                total += buf.len() as u64;
                Ok(())
            })
            .expect("ship");
        buf.clear();
        encode_frame(
            &Frame::Checkpoint(Checkpoint::Commit {
                epoch,
                barrier: CountVector::ZERO,
            }),
            &mut buf,
        )
        .unwrap();
        sock.write_all(&buf).unwrap();
        per_epoch.push(total + buf.len() as u64);
        if back.send(staged).is_err() {
            break;
        }
    }
    (per_epoch, (raw, shipped), codecs)
}

fn run(load: Load, seconds: u64, interval: Duration, ram_mib: u64) -> Run {
    let tg = TestGuest::boot("bench", ram_mib, load);
    let mut guests = vec![Guest::attach(tg.spec.clone(), Duration::from_secs(5)).expect("attach")];
    let ram_bytes = guests[0].ram_bytes();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = vec![0u8; 1 << 20];
        while s.read(&mut b).unwrap_or(0) > 0 {}
    });
    let sock = TcpStream::connect(addr).unwrap();
    let (tx, rx) = sync_channel::<(u64, u64, Staged)>(1);
    let (back_tx, back_rx) = sync_channel::<Staged>(2);
    back_tx.send(Staged::default()).unwrap();
    back_tx.send(Staged::default()).unwrap();
    let ship = std::thread::spawn(move || shipper(rx, back_tx, sock));
    // Epoch 1 (whole RAM) is the seed; it is not counted.
    let mut r = Run {
        pauses_ms: Vec::new(),
        waits_ms: Vec::new(),
        bytes: 0,
        pages: 0,
        epochs: 0,
        elapsed: Duration::ZERO,
        raw_shipped: (0, 0),
        codecs: Codecs::default(),
    };
    let mut epoch = 0u64;
    let mut began = Instant::now();
    let mut next = Instant::now();
    loop {
        epoch += 1;
        if epoch == 2 {
            began = Instant::now();
            next = began;
        }
        if epoch > 1 && began.elapsed() >= Duration::from_secs(seconds) {
            break;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += interval;
        let w = Instant::now();
        let buf = back_rx.recv().unwrap(); // waits while shipping is behind
        let wait = w.elapsed();
        let mut staged = [buf];
        let t = pause_group(&mut guests, &mut staged, || Ok(epoch == 1)).expect("pause");
        let [buf] = staged;
        if epoch > 1 {
            r.pauses_ms.push(t.total.as_secs_f64() * 1e3);
            r.waits_ms.push(wait.as_secs_f64() * 1e3);
            r.pages += t.pages;
            r.epochs += 1;
        }
        tx.send((epoch, ram_bytes, buf)).unwrap();
        if next < Instant::now() {
            next = Instant::now();
        }
    }
    r.elapsed = began.elapsed();
    drop(tx);
    let (shipped, raw_shipped, codecs) = ship.join().unwrap();
    r.raw_shipped = raw_shipped;
    r.codecs = codecs;
    sink.join().unwrap();
    // Epoch 1 (the seed, the whole RAM) is not counted.
    r.bytes = shipped.iter().skip(1).sum();
    r
}

/// The agent's own epoch loop (`fullstate::driver`) shipping to a real backup
/// server over mutual TLS (loopback): epochs acknowledged per second, pauses.
fn run_backup(load: Load, seconds: u64, interval: Duration, ram_mib: u64, raw: bool) {
    // The driver's shipper reads it when it starts (docs/design.md §14).
    std::env::set_var("PIPECLOUD_CKPT_RAW", if raw { "1" } else { "0" });
    use pipecloud::causal::CausalState;
    use pipecloud::core::epoch::EpochLimits;
    use pipecloud::core::{WriterId, EPOCH_ENTRY};
    use pipecloud::fullstate::driver::{DriverConfig, EpochDriver};
    use pipecloud::replication::checkpoint::CheckpointLink;
    use pipecloud::replication::{
        fresh_generation, DiskSpec, ReplicationClient, ReplicationConfig,
    };
    use std::sync::Arc;
    let scratch = backup::Scratch::new("bench");
    let server = backup::Backup::start(&scratch, "bench");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in = rt.enter();
    let causal = Arc::new(CausalState::new(1));
    let link = Arc::new(CheckpointLink::new(16 << 20));
    let client = ReplicationClient::start(
        ReplicationConfig {
            group_id: 3,
            agent: "bench-agent".into(),
            disks: vec![DiskSpec {
                name: "d".into(),
                size: 1 << 20,
                writer: WriterId(0),
                machine: 0,
            }],
            generation: fresh_generation(Some(&scratch.0.join("generation"))).unwrap(),
            checkpoint: Some(Arc::clone(&link)),
            ..server.client_config()
        },
        Arc::clone(&causal),
    )
    .unwrap();
    let tg = TestGuest::boot("benchb", ram_mib, load);
    let driver = EpochDriver::start(
        "bench",
        vec![tg.spec.clone()],
        DriverConfig {
            interval,
            qmp_timeout: Duration::from_secs(5),
            limits: EpochLimits::default(),
            writers: vec![(0, WriterId(0))],
            machines: vec![0],
        },
        Arc::clone(&causal),
        link,
    )
    .unwrap();
    // Past the seed (whole RAM) epoch.
    while causal.committed().get(EPOCH_ENTRY) < 3 {
        std::thread::sleep(Duration::from_millis(20));
    }
    driver.take_pauses();
    let a0 = causal.committed().get(EPOCH_ENTRY);
    let s0 = driver.status();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let acked = causal.committed().get(EPOCH_ENTRY) - a0;
    let s1 = driver.status();
    let (raw_b, shipped_b) = (
        s1.raw_bytes - s0.raw_bytes,
        s1.shipped_bytes - s0.shipped_bytes,
    );
    let el = t0.elapsed().as_secs_f64();
    let p = driver.take_pauses();
    let mut ms: Vec<f64> = p.iter().map(|t| t.total.as_secs_f64() * 1e3).collect();
    let pages: u64 = p.iter().map(|t| t.pages).sum();
    let paused: f64 = ms.iter().sum::<f64>() / 1e3 / el;
    let (p50, p99) = (percentile(&mut ms, 0.5), percentile(&mut ms, 0.99));
    let enc = if raw { "raw" } else { "compressed" };
    println!(
        "{load:?} {enc} to the backup server: {} pauses, {acked} epochs acked in {el:.1} s = {:.1} acked/s, \
         pause p50 {p50:.2} ms p99 {p99:.2} ms, paused {:.1} %, {:.0} dirty pages/pause, \
         page bytes raw {raw_b} shipped {shipped_b} = reduction {:.3}, loadavg {}; status: {}",
        p.len(),
        acked as f64 / el,
        paused * 100.0,
        pages as f64 / p.len().max(1) as f64,
        1.0 - shipped_b as f64 / raw_b.max(1) as f64,
        loadavg(),
        driver.status().line("bench")
    );
    drop(driver);
    client.shutdown();
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `PIPECLOUD_BENCH_LOADS` (comma-separated: light, heavy, byte, record; default
/// light,heavy): `byte` / `record` run guest-service's `--dirty-pattern`.
fn loads() -> Vec<Load> {
    let spec = std::env::var("PIPECLOUD_BENCH_LOADS").unwrap_or_else(|_| "light,heavy".into());
    spec.split(',')
        .map(|l| match l.trim() {
            "light" => Load::Light,
            "heavy" => Load::Heavy,
            "byte" => Load::Dirty("byte"),
            "record" => Load::Dirty("record"),
            other => panic!("PIPECLOUD_BENCH_LOADS: unknown load {other}"),
        })
        .collect()
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric argument"))
        .collect();
    let seconds = args.first().copied().unwrap_or(10);
    let interval = Duration::from_millis(args.get(1).copied().unwrap_or(20));
    let ram_mib = args.get(2).copied().unwrap_or(256);
    println!(
        "fullstate_bench: {ram_mib} MiB guest, TCG, {interval:?} epochs, {seconds} s per load; loadavg before: {}",
        loadavg()
    );
    if std::env::var_os("PIPECLOUD_BENCH_BACKUP").is_some() {
        // Per load, uncompressed then compressed, one after the other (A/B).
        for l in loads() {
            for raw in [true, false] {
                run_backup(l, seconds, interval, ram_mib, raw);
            }
        }
        println!("loadavg after: {}", loadavg());
        return;
    }
    for l in loads() {
        let mut r = run(l, seconds, interval, ram_mib);
        let rate = r.epochs as f64 / r.elapsed.as_secs_f64();
        let paused: f64 = r.pauses_ms.iter().sum::<f64>() / 1e3 / r.elapsed.as_secs_f64();
        let waited = r.waits_ms.iter().filter(|&&w| w > 1.0).count();
        let (p50, p99) = (
            percentile(&mut r.pauses_ms, 0.5),
            percentile(&mut r.pauses_ms, 0.99),
        );
        let (raw, shipped) = r.raw_shipped;
        println!(
            "{l:?}: {} epochs in {:.1} s = {rate:.1} checkpoints/s, pause p50 {p50:.2} ms p99 {p99:.2} ms, \
             paused {:.1} %, {:.0} dirty pages/epoch, {:.0} KiB shipped/epoch (frames, incl. device state), \
             {waited} pauses waited > 1 ms for shipping; page bytes raw {raw} shipped {shipped} = \
             reduction {:.3} (agent encoder, {} MiB shadow); loadavg {}",
            r.epochs,
            r.elapsed.as_secs_f64(),
            paused * 100.0,
            r.pages as f64 / r.epochs as f64,
            r.bytes as f64 / r.epochs as f64 / 1024.0,
            1.0 - shipped as f64 / raw.max(1) as f64,
            DEFAULT_SHADOW_BYTES >> 20,
            loadavg()
        );
        r.codecs.report(l);
    }
    println!("loadavg after: {}", loadavg());
}
