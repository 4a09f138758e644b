//! Figure (c): response time of a three-tier application with 1, 2 and 3
//! protected (writing) tiers, per mode.
//!
//! Each tier that writes is one more disk whose writes must reach the backup.
//! In sync mode every protected tier waits one RTT for its own write, so the
//! response time grows by about an RTT per tier; pipelined, the tiers' writes
//! are tracked jointly and only the final reply to the client is held, so the
//! response time stays near one RTT however many tiers write.

use super::latency::measure_http;
use super::report::{rtt_row, CPoint, Figures};
use super::rig::{rtt_retry, set_mode, site_options, topology_file, wait_drained};
use super::{check_interrupted, keep_work, Plan, THREE_TIER};
use crate::run::Site;
use crate::site::render_topology;
use anyhow::{anyhow, bail, Context, Result};
use pipecloud_core::topology::{Mode, Topology};
use std::path::Path;

/// The three-tier topology with only the last `k` machines' disks protected
/// (k = 1: db; 2: app and db; 3: all). Machines without a protected disk run no
/// database (CompDB then only computes and forwards on them).
fn protected_tiers(text: &str, k: usize) -> Result<String> {
    let mut topo = Topology::parse(text, "three-tier.toml").map_err(|e| anyhow!("{e}"))?;
    let n = topo.machines.len();
    if k == 0 || k > n {
        bail!("cannot protect {k} of {n} tiers");
    }
    let keep: Vec<String> = topo.machines[n - k..]
        .iter()
        .map(|m| m.name.clone())
        .collect();
    topo.disks.retain(|d| keep.contains(&d.machine));
    Ok(render_topology(
        &topo,
        Mode::Pipelined,
        Path::new("/nonexistent/certs"),
        Path::new("/nonexistent/work"),
    ))
}

/// (c) response time with 1, 2, 3 protected tiers.
pub(super) fn part_c(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    for &k in &plan.tiers {
        check_interrupted()?;
        let text = protected_tiers(THREE_TIER, k)?;
        let topo = topology_file(
            &work.join("topologies"),
            &format!("three-tier-{k}.toml"),
            &text,
        )?;
        let dir = work.join(format!("c-{k}"));
        let site = rtt_retry(|| {
            Site::up(
                &topo,
                &dir,
                prefix,
                &site_options(plan, Mode::Pipelined, true),
            )
        })
        .with_context(|| format!("three-tier site with {k} protected tiers"))?;
        fig.rtt.push(rtt_row(
            &format!("(c) {k} protected tiers"),
            plan.rtt,
            &site.rtt,
        ));
        for &m in &plan.tier_modes {
            check_interrupted()?;
            set_mode(&site, m)?;
            wait_drained(&site);
            let lat = measure_http(&site.client_ns(), site.front(), plan.latency_secs)?;
            eprintln!(
                "figures: (c) {k} protected tiers {m:<10}: mean {:.2} ms p50 {:.2} p99 {:.2} (n={})",
                lat.mean_ms, lat.p50_ms, lat.p99_ms, lat.n
            );
            fig.c.push(CPoint {
                tiers: k,
                mode: m.as_str().to_string(),
                lat,
            });
        }
        drop(site);
        if !keep_work() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_topologies_protect_the_last_k_tiers() {
        for k in 1..=3 {
            let text = protected_tiers(THREE_TIER, k).unwrap_or_default();
            let t = Topology::parse(&text, "derived").map_err(|e| anyhow!("{e}"));
            let t = match t {
                Ok(t) => t,
                Err(e) => panic!("derived topology {k} does not parse: {e}\n{text}"),
            };
            assert_eq!(t.machines.len(), 3);
            assert_eq!(t.disks.len(), k);
            let writers: Vec<&str> = t
                .machines
                .iter()
                .filter(|m| m.writer.is_some())
                .map(|m| m.name.as_str())
                .collect();
            assert_eq!(writers, ["web", "app", "db"][3 - k..].to_vec());
            assert!(t.machines[0].outbound);
        }
        assert!(protected_tiers(THREE_TIER, 4).is_err());
    }
}
