//! Dirty-page capture against a real QEMU guest (docs/design.md §9): a 256 MiB
//! TCG guest whose init rewrites a tmpfs file with random bytes, the preload shim in
//! QEMU, and the agent's pause (`fullstate::capture::pause_group`) run epoch after
//! epoch. While the guest is stopped the test reads the whole RAM file and compares
//! it with its copy from the previous pause: every page that changed must be among
//! the pages the capture reported, and the bytes the capture copied must be the
//! RAM's at the pause. Epoch 1 must carry the whole RAM, every epoch a device state.
//!
//! Needs qemu-system-x86 and busybox-static (scripts/install-deps.sh) and the test
//! guest's kernel (scripts/build-guest.sh, or PIPECLOUD_GUEST_KERNEL).

#[path = "support/qemu_guest.rs"]
#[allow(dead_code)]
mod qemu_guest;

use pipecloud::fullstate::capture::{pause_group, Guest, Staged};
use qemu_guest::{Load, TestGuest};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const PAGE: usize = 4096;

#[test]
fn qemu_capture_reports_every_changed_page() {
    let tg = TestGuest::boot("capture", 256, Load::Heavy);
    assert!(
        tg.stderr().contains("write-protect tracked"),
        "shim log: {}",
        tg.stderr()
    );
    let mut guests = vec![Guest::attach(tg.spec.clone(), Duration::from_secs(5)).expect("attach")];
    let ram_bytes = guests[0].ram_bytes() as usize;
    assert_eq!(ram_bytes, 256 << 20);
    let mut staged = vec![Staged::default()];
    let file = std::fs::File::open(&tg.spec.ram_file).unwrap();
    let mut shadow = vec![0u8; ram_bytes];
    let mut now = vec![0u8; ram_bytes];
    let (mut changed_total, mut extra_total) = (0u64, 0u64);
    let epochs = 60;
    for epoch in 1..=epochs {
        std::thread::sleep(Duration::from_millis(20));
        pause_group(&mut guests, &mut staged, || {
            // The guest is stopped: this is the RAM the checkpoint must describe.
            file.read_exact_at(&mut now, 0)?;
            Ok(epoch == 1)
        })
        .unwrap_or_else(|e| panic!("epoch {epoch}: {e:#}"));
        let s = &staged[0];
        assert!(!s.device.is_empty(), "epoch {epoch}: no device state");
        let mut reported = vec![false; ram_bytes / PAGE];
        let mut at = 0;
        for r in &s.runs {
            let (a, b) = (r.start as usize, r.end as usize);
            assert_eq!(
                &s.data[at..at + (b - a)],
                &now[a..b],
                "epoch {epoch}: copied bytes of {a:#x}..{b:#x} differ from the RAM at the pause"
            );
            at += b - a;
            reported[a / PAGE..b / PAGE]
                .iter_mut()
                .for_each(|p| *p = true);
        }
        if epoch == 1 {
            assert_eq!(
                s.pages() as usize,
                ram_bytes / PAGE,
                "epoch 1 ships the whole RAM"
            );
        } else {
            for p in 0..ram_bytes / PAGE {
                let changed = now[p * PAGE..(p + 1) * PAGE] != shadow[p * PAGE..(p + 1) * PAGE];
                assert!(
                    !changed || reported[p],
                    "epoch {epoch}: page {p} changed but was not reported ({} reported)",
                    s.pages()
                );
                changed_total += changed as u64;
                extra_total += (reported[p] && !changed) as u64;
            }
        }
        std::mem::swap(&mut shadow, &mut now);
    }
    assert!(
        changed_total > 0,
        "the guest changed no page: the check proved nothing"
    );
    println!(
        "fullstate qemu: {epochs} epochs, {changed_total} changed pages all reported, \
         {extra_total} reported pages with unchanged bytes"
    );
}

/// The epoch loop (`fullstate::driver`) on a real guest, with a test double of
/// the backup that reads the queued frames and acknowledges each `Commit`
/// (a unit test of the agent's half; the proof runs against the real
/// backup server). The double says it acknowledged epoch 41 when the connection
/// opened (a previous run's). Checks: numbering continues at 42, which ships the
/// whole RAM, 41 releases nothing, every epoch arrives whole
/// (Begin, Pages, Device, End, Commit) and in order, the committed epoch entry
/// follows the acks and never passes what the backup acknowledged, a tag taken
/// now is covered only by an ack of its epoch; a backup that stops acknowledging
/// stalls the pauses; a QEMU that dies raises the alarm and the committed epoch
/// stops.
#[test]
fn epoch_driver_ships_and_releases_by_ack() {
    use pipecloud::causal::CausalState;
    use pipecloud::core::codec::FrameReader;
    use pipecloud::core::epoch::EpochLimits;
    use pipecloud::core::wire::{Checkpoint, Frame};
    use pipecloud::core::{WriterId, EPOCH_ENTRY};
    use pipecloud::fullstate::driver::{DriverConfig, EpochDriver};
    use pipecloud::replication::checkpoint::CheckpointLink;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let tg = TestGuest::boot("driver", 128, Load::Light);
    let causal = Arc::new(CausalState::new(1));
    let link = Arc::new(CheckpointLink::new(8 << 20));
    let cfg = DriverConfig {
        interval: Duration::from_millis(20),
        qmp_timeout: Duration::from_secs(5),
        limits: EpochLimits { max_unacked: 8 },
        writers: vec![(0, WriterId(0))],
        machines: vec![0],
    };
    let driver = EpochDriver::start(
        "drv",
        vec![tg.spec.clone()],
        cfg,
        Arc::clone(&causal),
        Arc::clone(&link),
    )
    .expect("start");
    // A backup that acknowledged epoch 41 before this agent started: the
    // numbering continues above it, and that ack releases nothing of this run.
    link.on_welcome();
    link.on_ack(41);
    link.on_heartbeat_reply();
    // The backup double.
    let acking = Arc::new(AtomicBool::new(true));
    let last_commit = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let backup = {
        let (link, acking, last_commit, done) = (
            Arc::clone(&link),
            Arc::clone(&acking),
            Arc::clone(&last_commit),
            Arc::clone(&done),
        );
        let ram_pages = 128 * 256;
        std::thread::spawn(move || {
            let r = (|| -> Result<u64, String> {
                let mut reader = FrameReader::new();
                let mut buf = Vec::new();
                let (mut open, mut pages, mut ended) = (None::<u64>, 0u64, None::<u64>);
                let mut epochs = 0;
                while !done.load(Ordering::Acquire) {
                    buf.clear();
                    link.take(&mut buf, 4 << 20);
                    if buf.is_empty() {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    let mut fed = 0;
                    let mut frames = Vec::new();
                    while fed < buf.len() {
                        fed += reader.push(&buf[fed..]);
                        while let Some(f) = reader.next().map_err(|e| e.to_string())? {
                            frames.push(f);
                        }
                    }
                    for f in frames {
                        let Frame::Checkpoint(c) = f else {
                            return Err(format!("not a checkpoint frame: {f:?}"));
                        };
                        match c {
                            Checkpoint::Begin { epoch, .. } => {
                                let prev = last_commit.load(Ordering::Acquire).max(41);
                                if epoch != prev + 1 || open.is_some() {
                                    return Err(format!("Begin {epoch} after commit {prev}"));
                                }
                                (open, pages) = (Some(epoch), 0);
                            }
                            Checkpoint::Pages {
                                epoch,
                                encoding,
                                data,
                                ..
                            } if open == Some(epoch) => {
                                // Compressed frames stand for more bytes than they carry.
                                pages += encoding.page_bytes(data.len()) / 4096;
                            }
                            Checkpoint::Device { epoch, .. } if open == Some(epoch) => {}
                            Checkpoint::End {
                                epoch,
                                pages: p,
                                device_bytes,
                            } => {
                                if open != Some(epoch) || p != pages || device_bytes == 0 {
                                    return Err(format!("End {epoch}: {p} pages, {pages} seen"));
                                }
                                if epoch == 42 && pages != ram_pages {
                                    return Err(format!(
                                        "epoch 42 (the first) carried {pages} pages"
                                    ));
                                }
                                (open, ended) = (None, Some(epoch));
                            }
                            Checkpoint::Commit { epoch, barrier } => {
                                if ended != Some(epoch) || barrier.get(EPOCH_ENTRY) != 0 {
                                    return Err(format!("Commit {epoch} without its End"));
                                }
                                last_commit.store(epoch, Ordering::Release);
                                epochs += 1;
                                if acking.load(Ordering::Acquire) {
                                    link.on_ack(epoch);
                                }
                            }
                            other => return Err(format!("unexpected {other:?}")),
                        }
                    }
                }
                Ok(epochs)
            })();
            if let Err(e) = &r {
                eprintln!("backup double failed: {e}");
            }
            r
        })
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        // A hang guard, not a timing check.
        let t = std::time::Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}: {:?}",
                driver.status()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // A packet tagged now is released only by the ack of its epoch.
    assert_eq!(
        causal.committed().get(EPOCH_ENTRY),
        0,
        "another run's epoch 41 released output"
    );
    wait("epoch 44", &|| causal.committed().get(EPOCH_ENTRY) >= 44);
    let tag = causal.sync_pending(0);
    let e = tag.get(EPOCH_ENTRY);
    assert!(
        e > causal.committed().get(EPOCH_ENTRY),
        "tag {e} must wait for a later epoch"
    );
    wait("the tag's epoch", &|| causal.committed().dominates(&tag));
    assert!(
        last_commit.load(Ordering::Acquire) >= e,
        "released before its epoch was shipped"
    );
    // The backup stops acknowledging: pauses stall, the committed epoch stays.
    acking.store(false, Ordering::Release);
    let stalls = driver.status().stalls;
    wait("stalled pauses", &|| driver.status().stalls > stalls + 10);
    let c = causal.committed().get(EPOCH_ENTRY);
    let s = driver.status();
    assert!(s.open > c + 1 && s.acked == c, "{s:?}, committed {c}");
    // Acks again, then QEMU dies: alarm, output held from then on.
    acking.store(true, Ordering::Release);
    for ep in c + 1..=last_commit.load(Ordering::Acquire) {
        link.on_ack(ep);
    }
    wait("progress after the stall", &|| {
        causal.committed().get(EPOCH_ENTRY) > c
    });
    drop(tg);
    wait("the alarm", &|| driver.status().alarm.is_some());
    let held = causal.committed().get(EPOCH_ENTRY);
    let open = driver.status().open;
    assert!(
        open > held,
        "output of the open epoch {open} held at {held}"
    );
    let line = driver.status().line("drv");
    assert!(
        line.contains("ALARM (output held)"),
        "ctl status line: {line}"
    );
    println!("fullstate driver: {line}");
    done.store(true, Ordering::Release);
    let epochs = backup
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("backup double: {e}"));
    drop(driver);
    assert_eq!(
        causal.committed().get(EPOCH_ENTRY),
        held,
        "nothing released after the alarm"
    );
    println!("fullstate driver: {epochs} epochs shipped whole and in order");
}
