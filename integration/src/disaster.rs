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
//!
//! A point that saw nothing proves nothing: CV ⊆ SV holds trivially when the
//! client received no reply, and a point-in-time restore misses no acknowledged
//! request when none was acknowledged before its instant. So every point must
//! also have a non-empty client view, and, with `--pitr`, a restore instant
//! after at least one acknowledged request ([`PointResult::failures`]).

use crate::client::{self, Recorder, Target};
use crate::netns::spawn_in;
use crate::pg::{chown_postgres, Postgres};
use crate::run::{Site, SiteOptions, PG_PORT};
use crate::site::MountedImage;
use crate::sys::sh;
use anyhow::{Context, Result};
use pipecloud_core::topology::Mode;
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
    /// Point-in-time restore at the middle of the run: its instant (RFC 3339;
    /// empty if not run).
    pub pitr_at: String,
    /// Rows the restore recovered (0 if not run).
    pub pitr_rows: usize,
    /// Replies the client received before that instant: what the restore must hold.
    pub pitr_acked_before: usize,
    /// Replies acknowledged before that instant that the restore lacks (must be 0
    /// in sync/pipelined).
    pub pitr_missing_acked: usize,
}

/// What a disaster run checks at each point (from its command line).
#[derive(Clone, Copy, Debug)]
pub struct Check {
    pub mode: Mode,
    /// A point-in-time restore was made at each point.
    pub pitr: bool,
}

impl Check {
    /// Modes that promise zero client RPO: no unsafe reply, no acknowledged
    /// request missing from a restore.
    pub fn safe_mode(&self) -> bool {
        matches!(self.mode, Mode::Sync | Mode::Pipelined)
    }
}

impl PointResult {
    /// Why this point fails `check`: the guarantee was broken, or the point saw
    /// too little to show anything (it must not count as passed). Empty when
    /// the point passes.
    pub fn failures(&self, check: &Check) -> Vec<String> {
        let mut why = Vec::new();
        if self.cv == 0 {
            why.push(format!(
                "the client received no reply before the disaster ({} requests issued): \
                 an empty client view proves nothing",
                self.issued
            ));
        }
        if check.safe_mode() && self.unsafe_replies > 0 {
            why.push(format!(
                "{} unsafe replies in mode {}: client view ⊄ secondary view",
                self.unsafe_replies, check.mode
            ));
        }
        if check.pitr {
            if self.pitr_acked_before == 0 {
                why.push(format!(
                    "no request was acknowledged before the restore instant {}: \
                     the point-in-time check proves nothing",
                    self.pitr_at
                ));
            }
            if check.safe_mode() && self.pitr_missing_acked > 0 {
                why.push(format!(
                    "the point-in-time restore at {} lacks {} of the {} requests \
                     acknowledged before that instant",
                    self.pitr_at, self.pitr_missing_acked, self.pitr_acked_before
                ));
            }
        }
        why
    }
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
    // Protection starts when the set-up (file systems, databases) is durable
    // at the backup; a disaster before that may rightly fail over to images
    // without them (seen under load: the cut held only mkfs's writes).
    site.wait_replicated(Duration::from_secs(180))
        .context("the set-up's writes to reach the backup before the load")?;
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
    let (mut pitr_at, mut pitr_rows, mut pitr_acked_before, mut pitr_missing_acked) =
        (String::new(), 0, 0, 0);
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
        pitr_acked_before = acked_before.len();
        pitr_missing_acked = acked_before.difference(&all).count();
        eprintln!(
            "harness: restore --at {at}: {} requests, {} acked before that instant, {} of them missing",
            all.len(),
            acked_before.len(),
            pitr_missing_acked
        );
        pitr_at = at;
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
        pitr_at,
        pitr_rows,
        pitr_acked_before,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A point that saw replies, all safe, with a restore that holds them.
    fn good() -> PointResult {
        PointResult {
            issued: 120,
            cv: 100,
            sv: 110,
            pv: 115,
            pitr_at: "2026-12-07T13:00:00.000000Z".into(),
            pitr_rows: 60,
            pitr_acked_before: 50,
            ..PointResult::default()
        }
    }

    fn check(mode: Mode, pitr: bool) -> Check {
        Check { mode, pitr }
    }

    #[test]
    fn a_point_that_saw_replies_and_kept_them_passes() {
        for mode in [Mode::Sync, Mode::Pipelined, Mode::Async] {
            for pitr in [false, true] {
                assert!(good().failures(&check(mode, pitr)).is_empty());
            }
        }
    }

    #[test]
    fn an_empty_client_view_fails_in_every_mode() {
        let r = PointResult {
            cv: 0,
            sv: 0,
            ..good()
        };
        for mode in [Mode::Sync, Mode::Pipelined, Mode::Async] {
            let why = r.failures(&check(mode, false));
            assert_eq!(why.len(), 1, "{why:?}");
            assert!(why[0].contains("no reply"), "{why:?}");
        }
    }

    #[test]
    fn unsafe_replies_fail_only_the_safe_modes() {
        let r = PointResult {
            unsafe_replies: 3,
            ..good()
        };
        assert!(r.failures(&check(Mode::Async, true)).is_empty());
        for mode in [Mode::Sync, Mode::Pipelined] {
            let why = r.failures(&check(mode, false));
            assert_eq!(why.len(), 1, "{why:?}");
            assert!(why[0].contains("3 unsafe replies"), "{why:?}");
        }
    }

    #[test]
    fn a_restore_before_any_ack_fails() {
        let r = PointResult {
            pitr_rows: 0,
            pitr_acked_before: 0,
            ..good()
        };
        for mode in [Mode::Sync, Mode::Pipelined, Mode::Async] {
            let why = r.failures(&check(mode, true));
            assert_eq!(why.len(), 1, "{why:?}");
            assert!(why[0].contains("proves nothing"), "{why:?}");
            // Without --pitr no restore was made: nothing to judge.
            assert!(r.failures(&check(mode, false)).is_empty());
        }
    }

    #[test]
    fn a_restore_missing_acked_requests_fails_the_safe_modes() {
        let r = PointResult {
            pitr_missing_acked: 2,
            ..good()
        };
        assert!(r.failures(&check(Mode::Async, true)).is_empty());
        for mode in [Mode::Sync, Mode::Pipelined] {
            let why = r.failures(&check(mode, true));
            assert_eq!(why.len(), 1, "{why:?}");
            assert!(why[0].contains("lacks 2 of the 50"), "{why:?}");
        }
    }
}
