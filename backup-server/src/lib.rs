//! # backup-server
//!
//! The unprivileged backup site of PipeCloud-rs (docs/design.md §2-§4, PipeCloud §4.4): a TCP
//! (mutual TLS) port and a data directory, nothing else. It journals every write
//! durably before acking it, fans the group's committed vector out to every agent of
//! the group, applies writes to per-disk volumes in causal order, and materialises a
//! consistent set of raw images at the largest causally closed cut on failover (or
//! at a past point in time within the retention window).
//!
//! Modules, one concept each:
//! - [`config`]: TOML configuration.
//! - [`tls`]: rustls server/client configs; group binding of agent certificates.
//! - [`certs`]: a test PKI in one command (rcgen).
//! - [`record`], [`journal`]: checksummed journal records in segment files, recovery.
//! - [`meta`]: durable per-group metadata (disks, generations, applied cut, fence).
//! - [`index`]: per-writer in-memory index (durable prefix, holes, prefix vectors).
//! - [`causal`]: the largest causally closed cut.
//! - [`store`]: the data directory, groups, registration, cuts.
//! - [`batch`]: the pure part of ingest: a batch in, what to append, sync, ack and publish out.
//! - [`checkpoint`]: full-state epochs: ingest plan, durable store, ack rule, RAM replica, failover output.
//! - [`ingest`]: the journal thread: group commit, acks, committed fan-out (the I/O around [`batch`]).
//! - [`server`]: agent connections.
//! - [`volume`]: base volume files: applying writes, materialising images.
//! - [`control`]: status / failover / restore / unfence (socket or offline).
//! - [`metrics`]: Prometheus exposition.
//! - [`daemon`]: wiring and the applier thread.
//! - [`client`]: a protocol peer for tests and the benchmark.
//! - [`resync`]: failback resync over mutual TLS (only the blocks whose hashes differ).
//! - [`fenced`]: the resync fetcher's check on etcd that its site is fenced.

pub mod batch;
pub mod causal;
pub mod certs;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod control;
pub mod controller;
pub mod daemon;
pub mod fenced;
pub mod index;
pub mod ingest;
pub mod journal;
pub mod meta;
pub mod metrics;
pub mod planned_stop;
pub mod record;
pub mod resync;
pub mod server;
pub mod store;
pub mod tls;
pub mod volume;
