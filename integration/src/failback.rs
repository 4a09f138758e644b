//! The lifecycle after the takeover (issue 23 §3–§4, docs/design.md §15):
//! the activation, the failback under reverse protection and the planned
//! switch-back.
//!
//! **Activation** ([`activate`], when the controller's hook asks): the
//! active site (the backup site) serves the failed-over image through a
//! `pipecloud agent --detached` on a reversed topology (the agent's host at
//! the backup site, its backup server at home, `pipelined`, `[quorum]
//! home_site = "backup"`, so its keeper `Hold`s the generation that is its
//! own site's once the controller's handed-over lease lapsed); PostgreSQL runs
//! in a machine namespace of its own there ([`BackupMachine`]) on the agent's
//! NBD volume. Detached, the agent replicates nothing and holds nothing: the
//! old primary is gone. Then, with a client inserting all along:
//!
//! 1. **Old primary returns**: its processes are stopped (it is fenced and
//!    never serves as it is); its disk gets the 1 % the old primary wrote after
//!    the cut; the active site writes 1 % of the disk while detached.
//! 2. **Reverse protection**: the old primary's disk becomes the base volume
//!    of a `backup-server` at the old primary's host, and `pipecloud ctl
//!    attach` starts the agent's replication to it, PostgreSQL running on
//!    (the longest gap between its replies around the attach is reported).
//!    A reply at the active site is then held for the reverse round trip:
//!    checked.
//! 3. **Live resync**: `resync-fetch` at home into that base volume from
//!    `resync-source` on the agent's live image, while the client keeps
//!    inserting; the home backup server defers its journal until the resync
//!    is done (`pipecloud_core::synctarget`). Every block written before the
//!    attach is compared by the resync; every later one is journaled at home.
//! 4. **Planned switch-back**: pause (the client stops, PostgreSQL stops, the
//!    volume is unmounted), drain (the agent has nothing in flight), the agent
//!    stops, `backup-server hand-over` (one etcd transaction conditioned on the
//!    active site's generation), the home backup server fails over (its base
//!    volume plus journal) and that image must equal the active site's at this
//!    quiesced instant; the active site's image becomes the base volume of a
//!    fresh backup server at the backup site (forward protection), the home
//!    agent serves the failed-over image, PostgreSQL starts at home, the route
//!    moves home, and a client reply from home ends the switch-back. No
//!    acknowledged insert of the whole cycle may be missing at home.

use crate::lifecycle::{start_client, Seen};
use crate::pg::{chown_postgres, Postgres};
use crate::run::{agent_bin, bin, start_backup_server, Site, PG_PORT};
use crate::site::{
    host_lan_ip, render_topology_at, MountedDisk, Names, BACKUP_IP, BACKUP_PORT, MACHINE_GW,
    WAN_LAN_SIDE,
};
use crate::sys::{ns_cmd, sh, sh_quiet, wait_until, Guarded};
use anyhow::{bail, Context, Result};
use pipecloud_core::topology::Mode;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the failback did.
#[derive(Debug, Default)]
pub struct Failback {
    /// Frame bytes of the resync over the WAN, both ways.
    pub resync_bytes: u64,
    pub disk_bytes: u64,
    /// Blocks the active site sent.
    pub blocks_sent: u64,
    pub secs: f64,
    /// Inserts the active site acknowledged while the resync ran.
    pub live_inserts: usize,
    /// Median insert latency at the active site (a client next to it):
    /// unprotected, then under reverse protection.
    pub unprotected_ms: f64,
    pub reverse_ms: f64,
    /// The longest the active site went without a reply around `ctl attach`
    /// (reverse protection starts with the application running).
    pub attach_gap_ms: f64,
    /// Pause to the first reply served at home.
    pub switchback_s: f64,
    /// Median insert latency at home (a client on its LAN) after it.
    pub home_ms: f64,
    /// The generation the home site serves under after the switch-back.
    pub home_generation: u64,
    /// Acknowledged inserts (the whole cycle) missing at home.
    pub switchback_lost: usize,
    pub acked_total: usize,
}

/// The machine's namespace at the backup site (the activation's stand-in for
/// a guest there): a veth to the backup namespace, the machine's address,
/// its gateway [`MACHINE_GW`] as at the primary's hosts; and a client
/// namespace next to it (its own veth to the backup namespace,
/// [`LOCAL_CLIENT_IP`]), so that the active site's hold can be seen without
/// the WAN in the way. Deleted on drop.
pub struct BackupMachine {
    pub ns: crate::netns::Netns,
    pub client: crate::netns::Netns,
    backup_ns: String,
    ip: Ipv4Addr,
}

/// Address of the client next to the active site (the backup namespace's
/// side of its link is `.1`).
const LOCAL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);

impl BackupMachine {
    pub fn up(names: &Names, ip: Ipv4Addr) -> Result<BackupMachine> {
        let ns = crate::netns::Netns::new(&format!("{}-bm0", names.prefix))?;
        let backup_ns = names.backup();
        sh(&[
            "ip", "link", "add", "m0", "netns", &backup_ns, "type", "veth", "peer", "name", "eth0",
            "netns", &ns.name,
        ])?;
        let b = |args: &[&str]| crate::sys::ns_sh(&backup_ns, args);
        b(&["ip", "link", "set", "m0", "up"])?;
        b(&[
            "ip",
            "addr",
            "add",
            &format!("{MACHINE_GW}/32"),
            "dev",
            "m0",
        ])?;
        b(&["ip", "route", "replace", &format!("{ip}/32"), "dev", "m0"])?;
        b(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        ns.sh(&["ip", "link", "set", "eth0", "up"])?;
        crate::site::machine_addr(&ns, ip)?;
        let client = crate::netns::Netns::new(&format!("{}-bc", names.prefix))?;
        sh(&[
            "ip",
            "link",
            "add",
            "c0",
            "netns",
            &backup_ns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client.name,
        ])?;
        b(&["ip", "link", "set", "c0", "up"])?;
        b(&["ip", "addr", "add", "10.99.1.1/30", "dev", "c0"])?;
        client.sh(&["ip", "link", "set", "eth0", "up"])?;
        client.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{LOCAL_CLIENT_IP}/30"),
            "dev",
            "eth0",
        ])?;
        client.sh(&["ip", "route", "add", "default", "via", "10.99.1.1"])?;
        Ok(BackupMachine {
            ns,
            client,
            backup_ns,
            ip,
        })
    }

    /// The backup site no longer routes the machine's address (switch-back).
    fn unroute(&self) {
        sh_quiet(&[
            "ip",
            "-n",
            &self.backup_ns,
            "route",
            "del",
            &format!("{}/32", self.ip),
        ]);
    }
}

/// Clients reach the machine's address at the backup site (`true`: the
/// stand-in for SecondSite's BGP re-advertisement) or at home again.
pub fn route_clients(site: &Site, ip: Ipv4Addr, to_backup: bool) -> Result<()> {
    let names = &site.net.names;
    let wan = names.wan();
    let dst = format!("{ip}/32");
    let (wan_via, client_via) = if to_backup {
        (BACKUP_IP, WAN_LAN_SIDE)
    } else {
        (host_lan_ip(0), host_lan_ip(0))
    };
    sh(&["ip", "-n", &wan, "link", "set", "lan0", "up"])?;
    sh(&[
        "ip",
        "-n",
        &wan,
        "route",
        "replace",
        &dst,
        "via",
        &wan_via.to_string(),
    ])?;
    if let Some(w) = &site.wan {
        w.restore();
    }
    sh(&[
        "ip",
        "-n",
        &names.client(),
        "route",
        "replace",
        &dst,
        "via",
        &client_via.to_string(),
    ])?;
    Ok(())
}

/// Overwrites `fraction_pct` % of `image`'s 4 KiB blocks, at seeded random
/// places, with seeded random data (the divergence case), and syncs.
fn diverge(image: &Path, seed: u64, fraction_pct: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 4096;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let blocks = f.metadata()?.len() / BLOCK;
    let mut rng = crate::disaster::Rng(seed);
    let mut next = move || rng.next();
    for _ in 0..blocks * fraction_pct / 100 {
        let at = next() % blocks * BLOCK;
        let data: Vec<u8> = (0..BLOCK / 8).flat_map(|_| next().to_le_bytes()).collect();
        f.write_all_at(&data, at)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Writes `bytes` of seeded random data into a new file `path` (through a
/// mounted file system) and syncs it: the active site's own writes.
fn write_file(path: &Path, seed: u64, bytes: u64) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut rng = crate::disaster::Rng(seed);
    let mut next = move || rng.next();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(1 << 20);
        let chunk: Vec<u8> = (0..n.div_ceil(8))
            .flat_map(|_| next().to_le_bytes())
            .collect();
        f.write_all(&chunk[..n as usize])?;
        left -= n;
    }
    f.sync_all()?;
    Ok(())
}

/// Whether two files have the same length and bytes.
pub fn identical(a: &Path, b: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let len = fa.metadata()?.len();
    if fb.metadata()?.len() != len {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(1 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// Port of `resync-source` at the backup site.
const RESYNC_PORT: u16 = 7801;

/// The resync (the one place that invokes it): `resync-source` on the active
/// site's `image` in the backup namespace, `resync-fetch` into `target` in the
/// old primary's host namespace, both as `nobody`, over the emulated WAN. The
/// link is the replication link's mutual TLS (the site's certificates); the
/// fetcher asks the site's etcd that the old primary (`home_site =
/// "primary"`, run.rs) is fenced.
fn resync(site: &Site, image: &Path, target: &Path) -> Result<Failback> {
    let (work, names) = (&site.work, &site.net.names);
    let group = site.topo.group.name.as_str();
    let etcd = site
        .etcd
        .as_ref()
        .context("the lifecycle's site has no etcd")?;
    let log = work.join("resync-source.log");
    let mut cmd = ns_cmd(&names.backup(), "setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("backup-server"))
        .args(["resync-source", "--listen"])
        .arg(format!("{BACKUP_IP}:{RESYNC_PORT}"))
        .arg("--image")
        .arg(image)
        .args(["--group", group, "--ca"])
        .arg(site.certs.join("ca.pem"))
        .arg("--cert")
        .arg(site.certs.join("server.pem"))
        .arg("--key")
        .arg(site.certs.join("server.key"));
    let mut source = Guarded::spawn("resync-source", &mut cmd, &log)?;
    wait_until(Duration::from_secs(30), "resync-source to listen", || {
        source.exited()
            || std::fs::read_to_string(&log)
                .map(|l| l.contains(" on "))
                .unwrap_or(false)
    })?;
    if source.exited() {
        bail!(
            "resync-source exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    // The fetcher runs as nobody: its status file goes into a directory of its own.
    let status = work.join("resync");
    std::fs::create_dir_all(&status)?;
    sh(&["chown", "nobody:nogroup", &status.to_string_lossy()])?;
    let out = crate::sys::run(
        ns_cmd(&names.host(0), "setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg("timeout")
            .arg("600")
            .arg(bin("backup-server"))
            .args(["resync-fetch", "--from"])
            .arg(format!("{BACKUP_IP}:{RESYNC_PORT}"))
            .arg("--image")
            .arg(target)
            .arg("--status")
            .arg(status.join("resync.status"))
            .args(["--group", group, "--ca"])
            .arg(site.certs.join("ca.pem"))
            .arg("--cert")
            .arg(site.certs.join(format!("{group}-agent.pem")))
            .arg("--key")
            .arg(site.certs.join(format!("{group}-agent.key")))
            .args([
                "--server-name",
                "backup.pipecloud.test",
                "--site",
                "primary",
            ])
            .arg("--etcd")
            .arg(etcd.endpoints().join(",")),
    )
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    wait_until(Duration::from_secs(30), "resync-source to finish", || {
        source.exited()
    })?;
    let field = |key: &str| -> Result<String> {
        out.lines()
            .find(|l| l.starts_with("resync: done"))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
            })
            .with_context(|| format!("no {key}= in resync-fetch's output: {out}"))
    };
    let r = Failback {
        resync_bytes: field("wan_bytes")?.parse()?,
        disk_bytes: field("disk_bytes")?.parse()?,
        blocks_sent: field("differing")?.parse()?,
        secs: field("secs")?.parse()?,
        ..Failback::default()
    };
    eprintln!("harness: failback: {}", out.trim());
    Ok(r)
}

/// `n` inserts in a row from namespace `ns` (ids from `first_id`, counted as
/// acknowledged in `seen`); returns the median latency in ms.
fn probe(ns: &str, conninfo: &str, first_id: i64, n: i64, seen: &Arc<Mutex<Seen>>) -> Result<f64> {
    let conninfo = conninfo.to_string();
    let seen = seen.clone();
    let lat = crate::netns::spawn_in(ns, move || -> Result<Vec<f64>> {
        let mut c = conninfo
            .parse::<postgres::Config>()?
            .connect(postgres::NoTls)?;
        let mut lat = Vec::new();
        for id in first_id..first_id + n {
            let t = Instant::now();
            let row = c.query_one(
                "INSERT INTO req (id, tier) VALUES ($1, 'probe') \
                 RETURNING current_setting('data_directory')",
                &[&id],
            )?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .replies
                .push(crate::lifecycle::Reply {
                    id: Some(id),
                    datadir: row.get(0),
                    at: Instant::now(),
                });
        }
        Ok(lat)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))??;
    let mut lat = lat;
    lat.sort_by(f64::total_cmp);
    Ok(lat[lat.len() / 2])
}

/// `pipecloud ctl status` of the agent of `topology` (host `host`).
fn ctl_status(topology: &Path, host: &str) -> Result<String> {
    crate::sys::run(
        Command::new(agent_bin())
            .args(["ctl", "--topology"])
            .arg(topology)
            .args(["--host", host, "status"]),
    )
}

/// Prints the lease, group and hold lines of an agent's `ctl status` and
/// returns its hold p50 in ms (how long released client-bound replies were
/// held); an error if it released none.
fn held_for(status: &str, what: &str) -> Result<f64> {
    for l in status
        .lines()
        .filter(|l| l.starts_with("lease ") || l.starts_with("hold ") || l.starts_with("group "))
    {
        eprintln!("harness: {what}: {l}");
    }
    status
        .lines()
        .find(|l| l.starts_with("hold "))
        .and_then(|l| l.split("hold_ms(p50=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{what}: the agent released no held reply"))
}

/// Starts an agent for `host` of `topology` in namespace `ns` (with `extra`
/// arguments); waits for the NBD socket of `disk` under `nbd_dir` and mounts
/// it at `mnt`.
#[allow(clippy::too_many_arguments)]
fn start_agent(
    ns: &str,
    topology: &Path,
    host: &str,
    extra: &[&str],
    nbd_dir: &Path,
    disk: &str,
    fuse_work: &Path,
    mnt: &Path,
    log: &Path,
) -> Result<(Guarded, MountedDisk)> {
    let sock = nbd_dir.join(format!("{disk}.sock"));
    let _ = std::fs::remove_file(&sock);
    std::fs::create_dir_all(nbd_dir)?;
    std::fs::create_dir_all(fuse_work)?;
    let mut cmd = ns_cmd(ns, &agent_bin().to_string_lossy());
    cmd.args(["agent", "--topology"])
        .arg(topology)
        .args(["--host", host])
        .args(extra)
        .env("RUST_LOG", "info");
    let agent = Guarded::spawn(&format!("agent-{host}"), &mut cmd, log)?;
    wait_until(Duration::from_secs(60), "the agent's NBD socket", || {
        sock.exists()
    })
    .with_context(|| std::fs::read_to_string(log).unwrap_or_default())?;
    let disk = MountedDisk::attach(disk, &sock, fuse_work, mnt, false)?;
    Ok((agent, disk))
}

/// PostgreSQL on `datadir` (a volume just mounted) in `ns` on `ip`.
fn start_pg(name: &str, ns: &str, ip: Ipv4Addr, datadir: &Path, work: &Path) -> Result<Postgres> {
    chown_postgres(datadir)?;
    let _ = std::fs::remove_file(datadir.join("postmaster.pid"));
    Postgres::start(
        name,
        ns,
        ip,
        PG_PORT,
        datadir,
        &work.join(format!("pg-{name}.log")),
        &[],
    )
    .with_context(|| format!("PostgreSQL {name} on {}", datadir.display()))
}

/// The active site after the activation ([`activate`]). Fields drop in
/// order: PostgreSQL, then the volume, then the agent.
pub struct Active {
    pub pg: Postgres,
    /// The agent's NBD volume, mounted.
    pub disk: MountedDisk,
    /// `pipecloud agent --detached` on the reversed topology.
    pub agent: Guarded,
    /// The failed-over image the agent serves.
    pub image: PathBuf,
    /// The reversed topology, its certificates, the agent's host.
    pub rtopo: PathBuf,
    pub rcerts: PathBuf,
    pub rhost: String,
    pub machine: BackupMachine,
}

/// The activation at the backup site, as the harness's stand-in for a
/// deployment's orchestrator performs it when the controller's hook asks
/// (docs/design.md §7): the failed-over `image` (the controller's) moves
/// under the reversed topology; `pipecloud agent --detached` serves it (its
/// backup, the old primary's site, is gone: nothing is replicated, nothing
/// held, until `ctl attach` at the failback); the machine's namespace at the
/// backup site mounts the agent's NBD volume and PostgreSQL starts on it. The
/// agent completes writes once its keeper acquired the generation after the
/// controller's (handed-over) lease, so the mount and PostgreSQL's recovery
/// wait for that.
pub fn activate(
    site: &Site,
    work: &Path,
    disk: &str,
    image: &Path,
    lease_ms: u64,
) -> Result<Active> {
    let names = &site.net.names;
    let machine = site.topo.machines[0].clone();
    let group = site.topo.group.name.clone();
    let bm = BackupMachine::up(names, machine.ip)?;
    let rwork = work.join("reverse");
    let rcerts = rwork.join("certs");
    std::fs::create_dir_all(rwork.join("images"))?;
    let home_listen = SocketAddr::new(host_lan_ip(0).into(), BACKUP_PORT);
    certs(&rcerts, "home.pipecloud.test", &group, home_listen)?;
    let served = rwork.join("images").join(format!("{disk}.img"));
    std::fs::rename(image, &served)
        .with_context(|| format!("moving {} to {}", image.display(), served.display()))?;
    let rtopo = reverse_topology(site, &rwork, &rcerts, lease_ms)?;
    let rhost = format!("{}-at-backup", site.topo.hosts[0].name);
    let (agent, mounted) = start_agent(
        &names.backup(),
        &rtopo,
        &rhost,
        &["--detached"],
        &rwork.join("h0"),
        disk,
        &rwork,
        &work.join("rmnt"),
        &work.join("agent-reverse.log"),
    )?;
    let pg = start_pg(
        "active",
        &bm.ns.name,
        machine.ip,
        &work.join("rmnt").join("pgdata"),
        work,
    )?;
    let status = ctl_status(&rtopo, &rhost)?;
    if !status.contains("protection=DETACHED") {
        bail!("the activated agent does not say it is detached:\n{status}");
    }
    for l in status
        .lines()
        .filter(|l| l.starts_with("WARNING ") || l.starts_with("lease "))
    {
        eprintln!("harness: activation: {l}");
    }
    Ok(Active {
        pg,
        disk: mounted,
        agent,
        image: served,
        rtopo,
        rcerts,
        rhost,
        machine: bm,
    })
}

/// The longest gap between consecutive replies from `datadir` in `seen`
/// whose time falls in `from..=to`, including the gaps from `from` to the
/// first and from the last to `to`.
fn longest_gap(seen: &Mutex<Seen>, datadir: &str, from: Instant, to: Instant) -> Duration {
    let s = seen.lock().unwrap_or_else(|e| e.into_inner());
    let mut at: Vec<Instant> = s
        .replies
        .iter()
        .filter(|r| r.datadir == datadir && r.at >= from && r.at <= to)
        .map(|r| r.at)
        .collect();
    at.sort();
    let mut last = from;
    let mut gap = Duration::ZERO;
    for t in at.into_iter().chain(std::iter::once(to)) {
        gap = gap.max(t.saturating_duration_since(last));
        last = t;
    }
    gap
}

/// The lease's reversed topology: the group's machine on a host at the backup
/// site, replicating to the backup server at the old primary's host; the
/// lease's home is the backup site.
fn reverse_topology(site: &Site, rwork: &Path, rcerts: &Path, lease_ms: u64) -> Result<PathBuf> {
    let mut topo = site.topo.clone();
    for h in &mut topo.hosts {
        h.name = format!("{}-at-backup", h.name);
    }
    for m in &mut topo.machines {
        m.host = format!("{}-at-backup", m.host);
    }
    let home = SocketAddr::new(host_lan_ip(0).into(), BACKUP_PORT);
    let mut text = render_topology_at(
        &topo,
        Mode::Pipelined,
        rcerts,
        rwork,
        home,
        "home.pipecloud.test",
    );
    let eps: Vec<String> = site
        .etcd
        .as_ref()
        .context("the lifecycle's site has no etcd")?
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    text.push_str(&format!(
        "[quorum]\nendpoints = [{}]\nlease_ms = {lease_ms}\nfailover = \"alarm-only\"\n\
         home_site = \"backup\"\nbackup_site = \"primary\"\n",
        eps.join(", ")
    ));
    let path = rwork.join("topology.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Generates a backup server's certificates (`backup-server certs`).
fn certs(dir: &Path, server_name: &str, group: &str, listen: SocketAddr) -> Result<()> {
    crate::sys::run(
        Command::new(bin("backup-server"))
            .args(["certs", "--dir"])
            .arg(dir)
            .args(["--server-name", server_name, "--group", group])
            .args(["--listen", &listen.to_string()]),
    )?;
    sh(&["chmod", "-R", "a+rX", &dir.to_string_lossy()])?;
    Ok(())
}

/// Makes `image` `disk`'s base volume of `group` in backup server data
/// directory `data` with `backup-server adopt` (docs/design.md §15: the old
/// primary's disk becomes the base volume the resync and the journal bring up
/// to date), then gives the directory to the server's user.
fn adopt_as_base(image: &Path, data: &Path, group: &str, disk: &str) -> Result<PathBuf> {
    let out = crate::sys::run(
        Command::new(bin("backup-server"))
            .args(["adopt", "--group", group, "--disk", disk, "--image"])
            .arg(image)
            .arg("--data-dir")
            .arg(data),
    )?;
    eprintln!("harness: {}", out.trim());
    sh(&["chown", "-R", "nobody:nogroup", &data.to_string_lossy()])?;
    let base = data
        .join("groups")
        .join(group)
        .join("volumes")
        .join(format!("{disk}.img"));
    if !base.is_file() {
        bail!("backup-server adopt: no base volume at {}", base.display());
    }
    Ok(base)
}

/// Runs the failback and the switch-back (module docs) after the takeover.
/// `seen` keeps every acknowledged insert since the start.
#[allow(clippy::too_many_arguments)]
pub fn run(
    site: &mut Site,
    work: &Path,
    disk: &str,
    active: Active,
    seen: Arc<Mutex<Seen>>,
    lease_ms: u64,
    mode: Mode,
) -> Result<Failback> {
    let names = site.net.names.clone();
    let machine = site.topo.machines[0].clone();
    let group = site.topo.group.name.clone();
    let rtt_ms = crate::run::ms(site.rtt.median);
    let conninfo = format!(
        "host={} port={PG_PORT} user=postgres dbname=postgres",
        machine.ip
    );
    // The old primary is stopped (fenced: it never serves as it is); the
    // clients reach the active site.
    site.teardown_primary();
    route_clients(site, machine.ip, true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut client = Some(start_client(
        &names.client(),
        conninfo.clone(),
        1 << 42,
        false,
        seen.clone(),
        stop.clone(),
    ));
    let acked = |s: &Arc<Mutex<Seen>>| s.lock().unwrap_or_else(|e| e.into_inner()).replies.len();

    // 1. The divergence: the old primary's writes after the cut (1 % of its
    // blocks), the active site's while detached (1 % of the disk, a file).
    let old = site.work.join("images").join(format!("{disk}.img"));
    diverge(&old, 0x01d_5eed, 1)?;
    let disk_bytes = std::fs::metadata(&active.image)?.len();
    write_file(
        &active.disk.mountpoint.join("diverged.bin"),
        0xac71_5eed,
        disk_bytes / 100,
    )?;
    let local = active.machine.client.name.clone();
    let unprotected_ms = probe(&local, &conninfo, 1 << 44, 20, &seen)?;

    // 2. Reverse protection: the old primary's disk becomes the base volume
    // of a backup server at its host, and the active site's agent attaches
    // to it: PostgreSQL keeps running.
    let home_listen = SocketAddr::new(host_lan_ip(0).into(), BACKUP_PORT);
    let home_data = work.join("home-backup");
    let base = adopt_as_base(&old, &home_data, &group, disk)?;
    let mut home_backup = start_backup_server(
        &names.host(0),
        home_listen,
        &home_data,
        &active.rcerts,
        &work.join("home-backup.toml"),
    )?;
    let (rtopo, rhost, image) = (
        active.rtopo.clone(),
        active.rhost.clone(),
        active.image.clone(),
    );
    let active_dir = work.join("rmnt").join("pgdata").display().to_string();
    let t_attach = Instant::now();
    let attached = crate::sys::run(
        Command::new(agent_bin())
            .args(["ctl", "--topology"])
            .arg(&rtopo)
            .args(["--host", &rhost, "attach"]),
    )
    .with_context(|| std::fs::read_to_string(work.join("agent-reverse.log")).unwrap_or_default())?;
    let attach_s = t_attach.elapsed().as_secs_f64();
    eprintln!("harness: failback: {} ({attach_s:.2} s)", attached.trim());
    let status = ctl_status(&rtopo, &rhost)?;
    if status.contains("DETACHED") {
        bail!("the active site's agent still says it is detached after `ctl attach`:\n{status}");
    }
    let reverse_ms = probe(&local, &conninfo, 1 << 45, 20, &seen)?;
    let reverse_hold = held_for(&ctl_status(&rtopo, &rhost)?, "reverse protection")?;
    // Without service: the longest the clients went without a reply from the
    // active site, from just before the attach to after the probe.
    let service_gap = longest_gap(
        &seen,
        &active_dir,
        t_attach
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(t_attach),
        Instant::now(),
    );
    eprintln!(
        "harness: failback: the active site attached to reverse protection with PostgreSQL \
         running: longest gap between replies around the attach {:.0} ms, load {}",
        service_gap.as_secs_f64() * 1e3,
        crate::switch::loadavg()
    );
    eprintln!(
        "harness: reverse protection: insert from a client next to the active site p50 {reverse_ms:.1} ms (unprotected \
         {unprotected_ms:.1} ms), reply hold p50 {reverse_hold:.1} ms, WAN rtt {rtt_ms:.1} ms, load {}",
        crate::switch::loadavg()
    );
    // The probe is next to the active site: an unheld insert takes a
    // millisecond or two, a held one at least the reverse round trip.
    if reverse_ms < 0.8 * rtt_ms {
        bail!(
            "a reply at the active site was not held for the reverse round trip: insert p50 \
             {reverse_ms:.1} ms ({unprotected_ms:.1} ms unprotected, rtt {rtt_ms:.1} ms)"
        );
    }
    let Active {
        pg: rpg,
        disk: rdisk,
        agent: ragent,
        machine: active_machine,
        ..
    } = active;
    let (mut rpg, mut rdisk, mut ragent) = (rpg, rdisk, ragent);

    // 3. The live resync into the home backup server's base volume.
    // Meanwhile the home backup server's status must say that the journal
    // waits for the resync (the order rule, docs/design.md §15).
    let before = acked(&seen);
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (watching, home_data) = (watching.clone(), home_data.clone());
        std::thread::spawn(move || -> Option<String> {
            while watching.load(Ordering::SeqCst) {
                let out = crate::sys::run(
                    Command::new(bin("backup-server"))
                        .args(["status", "--data-dir"])
                        .arg(&home_data),
                )
                .unwrap_or_default();
                if let Some(l) = out.lines().find(|l| l.contains("resync is writing")) {
                    return Some(l.trim().to_owned());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        })
    };
    let resynced = resync(site, &image, &base);
    watching.store(false, Ordering::SeqCst);
    let deferred = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("status watcher panicked"))?;
    let mut r = resynced?;
    let deferred = deferred
        .context("the home backup server's status never showed the resync deferring its journal")?;
    eprintln!("harness: failback: home backup-server status during the resync: {deferred}");
    r.live_inserts = acked(&seen) - before;
    r.unprotected_ms = unprotected_ms;
    r.reverse_ms = reverse_ms;
    r.attach_gap_ms = service_gap.as_secs_f64() * 1e3;
    if r.live_inserts == 0 {
        bail!("no insert was acknowledged during the resync: it was not live");
    }

    // 4. The planned switch-back. Pause: the client stops, so does
    // PostgreSQL, and the volume is unmounted (everything written reaches
    // the agent).
    let pause = Instant::now();
    stop.store(true, Ordering::SeqCst);
    if let Some(c) = client.take() {
        c.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    rpg.stop();
    drop(rpg);
    rdisk.detach();
    drop(rdisk);
    // Drain: nothing in flight at the agent, all of it journaled at home.
    wait_until(Duration::from_secs(30), "the reverse agent's drain", || {
        ctl_status(&rtopo, &rhost)
            .map(|s| s.contains(" inflight=0/"))
            .unwrap_or(false)
    })?;
    // The agent resigns its lease when it stops cleanly (docs/design.md §7):
    // the hand-over need not wait for it to lapse.
    let t_stop = Instant::now();
    ragent.stop(Duration::from_secs(10));
    // Generation bump: once no site holds the lease.
    let mut handed: Result<String> = Err(anyhow::anyhow!("not tried"));
    wait_until(
        Duration::from_secs(lease_ms / 1000 * 3 + 10),
        "the hand-over",
        || {
            handed = crate::sys::run(
                ns_cmd(&names.backup(), &bin("backup-server").to_string_lossy())
                    .args(["hand-over", "--topology"])
                    .arg(&rtopo)
                    .args(["--to", "primary"]),
            );
            handed.is_ok()
        },
    )
    .with_context(|| {
        format!(
            "{:#}",
            handed.as_ref().err().unwrap_or(&anyhow::anyhow!(""))
        )
    })?;
    let handed = handed?;
    eprintln!(
        "harness: switch-back: {} ({:.2} s after the agent's stop began)",
        handed.trim(),
        t_stop.elapsed().as_secs_f64()
    );
    // The home backup server's image (base volume + journal) must be the
    // active site's at this quiesced instant.
    let home_out = work.join("home-out");
    std::fs::create_dir_all(&home_out)?;
    sh(&["chown", "nobody:nogroup", &home_out.to_string_lossy()])?;
    let out = crate::sys::run(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("backup-server"))
            .args(["failover", "--group", &group, "--out"])
            .arg(&home_out)
            .arg("--data-dir")
            .arg(&home_data),
    )?;
    eprintln!("harness: switch-back: home {}", out.trim());
    home_backup.stop(Duration::from_secs(5));
    let home_image = home_out.join(format!("{disk}.img"));
    if !identical(&home_image, &image)? {
        bail!(
            "the home site's image (resynced base volume + journal) differs from the active site's \
             at the quiesced instant"
        );
    }
    // Forward protection: the active site's image is the backup's base volume.
    if let Some(mut b) = site.backup.take() {
        b.stop(Duration::from_secs(5));
    }
    let backup2 = work.join("backup-2");
    adopt_as_base(&image, &backup2, &group, disk)?;
    site.backup = Some(start_backup_server(
        &names.backup(),
        SocketAddr::new(BACKUP_IP.into(), BACKUP_PORT),
        &backup2,
        &site.certs,
        &work.join("backup-2.toml"),
    )?);
    std::fs::rename(&home_image, &old)?;
    let hwork = work.join("home");
    let (agent, hdisk) = start_agent(
        &names.host(0),
        &site.topo_file,
        &site.topo.hosts[0].name,
        &[],
        &site.work.join("h0"),
        disk,
        &hwork,
        &work.join("home-mnt"),
        &work.join("agent-home.log"),
    )?;
    site.agents.push(agent);
    site.disks.push(hdisk);
    let home_dir = work.join("home-mnt").join("pgdata");
    let hpg = start_pg("home", &names.machine(0), machine.ip, &home_dir, work)?;
    active_machine.unroute();
    route_clients(site, machine.ip, false)?;
    let stop = Arc::new(AtomicBool::new(false));
    let client = start_client(
        &names.client(),
        conninfo.clone(),
        1 << 43,
        false,
        seen.clone(),
        stop.clone(),
    );
    let home = home_dir.display().to_string();
    wait_until(Duration::from_secs(60), "a reply from home", || {
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .replies
            .iter()
            .any(|r| r.datadir == home)
    })?;
    r.switchback_s = pause.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    r.home_ms = probe(&names.client(), &conninfo, 1 << 46, 20, &seen)?;
    let status = ctl_status(&site.topo_file, &site.topo.hosts[0].name)?;
    let home_hold = held_for(&status, "home");
    let hold_text = home_hold
        .as_ref()
        .map_or_else(|_| "- (none held)".to_owned(), |h| format!("{h:.1}"));
    r.home_generation = status
        .lines()
        .find(|l| l.starts_with("lease "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("generation="))
        })
        .and_then(|g| g.parse().ok())
        .context("no lease generation in the home agent's status")?;
    eprintln!(
        "harness: switch-back: {:.2} s from the pause to a reply from home; insert at home p50 {:.1} ms, \
         reply hold p50 {hold_text} ms, WAN rtt {rtt_ms:.1} ms, load {}",
        r.switchback_s,
        r.home_ms,
        crate::switch::loadavg()
    );
    // The client is on home's LAN: an unheld insert takes a millisecond or two.
    // Only the zero-RPO modes hold (the fault run's home agent is `async`).
    if matches!(mode, Mode::Pipelined | Mode::Sync)
        && (home_hold.is_err() || r.home_ms < 0.8 * rtt_ms)
    {
        bail!(
            "a reply at home was not held for the forward round trip: insert p50 {:.1} ms",
            r.home_ms
        );
    }
    let sv: BTreeSet<i64> = hpg
        .psql("SELECT id FROM req")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let s = seen.lock().unwrap_or_else(|e| e.into_inner());
    let acked: BTreeSet<i64> = s.replies.iter().filter_map(|r| r.id).collect();
    r.switchback_lost = acked.difference(&sv).count();
    r.acked_total = acked.len();
    drop(s);
    site.dbs.push(Some(hpg));
    Ok(r)
}
