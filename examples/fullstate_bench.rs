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
//! per second.

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
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Ships staged epochs: frames → codec → TCP; hands the buffer back.
fn shipper(
    rx: Receiver<(u64, u64, Staged)>,
    back: SyncSender<Staged>,
    mut sock: TcpStream,
) -> Vec<u64> {
    let mut per_epoch = Vec::new();
    let mut buf = Vec::with_capacity(2 << 20);
    let mut shadow = None;
    for (epoch, ram_bytes, staged) in rx {
        let mut total = 0u64;
        let shadow = shadow.get_or_insert_with(|| Shadow::new(DEFAULT_SHADOW_BYTES, ram_bytes));
        staged
            .frames("bench", epoch, ram_bytes, shadow, |f| {
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
    per_epoch
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
    let shipped = ship.join().unwrap();
    sink.join().unwrap();
    // Epoch 1 (the seed, the whole RAM) is not counted.
    r.bytes = shipped.iter().skip(1).sum();
    r
}

/// The agent's own epoch loop (`fullstate::driver`) shipping to a real backup
/// server over mutual TLS (loopback): epochs acknowledged per second, pauses.
fn run_backup(load: Load, seconds: u64, interval: Duration, ram_mib: u64) {
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
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let acked = causal.committed().get(EPOCH_ENTRY) - a0;
    let el = t0.elapsed().as_secs_f64();
    let p = driver.take_pauses();
    let mut ms: Vec<f64> = p.iter().map(|t| t.total.as_secs_f64() * 1e3).collect();
    let pages: u64 = p.iter().map(|t| t.pages).sum();
    let paused: f64 = ms.iter().sum::<f64>() / 1e3 / el;
    let (p50, p99) = (percentile(&mut ms, 0.5), percentile(&mut ms, 0.99));
    println!(
        "{load:?} to the backup server: {} pauses, {acked} epochs acked in {el:.1} s = {:.1} acked/s, \
         pause p50 {p50:.2} ms p99 {p99:.2} ms, paused {:.1} %, {:.0} dirty pages/pause, status: {}",
        p.len(),
        acked as f64 / el,
        paused * 100.0,
        pages as f64 / p.len().max(1) as f64,
        driver.status().line("bench")
    );
    drop(driver);
    client.shutdown();
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric argument"))
        .collect();
    let seconds = args.first().copied().unwrap_or(10);
    let interval = Duration::from_millis(args.get(1).copied().unwrap_or(20));
    let ram_mib = args.get(2).copied().unwrap_or(256);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("fullstate_bench: {ram_mib} MiB guest, TCG, {interval:?} epochs, {seconds} s per load; loadavg before: {}", load.trim());
    if std::env::var_os("PIPECLOUD_BENCH_BACKUP").is_some() {
        for l in [Load::Light, Load::Heavy] {
            run_backup(l, seconds, interval, ram_mib);
        }
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("loadavg after: {}", load.trim());
        return;
    }
    for l in [Load::Light, Load::Heavy] {
        let mut r = run(l, seconds, interval, ram_mib);
        let rate = r.epochs as f64 / r.elapsed.as_secs_f64();
        let paused: f64 = r.pauses_ms.iter().sum::<f64>() / 1e3 / r.elapsed.as_secs_f64();
        let waited = r.waits_ms.iter().filter(|&&w| w > 1.0).count();
        let (p50, p99) = (
            percentile(&mut r.pauses_ms, 0.5),
            percentile(&mut r.pauses_ms, 0.99),
        );
        println!(
            "{l:?}: {} epochs in {:.1} s = {rate:.1} checkpoints/s, pause p50 {p50:.2} ms p99 {p99:.2} ms, \
             paused {:.1} %, {:.0} dirty pages/epoch, {:.0} KiB shipped/epoch (frames, incl. device state), \
             {waited} pauses waited > 1 ms for shipping",
            r.epochs,
            r.elapsed.as_secs_f64(),
            paused * 100.0,
            r.pages as f64 / r.epochs as f64,
            r.bytes as f64 / r.epochs as f64 / 1024.0,
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("loadavg after: {}", load.trim());
}
