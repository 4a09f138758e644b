//! Count vectors: per-writer knowledge of disk writes (docs/design.md §3).
//!
//! Entry `j` of a machine's *pending* vector is the highest sequence number of
//! writer `j` whose write may have causally preceded the machine's current
//! state. Entry `j` of the *committed* vector is the highest seq of writer `j`
//! such that all of `1..=seq` are durable at the backup.
//!
//! A vector has [`VECTOR_LEN`] entries: writers use `0..MAX_WRITERS`, and the
//! last entry, [`EPOCH_ENTRY`], is reserved for the checkpoint epoch counter of
//! the later full-state mode (a packet that waits for an epoch is "just one more
//! entry"). The core never gives the epoch entry special treatment.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A writer's sequence number. Seq 0 means "no write"; the first write is seq 1.
pub type Seq = u64;

/// Number of entries in every vector (writers plus reserved slots).
pub const VECTOR_LEN: usize = 16;

/// Most writers a protection group may have. Bounded by the IPv4 option, which
/// carries at most 8 non-zero 32-bit entries in its 40 bytes (see `ipopt`).
pub const MAX_WRITERS: usize = 8;

/// Index of the entry reserved for the checkpoint epoch (full-state mode).
pub const EPOCH_ENTRY: usize = VECTOR_LEN - 1;

/// Index of a writer inside its protection group, `0..MAX_WRITERS`.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct WriterId(pub u8);

impl WriterId {
    /// The vector entry this writer owns.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// A count vector of [`VECTOR_LEN`] sequence numbers. `Copy`, no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct CountVector {
    entries: [Seq; VECTOR_LEN],
}

impl CountVector {
    /// The all-zero vector (depends on nothing).
    pub const ZERO: CountVector = CountVector {
        entries: [0; VECTOR_LEN],
    };

    /// Builds a vector from a slice; missing entries are zero.
    ///
    /// # Panics
    /// If `values` is longer than [`VECTOR_LEN`] (a programming error).
    pub fn from_slice(values: &[Seq]) -> Self {
        assert!(values.len() <= VECTOR_LEN, "vector longer than VECTOR_LEN");
        let mut v = Self::ZERO;
        v.entries[..values.len()].copy_from_slice(values);
        v
    }

    /// Entry `i` (0 for out-of-range indices, which are never written).
    pub fn get(&self, i: usize) -> Seq {
        self.entries.get(i).copied().unwrap_or(0)
    }

    /// Sets entry `i`.
    ///
    /// # Panics
    /// If `i >= VECTOR_LEN`.
    pub fn set(&mut self, i: usize, value: Seq) {
        self.entries[i] = value;
    }

    /// Raises entry `i` to at least `value` (monotone update); returns whether it grew.
    pub fn raise(&mut self, i: usize, value: Seq) -> bool {
        if value > self.entries[i] {
            self.entries[i] = value;
            true
        } else {
            false
        }
    }

    /// Writer `w` issues a write: its own entry grows by one; returns the new seq.
    pub fn bump(&mut self, w: WriterId) -> Seq {
        let e = &mut self.entries[w.index()];
        *e += 1;
        *e
    }

    /// Element-wise maximum (knowledge merge on packet arrival). Returns whether
    /// any entry grew.
    pub fn merge(&mut self, other: &CountVector) -> bool {
        let mut grew = false;
        for (a, b) in self.entries.iter_mut().zip(other.entries.iter()) {
            if *b > *a {
                *a = *b;
                grew = true;
            }
        }
        grew
    }

    /// `self >= other` element-wise: everything `other` depends on is covered by `self`.
    pub fn dominates(&self, other: &CountVector) -> bool {
        self.entries
            .iter()
            .zip(other.entries.iter())
            .all(|(a, b)| a >= b)
    }

    /// `self <= other` element-wise.
    pub fn le(&self, other: &CountVector) -> bool {
        other.dominates(self)
    }

    /// Index of the first entry where `self` exceeds `committed` (the entry a
    /// held packet is blocked on), or `None` when `committed` dominates `self`.
    pub fn first_blocking(&self, committed: &CountVector) -> Option<usize> {
        self.entries
            .iter()
            .zip(committed.entries.iter())
            .position(|(t, c)| t > c)
    }

    /// All entries.
    pub fn as_slice(&self) -> &[Seq] {
        &self.entries
    }

    /// `(index, value)` of every non-zero entry, in index order.
    pub fn nonzero(&self) -> impl Iterator<Item = (usize, Seq)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0)
            .map(|(i, v)| (i, *v))
    }

    /// Whether every entry is zero.
    pub fn is_zero(&self) -> bool {
        self.entries.iter().all(|v| *v == 0)
    }
}

impl fmt::Debug for CountVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Prints the entries up to the last non-zero one, e.g. `[3,0,7]`.
impl fmt::Display for CountVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self
            .entries
            .iter()
            .rposition(|v| *v != 0)
            .map_or(0, |i| i + 1);
        write!(f, "[")?;
        for (i, v) in self.entries[..last].iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{v}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vec_strategy() -> impl Strategy<Value = CountVector> {
        proptest::collection::vec(0u64..20, VECTOR_LEN).prop_map(|v| CountVector::from_slice(&v))
    }

    #[test]
    fn bump_returns_new_seq() {
        let mut v = CountVector::ZERO;
        assert_eq!(v.bump(WriterId(2)), 1);
        assert_eq!(v.bump(WriterId(2)), 2);
        assert_eq!(v.get(2), 2);
        assert_eq!(v.to_string(), "[0,0,2]");
    }

    #[test]
    fn first_blocking_finds_entry() {
        let t = CountVector::from_slice(&[1, 5, 2]);
        let c = CountVector::from_slice(&[1, 4, 9]);
        assert_eq!(t.first_blocking(&c), Some(1));
        assert_eq!(t.first_blocking(&t), None);
    }

    proptest! {
        #[test]
        fn merge_is_least_upper_bound(a in vec_strategy(), b in vec_strategy()) {
            let mut m = a;
            m.merge(&b);
            prop_assert!(m.dominates(&a) && m.dominates(&b));
            for i in 0..VECTOR_LEN {
                prop_assert!(m.get(i) == a.get(i) || m.get(i) == b.get(i));
            }
            let mut m2 = b;
            m2.merge(&a);
            prop_assert_eq!(m, m2);
        }

        #[test]
        fn dominance_is_a_partial_order(a in vec_strategy(), b in vec_strategy()) {
            prop_assert!(a.dominates(&a));
            if a.dominates(&b) && b.dominates(&a) { prop_assert_eq!(a, b); }
            prop_assert_eq!(a.first_blocking(&b).is_none(), b.dominates(&a));
        }
    }
}
