//! # pipecloud-quorum
//!
//! Which site of a protection group is active, decided on etcd (docs/design.md §7):
//! the drivers around the pure lease state machine of `pipecloud_core::lease`.
//!
//! - [`etcd`]: a small etcd v3 client over etcd's JSON gateway (TLS supported).
//! - [`records`]: the group's generation record and lease key, and the lease
//!   requests carried out on them (one conditioned transaction per decision).
//! - [`gate`]: the deadline the data path checks before releasing output or
//!   completing a write (fail-closed on its own clock).
//! - [`keeper`]: the thread that keeps one site's lease alive.
//! - [`testkit`]: a real three-member etcd cluster for tests and the harness.

pub mod etcd;
pub mod gate;
pub mod keeper;
pub mod records;
pub mod testkit;

pub use gate::LeaseGate;
pub use keeper::{LeaseKeeper, LeaseStatus};
