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

use pipecloud_core::topology::Quorum;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Shortest bound of one etcd attempt.
const ATTEMPT_MS_MIN: u64 = 200;

/// A client of the group's etcd cluster as the topology's `[quorum]` names it
/// (relative TLS paths are relative to `base_dir`, the topology file's
/// directory). One attempt per endpoint fits in one lease request timeout.
pub fn connect(q: &Quorum, base_dir: &Path) -> Result<Arc<etcd::Etcd>, etcd::EtcdError> {
    let per_attempt = q.lease().request_timeout_ms / q.endpoints.len().max(1) as u64;
    let cfg = etcd::EtcdConfig {
        endpoints: q.endpoints.clone(),
        tls: q.ca.as_ref().map(|ca| etcd::EtcdTls {
            ca: base_dir.join(ca),
            cert: q.cert.as_ref().map(|c| base_dir.join(c)),
            key: q.key.as_ref().map(|k| base_dir.join(k)),
        }),
        attempt_timeout: Duration::from_millis(per_attempt.max(ATTEMPT_MS_MIN)),
    };
    etcd::Etcd::new(&cfg).map(Arc::new)
}
