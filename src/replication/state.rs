//! Shared state of one replication client: the bounded buffer of unacked writes,
//! commit tracking and the counters the status reports.
//!
//! Plain data behind one lock: the driver ([`super::session`], the client
//! handle) locks it, passes in the current time and does all I/O. Every method
//! keeps these invariants:
//!
//! - a writer's buffer holds exactly the writes issued in this agent run that
//!   are not yet known durable (no ack covers them and the committed prefix is
//!   below them); nothing else ever removes a write from the buffer;
//! - the seqs a writer issues are contiguous from its registration base: a seq
//!   the causal state skipped (its own entry was raised by a merge) is filled
//!   with an empty *filler* write, so the backup never waits on a hole;
//! - the committed vector published to the [`CausalState`] only grows and never
//!   counts one of our own writes that was not issued yet (acks and committed
//!   vectors beyond what we wrote are refused or clamped).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipecloud_core::commit::CommitTracker;
use pipecloud_core::wire::{Ack, Frame, Generation, Welcome, Write, WriteKind};
use pipecloud_core::{CountVector, Seq, WriterId};
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::mode::BackupLossPolicy;
use super::send_policy::{self, SenderArm, Unsent};
pub use super::send_policy::{Coalesce, SendDecision, SendRule};
use super::timeline::WriteTimeline;
use super::{DiskStatus, ReplicationStatus, WriterStatus};
use crate::causal::CausalState;

/// Bytes a write is charged in the in-flight budget on top of its payload
/// (frame header, vector, offsets): zero-length, zeroes and trim writes cost this.
pub const WRITE_OVERHEAD: u64 = 128;

/// Most heartbeats remembered while waiting for their replies (older ones are
/// forgotten; their replies then yield no RTT sample).
const MAX_OUTSTANDING_HEARTBEATS: usize = 8;

/// In-flight budget charged for a write of `kind`.
pub fn write_cost(kind: &WriteKind) -> u64 {
    match kind {
        WriteKind::Data(d) => d.len() as u64 + WRITE_OVERHEAD,
        WriteKind::Zeroes { .. } | WriteKind::Trim { .. } => WRITE_OVERHEAD,
    }
}

/// A protocol violation by the backup server: the session is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backup protocol violation: {0}")]
pub struct ProtocolViolation(pub String);

/// One buffered write (unacked).
struct Entry {
    frame: Arc<Frame>,
    cost: u64,
    disk: usize,
    issued_at: Instant,
    /// Room in the in-flight budget; released when the entry is dropped.
    _permit: Option<OwnedSemaphorePermit>,
}

/// Buffer and counters of one writer of this agent.
struct WriterBuf {
    machine: usize,
    generation: Generation,
    /// Highest seq issued (or the registration base before the first write).
    written: Seq,
    unacked: BTreeMap<Seq, Entry>,
    inflight_bytes: u64,
    /// Seq that must be committed before a degraded group returns to zero RPO.
    backlog_mark: Seq,
    /// Filler writes issued to cover seqs skipped by the causal state.
    fillers: u64,
    /// High-water marks since the start or the last [`State::reset_peaks`].
    peaks: Peaks,
}

/// High-water marks of one writer's replication lag: the worst exposure (RPO) seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peaks {
    /// Most writes issued but not yet committed at once (seen when a write is issued).
    pub lag: u64,
    /// Longest time from issuing a write to learning the backup has it durable. In a
    /// status snapshot it also counts the wait so far of the oldest write still unacked,
    /// so a backup that stays away shows here before it answers.
    pub commit_latency: Duration,
}

/// A disk announced in the hello.
pub struct DiskSlot {
    pub name: String,
    pub size: u64,
    pub writer: WriterId,
    pub machine: usize,
    inflight_bytes: u64,
    inflight_writes: usize,
}

impl DiskSlot {
    /// A disk with nothing in flight.
    pub fn new(name: String, size: u64, writer: WriterId, machine: usize) -> Self {
        DiskSlot {
            name,
            size,
            writer,
            machine,
            inflight_bytes: 0,
            inflight_writes: 0,
        }
    }
}

/// How the sender coalesces writes into one socket write: while writes it sent
/// are unacked, new ones wait until the acks arrive, `bytes` of them are
/// waiting, or the oldest has waited `delay` (Nagle's rule with a deadline).
/// With nothing unacked a write goes at once, so a lone write (a sync writer at
/// queue depth 1) never waits; under load the backup's acks clock the batches.
/// `delay` zero sends every write as soon as the sender runs.
///
/// What a degrade check changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DegradeChange {
    /// The group just degraded (alarm).
    Degraded { silent_for: Duration },
    /// The backlog is committed: the group is back at zero RPO.
    Recovered,
}

/// The client's state (see the module documentation).
pub struct State {
    tracker: CommitTracker,
    writers: BTreeMap<WriterId, WriterBuf>,
    pub disks: Vec<DiskSlot>,
    registered: bool,
    connected: bool,
    /// When the backup last sent a frame (the client's start until it first does).
    last_heard: Instant,
    /// Whether the backup sent any frame in this agent run.
    ever_heard: bool,
    degraded: watch::Sender<bool>,
    degrade_events: u64,
    sessions: u64,
    last_rtt: Option<Duration>,
    last_error: Option<String>,
    heartbeats: VecDeque<(u64, Instant)>,
    /// Nonce of the backup's latest heartbeat not yet answered (older ones are
    /// superseded: one answer proves liveness as well as several).
    heartbeat_to_answer: Option<u64>,
    /// Armed by [`send_decision`](Self::send_decision), read by
    /// [`wake_sender_for`](Self::wake_sender_for).
    sender_armed: SenderArm,
    /// When recent writes were issued, sent and acked (read by the network path).
    pub timeline: Arc<WriteTimeline>,
}

impl State {
    /// State for `disks`, all writers of this agent using `generation`.
    pub fn new(
        disks: Vec<DiskSlot>,
        generation: Generation,
        degraded: watch::Sender<bool>,
        now: Instant,
    ) -> Self {
        let mut writers = BTreeMap::new();
        for d in &disks {
            writers.entry(d.writer).or_insert_with(|| WriterBuf {
                machine: d.machine,
                generation,
                written: 0,
                unacked: BTreeMap::new(),
                inflight_bytes: 0,
                backlog_mark: 0,
                fillers: 0,
                peaks: Peaks::default(),
            });
        }
        let timeline = Arc::new(WriteTimeline::new(writers.keys().copied(), now));
        State {
            timeline,
            tracker: CommitTracker::new(),
            writers,
            disks,
            registered: false,
            connected: false,
            last_heard: now,
            ever_heard: false,
            degraded,
            degrade_events: 0,
            sessions: 0,
            last_rtt: None,
            last_error: None,
            heartbeats: VecDeque::new(),
            heartbeat_to_answer: None,
            sender_armed: SenderArm::default(),
        }
    }

    /// Whether a session is established (welcome received, not yet ended).
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Whether the group is degraded to async (see [`BackupLossPolicy`]).
    pub fn degraded(&self) -> bool {
        *self.degraded.borrow()
    }

    /// Total bytes charged by buffered writes.
    pub fn inflight_bytes(&self) -> u64 {
        self.writers.values().map(|w| w.inflight_bytes).sum()
    }

    /// Issues a write on disk `disk`: takes `(seq, vector)` from the causal
    /// state and buffers the write frame. Must only be called once
    /// [`registered`](Self::registered). `permit` is the write's room in the
    /// in-flight budget, held until the write is acked.
    pub fn issue(
        &mut self,
        causal: &CausalState,
        disk: usize,
        offset: u64,
        kind: WriteKind,
        permit: Option<OwnedSemaphorePermit>,
        now: Instant,
    ) -> (WriterId, Seq, CountVector) {
        let slot = &self.disks[disk];
        let writer = slot.writer;
        let wb = self
            .writers
            .get_mut(&writer)
            .expect("every disk's writer has a buffer");
        let (seq, vector) = causal.issue_write(wb.machine, writer);
        // The causal state numbers this writer; if its entry was raised past
        // what we issued (a merged tag carried a higher own entry), fill the gap
        // with empty writes so the backup's prefix can pass it.
        if seq > wb.written + 1 {
            tracing::warn!(
                %writer,
                from = wb.written + 1,
                to = seq - 1,
                "writer's seq skipped ahead; sending empty filler writes for the gap"
            );
        }
        while wb.written + 1 < seq {
            let s = wb.written + 1;
            let mut v = CountVector::ZERO;
            v.set(writer.index(), s);
            let filler = Write {
                writer,
                generation: wb.generation,
                seq: s,
                disk: u16::try_from(disk).unwrap_or(0),
                offset: 0,
                vector: v,
                kind: WriteKind::Zeroes { len: 0 },
            };
            let cost = write_cost(&filler.kind);
            Self::insert(wb, &mut self.disks, s, filler, disk, None, now);
            self.timeline.issued(writer, s, now, cost);
            wb.written = s;
            wb.fillers += 1;
        }
        let write = Write {
            writer,
            generation: wb.generation,
            seq,
            // Disk indices are bounded by MAX_DISKS_PER_HELLO when the client starts.
            disk: u16::try_from(disk).unwrap_or(0),
            offset,
            vector,
            kind,
        };
        debug_assert!(pipecloud_core::codec::validate_frame(&Frame::Write(write.clone())).is_ok());
        let cost = write_cost(&write.kind);
        Self::insert(wb, &mut self.disks, seq, write, disk, permit, now);
        self.timeline.issued(writer, seq, now, cost);
        wb.written = wb.written.max(seq);
        let lag = wb
            .written
            .saturating_sub(self.tracker.committed().get(writer.index()));
        wb.peaks.lag = wb.peaks.lag.max(lag);
        (writer, seq, vector)
    }

    fn insert(
        wb: &mut WriterBuf,
        disks: &mut [DiskSlot],
        seq: Seq,
        write: Write,
        disk: usize,
        permit: Option<OwnedSemaphorePermit>,
        now: Instant,
    ) {
        let cost = write_cost(&write.kind);
        wb.inflight_bytes += cost;
        if let Some(d) = disks.get_mut(disk) {
            d.inflight_bytes += cost;
            d.inflight_writes += 1;
        }
        let old = wb.unacked.insert(
            seq,
            Entry {
                frame: Arc::new(Frame::Write(write)),
                cost,
                disk,
                issued_at: now,
                _permit: permit,
            },
        );
        debug_assert!(old.is_none(), "seq {seq} issued twice");
    }

    /// Removes buffered writes of `writer` with seqs in `range` (they are durable).
    fn release(&mut self, writer: WriterId, first: Seq, last: Seq, now: Instant) {
        let Some(wb) = self.writers.get_mut(&writer) else {
            return;
        };
        if first > last {
            return;
        }
        let seqs: Vec<Seq> = wb.unacked.range(first..=last).map(|(s, _)| *s).collect();
        for s in seqs {
            if let Some(e) = wb.unacked.remove(&s) {
                self.timeline.acked(writer, s, now);
                wb.inflight_bytes -= e.cost;
                wb.peaks.commit_latency = wb
                    .peaks
                    .commit_latency
                    .max(now.saturating_duration_since(e.issued_at));
                if let Some(d) = self.disks.get_mut(e.disk) {
                    d.inflight_bytes -= e.cost;
                    d.inflight_writes -= 1;
                }
            }
        }
    }

    /// Removes every buffered write at or below each writer's committed prefix
    /// and publishes the committed vector to the causal state.
    fn prune_and_publish(&mut self, causal: &CausalState, now: Instant) {
        let writers: Vec<WriterId> = self.writers.keys().copied().collect();
        for w in writers {
            let committed = self.tracker.committed().get(w.index());
            if committed > 0 {
                self.release(w, 1, committed, now);
            }
        }
        causal.publish_committed(self.tracker.committed());
    }

    /// Own writers' entries of `v` clamped to what they actually wrote (a
    /// committed vector must never count writes that were not issued).
    fn clamp_own(&self, v: &CountVector, what: &str) -> CountVector {
        let mut v = *v;
        for (w, wb) in &self.writers {
            if v.get(w.index()) > wb.written {
                tracing::error!(
                    writer = %w,
                    claimed = v.get(w.index()),
                    written = wb.written,
                    "{what} claims writes this agent never issued; ignoring the excess"
                );
                v.set(w.index(), wb.written);
            }
        }
        v
    }

    /// Adopts the server's welcome. On the first one, every writer is
    /// registered with the durable prefix as its base (and its causal entry
    /// raised to it); later ones (reconnects) must carry the same generation.
    /// Returns, per writer, the first seq to (re)send.
    pub fn on_welcome(
        &mut self,
        welcome: &Welcome,
        causal: &CausalState,
        now: Instant,
    ) -> Result<BTreeMap<WriterId, Seq>, ProtocolViolation> {
        // Check everything before changing anything.
        for (w, wb) in &self.writers {
            let ws = welcome
                .writers
                .iter()
                .find(|s| s.writer == *w)
                .ok_or_else(|| ProtocolViolation(format!("welcome does not list writer {w}")))?;
            if ws.generation != wb.generation {
                return Err(ProtocolViolation(format!(
                    "welcome lists writer {w} with generation {} but this agent announced {}",
                    ws.generation, wb.generation
                )));
            }
        }
        let first = !self.registered;
        for (w, wb) in self.writers.iter_mut() {
            let Some(ws) = welcome.writers.iter().find(|s| s.writer == *w) else {
                continue;
            };
            if first {
                self.tracker
                    .register(*w, wb.generation, ws.durable)
                    .map_err(|e| ProtocolViolation(format!("registering writer {w}: {e}")))?;
                causal.raise_writer(wb.machine, *w, ws.durable);
                wb.written = ws.durable;
                tracing::info!(writer = %w, generation = wb.generation, base = ws.durable,
                    "writer registered: numbering continues after the backup's durable prefix");
            } else {
                let mut durable = ws.durable;
                let committed = self.tracker.committed().get(w.index());
                if durable < committed {
                    tracing::error!(writer = %w, durable, committed,
                        "backup reports a durable prefix below what it acked before (acked writes lost at the backup?)");
                }
                if durable > wb.written {
                    tracing::error!(writer = %w, durable, written = wb.written,
                        "backup reports writes durable that this agent never issued; ignoring the excess");
                    durable = wb.written;
                }
                let mut v = CountVector::ZERO;
                v.set(w.index(), durable);
                self.tracker.observe_committed(&v);
            }
        }
        let committed = self.clamp_own(&welcome.committed, "welcome");
        self.tracker.observe_committed(&committed);
        self.registered = true;
        self.connected = true;
        self.sessions += 1;
        self.heard(now);
        self.last_error = None;
        self.heartbeats.clear();
        self.heartbeat_to_answer = None;
        self.sender_armed.disarm();
        self.prune_and_publish(causal, now);
        let mut next = BTreeMap::new();
        for (w, wb) in self.writers.iter_mut() {
            wb.backlog_mark = wb.written;
            next.insert(*w, self.tracker.committed().get(w.index()) + 1);
        }
        Ok(next)
    }

    /// Records an ack. Acks of another generation are ignored; acks of writes
    /// this agent never issued are a protocol violation.
    pub fn on_ack(
        &mut self,
        ack: &Ack,
        causal: &CausalState,
        now: Instant,
    ) -> Result<(), ProtocolViolation> {
        self.heard(now);
        let Some(wb) = self.writers.get(&ack.writer) else {
            return Err(ProtocolViolation(format!(
                "ack for writer {} which this agent does not serve",
                ack.writer
            )));
        };
        if ack.generation != wb.generation {
            tracing::debug!(writer = %ack.writer, generation = ack.generation,
                "ack of another generation ignored");
            return Ok(());
        }
        if ack.last > wb.written {
            return Err(ProtocolViolation(format!(
                "ack of {} seqs {}..={} but only {} were issued",
                ack.writer, ack.first, ack.last, wb.written
            )));
        }
        self.tracker
            .ack(ack.writer, ack.generation, ack.first, ack.last)
            .map_err(|e| ProtocolViolation(format!("ack refused: {e}")))?;
        self.release(ack.writer, ack.first, ack.last, now);
        self.prune_and_publish(causal, now);
        Ok(())
    }

    /// Adopts a committed vector pushed by the backup.
    pub fn on_committed(&mut self, v: &CountVector, causal: &CausalState, now: Instant) {
        self.heard(now);
        let v = self.clamp_own(v, "committed vector");
        if self.tracker.observe_committed(&v) {
            self.prune_and_publish(causal, now);
        }
    }

    /// The backup's silence counts from `now` (a detached client attached:
    /// it never had a backup to hear from before).
    pub fn restart_silence(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// A frame was received from the backup (liveness).
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.ever_heard = true;
    }

    /// The session ended.
    pub fn disconnected(&mut self, reason: String) {
        self.connected = false;
        self.sender_armed.disarm();
        self.last_error = Some(reason);
    }

    /// Records a failed connection attempt.
    pub fn connect_failed(&mut self, reason: String) {
        self.last_error = Some(reason);
    }

    /// Whether the backup has been silent for at least `timeout`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }

    /// Records a heartbeat sent with `nonce`.
    pub fn heartbeat_sent(&mut self, nonce: u64, now: Instant) {
        if self.heartbeats.len() >= MAX_OUTSTANDING_HEARTBEATS {
            self.heartbeats.pop_front();
        }
        self.heartbeats.push_back((nonce, now));
    }

    /// A heartbeat reply arrived; returns the round-trip time if the nonce is known.
    pub fn heartbeat_reply(&mut self, nonce: u64, now: Instant) -> Option<Duration> {
        self.heard(now);
        let i = self.heartbeats.iter().position(|(n, _)| *n == nonce)?;
        let (_, sent) = self.heartbeats.remove(i)?;
        // Replies to earlier heartbeats that never came back are not coming any more.
        self.heartbeats.drain(..i);
        let rtt = now.saturating_duration_since(sent);
        self.last_rtt = Some(rtt);
        self.timeline.set_rtt(rtt);
        Some(rtt)
    }

    /// The backup sent a heartbeat: remember to answer it.
    pub fn heartbeat_to_answer(&mut self, nonce: u64, now: Instant) {
        self.heard(now);
        self.heartbeat_to_answer = Some(nonce);
    }

    /// The heartbeat to answer, if any (taken: answered once).
    pub fn take_heartbeat_answer(&mut self) -> Option<u64> {
        self.heartbeat_to_answer.take()
    }

    /// Whether the sender should write the unsent frames (from `next` on per
    /// writer) now, later, or has nothing to send: the coalescing rule of
    /// [`Coalesce`] under `rule` (`send_policy::decide`). Pure: `now` is passed in. Remembers an
    /// [`SendDecision::At`] answer for [`wake_sender_for`](Self::wake_sender_for).
    pub fn send_decision(
        &mut self,
        next: &BTreeMap<WriterId, Seq>,
        coalesce: Coalesce,
        rule: SendRule,
        now: Instant,
    ) -> SendDecision {
        // Writes sent in this session and not yet acked (below `next`).
        let outstanding = self.writers.iter().any(|(w, wb)| {
            next.get(w)
                .is_some_and(|&from| wb.unacked.range(..from).next().is_some())
        });
        // Writes not sent yet (from `next` on), writer by writer.
        let unsent = self
            .writers
            .iter()
            .filter_map(|(w, wb)| Some(wb.unacked.range(*next.get(w)?..)))
            .flatten()
            .map(|(_, e)| Unsent {
                issued_at: e.issued_at,
                cost: e.cost,
            });
        let (decision, bytes) = send_policy::decide(outstanding, unsent, coalesce, rule, now);
        self.sender_armed.after_decision(decision, coalesce, bytes);
        decision
    }

    /// A write of `cost` was just issued: whether it must wake the sender. Not
    /// when the sender sleeps until a deadline set for older unsent writes (that
    /// deadline, an ack or a mode switch wakes it anyway) and the byte bound is
    /// not reached: under load this spares one wake-up of the sender per write.
    pub fn wake_sender_for(&mut self, cost: u64) -> bool {
        self.sender_armed.wake_for(cost)
    }

    /// Write frames not yet sent in this session, from `next` on per writer, up to
    /// about `max_bytes`; advances `next` past them.
    pub fn unsent(&self, next: &mut BTreeMap<WriterId, Seq>, max_bytes: u64) -> Vec<Arc<Frame>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (w, wb) in &self.writers {
            let Some(from) = next.get_mut(w) else {
                continue;
            };
            for (seq, e) in wb.unacked.range(*from..) {
                out.push(Arc::clone(&e.frame));
                bytes += e.cost;
                *from = seq + 1;
                if bytes >= max_bytes {
                    return out;
                }
            }
        }
        out
    }

    /// Applies the backup-loss policy: degrades after the backup has been silent
    /// for the policy's delay, recovers once connected and the backlog is committed.
    pub fn check_degrade(
        &mut self,
        policy: BackupLossPolicy,
        now: Instant,
    ) -> Option<DegradeChange> {
        let BackupLossPolicy::DegradeToAsync { after } = policy else {
            return None;
        };
        let silent_for = self.silent_for(now);
        let degraded = self.degraded();
        if !degraded && silent_for >= after {
            for wb in self.writers.values_mut() {
                wb.backlog_mark = wb.written;
            }
            self.degrade_events += 1;
            self.degraded.send_replace(true);
            return Some(DegradeChange::Degraded { silent_for });
        }
        if degraded && self.connected && silent_for < after {
            let drained = self
                .writers
                .iter()
                .all(|(w, wb)| self.tracker.committed().get(w.index()) >= wb.backlog_mark);
            if drained {
                self.degraded.send_replace(false);
                return Some(DegradeChange::Recovered);
            }
        }
        None
    }

    /// Starts the high-water marks ([`Peaks`]) of every writer afresh.
    pub fn reset_peaks(&mut self) {
        for wb in self.writers.values_mut() {
            wb.peaks = Peaks::default();
        }
    }

    /// A snapshot for `status` (without the fields the client fills in).
    pub fn snapshot(&self, now: Instant, status: &mut ReplicationStatus) {
        status.connected = self.connected;
        status.registered = self.registered;
        status.degraded = self.degraded();
        status.degrade_events = self.degrade_events;
        status.sessions = self.sessions;
        status.last_rtt = self.last_rtt;
        status.silent_for = self.silent_for(now);
        status.last_heard_age = self.ever_heard.then(|| self.silent_for(now));
        status.last_error = self.last_error.clone();
        status.committed = *self.tracker.committed();
        status.inflight_bytes = self.inflight_bytes();
        status.writers = self
            .writers
            .iter()
            .map(|(w, wb)| {
                let oldest_unacked_age = wb
                    .unacked
                    .values()
                    .next()
                    .map(|e| now.saturating_duration_since(e.issued_at));
                WriterStatus {
                    writer: *w,
                    generation: wb.generation,
                    written: wb.written,
                    acked: self.tracker.committed().get(w.index()),
                    inflight_bytes: wb.inflight_bytes,
                    inflight_writes: wb.unacked.len(),
                    oldest_unacked_age,
                    fillers: wb.fillers,
                    peaks: Peaks {
                        lag: wb.peaks.lag,
                        commit_latency: wb
                            .peaks
                            .commit_latency
                            .max(oldest_unacked_age.unwrap_or_default()),
                    },
                }
            })
            .collect();
        status.disks = self
            .disks
            .iter()
            .map(|d| DiskStatus {
                name: d.name.clone(),
                size: d.size,
                writer: d.writer,
                inflight_bytes: d.inflight_bytes,
                inflight_writes: d.inflight_writes,
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipecloud_core::wire::WriterState;

    const W: WriterId = WriterId(1);
    const GEN: Generation = 42;

    fn state(now: Instant) -> (State, CausalState, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        let disks = vec![
            DiskSlot::new("a".into(), 1 << 20, W, 0),
            DiskSlot::new("b".into(), 1 << 20, W, 0),
        ];
        (State::new(disks, GEN, tx, now), CausalState::new(2), rx)
    }

    fn welcome(durable: Seq, generation: Generation, committed: CountVector) -> Welcome {
        Welcome {
            version: pipecloud_core::wire::PROTOCOL_VERSION,
            writers: vec![
                WriterState {
                    writer: WriterId(0),
                    generation: 7,
                    durable: 3,
                },
                WriterState {
                    writer: W,
                    generation,
                    durable,
                },
            ],
            committed,
        }
    }

    fn ack(first: Seq, last: Seq) -> Ack {
        Ack {
            writer: W,
            generation: GEN,
            first,
            last,
        }
    }

    fn seqs(frames: &[Arc<Frame>]) -> Vec<Seq> {
        frames
            .iter()
            .map(|f| match &**f {
                Frame::Write(w) => w.seq,
                _ => panic!("write frame expected"),
            })
            .collect()
    }

    fn data(n: usize) -> WriteKind {
        WriteKind::Data(vec![1; n])
    }

    #[test]
    fn numbering_continues_after_the_durable_prefix_and_acks_release_in_any_order() {
        let t0 = Instant::now();
        let (mut st, causal, _) = state(t0);
        let next = st
            .on_welcome(
                &welcome(10, GEN, CountVector::from_slice(&[3, 10])),
                &causal,
                t0,
            )
            .unwrap();
        assert_eq!(next.get(&W), Some(&11));
        assert_eq!(causal.sync_pending(0).get(W.index()), 10);
        assert_eq!(causal.committed(), CountVector::from_slice(&[3, 10]));
        for (i, disk) in [0, 1, 0].into_iter().enumerate() {
            let (w, seq, v) = st.issue(&causal, disk, 0, data(100), None, t0);
            assert_eq!((w, seq), (W, 11 + i as Seq));
            assert_eq!(v.get(W.index()), seq);
        }
        assert_eq!(st.inflight_bytes(), 3 * (100 + WRITE_OVERHEAD));
        assert_eq!(st.disks[0].inflight_writes, 2);
        let mut next = next;
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![11, 12, 13]);
        assert!(
            st.unsent(&mut next, u64::MAX).is_empty(),
            "each write sent once per session"
        );

        // Out of order: 13 first. Memory is released, the prefix does not move.
        st.on_ack(&ack(13, 13), &causal, t0).unwrap();
        assert_eq!(st.inflight_bytes(), 2 * (100 + WRITE_OVERHEAD));
        assert_eq!(causal.committed().get(W.index()), 10);
        st.on_ack(&ack(11, 12), &causal, t0).unwrap();
        assert_eq!(causal.committed().get(W.index()), 13);
        assert_eq!(st.inflight_bytes(), 0);
        assert_eq!(st.disks[0].inflight_writes + st.disks[1].inflight_writes, 0);
        // A duplicate changes nothing; an ack of another generation is ignored.
        st.on_ack(&ack(11, 13), &causal, t0).unwrap();
        let mut stale = ack(14, 20);
        stale.generation = GEN - 1;
        st.on_ack(&stale, &causal, t0).unwrap();
        assert_eq!(causal.committed().get(W.index()), 13);
    }

    #[test]
    fn peaks_keep_the_worst_lag_until_reset() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (mut st, causal, _) = state(t0);
        st.on_welcome(&welcome(0, GEN, CountVector::ZERO), &causal, t0)
            .unwrap();
        let peaks_at = |st: &State, now: Instant| {
            let mut s = ReplicationStatus::default();
            st.snapshot(now, &mut s);
            s.writers.iter().find(|w| w.writer == W).unwrap().peaks
        };
        let peaks = |st: &State| peaks_at(st, t0);
        assert_eq!(peaks(&st), Peaks::default());
        // Three writes at t0, t0+1ms, t0+2ms; nothing acked: a lag of 3.
        for i in 0..3 {
            st.issue(&causal, 0, 0, data(10), None, t0 + ms(i));
        }
        assert_eq!(peaks(&st).lag, 3);
        assert_eq!(peaks(&st).commit_latency, Duration::ZERO);
        // 1..=2 acked at t0+7ms: the oldest waited 7 ms. Then a fourth write: lag 2 < 3.
        st.on_ack(&ack(1, 2), &causal, t0 + ms(7)).unwrap();
        st.issue(&causal, 0, 0, data(10), None, t0 + ms(8));
        assert_eq!(
            peaks(&st),
            Peaks {
                lag: 3,
                commit_latency: ms(7)
            }
        );
        // Acked by a committed vector: 3 (issued at 2 ms) after 10 ms is the new worst.
        st.on_committed(&CountVector::from_slice(&[0, 4]), &causal, t0 + ms(12));
        assert_eq!(peaks(&st).commit_latency, ms(10));
        // An ack arriving later never lowers a peak; a reset starts afresh.
        st.reset_peaks();
        assert_eq!(peaks(&st), Peaks::default());
        st.issue(&causal, 0, 0, data(10), None, t0 + ms(20));
        // A write still waiting counts with its wait so far (a backup that stays away).
        assert_eq!(peaks_at(&st, t0 + ms(520)).commit_latency, ms(500));
        st.on_ack(&ack(5, 5), &causal, t0 + ms(21)).unwrap();
        assert_eq!(
            peaks(&st),
            Peaks {
                lag: 1,
                commit_latency: ms(1)
            }
        );
    }

    #[test]
    fn reconnect_resends_everything_above_the_durable_prefix() {
        let t0 = Instant::now();
        let (mut st, causal, _) = state(t0);
        st.on_welcome(&welcome(0, GEN, CountVector::ZERO), &causal, t0)
            .unwrap();
        for _ in 0..5 {
            st.issue(&causal, 0, 0, data(10), None, t0);
        }
        st.on_ack(&ack(4, 4), &causal, t0).unwrap();
        st.disconnected("test".into());
        // The backup durably holds 1..=2 (and 4, acked before).
        let mut next = st
            .on_welcome(
                &welcome(2, GEN, CountVector::from_slice(&[3, 2])),
                &causal,
                t0,
            )
            .unwrap();
        assert_eq!(causal.committed().get(W.index()), 2);
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![3, 5]);
        // Batches are bounded by bytes.
        let mut next = st
            .on_welcome(&welcome(2, GEN, CountVector::ZERO), &causal, t0)
            .unwrap();
        assert_eq!(seqs(&st.unsent(&mut next, 1)), vec![3]);
        assert_eq!(seqs(&st.unsent(&mut next, 1)), vec![5]);
    }

    /// A registered client with no write yet and the coalescing rule of the tests:
    /// 200 us for acks, 1 ms batches in async, three 10-byte writes fill the bound.
    fn coalescing() -> (
        Instant,
        Coalesce,
        State,
        CausalState,
        BTreeMap<WriterId, Seq>,
    ) {
        let t0 = Instant::now();
        let c = Coalesce {
            delay: Duration::from_micros(200),
            bytes: 3 * (10 + WRITE_OVERHEAD),
            async_delay: Duration::from_micros(1000),
        };
        let (mut st, causal, _) = state(t0);
        let next = st
            .on_welcome(&welcome(0, GEN, CountVector::ZERO), &causal, t0)
            .unwrap();
        (t0, c, st, causal, next)
    }

    #[test]
    fn coalescing_waits_for_acks_bytes_or_the_deadline() {
        let (t0, c, mut st, causal, mut next) = coalescing();
        let us = Duration::from_micros;
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0),
            SendDecision::Nothing
        );
        // Nothing unacked: a lone write goes at once.
        st.issue(&causal, 0, 0, data(10), None, t0);
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0),
            SendDecision::Now
        );
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![1]);
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0),
            SendDecision::Nothing
        );
        // Seq 1 unacked: later writes wait until the oldest waited `delay`...
        st.issue(&causal, 0, 0, data(10), None, t0 + us(10));
        st.issue(&causal, 1, 0, data(10), None, t0 + us(50));
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0 + us(60)),
            SendDecision::At(t0 + us(210))
        );
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0 + us(210)),
            SendDecision::Now
        );
        // ... or the ack of what was sent arrives ...
        st.on_ack(&ack(1, 1), &causal, t0 + us(70)).unwrap();
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0 + us(70)),
            SendDecision::Now
        );
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![2, 3]);
        // ... or `bytes` of them wait.
        st.issue(&causal, 0, 0, data(10), None, t0 + us(80));
        st.issue(&causal, 0, 0, data(10), None, t0 + us(80));
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0 + us(80)),
            SendDecision::At(t0 + us(280))
        );
        st.issue(&causal, 0, 0, data(10), None, t0 + us(80));
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0 + us(80)),
            SendDecision::Now
        );
        // A zero delay sends whatever is unsent.
        let eager = Coalesce {
            delay: Duration::ZERO,
            bytes: u64::MAX,
            async_delay: Duration::ZERO,
        };
        assert_eq!(
            st.send_decision(&next, eager, SendRule::AckClocked, t0 + us(80)),
            SendDecision::Now
        );
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![4, 5, 6]);
        assert_eq!(
            st.send_decision(&next, eager, SendRule::AckClocked, t0 + us(80)),
            SendDecision::Nothing
        );
    }

    #[test]
    fn async_batches_by_age_whatever_the_acks() {
        let (t0, c, mut st, causal, mut next) = coalescing();
        let us = Duration::from_micros;
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0),
            SendDecision::Nothing
        );
        // Even a lone write (nothing unacked) waits for its batch...
        st.issue(&causal, 0, 0, data(10), None, t0);
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0 + us(10)),
            SendDecision::At(t0 + us(1000))
        );
        st.issue(&causal, 0, 0, data(10), None, t0 + us(500));
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0 + us(999)),
            SendDecision::At(t0 + us(1000))
        );
        // ... until the oldest is `async_delay` old: then the whole batch goes.
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0 + us(1000)),
            SendDecision::Now
        );
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![1, 2]);
        // An ack does not release the next batch early (the ack-clocked rule would).
        st.issue(&causal, 0, 0, data(10), None, t0 + us(1100));
        st.on_ack(&ack(1, 2), &causal, t0 + us(1200)).unwrap();
        assert_eq!(
            st.send_decision(&next, c, SendRule::AckClocked, t0 + us(1200)),
            SendDecision::Now
        );
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0 + us(1200)),
            SendDecision::At(t0 + us(2100))
        );
        // A batch's worth of bytes goes at once.
        st.issue(&causal, 0, 0, data(10), None, t0 + us(1300));
        st.issue(&causal, 0, 0, data(10), None, t0 + us(1300));
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0 + us(1300)),
            SendDecision::Now
        );
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![3, 4, 5]);
        // A zero batch age sends at once.
        st.issue(&causal, 0, 0, data(10), None, t0 + us(1400));
        let eager = Coalesce {
            async_delay: Duration::ZERO,
            ..c
        };
        assert_eq!(
            st.send_decision(&next, eager, SendRule::ByAge, t0 + us(1400)),
            SendDecision::Now
        );
        // A flush sends at once under any rule.
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0 + us(1400)),
            SendDecision::At(t0 + us(2400))
        );
        assert_eq!(
            st.send_decision(&next, c, SendRule::AtOnce, t0 + us(1400)),
            SendDecision::Now
        );
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![6]);
        assert_eq!(
            st.send_decision(&next, c, SendRule::AtOnce, t0 + us(1400)),
            SendDecision::Nothing
        );
    }

    #[test]
    fn a_write_wakes_the_sender_only_when_no_deadline_covers_it() {
        let (t0, c, mut st, causal, mut next) = coalescing();
        let cost = 10 + WRITE_OVERHEAD;
        // An idle sender (nothing to send) is woken by the first write.
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0),
            SendDecision::Nothing
        );
        st.issue(&causal, 0, 0, data(10), None, t0);
        assert!(st.wake_sender_for(cost));
        // It sleeps until the batch is due: younger writes are covered...
        assert!(matches!(
            st.send_decision(&next, c, SendRule::ByAge, t0),
            SendDecision::At(_)
        ));
        st.issue(&causal, 0, 0, data(10), None, t0);
        assert!(!st.wake_sender_for(cost));
        // ... until they fill the byte bound, which the sender must see at once.
        st.issue(&causal, 0, 0, data(10), None, t0);
        assert!(st.wake_sender_for(cost));
        assert_eq!(
            st.send_decision(&next, c, SendRule::ByAge, t0),
            SendDecision::Now
        );
        assert_eq!(seqs(&st.unsent(&mut next, u64::MAX)), vec![1, 2, 3]);
        // Ack-clocked: a write waiting for acks is covered too (an ack wakes the sender).
        st.issue(&causal, 0, 0, data(10), None, t0);
        assert!(st.wake_sender_for(cost));
        assert!(matches!(
            st.send_decision(&next, c, SendRule::AckClocked, t0),
            SendDecision::At(_)
        ));
        st.issue(&causal, 0, 0, data(10), None, t0);
        assert!(!st.wake_sender_for(cost));
        // A sender that decided to send, or a session that ended, is woken again.
        assert_eq!(
            st.send_decision(&next, c, SendRule::AtOnce, t0),
            SendDecision::Now
        );
        assert!(st.wake_sender_for(cost));
        assert!(matches!(
            st.send_decision(&next, c, SendRule::AckClocked, t0),
            SendDecision::At(_)
        ));
        st.disconnected("test".into());
        assert!(st.wake_sender_for(cost));
    }

    #[test]
    fn skipped_seqs_are_filled_so_the_prefix_can_pass() {
        let t0 = Instant::now();
        let (mut st, causal, _) = state(t0);
        let mut next = st
            .on_welcome(&welcome(5, GEN, CountVector::ZERO), &causal, t0)
            .unwrap();
        // A tag from a peer carried a higher own entry (an old incarnation's writes).
        causal.merge(0, &CountVector::from_slice(&[0, 8]));
        let (_, seq, _) = st.issue(&causal, 1, 4096, data(1), None, t0);
        assert_eq!(seq, 9);
        let frames = st.unsent(&mut next, u64::MAX);
        assert_eq!(seqs(&frames), vec![6, 7, 8, 9]);
        for f in &frames[..3] {
            let Frame::Write(w) = &**f else {
                unreachable!()
            };
            assert_eq!(w.kind, WriteKind::Zeroes { len: 0 });
            assert!(pipecloud_core::codec::validate_frame(f).is_ok());
        }
        st.on_ack(&ack(6, 9), &causal, t0).unwrap();
        assert_eq!(causal.committed().get(W.index()), 9);
        assert_eq!(st.inflight_bytes(), 0);
    }

    #[test]
    fn claims_beyond_what_was_written_are_refused_or_clamped() {
        let t0 = Instant::now();
        let (mut st, causal, _) = state(t0);
        assert!(st
            .on_welcome(&welcome(0, GEN + 1, CountVector::ZERO), &causal, t0)
            .is_err());
        st.on_welcome(&welcome(0, GEN, CountVector::ZERO), &causal, t0)
            .unwrap();
        st.issue(&causal, 0, 0, data(1), None, t0);
        assert!(st.on_ack(&ack(1, 2), &causal, t0).is_err());
        assert_eq!(causal.committed().get(W.index()), 0);
        st.on_committed(&CountVector::from_slice(&[9, 50]), &causal, t0);
        assert_eq!(causal.committed(), CountVector::from_slice(&[9, 1]));
        assert_eq!(st.inflight_bytes(), 0);
        let mut other = ack(1, 1);
        other.writer = WriterId(3);
        assert!(st.on_ack(&other, &causal, t0).is_err());
    }

    #[test]
    fn degrade_after_silence_and_recover_when_the_backlog_is_committed() {
        let t0 = Instant::now();
        let (mut st, causal, degraded) = state(t0);
        let policy = BackupLossPolicy::DegradeToAsync {
            after: Duration::from_secs(3),
        };
        st.on_welcome(&welcome(0, GEN, CountVector::ZERO), &causal, t0)
            .unwrap();
        st.issue(&causal, 0, 0, data(1), None, t0);
        assert_eq!(
            st.check_degrade(BackupLossPolicy::Stall, t0 + Duration::from_secs(60)),
            None
        );
        assert_eq!(st.check_degrade(policy, t0 + Duration::from_secs(2)), None);
        st.disconnected("gone".into());
        let t1 = t0 + Duration::from_secs(4);
        assert!(matches!(
            st.check_degrade(policy, t1),
            Some(DegradeChange::Degraded { .. })
        ));
        assert!(*degraded.borrow());
        st.issue(&causal, 0, 0, data(1), None, t1);
        // Reconnected, but seqs 1..=2 are not committed yet: still degraded.
        st.on_welcome(&welcome(0, GEN, CountVector::ZERO), &causal, t1)
            .unwrap();
        assert_eq!(st.check_degrade(policy, t1), None);
        st.issue(&causal, 0, 0, data(1), None, t1);
        st.on_ack(&ack(1, 2), &causal, t1).unwrap();
        // The backlog at reconnection (1..=2) is committed; seq 3 came later.
        assert_eq!(st.check_degrade(policy, t1), Some(DegradeChange::Recovered));
        assert!(!*degraded.borrow());
        let mut s = ReplicationStatus::default();
        st.snapshot(t1, &mut s);
        assert_eq!(s.degrade_events, 1);
        assert_eq!(s.writers[0].written, 3);
        assert_eq!(s.writers[0].lag(), 1);
        assert_eq!(s.sessions, 2);
    }

    #[test]
    fn last_heard_age_and_oldest_unacked_age_grow_while_the_backup_is_silent() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (mut st, causal, _) = state(t0);
        let snap = |st: &State, now| {
            let mut s = ReplicationStatus {
                heartbeat_interval: ms(100),
                ..Default::default()
            };
            st.snapshot(now, &mut s);
            s
        };
        // Never heard from: no age (not the time since the client started).
        let s = snap(&st, t0 + ms(50));
        assert_eq!(s.last_heard_age, None);
        assert_eq!(s.silent_for, ms(50));
        assert_eq!(s.link(), super::super::LinkState::Down);
        st.on_welcome(&welcome(0, GEN, CountVector::ZERO), &causal, t0 + ms(100))
            .unwrap();
        st.issue(&causal, 0, 0, data(10), None, t0 + ms(110));
        let s = snap(&st, t0 + ms(150));
        assert_eq!(s.last_heard_age, Some(ms(50)));
        assert_eq!(s.writers[0].oldest_unacked_age, Some(ms(40)));
        assert_eq!(s.link(), super::super::LinkState::Up);
        // The backup goes silent: both ages grow with `now`, and the link turns
        // late after two heartbeat intervals while the session still stands.
        let s = snap(&st, t0 + ms(400));
        assert_eq!(s.last_heard_age, Some(ms(300)));
        assert_eq!(s.writers[0].oldest_unacked_age, Some(ms(290)));
        assert!(s.connected);
        assert_eq!(s.link(), super::super::LinkState::Late);
        // Any frame resets the silence (a heartbeat reply with an unknown nonce too).
        assert_eq!(st.heartbeat_reply(99, t0 + ms(410)), None);
        let s = snap(&st, t0 + ms(420));
        assert_eq!(s.last_heard_age, Some(ms(10)));
        assert_eq!(s.link(), super::super::LinkState::Up);
        // The ack clears the oldest unacked write; the heard age restarts.
        st.on_ack(&ack(1, 1), &causal, t0 + ms(430)).unwrap();
        let s = snap(&st, t0 + ms(440));
        assert_eq!(s.writers[0].oldest_unacked_age, None);
        assert_eq!(s.last_heard_age, Some(ms(10)));
        // A lost session keeps the last heard age growing (not reset by the disconnect).
        st.disconnected("gone".into());
        let s = snap(&st, t0 + ms(1430));
        assert_eq!(s.last_heard_age, Some(ms(1000)));
        assert_eq!(s.link(), super::super::LinkState::Down);
    }

    #[test]
    fn heartbeat_rtt_is_measured_from_the_matching_nonce() {
        let t0 = Instant::now();
        let (mut st, _, _) = state(t0);
        for n in 0..20 {
            st.heartbeat_sent(n, t0 + Duration::from_millis(n));
        }
        assert_eq!(
            st.heartbeat_reply(3, t0 + Duration::from_secs(1)),
            None,
            "forgotten"
        );
        assert_eq!(
            st.heartbeat_reply(15, t0 + Duration::from_millis(40)),
            Some(Duration::from_millis(25))
        );
        assert_eq!(
            st.heartbeat_reply(14, t0 + Duration::from_millis(40)),
            None,
            "older dropped"
        );
        // The backup's own heartbeats are answered once, latest nonce only.
        st.heartbeat_to_answer(1, t0);
        st.heartbeat_to_answer(2, t0);
        assert_eq!(st.take_heartbeat_answer(), Some(2));
        assert_eq!(st.take_heartbeat_answer(), None);
    }
}
