//! The journal thread: group commit, acks and committed-vector fan-out.
//!
//! Connections hand validated writes (and hello registrations and fences) to one
//! dedicated thread through a bounded channel ([`INGEST_QUEUE`] requests, plus a
//! byte budget of [`INGEST_BUDGET_KIB`] KiB held by the requests in flight; a
//! connection that cannot get either stops reading its TCP stream, which pushes
//! back on the agent). The thread:
//!
//! 1. takes one request, then drains whatever else is queued (up to
//!    [`MAX_BATCH`] writes / [`MAX_BATCH_BYTES`]);
//! 2. asks the batch ([`crate::batch`], the pure part that decides) what to do with
//!    each: drop writes of fenced / failed groups and of stale generations (logged),
//!    ack resends of journaled writes again without re-journaling, append the rest;
//! 3. appends all new records to the groups' active segments, then issues **one
//!    fdatasync per touched segment** for the whole batch;
//! 4. indexes the records, publishes the new committed vector, which every
//!    connection of the group forwards as `Frame::Committed`, and sends every
//!    writer's connection the `Ack`s the batch gives (coalesced into seq ranges;
//!    the batch asserts each acked write's segment was synced).
//!
//! Registrations and fences are processed in channel order between batches, so a
//! fence is a clean cut in the stream of writes. A journal I/O error marks the group
//! failed: nothing of the batch is acked, its connections are closed and hellos are
//! refused until restart (recovery then keeps whatever made it to disk intact).

use crate::batch::{Batch, GroupView, Item, Verdict, WriteKey};
use crate::index::{Entry, Insert, Loc, MAX_AHEAD};
use crate::journal::ActiveSegment;
use crate::metrics::Metrics;
use crate::record::{self, RecordHead, RecordKind};
use crate::store::{lock, Group, Store};
use pipecloud_core::wire::{Frame, Hello, Welcome, Write, WriteKind};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tracing::warn;

/// Requests the ingest channel holds.
pub const INGEST_QUEUE: usize = 4096;
/// KiB of write payload in flight between connections and the journal thread.
pub const INGEST_BUDGET_KIB: usize = 128 * 1024;
/// Most writes in one group-commit batch.
pub const MAX_BATCH: usize = 4096;
/// Most payload bytes in one batch.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// The sending side of one agent connection.
#[derive(Debug)]
pub struct ConnOut {
    pub id: u64,
    pub agent: String,
    /// Outbound frames (bounded; see `server::OUTBOUND_QUEUE`).
    pub tx: mpsc::Sender<Frame>,
    /// Set to `true` when the connection must be closed (outbound queue full).
    pub kill: watch::Sender<bool>,
    pub killed: AtomicBool,
}

impl ConnOut {
    /// Queues a frame; if the queue is full the connection is closed (the agent
    /// reconnects and resends what was not acked).
    pub fn send_or_kill(&self, f: Frame) -> bool {
        match self.tx.try_send(f) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.killed.swap(true, Ordering::Relaxed) {
                    warn!(conn = self.id, agent = %self.agent, "outbound queue full (agent not reading); closing connection");
                    self.kill.send_replace(true);
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A validated write on its way to the journal.
#[derive(Debug)]
pub struct WriteReq {
    pub group: Arc<Group>,
    pub conn: Arc<ConnOut>,
    /// Disk index within the group.
    pub disk: u32,
    pub disk_name: String,
    pub write: Write,
    pub recv_ms: u64,
    pub recv_at: Instant,
    pub permit: Option<OwnedSemaphorePermit>,
    /// Bytes counted in `Group::queued_bytes` for this write (released on drop).
    pub queued: u64,
}

impl Drop for WriteReq {
    fn drop(&mut self) {
        self.group
            .queued_bytes
            .fetch_sub(self.queued, Ordering::Relaxed);
    }
}

/// Work for the journal thread.
#[derive(Debug)]
pub enum Req {
    /// Writes admitted by one connection, in arrival order (one wake-up of the
    /// journal thread for all of them).
    Writes(Vec<WriteReq>),
    Register {
        group: Arc<Group>,
        hello: Hello,
        version: u16,
        reply: oneshot::Sender<Result<Welcome, String>>,
    },
    Fence {
        group: Arc<Group>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Runs the journal thread until every sender is gone.
pub fn run(store: Arc<Store>, mut rx: mpsc::Receiver<Req>, metrics: Arc<Metrics>) {
    let mut pending: Vec<WriteReq> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        let mut bytes = 0usize;
        while let Some(req) = next.take() {
            match req {
                Req::Writes(ws) => {
                    bytes += ws.iter().map(|w| payload_len(&w.write)).sum::<usize>();
                    pending.extend(ws);
                }
                Req::Register {
                    group,
                    hello,
                    version,
                    reply,
                } => {
                    commit_batch(&store, &mut pending, &metrics);
                    let r = group.register(&hello, version).map_err(|e| e.to_string());
                    let _ = reply.send(r);
                }
                Req::Fence { group, reply } => {
                    commit_batch(&store, &mut pending, &metrics);
                    let r = group.fence().map_err(|e| e.to_string());
                    let _ = reply.send(r);
                }
            }
            if pending.len() >= MAX_BATCH || bytes >= MAX_BATCH_BYTES {
                break;
            }
            next = rx.try_recv().ok();
        }
        commit_batch(&store, &mut pending, &metrics);
    }
}

fn payload_len(w: &Write) -> usize {
    match &w.kind {
        WriteKind::Data(d) => d.len(),
        _ => 0,
    }
}

/// Per-group append state within one batch.
struct GroupBatch {
    group: Arc<Group>,
    /// Appended records to index once synced: batch item and location.
    staged: Vec<(Item, Loc)>,
    buf: Vec<u8>,
    /// Segments rolled during this batch (synced before acking).
    closed: Vec<ActiveSegment>,
    failed: bool,
}

/// What `g`'s state says about write `w` (under the state lock).
fn view_of(g: &Group, w: &Write) -> GroupView {
    let st = lock(&g.state);
    if st.meta.fenced || st.failed.is_some() {
        return GroupView::Closed;
    }
    match st.writers.get(&w.writer) {
        None => GroupView::Unregistered,
        Some(ix) => GroupView::Writer {
            generation: ix.generation,
            journaled: ix.contains(w.seq),
            too_far_ahead: w.seq > ix.durable() + MAX_AHEAD,
        },
    }
}

/// One group commit: the I/O around a [`Batch`] (which decides what to append,
/// sync, ack and publish).
fn commit_batch(store: &Store, pending: &mut Vec<WriteReq>, metrics: &Metrics) {
    if pending.is_empty() {
        return;
    }
    metrics.batches.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    for r in pending.iter() {
        metrics
            .queue_latency
            .observe(started.saturating_duration_since(r.recv_at));
    }
    let mut plan = Batch::new();
    let mut batches: BTreeMap<String, GroupBatch> = BTreeMap::new();
    // Indexed by batch item.
    let mut reqs: Vec<WriteReq> = Vec::with_capacity(pending.len());
    for req in pending.drain(..) {
        let g = req.group.clone();
        let w = &req.write;
        let key = WriteKey {
            conn: req.conn.id,
            writer: w.writer,
            generation: w.generation,
            seq: w.seq,
        };
        let (item, verdict) = plan.admit(&g.name, view_of(&g, w), key);
        let gb = batches.entry(g.name.clone()).or_insert_with(|| GroupBatch {
            group: g.clone(),
            staged: Vec::new(),
            buf: Vec::new(),
            closed: Vec::new(),
            failed: false,
        });
        match verdict {
            Verdict::Drop(why) => {
                warn!(group = %g.name, agent = %req.conn.agent, writer = %w.writer, generation = w.generation, seq = w.seq,
                    reason = why, "write not journaled");
                metrics.rejections.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Duplicate => {
                metrics.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Append if gb.failed => {}
            Verdict::Append => match stage(store, gb, &req) {
                Ok(loc) => {
                    plan.appended(item, loc.segment);
                    gb.staged.push((item, loc));
                }
                Err(e) => fail_group(gb, &mut plan, &e),
            },
        }
        reqs.push(req);
    }
    // Write and sync every group's batch.
    for gb in batches.values_mut() {
        if gb.failed {
            continue;
        }
        match flush_group(gb, metrics) {
            Ok(synced) => {
                for n in synced {
                    plan.synced(&gb.group.name, n);
                }
            }
            Err(e) => fail_group(gb, &mut plan, &e),
        }
    }
    metrics.journal_latency.observe(started.elapsed());
    // Index what is durable now.
    for gb in batches.values().filter(|gb| !gb.failed) {
        let g = &gb.group;
        let mut st = lock(&g.state);
        for &(item, loc) in &gb.staged {
            let req = &reqs[item];
            let w = &req.write;
            let (kind, len) = kind_len(&w.kind);
            let entry = Entry {
                loc,
                disk: req.disk,
                offset: w.offset,
                kind,
                len,
                recv_ms: req.recv_ms,
                vector: w.vector,
                prefix_deps: pipecloud_core::CountVector::ZERO,
                prefix_time: 0,
            };
            match g.journaled(&mut st, w.writer, w.seq, entry) {
                Insert::Added => {
                    metrics.writes.fetch_add(1, Ordering::Relaxed);
                    metrics.write_bytes.fetch_add(len, Ordering::Relaxed);
                }
                Insert::Duplicate => {}
                Insert::TooFarAhead => plan.not_indexed(item),
            }
        }
    }
    // Publish, then ack.
    for name in plan.publish() {
        if let Some(gb) = batches.get(name) {
            gb.group.publish(&lock(&gb.group.state));
        }
    }
    let acks = plan.acks();
    for &item in &acks.items {
        metrics.ack_latency.observe(reqs[item].recv_at.elapsed());
        metrics.acks.fetch_add(1, Ordering::Relaxed);
    }
    let conns: BTreeMap<u64, &Arc<ConnOut>> = reqs.iter().map(|r| (r.conn.id, &r.conn)).collect();
    for (conn, ack) in acks.frames {
        if let Some(c) = conns.get(&conn) {
            c.send_or_kill(Frame::Ack(ack));
        }
    }
}

fn kind_len(k: &WriteKind) -> (RecordKind, u64) {
    match k {
        WriteKind::Data(d) => (RecordKind::Data, d.len() as u64),
        WriteKind::Zeroes { len } => (RecordKind::Zeroes, *len),
        WriteKind::Trim { len } => (RecordKind::Trim, *len),
    }
}

/// Encodes the record into the group's batch buffer, rolling the segment if needed.
fn stage(store: &Store, gb: &mut GroupBatch, req: &WriteReq) -> Result<Loc, String> {
    let w = &req.write;
    let (kind, len) = kind_len(&w.kind);
    let head = RecordHead {
        recv_ms: req.recv_ms,
        writer: w.writer,
        generation: w.generation,
        seq: w.seq,
        disk: req.disk_name.clone(),
        offset: w.offset,
        kind,
        len,
        vector: w.vector,
    };
    let payload: &[u8] = match &w.kind {
        WriteKind::Data(d) => d,
        _ => &[],
    };
    let mut rec = Vec::with_capacity(payload.len() + 256);
    let (rec_len, _) = record::encode(&head, payload, &mut rec).map_err(|e| e.to_string())?;
    let g = gb.group.clone();
    let jdir = g.journal_dir();
    let mut tail = lock(&g.tail);
    let need_roll = match &tail.active {
        None => true,
        Some(a) => {
            a.len + gb.buf.len() as u64 + rec_len as u64 > store.limits.segment_bytes
                && a.len + gb.buf.len() as u64 > crate::journal::SEGMENT_HEADER_LEN
        }
    };
    if need_roll {
        if let Some(mut old) = tail.active.take() {
            old.append(&gb.buf)
                .map_err(|e| format!("append to segment {}: {e}", old.number))?;
            gb.buf.clear();
            gb.closed.push(old);
        }
        let n = tail.next_number;
        let seg =
            ActiveSegment::create(&jdir, n).map_err(|e| format!("create segment {n}: {e}"))?;
        tail.next_number = n + 1;
        tail.active = Some(seg);
        g.segment_opened(n);
    }
    let a = tail
        .active
        .as_ref()
        .ok_or_else(|| "no active segment".to_string())?;
    let loc = Loc {
        segment: a.number,
        offset: a.len + gb.buf.len() as u64,
        len: rec_len as u32,
    };
    drop(tail);
    gb.buf.extend_from_slice(&rec);
    g.claim_segment(loc.segment, w.writer, w.seq);
    Ok(loc)
}

/// Appends the group's buffered records and fdatasyncs every segment they went
/// to; returns the segments synced.
fn flush_group(gb: &mut GroupBatch, metrics: &Metrics) -> Result<Vec<u64>, String> {
    let g = gb.group.clone();
    let mut synced = Vec::new();
    let mut tail = lock(&g.tail);
    if let Some(a) = tail.active.as_mut() {
        if !gb.buf.is_empty() {
            let before = a.len;
            if let Err(e) = a.append(&gb.buf) {
                let _ = a.truncate(before);
                return Err(format!("append to segment {}: {e}", a.number));
            }
            gb.buf.clear();
        }
        if !gb.staged.is_empty() {
            a.sync()
                .map_err(|e| format!("fdatasync segment {}: {e}", a.number))?;
            metrics.fsyncs.fetch_add(1, Ordering::Relaxed);
            synced.push(a.number);
        }
    }
    for c in gb.closed.drain(..) {
        c.sync()
            .map_err(|e| format!("fdatasync segment {}: {e}", c.number))?;
        metrics.fsyncs.fetch_add(1, Ordering::Relaxed);
        synced.push(c.number);
    }
    Ok(synced)
}

fn fail_group(gb: &mut GroupBatch, plan: &mut Batch, e: &str) {
    gb.failed = true;
    plan.fail(&gb.group.name);
    gb.group.journal_failed(e);
}
