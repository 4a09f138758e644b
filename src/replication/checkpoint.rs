//! The checkpoint link: how the full-state epoch driver (`crate::fullstate`)
//! uses the group's replication connection (docs/design.md §9).
//!
//! Checkpoint frames share the one TLS connection with the disk writes: the
//! driver's shipper thread encodes each frame and queues it here; the session's
//! send loop writes queued bytes between its write batches. In the other
//! direction the session hands every `Checkpoint::Ack` and every new connection
//! (with the epoch the backup's welcome says is acknowledged, entry
//! `EPOCH_ENTRY` of its committed vector) to the driver's [`CheckpointEvents`].
//!
//! Connections: every frame is queued for a connection *generation*. The driver
//! sets a new generation when a connection is welcomed ([`CheckpointLink::new_connection`],
//! which also drops what was queued for the old one); a frame pushed for an older
//! generation is refused, so an epoch half-sent on a broken connection is never
//! continued on the next one (the backup would see a torn epoch).
//!
//! Bound: at most `max_bytes` of encoded frames wait here; the shipper blocks at
//! the bound (so shipping falls behind, and the next pause waits: see
//! `pipecloud_core::epoch`). A closed link refuses pushes.

use anyhow::Result;
use pipecloud_core::codec::encode_frame;
use pipecloud_core::wire::Frame;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use tokio::sync::Notify;

/// What the session reports to the epoch driver.
pub trait CheckpointEvents: Send + Sync {
    /// A connection was welcomed; the backup has acknowledged up to `backup_acked`.
    fn welcome(&self, backup_acked: u64);
    /// The backup acknowledged the group's `epoch`.
    fn ack(&self, epoch: u64);
}

struct Outbox {
    generation: u64,
    queued: VecDeque<Vec<u8>>,
    bytes: usize,
    closed: bool,
}

/// The queue between the epoch driver and the replication session.
pub struct CheckpointLink {
    outbox: Mutex<Outbox>,
    room: Condvar,
    ready: Notify,
    max_bytes: usize,
    events: std::sync::OnceLock<std::sync::Arc<dyn CheckpointEvents>>,
}

impl CheckpointLink {
    /// A link holding at most `max_bytes` of queued frames.
    pub fn new(max_bytes: usize) -> Self {
        CheckpointLink {
            outbox: Mutex::new(Outbox {
                generation: 0,
                queued: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            room: Condvar::new(),
            ready: Notify::new(),
            max_bytes,
            events: std::sync::OnceLock::new(),
        }
    }

    /// Sets the driver that receives welcomes and acks (once).
    pub fn set_events(&self, events: std::sync::Arc<dyn CheckpointEvents>) {
        let _ = self.events.set(events);
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Driver: frames are now for connection `generation`; drops the rest.
    pub fn new_connection(&self, generation: u64) {
        let mut o = self.lock();
        o.generation = generation;
        o.queued.clear();
        o.bytes = 0;
        self.room.notify_all();
    }

    /// Shipper (a blocking thread): queues `frame` for connection `generation`,
    /// waiting while the link is full. `Ok(false)`: the connection changed (or
    /// the link closed); stop shipping this epoch.
    pub fn push(&self, generation: u64, frame: &Frame) -> Result<bool> {
        let mut bytes = Vec::new();
        encode_frame(frame, &mut bytes)?;
        let mut o = self.lock();
        loop {
            if o.closed || o.generation != generation {
                return Ok(false);
            }
            if o.bytes == 0 || o.bytes + bytes.len() <= self.max_bytes {
                break;
            }
            o = self.room.wait(o).unwrap_or_else(|e| e.into_inner());
        }
        o.bytes += bytes.len();
        o.queued.push_back(bytes);
        drop(o);
        self.ready.notify_one();
        Ok(true)
    }

    /// Refuses every later push and wakes a blocked shipper.
    pub fn close(&self) {
        self.lock().closed = true;
        self.room.notify_all();
    }

    /// Session: appends queued frames to `out` (whole frames, about `max` bytes).
    pub fn take(&self, out: &mut Vec<u8>, max: usize) {
        let mut o = self.lock();
        let mut taken = 0;
        while taken < max {
            let Some(f) = o.queued.pop_front() else { break };
            taken += f.len();
            o.bytes -= f.len();
            out.extend_from_slice(&f);
        }
        if taken > 0 {
            self.room.notify_all();
        }
    }

    /// Session: woken when frames are queued.
    pub(crate) fn ready(&self) -> &Notify {
        &self.ready
    }

    /// Session: a connection was welcomed.
    pub fn on_welcome(&self, backup_acked: u64) {
        if let Some(e) = self.events.get() {
            e.welcome(backup_acked);
        }
    }

    /// Session: the backup acknowledged `epoch`.
    pub fn on_ack(&self, epoch: u64) {
        if let Some(e) = self.events.get() {
            e.ack(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipecloud_core::wire::Checkpoint;

    #[test]
    fn stale_generation_is_refused_and_queue_dropped() {
        let l = CheckpointLink::new(1 << 20);
        let f = Frame::Checkpoint(Checkpoint::Ack { epoch: 1 });
        l.new_connection(1);
        assert!(l.push(1, &f).unwrap());
        l.new_connection(2);
        let mut out = Vec::new();
        l.take(&mut out, usize::MAX);
        assert!(out.is_empty(), "frames of the old connection dropped");
        assert!(!l.push(1, &f).unwrap());
        assert!(l.push(2, &f).unwrap());
        l.take(&mut out, usize::MAX);
        assert!(!out.is_empty());
        l.close();
        assert!(!l.push(2, &f).unwrap());
    }
}
