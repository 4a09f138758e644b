//! The largest causally closed cut (docs/design.md §3): re-exported from
//! `pipecloud_core::cut`, the one place the rule lives.
//!
//! How the server feeds it: writer `i`'s history is its index ([`crate::index`]),
//! optionally capped to a prefix (point-in-time: the writes whose whole prefix was
//! received by a time). Writers the group does not have get an empty history, so a
//! write that depends on them is never included. The base volumes are at a closed
//! cut `A` and the index no longer holds the writes below it; `deps_upto(s)` for
//! `s <= A_i` answers the prefix dependencies at `A_i`, which is exact at `A_i`, and
//! the cut never goes below `A` (it is closed and below every starting prefix).

pub use pipecloud_core::cut::{largest_closed_cut, WriterHistory};
