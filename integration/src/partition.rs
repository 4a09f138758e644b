//! Partition schedules during the lifecycle's client load (issue 23 "Tests",
//! docs/design.md §7): the driver. It applies a [`Schedule`]'s cuts and heals
//! at their times — iptables rules in the WAN router namespace for links, the
//! witness's etcd member killed and restarted — then waits for the group to
//! converge. The schedules and the checks on the clients' record are pure,
//! in [`schedule`].
//!
//! A takeover during a schedule (the controller's `activated-<n>` marker)
//! ends it: what is still cut is healed at once and the lifecycle goes on to
//! activate the backup site; later faults of that schedule do not run.

pub mod schedule;

use crate::run::{Site, ETCD_CLIENT_PORT, ETCD_PEER_PORT};
use crate::site::{host_lan_ip, BACKUP_IP, BACKUP_PORT};
use crate::sys::sh;
use anyhow::{bail, Context, Result};
pub use schedule::{Event, Link, Schedule};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Index of the witness among the site's etcd members (`run::start_etcd`).
const WITNESS: usize = 2;

/// The bound on convergence after the last heal: replies again, from one
/// site, within `2 × lease + 20 s` (a takeover needs the lease to lapse, the
/// controller's transaction and failover, then the activation: PostgreSQL
/// started on the failed-over volume; a primary that kept or regains the
/// lease answers at once).
pub fn converge_bound(lease: Duration) -> Duration {
    lease * 2 + Duration::from_secs(20)
}

/// What the driver did.
#[derive(Debug)]
pub struct Applied {
    /// When the schedule started: every event's `at` is from here.
    pub start: Instant,
    /// The transitions as applied (their real offsets), heals included.
    pub events: Vec<Event>,
    /// When the last heal was applied.
    pub healed: Instant,
}

impl Applied {
    /// Offset of `t` from the schedule's start (zero before it).
    pub fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }
}

/// The generation of the controller's takeover, if any: its hook's
/// `<out>/activation-request-<n>` (the takeover is done, the activation
/// waits for the harness) or `<out>/activated-<n>` (the highest `n`).
pub fn activated(out: &Path) -> Option<u64> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let name = name.to_str()?;
            name.strip_prefix("activated-")
                .or_else(|| name.strip_prefix("activation-request-"))?
                .parse()
                .ok()
        })
        .max()
}

/// Inserts (`cut`) or deletes the WAN router's rules dropping `ip`'s traffic
/// to and from the etcd ports of the members it does not host: forwarded
/// (the other site's member) and local (the witness's).
fn quorum_rules(wan: &str, ip: Ipv4Addr, cut: bool) -> Result<()> {
    let ip = ip.to_string();
    let ports = format!("{ETCD_CLIENT_PORT}:{ETCD_PEER_PORT}");
    for (chain, dir) in [
        ("FORWARD", "-s"),
        ("FORWARD", "-d"),
        ("INPUT", "-s"),
        ("OUTPUT", "-d"),
    ] {
        for port_dir in ["--dport", "--sport"] {
            rule(wan, chain, cut, &[dir, &ip, "-p", "tcp", port_dir, &ports])?;
        }
    }
    Ok(())
}

/// Inserts (first in `chain`, ahead of the WAN delay's queue) or deletes one
/// DROP rule.
fn rule(wan: &str, chain: &str, cut: bool, matches: &[&str]) -> Result<()> {
    let mut args = vec!["ip", "netns", "exec", wan, "iptables"];
    if cut {
        args.extend(["-I", chain, "1"]);
    } else {
        args.extend(["-D", chain]);
    }
    args.extend(matches);
    args.extend(["-j", "DROP"]);
    sh(&args).map(drop)
}

/// Cuts or heals one link of `site`.
pub fn apply(site: &mut Site, link: Link, cut: bool) -> Result<()> {
    let wan = site.net.names.wan();
    match link {
        Link::PrimaryQuorum => quorum_rules(&wan, host_lan_ip(0), cut),
        Link::BackupQuorum => quorum_rules(&wan, BACKUP_IP, cut),
        Link::PrimaryBackup => {
            // Every primary host's agent ↔ the backup server, both ways.
            let (b, port) = (BACKUP_IP.to_string(), BACKUP_PORT.to_string());
            for i in 0..site.topo.hosts.len() {
                let h = host_lan_ip(i).to_string();
                let tcp = ["-p", "tcp"];
                let to = [&["-s", &h, "-d", &b][..], &tcp, &["--dport", &port]].concat();
                let from = [&["-s", &b, "-d", &h][..], &tcp, &["--sport", &port]].concat();
                rule(&wan, "FORWARD", cut, &to)?;
                rule(&wan, "FORWARD", cut, &from)?;
            }
            Ok(())
        }
        Link::Witness => {
            let etcd = site.etcd.as_mut().context("the site has no etcd cluster")?;
            if cut {
                etcd.kill(WITNESS);
                Ok(())
            } else {
                etcd.restart(WITNESS)
                    .context("restarting the witness's etcd member")
            }
        }
    }
}

/// Runs `sched` on `site` from now: each transition at its time; a takeover
/// (a marker in `controller_out`) ends it early. Everything still cut is
/// healed before this returns (on success).
pub fn drive(site: &mut Site, sched: &Schedule, controller_out: &Path) -> Result<Applied> {
    let start = Instant::now();
    let mut events = Vec::new();
    let mut cut = BTreeSet::new();
    let mut record = |site: &mut Site, link: Link, c: bool| -> Result<()> {
        apply(site, link, c).with_context(|| {
            format!("{} {}", if c { "cutting" } else { "healing" }, link.name())
        })?;
        let at = start.elapsed();
        eprintln!(
            "harness: partition: {} {} at {:.2} s",
            if c { "cut" } else { "healed" },
            link.name(),
            at.as_secs_f64()
        );
        events.push(Event { at, link, cut: c });
        Ok(())
    };
    'schedule: for e in sched.events() {
        loop {
            if activated(controller_out).is_some() {
                eprintln!("harness: partition: takeover: the rest of the schedule is healed");
                break 'schedule;
            }
            let now = start.elapsed();
            if now >= e.at {
                break;
            }
            std::thread::sleep((e.at - now).min(Duration::from_millis(20)));
        }
        record(site, e.link, e.cut)?;
        if e.cut {
            cut.insert(e.link);
        } else {
            cut.remove(&e.link);
        }
    }
    for link in std::mem::take(&mut cut) {
        record(site, link, false)?;
    }
    Ok(Applied {
        start,
        events,
        healed: Instant::now(),
    })
}

/// After the last heal: waits (within [`converge_bound`]) for a takeover or
/// for the primary to answer again; when it answers, waits another lease and
/// a second for a late takeover. Returns the takeover's generation, if any.
/// `last_primary_reply` reads the clients' record.
pub fn settle(
    applied: &Applied,
    controller_out: &Path,
    lease: Duration,
    last_primary_reply: impl Fn() -> Option<Instant>,
) -> Result<Option<u64>> {
    let bound = converge_bound(lease);
    let answered = || last_primary_reply().is_some_and(|t| t > applied.healed);
    while applied.healed.elapsed() < bound {
        if let Some(g) = activated(controller_out) {
            return Ok(Some(g));
        }
        if answered() {
            std::thread::sleep(lease + Duration::from_secs(1));
            return Ok(activated(controller_out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no takeover and no reply from the primary within {bound:?} after the last heal: not converged")
}
