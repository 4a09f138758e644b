//! Figure (b): two tiers, response time against the front tier's computation,
//! naive against joint pipelining.
//!
//! The web tier computes for a while after its database call returns. With
//! joint pipelining both tiers are in one protection group, so that
//! computation overlaps with the replication of the database write and only
//! the reply to the client waits. With the naive boundary only the database
//! machine is protected, its reply to the web tier is held for the backup's
//! acknowledgement, and the computation has to wait behind it: the response
//! time becomes the RTT plus the computation instead of the larger of the two.

use super::latency::measure_http;
use super::report::{rtt_row, BPoint, Figures};
use super::rig::{rtt_retry, set_mode, site_options, topology_file, wait_drained};
use super::{check_interrupted, keep_work, Plan, TWO_TIER};
use crate::netns::spawn_in;
use crate::run::{bin, Site, PG_PORT, TIER_PORT};
use crate::site::render_topology;
use crate::sys::{ns_cmd, wait_until, Guarded};
use anyhow::{anyhow, bail, Context, Result};
use pipecloud_core::topology::{Mode, Topology};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Replaces machine `j`'s CompDB tier with one computing `compute_ms` before and
/// `post_compute_ms` after its database insert and next-tier call.
fn restart_tier(site: &mut Site, j: usize, compute_ms: u64, post_compute_ms: u64) -> Result<()> {
    let n = site.topo.machines.len();
    let m = site
        .topo
        .machines
        .get(j)
        .context("no such machine")?
        .clone();
    let name = format!("tier-{}", m.name);
    let pos = site.tiers.iter().position(|g| g.name == name);
    if let Some(p) = pos {
        site.tiers[p].kill();
    }
    let ns = site.net.names.machine(j);
    let mut cmd = ns_cmd(&ns, &bin("pipecloud-harness").to_string_lossy());
    cmd.args(["compdb", "--tier", &m.name])
        .args(["--listen", &format!("{}:{TIER_PORT}", m.ip)])
        .args(["--compute-ms", &compute_ms.to_string()])
        .args(["--post-compute-ms", &post_compute_ms.to_string()]);
    if site.dbs.get(j).map(|d| d.is_some()).unwrap_or(false) {
        cmd.args([
            "--db",
            &format!("host={} port={PG_PORT} user=postgres dbname=postgres", m.ip),
        ]);
    }
    if j + 1 < n {
        let nx = SocketAddr::new(site.topo.machines[j + 1].ip.into(), TIER_PORT);
        cmd.args(["--next", &nx.to_string()]);
    }
    let g = Guarded::spawn(&name, &mut cmd, &site.work.join(format!("{name}.log")))?;
    match pos {
        Some(p) => site.tiers[p] = g,
        None => site.tiers.push(g),
    }
    let addr = SocketAddr::new(m.ip.into(), TIER_PORT);
    spawn_in(&ns, move || {
        wait_until(Duration::from_secs(30), "tier to listen", || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    })
    .join()
    .map_err(|_| anyhow!("panic"))?
    .with_context(|| format!("tier {} did not restart", m.name))
}

/// Port of the unprotected web tier of the naive variant (in the client's LAN namespace).
const NAIVE_WEB_PORT: u16 = 8081;

/// The two-tier topology for the naive variant: the protection group is the
/// database machine alone (outbound), so its replies to the web tier leave the
/// group and are held; the web tier is an unprotected machine on the LAN.
fn naive_two_tier(text: &str) -> Result<String> {
    let mut topo = Topology::parse(text, "two-tier.toml").map_err(|e| anyhow!("{e}"))?;
    topo.machines.retain(|m| m.name != "web");
    for m in &mut topo.machines {
        m.outbound = true;
    }
    if topo.machines.is_empty() {
        bail!("two-tier topology without a db machine");
    }
    Ok(render_topology(
        &topo,
        Mode::Pipelined,
        Path::new("/nonexistent/certs"),
        Path::new("/nonexistent/work"),
    ))
}

/// Starts the unprotected web tier of the naive variant in namespace `ns`.
fn start_naive_web(site: &Site, ns: &str, post_compute_ms: u64) -> Result<(Guarded, SocketAddr)> {
    let db = site.topo.machines.first().context("no db machine")?;
    let listen = SocketAddr::new(crate::site::CLIENT_IP.into(), NAIVE_WEB_PORT);
    let mut cmd = ns_cmd(ns, &bin("pipecloud-harness").to_string_lossy());
    cmd.args(["compdb", "--tier", "web", "--listen", &listen.to_string()])
        .args([
            "--next",
            &SocketAddr::new(db.ip.into(), TIER_PORT).to_string(),
        ])
        .args(["--post-compute-ms", &post_compute_ms.to_string()]);
    let g = Guarded::spawn(
        "tier-web-unprotected",
        &mut cmd,
        &site.work.join("tier-web-unprotected.log"),
    )?;
    spawn_in(ns, move || {
        wait_until(
            Duration::from_secs(30),
            "the unprotected web tier to listen",
            || std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok(),
        )
    })
    .join()
    .map_err(|_| anyhow!("panic"))??;
    Ok((g, listen))
}

/// (b) two tiers: naive vs joint pipelining vs front-tier computation.
///
/// Joint: web and db are both in the protection group; db's replies to web are
/// internal (tagged, not held) and web's replies to the client are held.
/// Naive: only db is protected (the boundary is drawn around the database);
/// its replies to the unprotected web tier are held, so web's computation
/// after the database call cannot overlap with the replication.
pub(super) fn part_b(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    let topos = work.join("topologies");
    let joint_topo = topology_file(&topos, "two-tier.toml", TWO_TIER)?;
    let naive_topo = topology_file(&topos, "two-tier-naive.toml", &naive_two_tier(TWO_TIER)?)?;
    let joint = [Mode::Async, Mode::Sync, Mode::Pipelined];
    let naive = [Mode::Pipelined];
    let runs: [(&str, PathBuf, &[Mode]); 2] =
        [("joint", joint_topo, &joint), ("naive", naive_topo, &naive)];
    for (label, topo, modes) in runs {
        let dir = work.join(format!("b-{label}"));
        let mut site = rtt_retry(|| {
            Site::up(
                &topo,
                &dir,
                prefix,
                &site_options(plan, Mode::Pipelined, true),
            )
        })
        .with_context(|| format!("two-tier site ({label})"))?;
        fig.rtt.push(rtt_row(
            &format!("(b) two-tier {label}"),
            plan.rtt,
            &site.rtt,
        ));
        let client_ns = site.client_ns();
        for &c in &plan.compute_ms {
            // Dropped (killed) before the site at the end of each iteration.
            let mut _web = None;
            let front = if label == "naive" {
                let (g, addr) = start_naive_web(&site, &client_ns, c)?;
                _web = Some(g);
                addr
            } else {
                let web = site
                    .topo
                    .machines
                    .iter()
                    .position(|m| m.name == "web")
                    .unwrap_or(0);
                restart_tier(&mut site, web, 0, c)?;
                site.front()
            };
            for &m in modes {
                check_interrupted()?;
                set_mode(&site, m)?;
                wait_drained(&site);
                let variant = if label == "naive" {
                    format!("naive-{m}")
                } else {
                    m.as_str().to_string()
                };
                let lat = measure_http(&client_ns, front, plan.latency_secs)?;
                eprintln!(
                    "figures: (b) {variant:<16} compute={c:>3} ms: mean {:.2} ms p50 {:.2} p99 {:.2} (n={})",
                    lat.mean_ms, lat.p50_ms, lat.p99_ms, lat.n
                );
                fig.b.push(BPoint {
                    variant,
                    compute_ms: c,
                    lat,
                });
            }
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
    fn naive_topology_protects_only_the_database() {
        let text = naive_two_tier(TWO_TIER).unwrap_or_default();
        let t = match Topology::parse(&text, "naive") {
            Ok(t) => t,
            Err(e) => panic!("naive topology does not parse: {e}\n{text}"),
        };
        let names: Vec<&str> = t.machines.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["db"]);
        assert!(t.machines[0].outbound);
        assert_eq!(t.disks.len(), 1);
    }
}
