//! # pipecloud-core
//!
//! The pure causal engine of PipeCloud-rs (docs/design.md §3): plain data structures and
//! functions, no I/O, no clock reads, no threads. Drivers (NBD, NFQUEUE, sockets,
//! files, time) live in the `pipecloud` agent and the `backup-server` and call in here.
//!
//! One module per concept:
//! - [`vector`]: count vectors (pending / committed).
//! - [`prefix`]: the contiguous-prefix rule (highest seq with all of `1..=seq` present), bounded.
//! - [`commit`]: per-writer commit tracking (contiguous prefix of out-of-order acks, generations).
//! - [`netqueue`]: client-bound packets held until the committed vector dominates their tag.
//! - [`epoch`]: checkpoint epochs of the full-state mode (tag, barrier, release by ack).
//! - [`cut`]: the largest causally closed cut over journaled writes (failover).
//! - [`lease`]: the group's lease and generation (fencing token): which site may be active.
//! - [`synctarget`]: the order of resync blocks and journaled writes at a failback's target.
//! - [`mode`]: replication modes and the backup-loss policy (one definition, one parsing rule).
//! - [`ipopt`]: the IPv4 option that carries a vector between protected machines.
//! - [`wire`] and [`codec`]: the replication protocol frames and their byte encoding.
//! - [`topology`]: the gray-box description of one application (TOML).

pub mod codec;
pub mod commit;
pub mod cut;
pub mod epoch;
pub mod ipopt;
pub mod lease;
pub mod mode;
pub mod netqueue;
pub mod pagecodec;
pub mod prefix;
pub mod synctarget;
pub mod topology;
pub mod vector;
pub mod wire;

pub use vector::{CountVector, Seq, WriterId, EPOCH_ENTRY, MAX_WRITERS, VECTOR_LEN};
