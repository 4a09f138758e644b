//! Commit tracking: which writes are durable at the backup (docs/design.md §3.3).
//!
//! The backup acknowledges writes as soon as they are durable in its journal,
//! in whatever order its disk completes them, possibly more than once (resends
//! after a reconnection). A guest, however, relies on batch semantics: a write
//! counts only once *every* earlier write of the same writer is durable too
//! (the paper's "out-of-sequence acknowledgements are not acted upon until all
//! intermediate acks arrive", §4.3). So the *committed* seq of a writer is the
//! end of the contiguous prefix of acked seqs, never just the highest ack.
//!
//! - [`WriterCommit`] tracks one writer: the prefix plus a bounded set of
//!   out-of-order acked ranges beyond it (the rule itself is [`crate::prefix`]).
//! - [`CommitTracker`] tracks a protection group: one [`WriterCommit`] per
//!   registered writer and the group's committed [`CountVector`], whose entry
//!   `w` is the committed seq of writer `w`.
//!
//! **Generations.** A restarted writer gets a new, larger [`Generation`] and
//! continues numbering after the seq the backup reports durable (the *base*), so
//! the committed vector stays monotone across restarts. Acks that carry another
//! generation belong to an old incarnation: they are answered with
//! [`AckOutcome::StaleGeneration`] and change nothing.
//!
//! **Bounds.** Out-of-order acks are kept only up to [`MAX_ACK_GAP`] seqs past
//! the prefix and in at most [`MAX_ACK_RANGES`] disjoint ranges; an ack beyond
//! either bound is refused with an error and changes nothing (the sender can
//! resend it later, once the prefix has caught up). Memory per writer is at most
//! one byte per seq of the window beyond the prefix, so [`MAX_ACK_GAP`] bytes.
//!
//! **Monotonicity.** Nothing here ever lowers a committed seq or an entry of the
//! committed vector; this is the property the netqueue's correctness rests on.

use crate::prefix::{ContiguousPrefix, Insert, PrefixBounds};
use crate::vector::{CountVector, Seq, WriterId, EPOCH_ENTRY, MAX_WRITERS};
use crate::wire::Generation;
use std::collections::BTreeMap;
use thiserror::Error;

/// Furthest an acked seq may lie beyond a writer's committed prefix. Acks past
/// this are refused ([`CommitError::AckTooFarAhead`]): a correct backup never
/// runs that far ahead of a hole, and the bound keeps a bogus ack from making
/// the tracker believe in absurd seqs.
pub const MAX_ACK_GAP: Seq = 1 << 22;

/// Most disjoint out-of-order ranges a writer may hold beyond its prefix. An
/// ack that would need one more range is refused ([`CommitError::TooManyRanges`]).
pub const MAX_ACK_RANGES: usize = 4096;

/// Why an ack or a registration was refused. Every refusal leaves the tracker unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommitError {
    /// `first > last`, or `first == 0` (seq 0 means "no write").
    #[error("{writer}: invalid ack range {first}..={last}")]
    InvalidRange {
        writer: WriterId,
        first: Seq,
        last: Seq,
    },
    /// The ack reaches more than [`MAX_ACK_GAP`] seqs past the committed prefix.
    #[error(
        "{writer}: ack up to seq {last} is more than {max_gap} past committed seq {committed}"
    )]
    AckTooFarAhead {
        writer: WriterId,
        last: Seq,
        committed: Seq,
        max_gap: Seq,
    },
    /// Accepting the ack would need more than [`MAX_ACK_RANGES`] disjoint ranges.
    #[error("{writer}: ack {first}..={last} would exceed {max} out-of-order ranges (committed seq {committed})")]
    TooManyRanges {
        writer: WriterId,
        first: Seq,
        last: Seq,
        committed: Seq,
        max: usize,
    },
    /// The writer index is not below [`MAX_WRITERS`].
    #[error("{writer}: writer index out of range (max {max} writers)")]
    WriterOutOfRange { writer: WriterId, max: usize },
    /// An ack for a writer that was never registered.
    #[error("{writer}: ack for an unregistered writer")]
    UnknownWriter { writer: WriterId },
    /// Re-registration with a generation that is not newer than the current one.
    #[error("{writer}: generation {generation} is not newer than current generation {current}")]
    GenerationNotNewer {
        writer: WriterId,
        generation: Generation,
        current: Generation,
    },
    /// Registration with a base below what the group already counts as committed
    /// (it would lower the committed vector, or count new writes as durable).
    #[error(
        "{writer}: generation {generation} base seq {base} is below committed seq {committed}"
    )]
    BaseBelowCommitted {
        writer: WriterId,
        generation: Generation,
        base: Seq,
        committed: Seq,
    },
}

/// Result of an accepted ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The writer's committed seq (its entry of the committed vector) grew.
    Advanced {
        writer: WriterId,
        from: Seq,
        to: Seq,
    },
    /// Accepted, but the prefix did not move: a duplicate, or an ack beyond a
    /// hole that is kept until the hole is filled.
    Unchanged,
    /// The ack belongs to another generation of the writer (an old incarnation);
    /// it was ignored and nothing changed. Expected after a writer restart.
    StaleGeneration {
        writer: WriterId,
        expected: Generation,
        got: Generation,
    },
}

impl AckOutcome {
    /// Whether the committed seq grew.
    pub fn advanced(&self) -> bool {
        matches!(self, AckOutcome::Advanced { .. })
    }
}

/// Commit state of one writer generation: the contiguous prefix of durable seqs
/// plus the out-of-order acked seqs beyond it, kept by the one contiguous-prefix
/// rule ([`ContiguousPrefix`]) with the bounds [`MAX_ACK_GAP`] and [`MAX_ACK_RANGES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterCommit {
    generation: Generation,
    base: Seq,
    acked: ContiguousPrefix<()>,
}

impl WriterCommit {
    /// A writer generation whose seqs start after `base`: `1..=base` count as
    /// durable already (what the backup reported), the first new write is `base + 1`.
    pub fn new(generation: Generation, base: Seq) -> Self {
        WriterCommit {
            generation,
            base,
            acked: ContiguousPrefix::new(
                base,
                PrefixBounds {
                    max_ahead: MAX_ACK_GAP,
                    max_runs: MAX_ACK_RANGES,
                },
            ),
        }
    }

    /// This generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The seq this generation started after.
    pub fn base(&self) -> Seq {
        self.base
    }

    /// Highest seq such that all of `1..=seq` are durable.
    pub fn committed(&self) -> Seq {
        self.acked.prefix()
    }

    /// Number of disjoint out-of-order ranges held beyond the prefix.
    pub fn pending_ranges(&self) -> usize {
        self.acked.runs()
    }

    /// Highest seq acked so far (the prefix or the end of the last range).
    pub fn highest_acked(&self) -> Seq {
        self.acked.highest()
    }

    /// Records that seqs `first..=last` of `generation` are durable.
    ///
    /// `writer` only names the writer in results and errors. Parts of the range at
    /// or below the prefix are duplicates and ignored.
    pub fn ack(
        &mut self,
        writer: WriterId,
        generation: Generation,
        first: Seq,
        last: Seq,
    ) -> Result<AckOutcome, CommitError> {
        if generation != self.generation {
            return Ok(AckOutcome::StaleGeneration {
                writer,
                expected: self.generation,
                got: generation,
            });
        }
        if first == 0 || first > last {
            return Err(CommitError::InvalidRange {
                writer,
                first,
                last,
            });
        }
        let committed = self.committed();
        match self.acked.insert_range(first, last) {
            Insert::Added { from, to } if to > from => {
                Ok(AckOutcome::Advanced { writer, from, to })
            }
            Insert::Added { .. } | Insert::Duplicate => Ok(AckOutcome::Unchanged),
            Insert::TooFarAhead => Err(CommitError::AckTooFarAhead {
                writer,
                last,
                committed,
                max_gap: MAX_ACK_GAP,
            }),
            Insert::TooManyRuns => Err(CommitError::TooManyRanges {
                writer,
                first: first.max(committed + 1),
                last,
                committed,
                max: MAX_ACK_RANGES,
            }),
        }
    }

    /// Raises the prefix to at least `seq` (the backup said so authoritatively,
    /// e.g. in a pushed committed vector); returns whether it grew. Never lowers.
    pub fn advance_to(&mut self, seq: Seq) -> bool {
        self.acked.advance_to(seq, |_, ()| {})
    }
}

/// Commit tracking for a protection group: one [`WriterCommit`] per registered
/// writer and the group's committed vector.
///
/// Invariant: for every registered writer `w`, `committed().get(w.index())`
/// equals that writer's [`WriterCommit::committed`]. Entries are never lowered.
#[derive(Debug, Clone, Default)]
pub struct CommitTracker {
    writers: BTreeMap<WriterId, WriterCommit>,
    committed: CountVector,
}

impl CommitTracker {
    /// An empty tracker: no writers, committed vector zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `writer` with a new `generation` whose seqs start after `base`.
    ///
    /// A writer registered before may be re-registered only with a strictly newer
    /// generation. In every case `base` must not be below the writer's current
    /// committed entry (that would lower the committed vector); the entry is
    /// raised to `base` if it was lower. Returns the outcome for the writer's
    /// entry (`Advanced` if `base` raised it).
    pub fn register(
        &mut self,
        writer: WriterId,
        generation: Generation,
        base: Seq,
    ) -> Result<AckOutcome, CommitError> {
        check_writer(writer)?;
        if let Some(current) = self.writers.get(&writer) {
            if generation <= current.generation() {
                return Err(CommitError::GenerationNotNewer {
                    writer,
                    generation,
                    current: current.generation(),
                });
            }
        }
        let committed = self.committed.get(writer.index());
        if base < committed {
            return Err(CommitError::BaseBelowCommitted {
                writer,
                generation,
                base,
                committed,
            });
        }
        self.writers
            .insert(writer, WriterCommit::new(generation, base));
        Ok(self.raise_entry(writer, base))
    }

    /// Records an ack of `first..=last` of `writer`'s `generation`.
    ///
    /// Returns [`AckOutcome::StaleGeneration`] (nothing changed) if the writer's
    /// current generation is another one; errors for unregistered writers,
    /// invalid ranges and acks beyond the bounds (nothing changed either).
    pub fn ack(
        &mut self,
        writer: WriterId,
        generation: Generation,
        first: Seq,
        last: Seq,
    ) -> Result<AckOutcome, CommitError> {
        check_writer(writer)?;
        let wc = self
            .writers
            .get_mut(&writer)
            .ok_or(CommitError::UnknownWriter { writer })?;
        let outcome = wc.ack(writer, generation, first, last)?;
        if let AckOutcome::Advanced { to, .. } = outcome {
            self.committed.raise(writer.index(), to);
        }
        debug_assert_eq!(self.committed.get(writer.index()), wc.committed());
        Ok(outcome)
    }

    /// The group's committed vector.
    pub fn committed(&self) -> &CountVector {
        &self.committed
    }

    /// The state of one writer, if registered.
    pub fn writer(&self, writer: WriterId) -> Option<&WriterCommit> {
        self.writers.get(&writer)
    }

    /// Adopts a committed vector pushed by the backup (agent side): every entry is
    /// raised to at least `vector`'s, never lowered; registered writers' prefixes
    /// follow. Returns whether any entry grew.
    pub fn observe_committed(&mut self, vector: &CountVector) -> bool {
        let grew = self.committed.merge(vector);
        if grew {
            for (w, wc) in self.writers.iter_mut() {
                // Raising the prefix may absorb out-of-order ranges beyond it.
                if wc.advance_to(self.committed.get(w.index())) {
                    self.committed.raise(w.index(), wc.committed());
                }
            }
        }
        grew
    }

    /// Raises the epoch entry ([`EPOCH_ENTRY`]) of the committed vector to
    /// `epoch` (full-state mode: the backup holds that checkpoint). Never lowers;
    /// returns whether it grew.
    pub fn set_epoch(&mut self, epoch: u64) -> bool {
        self.committed.raise(EPOCH_ENTRY, epoch)
    }

    fn raise_entry(&mut self, writer: WriterId, to: Seq) -> AckOutcome {
        let from = self.committed.get(writer.index());
        if self.committed.raise(writer.index(), to) {
            AckOutcome::Advanced { writer, from, to }
        } else {
            AckOutcome::Unchanged
        }
    }
}

fn check_writer(writer: WriterId) -> Result<(), CommitError> {
    if writer.index() < MAX_WRITERS {
        Ok(())
    } else {
        Err(CommitError::WriterOutOfRange {
            writer,
            max: MAX_WRITERS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: WriterId = WriterId(1);

    #[test]
    fn in_order_acks_advance() {
        let mut wc = WriterCommit::new(7, 0);
        assert_eq!(
            wc.ack(W, 7, 1, 3),
            Ok(AckOutcome::Advanced {
                writer: W,
                from: 0,
                to: 3
            })
        );
        assert_eq!(wc.committed(), 3);
        assert_eq!(wc.ack(W, 7, 2, 3), Ok(AckOutcome::Unchanged));
        assert_eq!(wc.committed(), 3);
    }

    #[test]
    fn out_of_order_acks_wait_for_the_hole() {
        let mut wc = WriterCommit::new(1, 10);
        assert_eq!(wc.ack(W, 1, 13, 14), Ok(AckOutcome::Unchanged));
        assert_eq!(wc.ack(W, 1, 16, 16), Ok(AckOutcome::Unchanged));
        assert_eq!(wc.committed(), 10);
        assert_eq!(wc.pending_ranges(), 2);
        assert_eq!(wc.highest_acked(), 16);
        assert_eq!(
            wc.ack(W, 1, 11, 12),
            Ok(AckOutcome::Advanced {
                writer: W,
                from: 10,
                to: 14
            })
        );
        assert_eq!(wc.pending_ranges(), 1);
        // Overlapping ack straddling the prefix fills the last hole.
        assert_eq!(
            wc.ack(W, 1, 12, 15),
            Ok(AckOutcome::Advanced {
                writer: W,
                from: 14,
                to: 16
            })
        );
        assert_eq!(wc.pending_ranges(), 0);
    }

    #[test]
    fn stale_generation_changes_nothing() {
        let mut wc = WriterCommit::new(2, 5);
        let before = wc.clone();
        assert_eq!(
            wc.ack(W, 1, 6, 9),
            Ok(AckOutcome::StaleGeneration {
                writer: W,
                expected: 2,
                got: 1
            })
        );
        assert_eq!(wc, before);
    }

    #[test]
    fn invalid_and_out_of_bound_acks_are_refused() {
        let mut wc = WriterCommit::new(1, 0);
        assert!(matches!(
            wc.ack(W, 1, 0, 3),
            Err(CommitError::InvalidRange { .. })
        ));
        assert!(matches!(
            wc.ack(W, 1, 5, 4),
            Err(CommitError::InvalidRange { .. })
        ));
        assert!(matches!(
            wc.ack(W, 1, 2, MAX_ACK_GAP + 1),
            Err(CommitError::AckTooFarAhead { .. })
        ));
        assert!(matches!(
            wc.ack(W, 1, u64::MAX, u64::MAX),
            Err(CommitError::AckTooFarAhead { .. })
        ));
        assert_eq!(wc.ack(W, 1, 2, MAX_ACK_GAP), Ok(AckOutcome::Unchanged));
        assert_eq!(wc.committed(), 0);
        // Fill up the range table with isolated seqs.
        let mut wc = WriterCommit::new(1, 0);
        for i in 0..MAX_ACK_RANGES as u64 {
            let s = 3 + 2 * i;
            assert_eq!(wc.ack(W, 1, s, s), Ok(AckOutcome::Unchanged));
        }
        assert_eq!(wc.pending_ranges(), MAX_ACK_RANGES);
        let before = wc.clone();
        let next = 3 + 2 * MAX_ACK_RANGES as u64;
        assert!(matches!(
            wc.ack(W, 1, next, next),
            Err(CommitError::TooManyRanges { .. })
        ));
        assert_eq!(wc, before);
        // Merging into existing ranges is still fine at the bound.
        assert_eq!(wc.ack(W, 1, 4, 4), Ok(AckOutcome::Unchanged));
        assert_eq!(wc.pending_ranges(), MAX_ACK_RANGES - 1);
        // Filling the first hole sweeps the touching range 3..=5 into the prefix.
        assert!(wc.ack(W, 1, 1, 2).unwrap().advanced());
        assert_eq!(wc.committed(), 5);
        assert_eq!(
            wc.ack(W, 1, 1, next),
            Ok(AckOutcome::Advanced {
                writer: W,
                from: 5,
                to: next
            })
        );
        assert_eq!(wc.pending_ranges(), 0);
    }

    #[test]
    fn tracker_registers_acks_and_restarts() {
        let mut t = CommitTracker::new();
        assert!(matches!(
            t.ack(W, 1, 1, 1),
            Err(CommitError::UnknownWriter { .. })
        ));
        assert!(matches!(
            t.register(WriterId(MAX_WRITERS as u8), 1, 0),
            Err(CommitError::WriterOutOfRange { .. })
        ));
        assert_eq!(t.register(W, 1, 0), Ok(AckOutcome::Unchanged));
        assert_eq!(
            t.ack(W, 1, 1, 4),
            Ok(AckOutcome::Advanced {
                writer: W,
                from: 0,
                to: 4
            })
        );
        assert_eq!(t.committed(), &CountVector::from_slice(&[0, 4]));
        // Restart: same generation refused, base below committed refused.
        assert!(matches!(
            t.register(W, 1, 4),
            Err(CommitError::GenerationNotNewer { .. })
        ));
        assert!(matches!(
            t.register(W, 2, 3),
            Err(CommitError::BaseBelowCommitted { .. })
        ));
        assert_eq!(
            t.register(W, 2, 6),
            Ok(AckOutcome::Advanced {
                writer: W,
                from: 4,
                to: 6
            })
        );
        // Old incarnation's ack is stale and changes nothing.
        assert!(matches!(
            t.ack(W, 1, 7, 7),
            Ok(AckOutcome::StaleGeneration { .. })
        ));
        assert_eq!(t.committed().get(1), 6);
        assert!(t.ack(W, 2, 7, 7).unwrap().advanced());
        assert_eq!(t.committed().get(1), 7);
    }

    #[test]
    fn observe_committed_is_monotone_and_moves_prefixes() {
        let mut t = CommitTracker::new();
        t.register(W, 1, 0).unwrap();
        t.ack(W, 1, 5, 6).unwrap();
        assert!(t.observe_committed(&CountVector::from_slice(&[3, 4, 0, 9])));
        assert_eq!(t.committed(), &CountVector::from_slice(&[3, 6, 0, 9]));
        assert_eq!(t.writer(W).unwrap().committed(), 6);
        assert!(!t.observe_committed(&CountVector::from_slice(&[1, 1])));
        assert_eq!(t.committed(), &CountVector::from_slice(&[3, 6, 0, 9]));
        assert!(t.set_epoch(5));
        assert!(!t.set_epoch(4));
        assert_eq!(t.committed().get(EPOCH_ENTRY), 5);
    }

    /// Acks for seqs `1..=n` minus `missing`, as ranges, shuffled and duplicated.
    fn ack_script() -> impl Strategy<Value = (u64, Vec<(u64, u64)>)> {
        (1u64..60, proptest::collection::vec(any::<bool>(), 60))
            .prop_flat_map(|(n, drop)| {
                // Split 1..=n into chunks; drop some (holes).
                let mut ranges = Vec::new();
                let mut s = 1;
                let mut k = 0;
                while s <= n {
                    let len = 1 + (k as u64 * 7 + s) % 4;
                    let e = (s + len - 1).min(n);
                    if !drop[k % drop.len()] || k % 3 != 0 {
                        ranges.push((s, e));
                    }
                    s = e + 1;
                    k += 1;
                }
                let len = ranges.len();
                (
                    Just(n),
                    Just(ranges.clone()),
                    proptest::collection::vec(0..len.max(1), 0..len + 1),
                )
            })
            .prop_flat_map(|(n, ranges, dups)| {
                let mut all = ranges.clone();
                for d in dups {
                    if let Some(r) = ranges.get(d) {
                        all.push(*r);
                    }
                }
                (Just(n), Just(all).prop_shuffle())
            })
    }

    proptest! {
        #[test]
        fn committed_is_exactly_the_contiguous_prefix((_n, acks) in ack_script(), base in 0u64..3) {
            let mut t = CommitTracker::new();
            t.register(W, 9, 0).unwrap();
            let mut wc = WriterCommit::new(9, 0);
            let mut acked = std::collections::BTreeSet::new();
            let mut last = 0;
            // A stale-generation ack in the middle must change nothing.
            for (i, (f, l)) in acks.iter().enumerate() {
                if i == 1 {
                    let stale = matches!(t.ack(W, 8, 1, 100).unwrap(), AckOutcome::StaleGeneration { .. });
                    prop_assert!(stale);
                }
                let out = t.ack(W, 9, *f, *l).unwrap();
                wc.ack(W, 9, *f, *l).unwrap();
                acked.extend(*f..=*l);
                let mut prefix = 0;
                while acked.contains(&(prefix + 1)) { prefix += 1; }
                let now = t.committed().get(W.index());
                prop_assert_eq!(now, prefix);
                prop_assert_eq!(wc.committed(), prefix);
                prop_assert!(now >= last);
                prop_assert_eq!(out.advanced(), now > last);
                if let AckOutcome::Advanced { from, to, .. } = out {
                    prop_assert_eq!((from, to), (last, now));
                }
                last = now;
                let highest = acked.iter().next_back().copied().unwrap_or(0);
                prop_assert_eq!(wc.highest_acked(), highest);
            }
            // With a base, seqs <= base count from the start.
            let mut wb = WriterCommit::new(1, base);
            for (f, l) in &acks { wb.ack(W, 1, *f, *l).unwrap(); }
            let mut prefix = base;
            while acked.contains(&(prefix + 1)) { prefix += 1; }
            prop_assert_eq!(wb.committed(), prefix);
        }

        #[test]
        fn observed_vectors_and_acks_combine_monotonically(
            (_n, acks) in ack_script(),
            observes in proptest::collection::vec((0usize..40, 0u64..40), 0..4),
        ) {
            let mut t = CommitTracker::new();
            t.register(W, 3, 0).unwrap();
            let mut durable = std::collections::BTreeSet::new();
            let mut last = CountVector::ZERO;
            for (i, (f, l)) in acks.iter().enumerate() {
                for (at, v) in &observes {
                    if *at == i {
                        t.observe_committed(&CountVector::from_slice(&[*v, *v]));
                        durable.extend(1..=*v);
                    }
                }
                t.ack(W, 3, *f, *l).unwrap();
                durable.extend(*f..=*l);
                let mut prefix = 0;
                while durable.contains(&(prefix + 1)) { prefix += 1; }
                prop_assert_eq!(t.committed().get(W.index()), prefix);
                prop_assert_eq!(t.writer(W).unwrap().committed(), prefix);
                prop_assert!(t.committed().dominates(&last));
                last = *t.committed();
            }
        }
    }
}
