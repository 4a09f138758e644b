//! A running emulated site: the network of [`crate::site`] plus its processes —
//! the WAN delay, the backup server (as `nobody`), one `pipecloud agent` per
//! primary host, the protected disks mounted through NBD -> nbdfuse -> loop ->
//! ext4, a stock PostgreSQL per writer machine, and the CompDB tiers.
//!
//! Dropping a [`Site`] tears everything down in the order that works
//! (docs/machine.md, "Network namespaces and mounts"):
//! clients and servers, mounts, loop devices, FUSE, agents, backup, namespaces.

use crate::netns::{cleanup_prefix, spawn_in};
use crate::pg::{initdb, Postgres};
use crate::site::{
    machine_ip6, render_topology, MountedDisk, Network, BACKUP_IP, BACKUP_PORT, CLIENT_IP,
};
use crate::sys::{ns_cmd, run, sh, sh_quiet, wait_until, Guarded};
use crate::wan::{start_calibrated, RttReport, WanDelay};
use anyhow::{bail, Context, Result};
use pipecloud_core::topology::{Mode, Topology};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Port of the CompDB tier service on every machine.
pub const TIER_PORT: u16 = 8080;
/// Port of PostgreSQL on every writer machine.
pub const PG_PORT: u16 = 5432;
/// The backup server's `/metrics`, on loopback in the backup namespace.
pub const BACKUP_METRICS_PORT: u16 = 9700;

/// What to start.
#[derive(Clone, Debug)]
pub struct SiteOptions {
    pub rtt: Duration,
    pub mode: Mode,
    /// Computation per request in each tier (CompDB), by machine index.
    pub compute_ms: Vec<u64>,
    /// Start CompDB tiers (otherwise only PostgreSQL).
    pub tiers: bool,
    /// Refuse to run when the measured RTT is off by more than this.
    pub rtt_tolerance: Duration,
    /// Treat these machines as outbound in addition to the topology's (the
    /// "naive" variant of figure (b) protects only the DB tier's machine).
    pub outbound_override: Option<Vec<String>>,
    /// Give the machines and the client IPv6 addresses too; PostgreSQL and the tiers
    /// listen on IPv6 as well, and the client talks to the front machine over IPv6
    /// ([`Site::client_ip`]).
    pub ipv6_client: bool,
    /// Give the group a lease on etcd (issue 23): one member in the primary's
    /// first host, one at the backup, one witness on the WAN router; the
    /// topology gets `[quorum]` with this lease and failover `automatic`.
    pub quorum_lease_ms: Option<u64>,
}

/// Client port of the site's etcd members.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// Peer port of the site's etcd members.
pub const ETCD_PEER_PORT: u16 = 2380;

/// Paths of the harness's own binaries.
pub fn bin(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(name));
    me.parent()
        .map(|d| d.join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The agent binary the site runs: `pipecloud` next to the harness, or the
/// one named by `PIPECLOUD_HARNESS_AGENT` (the lifecycle's fault run sets it
/// to its TEST-ONLY faulted build, scripts/fault-lifecycle.sh).
pub fn agent_bin() -> PathBuf {
    std::env::var_os(AGENT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| bin("pipecloud"))
}

/// See [`agent_bin`].
pub const AGENT_ENV: &str = "PIPECLOUD_HARNESS_AGENT";

/// A running site.
pub struct Site {
    pub topo: Topology,
    pub work: PathBuf,
    pub topo_file: PathBuf,
    pub certs: PathBuf,
    pub backup_data: PathBuf,
    pub rtt: RttReport,
    // Drop order = field order (top first).
    pub tiers: Vec<Guarded>,
    pub dbs: Vec<Option<Postgres>>,
    pub disks: Vec<MountedDisk>,
    pub agents: Vec<Guarded>,
    pub backup: Option<Guarded>,
    /// The group's etcd cluster (with `quorum_lease_ms`).
    pub etcd: Option<pipecloud_quorum::testkit::EtcdCluster>,
    pub wan: Option<WanDelay>,
    pub net: Network,
}

impl Site {
    /// Builds and starts everything.
    pub fn up(topo_path: &Path, work: &Path, prefix: &str, opts: &SiteOptions) -> Result<Site> {
        let text = std::fs::read_to_string(topo_path)
            .with_context(|| format!("reading {}", topo_path.display()))?;
        let mut topo = Topology::parse(&text, &topo_path.display().to_string())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(out) = &opts.outbound_override {
            for m in &mut topo.machines {
                m.outbound = out.contains(&m.name);
            }
        }
        cleanup_prefix(prefix);
        std::fs::create_dir_all(work)?;
        let net = Network::build_with(&topo, prefix, opts.ipv6_client)?;
        let names = net.names.clone();
        let mut site = Site {
            topo: topo.clone(),
            work: work.to_path_buf(),
            topo_file: work.join("topology.toml"),
            certs: work.join("certs"),
            backup_data: work.join("backup"),
            rtt: RttReport {
                samples: 0,
                min: Duration::ZERO,
                median: Duration::ZERO,
                mean: Duration::ZERO,
                p99: Duration::ZERO,
            },
            tiers: Vec::new(),
            dbs: Vec::new(),
            disks: Vec::new(),
            agents: Vec::new(),
            backup: None,
            etcd: None,
            wan: None,
            net,
        };
        // WAN delay and its measurement.
        let probe = SocketAddr::new(BACKUP_IP.into(), 7990);
        let (wan, rtt) = start_calibrated(
            &names.wan(),
            opts.rtt,
            &names.host(0),
            &names.backup(),
            probe,
            100,
        )?;
        site.wan = Some(wan);
        site.rtt = rtt;
        let err = site.rtt.median.abs_diff(opts.rtt);
        eprintln!(
            "harness: WAN rtt target {:?}, measured median {:.2} ms, mean {:.2} ms, p99 {:.2} ms",
            opts.rtt,
            ms(site.rtt.median),
            ms(site.rtt.mean),
            ms(site.rtt.p99)
        );
        if err > opts.rtt_tolerance {
            bail!(
                "measured RTT {:.2} ms is off the configured {:.2} ms by more than {:?}: refusing to run",
                ms(site.rtt.median),
                ms(opts.rtt),
                opts.rtt_tolerance
            );
        }
        // Certificates, backup server (unprivileged).
        let g = topo.group.name.clone();
        run(Command::new(bin("backup-server"))
            .args(["certs", "--dir"])
            .arg(&site.certs)
            .args(["--server-name", "backup.pipecloud.test", "--group", &g])
            .args(["--listen", &format!("{BACKUP_IP}:{BACKUP_PORT}")]))?;
        sh(&["chmod", "-R", "a+rX", &site.certs.to_string_lossy()])?;
        sh(&["chmod", "a+x", &site.work.to_string_lossy()])?;
        site.backup = Some(start_backup_server(
            &names.backup(),
            SocketAddr::new(BACKUP_IP.into(), BACKUP_PORT),
            &site.backup_data,
            &site.certs,
            &site.work.join("backup.toml"),
        )?);
        // Agents.
        std::fs::create_dir_all(site.work.join("images"))?;
        let mut text = render_topology(&topo, opts.mode, &site.certs, &site.work);
        if let Some(lease_ms) = opts.quorum_lease_ms {
            let cluster = start_etcd(&names)?;
            let eps: Vec<String> = cluster
                .endpoints()
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect();
            text.push_str(&format!(
                "[quorum]\nendpoints = [{}]\nlease_ms = {lease_ms}\nfailover = \"automatic\"\n\
                 home_site = \"primary\"\nbackup_site = \"backup\"\n",
                eps.join(", ")
            ));
            site.etcd = Some(cluster);
        }
        std::fs::write(&site.topo_file, text)?;
        for (i, h) in topo.hosts.iter().enumerate() {
            std::fs::create_dir_all(site.work.join(format!("h{i}")))?;
            let mut cmd = ns_cmd(&names.host(i), &agent_bin().to_string_lossy());
            cmd.args(["agent", "--topology"])
                .arg(&site.topo_file)
                .args(["--host", &h.name])
                .env("RUST_LOG", "info");
            site.agents.push(Guarded::spawn(
                &format!("agent-{}", h.name),
                &mut cmd,
                &site.work.join(format!("agent-{}.log", h.name)),
            )?);
        }
        // Disks: wait for each export, attach, mkfs, mount.
        for (i, h) in topo.hosts.iter().enumerate() {
            for d in topo.disks_on(&h.name) {
                let sock = site
                    .work
                    .join(format!("h{i}"))
                    .join(format!("{}.sock", d.name));
                wait_until(Duration::from_secs(60), "the agent's NBD socket", || {
                    sock.exists()
                })
                .with_context(|| {
                    format!(
                        "agent log:\n{}",
                        std::fs::read_to_string(site.work.join(format!("agent-{}.log", h.name)))
                            .unwrap_or_default()
                    )
                })?;
                let mnt = site.work.join("mnt").join(&d.name);
                site.disks
                    .push(MountedDisk::attach(&d.name, &sock, &site.work, &mnt, true)?);
            }
        }
        // PostgreSQL on each writer machine (its first disk).
        for (j, m) in topo.machines.iter().enumerate() {
            let disk = topo.disks_of(&m.name).first().map(|d| d.name.clone());
            let Some(disk) = disk else {
                site.dbs.push(None);
                continue;
            };
            let datadir = site.work.join("mnt").join(&disk).join("pgdata");
            initdb(&datadir)?;
            sh(&["sync"])?;
            let extra = if opts.ipv6_client {
                vec![format!("listen_addresses={},{}", m.ip, machine_ip6(j))]
            } else {
                Vec::new()
            };
            let pg = Postgres::start(
                &m.name,
                &names.machine(j),
                m.ip,
                PG_PORT,
                &datadir,
                &site.work.join(format!("pg-{}.log", m.name)),
                &extra,
            )?;
            pg.psql(
                "CREATE TABLE IF NOT EXISTS req (id bigint NOT NULL, tier text NOT NULL, at timestamptz DEFAULT now())",
            )?;
            site.dbs.push(Some(pg));
        }
        // CompDB tiers: a chain in machine order, starting at the first outbound machine.
        if opts.tiers {
            let n = topo.machines.len();
            for j in (0..n).rev() {
                let m = &topo.machines[j];
                let next = if j + 1 < n {
                    Some(SocketAddr::new(topo.machines[j + 1].ip.into(), TIER_PORT))
                } else {
                    None
                };
                let mut cmd = ns_cmd(
                    &names.machine(j),
                    &bin("pipecloud-harness").to_string_lossy(),
                );
                // With IPv6, one dual-stack socket: the client comes over IPv6,
                // the previous tier over IPv4.
                let listen = if opts.ipv6_client {
                    SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), TIER_PORT)
                } else {
                    SocketAddr::new(m.ip.into(), TIER_PORT)
                };
                cmd.args(["compdb", "--tier", &m.name])
                    .args(["--listen", &listen.to_string()])
                    .args([
                        "--compute-ms",
                        &opts.compute_ms.get(j).copied().unwrap_or(0).to_string(),
                    ]);
                if site.dbs.get(j).map(|d| d.is_some()).unwrap_or(false) {
                    cmd.args([
                        "--db",
                        &format!("host={} port={PG_PORT} user=postgres dbname=postgres", m.ip),
                    ]);
                }
                if let Some(nx) = next {
                    cmd.args(["--next", &nx.to_string()]);
                }
                site.tiers.push(Guarded::spawn(
                    &format!("tier-{}", m.name),
                    &mut cmd,
                    &site.work.join(format!("tier-{}.log", m.name)),
                )?);
                let addr = SocketAddr::new(m.ip.into(), TIER_PORT);
                let ns = names.machine(j);
                let ok = spawn_in(&ns, move || {
                    wait_until(Duration::from_secs(30), "tier to listen", || {
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                            .is_ok()
                    })
                })
                .join()
                .map_err(|_| anyhow::anyhow!("panic"))?;
                ok.with_context(|| format!("tier {} did not start", m.name))?;
            }
        }
        let _ = CLIENT_IP;
        Ok(site)
    }

    /// The address clients use to reach machine `j`: its IPv6 address on an
    /// `ipv6_client` site, else its IPv4 address.
    pub fn client_ip(&self, j: usize) -> IpAddr {
        if self.net.ipv6 {
            machine_ip6(j).into()
        } else {
            self.topo.machines[j].ip.into()
        }
    }

    /// The address clients use: the front tier (first machine) or its database.
    pub fn front(&self) -> SocketAddr {
        SocketAddr::new(self.client_ip(0), TIER_PORT)
    }

    /// Namespace of the client.
    pub fn client_ns(&self) -> String {
        self.net.names.client()
    }

    /// The backup server's `/metrics` text (it listens on loopback in the
    /// backup namespace).
    pub fn backup_metrics(&self) -> Result<String> {
        use std::io::{Read, Write};
        spawn_in(&self.net.names.backup(), || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", BACKUP_METRICS_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: backup\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("reading the backup's metrics panicked"))?
    }

    /// The agents' control sockets, one per host.
    pub fn ctl_sockets(&self) -> Vec<PathBuf> {
        (0..self.topo.hosts.len())
            .map(|i| self.work.join(format!("h{i}")).join("ctl.sock"))
            .collect()
    }

    /// Waits until every agent has every write acknowledged by the backup
    /// (`inflight=0/…` in `ctl status`), or fails after `timeout`. A site is
    /// protected only from then on: before it, a failover may rightly lack the
    /// set-up's own writes (file systems, databases) that no reply depended on.
    pub fn wait_replicated(&self, timeout: Duration) -> Result<()> {
        for p in self.ctl_sockets() {
            let mut unknown = false;
            wait_until(
                timeout,
                "replication to drain",
                || match pipecloud::ctl::status(&p, false)
                    .ok()
                    .and_then(|s| drained(&s))
                {
                    Some(d) => d,
                    None => {
                        unknown = true;
                        true
                    }
                },
            )
            .with_context(|| format!("agent {}", p.display()))?;
            if unknown {
                bail!("cannot read the in-flight bytes of {}", p.display());
            }
        }
        Ok(())
    }

    /// The disaster: the whole primary site dies at once (agents, machines, WAN link).
    pub fn disaster(&mut self) {
        // Cut the WAN first, so nothing more reaches the backup after "the instant":
        // packets in flight are lost with the link.
        if let Some(w) = &self.wan {
            w.cut();
        }
        let wan = self.net.names.wan();
        sh_quiet(&[
            "ip", "netns", "exec", &wan, "ip", "link", "set", "lan0", "down",
        ]);
        for a in &mut self.agents {
            a.signal(libc::SIGKILL);
        }
        for t in &mut self.tiers {
            t.signal(libc::SIGKILL);
        }
        for pg in self.dbs.iter_mut().flatten() {
            pg.crash();
        }
        for a in &mut self.agents {
            a.kill();
        }
    }

    /// Stops the primary's processes and unmounts its disks (after a disaster,
    /// or at the end of a run whose primary was fenced). Order: agents, then
    /// the disks' I/O aborted (a fenced agent's held writes would keep
    /// PostgreSQL in uninterruptible sleep, unkillable), then the machines,
    /// then the mounts (lazily). Every wait is bounded.
    pub fn teardown_primary(&mut self) {
        for a in &mut self.agents {
            a.kill();
        }
        self.agents.clear();
        for d in &mut self.disks {
            d.abort_io();
        }
        self.tiers.clear();
        for pg in self.dbs.iter_mut().flatten() {
            pg.crash();
        }
        self.dbs.clear();
        for d in &mut self.disks {
            d.detach();
        }
        self.disks.clear();
    }

    /// Runs `backup-server failover` for the group into `out` (as the server's user,
    /// through its control socket); returns its output.
    pub fn failover(&self, out: &Path) -> Result<String> {
        std::fs::create_dir_all(out)?;
        sh(&["chown", "nobody:nogroup", &out.to_string_lossy()])?;
        run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("backup-server"))
            .args(["failover", "--group", &self.topo.group.name, "--out"])
            .arg(out)
            .arg("--data-dir")
            .arg(&self.backup_data))
    }

    /// Runs `backup-server restore --at` for the group into `out`.
    pub fn restore(&self, at: &str, out: &Path) -> Result<String> {
        std::fs::create_dir_all(out)?;
        sh(&["chown", "nobody:nogroup", &out.to_string_lossy()])?;
        run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("backup-server"))
            .args([
                "restore",
                "--group",
                &self.topo.group.name,
                "--at",
                at,
                "--out",
            ])
            .arg(out)
            .arg("--data-dir")
            .arg(&self.backup_data))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.tiers.clear();
        // Disk I/O first: a machine waiting on a held write (a fenced or
        // stalled agent) cannot be killed until that I/O fails.
        for d in &mut self.disks {
            d.abort_io();
        }
        self.dbs.clear();
        for d in &mut self.disks {
            d.detach();
        }
        self.disks.clear();
        for a in &mut self.agents {
            a.stop(Duration::from_secs(5));
        }
        self.agents.clear();
        if let Some(mut b) = self.backup.take() {
            b.stop(Duration::from_secs(5));
        }
        self.wan = None;
    }
}

/// Starts `backup-server serve` as `nobody` in namespace `ns`, listening on
/// `listen`, with data directory `data` (created, given to nobody; a base
/// volume placed in it beforehand is kept) and the server certificate of
/// `certs` (`backup-server certs`); its configuration is written to `cfg`, its
/// log next to it.
/// Its `/metrics` listens on loopback in `ns` ([`BACKUP_METRICS_PORT`]).
pub fn start_backup_server(
    ns: &str,
    listen: SocketAddr,
    data: &Path,
    certs: &Path,
    cfg: &Path,
) -> Result<Guarded> {
    std::fs::create_dir_all(data)?;
    std::fs::write(
        cfg,
        format!(
            "listen = \"{listen}\"\ndata_dir = \"{}\"\nmetrics = \"127.0.0.1:{BACKUP_METRICS_PORT}\"\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            data.display(),
            certs.join("ca.pem").display(),
            certs.join("server.pem").display(),
            certs.join("server.key").display()
        ),
    )?;
    // The backup server runs as nobody: it owns only its data dir and reads the certs.
    sh(&["chown", "-R", "nobody:nogroup", &data.to_string_lossy()])?;
    let mut cmd = ns_cmd(ns, "setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("backup-server"))
        .args(["serve", "--config"])
        .arg(cfg);
    Guarded::spawn("backup-server", &mut cmd, &cfg.with_extension("log"))
}

/// The site's etcd cluster: three failure domains, one member each: the
/// primary's first host, the backup, and a witness on the WAN router (on its
/// backup-side address, so it stays reachable from the backup after the
/// primary's link is cut).
fn start_etcd(names: &crate::site::Names) -> Result<pipecloud_quorum::testkit::EtcdCluster> {
    use pipecloud_quorum::testkit::{EtcdCluster, MemberAddr};
    let member = |ip, ns: String| MemberAddr {
        ip,
        client_port: ETCD_CLIENT_PORT,
        peer_port: ETCD_PEER_PORT,
        netns: Some(ns),
    };
    let members = vec![
        member(crate::site::host_lan_ip(0), names.host(0)),
        member(BACKUP_IP, names.backup()),
        member(crate::site::WAN_BACKUP_SIDE, names.wan()),
    ];
    EtcdCluster::start("site", members, None).context("starting the site's etcd members")
}

/// Milliseconds as f64.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Whether an agent's status shows no unacknowledged replication data.
fn drained(status: &str) -> Option<bool> {
    let v: Vec<&str> = status
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("inflight="))
        .collect();
    if v.is_empty() {
        return None;
    }
    Some(v.iter().all(|x| x.starts_with("0/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_reads_the_status_summary() {
        assert_eq!(
            drained("group g: mode=sync inflight=0/67108864 committed=[3]"),
            Some(true)
        );
        assert_eq!(drained("group g: inflight=4096/67108864"), Some(false));
        assert_eq!(drained("no such field"), None);
    }
}
