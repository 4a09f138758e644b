//! The pure part of ingest: one group-commit batch, from received writes to the
//! acks it may send.
//!
//! Shape (as raft-rs `Ready`): the journal thread ([`crate::ingest`]) hands the
//! batch each received write with what its group's state says about it
//! ([`Batch::admit`] answers append, ack as a duplicate, or drop); the thread does
//! the I/O and reports back what happened (record appended to segment `n`, segment
//! `n` fdatasync'ed, group failed, index refused); then [`Batch::acks`] gives the
//! acks to send, coalesced into seq ranges, and [`Batch::publish`] the groups whose
//! committed vector to publish. No I/O, no clocks, no locks here.
//!
//! **Rule: an ack is sent only for a durable write.** A write is durable when
//! - it was journaled before this batch (the index holds only records whose
//!   segment was synced: indexing happens after the sync), or
//! - its record was appended in this batch to a segment whose fdatasync completed
//!   in this batch, in a group that did not fail, and the index took it, or
//! - it repeats, in this batch, a write that is durable by the rule above.
//!
//! [`Batch::acks`] checks the second case with an always-on `assert!` at the one
//! place acks are produced: an ack for an appended write whose segment was not
//! reported synced is a bug in the journal thread, and the server stops rather
//! than acknowledge a write a crash could lose. Writes of a failed group, dropped
//! writes and writes the index refused are never acked.
//!
//! Bound: one batch holds at most what the journal thread admits into it
//! (`ingest::MAX_BATCH` writes); memory is linear in that.

use pipecloud_core::wire::{Ack, Generation};
use pipecloud_core::{Seq, WriterId};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A received write, as far as the batch needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteKey {
    /// The connection it came from (acks go back there).
    pub conn: u64,
    pub writer: WriterId,
    pub generation: Generation,
    pub seq: Seq,
}

/// What a group's state says about a write (read under the state lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupView {
    /// The group is fenced or its journal failed.
    Closed,
    /// The writer is not registered.
    Unregistered,
    /// The writer's current generation, whether this seq is journaled already, and
    /// whether it lies too far beyond the writer's durable prefix.
    Writer {
        generation: Generation,
        journaled: bool,
        too_far_ahead: bool,
    },
}

/// What the journal thread does with an admitted write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Append its record to the group's journal.
    Append,
    /// Journaled already (or earlier in this batch): only ack it.
    Duplicate,
    /// Do not journal, do not ack (the reason is for the log).
    Drop(&'static str),
}

/// Handle of a write inside its batch (in admission order, from 0).
pub type Item = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Dropped,
    /// Journaled before this batch.
    Journaled,
    /// Repeats the write `Item` of this batch.
    SameAs(Item),
    /// To append; not appended (yet).
    Staged,
    /// Appended to this segment.
    Appended(u64),
    /// Appended, but the index refused it.
    NotIndexed,
}

#[derive(Debug)]
struct Entry {
    group: String,
    key: WriteKey,
    fate: Fate,
}

/// The acks a batch may send.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Acks {
    /// Per connection, coalesced ranges, in connection, writer, generation, seq order.
    pub frames: Vec<(u64, Ack)>,
    /// The writes acknowledged (for latency accounting), in admission order.
    pub items: Vec<Item>,
}

/// One group-commit batch (see the module documentation).
#[derive(Debug, Default)]
pub struct Batch {
    entries: Vec<Entry>,
    /// The write of this batch to append, per (group, writer, seq).
    first: HashMap<(String, WriterId, Seq), Item>,
    synced: BTreeSet<(String, u64)>,
    failed: BTreeSet<String>,
    groups: BTreeSet<String>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of writes admitted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no write was admitted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Admits a write of `group` given what the group's state says about it.
    pub fn admit(&mut self, group: &str, view: GroupView, key: WriteKey) -> (Item, Verdict) {
        let item = self.entries.len();
        let verdict = match view {
            GroupView::Closed => Verdict::Drop("group fenced or journal failed"),
            GroupView::Unregistered => Verdict::Drop("writer not registered"),
            GroupView::Writer { generation, .. } if generation != key.generation => {
                Verdict::Drop("stale generation (writer re-registered)")
            }
            GroupView::Writer {
                journaled: true, ..
            } => Verdict::Duplicate,
            GroupView::Writer {
                too_far_ahead: true,
                ..
            } => Verdict::Drop("too far beyond the durable prefix"),
            GroupView::Writer { .. } => Verdict::Append,
        };
        let (verdict, fate) = match verdict {
            Verdict::Drop(_) => (verdict, Fate::Dropped),
            Verdict::Duplicate => (verdict, Fate::Journaled),
            Verdict::Append => match self.first.get(&(group.to_owned(), key.writer, key.seq)) {
                Some(&same) => (Verdict::Duplicate, Fate::SameAs(same)),
                None => {
                    self.first
                        .insert((group.to_owned(), key.writer, key.seq), item);
                    (Verdict::Append, Fate::Staged)
                }
            },
        };
        self.groups.insert(group.to_owned());
        self.entries.push(Entry {
            group: group.to_owned(),
            key,
            fate,
        });
        (item, verdict)
    }

    /// The record of `item` (admitted with [`Verdict::Append`]) was appended to `segment`.
    pub fn appended(&mut self, item: Item, segment: u64) {
        if let Some(e) = self.entries.get_mut(item) {
            debug_assert_eq!(e.fate, Fate::Staged);
            if e.fate == Fate::Staged {
                e.fate = Fate::Appended(segment);
            }
        }
    }

    /// Segments of `group` that hold records appended in this batch: each needs
    /// its fdatasync before any of them is acked.
    pub fn fsyncs(&self, group: &str) -> BTreeSet<u64> {
        self.entries
            .iter()
            .filter(|e| e.group == group)
            .filter_map(|e| match e.fate {
                Fate::Appended(n) => Some(n),
                _ => None,
            })
            .collect()
    }

    /// The fdatasync of `segment` of `group` completed.
    pub fn synced(&mut self, group: &str, segment: u64) {
        self.synced.insert((group.to_owned(), segment));
    }

    /// The journal of `group` failed: nothing of the group is acked or published.
    pub fn fail(&mut self, group: &str) {
        self.failed.insert(group.to_owned());
    }

    /// The index refused the appended `item` (never acked).
    pub fn not_indexed(&mut self, item: Item) {
        if let Some(e) = self.entries.get_mut(item) {
            e.fate = Fate::NotIndexed;
        }
    }

    /// Groups whose committed vector to publish (every group of the batch that did not fail).
    pub fn publish(&self) -> impl Iterator<Item = &str> {
        self.groups
            .iter()
            .filter(|g| !self.failed.contains(*g))
            .map(String::as_str)
    }

    /// Whether `item` may be acked, asserting the durability rule.
    fn durable(&self, item: Item) -> bool {
        let e = &self.entries[item];
        if self.failed.contains(&e.group) {
            return false;
        }
        match e.fate {
            Fate::Dropped | Fate::Staged | Fate::NotIndexed => false,
            Fate::Journaled => true,
            Fate::SameAs(first) => self.durable(first),
            Fate::Appended(segment) => {
                assert!(
                    self.synced.contains(&(e.group.clone(), segment)),
                    "BUG: ack of {} seq {} (group {}) before the fdatasync of segment {segment}",
                    e.key.writer,
                    e.key.seq,
                    e.group
                );
                true
            }
        }
    }

    /// The acks to send: every durable write, coalesced per connection, writer and
    /// generation into ranges of consecutive seqs.
    ///
    /// # Panics
    /// If an appended write of a group that did not fail lies in a segment not
    /// reported [`synced`](Self::synced) (see the module documentation).
    pub fn acks(&self) -> Acks {
        let mut items = Vec::new();
        let mut seqs: BTreeMap<(u64, WriterId, Generation), Vec<Seq>> = BTreeMap::new();
        for (item, e) in self.entries.iter().enumerate() {
            if self.durable(item) {
                items.push(item);
                seqs.entry((e.key.conn, e.key.writer, e.key.generation))
                    .or_default()
                    .push(e.key.seq);
            }
        }
        let mut frames = Vec::new();
        for ((conn, writer, generation), mut s) in seqs {
            s.sort_unstable();
            s.dedup();
            let mut i = 0;
            while i < s.len() {
                let first = s[i];
                while i + 1 < s.len() && s[i + 1] == s[i] + 1 {
                    i += 1;
                }
                frames.push((
                    conn,
                    Ack {
                        writer,
                        generation,
                        first,
                        last: s[i],
                    },
                ));
                i += 1;
            }
        }
        Acks { frames, items }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: WriterId = WriterId(0);

    fn key(conn: u64, seq: Seq) -> WriteKey {
        WriteKey {
            conn,
            writer: W,
            generation: 7,
            seq,
        }
    }

    fn open(journaled: bool) -> GroupView {
        GroupView::Writer {
            generation: 7,
            journaled,
            too_far_ahead: false,
        }
    }

    fn ack(first: Seq, last: Seq) -> Ack {
        Ack {
            writer: W,
            generation: 7,
            first,
            last,
        }
    }

    #[test]
    fn verdicts() {
        let mut b = Batch::new();
        assert_eq!(
            b.admit("g", GroupView::Closed, key(1, 1)).1,
            Verdict::Drop("group fenced or journal failed")
        );
        assert_eq!(
            b.admit("g", GroupView::Unregistered, key(1, 1)).1,
            Verdict::Drop("writer not registered")
        );
        let old = GroupView::Writer {
            generation: 6,
            journaled: false,
            too_far_ahead: false,
        };
        assert!(matches!(b.admit("g", old, key(1, 1)).1, Verdict::Drop(_)));
        let far = GroupView::Writer {
            generation: 7,
            journaled: false,
            too_far_ahead: true,
        };
        assert!(matches!(b.admit("g", far, key(1, 1)).1, Verdict::Drop(_)));
        assert_eq!(b.admit("g", open(true), key(1, 1)).1, Verdict::Duplicate);
        assert_eq!(b.admit("g", open(false), key(1, 2)).1, Verdict::Append);
        // The same write again in the batch (a resend), even on another connection.
        assert_eq!(b.admit("g", open(false), key(2, 2)).1, Verdict::Duplicate);
        // The same seq in another group is another write.
        assert_eq!(b.admit("h", open(false), key(1, 2)).1, Verdict::Append);
        assert_eq!(b.len(), 8);
    }

    #[test]
    fn acks_only_what_is_durable_coalesced() {
        let mut b = Batch::new();
        let (a1, _) = b.admit("g", open(false), key(1, 1));
        let (a2, _) = b.admit("g", open(false), key(1, 2));
        b.admit("g", open(true), key(1, 4)); // journaled before: durable
        let (a5, _) = b.admit("g", open(false), key(1, 5));
        b.admit("g", open(false), key(2, 2)); // repeats a2
        b.admit("g", GroupView::Closed, key(1, 3)); // dropped
        b.appended(a1, 10);
        b.appended(a2, 11);
        b.appended(a5, 11);
        assert_eq!(b.fsyncs("g"), BTreeSet::from([10, 11]));
        b.synced("g", 10);
        b.synced("g", 11);
        b.not_indexed(a5);
        let acks = b.acks();
        assert_eq!(
            acks.frames,
            vec![(1, ack(1, 2)), (1, ack(4, 4)), (2, ack(2, 2))]
        );
        assert_eq!(acks.items, vec![0, 1, 2, 4]);
        assert_eq!(b.publish().collect::<Vec<_>>(), vec!["g"]);
    }

    #[test]
    fn a_failed_group_acks_and_publishes_nothing() {
        let mut b = Batch::new();
        let (a, _) = b.admit("g", open(false), key(1, 1));
        b.admit("g", open(true), key(1, 9));
        let (h, _) = b.admit("h", open(false), key(1, 1));
        b.appended(a, 3);
        b.appended(h, 3);
        b.synced("h", 3);
        b.fail("g");
        assert_eq!(b.acks().frames, vec![(1, ack(1, 1))]);
        assert_eq!(b.publish().collect::<Vec<_>>(), vec!["h"]);
    }

    #[test]
    fn never_appended_is_never_acked() {
        let mut b = Batch::new();
        b.admit("g", open(false), key(1, 1));
        b.admit("g", open(false), key(2, 1)); // repeats it
        assert_eq!(b.acks(), Acks::default());
    }

    #[test]
    #[should_panic(expected = "before the fdatasync of segment 11")]
    fn ack_before_fsync_is_refused_loudly() {
        let mut b = Batch::new();
        let (a, _) = b.admit("g", open(false), key(1, 1));
        let (c, _) = b.admit("g", open(false), key(1, 2));
        b.appended(a, 10);
        b.appended(c, 11);
        b.synced("g", 10); // segment 11 (rolled mid-batch) never synced
        let _ = b.acks();
    }
}
