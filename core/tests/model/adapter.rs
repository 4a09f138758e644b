//! Thin adapter between the model and the core modules under test: the real
//! commit tracker, netqueue and failover cut of `pipecloud-core`. The model talks
//! only to these wrappers, so an API change touches this file alone.

use pipecloud_core::commit::{AckOutcome, CommitTracker};
use pipecloud_core::cut::{self, VecHistory, WriterHistory};
use pipecloud_core::netqueue::{FlowId, NetQueue, NetQueueLimits, Push};
use pipecloud_core::{CountVector, Seq, WriterId};

pub use pipecloud_core::wire::Generation;
/// Handle of a client-bound packet inside the model.
pub type PacketId = u32;

/// What an ack did to the commit tracker.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum AckResult {
    /// Accepted (whether or not the committed vector moved).
    Accepted,
    /// Ignored because it belongs to another generation of the writer.
    Stale,
    /// Refused with an error (a model violation: the model only sends valid acks).
    Refused(String),
}

/// The real commit tracker ([`pipecloud_core::commit::CommitTracker`]).
pub struct Tracker(CommitTracker);

impl Tracker {
    pub fn new() -> Self {
        Tracker(CommitTracker::new())
    }

    /// Registers a writer generation whose seqs start after `base`.
    pub fn register(
        &mut self,
        w: WriterId,
        generation: Generation,
        base: Seq,
    ) -> Result<(), String> {
        self.0
            .register(w, generation, base)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub fn ack(&mut self, w: WriterId, generation: Generation, first: Seq, last: Seq) -> AckResult {
        match self.0.ack(w, generation, first, last) {
            Ok(AckOutcome::Advanced { .. } | AckOutcome::Unchanged) => AckResult::Accepted,
            Ok(AckOutcome::StaleGeneration { .. }) => AckResult::Stale,
            Err(e) => AckResult::Refused(e.to_string()),
        }
    }

    /// Agent side of the committed-push mode: adopt a vector pushed by the backup.
    pub fn observe(&mut self, committed: &CountVector) {
        self.0.observe_committed(committed);
    }

    pub fn committed(&self) -> CountVector {
        *self.0.committed()
    }
}

/// Result of pushing a packet into the netqueue.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Pushed {
    Released(PacketId),
    Held,
    Full(PacketId),
}

/// The real netqueue ([`pipecloud_core::netqueue::NetQueue`]).
pub struct Queue(NetQueue<PacketId>);

impl Queue {
    pub fn new(max_packets: usize, max_bytes: usize) -> Self {
        Queue(NetQueue::new(NetQueueLimits {
            max_packets,
            max_bytes,
        }))
    }

    pub fn push(
        &mut self,
        flow: u32,
        tag: &CountVector,
        bytes: usize,
        id: PacketId,
        committed: &CountVector,
    ) -> Pushed {
        match self
            .0
            .push(FlowId(u64::from(flow)), tag, bytes, id, committed)
        {
            Push::Release(h) => Pushed::Released(h),
            Push::Held => Pushed::Held,
            Push::Full(h) => Pushed::Full(h),
        }
    }

    pub fn release(&mut self, committed: &CountVector, out: &mut Vec<PacketId>) {
        self.0.release(committed, out);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// The backup's journaled history of one writer: the real [`VecHistory`].
#[derive(Default)]
pub struct History(VecHistory);

impl History {
    /// Journals write `seq` with the vector it carried (any order, holes allowed).
    pub fn insert(&mut self, seq: Seq, vector: CountVector) {
        self.0.insert(seq, vector);
    }

    pub fn durable_prefix(&self) -> Seq {
        self.0.durable_prefix()
    }
}

/// The failover cut: the real [`cut::largest_closed_cut`] over the histories.
pub fn largest_closed_cut(histories: &[History]) -> CountVector {
    let refs: Vec<&dyn WriterHistory> = histories
        .iter()
        .map(|h| &h.0 as &dyn WriterHistory)
        .collect();
    cut::largest_closed_cut(&refs)
}
