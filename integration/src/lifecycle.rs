//! `pipecloud-harness lifecycle` (issue 23, first increment): load on the
//! primary → disaster → automatic failover decided on etcd → clients served
//! by the backup site.
//!
//! The site is the disaster harness's ([`crate::run::Site`]) with a lease: a
//! three-member etcd cluster (the primary's first host, the backup, a witness
//! on the WAN router) and `[quorum]` with failover `automatic`. The backup
//! site's `backup-server controller` runs unprivileged in the backup
//! namespace. The client inserts numbered rows into the PostgreSQL of the
//! single writer machine and records, for every acknowledged insert, which
//! site answered (the server's data directory) and when.
//!
//! The disaster kills the primary site (WAN cut, agents, PostgreSQL, its etcd
//! member). The controller wins the next generation when the primary's lease
//! lapses, fences the group, fails over to the causal cut; then the harness
//! does what a deployment's activation hook and BGP would: it mounts the
//! failed-over volume at the backup, starts PostgreSQL there on the machine's
//! address, and moves the client's route to the backup site.
//!
//! Checked and printed: `rto_s` (disaster → first reply from the backup site),
//! `lost_acked` (acknowledged inserts missing from the backup's database: must
//! be 0), `split_brain_windows` (1 if a reply of the primary arrived after the
//! first reply of the backup: the two sites' reply windows overlap; must be 0).
//!
//! With `--partition primary-quorum` there is no disaster: the primary's host
//! is cut from the etcd majority (its member from the others, its agent from
//! the backup's and the witness's client ports; rules in the WAN router) while
//! it keeps running and keeps replicating. A second client at the backup site
//! talks to the same address (the primary until the takeover, the backup's
//! own PostgreSQL after it), and both clients also read (a `SELECT` depends on
//! no write, so only the lease gate can stop a stale primary answering it).
//! `split_brain_windows` then really tests the fencing: the primary must stop
//! answering, within its lease, before the backup's first answer.
//!
//! **Failback** (issue 23 §4, docs/design.md §15), after either run: the old
//! primary's processes are stopped (agent first: a fenced agent's held writes
//! would keep its PostgreSQL unkillable) and the active site quiesced (its
//! PostgreSQL stopped, the volume unmounted); then the case, 1 % of
//! the disk's blocks overwritten on each side after the failover; then
//! `backup-server resync-fetch` at the old primary's host pulls from
//! `resync-source` at the backup over the emulated WAN, and the two images
//! must be byte-identical (full compare). `failback_resync_bytes` is the
//! frame bytes both ways.
//!
//! Not yet: more partition schedules, reverse protection, switch-back.

use crate::netns::spawn_in;
use crate::pg::{chown_postgres, Postgres};
use crate::run::{bin, Site, SiteOptions, PG_PORT};
use crate::site::MountedImage;
use crate::sys::{ns_cmd, sh, wait_until, Guarded};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One acknowledged insert (`id`) or read (`None`).
#[derive(Clone, Debug)]
pub struct Reply {
    pub id: Option<i64>,
    /// The answering server's data directory (which site).
    pub datadir: String,
    pub at: Instant,
}

/// What the client saw.
#[derive(Default)]
pub struct Seen {
    pub replies: Vec<Reply>,
    pub errors: u64,
}

/// The outcome of one lifecycle run.
#[derive(Debug)]
pub struct LifecycleResult {
    pub rto: Duration,
    pub takeover: Duration,
    pub acked_primary: usize,
    pub acked_backup: usize,
    pub lost_acked: usize,
    pub split_brain_windows: usize,
    pub partitions: usize,
    pub failback: crate::failback::Failback,
}

/// Cuts host `ip` (the primary's dom0, with its etcd member and agent) from
/// the etcd majority, in the WAN router (`cut`), or heals that cut: its
/// traffic to and from the etcd ports of the other members (the backup's,
/// forwarded; the witness's, local) is dropped; replication and client
/// traffic still pass.
pub fn quorum_cut(wan: &str, ip: std::net::Ipv4Addr, cut: bool) -> Result<()> {
    let ip = ip.to_string();
    let ports = format!(
        "{}:{}",
        crate::run::ETCD_CLIENT_PORT,
        crate::run::ETCD_PEER_PORT
    );
    let rules = [
        ("FORWARD", "-s"),
        ("FORWARD", "-d"),
        ("INPUT", "-s"),
        ("OUTPUT", "-d"),
    ];
    for (chain, dir) in rules {
        for port_dir in ["--dport", "--sport"] {
            let mut args = vec!["ip", "netns", "exec", wan, "iptables"];
            if cut {
                args.extend(["-I", chain, "1"]);
            } else {
                args.extend(["-D", chain]);
            }
            args.extend([dir, &ip, "-p", "tcp", port_dir, &ports, "-j", "DROP"]);
            sh(&args)?;
        }
    }
    Ok(())
}

/// A client inserting numbered rows, reconnecting after errors, until `stop`.
pub fn start_client(
    ns: &str,
    conninfo: String,
    first_id: i64,
    reads_only: bool,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<()>> {
    spawn_in(ns, move || {
        let mut id: i64 = first_id;
        let mut conn: Option<postgres::Client> = None;
        while !stop.load(Ordering::SeqCst) {
            let c = match &mut conn {
                Some(c) => c,
                None => {
                    let mut cfg: postgres::Config = conninfo.parse()?;
                    cfg.connect_timeout(Duration::from_millis(500));
                    match cfg.connect(postgres::NoTls) {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            seen.lock().unwrap_or_else(|e| e.into_inner()).errors += 1;
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    }
                }
            };
            let insert = "INSERT INTO req (id, tier) VALUES ($1, 'db') \
                          RETURNING current_setting('data_directory')";
            let read = "SELECT current_setting('data_directory')";
            // A read depends on no write: only the lease gate holds its reply.
            let r = if reads_only {
                c.query_one(read, &[]).map(|row| vec![(None, row)])
            } else {
                c.query_one(insert, &[&id])
                    .and_then(|w| Ok(vec![(Some(id), w), (None, c.query_one(read, &[])?)]))
            };
            match r {
                Ok(rows) => {
                    let at = Instant::now();
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    for (id, row) in rows {
                        s.replies.push(Reply {
                            id,
                            datadir: row.get(0),
                            at,
                        });
                    }
                }
                Err(_) => {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).errors += 1;
                    conn = None;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            id += 1;
        }
        Ok(())
    })
}

/// Runs one lifecycle on a fresh site.
pub fn run(
    topo: &Path,
    work: &Path,
    prefix: &str,
    mut opts: SiteOptions,
    lease_ms: u64,
    load: Duration,
    partition: bool,
) -> Result<LifecycleResult> {
    opts.quorum_lease_ms = Some(lease_ms);
    opts.tiers = false;
    let mut site = Site::up(topo, work, prefix, &opts)?;
    let writers: Vec<usize> = (0..site.topo.machines.len())
        .filter(|&j| !site.topo.disks_of(&site.topo.machines[j].name).is_empty())
        .collect();
    if site.topo.machines.len() != 1 || writers.len() != 1 {
        bail!("lifecycle runs on single-machine topologies for now (e.g. topology/single-db.toml)");
    }
    let machine = site.topo.machines[0].clone();
    let disk = site.topo.disks_of(&machine.name)[0].name.clone();
    let names = site.net.names.clone();

    // The backup site's controller, unprivileged, in the backup namespace.
    let out = work.join("controller");
    std::fs::create_dir_all(&out)?;
    sh(&["chown", "nobody:nogroup", &out.to_string_lossy()])?;
    let mut cmd = ns_cmd(&names.backup(), "setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("backup-server"))
        .args(["controller", "--topology"])
        .arg(&site.topo_file)
        .arg("--out")
        .arg(&out)
        .arg("--data-dir")
        .arg(&site.backup_data)
        .env("RUST_LOG", "info");
    let controller = Guarded::spawn("controller", &mut cmd, &work.join("controller.log"))?;

    // Load on the primary.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let conninfo = format!(
        "host={} port={PG_PORT} user=postgres dbname=postgres",
        machine.ip
    );
    let client = |ns: &str, first_id, reads_only| {
        start_client(
            ns,
            conninfo.clone(),
            first_id,
            reads_only,
            seen.clone(),
            stop.clone(),
        )
    };
    let mut clients = vec![client(&names.client(), 1, false)];
    if partition {
        // A reader near the primary, and a writer at the backup site.
        clients.push(client(&names.client(), 0, true));
        clients.push(client(&names.backup(), 1 << 40, false));
    }
    std::thread::sleep(load);
    let primary_replies = seen.lock().unwrap_or_else(|e| e.into_inner()).replies.len();
    if primary_replies == 0 {
        bail!("no insert was acknowledged by the primary in {load:?}: the run proves nothing");
    }

    let disaster = Instant::now();
    if partition {
        quorum_cut(&names.wan(), crate::site::host_lan_ip(0), true)?;
    } else {
        // The disaster: the whole primary site, including its etcd member.
        site.disaster();
        if let Some(e) = site.etcd.as_mut() {
            e.kill(0);
        }
    }
    let marker = out.join("activated-2");
    wait_until(Duration::from_secs(60), "the controller's takeover", || {
        marker.exists()
    })
    .with_context(|| std::fs::read_to_string(work.join("controller.log")).unwrap_or_default())?;
    let takeover = disaster.elapsed();
    if !partition {
        site.teardown_primary();
    }

    // Activation (the hook's and BGP's stand-in): the failed-over volume at
    // the backup, PostgreSQL on the machine's address in a machine namespace
    // there, the route moved.
    let image = out.join("generation-2").join(format!("{disk}.img"));
    let mnt = work.join(format!("active-{disk}"));
    let mounted = MountedImage::mount(&image, &mnt)?;
    let datadir = mnt.join("pgdata");
    chown_postgres(&datadir)?;
    let _ = std::fs::remove_file(datadir.join("postmaster.pid"));
    let bm = crate::failback::BackupMachine::up(&names, machine.ip)?;
    let pg = Postgres::start(
        "active",
        &bm.ns.name,
        machine.ip,
        PG_PORT,
        &datadir,
        &work.join("pg-active.log"),
        &[],
    )
    .context("PostgreSQL on the failed-over volume")?;
    if !partition {
        crate::failback::route_clients(&site, machine.ip, true)?;
    }

    // Served by the backup site.
    let primary_dir = work
        .join("mnt")
        .join(&disk)
        .join("pgdata")
        .display()
        .to_string();
    let by_backup = |s: &Seen| {
        s.replies
            .iter()
            .filter(|r| r.datadir != primary_dir)
            .count()
    };
    wait_until(
        Duration::from_secs(60),
        "a reply from the backup site",
        || by_backup(&seen.lock().unwrap_or_else(|e| e.into_inner())) > 0,
    )?;
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    // A client of a fenced primary may wait on its held reply for good: its
    // thread ends when the site goes, not joined here.
    drop(clients);

    let s = seen.lock().unwrap_or_else(|e| e.into_inner());
    let first_backup = s
        .replies
        .iter()
        .filter(|r| r.datadir != primary_dir)
        .map(|r| r.at)
        .min()
        .context("no backup reply")?;
    let rto = first_backup.duration_since(disaster);
    let split_brain_windows = usize::from(
        s.replies
            .iter()
            .any(|r| r.datadir == primary_dir && r.at >= first_backup),
    );
    let sv: BTreeSet<i64> = pg
        .psql("SELECT id FROM req")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let acked: BTreeSet<i64> = s.replies.iter().filter_map(|r| r.id).collect();
    let lost_acked = acked.difference(&sv).count();
    let acked_backup = by_backup(&s);
    let acked_primary = s.replies.len() - acked_backup;
    eprintln!("harness: lifecycle: client errors {}", s.errors);
    drop(s);
    // Failback under reverse protection, and the switch-back (failback.rs).
    let active = crate::failback::Active {
        pg,
        mounted,
        image,
        machine: bm,
        controller,
    };
    let failback = crate::failback::run(
        &mut site, work, &disk, active, seen, lease_ms, partition, opts.mode,
    )?;
    let result = LifecycleResult {
        rto,
        takeover,
        acked_primary,
        partitions: usize::from(partition),
        acked_backup,
        lost_acked,
        split_brain_windows,
        failback,
    };
    eprintln!("harness: lifecycle: {result:?}");
    Ok(result)
}
