//! The largest causally closed cut over journaled writes (docs/design.md §3.6, the
//! failover cut).
//!
//! At failover the backup materialises its volumes at a *cut*: for each writer
//! `i` a prefix `s_i` of its writes (no holes). A cut is *closed* when every
//! included write's vector `V` satisfies `V[j] <= s_j` for every entry `j`:
//! nothing in the cut depends on a write outside it. Closed cuts are closed
//! under element-wise max (if `s` and `t` are closed, a write in `max(s, t)`
//! lies in `s` or in `t`, and its vector is covered by that cut, hence by the
//! max), so among the cuts below the journaled prefixes there is a unique
//! largest one. Because a client-bound packet is released only when the
//! committed vector (made of journaled prefixes) dominates its tag, every reply
//! a client saw is contained in that cut.
//!
//! A write's own entry counts like any other: writer `i`'s write `seq` carries
//! `V[i] == seq`, which is fine because including it means `s_i >= seq`.
//!
//! # Algorithm
//!
//! Start from the journaled contiguous prefixes `s_i = durable_prefix(i)`.
//! While some writer's prefix is not closed (`deps_upto(s_i) </= s`), shrink
//! `s_i` to the largest `s' <= s_i` with `deps_upto(s') <= s`, found by binary
//! search (`deps_upto` is monotone in its argument). The largest closed cut `s*`
//! stays below `s` throughout: each step keeps `s_i >= s*_i`, because
//! `deps_upto(s*_i) <= s* <= s` means `s*_i` satisfies the search condition. The
//! fixpoint is closed by definition and dominates `s*`, so it is `s*`. Every
//! step strictly lowers some `s_i`, so the loop terminates (even for a history
//! whose `deps_upto` misbehaves: each result is then still closed, if smaller).
//!
//! Cost: each round is O(n · log S) calls of `deps_upto` for `n` writers and
//! prefixes up to `S`; the number of rounds is small for real histories and at
//! most `Σ s_i + 1` for adversarial ones (every round lowers some `s_i`).

use crate::prefix::{ContiguousPrefix, Insert, PrefixBounds};
use crate::vector::{CountVector, Seq, VECTOR_LEN};

/// The journaled writes of one writer, as the cut needs them.
pub trait WriterHistory {
    /// Highest `k` such that writes `1..=k` are all journaled (durable).
    fn durable_prefix(&self) -> Seq;

    /// Element-wise max of the vectors of writes `1..=seq` of this writer
    /// (`CountVector::ZERO` for `seq == 0`). Only called with
    /// `seq <= durable_prefix()`; must be monotone in `seq`.
    fn deps_upto(&self, seq: Seq) -> CountVector;
}

/// The largest causally closed cut of `writers`; entry `i` is the prefix of
/// `writers[i]`. Entries of writers not in the slice (and the epoch entry) are
/// treated as prefix 0: a write that depends on them is never included.
///
/// # Panics
/// If `writers.len() > VECTOR_LEN` (a programming error: groups have at most
/// `MAX_WRITERS` writers).
pub fn largest_closed_cut(writers: &[&dyn WriterHistory]) -> CountVector {
    assert!(
        writers.len() <= VECTOR_LEN,
        "more writers than vector entries"
    );
    let mut cut = CountVector::ZERO;
    for (i, w) in writers.iter().enumerate() {
        cut.set(i, w.durable_prefix());
    }
    loop {
        let mut changed = false;
        for (i, w) in writers.iter().enumerate() {
            let s = cut.get(i);
            // An empty prefix includes no write and is always closed.
            if s == 0 || w.deps_upto(s).le(&cut) {
                continue;
            }
            // Largest s' in 0..s with deps_upto(s') <= cut; s' = 0 always qualifies.
            let (mut lo, mut hi) = (0, s - 1);
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if w.deps_upto(mid).le(&cut) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            cut.set(i, lo);
            changed = true;
        }
        if !changed {
            debug_assert!(writers
                .iter()
                .enumerate()
                .all(|(i, w)| cut.get(i) == 0 || w.deps_upto(cut.get(i)).le(&cut)));
            return cut;
        }
    }
}

/// A simple in-memory [`WriterHistory`]: writes `(seq, vector)` added in any
/// order, possibly with holes. Keeps the prefix maxima of the contiguous
/// journaled prefix (one vector per write) and the writes beyond the first
/// hole until the hole is filled (the contiguous-prefix rule of
/// [`crate::prefix`]). Memory grows with the writes added; meant for tests,
/// models and small journals. A write more than [`VEC_HISTORY_MAX_AHEAD`] seqs
/// beyond the prefix is refused.
#[derive(Debug, Clone)]
pub struct VecHistory {
    /// `prefix_max[k - 1]` = max of the vectors of writes `1..=k`.
    prefix_max: Vec<CountVector>,
    /// The contiguous prefix and the writes beyond its first hole.
    seqs: ContiguousPrefix<CountVector>,
}

/// Furthest a [`VecHistory`] write may lie beyond the contiguous prefix.
pub const VEC_HISTORY_MAX_AHEAD: Seq = 1 << 16;

impl Default for VecHistory {
    fn default() -> Self {
        VecHistory {
            prefix_max: Vec::new(),
            seqs: ContiguousPrefix::new(
                0,
                PrefixBounds {
                    max_ahead: VEC_HISTORY_MAX_AHEAD,
                    max_runs: usize::MAX,
                },
            ),
        }
    }
}

impl VecHistory {
    /// An empty history (durable prefix 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// A history built from writes in any order.
    pub fn from_writes(writes: impl IntoIterator<Item = (Seq, CountVector)>) -> Self {
        let mut h = Self::new();
        for (seq, vector) in writes {
            h.insert(seq, vector);
        }
        h
    }

    /// Adds write `seq` with its vector; returns whether it was new. Seq 0, seqs
    /// already present (in the prefix or held beyond it: the first copy stays) and
    /// seqs too far ahead are ignored (returns `false`).
    pub fn insert(&mut self, seq: Seq, vector: CountVector) -> bool {
        let prefix_max = &mut self.prefix_max;
        let added = self.seqs.insert(seq, vector, |_, v| {
            let mut max = prefix_max.last().copied().unwrap_or_default();
            max.merge(&v);
            prefix_max.push(max);
        });
        matches!(added, Insert::Added { .. })
    }
}

impl WriterHistory for VecHistory {
    fn durable_prefix(&self) -> Seq {
        self.prefix_max.len() as Seq
    }

    /// Seqs beyond the durable prefix are clamped to it.
    fn deps_upto(&self, seq: Seq) -> CountVector {
        let k = usize::try_from(seq)
            .unwrap_or(usize::MAX)
            .min(self.prefix_max.len());
        match k.checked_sub(1) {
            Some(i) => self.prefix_max[i],
            None => CountVector::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &[Seq]) -> CountVector {
        CountVector::from_slice(s)
    }

    fn cut_of(hs: &[VecHistory]) -> CountVector {
        let refs: Vec<&dyn WriterHistory> = hs.iter().map(|h| h as &dyn WriterHistory).collect();
        largest_closed_cut(&refs)
    }

    #[test]
    fn history_tracks_contiguous_prefix() {
        let mut h = VecHistory::new();
        assert!(h.insert(2, v(&[2, 1])));
        assert!(h.insert(4, v(&[4, 3])));
        assert!(!h.insert(0, v(&[])));
        assert_eq!(h.durable_prefix(), 0);
        assert!(h.insert(1, v(&[1])));
        assert_eq!(h.durable_prefix(), 2);
        assert!(!h.insert(2, v(&[9, 9])));
        assert!(h.insert(3, v(&[3, 0, 5])));
        assert_eq!(h.durable_prefix(), 4);
        assert_eq!(h.deps_upto(0), CountVector::ZERO);
        assert_eq!(h.deps_upto(1), v(&[1]));
        assert_eq!(h.deps_upto(3), v(&[3, 1, 5]));
        assert_eq!(h.deps_upto(4), v(&[4, 3, 5]));
        assert_eq!(h.deps_upto(99), v(&[4, 3, 5]));
    }

    #[test]
    fn cut_shrinks_through_a_chain() {
        // w0: 1,2,3; w0's write 3 depends on w1's write 2.
        // w1: 1 journaled, 2 missing (hole), 3 journaled.
        // w2: write 1 depends on w0's write 3.
        let w0 = VecHistory::from_writes([(1, v(&[1])), (2, v(&[2])), (3, v(&[3, 2]))]);
        let w1 = VecHistory::from_writes([(3, v(&[0, 3])), (1, v(&[0, 1]))]);
        let w2 = VecHistory::from_writes([(1, v(&[3, 0, 1])), (2, v(&[3, 1, 2]))]);
        assert_eq!(cut_of(&[w0.clone(), w1.clone(), w2.clone()]), v(&[2, 1, 0]));
        // Without w2, only w0 shrinks.
        assert_eq!(cut_of(&[w0, w1]), v(&[2, 1]));
        // A dependency on an absent writer (or the epoch entry) excludes the write.
        let mut e = v(&[1]);
        e.set(crate::EPOCH_ENTRY, 1);
        let w = VecHistory::from_writes([(1, v(&[1])), (2, e)]);
        assert_eq!(cut_of(&[w]), v(&[1]));
        assert_eq!(cut_of(&[]), CountVector::ZERO);
    }

    #[test]
    fn cut_handles_adversarial_ping_pong() {
        // w1's write k claims to depend on w0's write k+1 and vice versa: the
        // only closed cut is empty; the fixpoint walks all the way down.
        let n = 200;
        let w0 = VecHistory::from_writes((1..=n).map(|k| (k, v(&[k, k]))));
        let w1 = VecHistory::from_writes((1..=n).map(|k| (k, v(&[k + 1, k]))));
        assert_eq!(cut_of(&[w0, w1]), CountVector::ZERO);
    }

    /// Small histories: per writer up to 5 writes (own entry = seq, other entries
    /// random, possibly beyond what is journaled), some dropped, shuffled.
    fn histories() -> impl Strategy<Value = Vec<Vec<(Seq, CountVector)>>> {
        (1usize..=4).prop_flat_map(|n| {
            proptest::collection::vec(
                (0u64..=5).prop_flat_map(move |m| {
                    proptest::collection::vec(
                        (
                            proptest::collection::vec(0u64..=5, n),
                            any::<bool>(),
                            0u8..4,
                        ),
                        m as usize,
                    )
                }),
                n,
            )
            .prop_map(move |writers| {
                writers
                    .into_iter()
                    .enumerate()
                    .map(|(i, ws)| {
                        ws.into_iter()
                            .enumerate()
                            // drop roughly a quarter of the writes (holes)
                            .filter(|(_, (_, _, drop))| *drop != 0)
                            .map(|(k, (mut deps, sparse, _))| {
                                let seq = k as Seq + 1;
                                if sparse {
                                    // mostly-causal histories: depend on little
                                    deps.iter_mut().for_each(|d| *d /= 3);
                                }
                                deps[i] = seq;
                                (seq, CountVector::from_slice(&deps))
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
        })
    }

    fn is_closed(hs: &[VecHistory], cut: &[Seq]) -> bool {
        let cv = CountVector::from_slice(cut);
        hs.iter()
            .zip(cut)
            .all(|(h, &s)| s <= h.durable_prefix() && h.deps_upto(s).le(&cv))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn cut_equals_brute_force_maximum(
            writers in histories(),
            order_seed in any::<u64>(),
        ) {
            let hs: Vec<VecHistory> = writers
                .iter()
                .map(|ws| {
                    // insert in a seed-dependent order (out of order arrival)
                    let mut ws = ws.clone();
                    let len = ws.len().max(1);
                    ws.rotate_left((order_seed as usize) % len);
                    if order_seed & 1 == 1 { ws.reverse(); }
                    VecHistory::from_writes(ws)
                })
                .collect();
            let prefixes: Vec<Seq> = hs.iter().map(|h| h.durable_prefix()).collect();
            // Enumerate all prefix combinations; collect the closed ones.
            let mut closed: Vec<Vec<Seq>> = Vec::new();
            let mut cur = vec![0; hs.len()];
            loop {
                if is_closed(&hs, &cur) { closed.push(cur.clone()); }
                let mut i = 0;
                loop {
                    if i == cur.len() { break; }
                    if cur[i] < prefixes[i] { cur[i] += 1; break; }
                    cur[i] = 0;
                    i += 1;
                }
                if i == cur.len() { break; }
            }
            // The all-zero cut is always closed. Closed cuts are closed under
            // join, so the element-wise max of all closed cuts is itself closed:
            // the unique largest one.
            prop_assert!(is_closed(&hs, &vec![0; hs.len()]));
            let mut max = vec![0; hs.len()];
            for c in &closed {
                for (m, x) in max.iter_mut().zip(c) { *m = (*m).max(*x); }
            }
            prop_assert!(is_closed(&hs, &max));
            let got = cut_of(&hs);
            prop_assert_eq!(got, CountVector::from_slice(&max));
        }
    }
}
