//! Deterministic model test of the checkpoint epochs of the full-state mode and of
//! switching a running group between disk-only and full-state
//! (`docs/design.md §9, §13`, `pipecloud_core::epoch`).
//!
//! Every schedule is a pure function of one `u64` seed. A group of 1..=3
//! machines (each a writer with a disk) runs on a virtual clock of ticks: the
//! guests write to their disks and emit client-bound packets; packets reach the
//! agent after a random delay (some cross a pause), are tagged with the real
//! [`Epochs::tag_epoch`] (raised monotonically, as the driver raises the pending
//! vectors) and go into the real [`NetQueue`]. The agent's epoch driver switches
//! the group in ([`Epochs::start_seeding`], pre-copy segments, the first pause)
//! and out ([`Epochs::leave`], `Leave` resent on every new connection) at random
//! instants, and while checkpointing stops the guests, calls the real [`Epochs`]
//! (pause, capture — which fails now and then —, ship, ack), and continues them.
//! Frames travel to a backup on one ordered connection (a write issued after a
//! frame was sent arrives no earlier than it). The backup implements §13: an
//! epoch is applied as a delta only on top of its predecessor or of the full
//! segments of its own epoch; it is durable once the disk writes up to its
//! barrier are journaled, then the group is *active* and acked; `Leave` is
//! persisted (not active, the period's pending epochs and chain dropped) before
//! its ack; the base volumes are applied from the journal in the background, never
//! beyond the last acked barrier while active and not at all while a period is
//! being seeded (a checkpoint frame arrived since the group was last disk-only).
//! The connection breaks now and then (frames and acks in flight are lost, the
//! agent reconnects with the backup's acknowledged epoch; seeding is aborted,
//! `Leave` resent), and the agent is killed and restarted now and then (its held
//! packets are dropped, fail-closed; the new one starts disk-only or switches in
//! again; the backup drops the old run's pending epochs, an assumption stated in
//! docs/design.md §9).
//!
//! The model keeps the truth the protocol never sees: the pause before which each
//! packet was really emitted (`1 +` the number of stops before it) and the writes
//! really issued before each stop. Checks, "what a failover now would show":
//!
//! * at every release (release checks) and at a disaster (a random tick in half
//!   of the schedules, in every phase), if the backup is active it resumes its
//!   last acked checkpoint: every packet released so far was emitted no later
//!   than that checkpoint's pause (client view ⊆ resumed machine), its writes are
//!   journaled, the checkpoint's disk is at its barrier (which equals the writes
//!   really issued before its pause, is journaled, and the base volumes are not
//!   beyond it); if not active it fails over to the disk state: every released
//!   packet's disk dependencies are journaled (CV ⊆ SV);
//! * the backup never gets a delta epoch without its base, nor an epoch number
//!   it acknowledged before;
//! * without a disaster or a failed capture, everything is released once the
//!   guests fall quiet (liveness).
//!
//! Injected bugs (in the model's driver or backup, never in the product) that the
//! checks must catch, and variants that look wrong but are safe: see [`Bug`],
//! `CAUGHT` and `HARMLESS`; `injected_bugs_are_caught` prints the tally.
//!
//! What the model found in `Epochs` (fixed there): a restarted agent that came up
//! disk-only released output on the disk rule while the backup would still resume
//! its predecessor's checkpoint (now: a disk-only start leaves first); a seeding
//! aborted by a lost connection left the backup's volumes frozen for good (now:
//! it leaves); and a reconnection after a period's first pause but before its
//! first ack continued with a full epoch whose pause came before anything froze
//! the backup's volumes, so writes after that pause were applied beyond its
//! barrier (seed 3146; now: the period is abandoned with a `Leave`). Not fixed,
//! shown by `Bug::FirstEpochFull`: a group that *starts* checkpointing with a full
//! first epoch (`Epochs::new`, issue 21) has the same hole; starting disk-only and
//! switching in (the pre-copy's first segment freezes the volumes before the
//! pause) closes it. The model assumes the link is ordered: a write issued after
//! a frame was handed to the connection arrives after it (the driver must not let
//! writes overtake the pre-copy's first segment).
//!
//! Environment: `PIPECLOUD_MODEL_EPOCH_SCHEDULES` (default 20 000),
//! `PIPECLOUD_MODEL_EPOCH_SEED` (first seed, default 0).

#[path = "model/rng.rs"]
#[allow(dead_code)]
mod rng;

use pipecloud_core::epoch::{Captured, EpochLimits, Epochs, Phase};
use pipecloud_core::netqueue::{FlowId, NetQueue, NetQueueLimits, Push};
use pipecloud_core::{CountVector, WriterId, EPOCH_ENTRY};
use rng::Rng;
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
    /// A restarted agent numbers its epochs from 1 again (does not learn the
    /// backup's acknowledged epoch).
    RestartFromOne,
    /// Switch-in (1): the tag rises to the open epoch at `start_seeding`, and the
    /// committed view's epoch entry follows the open epoch until the period's
    /// first epoch is acked ("the backup fails over disk-only until then"), so
    /// output emitted after the first pause is released on the disk rule.
    SeedDiskRuleUntilAck,
    /// Switch-out (2): the backup acks `Leave` before persisting it.
    LeaveAckBeforePersist,
    /// Switch-out (3), harmless: the backup keeps its chain and pending epochs at
    /// `Leave`. A `Leave` consumes its epoch number `E` (never captured), so the
    /// next period's first epoch, `E + 1` or above, never continues as a delta a
    /// chain the old period left at `E - 1` or below, a pre-copy always starts
    /// with a full segment, and the old period's pending epochs are below the
    /// acknowledged `E`: the reset is defence in depth.
    LeaveKeepsChain,
    /// Switch-in, harmless: the tag rises to the seeding epoch `S` at
    /// `start_seeding` and the committed view's epoch entry to `S` while seeding
    /// (the brief's variant of (1)). Output tagged `S` was seen before the pause
    /// of `S`, so checkpoint `S` remembers it, and the tag rises to `S + 1` in that
    /// pause: safe.
    SeedTagRaisedViewOpen,
    /// Switch-in (4): after the first pause of a switch-in the agent keeps the
    /// seeding tag (none) until the next pause: output of the first checkpointed
    /// epoch is released on the disk rule.
    TagOldAfterSwitchIn,
    /// Switch-in (5): the backup applies its volumes while a period is seeded.
    BackupNoFreeze,
    /// Switch-out (6): the agent releases the `Leaving` output at `leave()`, before
    /// the backup acked the `Leave`.
    ReleaseLeavingEarly,
    /// Start (7): the agent starts (and restarts) in checkpoint mode the issue-21
    /// way, with a full first epoch and no pre-copy, instead of switching in.
    FirstEpochFull,
    /// Harmless: the backup ends a seeded period (volumes no longer frozen) when
    /// the connection goes away before the period's first ack. Safe because the
    /// agent abandons such a period with a `Leave` (`Epochs::reconnected`): no
    /// epoch of it is captured on the new connection. (Before that fix, seed 3146
    /// showed a full epoch paused before its first frame froze the volumes, with
    /// writes applied beyond its barrier — even with this flag off, as the
    /// freezing segment was lost with the connection.)
    BackupUnfreezesOnClose,
    /// Restart (8): a restarted agent that starts disk-only does not send the
    /// `Leave` (the behaviour before the fix in `Epochs::reconnected`).
    RestartOffSkipsLeave,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    ReleasedNotDurable,
    ClientAheadOfCheckpoint,
    ClientAheadOfDisk,
    DiskBehindCheckpoint,
    DiskAheadOfCheckpoint,
    BarrierNotIssued,
    DeltaWithoutBase,
    EpochReused,
    NotReleased,
    VolumesStuck,
    Protocol,
}

#[derive(Debug)]
struct Violation {
    check: Check,
    what: String,
}

struct Pkt {
    /// It was emitted before the `stop_index`-th stop of the guests (and after
    /// the one before): checkpoints of that pause and later remember it.
    stop_index: u64,
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
    /// Which stop of the guests this checkpoint was taken at (the truth, independent
    /// of epoch numbers, which restart above the backup's after an agent restart).
    stop_index: u64,
}

/// What travels agent → backup besides the disk writes.
#[derive(Clone)]
enum Frame {
    /// A pre-copy segment of `epoch` (round 1 sends the whole RAM).
    Segment {
        epoch: u64,
        full: bool,
    },
    Epoch(Box<Ckpt>),
    Leave(u64),
}

struct Pausing {
    ckpt: Ckpt,
    due: u64,
    fails: bool,
}

/// Where the group is, for the disaster tally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    Off,
    Seeding,
    FirstUnacked,
    On,
    Leaving,
    AfterLeave,
}

#[derive(Default)]
struct Stats {
    schedules: u64,
    disasters: [u64; 6],
    released: u64,
    pauses: u64,
    stalls: u64,
    given_up: u64,
    failed_captures: u64,
    reconnects: u64,
    reconnects_seeding: u64,
    reconnects_leaving: u64,
    restarts: u64,
    acks: u64,
    switch_ins: u64,
    seeding_aborted: u64,
    leaves: u64,
    leaves_acked: u64,
}

impl Stats {
    fn add(&mut self, s: &Stats) {
        self.schedules += s.schedules;
        for (a, b) in self.disasters.iter_mut().zip(s.disasters) {
            *a += b;
        }
        self.released += s.released;
        self.pauses += s.pauses;
        self.stalls += s.stalls;
        self.given_up += s.given_up;
        self.failed_captures += s.failed_captures;
        self.reconnects += s.reconnects;
        self.reconnects_seeding += s.reconnects_seeding;
        self.reconnects_leaving += s.reconnects_leaving;
        self.restarts += s.restarts;
        self.acks += s.acks;
        self.switch_ins += s.switch_ins;
        self.seeding_aborted += s.seeding_aborted;
        self.leaves += s.leaves;
        self.leaves_acked += s.leaves_acked;
    }
}

struct Sim {
    rng: Rng,
    bug: Bug,
    release_checks: bool,
    t: u64,
    writers: usize,
    /// Switches at random instants (else: checkpointing from the start, as a
    /// group configured `mode = "checkpoint"`).
    switching: bool,
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
    /// The epoch entry of the local pending vectors (raised, never lowered).
    tag_floor: u64,
    conn: u64,
    pausing: Option<Pausing>,
    to_ship: VecDeque<Ckpt>,
    /// Pre-copy rounds still to send while seeding.
    rounds_left: u64,
    /// The next round is the first (the whole RAM).
    first_round: bool,
    /// The first epoch of the current (or last) period.
    period_first: Option<u64>,
    left_once: bool,
    /// `RestartOffSkipsLeave`: this run never sends its `Leave`.
    skip_leave: bool,
    /// The connection and epoch of the last `Leave` sent.
    leave_sent: (u64, u64),
    // In flight to/from the backup (one ordered connection).
    disk_q: VecDeque<(u64, usize, u64)>,
    disk_due: Vec<u64>,
    /// Writes issued from now on arrive no earlier than the last frame sent.
    link_floor: u64,
    committed_q: VecDeque<(u64, CountVector)>,
    frame_q: VecDeque<(u64, u64, Frame)>,
    ack_q: VecDeque<(u64, u64, u64)>,
    // The backup.
    journaled: CountVector,
    applied: CountVector,
    /// Last epoch received on the current connection (0: none).
    chain: u64,
    /// Epoch whose full segment arrived on the current connection.
    seeded: Option<u64>,
    pending: VecDeque<(u64, Ckpt)>,
    /// Largest epoch acknowledged (a checkpoint's or a `Leave`'s).
    backup_acked: u64,
    /// Last acknowledged checkpoint.
    durable: Option<Ckpt>,
    /// Failover resumes `durable` (else the disk state).
    active: bool,
    /// A checkpoint frame arrived since the group was last disk-only.
    frozen: bool,
    /// `LeaveAckBeforePersist`: a `Leave` acked, persisted at this tick.
    leave_persist: Option<(u64, u64)>,
    stats: Stats,
}

fn violation<T>(check: Check, what: String) -> Result<T, Violation> {
    Err(Violation { check, what })
}

fn protocol<T, E: std::fmt::Display>(t: u64, what: &str, e: E) -> Result<T, Violation> {
    violation(Check::Protocol, format!("t={t} {what}: {e}"))
}

fn new_netqueue() -> NetQueue<usize> {
    NetQueue::new(NetQueueLimits {
        max_packets: 1 << 20,
        max_bytes: 1 << 30,
    })
}

impl Sim {
    fn new(seed: u64, bug: Bug, release_checks: bool) -> Self {
        let mut rng = Rng::new(seed);
        let writers = 1 + rng.below(3) as usize;
        let max_unacked = 1 + rng.below(8);
        let switching = rng.chance(2, 3);
        let mut epochs = if bug == Bug::FirstEpochFull && !switching {
            Epochs::new(EpochLimits { max_unacked })
        } else {
            Epochs::new_off(EpochLimits { max_unacked })
        };
        epochs.reconnected(0).expect("first connection");
        Sim {
            rng,
            bug,
            release_checks,
            t: 0,
            writers,
            switching,
            issued: CountVector::ZERO,
            running: true,
            stops: 0,
            packets: Vec::new(),
            arriving: VecDeque::new(),
            epochs,
            nq: new_netqueue(),
            agent_committed: CountVector::ZERO,
            tag_floor: 0,
            conn: 1,
            pausing: None,
            to_ship: VecDeque::new(),
            rounds_left: 0,
            first_round: false,
            period_first: None,
            left_once: false,
            leave_sent: (0, 0),
            skip_leave: false,
            disk_q: VecDeque::new(),
            disk_due: vec![0; writers],
            link_floor: 0,
            committed_q: VecDeque::new(),
            frame_q: VecDeque::new(),
            ack_q: VecDeque::new(),
            journaled: CountVector::ZERO,
            applied: CountVector::ZERO,
            chain: 0,
            seeded: None,
            pending: VecDeque::new(),
            backup_acked: 0,
            durable: None,
            active: false,
            frozen: false,
            leave_persist: None,
            stats: Stats::default(),
        }
    }

    fn durable_stop(&self) -> u64 {
        self.durable.as_ref().map_or(0, |c| c.stop_index)
    }

    fn at(&self) -> At {
        match self.epochs.phase() {
            Phase::Off if self.left_once => At::AfterLeave,
            Phase::Off => At::Off,
            Phase::Seeding { .. } => At::Seeding,
            Phase::On if self.period_first.is_some_and(|s| self.epochs.acked() < s) => {
                At::FirstUnacked
            }
            Phase::On => At::On,
            Phase::Leaving { .. } => At::Leaving,
        }
    }

    fn committed_view(&self) -> CountVector {
        let mut c = self.epochs.committed_view(&self.agent_committed);
        let phase = self.epochs.phase();
        match self.bug {
            Bug::ReleaseOnShip => c.set(EPOCH_ENTRY, self.epochs.shipped()),
            Bug::SeedDiskRuleUntilAck => {
                let first_unacked = self.period_first.is_some_and(|s| self.epochs.acked() < s);
                if matches!(phase, Phase::Seeding { .. }) || (phase == Phase::On && first_unacked) {
                    c.raise(EPOCH_ENTRY, self.epochs.open());
                }
            }
            Bug::SeedTagRaisedViewOpen => {
                if let Phase::Seeding { epoch } = phase {
                    c.raise(EPOCH_ENTRY, epoch);
                }
            }
            Bug::ReleaseLeavingEarly => {
                if let Phase::Leaving { epoch } = phase {
                    c.raise(EPOCH_ENTRY, epoch);
                }
            }
            _ => {}
        }
        c
    }

    /// The epoch a packet seen now is tagged with (the driver raises the pending
    /// vectors' epoch entry to [`Epochs::tag_epoch`], never lowers it).
    fn tag_epoch(&mut self) -> u64 {
        if self.skip_leave {
            return self.tag_floor;
        }
        let mut e = self.epochs.tag_epoch();
        let phase = self.epochs.phase();
        match self.bug {
            Bug::TagPrevious if e > 0 => e -= 1,
            Bug::SeedDiskRuleUntilAck | Bug::SeedTagRaisedViewOpen
                if matches!(phase, Phase::Seeding { .. }) =>
            {
                e = self.epochs.open()
            }
            Bug::TagOldAfterSwitchIn
                if phase == Phase::On
                    && self
                        .period_first
                        .is_some_and(|s| self.epochs.open() == s + 1) =>
            {
                return self.tag_floor.min(e);
            }
            _ => {}
        }
        self.tag_floor = self.tag_floor.max(e);
        self.tag_floor
    }

    /// What a failover now shows the client, for one released packet.
    fn check_packet(&self, id: usize, check: Check) -> Result<(), Violation> {
        let p = &self.packets[id];
        if self.active && p.stop_index > self.durable_stop() {
            let check = if check == Check::ReleasedNotDurable {
                check
            } else {
                Check::ClientAheadOfCheckpoint
            };
            return violation(
                check,
                format!(
                    "t={} client saw packet {id} of stop {}, backup resumes epoch {} of stop {} ({:?})",
                    self.t,
                    p.stop_index,
                    self.durable.as_ref().map_or(0, |c| c.epoch),
                    self.durable_stop(),
                    self.at()
                ),
            );
        }
        if !self.journaled.dominates(&p.deps) {
            let check = if check == Check::ReleasedNotDurable {
                check
            } else if self.active {
                Check::DiskBehindCheckpoint
            } else {
                Check::ClientAheadOfDisk
            };
            return violation(
                check,
                format!(
                    "t={} packet {id} depends on writes not journaled (active {})",
                    self.t, self.active
                ),
            );
        }
        Ok(())
    }

    fn released(&mut self, id: usize) -> Result<(), Violation> {
        self.packets[id].released = true;
        self.stats.released += 1;
        if self.release_checks {
            self.check_packet(id, Check::ReleasedNotDurable)?;
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

    fn send(&mut self, frame: Frame) {
        let due = self.t + 1 + self.rng.below(6);
        let due = due.max(self.frame_q.back().map_or(0, |c| c.0));
        self.link_floor = self.link_floor.max(due);
        self.frame_q.push_back((due, self.conn, frame));
    }

    /// The connection breaks: what was in flight on it is lost, the backup's
    /// per-connection staging with it.
    fn connection_lost(&mut self) {
        self.conn += 1;
        self.to_ship.clear();
        self.chain = 0;
        self.seeded = None;
        if self.bug == Bug::BackupUnfreezesOnClose && !self.active {
            self.frozen = false;
        }
    }

    /// The backup records durably that the group is disk-only again.
    fn persist_leave(&mut self, epoch: u64) {
        self.active = false;
        self.frozen = false;
        self.backup_acked = self.backup_acked.max(epoch);
    }

    /// The backup takes one frame of the current connection.
    fn backup_frame(&mut self, conn: u64, frame: Frame) -> Result<(), Violation> {
        let t = self.t;
        let reused = |epoch: u64, acked: u64| {
            violation(
                Check::EpochReused,
                format!("t={t} epoch {epoch} shipped, the backup acknowledged {acked}"),
            )
        };
        match frame {
            Frame::Segment { epoch, full } => {
                if epoch <= self.backup_acked {
                    return reused(epoch, self.backup_acked);
                }
                if self.bug != Bug::BackupNoFreeze {
                    self.frozen = true;
                }
                if full {
                    self.seeded = Some(epoch);
                } else if self.seeded != Some(epoch) {
                    return violation(
                        Check::DeltaWithoutBase,
                        format!("t={t} a delta segment of epoch {epoch} without its full one"),
                    );
                }
            }
            Frame::Epoch(ck) => {
                if !ck.full && self.chain + 1 != ck.epoch && self.seeded != Some(ck.epoch) {
                    return violation(
                        Check::DeltaWithoutBase,
                        format!(
                            "t={t} delta epoch {} on top of epoch {} (seeded {:?})",
                            ck.epoch, self.chain, self.seeded
                        ),
                    );
                }
                if ck.epoch <= self.backup_acked {
                    return reused(ck.epoch, self.backup_acked);
                }
                if self.bug != Bug::BackupNoFreeze {
                    self.frozen = true;
                }
                // A restarted agent starts over: its pending commits from here are superseded.
                self.pending.retain(|(_, p)| p.epoch < ck.epoch);
                self.chain = ck.epoch;
                self.pending.push_back((conn, *ck));
            }
            Frame::Leave(epoch) => {
                if self.bug != Bug::LeaveKeepsChain {
                    self.pending.clear();
                    self.chain = 0;
                    self.seeded = None;
                }
                if self.bug == Bug::LeaveAckBeforePersist {
                    self.leave_persist = Some((t + 1 + self.rng.below(4), epoch));
                } else {
                    self.persist_leave(epoch);
                }
                let delay = 1 + self.rng.below(5);
                self.ack_q.push_back((t + delay, conn, epoch));
            }
        }
        Ok(())
    }

    /// The backup applies its base volumes from the journal (§13, "Base volumes").
    fn backup_apply(&mut self) {
        let target = if self.active {
            let barrier = self
                .durable
                .as_ref()
                .map(|c| c.barrier)
                .unwrap_or(CountVector::ZERO);
            let mut c = self.journaled;
            for w in 0..self.writers {
                c.set(w, c.get(w).min(barrier.get(w)));
            }
            c
        } else if self.frozen {
            self.applied
        } else {
            self.journaled
        };
        if target.dominates(&self.applied) {
            self.applied = target;
        }
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
        if let Some((_, epoch)) = self.leave_persist.filter(|l| l.0 <= t) {
            self.leave_persist = None;
            self.persist_leave(epoch);
        }
        // Frames: in order per connection; a broken connection loses its.
        while self.frame_q.front().is_some_and(|c| c.0 <= t) {
            let (_, conn, frame) = self.frame_q.pop_front().unwrap();
            if conn == self.conn {
                self.backup_frame(conn, frame)?;
            }
        }
        // The backup: durable once the barrier's writes are journaled, then acked.
        while let Some((conn, ck)) = self.pending.front() {
            let writes_in = self.journaled.dominates(&ck.barrier);
            if !writes_in && self.bug != Bug::BackupIgnoresBarrier {
                break;
            }
            let (conn, ck) = (*conn, ck.clone());
            self.pending.pop_front();
            if ck.epoch > self.backup_acked {
                if self.release_checks && !ck.barrier.dominates(&self.applied) {
                    return violation(
                        Check::DiskAheadOfCheckpoint,
                        format!(
                            "t={t} epoch {} acked, but the volumes are applied to {:?}, beyond its barrier {:?}",
                            ck.epoch, self.applied, ck.barrier
                        ),
                    );
                }
                let delay = 1 + self.rng.below(5);
                self.ack_q.push_back((t + delay, conn, ck.epoch));
                self.backup_acked = ck.epoch;
                self.durable = Some(ck);
                self.active = true;
            }
        }
        if self.rng.chance(1, 2) {
            self.backup_apply();
        }
        while let Some(i) = self.ack_q.iter().position(|a| a.0 <= t) {
            let (_, conn, epoch) = self.ack_q.remove(i).unwrap();
            if conn != self.conn {
                continue;
            }
            self.stats.acks += 1;
            let leaving = self.epochs.leave_pending().is_some();
            match self.epochs.ack(epoch) {
                Ok(g) => grew |= g,
                Err(e) => return protocol(t, "ack", e),
            }
            if leaving && self.epochs.phase() == Phase::Off {
                self.stats.leaves_acked += 1;
                self.left_once |= self.period_first.is_some();
            }
        }
        if grew {
            self.release()?;
        }
        // Packets reaching the agent.
        while self.arriving.front().is_some_and(|a| a.0 <= t) {
            let (_, id) = self.arriving.pop_front().unwrap();
            let mut tag = self.packets[id].deps;
            tag.set(EPOCH_ENTRY, self.tag_epoch());
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
        if self.rng.chance(1, 2) {
            let w = self.rng.below(self.writers as u64) as usize;
            let seq = self.issued.bump(WriterId(w as u8));
            let due = self.disk_due[w]
                .max(self.t + self.rng.below(6))
                .max(self.link_floor);
            self.disk_due[w] = due;
            let at = self.disk_q.partition_point(|d| d.0 <= due);
            self.disk_q.insert(at, (due, w, seq));
        }
        for _ in 0..self.rng.below(3) {
            let id = self.packets.len();
            self.packets.push(Pkt {
                stop_index: self.stops + 1,
                deps: self.issued,
                flow: self.rng.below(4),
                released: false,
            });
            let due = self.t + self.rng.below(4);
            let at = self.arriving.partition_point(|a| a.0 <= due);
            self.arriving.insert(at, (due, id));
        }
    }

    /// Stops the guests and begins the pause of the open epoch.
    fn pause(&mut self, faults: bool) -> Result<(), Violation> {
        let t = self.t;
        if let Err(_refused) = self.epochs.may_pause() {
            self.stats.stalls += 1;
            return Ok(());
        }
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
                Err(e) => return protocol(t, "pause", e),
            }
        };
        let fails = faults && self.rng.chance(1, 300);
        self.pausing = Some(Pausing {
            ckpt: Ckpt {
                epoch: pause.epoch,
                full: pause.full_ram,
                barrier: pause.barrier,
                true_issued,
                stop_index: self.stops,
            },
            due: t + self.rng.below(3),
            fails,
        });
        self.release()
    }

    /// A (re)started agent's epoch state, synchronised on connection `conn`.
    fn restart_agent(&mut self) -> Result<(), Violation> {
        let limits = EpochLimits {
            max_unacked: 1 + self.rng.below(8),
        };
        let in_checkpoint_mode = !self.switching || self.rng.chance(1, 2);
        self.epochs = if self.bug == Bug::FirstEpochFull && in_checkpoint_mode {
            Epochs::new(limits)
        } else {
            Epochs::new_off(limits)
        };
        self.tag_floor = 0;
        self.rounds_left = 0;
        self.period_first = None;
        let backup_acked = if self.bug == Bug::RestartFromOne {
            0
        } else {
            self.backup_acked
        };
        if let Err(e) = self.epochs.reconnected(backup_acked) {
            return protocol(self.t, "restart", e);
        }
        // Before the fix the new run simply started disk-only: it stays leaving
        // here, but sends no Leave and tags as disk-only.
        self.skip_leave =
            self.bug == Bug::RestartOffSkipsLeave && self.epochs.leave_pending().is_some();
        Ok(())
    }

    fn driver(&mut self, faults: bool, quiet: bool) -> Result<(), Violation> {
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
                    Err(e) => return protocol(t, "capture", e),
                }
            }
            self.running = true;
        } else if self.pausing.is_none() {
            match self.epochs.phase() {
                Phase::Off => {
                    // Falling quiet: a switching group stays where it is.
                    let switch_in = if self.switching {
                        !quiet && self.rng.chance(1, 40)
                    } else {
                        true
                    };
                    if switch_in && !self.epochs.failed() {
                        match self.epochs.start_seeding() {
                            Ok(s) => {
                                self.stats.switch_ins += 1;
                                self.period_first = Some(s);
                                self.rounds_left = 1 + self.rng.below(3);
                                self.first_round = true;
                            }
                            Err(e) => return protocol(t, "start_seeding", e),
                        }
                    }
                }
                Phase::Seeding { epoch } => {
                    if faults && self.rng.chance(1, 150) {
                        // A guest's RAM could not be read: the switch in is abandoned
                        // with a Leave (the backup drops the segments).
                        if let Err(e) = self.epochs.leave() {
                            return protocol(t, "leave while seeding", e);
                        }
                        self.stats.seeding_aborted += 1;
                        self.rounds_left = 0;
                    } else if self.rounds_left > 0 {
                        if self.rng.chance(1, 2) {
                            let full = self.first_round;
                            self.first_round = false;
                            self.send(Frame::Segment { epoch, full });
                            self.rounds_left -= 1;
                        }
                    } else if self.rng.chance(1, 4) {
                        self.pause(faults)?;
                    }
                }
                Phase::On => {
                    if self.switching
                        && !quiet
                        && self.rng.chance(1, 60)
                        && self.to_ship.is_empty()
                        && !self.epochs.failed()
                    {
                        match self.epochs.leave() {
                            Ok(_) => {
                                self.stats.leaves += 1;
                                self.send_leave();
                                self.release()?;
                            }
                            Err(e) => return protocol(t, "leave", e),
                        }
                    } else if self.rng.chance(1, 4) {
                        self.pause(faults)?;
                    }
                }
                Phase::Leaving { .. } => {}
            }
        }
        // Shipping in the background.
        if !self.to_ship.is_empty() && !self.rng.chance(1, 3) {
            let ck = self.to_ship.pop_front().unwrap();
            if let Err(e) = self.epochs.ship_done(ck.epoch) {
                return protocol(t, "ship", e);
            }
            self.send(Frame::Epoch(Box::new(ck)));
        }
        // The agent is killed and restarted: its held packets are gone (fail-closed),
        // a new epoch state learns the backup's acked epoch on connecting.
        if faults && self.rng.chance(1, 400) {
            self.stats.restarts += 1;
            self.nq = new_netqueue();
            self.arriving.clear();
            self.pausing = None;
            self.running = true;
            self.connection_lost();
            // ASSUMPTION (docs/design.md §9): the backup drops a restarted agent's
            // pending (committed, not yet durable) epochs when it connects, so none
            // of them becomes durable under a number the new run uses.
            self.pending.clear();
            self.restart_agent()?;
        }
        // The connection breaks.
        if faults && self.rng.chance(1, 150) {
            self.stats.reconnects += 1;
            match self.epochs.phase() {
                Phase::Seeding { .. } => self.stats.reconnects_seeding += 1,
                Phase::Leaving { .. } => self.stats.reconnects_leaving += 1,
                _ => {}
            }
            let seeding = matches!(self.epochs.phase(), Phase::Seeding { .. });
            self.connection_lost();
            if let Err(e) = self.epochs.reconnected(self.backup_acked) {
                return protocol(t, "reconnect", e);
            }
            if seeding && !matches!(self.epochs.phase(), Phase::Seeding { .. }) {
                self.stats.seeding_aborted += 1;
            }
            if !matches!(self.epochs.phase(), Phase::Seeding { .. }) {
                self.rounds_left = 0;
            }
            self.release()?;
        }
        self.send_leave();
        Ok(())
    }

    /// While leaving, the driver sends the `Leave` once on each connection.
    fn send_leave(&mut self) {
        if self.skip_leave {
            return;
        }
        if let Some(e) = self.epochs.leave_pending() {
            if self.leave_sent != (self.conn, e) {
                self.leave_sent = (self.conn, e);
                self.send(Frame::Leave(e));
            }
        }
    }

    /// What a disaster now would leave: the backup resumes its last acked
    /// checkpoint if active, else fails over to its disk state.
    fn disaster_check(&self) -> Result<(), Violation> {
        if let Some(ck) = self.durable.as_ref().filter(|_| self.active) {
            let d = ck.epoch;
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
            if !ck.barrier.dominates(&self.applied) {
                return violation(
                    Check::DiskAheadOfCheckpoint,
                    format!(
                        "t={} epoch {d} resumed, but the volumes are applied to {:?}, beyond its barrier {:?}",
                        self.t, self.applied, ck.barrier
                    ),
                );
            }
        }
        for (id, _) in self.packets.iter().enumerate().filter(|(_, p)| p.released) {
            self.check_packet(id, Check::ClientAheadOfCheckpoint)?;
        }
        Ok(())
    }
}

fn run_schedule(seed: u64, bug: Bug, release_checks: bool) -> Result<Stats, Violation> {
    let mut sim = Sim::new(seed, bug, release_checks);
    let ticks = 100 + sim.rng.below(400);
    let disaster_at = sim.rng.chance(1, 2).then(|| sim.rng.below(ticks));
    let faults = sim.rng.chance(1, 2);
    for t in 0..ticks + 300 {
        sim.t = t;
        let quiet = t >= ticks;
        sim.deliver()?;
        sim.guests(quiet);
        sim.driver(faults && !quiet, quiet)?;
        if disaster_at == Some(t) {
            sim.disaster_check()?;
            sim.stats.disasters[sim.at() as usize] = 1;
            sim.stats.schedules = 1;
            return Ok(sim.stats);
        }
    }
    sim.disaster_check()?;
    if !sim.epochs.failed() && !sim.nq.is_empty() {
        return violation(
            Check::NotReleased,
            format!(
                "{} packets still held after the guests fell quiet (phase {:?}, acked {}, shipped {}, \
                 captured {}, open {}, may_pause {:?}, backup acked {}, pending {}, committed {:?})",
                sim.nq.len(),
                sim.epochs.phase(),
                sim.epochs.acked(),
                sim.epochs.shipped(),
                sim.epochs.captured(),
                sim.epochs.open(),
                sim.epochs.may_pause(),
                sim.backup_acked,
                sim.pending.len(),
                sim.agent_committed
            ),
        );
    }
    if !sim.epochs.failed() && sim.epochs.phase() == Phase::Off && sim.applied != sim.journaled {
        return violation(
            Check::VolumesStuck,
            format!(
                "the group is disk-only and quiet, but the backup's volumes are at {:?}, the journal at {:?} \
                 (frozen {}, active {})",
                sim.applied, sim.journaled, sim.frozen, sim.active
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
        total.add(&s);
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
            let d = s.disasters;
            eprintln!(
                "model-epoch: {} schedules, {} disasters (off {}, seeding {}, first epoch unacked {}, \
                 on {}, leaving {}, after leave {}), {} packets released, 0 violations \
                 ({} pauses, {} stalled pauses, {} epochs given up, {} failed captures, \
                 {} reconnects ({} while seeding, {} while leaving), {} agent restarts, {} acks, \
                 {} switch-ins, {} seedings aborted, {} leaves, {} leaves acked)",
                s.schedules,
                d.iter().sum::<u64>(),
                d[At::Off as usize],
                d[At::Seeding as usize],
                d[At::FirstUnacked as usize],
                d[At::On as usize],
                d[At::Leaving as usize],
                d[At::AfterLeave as usize],
                s.released,
                s.pauses,
                s.stalls,
                s.given_up,
                s.failed_captures,
                s.reconnects,
                s.reconnects_seeding,
                s.reconnects_leaving,
                s.restarts,
                s.acks,
                s.switch_ins,
                s.seeding_aborted,
                s.leaves,
                s.leaves_acked
            );
            assert_eq!(s.schedules, count);
            if count >= 1000 {
                assert!(
                    s.released > 0
                        && d.iter().all(|&n| n > 0)
                        && s.given_up > 0
                        && s.failed_captures > 0
                        && s.restarts > 0
                        && s.reconnects_seeding > 0
                        && s.reconnects_leaving > 0
                        && s.seeding_aborted > 0
                        && s.leaves_acked > 0,
                    "a phase or a fault was never exercised: the model is vacuous"
                );
            }
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

/// Every injected bug, and what the disaster check alone reports for it (`None`:
/// caught with the release checks only, by a check of the backup's input).
const CAUGHT: &[(Bug, Option<Check>)] = &[
    (Bug::ReleaseOnShip, Some(Check::ClientAheadOfCheckpoint)),
    (Bug::TagPrevious, Some(Check::ClientAheadOfCheckpoint)),
    (Bug::BarrierOffByOne, Some(Check::BarrierNotIssued)),
    (Bug::ContBeforeOpen, Some(Check::ClientAheadOfCheckpoint)),
    (Bug::BackupIgnoresBarrier, Some(Check::DiskBehindCheckpoint)),
    (Bug::ShipGivenUp, None),
    (Bug::RestartFromOne, None),
    (
        Bug::SeedDiskRuleUntilAck,
        Some(Check::ClientAheadOfCheckpoint),
    ),
    (
        Bug::LeaveAckBeforePersist,
        Some(Check::ClientAheadOfCheckpoint),
    ),
    (
        Bug::TagOldAfterSwitchIn,
        Some(Check::ClientAheadOfCheckpoint),
    ),
    (Bug::BackupNoFreeze, Some(Check::DiskAheadOfCheckpoint)),
    (
        Bug::ReleaseLeavingEarly,
        Some(Check::ClientAheadOfCheckpoint),
    ),
    (Bug::FirstEpochFull, Some(Check::DiskAheadOfCheckpoint)),
    (
        Bug::RestartOffSkipsLeave,
        Some(Check::ClientAheadOfCheckpoint),
    ),
];

/// Schedules each harmless variant runs without being caught.
const HARMLESS_BUDGET: u64 = 2_000;

/// Variants that look wrong but are safe (see each [`Bug`]): never caught.
const HARMLESS: &[Bug] = &[
    Bug::LeaveKeepsChain,
    Bug::SeedTagRaisedViewOpen,
    Bug::BackupUnfreezesOnClose,
];

/// The first seed below the budget at which `bug` is caught, and how.
fn first_catch(bug: Bug, release_checks: bool) -> Option<(u64, Violation)> {
    run_many(0, MUTATION_BUDGET, bug, release_checks).err()
}

/// Each injected bug is caught with every check, and (where it shows to a client
/// or in a resumed disk) by the disaster check alone, with the expected check.
#[test]
fn injected_bugs_are_caught() {
    let mut failures = Vec::new();
    let mut tally = Vec::new();
    for &(bug, by_disaster) in CAUGHT {
        let Some((seed, v)) = first_catch(bug, true) else {
            failures.push(format!(
                "{bug:?} went unnoticed through {MUTATION_BUDGET} schedules"
            ));
            continue;
        };
        eprintln!(
            "model-epoch: injected bug {bug:?} (release checks true) caught at seed {seed}: {:?}: {}",
            v.check, v.what
        );
        let mut caught = format!("{bug:?} at seed {seed}");
        if let Some(expect) = by_disaster {
            match first_catch(bug, false) {
                None => failures.push(format!("{bug:?} escaped the disaster check alone")),
                Some((seed, v)) => {
                    eprintln!(
                        "model-epoch: injected bug {bug:?} (release checks false) caught at seed {seed}: {:?}: {}",
                        v.check, v.what
                    );
                    if v.check != expect {
                        failures.push(format!(
                            "{bug:?}: the disaster check reported {:?}, not {expect:?}",
                            v.check
                        ));
                    }
                    caught = format!("{caught} ({seed} by a disaster)");
                }
            }
        }
        tally.push(caught);
    }
    for &bug in HARMLESS {
        if let Err((seed, v)) = run_many(0, HARMLESS_BUDGET, bug, true) {
            failures.push(format!(
                "{bug:?}, believed harmless, is caught at seed {seed}: {:?}: {} — turn it into a caught bug",
                v.check, v.what
            ));
        }
    }
    eprintln!(
        "model-epoch: injected bugs: {} of {} caught, {} harmless variants not caught ({})",
        tally.len(),
        CAUGHT.len(),
        HARMLESS.len(),
        tally.join(", ")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn schedules_replay_identically() {
    for seed in [1, 42, 4242] {
        let a = run_schedule(seed, Bug::None, true).unwrap();
        let b = run_schedule(seed, Bug::None, true).unwrap();
        assert_eq!(
            (a.released, a.pauses, a.acks, a.leaves),
            (b.released, b.pauses, b.acks, b.leaves)
        );
    }
}
