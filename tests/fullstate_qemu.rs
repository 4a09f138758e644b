//! Dirty-page capture against a real QEMU guest (docs/design.md §9): a 256 MiB
//! TCG guest whose init rewrites random pages of a tmpfs file, the preload shim in
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
