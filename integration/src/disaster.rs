//! Randomized disasters (SoCC'11 §6.6, Figures 15/16): run the recording client,
//! kill the whole primary site at a random instant, fail over at the backup,
//! recover PostgreSQL on the recovered volumes, and compare the views:
//!
//! - CV (client view): requests whose reply the client received;
//! - SV (secondary view): requests present in the recovered databases;
//! - PV (primary view): requests present in the primary's own disks (recovered
//!   from its local images after the crash).
//!
//! `sync` and `pipelined` must give CV ⊆ SV at every point (for every writer's
//! database: each acknowledged request inserted one row per tier). `async` is the
//! control and is expected to show CV ⊄ SV at some points.

use crate::client::{self, Recorder, Target};
use crate::netns::spawn_in;
use crate::pg::{chown_postgres, Postgres};
use crate::run::{Site, SiteOptions, PG_PORT};
use crate::site::MountedImage;
use crate::sys::sh;
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Outcome of one disaster point.
#[derive(Clone, Debug, Default)]
pub struct PointResult {
    pub issued: i64,
    pub cv: usize,
    pub sv: usize,
    pub pv: usize,
    /// Replies the client received whose request is missing at the backup.
    pub unsafe_replies: usize,
    /// Requests acknowledged within the last 500 issued before the disaster (Fig. 15 window).
    pub window_cv: usize,
    pub window_sv: usize,
    pub window_pv: usize,
    pub cut: String,
    pub failover_ms: u64,
    /// Point-in-time restore at the middle of the run: rows recovered (0 if not run).
    pub pitr_rows: usize,
    /// Replies acknowledged before that instant that the restore lacks (must be 0
    /// in sync/pipelined).
    pub pitr_missing_acked: usize,
}

/// A tiny deterministic PRNG (splitmix64) for disaster instants.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1).max(1)
    }
}

/// Reads the ids of table `req` from a PostgreSQL data directory recovered from
/// `image` (mounted at `mnt`), by starting a throwaway server on it (crash
/// recovery must succeed).
pub fn ids_in_image(image: &Path, mnt: &Path, ns: &str, name: &str) -> Result<BTreeSet<i64>> {
    let m = MountedImage::mount(image, mnt)?;
    let datadir = mnt.join("pgdata");
    chown_postgres(&datadir)?;
    let _ = std::fs::remove_file(datadir.join("postmaster.pid"));
    let log = mnt
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join(format!("recover-{name}.log"));
    let mut pg = Postgres::start(
        &format!("recover-{name}"),
        ns,
        std::net::Ipv4Addr::LOCALHOST,
        PG_PORT + 100,
        &datadir,
        &log,
        &[],
    )
    .with_context(|| format!("PostgreSQL crash recovery on {}", image.display()))?;
    let out = pg.psql("SELECT id FROM req")?;
    pg.stop();
    drop(pg);
    drop(m);
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Runs one disaster point on a fresh site.
pub fn run_point(
    topo: &Path,
    work: &Path,
    prefix: &str,
    opts: &SiteOptions,
    run_for: Duration,
    workers: usize,
    pitr: bool,
) -> Result<PointResult> {
    let mut site = Site::up(topo, work, prefix, opts)?;
    let single = site.topo.machines.len() == 1;
    let target = if single {
        Target::Sql {
            conninfo: format!(
                "host={} port={PG_PORT} user=postgres dbname=postgres",
                site.client_ip(0)
            ),
        }
    } else {
        Target::Http { addr: site.front() }
    };
    let rec = Recorder::new(1);
    let started_wall = std::time::SystemTime::now();
    let rec2 = Arc::clone(&rec);
    let client_ns = site.client_ns();
    let clients = spawn_in(&client_ns, move || {
        Ok(client::start(target, workers, &rec2))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client start panicked"))??;
    std::thread::sleep(run_for);
    // The disaster instant.
    site.disaster();
    // Replies that escaped before the cut may still be on the client's wire.
    std::thread::sleep(Duration::from_millis(500));
    let cv: BTreeSet<i64> = rec.client_view().into_iter().collect();
    let issued = rec.issued_upto() - 1;
    rec.stop.store(true, Ordering::SeqCst);
    drop(clients); // threads may be blocked on dead connections; they die with the process
    site.teardown_primary();
    // Failover at the backup.
    let out = work.join("failover");
    let t0 = Instant::now();
    let fo = site.failover(&out)?;
    let failover_ms = t0.elapsed().as_millis() as u64;
    let cut = fo
        .lines()
        .find(|l| l.contains("cut"))
        .unwrap_or("")
        .trim()
        .to_string();
    // SV and PV per writer disk: a request counts in a view only if every
    // writer's database holds it (each tier inserts one row per request).
    let mut sv: Option<BTreeSet<i64>> = None;
    let mut pv: Option<BTreeSet<i64>> = None;
    let disks: Vec<(String, String)> = site
        .topo
        .machines
        .iter()
        .filter_map(|m| {
            site.topo
                .disks_of(&m.name)
                .first()
                .map(|d| (m.name.clone(), d.name.clone()))
        })
        .collect();
    let ns = site.client_ns();
    for (machine, disk) in &disks {
        let rec_img = out.join(format!("{disk}.img"));
        let s = ids_in_image(
            &rec_img,
            &work.join(format!("sv-{disk}")),
            &ns,
            &format!("sv-{machine}"),
        )?;
        let local = work.join("images").join(format!("{disk}.img"));
        let copy = work.join(format!("pv-{disk}.img"));
        std::fs::copy(&local, &copy).context("copying the primary image")?;
        let p = ids_in_image(
            &copy,
            &work.join(format!("pv-{disk}")),
            &ns,
            &format!("pv-{machine}"),
        )?;
        sv = Some(match sv {
            None => s,
            Some(prev) => prev.intersection(&s).copied().collect(),
        });
        pv = Some(match pv {
            None => p,
            Some(prev) => prev.intersection(&p).copied().collect(),
        });
    }
    let sv = sv.unwrap_or_default();
    let pv = pv.unwrap_or_default();
    let unsafe_replies = cv.difference(&sv).count();
    // Point-in-time restore at the middle of the run.
    let (mut pitr_rows, mut pitr_missing_acked) = (0, 0);
    if pitr {
        let mid = run_for / 2;
        let at = rfc3339(started_wall + mid)?;
        let acked_before: BTreeSet<i64> = {
            let g = rec.acked.lock().unwrap_or_else(|e| e.into_inner());
            g.iter().filter(|a| a.at <= mid).map(|a| a.id).collect()
        };
        let pout = work.join("pitr");
        site.restore(&at, &pout)
            .with_context(|| format!("restore --at {at}"))?;
        let mut upstream: Option<BTreeSet<i64>> = None;
        let mut all: Option<BTreeSet<i64>> = None;
        for (machine, disk) in &disks {
            let r = ids_in_image(
                &pout.join(format!("{disk}.img")),
                &work.join(format!("pitr-{disk}")),
                &ns,
                &format!("pitr-{machine}"),
            )
            .with_context(|| format!("point-in-time image of {disk} at {at}"))?;
            // Causal prefix-closure across tiers: a request reaches a downstream
            // tier only after its upstream insert committed.
            if let Some(up) = &upstream {
                let orphans = r.difference(up).count();
                if orphans > 0 {
                    anyhow::bail!(
                        "point-in-time restore at {at} is not causally closed: {orphans} requests of {machine} lack their upstream insert"
                    );
                }
            }
            upstream = Some(r.clone());
            all = Some(match all {
                None => r,
                Some(prev) => prev.intersection(&r).copied().collect(),
            });
        }
        let all = all.unwrap_or_default();
        pitr_rows = all.len();
        pitr_missing_acked = acked_before.difference(&all).count();
        eprintln!(
            "harness: restore --at {at}: {} requests, {} acked before that instant, {} of them missing",
            all.len(),
            acked_before.len(),
            pitr_missing_acked
        );
    }
    let lo = (issued - 500).max(1);
    let win = |s: &BTreeSet<i64>| s.range(lo..=issued).count();
    Ok(PointResult {
        issued,
        cv: cv.len(),
        sv: sv.len(),
        pv: pv.len(),
        unsafe_replies,
        window_cv: win(&cv),
        window_sv: win(&sv),
        window_pv: win(&pv),
        cut,
        failover_ms,
        pitr_rows,
        pitr_missing_acked,
    })
}

/// Formats a wall-clock time as RFC 3339 (UTC, microseconds) with `date`.
fn rfc3339(t: std::time::SystemTime) -> Result<String> {
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .context("time before 1970")?;
    let out = sh(&[
        "date",
        "-u",
        "-d",
        &format!("@{}.{:09}", d.as_secs(), d.subsec_nanos()),
        "+%Y-%m-%dT%H:%M:%S.%6NZ",
    ])?;
    Ok(out.trim().to_string())
}

/// Work directory for point `i` of a run.
pub fn point_dir(base: &Path, i: usize) -> PathBuf {
    base.join(format!("point-{i}"))
}
