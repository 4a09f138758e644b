//! The agent's side of the group's lease (docs/design.md §7).
//!
//! When the topology has `[quorum]`, the agent of the home site keeps the
//! group's lease on etcd alive (a [`LeaseKeeper`] with `Ambition::Hold`) and
//! hands its gate to the data path: the network path sends no verdict and the
//! replicated disks complete no write while the gate is closed (fail-closed),
//! and `degrade-to-async` takes effect only once the lease holder recorded it
//! in etcd ([`LeaseKeeper::record_degraded`]). The keeper logs every decision
//! (active, fenced and why); `ctl status` and the metrics show role,
//! generation and time left. A clean stop resigns the lease once the data
//! path is stopped ([`resign`]), so the next site acquires at once; a crash
//! leaves it to lapse.

use anyhow::{Context, Result};
use pipecloud_core::lease::Ambition;
use pipecloud_core::topology::Topology;
use pipecloud_quorum::records::GroupRecords;
use pipecloud_quorum::{LeaseGate, LeaseKeeper};
use std::path::Path;
use std::sync::Arc;

/// Starts keeping the group's lease (home site), or `None` without `[quorum]`.
pub fn start(topo: &Topology, base_dir: &Path) -> Result<Option<Arc<LeaseKeeper>>> {
    let Some(q) = &topo.quorum else {
        return Ok(None);
    };
    let etcd = pipecloud_quorum::connect(q, base_dir).context("etcd client ([quorum])")?;
    let records = GroupRecords::new(etcd, &topo.group.name, &q.home_site, q.lease_ms)?;
    let (keeper, events) = LeaseKeeper::start(records, q.lease(), &q.home_site, Ambition::Hold)
        .context("starting the lease keeper")?;
    // The keeper logs each event and the data path reads the gate: the
    // events only need draining (the loop ends with the keeper).
    std::thread::Builder::new()
        .name("lease-events".into())
        .spawn(move || events.into_iter().for_each(drop))
        .context("starting the lease event thread")?;
    tracing::info!(group = %topo.group.name, site = %q.home_site, endpoints = ?q.endpoints,
        lease_ms = q.lease_ms, "keeping the group's lease on etcd");
    Ok(Some(Arc::new(keeper)))
}

/// The gate the data path obeys: the keeper's. With the test-only
/// `fault-injection` feature and `PIPECLOUD_FAULT_UNGATED=1`, none: an agent
/// that keeps the lease but does not obey it, which the harness's partition
/// check must catch (`lifecycle --expect-split-brain`).
pub fn data_path_gate(keeper: &Arc<LeaseKeeper>) -> Option<Arc<LeaseGate>> {
    #[cfg(feature = "fault-injection")]
    if std::env::var_os("PIPECLOUD_FAULT_UNGATED").is_some() {
        tracing::error!("FAULT INJECTED: the data path ignores the lease");
        return None;
    }
    Some(keeper.gate())
}

/// A planned stop: call once the network path and the NBD exports are
/// stopped (nothing is released and no write completes any more). The keeper
/// closes its gate, then revokes the lease (the generation stays), so that
/// the next site (the controller after a failback, the home site after a
/// hand-over) acquires without waiting for the lease to lapse
/// (docs/design.md §7). Blocks at most about one lease.
pub async fn resign(keeper: Option<Arc<LeaseKeeper>>) {
    let Some(k) = keeper else {
        return;
    };
    match tokio::task::spawn_blocking(move || k.resign()).await {
        Ok(true) => tracing::info!("stopping: resigned the group's lease"),
        Ok(false) => {
            tracing::warn!("stopping: the lease's revoke was not confirmed; it lapses on its own")
        }
        Err(e) => tracing::error!("stopping: resigning the lease: {e}"),
    }
}
