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
//! lapses, fences the group, fails over to the causal cut, hands the lease on
//! and runs its activation hook. The hook ([`hook`]) is the harness's
//! stand-in for a deployment's orchestrator: it hands the request to the
//! (root) harness and waits for its answer; the harness activates
//! ([`crate::failback::activate`]: a detached `pipecloud agent` at the backup
//! site serves the failed-over volume, PostgreSQL starts on its NBD volume on
//! the machine's address) and moves the client's route to the backup site
//! (BGP's stand-in), answers, and waits for the controller's marker, which
//! the controller writes only after the hook succeeded. A failed activation
//! is answered as failed (the hook exits non-zero, the controller logs it and
//! writes no marker) and fails the run.
//!
//! Checked and printed: `rto_s` (disaster → first reply from the backup site),
//! `lost_acked` (acknowledged inserts missing from the backup's database: must
//! be 0), `split_brain_windows` (how often one site answered while the other's
//! reply window was open, [`schedule::overlapping_windows`]; must be 0).
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
//! **Failback** (issue 23 §4, docs/design.md §15), after a takeover:
//! reverse protection, the live resync of the old primary's disk while the
//! active site serves, and the planned switch-back home, in
//! [`crate::failback`]; `failback_resync_bytes` is the resync's frame bytes
//! both ways.
//!
//! **Partition schedules** (`--partition NAME`, `--schedules N --seed S`;
//! [`crate::partition`]): instead of the disaster, faults cut and heal links
//! during the load; with a takeover the run goes on as above, without one
//! there is no failback (skipped, and said so) and the checks run against the
//! primary's database. Checked for every schedule: the sites' reply windows
//! never overlap, no acknowledged insert lost, the primary stops answering
//! within its lease of losing the etcd majority (`primary_stop`), and replies
//! resume within [`crate::partition::converge_bound`] of the last heal.
//!
//! Not yet: faults during activation or failback, multi-tier topologies.
//! A partition schedule's takeover is seen at the hook's request
//! ([`crate::partition::activated`]).

mod hook;

use crate::netns::spawn_in;
use crate::partition::{schedule, Applied, Schedule};
use crate::run::{bin, Site, SiteOptions, PG_PORT};
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
    /// Whether a takeover happened (without one, no failback).
    pub took_over: bool,
    /// The longest a primary cut from the etcd majority went on answering.
    pub primary_stop: Duration,
    /// From the last heal to the first reply after it (schedules only).
    pub converge: Option<Duration>,
    /// Inserts the primary acknowledged while its replication link was cut
    /// (after [`STALL_GRACE`]): a zero-RPO mode must stall instead.
    pub acked_while_cut: usize,
    /// With a schedule that never cut the primary from the etcd majority or
    /// the backup: the longest the primary went without answering, from the
    /// schedule's start to the last heal (it must keep serving).
    pub primary_gap: Option<Duration>,
}

/// What [`checks`] found.
struct Checked {
    split_brain_windows: usize,
    primary_stop: Duration,
    lost_acked: usize,
    acked_while_cut: usize,
    primary_gap: Option<Duration>,
}

/// How long after the replication link's cut acknowledgements released
/// before it may still reach the client.
pub const STALL_GRACE: Duration = Duration::from_secs(1);

/// How long the clients wait for TCP to acknowledge what they sent before
/// they drop the connection and reconnect (`TCP_USER_TIMEOUT`).
pub const CLIENT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(2);

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
                    // A server gone (the disaster) is noticed when sent data
                    // stays unacknowledged this long, not at the next of TCP's
                    // backed-off retransmissions (up to 6.4 s apart by then).
                    cfg.tcp_user_timeout(CLIENT_TCP_USER_TIMEOUT);
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
    schedule: Option<&Schedule>,
) -> Result<LifecycleResult> {
    let partition = schedule.is_some();
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

    // The backup site's controller, unprivileged, in the backup namespace,
    // with the harness's activation hook.
    let out = work.join("controller");
    std::fs::create_dir_all(&out)?;
    sh(&["chown", "nobody:nogroup", &out.to_string_lossy()])?;
    hook::install(&out, &site.topo_file)?;
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
    let mut controller = Guarded::spawn("controller", &mut cmd, &work.join("controller.log"))?;

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

    let primary_dir = work
        .join("mnt")
        .join(&disk)
        .join("pgdata")
        .display()
        .to_string();
    let disaster = Instant::now();
    let (generation, applied) = if let Some(sched) = schedule {
        let a = crate::partition::drive(&mut site, sched, &out)?;
        let last_primary = || {
            let s = seen.lock().unwrap_or_else(|e| e.into_inner());
            s.replies
                .iter()
                .filter(|r| r.datadir == primary_dir)
                .map(|r| r.at)
                .max()
        };
        let g = crate::partition::settle(&a, &out, Duration::from_millis(lease_ms), last_primary)
            .with_context(|| {
            std::fs::read_to_string(work.join("controller.log")).unwrap_or_default()
        })?;
        (g, Some(a))
    } else {
        // The disaster: the whole primary site, including its etcd member.
        site.disaster();
        if let Some(e) = site.etcd.as_mut() {
            e.kill(0);
        }
        (Some(2), None)
    };
    let Some(generation) = generation else {
        stop.store(true, Ordering::SeqCst);
        drop(clients);
        return without_takeover(&mut site, &seen, &primary_dir, applied, schedule);
    };
    // The controller fenced, failed over and handed the lease on; its hook
    // asks the harness (the orchestrator's stand-in) to activate the group.
    let request = hook::wait_request(&out, generation, &mut controller, work)?;
    let takeover = disaster.elapsed();
    eprintln!(
        "harness: lifecycle: activation requested after {:.2} s: {}",
        takeover.as_secs_f64(),
        request.trim().replace('\n', " ")
    );
    if !partition {
        site.teardown_primary();
    }

    // Activation (the stand-in for the orchestrator and for BGP): an agent at
    // the backup site serves the failed-over volume, detached; PostgreSQL on
    // it in a machine namespace there; the route moved. Then the hook's
    // answer, and the controller's marker (written only after the hook
    // succeeded).
    let image = out
        .join(format!("generation-{generation}"))
        .join(format!("{disk}.img"));
    let active = match crate::failback::activate(&site, work, &disk, &image, lease_ms) {
        Ok(a) => a,
        Err(e) => {
            hook::answer(&out, generation, Err(&format!("{e:#}")))?;
            return Err(e.context("activation"));
        }
    };
    if !partition {
        crate::failback::route_clients(&site, machine.ip, true)?;
    }
    hook::answer(&out, generation, Ok(()))?;
    eprintln!(
        "harness: lifecycle: activated {:.2} s after the disaster ({:.2} s after the request), load {}",
        disaster.elapsed().as_secs_f64(),
        (disaster.elapsed() - takeover).as_secs_f64(),
        crate::switch::loadavg()
    );
    let marker = out.join(format!("activated-{generation}"));
    wait_until(
        Duration::from_secs(30),
        "the controller's marker after the hook",
        || marker.exists(),
    )
    .with_context(|| std::fs::read_to_string(work.join("controller.log")).unwrap_or_default())?;
    // Served by the backup site.
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
    let converge = applied
        .as_ref()
        .map(|a| first_backup.saturating_duration_since(a.healed));
    let Checked {
        split_brain_windows,
        primary_stop,
        lost_acked,
        acked_while_cut,
        primary_gap,
    } = checks(
        &s,
        &primary_dir,
        applied.as_ref(),
        &active.pg.psql("SELECT id FROM req")?,
    );
    let acked_backup = by_backup(&s);
    let acked_primary = s.replies.len() - acked_backup;
    eprintln!("harness: lifecycle: client errors {}", s.errors);
    drop(s);
    // Failback under reverse protection, and the switch-back (failback.rs).
    // The old primary's fetcher reaches the etcd majority: every cut is
    // healed when a schedule ends (partition.rs).
    if !controller.exited() {
        eprintln!(
            "harness: lifecycle: the controller still runs after the activation: stopping it"
        );
    }
    controller.stop(Duration::from_secs(5));
    let failback = crate::failback::run(
        &mut site,
        work,
        &disk,
        active,
        seen.clone(),
        lease_ms,
        opts.mode,
    )?;
    let result = LifecycleResult {
        rto,
        takeover,
        acked_primary,
        partitions: schedule.map_or(0, |s| s.faults.len()),
        acked_backup,
        lost_acked,
        split_brain_windows,
        failback,
        took_over: true,
        primary_stop,
        converge,
        acked_while_cut,
        primary_gap,
    };
    eprintln!("harness: lifecycle: {result:?}");
    Ok(result)
}

/// The checks on what the clients saw, against `sv` (`SELECT id FROM req` at
/// the site active at the end): overlapping reply windows
/// ([`schedule::overlapping_windows`]), the longest a primary without the etcd
/// majority went on answering ([`schedule::primary_stop`]), the acknowledged
/// inserts missing from `sv`, the inserts the primary acknowledged while its
/// replication link was cut ([`schedule::acked_during`]), and, when the
/// schedule left the primary its quorum and its backup, the longest it went
/// without answering ([`schedule::longest_gap`]).
fn checks(s: &Seen, primary_dir: &str, applied: Option<&Applied>, sv: &str) -> Checked {
    use crate::partition::Link;
    let sites: Vec<(bool, Instant)> = s
        .replies
        .iter()
        .map(|r| (r.datadir == primary_dir, r.at))
        .collect();
    let sv: BTreeSet<i64> = sv.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let acked: BTreeSet<i64> = s.replies.iter().filter_map(|r| r.id).collect();
    let mut c = Checked {
        split_brain_windows: schedule::overlapping_windows(&sites),
        primary_stop: Duration::ZERO,
        lost_acked: acked.difference(&sv).count(),
        acked_while_cut: 0,
        primary_gap: None,
    };
    let Some(a) = applied else {
        return c;
    };
    let at_primary = |inserts_only: bool| -> Vec<Duration> {
        s.replies
            .iter()
            .filter(|r| r.datadir == primary_dir && (r.id.is_some() || !inserts_only))
            .map(|r| a.offset(r.at))
            .collect()
    };
    let without_quorum = schedule::primary_without_quorum(&a.events);
    let replication_cut = schedule::cut_intervals(&a.events, Link::PrimaryBackup);
    c.primary_stop = schedule::primary_stop(&without_quorum, &at_primary(false));
    c.acked_while_cut = schedule::acked_during(&replication_cut, STALL_GRACE, &at_primary(true));
    if without_quorum.is_empty() && replication_cut.is_empty() {
        let end = a.offset(a.healed);
        c.primary_gap = Some(schedule::longest_gap(
            &at_primary(false),
            Duration::ZERO,
            end,
        ));
    }
    c
}

/// The end of a schedule that caused no takeover: the primary still serves;
/// the checks run against its database; there is nothing to fail back.
fn without_takeover(
    site: &mut Site,
    seen: &Mutex<Seen>,
    primary_dir: &str,
    applied: Option<Applied>,
    schedule: Option<&Schedule>,
) -> Result<LifecycleResult> {
    let a = applied.context("no takeover without a partition schedule")?;
    let s = seen.lock().unwrap_or_else(|e| e.into_inner());
    let after = s
        .replies
        .iter()
        .filter(|r| r.at > a.healed)
        .map(|r| r.at)
        .min()
        .context("no reply after the last heal")?;
    let pg = site
        .dbs
        .first()
        .and_then(|d| d.as_ref())
        .context("the primary's PostgreSQL")?;
    let Checked {
        split_brain_windows,
        primary_stop,
        lost_acked,
        acked_while_cut,
        primary_gap,
    } = checks(&s, primary_dir, Some(&a), &pg.psql("SELECT id FROM req")?);
    let result = LifecycleResult {
        rto: Duration::ZERO,
        takeover: Duration::ZERO,
        acked_primary: s
            .replies
            .iter()
            .filter(|r| r.datadir == primary_dir)
            .count(),
        acked_backup: s
            .replies
            .iter()
            .filter(|r| r.datadir != primary_dir)
            .count(),
        lost_acked,
        split_brain_windows,
        partitions: schedule.map_or(0, |s| s.faults.len()),
        failback: crate::failback::Failback::default(),
        took_over: false,
        primary_stop,
        converge: Some(after.duration_since(a.healed)),
        acked_while_cut,
        primary_gap,
    };
    eprintln!(
        "harness: lifecycle: client errors {}; no takeover, so no failback (skipped)",
        s.errors
    );
    drop(s);
    site.teardown_primary();
    eprintln!("harness: lifecycle: {result:?}");
    Ok(result)
}
