//! # pipecloud: the PipeCloud-rs host agent
//!
//! The privileged agent of a primary host: serves protected disks over NBD, replicates
//! their writes to the backup server, tags inter-machine packets and holds client-bound
//! packets (NFQUEUE) until the writes they depend on are committed at the backup.
//! The causal logic itself lives in [`pipecloud_core`] (re-exported as [`core`]).

pub use pipecloud_core as core;

pub mod agent;
pub mod block;
pub mod causal;
pub mod ctl;
pub mod disk;
pub mod ebpf;
pub mod fullstate;
pub mod image;
pub mod lease;
pub mod loopdev;
pub mod metrics;
pub mod nbd;
pub mod netfilter;
pub mod netpath;
pub mod nfq;
pub mod replication;
pub mod sched;
pub mod vm;
pub mod wake;
