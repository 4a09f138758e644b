//! The largest causally closed cut (DESIGN §3), behind the signature of
//! `pipecloud_core::cut` (`WriterHistory`, `largest_closed_cut`).
//!
//! PRIVATE FALLBACK: `core/src/cut.rs` is being written by another engineer with
//! this exact API. Once it lands, this module re-exports the core's items and the
//! code below is deleted.
//!
//! Rule: for each writer `i` a prefix `s_i <= durable_prefix(i)` such that
//! `deps_upto(i, s_i)[j] <= s_j` for every writer `j`; start from the durable
//! prefixes and shrink until closed. `deps_upto` is monotone in `seq`, so each
//! shrink is a binary search; the result is the unique largest closed cut (closed
//! cuts are closed under element-wise max). Entries of writers beyond the slice,
//! and the epoch entry, are not disk writes and are ignored.

use pipecloud_core::{CountVector, Seq, MAX_WRITERS};

/// What the cut needs to know about one writer's journaled writes.
pub trait WriterHistory {
    /// Highest seq with all of `1..=seq` journaled.
    fn durable_prefix(&self) -> Seq;
    /// Element-wise max of the vectors of writes `1..=seq` (`seq <= durable_prefix()`).
    fn deps_upto(&self, seq: Seq) -> CountVector;
}

/// The largest causally closed cut; `writers[i]` is writer `i`'s history.
pub fn largest_closed_cut(writers: &[&dyn WriterHistory]) -> CountVector {
    let n = writers.len().min(MAX_WRITERS);
    let mut cut = CountVector::ZERO;
    for (i, w) in writers.iter().take(n).enumerate() {
        cut.set(i, w.durable_prefix());
    }
    let closed_at = |i: usize, seq: Seq, cut: &CountVector| -> bool {
        let d = writers[i].deps_upto(seq);
        (0..MAX_WRITERS).all(|j| j == i || d.get(j) <= cut.get(j))
    };
    loop {
        let mut changed = false;
        for i in 0..n {
            let s = cut.get(i);
            if s == 0 || closed_at(i, s, &cut) {
                continue;
            }
            // closed_at(i, 0) holds (no writes, no deps); find the largest closed seq < s.
            let (mut lo, mut hi) = (0, s);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if closed_at(i, mid, &cut) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            cut.set(i, lo);
            changed = true;
        }
        if !changed {
            return cut;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct H(Vec<CountVector>);
    impl WriterHistory for H {
        fn durable_prefix(&self) -> Seq {
            self.0.len() as Seq
        }
        fn deps_upto(&self, seq: Seq) -> CountVector {
            let mut m = CountVector::ZERO;
            for v in self.0.iter().take(seq as usize) {
                m.merge(v);
            }
            m
        }
    }

    fn closed(hs: &[H], cut: &CountVector) -> bool {
        hs.iter().enumerate().all(|(i, h)| {
            let d = h.deps_upto(cut.get(i));
            (0..hs.len()).all(|j| d.get(j) <= cut.get(j))
        })
    }

    proptest! {
        #[test]
        fn cut_is_largest_closed(
            raw in proptest::collection::vec(proptest::collection::vec((0u64..6, 0u64..6, 0u64..6), 0..6), 3)
        ) {
            let hs: Vec<H> = raw.iter().enumerate().map(|(i, ws)| {
                H(ws.iter().enumerate().map(|(k, (a, b, c))| {
                    let mut v = CountVector::from_slice(&[*a, *b, *c]);
                    v.set(i, k as u64 + 1);
                    v
                }).collect())
            }).collect();
            let refs: Vec<&dyn WriterHistory> = hs.iter().map(|h| h as &dyn WriterHistory).collect();
            let cut = largest_closed_cut(&refs);
            prop_assert!(closed(&hs, &cut));
            // Brute force: no closed cut is larger in any entry.
            let l: Vec<u64> = hs.iter().map(|h| h.durable_prefix()).collect();
            for a in 0..=l[0] { for b in 0..=l[1] { for c in 0..=l[2] {
                let v = CountVector::from_slice(&[a, b, c]);
                if closed(&hs, &v) { prop_assert!(cut.dominates(&v)); }
            }}}
        }
    }
}
