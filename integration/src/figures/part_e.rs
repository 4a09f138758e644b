//! Figure (e): the full-state mode (issue 22 §3), on the test guest behind the
//! same emulated WAN as the other parts.
//!
//! - **Checkpoints.** For each guest RAM size (128 and 256 MiB: the stock
//!   Debian cloud kernel of the test guest does not boot in 64 MiB, it stops
//!   after "Probing EDD" while it decompresses) and two workloads inside the
//!   guest, one boot with the agent in `checkpoint` mode: `light` is the idle
//!   counter service, `heavy` adds the service's memory-writing thread
//!   ([`HEAVY`]). After the first acknowledged epochs and a settling time, two
//!   `ctl status` epochs lines `--ckpt-secs` apart give the acknowledged
//!   checkpoints per second; the later one gives the pause p50/p99 over the
//!   latest pauses (at most 500: 10 s at the 20 ms interval) and the mean dirty
//!   pages copied per pause (the raw bytes of a checkpoint). When the agent
//!   reports `raw_bytes=` and `shipped_bytes=` (checkpoint compression), the
//!   bytes per checkpoint raw and shipped come from their growth over the window
//!   instead; without them the shipped column is `na`, never a guess.
//! - **Reply latency.** The guest's counter service (every request: counter,
//!   log line, `fdatasync`, reply) at 1 and 16 client connections, each client
//!   sending its next request when the reply arrives: in `checkpoint` on the
//!   256 MiB light boot (after its checkpoint window), then in `pipelined` and
//!   `async` on one more boot, switched at run time through `ctl mode` and
//!   interleaved point by point.
//!
//! The points land in [`Figures`] (`fig_e_ckpt.csv`, `fig_e_latency.csv`).
//! `part_e_demo` is the demo's full-state segment: one full-state disaster
//! (`crate::fullstate`), with the last counter value the client saw before it
//! and the first after.

use super::latency::LatStats;
use super::report::{rtt_row, ECkpt, ELat, Figures};
use super::{check_interrupted, keep_work, loadavg1, Plan};
use crate::fullstate::{self, status_field, GuestOptions, GuestSite};
use crate::netns::spawn_in;
use crate::sys::wait_until;
use anyhow::{anyhow, bail, Context, Result};
use pipecloud_core::topology::Mode;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// The heavy workload: the guest service rewrites one byte of each of 12,800
/// pages a second over a 16 MiB buffer (about 256 pages, 1 MiB, per 20 ms
/// epoch; `pipecloud.dirty=16:12800`).
pub(super) const HEAVY: (u64, u64) = (16, 12_800);
/// Time after the first acknowledged epoch before a window starts (the first
/// epoch ships the whole RAM).
const SETTLE: Duration = Duration::from_secs(3);
/// Longest wait for the guest's service to answer after a boot.
const BOOT_PATIENCE: Duration = Duration::from_secs(180);
const PAGE: f64 = 4096.0;

/// The guest workloads of the checkpoint points.
const LOADS: [(&str, Option<(u64, u64)>); 2] = [("light", None), ("heavy", Some(HEAVY))];

/// (e) checkpoints per RAM size and workload; reply latency per mode and clients.
pub(super) fn part_e(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    let topo = fullstate::guest_topology()?;
    let opts = |mode: Mode, ram: u64, dirty: Option<(u64, u64)>| GuestOptions {
        mode,
        ram_mib: Some(ram),
        dirty,
        rtt: Some(plan.rtt),
        fault: None,
        preload_shim: false,
    };
    for &ram in &plan.guest_ram_mib {
        for (load, dirty) in LOADS {
            check_interrupted()?;
            let dir = work.join(format!("e-{ram}-{load}"));
            let site = GuestSite::up(&topo, &dir, prefix, &opts(Mode::Checkpoint, ram, dirty))
                .with_context(|| format!("full-state site, {ram} MiB {load}"))?;
            record_rtt(fig, &site, &format!("(e) guest {ram} MiB {load}"), plan);
            wait_service(&site)?;
            let p = checkpoint_point(&site, ram, load, plan.ckpt_secs)?;
            eprintln!(
                "figures: (e) {ram:>4} MiB {load:<5}: {:.1} acked checkpoints/s, pause p50 {:.2} p99 {:.2} ms over {} pauses, raw {:.0} B/ckpt, shipped {} B/ckpt (load {})",
                p.ckpt_per_s,
                p.pause_p50_ms,
                p.pause_p99_ms,
                p.pauses,
                p.raw_bytes,
                p.shipped_bytes.map_or_else(|| "na".into(), |b| format!("{b:.0}")),
                p.load_avg
            );
            fig.e_ckpt.push(p);
            if ram == plan.guest_ram_mib.iter().copied().max().unwrap_or(ram) && dirty.is_none() {
                for &c in &plan.guest_clients {
                    check_interrupted()?;
                    fig.e_lat
                        .push(latency_point(&site, Mode::Checkpoint, c, plan)?);
                }
            }
            drop(site);
            if !keep_work() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    // Disk-only modes: one boot, switched at run time, interleaved.
    check_interrupted()?;
    let ram = plan.guest_ram_mib.iter().copied().max().unwrap_or(256);
    let dir = work.join("e-disk-only");
    let site = GuestSite::up(&topo, &dir, prefix, &opts(Mode::Pipelined, ram, None))
        .context("disk-only guest site")?;
    record_rtt(fig, &site, &format!("(e) guest {ram} MiB pipelined"), plan);
    wait_service(&site)?;
    for &c in &plan.guest_clients {
        for mode in [Mode::Pipelined, Mode::Async] {
            check_interrupted()?;
            site.set_mode(mode)?;
            std::thread::sleep(Duration::from_secs(1));
            fig.e_lat.push(latency_point(&site, mode, c, plan)?);
        }
    }
    drop(site);
    if !keep_work() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The run-time switch under client load (issue 22 §3, docs/design.md §13):
    // pipelined → checkpoint → pipelined on one boot, same WAN.
    check_interrupted()?;
    let dir = work.join("e-switch");
    let sw = crate::switch::load(
        &topo,
        &dir,
        prefix,
        SWITCH_CLIENTS,
        SWITCH_HOLD,
        &work.join("e-switch.csv"),
        Some(plan.rtt),
    )
    .context("the run-time switch under load")?;
    eprintln!(
        "figures: (e) run-time switch under {SWITCH_CLIENTS} clients: {} connections broken",
        sw.drops
    );
    fig.e_switch = Some(sw);
    if !keep_work() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Client connections and time in each mode of the switch timeline.
const SWITCH_CLIENTS: usize = 4;
const SWITCH_HOLD: Duration = Duration::from_secs(8);

fn record_rtt(fig: &mut Figures, site: &GuestSite, name: &str, plan: &Plan) {
    if let Some(r) = &site.rtt {
        fig.rtt.push(rtt_row(name, plan.rtt, r));
    }
}

/// Waits until the guest's service answers one request (its boot, and in
/// `checkpoint` mode the first acknowledged epochs, come first).
fn wait_service(site: &GuestSite) -> Result<()> {
    let target = site.target;
    spawn_in(&site.client_ns.name, move || {
        let t0 = Instant::now();
        loop {
            check_interrupted()?;
            match Conn::open(target).and_then(|mut c| c.request()) {
                Ok(_) => return Ok(()),
                Err(e) if t0.elapsed() > BOOT_PATIENCE => {
                    return Err(e.context("the guest's service never answered"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    })
    .join()
    .map_err(|_| anyhow!("the client thread panicked"))?
}

/// A number after `key` in a status line (`pause_p50_ms=1.28`).
fn status_f64(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

/// One checkpoint point: two epochs lines `secs` apart on an idle client.
fn checkpoint_point(site: &GuestSite, ram: u64, load: &str, secs: u64) -> Result<ECkpt> {
    wait_until(BOOT_PATIENCE, "the first acknowledged epoch", || {
        status_field(&site.epochs_status(), " acked=").is_some_and(|a| a > 0)
    })?;
    std::thread::sleep(SETTLE);
    let (s0, t0) = (site.epochs_status(), Instant::now());
    std::thread::sleep(Duration::from_secs(secs.max(1)));
    let s1 = site.epochs_status();
    let dt = t0.elapsed().as_secs_f64();
    let field = |s: &str, k: &str| {
        status_field(s, k).with_context(|| format!("no {k:?} in the agent's status line {s:?}"))
    };
    if s1.contains("ALARM") {
        bail!("the agent raised an alarm: {s1}");
    }
    let acked = field(&s1, " acked=")?.saturating_sub(field(&s0, " acked=")?);
    let shipped = field(&s1, " shipped=")?.saturating_sub(field(&s0, " shipped=")?);
    let f = |k: &str| {
        status_f64(&s1, k).with_context(|| format!("no {k:?} in the agent's status line {s1:?}"))
    };
    // Raw and shipped bytes from the agent's counters when it has them (the
    // compression's), else raw from the pages copied per pause.
    let grew = |k: &str| Some(status_field(&s1, k)?.saturating_sub(status_field(&s0, k)?));
    let per_ckpt = |b: u64| (shipped > 0).then(|| b as f64 / shipped as f64);
    let (raw, shipped_bytes) = match (grew(" raw_bytes="), grew(" shipped_bytes=")) {
        (Some(r), Some(s)) => (per_ckpt(r), per_ckpt(s)),
        _ => (Some(f(" pages_per_pause=")? * PAGE), None),
    };
    Ok(ECkpt {
        ram_mib: ram,
        load: load.to_string(),
        secs: dt,
        ckpt_per_s: acked as f64 / dt,
        pauses: field(&s1, " recent_pauses=")?,
        pause_p50_ms: f(" pause_p50_ms=")?,
        pause_p99_ms: f(" pause_p99_ms=")?,
        raw_bytes: raw.unwrap_or(f64::NAN),
        shipped_bytes,
        load_avg: loadavg1(),
    })
}

/// One client connection to the counter service.
struct Conn {
    out: TcpStream,
    reader: BufReader<TcpStream>,
    line: String,
}

impl Conn {
    fn open(target: SocketAddr) -> Result<Conn> {
        let s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            out: s.try_clone()?,
            reader: BufReader::new(s),
            line: String::new(),
        })
    }

    /// One request; the counter value of its reply.
    fn request(&mut self) -> Result<u64> {
        self.out.write_all(b"figure\n")?;
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            bail!("the service closed the connection");
        }
        self.line
            .trim()
            .parse()
            .with_context(|| format!("reply {:?}", self.line))
    }
}

/// `clients` connections, each sending its next request when the reply
/// arrived, for `plan.latency_secs` (after two warm-up requests each).
fn latency_point(site: &GuestSite, mode: Mode, clients: usize, plan: &Plan) -> Result<ELat> {
    let target = site.target;
    let secs = plan.latency_secs;
    let start = Instant::now() + Duration::from_millis(500);
    let end = start + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            spawn_in(&site.client_ns.name, move || -> Result<Vec<Duration>> {
                let mut c = Conn::open(target)?;
                for _ in 0..2 {
                    c.request()?;
                }
                std::thread::sleep(start.saturating_duration_since(Instant::now()));
                let mut v = Vec::new();
                while Instant::now() < end && v.len() < 1_000_000 {
                    let t0 = Instant::now();
                    c.request()?;
                    v.push(t0.elapsed());
                }
                Ok(v)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow!("a client thread panicked"))?
                .with_context(|| format!("{mode} with {clients} clients"))?,
        );
    }
    let lat = LatStats::of(all);
    let p = ELat {
        mode: mode.as_str().to_string(),
        clients,
        rps: lat.n as f64 / secs as f64,
        lat,
        load_avg: loadavg1(),
    };
    eprintln!(
        "figures: (e) reply latency {:<10} {:>2} clients: p50 {:.2} p99 {:.2} ms, {:.1} requests/s (n={}, load {})",
        p.mode, clients, lat.p50_ms, lat.p99_ms, p.rps, lat.n, p.load_avg
    );
    Ok(p)
}

/// The demo's full-state segment: one disaster of the guest (no WAN delay, as
/// `disaster --mode checkpoint`), the client's one connection continuing.
pub(super) fn part_e_demo(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    let topo = fullstate::guest_topology()?;
    let dir = work.join("e-disaster");
    let r = fullstate::run_point(&topo, &dir, prefix, plan.fullstate_run, None)?;
    let line = format!(
        "full-state disaster: one connection, {} replies before and {} after; last counter before {}, first after {}; connection {}; failover {} ms, vm restore {} ms",
        r.replies_before,
        r.replies_after,
        r.last_before.map_or_else(|| "-".into(), |v| v.to_string()),
        r.first_after.map_or_else(|| "-".into(), |v| v.to_string()),
        if r.survived { "kept" } else { "BROKEN" },
        r.failover_ms,
        r.restore_ms
    );
    eprintln!("figures: (e) {line}");
    fig.notes.push(line);
    if !keep_work() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let why = r.failures();
    if !why.is_empty() {
        bail!("the full-state disaster: {}", why.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_numbers_are_read_by_key() {
        let l = "epochs guest: open=9 shipped=8 acked=7 pauses=9 stalled=0 last_pause=1.20ms/3pages recent_pauses=8 pause_p50_ms=1.25 pause_p99_ms=4.00 pages_per_pause=12.5";
        assert_eq!(status_f64(l, " pause_p50_ms="), Some(1.25));
        assert_eq!(status_f64(l, " pages_per_pause="), Some(12.5));
        assert_eq!(status_field(l, " shipped="), Some(8));
        assert_eq!(status_field(l, " shipped_bytes="), None);
    }
}
