//! The systems the figures measure on, and how a part steers them.
//!
//! Every part builds an emulated site (network namespaces, calibrated WAN,
//! agents, backup) from an embedded topology, retrying only when the WAN
//! calibration missed the configured RTT. Between measurement points a part
//! switches the agents' replication mode through their control sockets and
//! waits until replication has drained, so one variant does not inherit the
//! previous one's backlog. Figure (a) can also run without the agent
//! (`--no-agent`): [`Rig`] hides whether its database sits on a full site or
//! on a [`BareRig`] (PostgreSQL on a plain directory behind the same WAN).

use super::Plan;
use crate::netns::cleanup_prefix;
use crate::pg::{initdb, Postgres};
use crate::pgbench::Endpoint;
use crate::run::{ms, Site, SiteOptions, PG_PORT};
use crate::site::{host_lan_ip, Network, BACKUP_IP};
use crate::standby::StandbyPlan;
use crate::wan::{start_calibrated, RttReport, WanDelay};
use anyhow::{anyhow, bail, Context, Result};
use pipecloud_core::topology::{Mode, Topology};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn site_options(plan: &Plan, mode: Mode, tiers: bool) -> SiteOptions {
    SiteOptions {
        rtt: plan.rtt,
        mode,
        compute_ms: Vec::new(),
        tiers,
        rtt_tolerance: Duration::from_millis(1),
        outbound_override: None,
        ipv6_client: false,
        quorum_lease_ms: None,
    }
}

/// Writes an embedded topology to `dir/name`.
pub(super) fn topology_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// Runs `f` (which builds a site) up to 3 times while it fails only because the
/// calibrated WAN missed the configured RTT (a burst of load on this machine
/// during the calibration); any other error is returned at once.
pub(super) fn rtt_retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if attempt < 3 && format!("{e:#}").contains("refusing to run") => {
                eprintln!(
                    "figures: {e:#}; building the site again (attempt {})",
                    attempt + 1
                );
                attempt += 1;
                std::thread::sleep(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// Switches every agent of the site to `mode` at run time.
pub(super) fn set_mode(site: &Site, mode: Mode) -> Result<()> {
    let m: pipecloud::replication::Mode = mode.as_str().parse().map_err(|e| anyhow!("{e}"))?;
    for p in site.ctl_sockets() {
        pipecloud::ctl::set_mode(&p, m, None)
            .with_context(|| format!("switching {} to {mode}", p.display()))?;
    }
    Ok(())
}

/// Waits (up to 60 s) until every agent has all writes acknowledged, so a
/// variant does not inherit the previous one's backlog; a timeout is a warning.
pub(super) fn wait_drained(site: &Site) {
    if let Err(e) = site.wait_replicated(Duration::from_secs(60)) {
        eprintln!("figures: warning: {e:#}");
    }
}

/// PostgreSQL on a plain directory behind the emulated network and WAN, with no
/// agent (`--no-agent`: develops and checks (a)'s pgbench and standby paths).
pub(super) struct BareRig {
    pg: Option<Postgres>,
    _wan: WanDelay,
    net: Network,
    topo: Topology,
    rtt: RttReport,
}

impl BareRig {
    pub(super) fn up(text: &str, work: &Path, prefix: &str, rtt: Duration) -> Result<BareRig> {
        let topo = Topology::parse(text, "single-db.toml").map_err(|e| anyhow!("{e}"))?;
        cleanup_prefix(prefix);
        std::fs::create_dir_all(work)?;
        let net = Network::build(&topo, prefix)?;
        let probe = SocketAddr::new(BACKUP_IP.into(), 7990);
        let (wan, r) = start_calibrated(
            &net.names.wan(),
            rtt,
            &net.names.host(0),
            &net.names.backup(),
            probe,
            100,
        )?;
        eprintln!(
            "figures: WAN rtt target {:?}, measured median {:.2} ms",
            rtt,
            ms(r.median)
        );
        let m = topo.machines.first().context("topology without machines")?;
        let datadir = work.join("pgdata");
        initdb(&datadir)?;
        let pg = Postgres::start(
            &m.name,
            &net.names.machine(0),
            m.ip,
            PG_PORT,
            &datadir,
            &work.join(format!("pg-{}.log", m.name)),
            &[],
        )?;
        Ok(BareRig {
            pg: Some(pg),
            _wan: wan,
            net,
            topo,
            rtt: r,
        })
    }
}

impl Drop for BareRig {
    fn drop(&mut self) {
        if let Some(mut pg) = self.pg.take() {
            pg.stop();
        }
    }
}

/// Figure (a)'s database: a full site (agent) or a bare one.
pub(super) enum Rig {
    Site(Box<Site>),
    Bare(Box<BareRig>),
}

impl Rig {
    fn topo(&self) -> &Topology {
        match self {
            Rig::Site(s) => &s.topo,
            Rig::Bare(b) => &b.topo,
        }
    }
    fn names(&self) -> &crate::site::Names {
        match self {
            Rig::Site(s) => &s.net.names,
            Rig::Bare(b) => &b.net.names,
        }
    }
    pub(super) fn rtt(&self) -> RttReport {
        match self {
            Rig::Site(s) => s.rtt,
            Rig::Bare(b) => b.rtt,
        }
    }
    pub(super) fn db(&self) -> Result<&Postgres> {
        match self {
            Rig::Site(s) => s.dbs.first().and_then(|d| d.as_ref()),
            Rig::Bare(b) => b.pg.as_ref(),
        }
        .context("the site has no database on its first machine")
    }
    pub(super) fn endpoint(&self) -> Result<Endpoint> {
        let pg = self.db()?;
        Ok(Endpoint {
            client_ns: self.names().client(),
            host: pg.ip,
            port: pg.port,
        })
    }
    pub(super) fn set_mode(&self, mode: Mode) -> Result<()> {
        match self {
            Rig::Site(s) => set_mode(s, mode),
            Rig::Bare(_) => bail!("variant {mode} needs the agent (run without --no-agent)"),
        }
    }
    /// The hold breakdown of the site's agents so far (the first agent with a
    /// network path; `None` without the agent or when it cannot be read).
    /// The backup's queue and journal latency histograms (`None` without a
    /// site or when its metrics cannot be read: said once per call).
    pub(super) fn backup_latency(&self) -> Option<super::backup_lat::BackupLatency> {
        let Rig::Site(s) = self else { return None };
        match s.backup_metrics() {
            Ok(t) => Some(super::backup_lat::BackupLatency::parse(&t)),
            Err(e) => {
                eprintln!("figures: reading the backup's metrics: {e:#}");
                None
            }
        }
    }

    pub(super) fn hold(&self) -> Option<pipecloud::netpath::HoldSnapshot> {
        let Rig::Site(s) = self else { return None };
        s.ctl_sockets().iter().find_map(|p| {
            pipecloud::ctl::hold(p)
                .map_err(|e| {
                    eprintln!(
                        "figures: reading the hold breakdown of {}: {e}",
                        p.display()
                    )
                })
                .ok()?
                .into_iter()
                .next()
                .map(|(_, h)| h)
        })
    }

    /// The TCP counters of the site's host and backup namespaces and the WAN
    /// queue's drops (`None` without the agent's site).
    pub(super) fn path_counters(&self) -> Option<super::netstat::PathCounters> {
        let Rig::Site(_) = self else { return None };
        let names = self.names();
        let mut nss: Vec<(String, String)> = (0..self.topo().hosts.len())
            .map(|i| ("host".to_string(), names.host(i)))
            .collect();
        nss.push(("backup".into(), names.backup()));
        Some(super::netstat::PathCounters::read(&nss, &names.wan()))
    }

    /// The agents' tail episodes kept so far (empty without the agent or when
    /// they cannot be read: said) and the database's checkpoints from its log.
    pub(super) fn tails(
        &self,
    ) -> (
        Vec<pipecloud::netpath::TailEvent>,
        Vec<super::tails::Checkpoint>,
    ) {
        let Rig::Site(s) = self else {
            return (Vec::new(), Vec::new());
        };
        let mut events = Vec::new();
        for p in s.ctl_sockets() {
            match pipecloud::ctl::tails(&p) {
                Ok(v) => events.extend(v.into_iter().map(|(_, e)| e)),
                Err(e) => eprintln!("figures: reading the tails of {}: {e}", p.display()),
            }
        }
        let cps = match self.db().and_then(|db| {
            std::fs::read_to_string(&db.log)
                .with_context(|| format!("reading {}", db.log.display()))
        }) {
            Ok(text) => super::tails::checkpoints(&text),
            Err(e) => {
                eprintln!("figures: the database's checkpoints: {e:#}");
                Vec::new()
            }
        };
        (events, cps)
    }

    /// The run-queue waits of the agents', the backup's and the WAN delay
    /// thread's threads, and the machine's steal (`None` without the site).
    pub(super) fn cpu_wait(&self) -> Option<super::cpu_wait::CpuWait> {
        let Rig::Site(s) = self else { return None };
        let mut procs: Vec<(String, u32)> = s
            .agents
            .iter()
            .filter_map(|a| a.pid())
            .map(|p| ("agent".to_string(), p))
            .collect();
        if let Some(p) = s.backup.as_ref().and_then(|b| b.pid()) {
            procs.push(("backup".into(), p));
        }
        Some(super::cpu_wait::CpuWait::read(
            &procs,
            crate::wan::DELAY_THREAD,
        ))
    }

    /// The WAN emulator's stalls so far ([`crate::wan::Stalls`]).
    pub(super) fn wan_stalls(&self) -> Vec<(u64, u64)> {
        match self {
            Rig::Site(s) => s.wan.as_ref().map(|w| w.stalls()).unwrap_or_default(),
            Rig::Bare(b) => b._wan.stalls(),
        }
    }

    /// Sets a knob of a same-run A/B (no-op without the agent's site).
    pub(super) fn set_knob(&self, k: super::part_a::Knob, on: bool) {
        use super::part_a::Knob;
        match (self, k) {
            (Rig::Site(s), Knob::WanRealtime) => {
                if let Some(w) = &s.wan {
                    w.set_realtime(on);
                }
            }
            (Rig::Bare(b), Knob::WanRealtime) => b._wan.set_realtime(on),
            // A pgbench argument, not the rig's (part_a passes it).
            (_, Knob::PgbenchThreadPerClient) => {}
            (Rig::Site(s), Knob::AgentRealtime | Knob::ReplRealtime) => {
                let prefix = if k == Knob::AgentRealtime {
                    "netpath-"
                } else {
                    "pc-replication"
                };
                for pid in s.agents.iter().filter_map(|a| a.pid()) {
                    if let Err(e) = crate::sys::set_thread_realtime(pid, prefix, on) {
                        eprintln!("figures: agent {pid}'s {prefix} threads: {e:#}");
                    }
                }
            }
            (Rig::Bare(_), Knob::AgentRealtime | Knob::ReplRealtime | Knob::PathRealtime) => {}
            (Rig::Site(s), Knob::PathRealtime) => {
                let agents = s.agents.iter().filter_map(|a| a.pid());
                let backup = s.backup.as_ref().and_then(|b| b.pid());
                let threads = agents
                    .flat_map(|p| [(p, "pc-replication"), (p, "tokio-rt-worker")])
                    .chain(
                        backup
                            .into_iter()
                            .flat_map(|p| [(p, "backup-net"), (p, "backup-journal")]),
                    );
                for (pid, prefix) in threads {
                    if let Err(e) = crate::sys::set_thread_realtime(pid, prefix, on) {
                        eprintln!("figures: {pid}'s {prefix} threads: {e:#}");
                    }
                }
            }
            (_, Knob::TcpBigSndbuf) => {
                let names = self.names();
                let v = if on {
                    "net.ipv4.tcp_wmem=4096 16384 33554432"
                } else {
                    "net.ipv4.tcp_wmem=4096 16384 4194304"
                };
                for ns in (0..self.topo().hosts.len()).map(|i| names.host(i)) {
                    if let Err(e) = crate::sys::ns_sh(&ns, &["sysctl", "-qw", v]) {
                        eprintln!("figures: setting {v} in {ns}: {e:#}");
                    }
                }
            }
            (_, Knob::TcpReno) => {
                // Off: the machine's default (the root namespace's setting).
                let cc = if on {
                    "reno".to_string()
                } else {
                    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
                        .map_or_else(|_| "bbr".to_string(), |s| s.trim().to_string())
                };
                let v = format!("net.ipv4.tcp_congestion_control={cc}");
                let names = self.names();
                let hosts: Vec<String> = (0..self.topo().hosts.len())
                    .map(|i| names.host(i))
                    .collect();
                for ns in hosts.iter().chain(std::iter::once(&names.backup())) {
                    if let Err(e) = crate::sys::ns_sh(ns, &["sysctl", "-qw", &v]) {
                        eprintln!("figures: setting {v} in {ns}: {e:#}");
                    }
                }
                // The agents reconnect under the new setting.
                let port = format!(":{}", crate::site::BACKUP_PORT);
                for ns in &hosts {
                    if let Err(e) = crate::sys::ns_sh(ns, &["ss", "-K", "dport", "=", &port]) {
                        eprintln!("figures: closing the replication connections in {ns}: {e:#}");
                    }
                }
                std::thread::sleep(Duration::from_secs(2));
                for ns in &hosts {
                    let ss = crate::sys::ns_sh(ns, &["ss", "-tin", "dport", "=", &port])
                        .unwrap_or_default();
                    let algos: Vec<&str> = ss
                        .split_whitespace()
                        .filter(|w| ["cubic", "bbr", "reno"].contains(w))
                        .collect();
                    eprintln!("figures: replication connections in {ns} now run {algos:?}");
                }
            }
            (_, Knob::TcpKeepWindow) => {
                let names = self.names();
                let mut nss: Vec<String> = (0..self.topo().hosts.len())
                    .map(|i| names.host(i))
                    .collect();
                nss.push(names.backup());
                let v = format!("net.ipv4.tcp_slow_start_after_idle={}", u8::from(!on));
                for ns in nss {
                    if let Err(e) = crate::sys::ns_sh(&ns, &["sysctl", "-qw", &v]) {
                        eprintln!("figures: setting {v} in {ns}: {e:#}");
                    }
                }
            }
        }
    }

    pub(super) fn drain(&self) {
        if let Rig::Site(s) = self {
            wait_drained(s);
        }
    }
    pub(super) fn standby_plan(&self, dir: &Path) -> Result<StandbyPlan> {
        let topo = self.topo();
        let m = topo.machines.first().context("no machine")?;
        let hi = topo
            .hosts
            .iter()
            .position(|h| h.name == m.host)
            .context("machine on an unknown host")?;
        Ok(StandbyPlan {
            backup_ns: self.names().backup(),
            backup_ip: BACKUP_IP,
            wan_ns: self.names().wan(),
            primary_host_lan_ip: host_lan_ip(hi),
            datadir: dir.join("standby"),
            log: dir.join("pg-standby.log"),
        })
    }
}
