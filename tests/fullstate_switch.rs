//! The run-time switch between disk-only and full-state against the real backup
//! server (docs/design.md §13): a 128 MiB TCG guest with the preload shim writing
//! memory all the time, the agent's replication client with a checkpoint link over
//! mutual TLS, and the epoch loop started disk-only (`start_switchable` in
//! `pipelined`).
//!
//! - Disk-only: no pause, no tag carries an epoch.
//! - `request(checkpoint)`: the mode is `checkpoint` at once (output held by the
//!   disk rule); pre-copy rounds ship at least the whole RAM; then the first pause,
//!   after which a tag carries an epoch above the committed one, covered only once
//!   the backup acknowledged it.
//! - Refusals while a switch runs: a second switch in, a switch while leaving.
//! - `request(pipelined)`: `Leave`; once the backup acknowledged it the phase is
//!   off, the mode `pipelined`, and the committed epoch entry covers every tag.
//! - Failover after leaving is disk-only (no `checkpoint.toml`); after switching in
//!   again, it resumes a checkpoint of the second period.
//!
//! Needs the backup-server binary, qemu-system-x86, busybox-static and the guest
//! kernel (tests/support/qemu_guest.rs); a missing one fails the test.

#[path = "support/backup.rs"]
mod backup;
#[path = "support/checkpoint_agent.rs"]
mod checkpoint_agent;
#[path = "support/qemu_guest.rs"]
#[allow(dead_code)]
mod qemu_guest;

use backup::{Backup, Scratch};
use checkpoint_agent::{driver_config, CheckpointAgent};
use pipecloud::causal::CausalState;
use pipecloud::core::epoch::Phase;
use pipecloud::core::EPOCH_ENTRY;
use pipecloud::fullstate::driver::{DriverStatus, EpochDriver};
use pipecloud::replication::{Mode, ModeSwitch, ReplicationClient};
use qemu_guest::{Load, TestGuest};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rig {
    scratch: Scratch,
    backup: Backup,
    causal: Arc<CausalState>,
    client: ReplicationClient,
    driver: Option<EpochDriver>,
    mode: ModeSwitch,
    guest: Option<TestGuest>,
    _rt: tokio::runtime::Runtime,
}

const RAM_MIB: u64 = 128;

impl Rig {
    fn start(tag: &str, group: &str) -> Rig {
        let scratch = Scratch::new(tag);
        let backup = Backup::start(&scratch, group);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let _in_rt = rt.enter();
        let CheckpointAgent {
            causal,
            link,
            client,
        } = CheckpointAgent::start(&backup, &scratch, 11, "agent-sw");
        let guest = TestGuest::boot(tag, RAM_MIB, Load::Heavy);
        let mode = ModeSwitch::new(Mode::Pipelined);
        let driver = EpochDriver::start_switchable(
            group,
            vec![guest.spec.clone()],
            driver_config(),
            Arc::clone(&causal),
            link,
            mode.clone(),
        )
        .expect("driver");
        drop(_in_rt);
        Rig {
            scratch,
            backup,
            causal,
            client,
            driver: Some(driver),
            mode,
            guest: Some(guest),
            _rt: rt,
        }
    }

    fn status(&self) -> DriverStatus {
        self.driver.as_ref().expect("driver").status()
    }

    fn request(&self, to: Mode) -> Result<String, String> {
        self.driver.as_ref().expect("driver").request(to)
    }

    /// A hang guard, not a timing check.
    fn wait(&self, what: &str, f: &dyn Fn(&Rig) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}: {:?}\nbackup log:\n{}",
                self.status(),
                self.backup.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn committed_epoch(&self) -> u64 {
        self.causal.committed().get(EPOCH_ENTRY)
    }

    /// Switch in and check the phases on the way (module doc).
    fn switch_in(&self) -> u64 {
        assert_eq!(self.status().phase, Some(Phase::Off));
        let tag_before = self.causal.sync_pending(0).get(EPOCH_ENTRY);
        assert!(
            tag_before <= self.committed_epoch(),
            "disk-only: a tag carries epoch {tag_before} above the committed {}",
            self.committed_epoch()
        );
        // The replication connection must be synchronised first (the caller of
        // `request` in the agent checks the session; here the driver's own check
        // may refuse until then).
        let t = Instant::now();
        let answer = loop {
            match self.request(Mode::Checkpoint) {
                Ok(a) => break a,
                Err(e) if e.contains("not known yet") && t.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("switch in refused: {e}"),
            }
        };
        assert!(answer.contains("-> checkpoint"), "{answer}");
        assert_eq!(
            self.mode.get(),
            Mode::Checkpoint,
            "held by the disk rule at once"
        );
        let again = self.request(Mode::Checkpoint);
        assert!(again.is_err(), "a second switch in was accepted: {again:?}");
        self.wait("the first checkpoint", &|r| {
            r.status().phase == Some(Phase::On) && r.status().pauses > 0
        });
        let s = self.status();
        let ram_pages = RAM_MIB << 8;
        assert!(
            s.seed_round >= 1 && s.seed_pages >= ram_pages,
            "the pre-copy shipped {} pages in {} rounds, the RAM has {ram_pages}",
            s.seed_pages,
            s.seed_round
        );
        let tag = self.causal.sync_pending(0);
        assert!(
            tag.get(EPOCH_ENTRY) > self.committed_epoch(),
            "after the first pause the tag must wait for its epoch: tag {} committed {}",
            tag.get(EPOCH_ENTRY),
            self.committed_epoch()
        );
        self.wait("the tag's epoch acked", &|r| {
            r.causal.committed().dominates(&tag)
        });
        self.wait("5 more epochs acked", &|r| {
            r.committed_epoch() >= tag.get(EPOCH_ENTRY) + 5
        });
        assert!(self.status().alarm.is_none(), "{:?}", self.status());
        tag.get(EPOCH_ENTRY)
    }

    /// Switch out and check the phases on the way; returns the Leave's epoch.
    fn switch_out(&self) -> u64 {
        let answer = self.request(Mode::Pipelined).expect("switch out");
        assert!(answer.contains("checkpoint -> pipelined"), "{answer}");
        self.wait("the leave acknowledged", &|r| {
            r.status().phase == Some(Phase::Off)
        });
        let s = self.status();
        assert_eq!(self.mode.get(), Mode::Pipelined, "{s:?}");
        let tag = self.causal.sync_pending(0).get(EPOCH_ENTRY);
        assert!(
            self.committed_epoch() >= tag,
            "after the leave every tag is covered: tag {tag} committed {}",
            self.committed_epoch()
        );
        assert!(
            s.switch_last
                .as_deref()
                .is_some_and(|l| l.contains("left checkpoint mode")),
            "{s:?}"
        );
        // Disk-only again: the pauses stop.
        let pauses = s.pauses;
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(self.status().pauses, pauses, "paused while disk-only");
        self.committed_epoch()
    }

    /// Stops the agent side and fails the group over; returns `checkpoint.toml`'s
    /// epoch, if the failover wrote one.
    fn failover(mut self) -> Option<u64> {
        self.driver.take();
        self.client.shutdown();
        self.guest.take();
        let out = self.scratch.0.join("failover");
        self.backup.failover(&out);
        let manifest = std::fs::read_to_string(out.join("checkpoint.toml")).ok()?;
        Some(
            manifest
                .lines()
                .find_map(|l| l.strip_prefix("epoch = "))
                .expect("epoch in checkpoint.toml")
                .trim()
                .parse()
                .expect("epoch"),
        )
    }
}

/// A disk-only start leaves first (core::epoch): ready once that is acknowledged.
fn ready(r: &Rig) -> bool {
    let s = r.status();
    s.phase == Some(Phase::Off) && s.acked >= 1
}

#[test]
fn switch_in_and_out_then_failover_is_disk_only() {
    let rig = Rig::start("fs-switch-a", "swa");
    rig.wait("synchronised (the start-up Leave acknowledged)", &ready);
    let first = rig.switch_in();
    let left = rig.switch_out();
    assert!(left > first);
    let epoch = rig.failover();
    assert_eq!(
        epoch, None,
        "after leaving, failover must be disk-only (no checkpoint.toml)"
    );
    println!("fullstate switch: first checkpoint {first}, left at {left}, failover disk-only");
}

#[test]
fn switch_in_out_in_then_failover_resumes_the_second_period() {
    let rig = Rig::start("fs-switch-b", "swb");
    rig.wait("synchronised (the start-up Leave acknowledged)", &ready);
    let first = rig.switch_in();
    let left = rig.switch_out();
    let second = rig.switch_in();
    assert!(second > left && left > first, "{first} {left} {second}");
    let last = rig.committed_epoch();
    let epoch = rig
        .failover()
        .expect("checkpoint.toml after switching in again");
    assert!(
        epoch >= last && epoch >= second,
        "failover epoch {epoch}: older than the acked {last} or the second period's first {second}"
    );
    println!(
        "fullstate switch: periods from {first} and {second} (left at {left}), failover at epoch {epoch}"
    );
}
