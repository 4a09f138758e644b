//! The contiguous-prefix rule: which seqs of one writer count, given that they
//! arrive out of order, with holes and repeats.
//!
//! **Rule.** After any sequence of inserts, [`ContiguousPrefix::prefix`] is the
//! highest seq `p` such that every seq of `1..=p` is present (the ones at or below
//! the base given to [`ContiguousPrefix::new`] count as present from the start).
//! It never decreases. A seq beyond the first hole is kept until the hole is
//! filled, then joins the prefix; every inserted value leaves through the caller's
//! *sink* exactly once, in seq order, at the moment its seq joins the prefix.
//!
//! This one type is what the agent's commit tracking ([`crate::commit`], acked
//! seqs), the backup's journal index (journaled seqs) and the cut's in-memory
//! history ([`crate::cut::VecHistory`]) use to decide what is contiguous.
//!
//! **Why the structure obeys the rule.** The seqs beyond the prefix live in a
//! window: slot `i` holds seq `prefix + 1 + i`. Invariant: the window's first
//! slot is empty (otherwise that seq would extend the prefix) and its last slot
//! is full (the window ends at the highest seq present). An insert fills its
//! slot; when that slot is the first one, the prefix advances over every full
//! slot at the front until the first empty one, which restores the invariant and
//! is exactly "all of `1..=p` present".
//!
//! **Cost.** O(1) amortised per inserted seq: an insert touches its slot and its
//! two neighbours; each slot is created once (when an insert reaches past the
//! window) and removed once (when the prefix passes it).
//!
//! **Bounds.** A seq more than `max_ahead` past the prefix is refused
//! ([`Insert::TooFarAhead`]); a seq beyond a hole that would start one more
//! disjoint run than `max_runs` is refused ([`Insert::TooManyRuns`]). A refusal
//! changes nothing (the sender may retry once the prefix has caught up). Memory is
//! therefore at most `max_ahead` slots of `size_of::<Option<T>>()` bytes (one byte
//! for `T = ()`; box large values); the slots' storage is given back whenever the
//! window empties.

use crate::vector::Seq;
use std::collections::VecDeque;

/// Window capacity kept when the window empties (larger capacity is given back).
const KEEP_CAPACITY: usize = 1024;

/// The limits of a [`ContiguousPrefix`] (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixBounds {
    /// Furthest a seq may lie beyond the prefix.
    pub max_ahead: Seq,
    /// Most disjoint runs of seqs held beyond the first hole.
    pub max_runs: usize,
}

/// What an insert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// New; the prefix went from `from` to `to` (`from == to`: kept beyond a hole).
    Added { from: Seq, to: Seq },
    /// Already present (at or below the prefix, or held beyond it): nothing changed.
    Duplicate,
    /// More than `max_ahead` past the prefix: refused, nothing changed.
    TooFarAhead,
    /// Would start a run beyond `max_runs`: refused, nothing changed.
    TooManyRuns,
}

/// The contiguous prefix of one writer's seqs plus the values of the seqs held
/// beyond its first hole (see the module documentation for the rule and bounds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContiguousPrefix<T> {
    prefix: Seq,
    /// Slot `i` holds seq `prefix + 1 + i`; first slot empty, last slot full.
    window: VecDeque<Option<T>>,
    /// Full slots in `window`.
    present: usize,
    /// Maximal runs of full slots in `window`.
    runs: usize,
    bounds: PrefixBounds,
}

impl<T> ContiguousPrefix<T> {
    /// A prefix at `base`: seqs `1..=base` count as present, nothing beyond.
    ///
    /// # Panics
    /// If `bounds.max_ahead` does not fit in `usize` (a programming error).
    pub fn new(base: Seq, bounds: PrefixBounds) -> Self {
        assert!(
            usize::try_from(bounds.max_ahead).is_ok(),
            "max_ahead {} does not fit in memory",
            bounds.max_ahead
        );
        ContiguousPrefix {
            prefix: base,
            window: VecDeque::new(),
            present: 0,
            runs: 0,
            bounds,
        }
    }

    /// Highest seq with every seq of `1..=seq` present.
    pub fn prefix(&self) -> Seq {
        self.prefix
    }

    /// Highest seq present (the prefix when nothing is held beyond it).
    pub fn highest(&self) -> Seq {
        self.prefix + self.window.len() as Seq
    }

    /// Whether `seq` is present (in the prefix, or held beyond it).
    pub fn contains(&self, seq: Seq) -> bool {
        seq <= self.prefix || self.slot(seq).is_some_and(|s| s.is_some())
    }

    /// Number of seqs held beyond the first hole.
    pub fn ahead_len(&self) -> usize {
        self.present
    }

    /// Number of disjoint runs of seqs held beyond the first hole.
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// The limits this prefix was made with.
    pub fn bounds(&self) -> PrefixBounds {
        self.bounds
    }

    /// Inserts `seq` with `value`. Values whose seqs join the prefix (this one
    /// and any held ones it connects) are handed to `sink` in seq order.
    pub fn insert(&mut self, seq: Seq, value: T, sink: impl FnMut(Seq, T)) -> Insert {
        if seq <= self.prefix || self.contains(seq) {
            return Insert::Duplicate;
        }
        if seq - self.prefix > self.bounds.max_ahead {
            return Insert::TooFarAhead;
        }
        if seq != self.prefix + 1
            && !self.contains(seq - 1)
            && !self.contains(seq + 1)
            && self.runs >= self.bounds.max_runs
        {
            return Insert::TooManyRuns;
        }
        let from = self.prefix;
        self.fill(seq, value, sink);
        Insert::Added {
            from,
            to: self.prefix,
        }
    }

    /// Raises the prefix to at least `seq` (an authority says `1..=seq` are all
    /// present), then over any held seqs that now connect to it. Values passed
    /// over go to `sink` in seq order. Returns whether the prefix grew; never lowers.
    pub fn advance_to(&mut self, seq: Seq, mut sink: impl FnMut(Seq, T)) -> bool {
        if seq <= self.prefix {
            return false;
        }
        while self.prefix < seq {
            if self.window.is_empty() {
                self.prefix = seq;
                break;
            }
            self.pop_front(&mut sink);
        }
        self.absorb(&mut sink);
        true
    }

    /// Drops every value held beyond the first hole (they belonged to an old
    /// incarnation of the writer); returns how many. The prefix stays.
    pub fn clear_ahead(&mut self) -> usize {
        let dropped = self.present;
        self.window.clear();
        self.window.shrink_to(KEEP_CAPACITY);
        self.present = 0;
        self.runs = 0;
        dropped
    }

    fn slot(&self, seq: Seq) -> Option<&Option<T>> {
        let i = seq.checked_sub(self.prefix + 1)?;
        self.window.get(usize::try_from(i).ok()?)
    }

    /// Puts `value` into the empty slot of `seq` (`prefix < seq <= prefix +
    /// max_ahead`, checked by the caller) and advances the prefix if it can.
    fn fill(&mut self, seq: Seq, value: T, mut sink: impl FnMut(Seq, T)) {
        let left = seq > self.prefix + 1 && self.contains(seq - 1);
        let right = self.contains(seq + 1);
        let i = usize::try_from(seq - self.prefix - 1).expect("bounded by max_ahead");
        if self.window.len() <= i {
            self.window.resize_with(i + 1, || None);
        }
        debug_assert!(self.window[i].is_none());
        self.window[i] = Some(value);
        self.present += 1;
        match (left, right) {
            (false, false) => self.runs += 1,
            (true, true) => self.runs -= 1,
            _ => {}
        }
        self.absorb(&mut sink);
    }

    /// Advances the prefix over the full slots at the front of the window.
    fn absorb(&mut self, sink: &mut impl FnMut(Seq, T)) {
        while matches!(self.window.front(), Some(Some(_))) {
            self.pop_front(sink);
        }
        if self.window.is_empty() {
            self.window.shrink_to(KEEP_CAPACITY);
        }
    }

    /// Moves the prefix one seq forward over the window's first slot.
    fn pop_front(&mut self, sink: &mut impl FnMut(Seq, T)) {
        let slot = self.window.pop_front().expect("caller checked the window");
        self.prefix += 1;
        if let Some(value) = slot {
            self.present -= 1;
            if !matches!(self.window.front(), Some(Some(_))) {
                self.runs -= 1; // that slot ended its run
            }
            sink(self.prefix, value);
        }
    }
}

impl ContiguousPrefix<()> {
    /// Inserts every seq of `first..=last` (`1 <= first <= last`, checked by the
    /// caller). Parts at or below the prefix are duplicates and ignored. The bounds
    /// apply to the range as a whole: refused if `last` is too far ahead, or if the
    /// range lies beyond a hole, touches no held run and `max_runs` are held.
    /// Returns [`Insert::Duplicate`] when every seq of the range was present already.
    pub fn insert_range(&mut self, first: Seq, last: Seq) -> Insert {
        debug_assert!(first >= 1 && first <= last);
        if last <= self.prefix {
            return Insert::Duplicate;
        }
        if last - self.prefix > self.bounds.max_ahead {
            return Insert::TooFarAhead;
        }
        let from = self.prefix;
        let first = first.max(self.prefix + 1);
        if first == self.prefix + 1 {
            self.advance_to(last, |_, ()| {});
            return Insert::Added {
                from,
                to: self.prefix,
            };
        }
        if (first..=last).all(|s| self.contains(s)) {
            return Insert::Duplicate;
        }
        let touches = (first - 1..=last.saturating_add(1)).any(|s| self.contains(s));
        if !touches && self.runs >= self.bounds.max_runs {
            return Insert::TooManyRuns;
        }
        for s in first..=last {
            if !self.contains(s) {
                self.fill(s, (), |_, ()| {});
            }
        }
        Insert::Added {
            from,
            to: self.prefix,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const B: PrefixBounds = PrefixBounds {
        max_ahead: 8,
        max_runs: 2,
    };

    fn drain(p: &mut ContiguousPrefix<char>, seq: Seq, c: char) -> (Insert, String) {
        let mut out = String::new();
        let r = p.insert(seq, c, |_, c| out.push(c));
        (r, out)
    }

    #[test]
    fn holes_fill_in_order() {
        let mut p = ContiguousPrefix::new(0, B);
        assert_eq!(
            drain(&mut p, 3, 'c'),
            (Insert::Added { from: 0, to: 0 }, "".into())
        );
        assert_eq!(
            drain(&mut p, 2, 'b'),
            (Insert::Added { from: 0, to: 0 }, "".into())
        );
        assert_eq!((p.ahead_len(), p.runs(), p.highest()), (2, 1, 3));
        assert_eq!(drain(&mut p, 3, 'x'), (Insert::Duplicate, "".into()));
        assert_eq!(
            drain(&mut p, 1, 'a'),
            (Insert::Added { from: 0, to: 3 }, "abc".into())
        );
        assert_eq!(drain(&mut p, 0, 'x'), (Insert::Duplicate, "".into()));
        assert_eq!(drain(&mut p, 2, 'x'), (Insert::Duplicate, "".into()));
        assert_eq!((p.prefix(), p.ahead_len(), p.runs()), (3, 0, 0));
    }

    #[test]
    fn bounds_refuse_and_change_nothing() {
        let mut p = ContiguousPrefix::new(10, B);
        assert_eq!(drain(&mut p, 19, 'x').0, Insert::TooFarAhead);
        assert_eq!(drain(&mut p, 18, 'h').0, Insert::Added { from: 10, to: 10 });
        assert_eq!(drain(&mut p, 13, 'c').0, Insert::Added { from: 10, to: 10 });
        let before = p.clone();
        assert_eq!(drain(&mut p, 15, 'e').0, Insert::TooManyRuns);
        assert_eq!(p, before);
        // Touching a held run or the prefix is not a new run.
        assert_eq!(drain(&mut p, 14, 'd').0, Insert::Added { from: 10, to: 10 });
        assert_eq!(drain(&mut p, 11, 'a').0, Insert::Added { from: 10, to: 11 });
        assert_eq!(p.clear_ahead(), 3);
        assert_eq!((p.prefix(), p.highest(), p.runs()), (11, 11, 0));
    }

    #[test]
    fn ranges_and_advance() {
        let mut p = ContiguousPrefix::<()>::new(0, B);
        assert_eq!(p.insert_range(4, 5), Insert::Added { from: 0, to: 0 });
        assert_eq!(p.insert_range(1, 2), Insert::Added { from: 0, to: 2 });
        assert_eq!(p.insert_range(1, 2), Insert::Duplicate);
        assert_eq!(p.insert_range(7, 7), Insert::Added { from: 2, to: 2 });
        assert_eq!(p.insert_range(9, 9), Insert::TooManyRuns);
        assert_eq!(p.insert_range(11, 11), Insert::TooFarAhead);
        assert_eq!(p.runs(), 2);
        assert!(p.advance_to(3, |_, ()| {}));
        assert_eq!((p.prefix(), p.runs()), (5, 1));
        assert!(!p.advance_to(5, |_, ()| {}));
        assert!(p.advance_to(100, |_, ()| {}));
        assert_eq!((p.prefix(), p.ahead_len(), p.runs()), (100, 0, 0));
    }

    #[derive(Clone, Debug)]
    enum Op {
        One(Seq),
        Range(Seq, Seq),
        Advance(Seq),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..40).prop_map(Op::One),
            3 => (1u64..40, 0u64..6).prop_map(|(a, n)| Op::Range(a, a + n)),
            1 => (0u64..40).prop_map(Op::Advance),
            1 => Just(Op::Clear),
        ]
    }

    /// A base, bounds and a sequence of operations.
    fn case() -> impl Strategy<Value = (Seq, PrefixBounds, Vec<Op>)> {
        (
            0u64..4,
            1u64..24,
            1usize..5,
            proptest::collection::vec(op(), 0..60),
        )
            .prop_map(|(base, max_ahead, max_runs, ops)| {
                (
                    base,
                    PrefixBounds {
                        max_ahead,
                        max_runs,
                    },
                    ops,
                )
            })
    }

    /// The naive rule: the set of present seqs (with the value each came with).
    struct Model {
        base: Seq,
        held: BTreeMap<Seq, u32>,
    }

    impl Model {
        fn prefix(&self) -> Seq {
            let mut p = self.base;
            while self.held.contains_key(&(p + 1)) {
                p += 1;
            }
            p
        }
        fn present(&self, s: Seq) -> bool {
            s <= self.prefix() || self.held.contains_key(&s)
        }
        fn runs_beyond(&self) -> usize {
            let p = self.prefix();
            let beyond: Vec<Seq> = self.held.range(p + 1..).map(|(k, _)| *k).collect();
            (0..beyond.len())
                .filter(|&i| i == 0 || beyond[i - 1] + 1 != beyond[i])
                .count()
        }
        /// Drops the seqs held beyond the prefix; returns how many.
        fn clear(&mut self) -> usize {
            let beyond: Vec<Seq> = self
                .held
                .range(self.prefix() + 1..)
                .map(|(k, _)| *k)
                .collect();
            for k in &beyond {
                self.held.remove(k);
            }
            beyond.len()
        }
        /// What an insert of `first..=last` should answer, applying it if accepted.
        fn insert(&mut self, first: Seq, last: Seq, v: u32, b: PrefixBounds) -> Insert {
            let from = self.prefix();
            let first = first.max(from + 1);
            let new: Vec<Seq> = (first..=last).filter(|&s| !self.present(s)).collect();
            let touches = first == from + 1 || (first - 1..=last + 1).any(|s| self.present(s));
            if new.is_empty() {
                Insert::Duplicate
            } else if last - from > b.max_ahead {
                Insert::TooFarAhead
            } else if !touches && self.runs_beyond() >= b.max_runs {
                Insert::TooManyRuns
            } else {
                for s in new {
                    self.held.insert(s, v);
                }
                Insert::Added {
                    from,
                    to: self.prefix(),
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Single inserts with values, authoritative advances and clears against
        /// the naive rule: prefix, membership, held count, run count, refusals,
        /// and every value leaving exactly once, in seq order, as it joins the prefix.
        #[test]
        fn inserts_match_the_naive_rule((base, b, ops) in case()) {
            let mut p = ContiguousPrefix::new(base, b);
            let mut m = Model { base, held: BTreeMap::new() };
            let (mut out, mut want_out) = (Vec::new(), Vec::new());
            for (n, op) in ops.into_iter().enumerate() {
                let n = n as u32;
                let before = m.prefix();
                match op {
                    Op::One(s) | Op::Range(s, _) => {
                        let r = p.insert(s, n, |s, v| out.push((s, v)));
                        prop_assert_eq!(r, m.insert(s, s, n, b));
                    }
                    Op::Advance(s) => {
                        prop_assert_eq!(p.advance_to(s, |s, v| out.push((s, v))), s > before);
                        m.base = m.base.max(s);
                    }
                    Op::Clear => prop_assert_eq!(p.clear_ahead(), m.clear()),
                }
                let after = m.prefix();
                if after > before {
                    want_out.extend(m.held.range(before + 1..=after).map(|(k, v)| (*k, *v)));
                }
                prop_assert_eq!(p.prefix(), after);
                prop_assert_eq!(p.ahead_len(), m.held.range(after + 1..).count());
                prop_assert_eq!(p.runs(), m.runs_beyond());
                prop_assert_eq!(p.highest(), m.held.last_key_value().map_or(after, |(k, _)| after.max(*k)));
                for s in 0..50 {
                    prop_assert_eq!(p.contains(s), m.present(s), "seq {}", s);
                }
                prop_assert_eq!(&out, &want_out);
            }
        }

        /// Range inserts (value-free) against the same naive rule.
        #[test]
        fn ranges_match_the_naive_rule((base, b, ops) in case()) {
            let mut p = ContiguousPrefix::<()>::new(base, b);
            let mut m = Model { base, held: BTreeMap::new() };
            for op in ops {
                let before = m.prefix();
                match op {
                    Op::One(s) => {
                        prop_assert_eq!(p.insert(s, (), |_, ()| {}), m.insert(s, s, 0, b));
                    }
                    Op::Range(a, z) => prop_assert_eq!(p.insert_range(a, z), m.insert(a, z, 0, b)),
                    Op::Advance(s) => {
                        prop_assert_eq!(p.advance_to(s, |_, ()| {}), s > before);
                        m.base = m.base.max(s);
                    }
                    Op::Clear => prop_assert_eq!(p.clear_ahead(), m.clear()),
                }
                prop_assert_eq!(p.prefix(), m.prefix());
                prop_assert_eq!(p.runs(), m.runs_beyond());
                for s in 0..50 {
                    prop_assert_eq!(p.contains(s), m.present(s), "seq {}", s);
                }
            }
        }
    }
}
