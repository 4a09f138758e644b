//! In-memory index of a group's journal, per writer (rebuilt from the segments on start).
//!
//! For each writer: its current generation, the `base` seq (everything up to it is
//! applied into the base volumes and no longer indexed), the contiguous run of
//! journaled seqs `base+1..=durable` and the journaled seqs beyond the first hole
//! (`ahead`). Each entry knows where its record lives, its vector, and, once it is
//! inside the contiguous run, the prefix-max of the vectors `1..=seq` (its
//! dependencies as a prefix, what the causal cut needs) and the prefix-max of
//! receive times (what point-in-time restore needs).
//!
//! Which seqs are contiguous is decided by the one contiguous-prefix rule
//! ([`pipecloud_core::prefix`]); this index only keeps the entries.
//!
//! Bound: a write more than [`MAX_AHEAD`] seqs beyond the durable prefix is refused
//! (not journaled, not acked): a correct agent never runs that far past a hole.
//! Memory is about 300 bytes per indexed write (the journal bound limits the count)
//! plus 8 bytes per seq of the window beyond the first hole (at most [`MAX_AHEAD`]).

use crate::causal::WriterHistory;
use crate::record::RecordKind;
use pipecloud_core::prefix::{self, ContiguousPrefix, PrefixBounds};
use pipecloud_core::wire::Generation;
use pipecloud_core::{CountVector, Seq};
use std::collections::VecDeque;

/// Furthest a write may lie beyond its writer's durable prefix.
pub const MAX_AHEAD: Seq = 1 << 20;

/// Where a record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Segment number.
    pub segment: u64,
    /// Byte offset of the record in the segment.
    pub offset: u64,
    /// Total record length.
    pub len: u32,
}

/// One indexed write.
#[derive(Clone, Debug)]
pub struct Entry {
    pub loc: Loc,
    /// Index into the group's disks.
    pub disk: u32,
    pub offset: u64,
    pub kind: RecordKind,
    pub len: u64,
    pub recv_ms: u64,
    pub vector: CountVector,
    /// Prefix-max of vectors (valid inside the contiguous run).
    pub prefix_deps: CountVector,
    /// Prefix-max of receive times (valid inside the contiguous run).
    pub prefix_time: u64,
}

/// Result of inserting a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// New; the durable prefix may have grown.
    Added,
    /// Already journaled (a resend): nothing to do but ack.
    Duplicate,
    /// Beyond [`MAX_AHEAD`]: refused.
    TooFarAhead,
}

/// Index of one writer.
#[derive(Clone, Debug)]
pub struct WriterIndex {
    pub generation: Generation,
    base: Seq,
    base_deps: CountVector,
    base_time: u64,
    /// Entries of `base+1..=durable`.
    run: VecDeque<Entry>,
    /// The durable prefix and the entries beyond its first hole.
    ahead: ContiguousPrefix<Box<Entry>>,
}

impl WriterIndex {
    /// An empty index whose seqs `1..=base` are in the base volumes.
    pub fn new(generation: Generation, base: Seq, base_deps: CountVector, base_time: u64) -> Self {
        WriterIndex {
            generation,
            base,
            base_deps,
            base_time,
            run: VecDeque::new(),
            ahead: ContiguousPrefix::new(
                base,
                PrefixBounds {
                    max_ahead: MAX_AHEAD,
                    max_runs: usize::MAX,
                },
            ),
        }
    }

    /// Seqs up to this are in the base volumes.
    pub fn base(&self) -> Seq {
        self.base
    }

    /// Highest seq with all of `1..=seq` journaled.
    pub fn durable(&self) -> Seq {
        debug_assert_eq!(self.ahead.prefix(), self.base + self.run.len() as Seq);
        self.ahead.prefix()
    }

    /// Number of journaled writes beyond the first hole.
    pub fn ahead_len(&self) -> usize {
        self.ahead.ahead_len()
    }

    /// Whether `seq` is journaled (or applied).
    pub fn contains(&self, seq: Seq) -> bool {
        self.ahead.contains(seq)
    }

    /// Inserts a journaled write.
    pub fn insert(&mut self, seq: Seq, e: Entry) -> Insert {
        let WriterIndex {
            base_deps,
            base_time,
            run,
            ahead,
            ..
        } = self;
        let joined = |_: Seq, e: Box<Entry>| {
            let mut e = *e;
            let (mut deps, time) = match run.back() {
                Some(last) => (last.prefix_deps, last.prefix_time),
                None => (*base_deps, *base_time),
            };
            deps.merge(&e.vector);
            e.prefix_deps = deps;
            e.prefix_time = time.max(e.recv_ms);
            run.push_back(e);
        };
        match ahead.insert(seq, Box::new(e), joined) {
            prefix::Insert::Added { .. } => Insert::Added,
            prefix::Insert::Duplicate => Insert::Duplicate,
            // max_runs is unbounded here: only the distance bound refuses.
            prefix::Insert::TooFarAhead | prefix::Insert::TooManyRuns => Insert::TooFarAhead,
        }
    }

    /// A new generation starts after the durable prefix: writes beyond the first
    /// hole belonged to the old incarnation and are dropped.
    pub fn new_generation(&mut self, generation: Generation) -> usize {
        self.generation = generation;
        self.ahead.clear_ahead()
    }

    /// The entry of `seq` inside the contiguous run.
    pub fn get(&self, seq: Seq) -> Option<&Entry> {
        let i = seq.checked_sub(self.base + 1)?;
        self.run.get(usize::try_from(i).ok()?)
    }

    /// Entries of seqs `from+1..=to` (clamped to the run), in seq order.
    pub fn range(&self, from: Seq, to: Seq) -> impl Iterator<Item = (Seq, &Entry)> {
        let lo = from.max(self.base) + 1;
        let hi = to.min(self.durable());
        (lo..=hi).filter_map(move |s| self.get(s).map(|e| (s, e)))
    }

    /// Prefix-max of vectors `1..=seq` (for `seq <= base`: the base's, which is
    /// all the index knows; the cut never needs to go below the base).
    pub fn deps(&self, seq: Seq) -> CountVector {
        match self.get(seq) {
            Some(e) => e.prefix_deps,
            None if seq <= self.base => self.base_deps,
            None => self.run.back().map_or(self.base_deps, |e| e.prefix_deps),
        }
    }

    /// Prefix-max receive time at `seq` (same conventions as [`deps`](Self::deps)).
    pub fn time(&self, seq: Seq) -> u64 {
        match self.get(seq) {
            Some(e) => e.prefix_time,
            None => self.base_time,
        }
    }

    /// Highest seq whose whole prefix was received at or before `t_ms` (at least the base).
    pub fn prefix_at_time(&self, t_ms: u64) -> Seq {
        // prefix_time is monotone along the run.
        let n = self.run.partition_point(|e| e.prefix_time <= t_ms);
        self.base + n as Seq
    }

    /// Drops entries up to `seq` (they were applied into the base volumes).
    pub fn trim_to(&mut self, seq: Seq) {
        while self.base < seq {
            let Some(e) = self.run.pop_front() else { break };
            self.base += 1;
            self.base_deps = e.prefix_deps;
            self.base_time = e.prefix_time;
        }
    }

    /// The base's prefix dependencies and time.
    pub fn base_state(&self) -> (CountVector, u64) {
        (self.base_deps, self.base_time)
    }
}

/// A writer's history seen through a prefix cap (for cuts below the durable prefix).
pub struct Capped<'a> {
    pub index: &'a WriterIndex,
    pub cap: Seq,
}

impl WriterHistory for Capped<'_> {
    fn durable_prefix(&self) -> Seq {
        self.cap.min(self.index.durable())
    }
    fn deps_upto(&self, seq: Seq) -> CountVector {
        self.index.deps(seq)
    }
}

/// The empty history (writers the group does not have).
pub struct NoHistory;

impl WriterHistory for NoHistory {
    fn durable_prefix(&self) -> Seq {
        0
    }
    fn deps_upto(&self, _seq: Seq) -> CountVector {
        CountVector::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(v: &[u64], t: u64) -> Entry {
        Entry {
            loc: Loc {
                segment: 0,
                offset: 0,
                len: 0,
            },
            disk: 0,
            offset: 0,
            kind: RecordKind::Data,
            len: 0,
            recv_ms: t,
            vector: CountVector::from_slice(v),
            prefix_deps: CountVector::ZERO,
            prefix_time: 0,
        }
    }

    #[test]
    fn holes_prefix_and_trim() {
        let mut w = WriterIndex::new(1, 0, CountVector::ZERO, 0);
        assert_eq!(w.insert(2, e(&[2, 5], 20)), Insert::Added);
        assert_eq!(w.durable(), 0);
        assert_eq!(w.insert(1, e(&[1, 1], 30)), Insert::Added);
        assert_eq!(w.durable(), 2);
        assert_eq!(w.insert(2, e(&[2], 0)), Insert::Duplicate);
        assert_eq!(w.deps(1), CountVector::from_slice(&[1, 1]));
        assert_eq!(w.deps(2), CountVector::from_slice(&[2, 5]));
        assert_eq!(w.time(2), 30);
        assert_eq!(w.prefix_at_time(25), 0);
        assert_eq!(w.prefix_at_time(30), 2);
        assert_eq!(w.insert(2 + MAX_AHEAD + 1, e(&[], 0)), Insert::TooFarAhead);
        assert_eq!(w.insert(4, e(&[4], 0)), Insert::Added);
        assert_eq!(w.new_generation(2), 1);
        assert!(!w.contains(4));
        w.trim_to(1);
        assert_eq!(w.base(), 1);
        assert_eq!(w.durable(), 2);
        assert_eq!(w.range(0, 9).map(|(s, _)| s).collect::<Vec<_>>(), vec![2]);
    }
}
