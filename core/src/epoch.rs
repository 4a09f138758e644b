//! Checkpoint epochs of the full-state mode (docs/design.md §9): which epoch a
//! client-bound packet belongs to, the disk barrier of each epoch, and when the
//! output of an epoch may leave.
//!
//! A protection group in `checkpoint` mode is paused many times a second. At the
//! pause of epoch `N` every machine of the group is stopped, its RAM pages written
//! since the previous pause and its device state are captured (checkpoint `N`,
//! epoch 1 carries the whole RAM), the machines continue, and the checkpoint is
//! shipped to the backup, which acknowledges `N` once all of it — pages, device
//! state, and every disk write up to the epoch's *barrier* — is durable.
//!
//! # The release rule
//!
//! Every client-bound packet is tagged with the epoch that is *open* when the
//! agent sees it (entry [`EPOCH_ENTRY`] of its tag, on top of the machine's disk
//! pending vector); the epoch entry of the committed vector the netqueue compares
//! with is the last *acknowledged* epoch. So a packet tagged `e` leaves exactly
//! when the backup acknowledged an epoch `>= e`. The netqueue
//! (`crate::netqueue`) enforces the comparison; this module provides both sides
//! of it ([`Epochs::tag`], [`Epochs::committed_view`]).
//!
//! # Why that is safe
//!
//! Let `E(p)` be the first epoch whose pause began after the guest emitted packet
//! `p`: checkpoint `E(p)` and every later one contain the guest state that sent
//! `p`. The open epoch is `1 +` the number of [`Epochs::begin_pause`] calls so far,
//! and the driver calls `begin_pause` only while every machine of the group is
//! stopped, and lets them continue only after it ([`Epochs::capture_done`]).
//! The agent sees `p` after the guest emitted it, so:
//! * `p` emitted before the stop of pause `N` and seen before `begin_pause` of
//!   `N`: tagged `N = E(p)`;
//! * seen after `begin_pause` of `N` (in flight across the pause): tagged
//!   `>= N + 1 > E(p)`, later than needed, never earlier;
//! * no packet is emitted between the stop and the continue.
//!
//! Hence `tag(p) >= E(p)`. `p` leaves only when `acked >= tag(p) >= E(p)`: the
//! backup holds a complete checkpoint that remembers sending `p`. A later
//! checkpoint contains an earlier one's effects, so acks need not be contiguous:
//! `acked` is the largest acknowledged epoch. The checkpoint's disk is its
//! barrier: `barrier[w]` is the last seq writer `w` issued before the pause (the
//! stop drains the guest's block I/O, so the RAM remembers exactly those writes),
//! and the backup acknowledges only once they are durable. After a disaster the
//! backup resumes the guest at `acked` with its disks at `barrier(acked)`: the
//! client has seen nothing that state does not remember.
//!
//! Every machine of a group pauses for the same epoch: the driver stops them all
//! before it captures any, and continues them only after all are captured. A
//! message between two machines is then received in an epoch no earlier than the
//! one it was sent in (no checkpoint remembers receiving what its sender's
//! checkpoint does not remember sending).
//!
//! # Safety check
//!
//! [`Epochs::committed_view`] — the one place an epoch enters the committed
//! vector — asserts `acked <= shipped <= captured < open` with an always-on
//! `assert!`: the netqueue is never told that an epoch is safe that was not even
//! captured and shipped. An [`Epochs::ack`] above what was shipped is refused
//! (a bug or a hostile backup), never believed.
//!
//! # Bounds and stalls
//!
//! At most [`EpochLimits::max_unacked`] captured epochs wait for their ack; at the
//! bound (a backup that stops acknowledging) [`Epochs::may_pause`] refuses and the
//! guests keep running in the open epoch, whose output stays held: output stalls,
//! nothing unsafe leaves. A pause also waits while the previous epoch is still
//! being shipped (bounded staging memory, `src/fullstate`). A failed capture (QMP
//! gone, a guest that cannot be stopped) fails the state machine for good: no
//! more pauses, no more acks taken, and every packet of the open epoch stays held
//! (fail-closed; the driver raises the alarm).
//!
//! Numbering: no pause happens before the agent learnt the backup's
//! acknowledged epoch on its first connection ([`Epochs::reconnected`]); the
//! first epoch is the next number, so a restarted agent never reuses a number
//! whose ack belongs to another run's state.
//!
//! # Switching at run time (docs/design.md §13)
//!
//! A group also runs in a disk-only mode with the same state machine in phase
//! [`Phase::Off`]: no pauses, and tags never carry an epoch above the committed
//! one, so the disk rule alone releases output. Switching in
//! ([`Epochs::start_seeding`]) pre-copies the RAM of epoch `S` while the guests run
//! ([`Phase::Seeding`]: output is still released by the disk rule, which is all a
//! disaster before `S` is acknowledged can promise, and what the backup then
//! fails over to); the next pause captures `S` with only the pages written since
//! the pre-copy, the tag rises to `S + 1` inside that pause, and the group is
//! [`Phase::On`]. A packet released by the disk rule before the pause was emitted
//! before it, so checkpoint `S` remembers it: the proof above holds from `S` on.
//! Switching out ([`Epochs::leave`]) closes the open epoch `E` uncaptured
//! ([`Phase::Leaving`]): the driver sends `Leave { E }`, the backup records
//! durably that its failover is disk-only again and acks `E`, which releases the
//! output tagged up to `E` (its disk entries are satisfied by the disk rule, and
//! no failover resumes a checkpoint that does not remember it). Then `Off`.
//! A reconnection during seeding aborts the switch (the pre-copied segments are
//! torn with the connection) and, like a switch in abandoned otherwise (a failed
//! pre-copy read), leaves like a switch out: the backup drops the segments it
//! holds and ends the seeded period (its volumes stop being frozen). A
//! reconnection after the first pause of a period but before its first ack
//! abandons the period the same way (see [`Epochs::reconnected`]: no epoch of
//! it is captured on the new connection). During `Leaving` the driver sends
//! `Leave` again on every new connection until it is acknowledged. A disk-only
//! start begins with a `Leave` on its first connection (a previous run's `Leave`
//! may never have reached the backup, which would then resume a checkpoint that
//! does not remember what the disk rule releases, or keep its volumes frozen).
//!
//! Pure: no I/O, no clock. The driver (`src/fullstate`) calls in.

use crate::vector::{CountVector, EPOCH_ENTRY};
use std::collections::VecDeque;

/// Bounds of one group's epoch state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochLimits {
    /// Most captured epochs not yet acknowledged.
    pub max_unacked: u64,
}

impl Default for EpochLimits {
    /// 64 epochs: ~1.5 s of checkpoints at 40/s.
    fn default() -> Self {
        EpochLimits { max_unacked: 64 }
    }
}

/// Why a pause may not start now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseRefused {
    #[error("a pause (epoch {0}) is still in progress")]
    InPause(u64),
    #[error("epoch {captured} is still being shipped (shipped {shipped}): the next pause waits")]
    ShippingBehind { captured: u64, shipped: u64 },
    #[error(
        "{unacked} epochs wait for the backup's ack (acked {acked}, limit reached): output stalls"
    )]
    TooManyUnacked { acked: u64, unacked: u64 },
    #[error("a capture failed: the group's output stays held")]
    Failed,
    #[error("not synchronised with the backup yet (its acknowledged epoch is not known)")]
    NotSynced,
    #[error("the group is not checkpointing (phase {0:?})")]
    NotOn(Phase),
}

/// Whether, and how far, the group checkpoints (module doc, "Switching at run time").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Disk-only: no pauses; output is released by the disk rule alone.
    Off,
    /// Switching in: the RAM of `epoch` is pre-copied while the guests run; output
    /// is still released by the disk rule. The next pause captures `epoch`.
    Seeding { epoch: u64 },
    /// Checkpointing: output waits for the acknowledgement of its epoch.
    On,
    /// Switching out: `Leave { epoch }` closes the open epoch uncaptured; its
    /// acknowledgement releases the output tagged up to `epoch`, then `Off`.
    Leaving { epoch: u64 },
}

/// Why a switch cannot start now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchRefused {
    #[error("the group is {0:?}, not {1}")]
    Phase(Phase, &'static str),
    #[error("not connected to the backup yet (its acknowledged epoch is not known): try again when it is")]
    NotSynced,
    #[error("a capture failed: the group's output stays held")]
    Failed,
    #[error("a pause (epoch {0}) is in progress")]
    InPause(u64),
    #[error("epoch {captured} is still being shipped (shipped {shipped})")]
    ShippingBehind { captured: u64, shipped: u64 },
}

/// A call that does not fit the state (a driver bug or a hostile backup).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    #[error("epoch {got} is not the pause in progress ({pausing:?})")]
    NotPausing { got: u64, pausing: Option<u64> },
    #[error("epoch {got} shipped out of order (captured {captured}, shipped {shipped})")]
    ShipOrder {
        got: u64,
        captured: u64,
        shipped: u64,
    },
    #[error("ack of epoch {got}, but only up to {shipped} was shipped")]
    AckNotShipped { got: u64, shipped: u64 },
    #[error("the backup says epoch {backup} is acked, below the {acked} it acked before")]
    AckWentBack { backup: u64, acked: u64 },
}

/// What the driver must capture at a pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// The epoch being captured (its checkpoint number).
    pub epoch: u64,
    /// Ship the whole RAM (the first epoch, or the first after a reconnection),
    /// not only the pages written since the previous pause.
    pub full_ram: bool,
    /// Disk writes that belong to this checkpoint: `barrier[w]` = last seq writer
    /// `w` issued before the pause. Its epoch entry is 0 (wire contract).
    pub barrier: CountVector,
}

/// What to do with a captured epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captured {
    /// Ship it, then call [`Epochs::ship_done`].
    Ship,
    /// The backup connection was replaced during the pause and this epoch holds
    /// only the pages written since the previous one, which the new connection
    /// never got: drop it (it counts as shipped and is never acknowledged).
    GiveUp,
}

/// The epoch state of one protection group (module doc).
#[derive(Debug, Clone)]
pub struct Epochs {
    limits: EpochLimits,
    /// Epoch that output seen now belongs to (>= 1).
    open: u64,
    /// The pause in progress, if any (== open - 1 while set).
    pausing: Option<Pause>,
    /// Last epoch whose capture completed.
    captured: u64,
    /// Last epoch whose `Commit` went to the backup (or that was given up).
    shipped: u64,
    /// Largest epoch the backup acknowledged.
    acked: u64,
    /// Last epoch given up at a reconnection (never acknowledged on its own; it
    /// no longer counts against `max_unacked`).
    given_up: u64,
    /// Barriers of captured, unacknowledged epochs, ascending (<= max_unacked).
    barriers: VecDeque<(u64, CountVector)>,
    /// The next pause ships the whole RAM.
    needs_full: bool,
    /// The connection was replaced during the pause in progress.
    reconnected_in_pause: bool,
    /// The backup's acknowledged epoch was learnt once ([`Epochs::reconnected`]).
    synced: bool,
    /// Epochs up to here belong to another run of the agent (numbered before
    /// this one started): their acks say nothing about this run's output.
    floor: u64,
    failed: bool,
    /// The first epoch of the current checkpointing period (the seeded one, or
    /// the first after the first connection of a group that starts
    /// checkpointing); 0: none yet.
    period_first: u64,
    /// A reconnection during the pause in progress came before the period's
    /// first ack: the pause's capture is given up and the group leaves.
    leave_after_pause: bool,
    phase: Phase,
}

impl Epochs {
    /// A group that starts disk-only ([`Phase::Off`]; [`Epochs::start_seeding`]
    /// switches it in) after a `Leave`: on the first connection
    /// ([`Epochs::reconnected`]) it enters [`Phase::Leaving`], as the backup may
    /// still fail over to a checkpoint of a previous run (or keep its volumes
    /// frozen for its seeding); its output waits for that `Leave`'s ack.
    ///
    /// # Panics
    /// If `limits.max_unacked` is 0.
    pub fn new_off(limits: EpochLimits) -> Self {
        Epochs {
            phase: Phase::Off,
            ..Epochs::new(limits)
        }
    }

    /// A fresh checkpointing group: epoch 1 is open and will ship the whole RAM.
    ///
    /// # Panics
    /// If `limits.max_unacked` is 0.
    pub fn new(limits: EpochLimits) -> Self {
        assert!(limits.max_unacked > 0, "max_unacked must be at least 1");
        Epochs {
            limits,
            open: 1,
            pausing: None,
            captured: 0,
            shipped: 0,
            acked: 0,
            given_up: 0,
            barriers: VecDeque::new(),
            needs_full: true,
            reconnected_in_pause: false,
            synced: false,
            floor: 0,
            failed: false,
            period_first: 0,
            leave_after_pause: false,
            phase: Phase::On,
        }
    }

    /// Where the group is in checkpointing (module doc).
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The epoch the driver raises the tags' [`EPOCH_ENTRY`] to now: the open
    /// epoch while checkpointing or leaving, none (0) while disk-only or seeding
    /// (tags keep what they carry, never above the committed view's entry).
    pub fn tag_epoch(&self) -> u64 {
        match self.phase {
            Phase::On => self.open,
            Phase::Leaving { epoch } => epoch,
            Phase::Off | Phase::Seeding { .. } => 0,
        }
    }

    /// Switch in: epoch `open` becomes the first checkpoint; the driver
    /// pre-copies every guest's whole RAM as segments of it while they run, then
    /// pauses ([`Epochs::begin_pause`] captures it with only the pages written
    /// since the pre-copy). Returns that epoch.
    pub fn start_seeding(&mut self) -> Result<u64, SwitchRefused> {
        if self.phase != Phase::Off {
            return Err(SwitchRefused::Phase(self.phase, "disk-only"));
        }
        if self.failed {
            return Err(SwitchRefused::Failed);
        }
        if !self.synced {
            return Err(SwitchRefused::NotSynced);
        }
        debug_assert!(self.pausing.is_none() && self.shipped == self.captured);
        self.phase = Phase::Seeding { epoch: self.open };
        self.period_first = self.open;
        // The segments carry all of the RAM: the pause ships a delta on them.
        self.needs_full = false;
        Ok(self.open)
    }

    /// Switch out: the open epoch `E` is closed uncaptured; the driver sends
    /// `Leave { E }` (again on every new connection while [`Phase::Leaving`]),
    /// and its ack releases everything tagged up to `E` and ends in `Off`.
    /// Must be called between pauses with every captured epoch shipped. From
    /// [`Phase::Seeding`] it abandons the switch in (the pre-copy could not be
    /// done, or the operator changed their mind): `E` is the seeded epoch, whose
    /// segments the backup drops at the `Leave`.
    pub fn leave(&mut self) -> Result<u64, SwitchRefused> {
        if !matches!(self.phase, Phase::On | Phase::Seeding { .. }) {
            return Err(SwitchRefused::Phase(self.phase, "checkpointing or seeding"));
        }
        if let Some(p) = &self.pausing {
            return Err(SwitchRefused::InPause(p.epoch));
        }
        if self.shipped < self.captured {
            return Err(SwitchRefused::ShippingBehind {
                captured: self.captured,
                shipped: self.shipped,
            });
        }
        Ok(self.leave_now())
    }

    /// Closes the open epoch uncaptured: [`Phase::Leaving`].
    fn leave_now(&mut self) -> u64 {
        let e = self.open;
        self.captured = e;
        self.shipped = e;
        self.open = e + 1;
        self.phase = Phase::Leaving { epoch: e };
        e
    }

    /// The `Leave` to (re)send on the current connection, while leaving.
    pub fn leave_pending(&self) -> Option<u64> {
        match self.phase {
            Phase::Leaving { epoch } => Some(epoch),
            _ => None,
        }
    }

    /// The epoch output seen now belongs to.
    pub fn open(&self) -> u64 {
        self.open
    }
    /// Largest acknowledged epoch (0: none yet).
    pub fn acked(&self) -> u64 {
        self.acked
    }
    /// Last captured epoch.
    pub fn captured(&self) -> u64 {
        self.captured
    }
    /// Last shipped epoch.
    pub fn shipped(&self) -> u64 {
        self.shipped
    }
    /// Whether the backup's acknowledged epoch was learnt ([`Epochs::reconnected`]).
    pub fn synced(&self) -> bool {
        self.synced
    }
    /// Whether a capture failed (the group's output is held for good).
    pub fn failed(&self) -> bool {
        self.failed
    }
    /// The barrier of a captured, unacknowledged epoch.
    pub fn barrier(&self, epoch: u64) -> Option<&CountVector> {
        self.barriers
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, b)| b)
    }

    /// Whether a pause may start now (module doc, "Bounds and stalls").
    pub fn may_pause(&self) -> Result<(), PauseRefused> {
        if self.failed {
            return Err(PauseRefused::Failed);
        }
        if matches!(self.phase, Phase::Off | Phase::Leaving { .. }) {
            return Err(PauseRefused::NotOn(self.phase));
        }
        if !self.synced {
            return Err(PauseRefused::NotSynced);
        }
        if let Some(p) = &self.pausing {
            return Err(PauseRefused::InPause(p.epoch));
        }
        if self.shipped < self.captured {
            return Err(PauseRefused::ShippingBehind {
                captured: self.captured,
                shipped: self.shipped,
            });
        }
        let unacked = self.captured - self.acked.max(self.given_up);
        if unacked >= self.limits.max_unacked {
            return Err(PauseRefused::TooManyUnacked {
                acked: self.acked,
                unacked,
            });
        }
        Ok(())
    }

    /// Every machine of the group is stopped: epoch `open` is captured now and
    /// the next one opens (output seen from now on belongs to it). `issued` is
    /// the group's issued vector (each writer's last issued seq) read after the
    /// stop; its writer entries become the barrier.
    pub fn begin_pause(&mut self, issued: &CountVector) -> Result<Pause, PauseRefused> {
        self.may_pause()?;
        let mut barrier = *issued;
        barrier.set(EPOCH_ENTRY, 0);
        let pause = Pause {
            epoch: self.open,
            full_ram: self.needs_full,
            barrier,
        };
        self.open += 1;
        self.pausing = Some(pause.clone());
        self.reconnected_in_pause = false;
        // The first pause after seeding: checkpointing from here on.
        self.phase = Phase::On;
        Ok(pause)
    }

    /// The capture of `epoch` is complete; the machines may continue.
    pub fn capture_done(&mut self, epoch: u64) -> Result<Captured, EpochError> {
        let Some(p) = self.pausing.take_if(|p| p.epoch == epoch) else {
            return Err(EpochError::NotPausing {
                got: epoch,
                pausing: self.pausing.as_ref().map(|p| p.epoch),
            });
        };
        if p.full_ram {
            self.needs_full = false;
        }
        self.captured = self.captured.max(epoch);
        self.barriers.push_back((epoch, p.barrier));
        debug_assert!(self.barriers.len() as u64 <= self.limits.max_unacked);
        if std::mem::take(&mut self.leave_after_pause) {
            self.shipped = epoch;
            self.give_up_to(epoch);
            self.leave_now();
            return Ok(Captured::GiveUp);
        }
        if self.reconnected_in_pause && !p.full_ram {
            self.shipped = epoch;
            self.give_up_to(epoch);
            return Ok(Captured::GiveUp);
        }
        Ok(Captured::Ship)
    }

    /// The capture failed (alarm): no further pause, output of the open epochs
    /// stays held. The machines are continued or left stopped by the driver;
    /// either way nothing they emit is released.
    pub fn capture_failed(&mut self) {
        self.failed = true;
        self.leave_after_pause = false;
        self.pausing = None;
    }

    /// The `Commit` of `epoch` went out (epochs are shipped in order).
    pub fn ship_done(&mut self, epoch: u64) -> Result<(), EpochError> {
        if epoch <= self.shipped {
            return Ok(()); // given up at a reconnection, or a repeat
        }
        if epoch != self.shipped + 1 || epoch > self.captured {
            return Err(EpochError::ShipOrder {
                got: epoch,
                captured: self.captured,
                shipped: self.shipped,
            });
        }
        self.shipped = epoch;
        Ok(())
    }

    /// The backup acknowledged `epoch`. Returns whether `acked` grew.
    pub fn ack(&mut self, epoch: u64) -> Result<bool, EpochError> {
        if epoch > self.shipped {
            return Err(EpochError::AckNotShipped {
                got: epoch,
                shipped: self.shipped,
            });
        }
        if epoch <= self.acked || epoch <= self.floor {
            return Ok(false); // a repeat, or another run's epoch
        }
        self.acked = epoch;
        while self.barriers.front().is_some_and(|(e, _)| *e <= epoch) {
            self.barriers.pop_front();
        }
        if self.phase == (Phase::Leaving { epoch }) {
            self.phase = Phase::Off;
        }
        Ok(true)
    }

    /// The agent is synchronised with a (new) connection to the backup, which
    /// reported `backup_acked` as its acknowledged epoch when the connection
    /// opened (0: none).
    ///
    /// The first time (this agent's first connection) the numbering continues
    /// above `backup_acked`: an agent restart never reuses an epoch number the
    /// backup knows, no pause happens before this (`NotSynced`), and an ack of
    /// an epoch up to `backup_acked` (another run's state) never releases this
    /// run's output. Later,
    /// epochs shipped on the old connection and not acknowledged are torn there:
    /// they are given up (they can never be acknowledged on their own; a later
    /// epoch covers their output) and the next pause ships the whole RAM again. A
    /// pause in progress that captures only dirty pages is given up too
    /// ([`Captured::GiveUp`]).
    pub fn reconnected(&mut self, backup_acked: u64) -> Result<(), EpochError> {
        if !self.synced {
            debug_assert!(self.pausing.is_none() && self.captured == 0);
            self.synced = true;
            self.period_first = backup_acked + 1;
            self.floor = backup_acked;
            self.open = backup_acked + 1;
            self.captured = backup_acked;
            self.shipped = backup_acked;
            self.given_up = backup_acked;
            self.needs_full = true;
            if self.phase == Phase::Off {
                // A previous run may have been checkpointing or seeding, and its
                // Leave may never have reached the backup, which would then still
                // fail over to a checkpoint (that does not remember what the disk
                // rule releases now) or keep its volumes frozen. So a disk-only
                // start leaves first: its output waits for the Leave's ack.
                self.leave_now();
            }
            return Ok(());
        }
        if backup_acked < self.acked && self.acked > self.floor {
            return Err(EpochError::AckWentBack {
                backup: backup_acked,
                acked: self.acked,
            });
        }
        if backup_acked > self.captured {
            return Err(EpochError::AckNotShipped {
                got: backup_acked,
                shipped: self.shipped,
            });
        }
        self.shipped = self.captured;
        self.ack(backup_acked)?;
        self.give_up_to(self.captured);
        self.needs_full = true;
        self.reconnected_in_pause = self.pausing.is_some();
        if matches!(self.phase, Phase::Seeding { .. }) {
            // The pre-copied segments were torn with the connection: the switch
            // is aborted with a Leave, like any abandoned switch in, so the
            // backup ends the seeded period (its volumes are frozen from the
            // first segment until a Leave or the period's first ack).
            self.leave_now();
        } else if self.phase == Phase::On && self.acked < self.period_first {
            // No epoch of this period is acknowledged, so the backup may not hold
            // its volumes below the next epoch's barrier (the first segment or
            // epoch that would freeze them may be lost with the connection), and a
            // full epoch's pause precedes its first frame: writes issued after
            // that pause could reach the volumes before the epoch is acked, and
            // its disk could no longer be written at its barrier. The period is
            // abandoned with a Leave (after the pause in progress, if any, whose
            // capture is given up); the driver may switch in again.
            if self.pausing.is_some() {
                self.leave_after_pause = true;
            } else {
                self.leave_now();
            }
        }
        Ok(())
    }

    fn give_up_to(&mut self, epoch: u64) {
        self.given_up = self.given_up.max(epoch);
        while self.barriers.front().is_some_and(|(e, _)| *e <= epoch) {
            self.barriers.pop_front();
        }
    }

    /// The tag of a client-bound packet seen now: the machine's pending vector
    /// with the open epoch in [`EPOCH_ENTRY`].
    pub fn tag(&self, pending: &CountVector) -> CountVector {
        let mut t = *pending;
        t.set(EPOCH_ENTRY, self.open);
        t
    }

    /// The committed vector the netqueue compares tags with: the disk entries as
    /// committed, the epoch entry the last acknowledged epoch.
    pub fn committed_view(&self, committed: &CountVector) -> CountVector {
        assert!(
            self.acked <= self.shipped
                && self.shipped <= self.captured
                && self.captured < self.open,
            "epoch order broken: acked {} shipped {} captured {} open {}",
            self.acked,
            self.shipped,
            self.captured,
            self.open
        );
        let mut c = *committed;
        c.set(EPOCH_ENTRY, self.acked);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(w0: u64) -> CountVector {
        CountVector::from_slice(&[w0])
    }

    #[test]
    fn one_epoch_goes_through_pause_ship_ack() {
        let mut e = Epochs::new(EpochLimits::default());
        assert_eq!(e.may_pause(), Err(PauseRefused::NotSynced));
        e.reconnected(0).unwrap();
        assert_eq!(e.tag(&v(0)).get(EPOCH_ENTRY), 1);
        assert_eq!(e.committed_view(&v(0)).get(EPOCH_ENTRY), 0);
        let p = e.begin_pause(&v(5)).unwrap();
        assert_eq!((p.epoch, p.full_ram, p.barrier), (1, true, v(5)));
        assert_eq!(
            e.tag(&v(0)).get(EPOCH_ENTRY),
            2,
            "opened at the pause, before cont"
        );
        assert_eq!(e.capture_done(1), Ok(Captured::Ship));
        assert_eq!(e.barrier(1), Some(&v(5)));
        assert!(matches!(
            e.may_pause(),
            Err(PauseRefused::ShippingBehind { .. })
        ));
        assert_eq!(
            e.ack(1),
            Err(EpochError::AckNotShipped { got: 1, shipped: 0 })
        );
        e.ship_done(1).unwrap();
        assert!(e.ack(1).unwrap());
        assert!(!e.ack(1).unwrap(), "duplicate");
        assert_eq!(e.committed_view(&v(3)), {
            let mut c = v(3);
            c.set(EPOCH_ENTRY, 1);
            c
        });
        let p = e.begin_pause(&v(7)).unwrap();
        assert!(!p.full_ram);
    }

    #[test]
    fn first_sync_continues_above_the_backups_epoch() {
        let mut e = Epochs::new(EpochLimits::default());
        e.reconnected(41).unwrap();
        assert_eq!(e.tag(&v(0)).get(EPOCH_ENTRY), 42);
        assert_eq!(
            e.committed_view(&v(0)).get(EPOCH_ENTRY),
            0,
            "41 is another run's"
        );
        assert_eq!(e.ack(41), Ok(false));
        let p = e.begin_pause(&v(1)).unwrap();
        assert_eq!((p.epoch, p.full_ram), (42, true));
        // A reconnection before the period's first ack abandons the period after
        // the pause in progress (the backup may not hold its volumes below 42's
        // barrier).
        e.reconnected(41).unwrap();
        assert_eq!(e.committed_view(&v(0)).get(EPOCH_ENTRY), 0);
        assert_eq!(e.capture_done(42), Ok(Captured::GiveUp));
        assert_eq!(e.leave_pending(), Some(43));
        assert!(e.ack(43).unwrap());
        assert_eq!((e.phase(), e.start_seeding()), (Phase::Off, Ok(44)));
    }

    #[test]
    fn a_reconnection_after_the_periods_first_ack_keeps_checkpointing() {
        let mut e = Epochs::new_off(EpochLimits::default());
        e.reconnected(0).unwrap();
        e.ack(1).unwrap();
        let s = e.start_seeding().unwrap();
        e.begin_pause(&v(1)).unwrap();
        e.capture_done(s).unwrap();
        e.ship_done(s).unwrap();
        // Before the first ack: abandoned at once (no pause in progress).
        let mut before = e.clone();
        before.reconnected(1).unwrap();
        assert_eq!(before.leave_pending(), Some(s + 1));
        // After it: a full epoch on the new connection, as in issue 21.
        e.ack(s).unwrap();
        e.reconnected(s).unwrap();
        assert_eq!(e.phase(), Phase::On);
        assert!(e.begin_pause(&v(2)).unwrap().full_ram);
    }

    #[test]
    fn unacked_bound_stalls_pauses() {
        let mut e = Epochs::new(EpochLimits { max_unacked: 2 });
        e.reconnected(0).unwrap();
        for n in 1..=2 {
            e.begin_pause(&v(n)).unwrap();
            e.capture_done(n).unwrap();
            e.ship_done(n).unwrap();
        }
        assert!(matches!(
            e.may_pause(),
            Err(PauseRefused::TooManyUnacked { .. })
        ));
        e.ack(2).unwrap();
        assert_eq!(e.barrier(1), None);
        e.may_pause().unwrap();
    }

    #[test]
    fn failed_capture_stops_everything() {
        let mut e = Epochs::new(EpochLimits::default());
        e.reconnected(0).unwrap();
        e.begin_pause(&v(1)).unwrap();
        e.capture_failed();
        assert_eq!(e.may_pause(), Err(PauseRefused::Failed));
        assert_eq!(e.committed_view(&v(0)).get(EPOCH_ENTRY), 0);
        assert!(e.ack(1).is_err());
    }

    #[test]
    fn reconnection_gives_up_torn_epochs_and_reseeds() {
        let mut e = Epochs::new(EpochLimits::default());
        e.reconnected(0).unwrap();
        for n in 1..=3 {
            e.begin_pause(&v(n)).unwrap();
            e.capture_done(n).unwrap();
            if n < 3 {
                e.ship_done(n).unwrap();
            }
        }
        e.ack(1).unwrap();
        assert!(e.reconnected(0).is_err(), "backup went back");
        e.reconnected(2).unwrap();
        assert_eq!((e.acked(), e.shipped()), (2, 3));
        assert_eq!(e.barrier(3), None, "given up");
        assert!(e.begin_pause(&v(4)).unwrap().full_ram);
        e.reconnected(2).unwrap();
        assert_eq!(
            e.capture_done(4),
            Ok(Captured::Ship),
            "a full epoch suits any connection"
        );
        e.ship_done(4).unwrap();
        assert!(!e.begin_pause(&v(5)).unwrap().full_ram);
        e.reconnected(2).unwrap();
        assert_eq!(
            e.capture_done(5),
            Ok(Captured::GiveUp),
            "a delta without its base"
        );
        assert_eq!(e.shipped(), 5);
        assert!(e.begin_pause(&v(6)).unwrap().full_ram);
    }

    #[test]
    fn switch_in_seeds_then_the_first_pause_starts_checkpointing() {
        let mut e = Epochs::new_off(EpochLimits::default());
        assert_eq!(e.phase(), Phase::Off);
        assert!(matches!(e.may_pause(), Err(PauseRefused::NotOn(_))));
        assert_eq!(e.start_seeding(), Err(SwitchRefused::NotSynced));
        e.reconnected(0).unwrap();
        assert_eq!(e.leave_pending(), Some(1), "a disk-only start leaves first");
        assert!(e.ack(1).unwrap());
        assert_eq!(e.tag_epoch(), 0, "disk-only: tags carry no epoch");
        assert_eq!(e.committed_view(&v(0)).get(EPOCH_ENTRY), 1);
        let s = e.start_seeding().unwrap();
        assert_eq!((s, e.phase()), (2, Phase::Seeding { epoch: 2 }));
        assert_eq!(e.tag_epoch(), 0, "seeding: still the disk rule");
        assert!(e.start_seeding().is_err());
        let p = e.begin_pause(&v(3)).unwrap();
        assert_eq!(
            (p.epoch, p.full_ram),
            (2, false),
            "a delta on the seeded segments"
        );
        assert_eq!((e.phase(), e.tag_epoch()), (Phase::On, 3));
        e.capture_done(2).unwrap();
        e.ship_done(2).unwrap();
        assert!(e.ack(2).unwrap());
        assert_eq!(e.committed_view(&v(0)).get(EPOCH_ENTRY), 2);
    }

    #[test]
    fn a_disk_only_start_against_a_checkpointing_backup_leaves_first() {
        // A previous run checkpointed up to epoch 7 and its Leave never reached
        // the backup, which would still resume epoch 7: nothing may leave on the
        // disk rule until this run's Leave is acknowledged.
        let mut e = Epochs::new_off(EpochLimits::default());
        e.reconnected(7).unwrap();
        assert_eq!(
            (e.phase(), e.leave_pending()),
            (Phase::Leaving { epoch: 8 }, Some(8))
        );
        assert_eq!(
            (e.tag_epoch(), e.committed_view(&v(0)).get(EPOCH_ENTRY)),
            (8, 0)
        );
        assert_eq!(
            e.start_seeding(),
            Err(SwitchRefused::Phase(
                Phase::Leaving { epoch: 8 },
                "disk-only"
            ))
        );
        assert!(e.ack(8).unwrap());
        assert_eq!(
            (e.phase(), e.committed_view(&v(0)).get(EPOCH_ENTRY)),
            (Phase::Off, 8)
        );
        assert_eq!(e.start_seeding(), Ok(9));
        // A backup that never acknowledged a checkpoint may still be seeding.
        let mut e = Epochs::new_off(EpochLimits::default());
        e.reconnected(0).unwrap();
        assert_eq!(e.leave_pending(), Some(1));
    }

    #[test]
    fn a_reconnection_while_seeding_aborts_the_switch() {
        let mut e = Epochs::new_off(EpochLimits::default());
        e.reconnected(0).unwrap();
        assert!(e.ack(1).unwrap());
        assert_eq!(e.start_seeding(), Ok(2));
        // The segments are torn: the switch is abandoned with a Leave, which the
        // driver sends on the new connection (the backup unfreezes its volumes).
        e.reconnected(1).unwrap();
        assert_eq!(
            (e.phase(), e.leave_pending()),
            (Phase::Leaving { epoch: 2 }, Some(2))
        );
        assert!(e.ack(2).unwrap());
        assert_eq!((e.phase(), e.tag_epoch()), (Phase::Off, 0));
        assert_eq!(e.start_seeding(), Ok(3));
        // Abandoned (a failed pre-copy read): the backup drops the segments at the Leave.
        assert_eq!(e.leave(), Ok(3));
        assert_eq!((e.phase(), e.tag_epoch()), (Phase::Leaving { epoch: 3 }, 3));
        assert!(e.ack(3).unwrap());
        assert_eq!(e.phase(), Phase::Off);
        assert_eq!(e.start_seeding(), Ok(4));
    }

    #[test]
    fn switch_out_closes_the_open_epoch_and_its_ack_releases_it() {
        let mut e = Epochs::new(EpochLimits::default());
        e.reconnected(0).unwrap();
        e.begin_pause(&v(1)).unwrap();
        assert_eq!(e.leave(), Err(SwitchRefused::InPause(1)));
        e.capture_done(1).unwrap();
        assert!(matches!(
            e.leave(),
            Err(SwitchRefused::ShippingBehind { .. })
        ));
        e.ship_done(1).unwrap();
        let l = e.leave().unwrap();
        assert_eq!(
            (l, e.phase(), e.tag_epoch()),
            (2, Phase::Leaving { epoch: 2 }, 2)
        );
        assert_eq!(e.leave_pending(), Some(2));
        assert!(matches!(e.may_pause(), Err(PauseRefused::NotOn(_))));
        // A reconnection before the backup recorded it: still leaving, sent again.
        e.reconnected(1).unwrap();
        assert_eq!((e.acked(), e.leave_pending()), (1, Some(2)));
        assert_eq!(
            e.committed_view(&v(0)).get(EPOCH_ENTRY),
            1,
            "epoch 2 still held"
        );
        assert!(e.ack(2).unwrap());
        assert_eq!((e.phase(), e.leave_pending()), (Phase::Off, None));
        assert_eq!(e.committed_view(&v(0)).get(EPOCH_ENTRY), 2, "released");
        // And back in: the next checkpoint is numbered above the leave.
        assert_eq!(e.start_seeding(), Ok(3));
    }

    #[test]
    fn a_leave_recorded_before_a_reconnection_completes_on_it() {
        let mut e = Epochs::new(EpochLimits::default());
        e.reconnected(0).unwrap();
        let l = e.leave().unwrap();
        e.reconnected(l).unwrap();
        assert_eq!(e.phase(), Phase::Off);
        assert_eq!(e.committed_view(&v(0)).get(EPOCH_ENTRY), l);
    }

    #[test]
    fn capture_done_must_name_the_pause() {
        let mut e = Epochs::new(EpochLimits::default());
        e.reconnected(0).unwrap();
        assert!(e.capture_done(1).is_err());
        e.begin_pause(&v(0)).unwrap();
        assert!(matches!(e.may_pause(), Err(PauseRefused::InPause(1))));
        assert!(e.capture_done(2).is_err());
        e.capture_done(1).unwrap();
    }
}
