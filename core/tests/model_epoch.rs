//! Deterministic model test of the checkpoint epochs of the full-state mode
//! (`docs/design.md §9`, `pipecloud_core::epoch`).
//!
//! Every schedule is a pure function of one `u64` seed. A group of 1..=3
//! checkpointed machines (each a writer with a disk) runs on a virtual clock of
//! ticks: the guests write to their disks and emit client-bound packets; packets
//! reach the agent after a random delay (some cross a pause) and go through the
//! real [`Epochs::tag`] into the real [`NetQueue`]; the agent's epoch driver
//! stops the guests, calls the real [`Epochs`] (pause, capture — which fails now
//! and then —, ship, ack), and continues them; checkpoints travel to a backup
//! that applies an epoch as a delta only on top of its predecessor, makes it
//! durable once the disk writes up to its barrier are journaled, and acks it;
//! the connection breaks now and then (frames and acks in flight are lost, the
//! agent reconnects with the backup's durable epoch).
//!
//! The model keeps the truth the protocol never sees: the epoch in which each
//! packet was really emitted (`1 +` the number of stops before it) and the writes
//! really issued before each stop. Checks:
//!
//! * at every release (release checks): the packet's true epoch is durable at the
//!   backup, and its disk dependencies are journaled;
//! * at a disaster (a random tick in half of the schedules): every packet released
//!   so far was emitted no later than the backup's durable checkpoint (client view
//!   ⊆ resumed machine), its writes are journaled, and that checkpoint's disk is at
//!   its barrier, which equals the writes really issued before its pause;
//! * the backup never gets a delta epoch without its predecessor;
//! * without a disaster or a failed capture, everything is released once the
//!   guests fall quiet (liveness).
//!
//! Injected bugs (in the model's driver or backup, never in the product) that the
//! checks must catch: release on ship instead of ack, tag with the previous epoch,
//! a barrier off by one, continuing the guests before the epoch opens, a backup
//! that ignores the barrier, a delta shipped on a new connection.
//!
//! Environment: `PIPECLOUD_MODEL_EPOCH_SCHEDULES` (default 20 000),
//! `PIPECLOUD_MODEL_EPOCH_SEED` (first seed, default 0).

use pipecloud_core::epoch::{Captured, EpochLimits, Epochs};
use pipecloud_core::netqueue::{FlowId, NetQueue, NetQueueLimits, Push};
use pipecloud_core::{CountVector, WriterId, EPOCH_ENTRY};
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// The netqueue's epoch entry is the last *shipped* epoch.
    ReleaseOnShip,
    /// Packets are tagged with the epoch before the open one.
    TagPrevious,
    /// The barrier misses the last write of writer 0.
    BarrierOffByOne,
    /// The guests continue right after the stop; the epoch opens only when the
    /// capture ends.
    ContBeforeOpen,
    /// The backup makes an epoch durable without waiting for its disk writes.
    BackupIgnoresBarrier,
    /// The driver ships an epoch the state machine gave up at a reconnection.
    ShipGivenUp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    ReleasedNotDurable,
    ClientAheadOfCheckpoint,
    DiskBehindCheckpoint,
    BarrierNotIssued,
    DeltaWithoutBase,
    NotReleased,
    Protocol,
}

#[derive(Debug)]
struct Violation {
    check: Check,
    what: String,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
    /// True with probability `1/n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

struct Pkt {
    /// The epoch it was really emitted in.
    true_epoch: u64,
    /// Writes it really depends on.
    deps: CountVector,
    flow: u64,
    released: bool,
}

#[derive(Clone)]
struct Ckpt {
    epoch: u64,
    full: bool,
    barrier: CountVector,
    /// Writes really issued before the pause (the model's truth).
    true_issued: CountVector,
}

struct Pausing {
    ckpt: Ckpt,
    due: u64,
    fails: bool,
}

#[derive(Default)]
struct Stats {
    schedules: u64,
    disasters: u64,
    released: u64,
    pauses: u64,
    stalls: u64,
    given_up: u64,
    failed_captures: u64,
    reconnects: u64,
    acks: u64,
}

struct Sim {
    rng: Rng,
    bug: Bug,
    release_checks: bool,
    t: u64,
    writers: usize,
    // The guests.
    issued: CountVector,
    running: bool,
    stops: u64,
    packets: Vec<Pkt>,
    arriving: VecDeque<(u64, usize)>,
    // The agent.
    epochs: Epochs,
    nq: NetQueue<usize>,
    agent_committed: CountVector,
    conn: u64,
    pausing: Option<Pausing>,
    to_ship: VecDeque<Ckpt>,
    // In flight to/from the backup.
    disk_q: VecDeque<(u64, usize, u64)>,
    disk_due: Vec<u64>,
    committed_q: VecDeque<(u64, CountVector)>,
    ckpt_q: VecDeque<(u64, u64, Ckpt)>,
    ack_q: VecDeque<(u64, u64, u64)>,
    // The backup.
    journaled: CountVector,
    chain: u64,
    pending: VecDeque<(u64, Ckpt)>,
    durable: Option<Ckpt>,
    stats: Stats,
}

fn violation<T>(check: Check, what: String) -> Result<T, Violation> {
    Err(Violation { check, what })
}

impl Sim {
    fn new(seed: u64, bug: Bug, release_checks: bool) -> Self {
        let mut rng = Rng(seed ^ 0x243f_6a88_85a3_08d3);
        let writers = 1 + rng.below(3) as usize;
        let max_unacked = 1 + rng.below(8);
        Sim {
            rng,
            bug,
            release_checks,
            t: 0,
            writers,
            issued: CountVector::ZERO,
            running: true,
            stops: 0,
            packets: Vec::new(),
            arriving: VecDeque::new(),
            epochs: Epochs::new(EpochLimits { max_unacked }),
            nq: NetQueue::new(NetQueueLimits {
                max_packets: 1 << 20,
                max_bytes: 1 << 30,
            }),
            agent_committed: CountVector::ZERO,
            conn: 1,
            pausing: None,
            to_ship: VecDeque::new(),
            disk_q: VecDeque::new(),
            disk_due: vec![0; writers],
            committed_q: VecDeque::new(),
            ckpt_q: VecDeque::new(),
            ack_q: VecDeque::new(),
            journaled: CountVector::ZERO,
            chain: 0,
            pending: VecDeque::new(),
            durable: None,
            stats: Stats::default(),
        }
    }

    fn durable_epoch(&self) -> u64 {
        self.durable.as_ref().map_or(0, |c| c.epoch)
    }

    fn committed_view(&self) -> CountVector {
        let mut c = self.epochs.committed_view(&self.agent_committed);
        if self.bug == Bug::ReleaseOnShip {
            c.set(EPOCH_ENTRY, self.epochs.shipped());
        }
        c
    }

    fn released(&mut self, id: usize) -> Result<(), Violation> {
        self.packets[id].released = true;
        self.stats.released += 1;
        let p = &self.packets[id];
        if self.release_checks
            && (p.true_epoch > self.durable_epoch() || !self.journaled.dominates(&p.deps))
        {
            return violation(
                Check::ReleasedNotDurable,
                format!(
                    "t={} packet {id} of epoch {} released, backup durable at epoch {}",
                    self.t,
                    p.true_epoch,
                    self.durable_epoch()
                ),
            );
        }
        Ok(())
    }

    fn release(&mut self) -> Result<(), Violation> {
        let c = self.committed_view();
        let mut out = Vec::new();
        self.nq.release(&c, &mut out);
        for id in out {
            self.released(id)?;
        }
        Ok(())
    }

    /// Delivers what is due on the links.
    fn deliver(&mut self) -> Result<(), Violation> {
        let t = self.t;
        while self.disk_q.front().is_some_and(|d| d.0 <= t) {
            let (_, w, seq) = self.disk_q.pop_front().unwrap();
            self.journaled.raise(w, seq);
            let delay = self.rng.below(4);
            self.committed_q.push_back((t + delay, self.journaled));
        }
        let mut grew = false;
        while let Some(i) = self.committed_q.iter().position(|c| c.0 <= t) {
            let (_, v) = self.committed_q.remove(i).unwrap();
            grew |= self.agent_committed.merge(&v);
        }
        // Checkpoint frames: in order per connection; a broken connection loses its.
        while self.ckpt_q.front().is_some_and(|c| c.0 <= t) {
            let (_, conn, ck) = self.ckpt_q.pop_front().unwrap();
            if conn != self.conn {
                continue;
            }
            if !ck.full && self.chain + 1 != ck.epoch {
                return violation(
                    Check::DeltaWithoutBase,
                    format!(
                        "t={t} delta epoch {} on top of epoch {}",
                        ck.epoch, self.chain
                    ),
                );
            }
            self.chain = ck.epoch;
            self.pending.push_back((conn, ck));
        }
        // The backup: durable once the barrier's writes are journaled.
        while let Some((conn, ck)) = self.pending.front() {
            let writes_in = self.journaled.dominates(&ck.barrier);
            if !writes_in && self.bug != Bug::BackupIgnoresBarrier {
                break;
            }
            let (conn, ck) = (*conn, ck.clone());
            self.pending.pop_front();
            if ck.epoch > self.durable_epoch() {
                let delay = 1 + self.rng.below(5);
                self.ack_q.push_back((t + delay, conn, ck.epoch));
                self.durable = Some(ck);
            }
        }
        while let Some(i) = self.ack_q.iter().position(|a| a.0 <= t) {
            let (_, conn, epoch) = self.ack_q.remove(i).unwrap();
            if conn != self.conn {
                continue;
            }
            self.stats.acks += 1;
            match self.epochs.ack(epoch) {
                Ok(g) => grew |= g,
                Err(e) => return violation(Check::Protocol, format!("t={t} ack: {e}")),
            }
        }
        if grew {
            self.release()?;
        }
        // Packets reaching the agent.
        while self.arriving.front().is_some_and(|a| a.0 <= t) {
            let (_, id) = self.arriving.pop_front().unwrap();
            let mut tag = self.epochs.tag(&self.packets[id].deps);
            if self.bug == Bug::TagPrevious {
                tag.set(EPOCH_ENTRY, self.epochs.open() - 1);
            }
            let c = self.committed_view();
            let flow = FlowId(self.packets[id].flow);
            match self.nq.push(flow, &tag, 100, id, &c) {
                Push::Release(id) => self.released(id)?,
                Push::Held => {}
                Push::Full(_) => {
                    return violation(Check::Protocol, "netqueue full".into());
                }
            }
        }
        Ok(())
    }

    fn guests(&mut self, quiet: bool) {
        if !self.running || quiet {
            return;
        }
        if self.rng.one_in(2) {
            let w = self.rng.below(self.writers as u64) as usize;
            let seq = self.issued.bump(WriterId(w as u8));
            let due = self.disk_due[w].max(self.t + self.rng.below(6));
            self.disk_due[w] = due;
            let at = self.disk_q.partition_point(|d| d.0 <= due);
            self.disk_q.insert(at, (due, w, seq));
        }
        for _ in 0..self.rng.below(3) {
            let id = self.packets.len();
            self.packets.push(Pkt {
                true_epoch: self.stops + 1,
                deps: self.issued,
                flow: self.rng.below(4),
                released: false,
            });
            let due = self.t + self.rng.below(4);
            let at = self.arriving.partition_point(|a| a.0 <= due);
            self.arriving.insert(at, (due, id));
        }
    }

    fn driver(&mut self, faults: bool) -> Result<(), Violation> {
        let t = self.t;
        if let Some(p) = self.pausing.as_ref().filter(|p| p.due <= t) {
            let (ck, fails) = (p.ckpt.clone(), p.fails);
            self.pausing = None;
            if fails {
                self.stats.failed_captures += 1;
                self.epochs.capture_failed();
            } else {
                if self.bug == Bug::ContBeforeOpen {
                    // The epoch opens only now (and with the issued vector of now).
                    let p = self.epochs.begin_pause(&ck.barrier);
                    if p.is_err() {
                        return Ok(());
                    }
                }
                match self.epochs.capture_done(ck.epoch) {
                    Ok(Captured::Ship) => self.to_ship.push_back(ck),
                    Ok(Captured::GiveUp) => {
                        self.stats.given_up += 1;
                        if self.bug == Bug::ShipGivenUp {
                            self.to_ship.push_back(ck);
                        }
                    }
                    Err(e) => return violation(Check::Protocol, format!("t={t} capture: {e}")),
                }
            }
            self.running = true;
        } else if self.pausing.is_none() && self.rng.one_in(4) {
            if let Err(_refused) = self.epochs.may_pause() {
                self.stats.stalls += 1;
            } else {
                self.running = false;
                self.stops += 1;
                self.stats.pauses += 1;
                let true_issued = self.issued;
                let mut issued = self.issued;
                if self.bug == Bug::BarrierOffByOne && issued.get(0) > 0 {
                    issued.set(0, issued.get(0) - 1);
                }
                let pause = if self.bug == Bug::ContBeforeOpen {
                    self.running = true;
                    let mut b = issued;
                    b.set(EPOCH_ENTRY, 0);
                    pipecloud_core::epoch::Pause {
                        epoch: self.epochs.open(),
                        full_ram: true,
                        barrier: b,
                    }
                } else {
                    match self.epochs.begin_pause(&issued) {
                        Ok(p) => p,
                        Err(e) => return violation(Check::Protocol, format!("t={t} pause: {e}")),
                    }
                };
                let fails = faults && self.rng.one_in(300);
                self.pausing = Some(Pausing {
                    ckpt: Ckpt {
                        epoch: pause.epoch,
                        full: pause.full_ram,
                        barrier: pause.barrier,
                        true_issued,
                    },
                    due: t + self.rng.below(3),
                    fails,
                });
            }
        }
        // Shipping in the background.
        if !self.to_ship.is_empty() && !self.rng.one_in(3) {
            let ck = self.to_ship.pop_front().unwrap();
            if let Err(e) = self.epochs.ship_done(ck.epoch) {
                return violation(Check::Protocol, format!("t={t} ship: {e}"));
            }
            let due = self.t + 1 + self.rng.below(6);
            let due = due.max(self.ckpt_q.back().map_or(0, |c| c.0));
            self.ckpt_q.push_back((due, self.conn, ck));
        }
        // The connection breaks.
        if faults && self.rng.one_in(150) {
            self.stats.reconnects += 1;
            self.conn += 1;
            self.chain = 0;
            self.to_ship.clear();
            if let Err(e) = self.epochs.reconnected(self.durable_epoch()) {
                return violation(Check::Protocol, format!("t={t} reconnect: {e}"));
            }
            self.release()?;
        }
        Ok(())
    }

    /// What a disaster now would leave: the backup resumes its durable checkpoint.
    fn disaster_check(&self) -> Result<(), Violation> {
        let d = self.durable_epoch();
        if let Some(ck) = &self.durable {
            let mut truth = ck.true_issued;
            truth.set(EPOCH_ENTRY, 0);
            if ck.barrier != truth {
                return violation(
                    Check::BarrierNotIssued,
                    format!(
                        "t={} epoch {d}: barrier {:?}, issued before its pause {truth:?}",
                        self.t, ck.barrier
                    ),
                );
            }
            if !self.journaled.dominates(&truth) {
                return violation(
                    Check::DiskBehindCheckpoint,
                    format!("t={} epoch {d} resumed without its disk writes", self.t),
                );
            }
        }
        for (id, p) in self.packets.iter().enumerate().filter(|(_, p)| p.released) {
            if p.true_epoch > d {
                return violation(
                    Check::ClientAheadOfCheckpoint,
                    format!(
                        "t={} client saw packet {id} of epoch {}, backup resumes epoch {d}",
                        self.t, p.true_epoch
                    ),
                );
            }
            if !self.journaled.dominates(&p.deps) {
                return violation(
                    Check::DiskBehindCheckpoint,
                    format!("t={} packet {id} depends on writes not journaled", self.t),
                );
            }
        }
        Ok(())
    }
}

fn run_schedule(seed: u64, bug: Bug, release_checks: bool) -> Result<Stats, Violation> {
    let mut sim = Sim::new(seed, bug, release_checks);
    let ticks = 100 + sim.rng.below(400);
    let disaster_at = sim.rng.one_in(2).then(|| sim.rng.below(ticks));
    let faults = sim.rng.one_in(2);
    for t in 0..ticks + 300 {
        sim.t = t;
        let quiet = t >= ticks;
        sim.deliver()?;
        sim.guests(quiet);
        sim.driver(faults && !quiet)?;
        if disaster_at == Some(t) {
            sim.disaster_check()?;
            sim.stats.disasters = 1;
            sim.stats.schedules = 1;
            return Ok(sim.stats);
        }
    }
    sim.disaster_check()?;
    if !sim.epochs.failed() && !sim.nq.is_empty() {
        return violation(
            Check::NotReleased,
            format!(
                "{} packets still held after the guests fell quiet (acked {}, shipped {}, \
                 captured {}, open {}, may_pause {:?}, durable {}, pending {}, committed {:?})",
                sim.nq.len(),
                sim.epochs.acked(),
                sim.epochs.shipped(),
                sim.epochs.captured(),
                sim.epochs.open(),
                sim.epochs.may_pause(),
                sim.durable_epoch(),
                sim.pending.len(),
                sim.agent_committed
            ),
        );
    }
    sim.stats.schedules = 1;
    Ok(sim.stats)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run_many(
    start: u64,
    count: u64,
    bug: Bug,
    release_checks: bool,
) -> Result<Stats, (u64, Violation)> {
    let mut total = Stats::default();
    for seed in start..start.wrapping_add(count) {
        let s = run_schedule(seed, bug, release_checks).map_err(|v| (seed, v))?;
        total.schedules += s.schedules;
        total.disasters += s.disasters;
        total.released += s.released;
        total.pauses += s.pauses;
        total.stalls += s.stalls;
        total.given_up += s.given_up;
        total.failed_captures += s.failed_captures;
        total.reconnects += s.reconnects;
        total.acks += s.acks;
    }
    Ok(total)
}

#[test]
fn model_epoch_schedules() {
    let count = env_u64("PIPECLOUD_MODEL_EPOCH_SCHEDULES", 20_000);
    assert!(
        count > 0,
        "PIPECLOUD_MODEL_EPOCH_SCHEDULES=0 checks nothing"
    );
    let start = env_u64("PIPECLOUD_MODEL_EPOCH_SEED", 0);
    match run_many(start, count, Bug::None, true) {
        Ok(s) => {
            eprintln!(
                "model-epoch: {} schedules, {} disasters, {} packets released, 0 violations \
                 ({} pauses, {} stalled pauses, {} epochs given up, {} failed captures, \
                 {} reconnects, {} acks)",
                s.schedules,
                s.disasters,
                s.released,
                s.pauses,
                s.stalls,
                s.given_up,
                s.failed_captures,
                s.reconnects,
                s.acks
            );
            assert_eq!(s.schedules, count);
            assert!(s.released > 0 && s.disasters > 0 && s.given_up > 0 && s.failed_captures > 0);
        }
        Err((seed, v)) => panic!(
            "epoch model violation at seed {seed}: {:?}: {}\nreplay: PIPECLOUD_MODEL_EPOCH_SEED={seed} \
             PIPECLOUD_MODEL_EPOCH_SCHEDULES=1 cargo test --release -p pipecloud-core --test model_epoch",
            v.check, v.what
        ),
    }
}

/// Each injected bug must be caught within this many schedules.
const MUTATION_BUDGET: u64 = 5_000;

fn assert_caught(bug: Bug, release_checks: bool) -> Check {
    match run_many(0, MUTATION_BUDGET, bug, release_checks) {
        Ok(s) => panic!(
            "injected bug {bug:?} went unnoticed through {} schedules: the model is vacuous",
            s.schedules
        ),
        Err((seed, v)) => {
            eprintln!(
                "model-epoch: injected bug {bug:?} (release checks {release_checks}) caught at seed {seed}: {:?}: {}",
                v.check, v.what
            );
            v.check
        }
    }
}

/// Caught with every check, and by the disaster check alone.
fn assert_caught_by_disaster(bug: Bug, expect: Check) {
    assert_caught(bug, true);
    assert_eq!(assert_caught(bug, false), expect, "{bug:?}");
}

#[test]
fn catches_release_on_ship() {
    assert_caught_by_disaster(Bug::ReleaseOnShip, Check::ClientAheadOfCheckpoint);
}

#[test]
fn catches_tag_with_previous_epoch() {
    assert_caught_by_disaster(Bug::TagPrevious, Check::ClientAheadOfCheckpoint);
}

#[test]
fn catches_barrier_off_by_one() {
    assert_caught_by_disaster(Bug::BarrierOffByOne, Check::BarrierNotIssued);
}

#[test]
fn catches_cont_before_the_epoch_opens() {
    assert_caught_by_disaster(Bug::ContBeforeOpen, Check::ClientAheadOfCheckpoint);
}

#[test]
fn catches_backup_ignoring_the_barrier() {
    assert_caught_by_disaster(Bug::BackupIgnoresBarrier, Check::DiskBehindCheckpoint);
}

#[test]
fn catches_shipping_a_given_up_delta() {
    assert_eq!(
        assert_caught(Bug::ShipGivenUp, true),
        Check::DeltaWithoutBase
    );
}

#[test]
fn schedules_replay_identically() {
    for seed in [1, 42, 4242] {
        let a = run_schedule(seed, Bug::None, true).unwrap();
        let b = run_schedule(seed, Bug::None, true).unwrap();
        assert_eq!(
            (a.released, a.pauses, a.acks),
            (b.released, b.pauses, b.acks)
        );
    }
}
