//! The agent's causal state for one protection group on this host (docs/design.md §3).
//!
//! Shared by the block path (which assigns each write its seq and vector) and the
//! network path (which tags, merges and holds packets). The rules live in
//! [`pipecloud_core`]; this module only puts them behind locks so the two paths,
//! running on different threads, see one consistent set of pending vectors.
//!
//! - `pending[m]`: pending vector of local machine `m` (index into the topology's
//!   machine list). Grows by writes of `m` (if `m` is a writer) and by merging the
//!   tags of packets that arrive at `m`.
//! - `committed`: the group's committed vector as last pushed by the backup server
//!   (monotone; published through a `watch` channel, and every raise also
//!   signals the registered [`Wake`]s so a network-path thread asleep in
//!   `poll(2)` releases held packets at once).

use crate::wake::Wake;
use pipecloud_core::ipopt::RawTag;
use pipecloud_core::{CountVector, Seq, WriterId};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;

/// A copy of the pending vectors outside the process, and tags merged outside
/// it: the kernel tagger ([`crate::ebpf`]).
pub trait KernelTags: Send + Sync {
    /// `machine`'s pending vector is now `pending` (called under its lock,
    /// after every change).
    fn publish(&self, machine: usize, pending: &CountVector);
    /// Whether the committed vector dominates `machine`'s pending vector
    /// (called under its lock, after every change of either).
    fn set_clear(&self, machine: usize, clear: bool);
    /// Whether tags received outside wait to be merged.
    fn needs_drain(&self) -> bool;
    /// Hands every waiting `(receiver, tag)` to `merge`, then records that
    /// they are merged.
    fn drain(&self, merge: &mut dyn FnMut(usize, &RawTag));
}

/// Causal state of the machines of one group that run on this host.
pub struct CausalState {
    /// Pending vector per machine of the topology (indexed by machine index).
    pending: Vec<Mutex<CountVector>>,
    committed: watch::Sender<CountVector>,
    /// Signalled after every raise of `committed`.
    commit_wakes: Mutex<Vec<Arc<Wake>>>,
    /// The kernel tagger, when one runs: gets every pending vector, and its
    /// received tags are merged before any pending vector is read or grown.
    kernel: RwLock<Option<Arc<dyn KernelTags>>>,
}

impl CausalState {
    /// State for `machines` machines (the topology's machine count), all vectors zero.
    pub fn new(machines: usize) -> Self {
        let (committed, _) = watch::channel(CountVector::ZERO);
        CausalState {
            pending: (0..machines)
                .map(|_| Mutex::new(CountVector::ZERO))
                .collect(),
            committed,
            commit_wakes: Mutex::new(Vec::new()),
            kernel: RwLock::new(None),
        }
    }

    fn kernel(&self) -> Option<Arc<dyn KernelTags>> {
        self.kernel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Mirrors the pending vectors into `k` (publishing them all now) and
    /// merges its received tags from now on. Replaces an earlier one.
    pub fn attach_kernel(&self, k: Arc<dyn KernelTags>) {
        *self.kernel.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&k));
        for m in 0..self.pending.len() {
            let p = self.lock_slot(m);
            self.mirror(&*k, m, &p);
        }
    }

    /// Merges what the kernel tagger received and stops using it.
    pub fn detach_kernel(&self) {
        self.drain_kernel();
        *self.kernel.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Merges the tags the kernel tagger received (if any wait); returns
    /// whether any waited. Every access to a pending vector does this first.
    pub fn drain_kernel(&self) -> bool {
        self.kernel().is_some_and(|k| self.drain_from(&*k))
    }

    fn drain_from(&self, k: &dyn KernelTags) -> bool {
        if !k.needs_drain() {
            return false;
        }
        k.drain(&mut |machine, raw| {
            if machine >= self.pending.len() {
                return;
            }
            let mut p = self.lock_slot(machine);
            let tag = raw.resolve(&p);
            if p.merge(&tag) {
                self.mirror(k, machine, &p);
            }
        });
        true
    }

    fn lock_slot(&self, machine: usize) -> std::sync::MutexGuard<'_, CountVector> {
        // A poisoned lock only means another thread panicked while holding a plain
        // vector; the vector itself is always valid, so keep going.
        self.pending[machine]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// `machine`'s vector, locked, after merging what the kernel received,
    /// and the kernel tagger to mirror a change into (one look-up for both).
    fn slot(
        &self,
        machine: usize,
    ) -> (
        std::sync::MutexGuard<'_, CountVector>,
        Option<Arc<dyn KernelTags>>,
    ) {
        let k = self.kernel();
        if let Some(k) = &k {
            self.drain_from(&**k);
        }
        (self.lock_slot(machine), k)
    }

    /// Everything the kernel tagger keeps per machine: its vector, and
    /// whether the committed vector covers it. Under the machine's lock.
    fn mirror(&self, k: &dyn KernelTags, machine: usize, p: &CountVector) {
        k.publish(machine, p);
        k.set_clear(machine, self.committed.borrow().dominates(p));
    }

    /// Writer `writer` (running on machine `machine`) issues a write: bumps its own
    /// entry and returns `(seq, vector)`, where `vector` is the machine's pending
    /// vector including this write, without its epoch entry. Call this BEFORE the
    /// write completes to the guest.
    ///
    /// Why no epoch entry: a disk write depends on disk writes only. The epoch
    /// entry orders client *output* after checkpoints (`pipecloud_core::epoch`);
    /// the backup keeps a write that depends on it out of every causal cut, so
    /// with it every write of a checkpointing (or switching) group would be lost
    /// to a disk-only failover (found by the switch disasters, docs/design.md §13).
    pub fn issue_write(&self, machine: usize, writer: WriterId) -> (Seq, CountVector) {
        let (mut p, k) = self.slot(machine);
        let seq = p.bump(writer);
        if let Some(k) = k {
            self.mirror(&*k, machine, &p);
        }
        let mut v = *p;
        v.set(pipecloud_core::EPOCH_ENTRY, 0);
        (seq, v)
    }

    /// Makes sure the writer's own entry is at least `seq` (used when a new writer
    /// generation starts numbering after what the backup already holds).
    pub fn raise_writer(&self, machine: usize, writer: WriterId, seq: Seq) {
        let (mut p, k) = self.slot(machine);
        if let (true, Some(k)) = (p.raise(writer.index(), seq), k) {
            self.mirror(&*k, machine, &p);
        }
    }

    /// A packet tagged `tag` arrived at machine `machine`: merge (element-wise max).
    pub fn merge(&self, machine: usize, tag: &CountVector) -> bool {
        let (mut p, k) = self.slot(machine);
        let grew = p.merge(tag);
        if let (true, Some(k)) = (grew, k) {
            self.mirror(&*k, machine, &p);
        }
        grew
    }

    /// Brings `machine`'s pending vector up to date and returns it (the tag for a
    /// packet it sends now). Not a plain read: it first drains the tags the kernel
    /// tagger received (its ring buffer) into every machine's vector and mirrors
    /// each grown vector back into the kernel tagger's maps.
    pub fn sync_pending(&self, machine: usize) -> CountVector {
        *self.slot(machine).0
    }

    /// Adopts a committed vector from the backup (never lowers any entry).
    pub fn publish_committed(&self, v: &CountVector) {
        if self.committed.send_if_modified(|c| c.merge(v)) {
            if let Some(k) = self.kernel() {
                // Under each machine's lock, so a concurrent write cannot
                // slip between the comparison and the flag.
                for m in 0..self.pending.len() {
                    let p = self.lock_slot(m);
                    k.set_clear(m, self.committed.borrow().dominates(&p));
                }
            }
            let wakes = self.commit_wakes.lock().unwrap_or_else(|e| e.into_inner());
            for w in wakes.iter() {
                w.signal();
            }
        }
    }

    /// Signals `wake` after every future raise of the committed vector (for a
    /// thread that sleeps in `poll(2)` rather than on the watch channel).
    pub fn wake_on_commit(&self, wake: Arc<Wake>) {
        self.commit_wakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(wake);
    }

    /// Stops signalling `wake` (matched by identity).
    pub fn unwake_on_commit(&self, wake: &Arc<Wake>) {
        self.commit_wakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|w| !Arc::ptr_eq(w, wake));
    }

    /// The committed vector now.
    pub fn committed(&self) -> CountVector {
        *self.committed.borrow()
    }

    /// Subscribes to committed-vector updates.
    pub fn subscribe_committed(&self) -> watch::Receiver<CountVector> {
        self.committed.subscribe()
    }

    /// Number of machines tracked.
    pub fn machines(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_merge_then_commit() {
        let s = CausalState::new(2);
        let (seq, v) = s.issue_write(1, WriterId(0));
        assert_eq!(seq, 1);
        assert_eq!(v.get(0), 1);
        assert!(s.merge(0, &v));
        assert_eq!(s.sync_pending(0), v);
        let rx = s.subscribe_committed();
        s.publish_committed(&v);
        assert!(rx.has_changed().unwrap_or(false));
        assert!(s.committed().dominates(&v));
        s.publish_committed(&CountVector::ZERO);
        assert!(s.committed().dominates(&v), "committed never lowers");
    }

    #[test]
    fn a_write_never_depends_on_the_epoch_entry() {
        let s = CausalState::new(1);
        s.raise_writer(0, WriterId(pipecloud_core::EPOCH_ENTRY as u8), 7);
        let (_, v) = s.issue_write(0, WriterId(0));
        assert_eq!(
            v.get(pipecloud_core::EPOCH_ENTRY),
            0,
            "the write's dependencies"
        );
        assert_eq!(
            s.sync_pending(0).get(pipecloud_core::EPOCH_ENTRY),
            7,
            "tags keep it"
        );
        assert_eq!(v.get(0), 1);
    }
}
