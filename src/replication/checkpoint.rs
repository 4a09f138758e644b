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
//! Connections: the link numbers the connections (*generations*). A frame is
//! queued for one generation; when a new connection is welcomed the link drops
//! what was queued for the old one and refuses later pushes for it, so an epoch
//! half-sent on a broken connection is never continued on the next one (the
//! backup would see a torn epoch).
//!
//! Synchronisation: the backup sends `Ack { epoch: acked }` as soon as a
//! connection opens (when it acknowledged anything), before it reads the agent's
//! frames, so that ack arrives before the reply to the agent's first heartbeat.
//! The link therefore keeps acks that arrive before that first heartbeat reply
//! as the connection's *backup acked* epoch and then reports the connection to
//! the driver ([`CheckpointEvents::connection`]); later acks are reported as
//! they come. A driver attached late gets the current connection at once.
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
    /// Connection `generation` is synchronised: the backup had acknowledged up to
    /// `backup_acked` when it opened (0: nothing). May repeat for a generation.
    fn connection(&self, generation: u64, backup_acked: u64);
    /// The backup acknowledged the group's `epoch` on connection `generation`.
    fn ack(&self, generation: u64, epoch: u64);
}

struct Outbox {
    generation: u64,
    queued: VecDeque<Vec<u8>>,
    bytes: usize,
    closed: bool,
    /// The current connection had its first heartbeat reply.
    synced: bool,
    /// Largest ack before that.
    connect_ack: u64,
}

/// The queue between the epoch driver and the replication session.
pub struct CheckpointLink {
    outbox: Mutex<Outbox>,
    room: Condvar,
    ready: Notify,
    max_bytes: usize,
    events: std::sync::OnceLock<std::sync::Arc<dyn CheckpointEvents>>,
}

impl std::fmt::Debug for CheckpointLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = self.lock();
        f.debug_struct("CheckpointLink")
            .field("generation", &o.generation)
            .field("queued_bytes", &o.bytes)
            .field("synced", &o.synced)
            .finish()
    }
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
                synced: false,
                connect_ack: 0,
            }),
            room: Condvar::new(),
            ready: Notify::new(),
            max_bytes,
            events: std::sync::OnceLock::new(),
        }
    }

    /// Sets the driver that receives connections and acks (once); reports the
    /// current connection at once if it is synchronised.
    pub fn set_events(&self, events: std::sync::Arc<dyn CheckpointEvents>) {
        let _ = self.events.set(events);
        let now = {
            let o = self.lock();
            o.synced.then_some((o.generation, o.connect_ack))
        };
        if let (Some((g, a)), Some(e)) = (now, self.events.get()) {
            e.connection(g, a);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Session: a connection was welcomed: a new generation; what was queued
    /// for the old one is dropped.
    pub fn on_welcome(&self) {
        let mut o = self.lock();
        o.generation += 1;
        o.queued.clear();
        o.bytes = 0;
        o.synced = false;
        o.connect_ack = 0;
        drop(o);
        self.room.notify_all();
    }

    /// Session: the reply to a heartbeat arrived (the first one after a welcome
    /// synchronises the connection).
    pub fn on_heartbeat_reply(&self) {
        let now = {
            let mut o = self.lock();
            if o.synced {
                return;
            }
            o.synced = true;
            (o.generation, o.connect_ack)
        };
        if let Some(e) = self.events.get() {
            e.connection(now.0, now.1);
        }
    }

    /// Session: the backup acknowledged `epoch`.
    pub fn on_ack(&self, epoch: u64) {
        let generation = {
            let mut o = self.lock();
            if !o.synced {
                o.connect_ack = o.connect_ack.max(epoch);
                return;
            }
            o.generation
        };
        if let Some(e) = self.events.get() {
            e.ack(generation, epoch);
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
        l.on_welcome();
        assert!(l.push(1, &f).unwrap());
        l.on_welcome();
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

    #[test]
    fn acks_before_the_first_heartbeat_reply_are_the_connections_acked_epoch() {
        #[derive(Default)]
        struct Seen(Mutex<Vec<String>>);
        impl CheckpointEvents for Seen {
            fn connection(&self, g: u64, a: u64) {
                self.0.lock().unwrap().push(format!("conn {g} {a}"));
            }
            fn ack(&self, g: u64, e: u64) {
                self.0.lock().unwrap().push(format!("ack {g} {e}"));
            }
        }
        let l = CheckpointLink::new(1 << 20);
        l.on_welcome();
        l.on_ack(40);
        l.on_ack(41);
        l.on_heartbeat_reply();
        let seen = std::sync::Arc::new(Seen::default());
        l.set_events(seen.clone());
        l.on_ack(42);
        l.on_heartbeat_reply();
        l.on_welcome();
        l.on_heartbeat_reply();
        assert_eq!(
            *seen.0.lock().unwrap(),
            ["conn 1 41", "ack 1 42", "conn 2 0"],
            "a late driver gets the connection; one report per connection"
        );
    }
}
