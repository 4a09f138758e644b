//! The replicated disk: a [`BlockBackend`] that writes locally and replicates.
//!
//! [`ReplicatedDisk`] wraps the local image (or any [`BlockBackend`]) of one
//! protected disk. For every write, write-zeroes and trim:
//!
//! 1. the write is split into frames of at most [`MAX_WRITE_PAYLOAD`] bytes;
//!    each frame waits for room in the replication client's in-flight budget
//!    (backpressure: the guest is slowed instead of memory growing), then gets
//!    its `(seq, vector)` from the causal state and is buffered for the backup
//!    ([`ReplicationClient::submit`]) — so every seq is assigned **before** the
//!    write completes to the guest;
//! 2. concurrently, the whole write goes to the local backend;
//! 3. the write completes according to the group's [`Mode`], read when the
//!    local write and the submission are done:
//!    - `async`, `pipelined`: right away;
//!    - `sync`: once the backup has committed the last frame's seq (which, the
//!      committed seq being a contiguous prefix, covers every frame of the write
//!      and every earlier write of the writer). If the mode switches away from
//!      `sync` meanwhile, or the group degrades to async, the wait ends.
//!
//! With a lease gate (the group has `[quorum]`, docs/design.md §7) a write,
//! write-zeroes or trim completes only while the gate is open: a site that does
//! not hold the group's lease stalls its guests' writes (fail-closed) until it
//! holds it again.
//!
//! While the client is *detached* (an agent activated without its backup,
//! docs/design.md §15) a write goes to the local backend only: nothing is
//! issued or buffered, it completes at once (lease gate permitting), and the
//! client's attach waits for it ([`ReplicationClient::detached_guard`]).
//!
//! Reads go to the local backend only. A flush flushes the local backend; in
//! sync mode the backup's acks already cover durability there. Outside async mode
//! a flush also makes the sender ship every waiting write at once; in async mode
//! the flushed writes leave with their batch (at most `replication_async_batch_us`
//! old), as every other write does.
//!
//! If the local write fails, the frames are still replicated (the data was
//! issued before the outcome was known): the guest sees the error and the block's
//! contents are unspecified, on both sides, as after any failed write.

use std::io;
use std::sync::Arc;

use pipecloud_core::wire::{WriteKind, MAX_WRITE_PAYLOAD};
use pipecloud_core::{Seq, WriterId};

use crate::block::BlockBackend;
use crate::replication::{
    AckWaiter, DiskHandle, Mode, ModeSwitch, ReplicationClient, ReplicationError,
};

/// Why a replicated disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The replication client does not replicate a disk of that name.
    #[error("disk {disk:?} is not replicated by the client of group {group:?}")]
    UnknownDisk { disk: String, group: String },
    /// The local backend and the replicated disk disagree about the size.
    #[error("disk {disk:?}: local image has {local} bytes, replication announces {announced}")]
    SizeMismatch {
        disk: String,
        local: u64,
        announced: u64,
    },
}

/// A protected disk: local backend + replication stream + mode rule.
pub struct ReplicatedDisk<B> {
    local: B,
    client: Arc<ReplicationClient>,
    disk: DiskHandle,
    name: String,
    mode: ModeSwitch,
    lease_gate: Option<Arc<pipecloud_quorum::LeaseGate>>,
}

/// How often a write stalled by a closed lease gate looks at it again.
const LEASE_GATE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

impl<B: BlockBackend> ReplicatedDisk<B> {
    /// Wraps `local` as disk `name` of `client`'s group, completing writes per `mode`.
    pub fn new(
        local: B,
        client: Arc<ReplicationClient>,
        name: &str,
        mode: ModeSwitch,
    ) -> Result<Self, DiskError> {
        let disk = client.disk(name).ok_or_else(|| DiskError::UnknownDisk {
            disk: name.to_owned(),
            group: client.group().to_owned(),
        })?;
        let announced = client
            .config()
            .disks
            .get(disk.index())
            .map_or(0, |d| d.size);
        if announced != local.size() {
            return Err(DiskError::SizeMismatch {
                disk: name.to_owned(),
                local: local.size(),
                announced,
            });
        }
        Ok(ReplicatedDisk {
            local,
            client,
            disk,
            name: name.to_owned(),
            mode,
            lease_gate: None,
        })
    }

    /// Completes writes only while `gate` is open (module docs).
    pub fn with_lease_gate(mut self, gate: Arc<pipecloud_quorum::LeaseGate>) -> Self {
        self.lease_gate = Some(gate);
        self
    }

    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's mode switch.
    pub fn mode(&self) -> &ModeSwitch {
        &self.mode
    }

    /// The replication client.
    pub fn client(&self) -> &Arc<ReplicationClient> {
        &self.client
    }

    /// The local backend.
    pub fn local(&self) -> &B {
        &self.local
    }

    /// Issues the frames of one guest request in order; returns the writer and
    /// seq of the last one.
    async fn replicate(
        &self,
        frames: Vec<(u64, WriteKind)>,
    ) -> Result<Option<(WriterId, Seq)>, ReplicationError> {
        let mut last = None;
        for (offset, kind) in frames {
            let submitted = self.client.submit(self.disk, offset, kind).await?;
            last = Some((submitted.writer, submitted.seq));
        }
        Ok(last)
    }

    /// Runs the local operation and the replication concurrently, then
    /// completes per mode.
    async fn complete(
        &self,
        local: impl std::future::Future<Output = io::Result<()>> + Send,
        frames: Vec<(u64, WriteKind)>,
    ) -> io::Result<()> {
        if let Some(detached) = self.client.detached_guard().await {
            local.await?;
            drop(detached);
            self.wait_for_lease().await;
            return Ok(());
        }
        let (local, replicated) = tokio::join!(local, self.replicate(frames));
        local?;
        match replicated? {
            // Only sync waits: the waiter (three subscriptions) is built only then.
            Some((writer, seq)) if self.mode.get() == Mode::Sync => {
                self.wait_for_mode(self.client.ack_waiter(writer, seq))
                    .await?
            }
            _ => {}
        }
        self.wait_for_lease().await;
        Ok(())
    }

    /// Stalls until this site holds the group's lease (no gate: at once).
    async fn wait_for_lease(&self) {
        if let Some(gate) = &self.lease_gate {
            while !gate.is_open() {
                tokio::time::sleep(LEASE_GATE_POLL).await;
            }
        }
    }

    /// In sync mode, waits for the ack (or a switch away from sync, or degradation).
    async fn wait_for_mode(&self, mut waiter: AckWaiter) -> io::Result<()> {
        let mut mode = self.mode.subscribe();
        loop {
            if *mode.borrow_and_update() != Mode::Sync {
                return Ok(());
            }
            tokio::select! {
                r = waiter.wait() => {
                    r?;
                    return Ok(());
                }
                r = mode.changed() => {
                    if r.is_err() {
                        // The switch is gone (shutdown): the ack alone decides.
                        waiter.wait().await?;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Splits `data` at `offset` into write frames of at most [`MAX_WRITE_PAYLOAD`] bytes.
fn data_frames(offset: u64, data: &[u8]) -> Vec<(u64, WriteKind)> {
    if data.is_empty() {
        return vec![(offset, WriteKind::Data(Vec::new()))];
    }
    data.chunks(MAX_WRITE_PAYLOAD)
        .enumerate()
        .map(|(i, c)| {
            (
                offset + (i * MAX_WRITE_PAYLOAD) as u64,
                WriteKind::Data(c.to_vec()),
            )
        })
        .collect()
}

impl<B: BlockBackend> BlockBackend for ReplicatedDisk<B> {
    fn size(&self) -> u64 {
        self.local.size()
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.local.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let frames = data_frames(offset, &data);
        self.complete(self.local.write(offset, data, fua), frames)
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        let frames = vec![(
            offset,
            WriteKind::Zeroes {
                len: u64::from(len),
            },
        )];
        self.complete(self.local.write_zeroes(offset, len, fua), frames)
            .await
    }

    async fn trim(&self, offset: u64, len: u32) -> io::Result<()> {
        let frames = vec![(
            offset,
            WriteKind::Trim {
                len: u64::from(len),
            },
        )];
        self.complete(self.local.trim(offset, len), frames).await
    }

    async fn flush(&self) -> io::Result<()> {
        let r = self.local.flush().await;
        // The guest reached a consistency point. In pipelined (and sync) mode its
        // writes go at once instead of waiting for the acks of earlier ones: replies
        // held by the network path wait for them. In async mode nothing waits for
        // the backup, and the batch age (`replication_async_batch_us`) already bounds
        // how long the flushed writes stay unsent; hurrying them costs the guest a
        // wake-up of the sender and a backup round per flush, which measured slower at
        // O_DSYNC QD1 in a same-run A/B (`docs/machine.md`, "Block path, session 10").
        if self.mode.get() != Mode::Async {
            self.client.send_now();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_the_payload_limit() {
        let data = vec![7u8; 2 * MAX_WRITE_PAYLOAD + 5];
        let f = data_frames(4096, &data);
        assert_eq!(f.len(), 3);
        let mut expect = 4096;
        let mut total = 0;
        for (off, kind) in &f {
            assert_eq!(*off, expect);
            let WriteKind::Data(d) = kind else {
                panic!("data frame expected")
            };
            assert!(d.len() <= MAX_WRITE_PAYLOAD);
            expect += d.len() as u64;
            total += d.len();
        }
        assert_eq!(total, data.len());
        assert_eq!(data_frames(0, &[1, 2, 3]).len(), 1);
    }
}
