//! The paper's evaluation (SoCC'11 §6, Figures 9, 13, 14, 15) on one machine,
//! with the same emulated WAN for every variant:
//!
//! - (a) pgbench throughput and latency vs clients: TPC-B at scale 1 (one hot
//!   row) and single-row INSERTs, for `async`, `sync`, `pipelined` (switched at
//!   run time on ONE site through the agent's control socket) and PostgreSQL's
//!   own synchronous streaming replication to a standby across the same WAN;
//! - (b) two-tier response time vs the front tier's computation: naive (only the
//!   database machine outbound-protected) vs joint pipelining, with async and sync;
//! - (c) response time with 1, 2 and 3 protected (writing) tiers, sync vs pipelined;
//! - (d) the disaster views (PV/SV/CV over the last 500 requests) per mode;
//! - (e) the full-state mode on the test guest (issue 22 §3): acknowledged
//!   checkpoints per second, pause p50/p99 and bytes per checkpoint per guest
//!   RAM size and workload, and the guest service's reply latency in
//!   `checkpoint` vs `pipelined` vs `async` at 1 and 16 clients (it builds the
//!   guest with scripts/build-guest.sh first); the demo runs one full-state
//!   disaster of the guest instead.
//!
//! Output: a paper-style table (stdout and `table.txt`), one CSV per figure, SVG
//! plots (PNG copies when `rsvg-convert` is installed), the floors checked, and a
//! final `RESULT ...` line. `figures --replot DIR` re-renders table and plots from
//! the CSVs of an earlier run.
//!
//! This module is the orchestration: the command-line arguments, the [`Plan`]
//! they resolve to, and [`run_plan`], which runs the parts one after the other,
//! keeps what each measured even when a later one fails, and always tears its
//! sites down. Each figure's measurement lives in its own file (`part_a` ..
//! `part_d`); `rig` builds and steers the sites they measure on, `latency`
//! times one client's requests, `report` holds what a run measured and renders
//! it as the table, the CSV files and the `RESULT` line, and `plots` draws it.

mod backup_lat;
mod cpu_wait;
mod hold;
mod latency;
mod netstat;
mod part_a;
mod part_b;
mod part_c;
mod part_d;
mod part_e;
mod plots;
mod report;
mod rig;
mod tails;

use crate::netns::cleanup_prefix;
use crate::pgbench::Workload;
use crate::plot;
use crate::run::ms;
use anyhow::{bail, Context, Result};
use part_a::{part_a, Variant};
use part_b::part_b;
use part_c::part_c;
use part_d::part_d;
use part_e::{part_e, part_e_demo};
use pipecloud_core::topology::Mode;
use report::Figures;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The embedded topologies (the demo needs no arguments).
const SINGLE_DB: &str = include_str!("../../../topology/single-db.toml");
const TWO_TIER: &str = include_str!("../../../topology/two-tier.toml");
const THREE_TIER: &str = include_str!("../../../topology/three-tier.toml");

/// `pipecloud-harness figures`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct FiguresArgs {
    /// Round trip time of the emulated WAN (primary <-> backup).
    #[arg(long, default_value_t = 50)]
    rtt_ms: u64,
    /// Directory for the table, CSV files and plots.
    #[arg(long, default_value = "figures-out")]
    out: PathBuf,
    /// Parts to run (letters of a, b, c, d, e).
    #[arg(long, default_value = "abcde")]
    parts: String,
    /// (a) variants: async, sync, pipelined, pgsync (plain with --no-agent).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "async,sync,pipelined,pgsync"
    )]
    variants: Vec<Variant>,
    /// (a) workloads: tpcb, tpcb-interactive, insert.
    #[arg(long, value_delimiter = ',', default_value = "tpcb,insert")]
    workloads: Vec<Workload>,
    /// (a) client counts.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256"
    )]
    clients: Vec<u32>,
    /// (a) seconds per pgbench point.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// (a) seconds of unmeasured pgbench before each point, in the point's
    /// own pgbench run and connections (0: none).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// (a) runs of each client count from 64 on per variant, interleaved;
    /// the median (by tps) is reported.
    #[arg(long, default_value_t = 3)]
    top_reps: usize,
    /// (b) front-tier computation per request, ms.
    #[arg(long, value_delimiter = ',', default_value = "0,20,40,60,80,100")]
    compute_ms: Vec<u64>,
    /// (b), (c) seconds of one-client requests per point.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// (c) numbers of protected tiers.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    tiers: Vec<usize>,
    /// (c) modes.
    #[arg(long, value_delimiter = ',', default_value = "async,sync,pipelined")]
    tier_modes: Vec<Mode>,
    /// (d) modes, one disaster each.
    #[arg(long, value_delimiter = ',', default_value = "async,sync,pipelined")]
    disaster_modes: Vec<Mode>,
    /// (d) run time before the disaster, ms.
    #[arg(long, default_value_t = 6000)]
    disaster_ms: u64,
    /// (d) client threads.
    #[arg(long, default_value_t = 16)]
    disaster_workers: usize,
    /// (e) guest RAM sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    guest_ram_mib: Vec<u64>,
    /// (e) client connections of the reply-latency points.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    guest_clients: Vec<usize>,
    /// (e) seconds of each checkpoint window.
    #[arg(long, default_value_t = 10)]
    ckpt_secs: u64,
    /// (a) only, without the agent: network + WAN + PostgreSQL on a plain
    /// directory (variants plain and pgsync).
    #[arg(long)]
    no_agent: bool,
    /// (a) same-run A/B: every point runs each variant with this knob off,
    /// then on, interleaved (`wan-rt`: the WAN emulator's thread at real-time
    /// priority); the knob-on points are named `variant+knob`.
    #[arg(long)]
    ab: Option<part_a::Knob>,
    /// Re-render table and plots from the CSV files in this directory; run nothing.
    #[arg(long)]
    replot: Option<PathBuf>,
}

/// `pipecloud-harness demo`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct DemoArgs {
    #[arg(long, default_value_t = 50)]
    rtt_ms: u64,
    /// Directory for the table, CSV files and plots (the only thing left behind).
    #[arg(long, default_value = "/tmp/pipecloud-demo")]
    out: PathBuf,
    /// Seconds per measurement point.
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Seconds of unmeasured pgbench before each point of (a), on the
    /// point's own connections (0: none).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
}

/// What one run does (resolved from [`FiguresArgs`] or [`DemoArgs`]).
#[derive(Clone, Debug)]
struct Plan {
    tag: &'static str,
    rtt: Duration,
    out: PathBuf,
    a: bool,
    b: bool,
    c: bool,
    d: bool,
    variants: Vec<Variant>,
    workloads: Vec<Workload>,
    clients: Vec<u32>,
    secs: u64,
    /// Unmeasured seconds before each point of (a).
    warmup_secs: u64,
    /// Runs of each client count from 64 on per variant (the median is kept).
    top_reps: usize,
    compute_ms: Vec<u64>,
    latency_secs: u64,
    tiers: Vec<usize>,
    tier_modes: Vec<Mode>,
    disaster_modes: Vec<Mode>,
    disaster_ms: u64,
    disaster_workers: usize,
    no_agent: bool,
    ab: Option<part_a::Knob>,
    /// (e): checkpoints and the guest's reply latency.
    e: bool,
    guest_ram_mib: Vec<u64>,
    guest_clients: Vec<usize>,
    ckpt_secs: u64,
    /// The demo's full-state disaster, and how long its client runs before it.
    fullstate_demo: bool,
    fullstate_run: Duration,
}

impl Plan {
    fn from_args(a: &FiguresArgs) -> Result<Plan> {
        for ch in a.parts.chars() {
            if !"abcde,".contains(ch) {
                bail!("--parts takes letters of abcde, got {:?}", a.parts);
            }
        }
        let variants = a.variants.clone();
        Ok(Plan {
            tag: "figures",
            rtt: Duration::from_millis(a.rtt_ms),
            out: a.out.clone(),
            a: a.parts.contains('a'),
            b: a.parts.contains('b') && !a.no_agent,
            c: a.parts.contains('c') && !a.no_agent,
            d: a.parts.contains('d') && !a.no_agent,
            variants,
            workloads: a.workloads.clone(),
            clients: a.clients.clone(),
            secs: a.secs.max(1),
            warmup_secs: a.warmup_secs,
            top_reps: a.top_reps.max(1),
            compute_ms: a.compute_ms.clone(),
            latency_secs: a.latency_secs.max(1),
            tiers: a
                .tiers
                .iter()
                .copied()
                .filter(|k| (1..=3).contains(k))
                .collect(),
            tier_modes: a.tier_modes.clone(),
            disaster_modes: a.disaster_modes.clone(),
            disaster_ms: a.disaster_ms,
            disaster_workers: a.disaster_workers.max(1),
            no_agent: a.no_agent,
            ab: a.ab,
            e: a.parts.contains('e') && !a.no_agent,
            guest_ram_mib: a.guest_ram_mib.clone(),
            guest_clients: a.guest_clients.iter().map(|&c| c.max(1)).collect(),
            ckpt_secs: a.ckpt_secs.max(1),
            fullstate_demo: false,
            fullstate_run: Duration::ZERO,
        })
    }

    /// The demo: a short (a), (c), one pipelined disaster and one full-state
    /// disaster of the test guest.
    fn demo(a: &DemoArgs) -> Plan {
        Plan {
            tag: "demo",
            rtt: Duration::from_millis(a.rtt_ms),
            out: a.out.clone(),
            a: true,
            b: false,
            c: true,
            d: true,
            variants: vec![
                Variant::Async,
                Variant::Sync,
                Variant::Pipelined,
                Variant::PgSync,
            ],
            workloads: vec![Workload::TpcB, Workload::Insert],
            clients: vec![1, 8, 64],
            secs: a.secs.max(1),
            warmup_secs: a.warmup_secs,
            top_reps: 3,
            compute_ms: Vec::new(),
            latency_secs: a.secs.max(1),
            tiers: vec![1, 2, 3],
            tier_modes: vec![Mode::Sync, Mode::Pipelined],
            disaster_modes: vec![Mode::Pipelined],
            disaster_ms: 4000,
            disaster_workers: 16,
            no_agent: false,
            ab: None,
            e: false,
            guest_ram_mib: Vec::new(),
            guest_clients: Vec::new(),
            ckpt_secs: 0,
            fullstate_demo: true,
            fullstate_run: Duration::from_secs(3),
        }
    }
}

/// The 1-, 5- and 15-minute load averages of this machine, and the share of
/// the last 60 s in which some task was stalled on CPU or I/O (Linux PSI).
fn loadavg() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    let psi = |what: &str| -> String {
        std::fs::read_to_string(format!("/proc/pressure/{what}"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("avg60=")))
                    .map(|v| format!("{v}%"))
            })
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{load}; stalled on cpu {} / io {} of the last minute",
        psi("cpu"),
        psi("io")
    )
}

/// The 1-minute load average (printed with every point).
fn loadavg1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// `pipecloud-harness figures`.
pub(crate) fn figures(args: FiguresArgs) -> Result<()> {
    if let Some(dir) = &args.replot {
        let f = Figures::load(dir)?;
        let paths = f.write(dir, plot::png_converter())?;
        print!("{}", f.table());
        for p in paths {
            println!("plot: {}", p.display());
        }
        println!("{}", f.result_line());
        return Ok(());
    }
    crate::sys::ensure_private_mount_ns()?;
    let plan = Plan::from_args(&args)?;
    run_plan(&plan)
}

/// `pipecloud-harness demo`.
pub(crate) fn demo(args: DemoArgs) -> Result<()> {
    crate::sys::ensure_private_mount_ns()?;
    check_tools()?;
    run_plan(&Plan::demo(&args))
}

/// Fails early, naming the missing commands, when the system lacks a tool.
fn check_tools() -> Result<()> {
    let need = [
        "ip",
        "iptables",
        "nsenter",
        "unshare",
        "setpriv",
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fusermount3",
        "pgbench",
        "psql",
        "qemu-system-x86_64",
        "e2fsck",
        "debugfs",
    ];
    let missing: Vec<&str> = need
        .iter()
        .copied()
        .filter(|t| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(std::process::Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        })
        .collect();
    let pg_ok = Path::new(&crate::pg::pg_bin("postgres")).exists();
    if !missing.is_empty() || !pg_ok {
        bail!(
            "missing system tools: {}{} (run scripts/install-deps.sh as root)",
            missing.join(" "),
            if pg_ok {
                ""
            } else {
                " postgres (PostgreSQL 15 server)"
            }
        );
    }
    Ok(())
}

/// Set by SIGINT/SIGTERM: the run stops at the next measurement point and tears
/// its site down (nothing is left behind).
static STOP: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

fn check_interrupted() -> Result<()> {
    if STOP.get().is_some_and(|f| f.load(Ordering::SeqCst)) {
        bail!("interrupted");
    }
    Ok(())
}

fn keep_work() -> bool {
    std::env::var_os("PIPECLOUD_KEEP").is_some()
}

/// Runs every part of `plan`; writes and prints the results even if a part fails.
fn run_plan(plan: &Plan) -> Result<()> {
    let t0 = Instant::now();
    let flag = STOP.get_or_init(|| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    crate::ctrlc_flag(std::sync::Arc::clone(flag));
    let out = if plan.out.is_absolute() {
        plan.out.clone()
    } else {
        std::env::current_dir()?.join(&plan.out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let work = crate::work_dir(plan.tag);
    std::fs::create_dir_all(&work)?;
    let prefix = format!("{}{}", crate::PREFIX, std::process::id());
    let mut fig = Figures {
        target_rtt_ms: ms(plan.rtt),
        ..Figures::default()
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    fig.notes.push(format!(
        "{cores} cores; load average (1/5/15 min) at the start: {}",
        loadavg()
    ));
    let mut failed: Vec<String> = Vec::new();
    type Part = fn(&Plan, &Path, &str, &mut Figures) -> Result<()>;
    let parts: [(bool, &str, Part); 6] = [
        (plan.a, "a", part_a),
        (plan.b, "b", part_b),
        (plan.c, "c", part_c),
        (plan.d, "d", part_d),
        (plan.e, "e", part_e),
        (plan.fullstate_demo, "e: full-state disaster", part_e_demo),
    ];
    for (on, name, f) in parts {
        if !on || check_interrupted().is_err() {
            continue;
        }
        let tp = Instant::now();
        eprintln!("figures: part ({name}) ...");
        if let Err(e) = f(plan, &work, &prefix, &mut fig) {
            eprintln!("figures: part ({name}) FAILED: {e:#}");
            failed.push(format!(
                "({name}): {}",
                format!("{e:#}").lines().next().unwrap_or("")
            ));
        }
        eprintln!(
            "figures: part ({name}) took {:.0} s",
            tp.elapsed().as_secs_f64()
        );
        // Keep what we have on disk after every part.
        let _ = fig.write(&out, false);
    }
    cleanup_prefix(&prefix);
    if !keep_work() {
        let _ = std::fs::remove_dir_all(&work);
    }
    fig.notes.push(format!(
        "load average (1/5/15 min) at the end: {}",
        loadavg()
    ));
    let paths = fig.write(&out, plot::png_converter())?;
    println!();
    print!("{}", fig.table());
    println!("\nresults: {}", out.display());
    for p in &paths {
        println!("plot: {}", p.display());
    }
    println!(
        "elapsed: {:.0} s (work dir {} {})",
        t0.elapsed().as_secs_f64(),
        work.display(),
        if keep_work() { "kept" } else { "removed" }
    );
    check_interrupted()?;
    if !failed.is_empty() {
        bail!("{} part(s) failed: {}", failed.len(), failed.join("; "));
    }
    println!("{}", fig.result_line());
    Ok(())
}
