//! The agent's epoch loop against the real backup server (docs/design.md §9, §11):
//! a 128 MiB TCG guest with the preload shim, the agent's replication client with
//! a checkpoint link over mutual TLS, and `fullstate::driver` pausing every 20 ms.
//! The backup's acks (real, after its journal made each epoch durable) raise the
//! committed epoch entry; a tag taken now is covered only once the backup
//! acknowledged its epoch; the backup's `failover` then writes the guest's RAM
//! image and device state of an epoch at least as new as the last one the agent
//! saw acknowledged. Then the backup server is stopped (SIGSTOP): acks stop, the
//! pauses stall, nothing more is released.
//!
//! Needs the backup-server binary (PIPECLOUD_BACKUP_SERVER_BIN or a sibling
//! build), qemu-system-x86, busybox-static and the guest kernel (see
//! tests/support/qemu_guest.rs).

#[path = "support/backup.rs"]
mod backup;
#[path = "support/checkpoint_agent.rs"]
mod checkpoint_agent;
#[path = "support/qemu_guest.rs"]
#[allow(dead_code)]
mod qemu_guest;

use backup::{Backup, Scratch};
use checkpoint_agent::{driver_config, CheckpointAgent};
use pipecloud::core::EPOCH_ENTRY;
use pipecloud::fullstate::driver::EpochDriver;
use qemu_guest::{Load, TestGuest};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GROUP: &str = "fsck";

#[test]
fn epochs_acked_by_the_real_backup_and_failed_over() {
    let scratch = Scratch::new("fullstate-backup");
    let backup = Backup::start(&scratch, GROUP);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_rt = rt.enter();
    let CheckpointAgent {
        causal,
        link,
        client,
    } = CheckpointAgent::start(&backup, &scratch, 9, "agent-fs");
    let tg = TestGuest::boot("fsvm", 128, Load::Light);
    let driver = EpochDriver::start(
        GROUP,
        vec![tg.spec.clone()],
        driver_config(),
        Arc::clone(&causal),
        Arc::clone(&link),
    )
    .expect("driver");
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        // A hang guard, not a timing check.
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "timed out waiting for {what}: {:?}\nbackup log:\n{}",
                driver.status(),
                backup.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait("10 acked epochs", &|| {
        causal.committed().get(EPOCH_ENTRY) >= 10
    });
    let tag = causal.sync_pending(0);
    assert!(tag.get(EPOCH_ENTRY) > causal.committed().get(EPOCH_ENTRY));
    wait("the tag's epoch acked", &|| {
        causal.committed().dominates(&tag)
    });
    let seen = causal.committed().get(EPOCH_ENTRY);
    assert!(driver.status().alarm.is_none(), "{:?}", driver.status());

    // The backup stops answering: acks stop, pauses stall, output stays held.
    backup.stop();
    let held = causal.committed().get(EPOCH_ENTRY);
    let stalls = driver.status().stalls;
    wait("stalled pauses", &|| driver.status().stalls > stalls + 20);
    assert_eq!(
        causal.committed().get(EPOCH_ENTRY),
        held,
        "released while the backup was stopped"
    );
    backup.cont();
    wait("acks again", &|| causal.committed().get(EPOCH_ENTRY) > held);
    let last = causal.committed().get(EPOCH_ENTRY);
    drop(driver);
    client.shutdown();
    drop(tg);

    let out = scratch.0.join("failover");
    backup.failover(&out);
    let manifest = std::fs::read_to_string(out.join("checkpoint.toml")).expect("checkpoint.toml");
    let epoch: u64 = manifest
        .lines()
        .find_map(|l| l.strip_prefix("epoch = "))
        .expect("epoch in checkpoint.toml")
        .trim()
        .parse()
        .expect("epoch");
    assert!(
        epoch >= last,
        "failover epoch {epoch} older than the acked {last} the agent saw"
    );
    let ram = std::fs::metadata(out.join("fsvm.ram"))
        .expect("RAM image")
        .len();
    assert_eq!(ram, 128 << 20);
    let dev = std::fs::metadata(out.join("fsvm.devstate"))
        .expect("device state")
        .len();
    assert!(dev > 0);
    println!(
        "fullstate backup: acked epoch {seen} covered a tag, {last} after the stall, failover at epoch {epoch} \
         ({ram} bytes of RAM, {dev} bytes of device state)"
    );
}
