//! Figure (d): one disaster per mode, and what each view holds afterwards.
//!
//! A loaded single-database site loses its whole primary at once; the backup
//! fails over and three views of the requests are compared: what the primary's
//! own disks hold (PV), what the recovered database at the backup holds (SV)
//! and which replies the client received (CV), counted over the last 500
//! requests issued before the disaster. A reply the client received whose
//! request the backup lacks is unsafe: `sync` and `pipelined` must have none,
//! `async` is the control that may. The disaster itself is `crate::disaster`;
//! this part runs one per mode and records the counts.

use super::report::{DPoint, Figures};
use super::rig::{rtt_retry, site_options, topology_file};
use super::{check_interrupted, keep_work, Plan, SINGLE_DB};
use crate::disaster;
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Duration;

/// (d) one disaster per mode: PV/SV/CV over the last 500 requests.
pub(super) fn part_d(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    let topo = topology_file(&work.join("topologies"), "single-db.toml", SINGLE_DB)?;
    for &m in &plan.disaster_modes {
        check_interrupted()?;
        let dir = work.join(format!("d-{m}"));
        let r = rtt_retry(|| {
            let _ = std::fs::remove_dir_all(&dir);
            disaster::run_point(
                &topo,
                &dir,
                prefix,
                &site_options(plan, m, false),
                Duration::from_millis(plan.disaster_ms),
                plan.disaster_workers,
                false,
            )
        })
        .with_context(|| format!("disaster in mode {m}"))?;
        eprintln!(
            "figures: (d) {m:<10}: issued {} last500 PV {} SV {} CV {} unsafe {} failover {} ms",
            r.issued, r.window_pv, r.window_sv, r.window_cv, r.unsafe_replies, r.failover_ms
        );
        // The figure shows the guarantee: a point that broke it, or proves
        // nothing (the client saw no reply), fails the run with its reasons.
        let why = r.failures(&disaster::Check {
            mode: m,
            pitr: false,
        });
        if !why.is_empty() {
            anyhow::bail!("figure (d), mode {m}: {}", why.join("; "));
        }
        fig.d.push(DPoint::of(m, &r));
        if !keep_work() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}
