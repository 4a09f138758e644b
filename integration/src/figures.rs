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
//! - (d) the disaster views (PV/SV/CV over the last 500 requests) per mode.
//!
//! Output: a paper-style table (stdout and `table.txt`), one CSV per figure, SVG
//! plots (PNG copies when `rsvg-convert` is installed), the floors checked, and a
//! final `RESULT ...` line. `figures --replot DIR` re-renders table and plots from
//! the CSVs of an earlier run.

use crate::app::HttpClient;
use crate::client::percentile;
use crate::disaster::{self, PointResult};
use crate::netns::{cleanup_prefix, spawn_in};
use crate::pg::{initdb, Postgres};
use crate::pgbench::{self, Endpoint, PgbenchResult, Workload};
use crate::plot::{self, BarChart, LineChart, Scale, Series};
use crate::run::{bin, ms, Site, SiteOptions, PG_PORT, TIER_PORT};
use crate::site::{host_lan_ip, render_topology, Network, BACKUP_IP};
use crate::standby::{StandbyPlan, SyncStandby};
use crate::sys::{ns_cmd, wait_until, Guarded};
use crate::wan::{start_calibrated, RttReport, WanDelay};
use anyhow::{anyhow, bail, Context, Result};
use pipecloud_core::topology::{Mode, Topology};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// The embedded topologies (the demo needs no arguments).
pub const SINGLE_DB: &str = include_str!("../../topology/single-db.toml");
pub const TWO_TIER: &str = include_str!("../../topology/two-tier.toml");
pub const THREE_TIER: &str = include_str!("../../topology/three-tier.toml");

/// A replication variant of figure (a).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    Async,
    Sync,
    Pipelined,
    /// PostgreSQL's synchronous streaming replication to a standby across the WAN.
    PgSync,
    /// PostgreSQL on a plain directory, no replication (only with `--no-agent`).
    Plain,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::Async,
        Variant::Sync,
        Variant::Pipelined,
        Variant::PgSync,
        Variant::Plain,
    ];

    /// Name in tables, CSV files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Async => "async",
            Variant::Sync => "sync",
            Variant::Pipelined => "pipelined",
            Variant::PgSync => "pg-sync-standby",
            Variant::Plain => "no-replication",
        }
    }

    fn mode(self) -> Option<Mode> {
        match self {
            Variant::Async => Some(Mode::Async),
            Variant::Sync => Some(Mode::Sync),
            Variant::Pipelined => Some(Mode::Pipelined),
            Variant::PgSync | Variant::Plain => None,
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "pgsync" | "pg-sync" => Ok(Variant::PgSync),
            "plain" => Ok(Variant::Plain),
            t => Variant::ALL
                .into_iter()
                .find(|v| v.as_str() == t)
                .ok_or_else(|| {
                    format!(
                        "unknown variant {s:?} (expected async, sync, pipelined, pgsync or plain)"
                    )
                }),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `pipecloud-harness figures`.
#[derive(clap::Args, Clone, Debug)]
pub struct FiguresArgs {
    /// Round trip time of the emulated WAN (primary <-> backup).
    #[arg(long, default_value_t = 50)]
    pub rtt_ms: u64,
    /// Directory for the table, CSV files and plots.
    #[arg(long, default_value = "figures-out")]
    pub out: PathBuf,
    /// Parts to run (letters of a, b, c, d).
    #[arg(long, default_value = "abcd")]
    pub parts: String,
    /// (a) variants: async, sync, pipelined, pgsync (plain with --no-agent).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "async,sync,pipelined,pgsync"
    )]
    pub variants: Vec<Variant>,
    /// (a) workloads: tpcb, tpcb-interactive, insert.
    #[arg(long, value_delimiter = ',', default_value = "tpcb,insert")]
    pub workloads: Vec<Workload>,
    /// (a) client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub clients: Vec<u32>,
    /// (a) seconds per pgbench point.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// (a) runs of the largest client count per variant, interleaved; the
    /// median (by tps) is reported.
    #[arg(long, default_value_t = 3)]
    pub top_reps: usize,
    /// (b) front-tier computation per request, ms.
    #[arg(long, value_delimiter = ',', default_value = "0,20,40,60,80,100")]
    pub compute_ms: Vec<u64>,
    /// (b), (c) seconds of one-client requests per point.
    #[arg(long, default_value_t = 5)]
    pub latency_secs: u64,
    /// (c) numbers of protected tiers.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub tiers: Vec<usize>,
    /// (c) modes.
    #[arg(long, value_delimiter = ',', default_value = "async,sync,pipelined")]
    pub tier_modes: Vec<Mode>,
    /// (d) modes, one disaster each.
    #[arg(long, value_delimiter = ',', default_value = "async,sync,pipelined")]
    pub disaster_modes: Vec<Mode>,
    /// (d) run time before the disaster, ms.
    #[arg(long, default_value_t = 6000)]
    pub disaster_ms: u64,
    /// (d) client threads.
    #[arg(long, default_value_t = 16)]
    pub disaster_workers: usize,
    /// (a) only, without the agent: network + WAN + PostgreSQL on a plain
    /// directory (variants plain and pgsync).
    #[arg(long)]
    pub no_agent: bool,
    /// Re-render table and plots from the CSV files in this directory; run nothing.
    #[arg(long)]
    pub replot: Option<PathBuf>,
}

/// `pipecloud-harness demo`.
#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 50)]
    pub rtt_ms: u64,
    /// Directory for the table, CSV files and plots (the only thing left behind).
    #[arg(long, default_value = "/tmp/pipecloud-demo")]
    pub out: PathBuf,
    /// Seconds per measurement point.
    #[arg(long, default_value_t = 3)]
    pub secs: u64,
}

/// What one run does (resolved from [`FiguresArgs`] or [`DemoArgs`]).
#[derive(Clone, Debug)]
pub struct Plan {
    pub tag: &'static str,
    pub rtt: Duration,
    pub out: PathBuf,
    pub a: bool,
    pub b: bool,
    pub c: bool,
    pub d: bool,
    pub variants: Vec<Variant>,
    pub workloads: Vec<Workload>,
    pub clients: Vec<u32>,
    pub secs: u64,
    /// Runs of the largest client count per variant (the median is kept).
    pub top_reps: usize,
    pub compute_ms: Vec<u64>,
    pub latency_secs: u64,
    pub tiers: Vec<usize>,
    pub tier_modes: Vec<Mode>,
    pub disaster_modes: Vec<Mode>,
    pub disaster_ms: u64,
    pub disaster_workers: usize,
    pub no_agent: bool,
}

impl Plan {
    fn from_args(a: &FiguresArgs) -> Result<Plan> {
        for ch in a.parts.chars() {
            if !"abcd,".contains(ch) {
                bail!("--parts takes letters of abcd, got {:?}", a.parts);
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
        })
    }

    /// The demo: a short (a), (c) and one pipelined disaster.
    pub fn demo(a: &DemoArgs) -> Plan {
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
            top_reps: 3,
            compute_ms: Vec::new(),
            latency_secs: a.secs.max(1),
            tiers: vec![1, 2, 3],
            tier_modes: vec![Mode::Sync, Mode::Pipelined],
            disaster_modes: vec![Mode::Pipelined],
            disaster_ms: 4000,
            disaster_workers: 16,
            no_agent: false,
        }
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// Latency summary of one-client request/response measurements.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatStats {
    pub n: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl LatStats {
    /// Summarises raw latencies.
    pub fn of(mut v: Vec<Duration>) -> LatStats {
        v.sort_unstable();
        LatStats {
            n: v.len(),
            mean_ms: ms(crate::client::mean(&v)),
            p50_ms: ms(percentile(&v, 0.5)),
            p99_ms: ms(percentile(&v, 0.99)),
        }
    }
}

/// Measured RTT of one site.
#[derive(Clone, Debug, PartialEq)]
pub struct RttRow {
    pub site: String,
    pub target_ms: f64,
    pub median_ms: f64,
    pub mean_ms: f64,
    pub p99_ms: f64,
}

/// One point of figure (a).
#[derive(Clone, Debug, PartialEq)]
pub struct APoint {
    pub variant: String,
    pub workload: String,
    pub clients: u32,
    pub r: PgbenchResult,
}

/// One point of figure (b).
#[derive(Clone, Debug, PartialEq)]
pub struct BPoint {
    pub variant: String,
    pub compute_ms: u64,
    pub lat: LatStats,
}

/// One point of figure (c).
#[derive(Clone, Debug, PartialEq)]
pub struct CPoint {
    pub tiers: usize,
    pub mode: String,
    pub lat: LatStats,
}

/// One disaster of figure (d).
#[derive(Clone, Debug, PartialEq)]
pub struct DPoint {
    pub mode: String,
    pub issued: i64,
    pub cv: usize,
    pub sv: usize,
    pub pv: usize,
    pub unsafe_replies: usize,
    pub window_cv: usize,
    pub window_sv: usize,
    pub window_pv: usize,
    pub failover_ms: u64,
}

impl DPoint {
    fn of(mode: Mode, r: &PointResult) -> DPoint {
        DPoint {
            mode: mode.as_str().to_string(),
            issued: r.issued,
            cv: r.cv,
            sv: r.sv,
            pv: r.pv,
            unsafe_replies: r.unsafe_replies,
            window_cv: r.window_cv,
            window_sv: r.window_sv,
            window_pv: r.window_pv,
            failover_ms: r.failover_ms,
        }
    }
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub target_rtt_ms: f64,
    pub rtt: Vec<RttRow>,
    pub a: Vec<APoint>,
    pub b: Vec<BPoint>,
    pub c: Vec<CPoint>,
    pub d: Vec<DPoint>,
    /// Context of the run (machine load), printed under the table.
    pub notes: Vec<String>,
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

/// Order of variants in tables and legends.
const A_ORDER: [&str; 5] = [
    "async",
    "sync",
    "pipelined",
    "pg-sync-standby",
    "no-replication",
];
const B_ORDER: [&str; 4] = ["async", "sync", "naive-pipelined", "pipelined"];
const MODE_ORDER: [&str; 3] = ["async", "sync", "pipelined"];

fn ordered<'a>(present: impl Iterator<Item = &'a str>, order: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for p in present {
        if !v.iter().any(|x| x == p) {
            v.push(p.to_string());
        }
    }
    v.sort_by_key(|x| order.iter().position(|o| o == x).unwrap_or(order.len()));
    v
}

fn f2(v: Option<f64>) -> String {
    v.map_or_else(|| "na".to_string(), |v| format!("{v:.2}"))
}

/// One floor of the issue, checked on the measured figures.
#[derive(Clone, Debug)]
pub struct Floor {
    pub what: String,
    pub value: Option<f64>,
    pub bound: String,
    pub ok: Option<bool>,
}

impl Figures {
    /// Measured RTT (median) of the first site, else the target.
    pub fn rtt_ms(&self) -> f64 {
        self.rtt.first().map_or(self.target_rtt_ms, |r| r.median_ms)
    }

    fn a_point(&self, variant: &str, workload: &str, clients: u32) -> Option<&APoint> {
        self.a
            .iter()
            .find(|p| p.variant == variant && p.workload == workload && p.clients == clients)
    }

    fn tps(&self, variant: &str, workload: &str, clients: u32) -> Option<f64> {
        self.a_point(variant, workload, clients).map(|p| p.r.tps)
    }

    fn ratio(&self, a: &str, b: &str) -> Option<f64> {
        let x = self.tps(a, "tpcb", 64)?;
        let y = self.tps(b, "tpcb", 64)?;
        (y > 0.0).then(|| x / y)
    }

    fn c_median(&self, tiers: usize, mode: &str) -> Option<f64> {
        self.c
            .iter()
            .find(|p| p.tiers == tiers && p.mode == mode)
            .map(|p| p.lat.p50_ms)
    }

    /// The floors at this RTT.
    pub fn floors(&self) -> Vec<Floor> {
        let rtt = self.rtt_ms();
        let mut v = Vec::new();
        let mut ge = |what: &str, value: Option<f64>, min: f64| {
            v.push(Floor {
                what: what.to_string(),
                value,
                bound: format!(">= {min}"),
                ok: value.map(|x| x >= min),
            });
        };
        ge(
            "TPC-B 64 clients: pipelined / sync (tps)",
            self.ratio("pipelined", "sync"),
            15.0,
        );
        ge(
            "TPC-B 64 clients: pipelined / async (tps)",
            self.ratio("pipelined", "async"),
            0.85,
        );
        ge(
            "TPC-B 64 clients: pipelined / pg-sync-standby (tps)",
            self.ratio("pipelined", "pg-sync-standby"),
            10.0,
        );
        let one = self
            .a_point("pipelined", "insert", 1)
            .map(|p| p.r.latency_ms);
        v.push(Floor {
            what: "one client's pipelined INSERT reply (ms)".into(),
            value: one,
            bound: format!("<= RTT + 5 = {:.1}", rtt + 5.0),
            ok: one.map(|x| x <= rtt + 5.0),
        });
        let t1 = self.c_median(1, "pipelined");
        let t3 = self.c_median(3, "pipelined");
        v.push(Floor {
            what: "3 protected tiers, pipelined, median (ms)".into(),
            value: t3,
            bound: "<= 60".into(),
            ok: t3.map(|x| x <= 60.0),
        });
        let d = t3.zip(t1).map(|(a, b)| a - b);
        v.push(Floor {
            what: "3 tiers minus 1 tier, pipelined, medians (ms)".into(),
            value: d,
            bound: "<= 10".into(),
            ok: d.map(|x| x <= 10.0),
        });
        let s1 = self.c_median(1, "sync");
        let s3 = self.c_median(3, "sync");
        let per = s3.zip(s1).map(|(a, b)| (a - b) / 2.0 / rtt);
        v.push(Floor {
            what: "sync growth per protected tier, medians (RTTs)".into(),
            value: per,
            bound: "about 1 (0.8 .. 1.5)".into(),
            ok: per.map(|x| (0.8..=1.5).contains(&x)),
        });
        v
    }

    /// The contract's last line.
    pub fn result_line(&self) -> String {
        format!(
            "RESULT rtt_ms={:.2} tpcb64_pipelined_over_sync={} tpcb64_pipelined_over_async={} tpcb64_pipelined_over_pgsync={} tier1_ms={} tier3_ms={} tier3_sync_ms={}",
            self.rtt_ms(),
            f2(self.ratio("pipelined", "sync")),
            f2(self.ratio("pipelined", "async")),
            f2(self.ratio("pipelined", "pg-sync-standby")),
            f2(self.c_median(1, "pipelined")),
            f2(self.c_median(3, "pipelined")),
            f2(self.c_median(3, "sync")),
        )
    }

    /// The paper-style table (also written to `table.txt`).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== Emulated WAN (application-level TCP round trip, primary host <-> backup)"
        );
        let _ = writeln!(
            s,
            "{:<28} {:>9} {:>9} {:>9} {:>9}",
            "site", "target", "median", "mean", "p99"
        );
        for r in &self.rtt {
            let _ = writeln!(
                s,
                "{:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                r.site, r.target_ms, r.median_ms, r.mean_ms, r.p99_ms
            );
        }
        if !self.a.is_empty() {
            let variants = ordered(self.a.iter().map(|p| p.variant.as_str()), &A_ORDER);
            let workloads = ordered(
                self.a.iter().map(|p| p.workload.as_str()),
                &["tpcb", "tpcb-interactive", "insert"],
            );
            let _ = writeln!(
                s,
                "\n== (a) pgbench on one PostgreSQL (scale 1): throughput tps / mean latency ms"
            );
            let mut head = format!("{:<17} {:>7}", "workload", "clients");
            for v in &variants {
                let _ = write!(head, " {:>22}", v);
            }
            let _ = writeln!(s, "{head}");
            for w in &workloads {
                let mut clients: Vec<u32> = self
                    .a
                    .iter()
                    .filter(|p| &p.workload == w)
                    .map(|p| p.clients)
                    .collect();
                clients.sort_unstable();
                clients.dedup();
                for c in clients {
                    let mut line = format!("{:<17} {:>7}", w, c);
                    for v in &variants {
                        let cell = self.a_point(v, w, c).map_or_else(
                            || "-".to_string(),
                            |p| format!("{:.1} / {:.1}", p.r.tps, p.r.latency_ms),
                        );
                        let _ = write!(line, " {:>22}", cell);
                    }
                    let _ = writeln!(s, "{line}");
                }
            }
        }
        if !self.b.is_empty() {
            let variants = ordered(self.b.iter().map(|p| p.variant.as_str()), &B_ORDER);
            let _ = writeln!(
                s,
                "\n== (b) two tiers, one client: median (mean) response time ms vs front-tier computation after the db call"
            );
            let mut head = format!("{:>10}", "compute");
            for v in &variants {
                let _ = write!(head, " {:>17}", v);
            }
            let _ = writeln!(s, "{head}");
            let mut cs: Vec<u64> = self.b.iter().map(|p| p.compute_ms).collect();
            cs.sort_unstable();
            cs.dedup();
            for c in cs {
                let mut line = format!("{:>10}", c);
                for v in &variants {
                    let cell = self
                        .b
                        .iter()
                        .find(|p| &p.variant == v && p.compute_ms == c)
                        .map_or_else(
                            || "-".to_string(),
                            |p| format!("{:.1} ({:.1})", p.lat.p50_ms, p.lat.mean_ms),
                        );
                    let _ = write!(line, " {:>17}", cell);
                }
                let _ = writeln!(s, "{line}");
            }
        }
        if !self.c.is_empty() {
            let modes = ordered(self.c.iter().map(|p| p.mode.as_str()), &MODE_ORDER);
            let _ = writeln!(
                s,
                "\n== (c) three tiers, one client: median (mean, p99) response time ms vs protected tiers"
            );
            let mut head = format!("{:>15}", "protected tiers");
            for m in &modes {
                let _ = write!(head, " {:>24}", m);
            }
            let _ = writeln!(s, "{head}");
            let mut ks: Vec<usize> = self.c.iter().map(|p| p.tiers).collect();
            ks.sort_unstable();
            ks.dedup();
            for k in ks {
                let mut line = format!("{:>15}", k);
                for m in &modes {
                    let cell = self
                        .c
                        .iter()
                        .find(|p| &p.mode == m && p.tiers == k)
                        .map_or_else(
                            || "-".to_string(),
                            |p| {
                                format!(
                                    "{:.1} ({:.1}, {:.1})",
                                    p.lat.p50_ms, p.lat.mean_ms, p.lat.p99_ms
                                )
                            },
                        );
                    let _ = write!(line, " {:>24}", cell);
                }
                let _ = writeln!(s, "{line}");
            }
        }
        if !self.d.is_empty() {
            let _ = writeln!(
                s,
                "\n== (d) disaster: requests among the last 500 issued before it, per view"
            );
            let _ = writeln!(
                s,
                "{:<10} {:>7} {:>6} {:>6} {:>6} {:>14} {:>12}",
                "mode", "issued", "PV", "SV", "CV", "unsafe(CV-SV)", "failover ms"
            );
            for p in &self.d {
                let _ = writeln!(
                    s,
                    "{:<10} {:>7} {:>6} {:>6} {:>6} {:>14} {:>12}",
                    p.mode,
                    p.issued,
                    p.window_pv,
                    p.window_sv,
                    p.window_cv,
                    p.unsafe_replies,
                    p.failover_ms
                );
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s);
            for n in &self.notes {
                let _ = writeln!(s, "note: {n}");
            }
        }
        let floors = self.floors();
        if floors.iter().any(|f| f.value.is_some()) {
            let _ = writeln!(
                s,
                "\n== Floors (issue) at the measured RTT {:.2} ms",
                self.rtt_ms()
            );
            for f in floors.iter().filter(|f| f.value.is_some()) {
                let _ = writeln!(
                    s,
                    "{:<52} {:>9} {:<24} {}",
                    f.what,
                    f2(f.value),
                    f.bound,
                    match f.ok {
                        Some(true) => "ok",
                        Some(false) => "MISSED",
                        None => "-",
                    }
                );
            }
        }
        s
    }

    /// Writes the CSV files, `table.txt` and the plots into `dir`; returns the
    /// plot paths.
    pub fn write(&self, dir: &Path, png: bool) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let w = |name: &str, text: String| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
        };
        let mut rtt = String::from("site,target_ms,median_ms,mean_ms,p99_ms\n");
        for r in &self.rtt {
            let _ = writeln!(
                rtt,
                "{},{:.3},{:.3},{:.3},{:.3}",
                r.site, r.target_ms, r.median_ms, r.mean_ms, r.p99_ms
            );
        }
        w("rtt.csv", rtt)?;
        let mut a = String::from("variant,workload,clients,tps,latency_ms,transactions,failed\n");
        for p in &self.a {
            let _ = writeln!(
                a,
                "{},{},{},{:.3},{:.3},{},{}",
                p.variant,
                p.workload,
                p.clients,
                p.r.tps,
                p.r.latency_ms,
                p.r.transactions,
                p.r.failed
            );
        }
        w("fig_a.csv", a)?;
        let mut b = String::from("variant,compute_ms,n,mean_ms,p50_ms,p99_ms\n");
        for p in &self.b {
            let _ = writeln!(
                b,
                "{},{},{},{:.3},{:.3},{:.3}",
                p.variant, p.compute_ms, p.lat.n, p.lat.mean_ms, p.lat.p50_ms, p.lat.p99_ms
            );
        }
        w("fig_b.csv", b)?;
        let mut c = String::from("protected_tiers,mode,n,mean_ms,p50_ms,p99_ms\n");
        for p in &self.c {
            let _ = writeln!(
                c,
                "{},{},{},{:.3},{:.3},{:.3}",
                p.tiers, p.mode, p.lat.n, p.lat.mean_ms, p.lat.p50_ms, p.lat.p99_ms
            );
        }
        w("fig_c.csv", c)?;
        let mut d = String::from(
            "mode,issued,cv,sv,pv,unsafe_replies,window_cv,window_sv,window_pv,failover_ms\n",
        );
        for p in &self.d {
            let _ = writeln!(
                d,
                "{},{},{},{},{},{},{},{},{},{}",
                p.mode,
                p.issued,
                p.cv,
                p.sv,
                p.pv,
                p.unsafe_replies,
                p.window_cv,
                p.window_sv,
                p.window_pv,
                p.failover_ms
            );
        }
        w("fig_d.csv", d)?;
        w(
            "summary.txt",
            format!(
                "{}target_rtt_ms={}\n",
                self.result_line() + "\n",
                self.target_rtt_ms
            ),
        )?;
        w("table.txt", self.table())?;
        self.plots(dir, png)
    }

    fn plots(&self, dir: &Path, png: bool) -> Result<Vec<PathBuf>> {
        let rtt = self.rtt_ms();
        let rtt_ref = Some((rtt, format!("RTT {rtt:.1} ms")));
        let mut out = Vec::new();
        let variants = ordered(self.a.iter().map(|p| p.variant.as_str()), &A_ORDER);
        let workloads = ordered(
            self.a.iter().map(|p| p.workload.as_str()),
            &["tpcb", "tpcb-interactive", "insert"],
        );
        for wl in &workloads {
            let title = wl
                .parse::<Workload>()
                .map(|w| w.title().to_string())
                .unwrap_or_else(|_| wl.clone());
            let series = |f: &dyn Fn(&APoint) -> f64| -> Vec<Series> {
                variants
                    .iter()
                    .map(|v| {
                        let mut pts: Vec<(f64, f64)> = self
                            .a
                            .iter()
                            .filter(|p| &p.variant == v && &p.workload == wl)
                            .map(|p| (p.clients as f64, f(p)))
                            .collect();
                        pts.sort_by(|x, y| x.0.total_cmp(&y.0));
                        Series {
                            label: v.clone(),
                            points: pts,
                        }
                    })
                    .filter(|s| !s.points.is_empty())
                    .collect()
            };
            let tps = LineChart {
                title: format!("(a) {title}: throughput"),
                x_label: "clients".into(),
                y_label: "transactions per second".into(),
                x_scale: Scale::Log2,
                y_scale: Scale::Linear,
                series: series(&|p| p.r.tps),
                reference: None,
            };
            out.extend(plot::save(
                dir,
                &format!("fig_a_{wl}_tps"),
                &plot::line_chart(&tps),
                png,
            )?);
            let lat = LineChart {
                title: format!("(a) {title}: latency"),
                x_label: "clients".into(),
                y_label: "mean transaction latency, ms (log)".into(),
                x_scale: Scale::Log2,
                y_scale: Scale::Log10,
                series: series(&|p| p.r.latency_ms),
                reference: rtt_ref.clone(),
            };
            out.extend(plot::save(
                dir,
                &format!("fig_a_{wl}_latency"),
                &plot::line_chart(&lat),
                png,
            )?);
        }
        if !self.b.is_empty() {
            let series: Vec<Series> = ordered(self.b.iter().map(|p| p.variant.as_str()), &B_ORDER)
                .into_iter()
                .map(|v| {
                    let mut pts: Vec<(f64, f64)> = self
                        .b
                        .iter()
                        .filter(|p| p.variant == v)
                        .map(|p| (p.compute_ms as f64, p.lat.p50_ms))
                        .collect();
                    pts.sort_by(|x, y| x.0.total_cmp(&y.0));
                    Series {
                        label: v,
                        points: pts,
                    }
                })
                .collect();
            let c = LineChart {
                title: "(b) two tiers: response time vs front-tier computation".into(),
                x_label: "front-tier computation per request, ms".into(),
                y_label: "median response time, ms".into(),
                x_scale: Scale::Linear,
                y_scale: Scale::Linear,
                series,
                reference: rtt_ref.clone(),
            };
            out.extend(plot::save(
                dir,
                "fig_b_compute",
                &plot::line_chart(&c),
                png,
            )?);
        }
        if !self.c.is_empty() {
            let mut ks: Vec<usize> = self.c.iter().map(|p| p.tiers).collect();
            ks.sort_unstable();
            ks.dedup();
            let modes = ordered(self.c.iter().map(|p| p.mode.as_str()), &MODE_ORDER);
            let chart = BarChart {
                title: "(c) response time vs protected tiers (one client)".into(),
                y_label: "median response time, ms".into(),
                categories: ks
                    .iter()
                    .map(|k| format!("{k} protected tier{}", if *k == 1 { "" } else { "s" }))
                    .collect(),
                series: modes
                    .iter()
                    .map(|m| {
                        let vals = ks
                            .iter()
                            .map(|k| self.c_median(*k, m).unwrap_or(f64::NAN))
                            .collect();
                        (m.clone(), vals)
                    })
                    .collect(),
                reference: rtt_ref.clone(),
            };
            out.extend(plot::save(
                dir,
                "fig_c_tiers",
                &plot::bar_chart(&chart),
                png,
            )?);
        }
        if !self.d.is_empty() {
            let chart = BarChart {
                title: "(d) disaster: last 500 requests, per view".into(),
                y_label: "requests".into(),
                categories: self.d.iter().map(|p| p.mode.clone()).collect(),
                series: vec![
                    (
                        "PV (primary)".into(),
                        self.d.iter().map(|p| p.window_pv as f64).collect(),
                    ),
                    (
                        "SV (secondary)".into(),
                        self.d.iter().map(|p| p.window_sv as f64).collect(),
                    ),
                    (
                        "CV (client)".into(),
                        self.d.iter().map(|p| p.window_cv as f64).collect(),
                    ),
                ],
                reference: None,
            };
            out.extend(plot::save(
                dir,
                "fig_d_views",
                &plot::bar_chart(&chart),
                png,
            )?);
        }
        Ok(out)
    }

    /// Reads the CSV files written by [`Figures::write`].
    pub fn load(dir: &Path) -> Result<Figures> {
        fn rows(dir: &Path, name: &str, cols: usize) -> Result<Vec<Vec<String>>> {
            let p = dir.join(name);
            let text = match std::fs::read_to_string(&p) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            };
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate().skip(1) {
                if line.trim().is_empty() {
                    continue;
                }
                let f: Vec<String> = line.split(',').map(|s| s.trim().to_string()).collect();
                if f.len() != cols {
                    bail!(
                        "{}:{}: expected {cols} fields, got {}",
                        p.display(),
                        i + 1,
                        f.len()
                    );
                }
                out.push(f);
            }
            Ok(out)
        }
        fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T> {
            s.parse()
                .map_err(|_| anyhow!("bad {what} {s:?} in a CSV file"))
        }
        let mut f = Figures::default();
        for r in rows(dir, "rtt.csv", 5)? {
            f.rtt.push(RttRow {
                site: r[0].clone(),
                target_ms: num(&r[1], "target_ms")?,
                median_ms: num(&r[2], "median_ms")?,
                mean_ms: num(&r[3], "mean_ms")?,
                p99_ms: num(&r[4], "p99_ms")?,
            });
        }
        f.target_rtt_ms = f.rtt.first().map_or(0.0, |r| r.target_ms);
        for r in rows(dir, "fig_a.csv", 7)? {
            f.a.push(APoint {
                variant: r[0].clone(),
                workload: r[1].clone(),
                clients: num(&r[2], "clients")?,
                r: PgbenchResult {
                    tps: num(&r[3], "tps")?,
                    latency_ms: num(&r[4], "latency_ms")?,
                    transactions: num(&r[5], "transactions")?,
                    failed: num(&r[6], "failed")?,
                },
            });
        }
        let lat = |r: &[String]| -> Result<LatStats> {
            Ok(LatStats {
                n: num(&r[2], "n")?,
                mean_ms: num(&r[3], "mean_ms")?,
                p50_ms: num(&r[4], "p50_ms")?,
                p99_ms: num(&r[5], "p99_ms")?,
            })
        };
        for r in rows(dir, "fig_b.csv", 6)? {
            f.b.push(BPoint {
                variant: r[0].clone(),
                compute_ms: num(&r[1], "compute_ms")?,
                lat: lat(&r)?,
            });
        }
        for r in rows(dir, "fig_c.csv", 6)? {
            f.c.push(CPoint {
                tiers: num(&r[0], "protected_tiers")?,
                mode: r[1].clone(),
                lat: lat(&r)?,
            });
        }
        for r in rows(dir, "fig_d.csv", 10)? {
            f.d.push(DPoint {
                mode: r[0].clone(),
                issued: num(&r[1], "issued")?,
                cv: num(&r[2], "cv")?,
                sv: num(&r[3], "sv")?,
                pv: num(&r[4], "pv")?,
                unsafe_replies: num(&r[5], "unsafe_replies")?,
                window_cv: num(&r[6], "window_cv")?,
                window_sv: num(&r[7], "window_sv")?,
                window_pv: num(&r[8], "window_pv")?,
                failover_ms: num(&r[9], "failover_ms")?,
            });
        }
        Ok(f)
    }
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

/// `pipecloud-harness figures`.
pub fn figures(args: FiguresArgs) -> Result<()> {
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
pub fn demo(args: DemoArgs) -> Result<()> {
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
pub fn run_plan(plan: &Plan) -> Result<()> {
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
    let parts: [(bool, &str, Part); 4] = [
        (plan.a, "a", part_a),
        (plan.b, "b", part_b),
        (plan.c, "c", part_c),
        (plan.d, "d", part_d),
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

fn site_options(plan: &Plan, mode: Mode, tiers: bool) -> SiteOptions {
    SiteOptions {
        rtt: plan.rtt,
        mode,
        compute_ms: Vec::new(),
        tiers,
        rtt_tolerance: Duration::from_millis(1),
        outbound_override: None,
        ipv6_client: false,
    }
}

/// Writes an embedded topology to `dir/name`.
fn topology_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// The three-tier topology with only the last `k` machines' disks protected
/// (k = 1: db; 2: app and db; 3: all). Machines without a protected disk run no
/// database (CompDB then only computes and forwards on them).
pub fn protected_tiers(text: &str, k: usize) -> Result<String> {
    let mut topo = Topology::parse(text, "three-tier.toml").map_err(|e| anyhow!("{e}"))?;
    let n = topo.machines.len();
    if k == 0 || k > n {
        bail!("cannot protect {k} of {n} tiers");
    }
    let keep: Vec<String> = topo.machines[n - k..]
        .iter()
        .map(|m| m.name.clone())
        .collect();
    topo.disks.retain(|d| keep.contains(&d.machine));
    Ok(render_topology(
        &topo,
        Mode::Pipelined,
        Path::new("/nonexistent/certs"),
        Path::new("/nonexistent/work"),
    ))
}

/// Runs `f` (which builds a site) up to 3 times while it fails only because the
/// calibrated WAN missed the configured RTT (a burst of load on this machine
/// during the calibration); any other error is returned at once.
fn rtt_retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
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

fn rtt_row(site: &str, target: Duration, r: &RttReport) -> RttRow {
    RttRow {
        site: site.to_string(),
        target_ms: ms(target),
        median_ms: ms(r.median),
        mean_ms: ms(r.mean),
        p99_ms: ms(r.p99),
    }
}

/// The agents' control sockets of a site (`<nbd_dir>/ctl.sock`, nbd_dir = `<work>/h<i>`).
fn ctl_sockets(site: &Site) -> Vec<PathBuf> {
    (0..site.topo.hosts.len())
        .map(|i| site.work.join(format!("h{i}")).join("ctl.sock"))
        .collect()
}

/// Switches every agent of the site to `mode` at run time.
pub fn set_mode(site: &Site, mode: Mode) -> Result<()> {
    let m: pipecloud::replication::Mode = mode.as_str().parse().map_err(|e| anyhow!("{e}"))?;
    for p in ctl_sockets(site) {
        pipecloud::ctl::set_mode(&p, m, None)
            .with_context(|| format!("switching {} to {mode}", p.display()))?;
    }
    Ok(())
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

/// Waits (up to 60 s) until every agent has all writes acknowledged, so a
/// variant does not inherit the previous one's backlog.
pub fn wait_drained(site: &Site) {
    for p in ctl_sockets(site) {
        let mut unknown = false;
        let r = wait_until(Duration::from_secs(60), "replication to drain", || {
            match pipecloud::ctl::status(&p, false)
                .ok()
                .and_then(|s| drained(&s))
            {
                Some(d) => d,
                None => {
                    unknown = true;
                    true
                }
            }
        });
        if unknown {
            eprintln!(
                "figures: cannot read the in-flight bytes of {}; waiting 1 s",
                p.display()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        if let Err(e) = r {
            eprintln!("figures: warning: {e:#}");
        }
    }
}

/// PostgreSQL on a plain directory behind the emulated network and WAN, with no
/// agent (`--no-agent`: develops and checks (a)'s pgbench and standby paths).
struct BareRig {
    pg: Option<Postgres>,
    _wan: WanDelay,
    net: Network,
    topo: Topology,
    rtt: RttReport,
}

impl BareRig {
    fn up(text: &str, work: &Path, prefix: &str, rtt: Duration) -> Result<BareRig> {
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
enum Rig {
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
    fn rtt(&self) -> RttReport {
        match self {
            Rig::Site(s) => s.rtt,
            Rig::Bare(b) => b.rtt,
        }
    }
    fn db(&self) -> Result<&Postgres> {
        match self {
            Rig::Site(s) => s.dbs.first().and_then(|d| d.as_ref()),
            Rig::Bare(b) => b.pg.as_ref(),
        }
        .context("the site has no database on its first machine")
    }
    fn endpoint(&self) -> Result<Endpoint> {
        let pg = self.db()?;
        Ok(Endpoint {
            client_ns: self.names().client(),
            host: pg.ip,
            port: pg.port,
        })
    }
    fn set_mode(&self, mode: Mode) -> Result<()> {
        match self {
            Rig::Site(s) => set_mode(s, mode),
            Rig::Bare(_) => bail!("variant {mode} needs the agent (run without --no-agent)"),
        }
    }
    fn drain(&self) {
        if let Rig::Site(s) = self {
            wait_drained(s);
        }
    }
    fn standby_plan(&self, dir: &Path) -> Result<StandbyPlan> {
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

/// (a) pgbench vs clients per variant, on ONE site (modes switched at run time).
fn part_a(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    let dir = work.join("a");
    let rig = if plan.no_agent {
        Rig::Bare(Box::new(BareRig::up(SINGLE_DB, &dir, prefix, plan.rtt)?))
    } else {
        let topo = topology_file(&work.join("topologies"), "single-db.toml", SINGLE_DB)?;
        Rig::Site(Box::new(rtt_retry(|| {
            Site::up(&topo, &dir, prefix, &site_options(plan, Mode::Async, false))
        })?))
    };
    fig.rtt.push(rtt_row("(a) single-db", plan.rtt, &rig.rtt()));
    let ep = rig.endpoint()?;
    if let Rig::Site(_) = &rig {
        rig.set_mode(Mode::Async)?;
    }
    let t = Instant::now();
    pgbench::init(&ep, 1)?;
    eprintln!(
        "figures: (a) pgbench -i -s 1 took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    rig.drain();
    // Two passes: the variants of the running site, interleaved per point (so a
    // drift of the machine's background load hits them alike), then
    // PostgreSQL's own synchronous standby (attached once).
    let (local, standby_pass): (Vec<Variant>, Vec<Variant>) = plan
        .variants
        .iter()
        .partition(|v| !matches!(v, Variant::PgSync));
    for pass in [local, standby_pass] {
        if pass.is_empty() {
            continue;
        }
        let mut standby = None;
        if pass.contains(&Variant::PgSync) {
            if let Rig::Site(_) = &rig {
                rig.set_mode(Mode::Async)?;
            }
            let t = Instant::now();
            standby = Some(SyncStandby::attach(rig.db()?, &rig.standby_plan(&dir)?)?);
            eprintln!(
                "figures: (a) synchronous standby attached across the WAN in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        if pass.contains(&Variant::Plain) {
            if let Rig::Site(_) = &rig {
                bail!("variant no-replication needs --no-agent");
            }
        }
        let top = plan.clients.iter().copied().max().unwrap_or(0);
        for &w in &plan.workloads {
            for &c in &plan.clients {
                // The largest client count carries the headline ratios: repeat it
                // (interleaved) and keep each variant's median run.
                let reps = if c == top { plan.top_reps.max(1) } else { 1 };
                let mut runs: BTreeMap<Variant, Vec<PgbenchResult>> = BTreeMap::new();
                for _ in 0..reps {
                    for &v in &pass {
                        check_interrupted()?;
                        if let Some(m) = v.mode() {
                            rig.set_mode(m)?;
                        }
                        rig.drain();
                        let secs = Duration::from_secs(plan.secs);
                        match pgbench::run_workload(&ep, w, c, secs, &dir) {
                            Ok(r) => {
                                eprintln!(
                                    "figures: (a) {v:<16} {w:<16} clients={c:<3} tps={:>9.1} latency={:>9.2} ms failed={}",
                                    r.tps, r.latency_ms, r.failed
                                );
                                runs.entry(v).or_default().push(r);
                            }
                            Err(e) => eprintln!("figures: (a) {v} {w} clients={c}: FAILED: {e:#}"),
                        }
                    }
                }
                for (v, mut rs) in runs {
                    rs.sort_by(|a, b| a.tps.total_cmp(&b.tps));
                    if let Some(r) = rs.get(rs.len() / 2).copied() {
                        fig.a.push(APoint {
                            variant: v.as_str().to_string(),
                            workload: w.as_str().to_string(),
                            clients: c,
                            r,
                        });
                    }
                }
            }
        }
        drop(standby);
    }
    Ok(())
}

static NEXT_ID: AtomicI64 = AtomicI64::new(1_000_000_000);

/// One client's request/response latencies against `addr` for `secs` (after 3
/// warm-up requests that open every tier's connections).
pub fn measure_http(client_ns: &str, addr: SocketAddr, secs: u64) -> Result<LatStats> {
    let dur = Duration::from_secs(secs);
    let v = spawn_in(client_ns, move || {
        let mut c = HttpClient::connect(addr)?;
        c.set_timeout(Some(Duration::from_secs(60)))?;
        for _ in 0..3 {
            c.get(&format!("/req/{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)))?;
        }
        let end = Instant::now() + dur;
        let mut v = Vec::new();
        while Instant::now() < end && v.len() < 1_000_000 {
            let t0 = Instant::now();
            c.get(&format!("/req/{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)))?;
            v.push(t0.elapsed());
        }
        Ok(v)
    })
    .join()
    .map_err(|_| anyhow!("client thread panicked"))??;
    Ok(LatStats::of(v))
}

/// Replaces machine `j`'s CompDB tier with one computing `compute_ms` before and
/// `post_compute_ms` after its database insert and next-tier call.
fn restart_tier(site: &mut Site, j: usize, compute_ms: u64, post_compute_ms: u64) -> Result<()> {
    let n = site.topo.machines.len();
    let m = site
        .topo
        .machines
        .get(j)
        .context("no such machine")?
        .clone();
    let name = format!("tier-{}", m.name);
    let pos = site.tiers.iter().position(|g| g.name == name);
    if let Some(p) = pos {
        site.tiers[p].kill();
    }
    let ns = site.net.names.machine(j);
    let mut cmd = ns_cmd(&ns, &bin("pipecloud-harness").to_string_lossy());
    cmd.args(["compdb", "--tier", &m.name])
        .args(["--listen", &format!("{}:{TIER_PORT}", m.ip)])
        .args(["--compute-ms", &compute_ms.to_string()])
        .args(["--post-compute-ms", &post_compute_ms.to_string()]);
    if site.dbs.get(j).map(|d| d.is_some()).unwrap_or(false) {
        cmd.args([
            "--db",
            &format!("host={} port={PG_PORT} user=postgres dbname=postgres", m.ip),
        ]);
    }
    if j + 1 < n {
        let nx = SocketAddr::new(site.topo.machines[j + 1].ip.into(), TIER_PORT);
        cmd.args(["--next", &nx.to_string()]);
    }
    let g = Guarded::spawn(&name, &mut cmd, &site.work.join(format!("{name}.log")))?;
    match pos {
        Some(p) => site.tiers[p] = g,
        None => site.tiers.push(g),
    }
    let addr = SocketAddr::new(m.ip.into(), TIER_PORT);
    spawn_in(&ns, move || {
        wait_until(Duration::from_secs(30), "tier to listen", || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    })
    .join()
    .map_err(|_| anyhow!("panic"))?
    .with_context(|| format!("tier {} did not restart", m.name))
}

/// Port of the unprotected web tier of the naive variant (in the client's LAN namespace).
const NAIVE_WEB_PORT: u16 = 8081;

/// The two-tier topology for the naive variant: the protection group is the
/// database machine alone (outbound), so its replies to the web tier leave the
/// group and are held; the web tier is an unprotected machine on the LAN.
pub fn naive_two_tier(text: &str) -> Result<String> {
    let mut topo = Topology::parse(text, "two-tier.toml").map_err(|e| anyhow!("{e}"))?;
    topo.machines.retain(|m| m.name != "web");
    for m in &mut topo.machines {
        m.outbound = true;
    }
    if topo.machines.is_empty() {
        bail!("two-tier topology without a db machine");
    }
    Ok(render_topology(
        &topo,
        Mode::Pipelined,
        Path::new("/nonexistent/certs"),
        Path::new("/nonexistent/work"),
    ))
}

/// Starts the unprotected web tier of the naive variant in namespace `ns`.
fn start_naive_web(site: &Site, ns: &str, post_compute_ms: u64) -> Result<(Guarded, SocketAddr)> {
    let db = site.topo.machines.first().context("no db machine")?;
    let listen = SocketAddr::new(crate::site::CLIENT_IP.into(), NAIVE_WEB_PORT);
    let mut cmd = ns_cmd(ns, &bin("pipecloud-harness").to_string_lossy());
    cmd.args(["compdb", "--tier", "web", "--listen", &listen.to_string()])
        .args([
            "--next",
            &SocketAddr::new(db.ip.into(), TIER_PORT).to_string(),
        ])
        .args(["--post-compute-ms", &post_compute_ms.to_string()]);
    let g = Guarded::spawn(
        "tier-web-unprotected",
        &mut cmd,
        &site.work.join("tier-web-unprotected.log"),
    )?;
    spawn_in(ns, move || {
        wait_until(
            Duration::from_secs(30),
            "the unprotected web tier to listen",
            || std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok(),
        )
    })
    .join()
    .map_err(|_| anyhow!("panic"))??;
    Ok((g, listen))
}

/// (b) two tiers: naive vs joint pipelining vs front-tier computation.
///
/// Joint: web and db are both in the protection group; db's replies to web are
/// internal (tagged, not held) and web's replies to the client are held.
/// Naive: only db is protected (the boundary is drawn around the database);
/// its replies to the unprotected web tier are held, so web's computation
/// after the database call cannot overlap with the replication.
fn part_b(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    let topos = work.join("topologies");
    let joint_topo = topology_file(&topos, "two-tier.toml", TWO_TIER)?;
    let naive_topo = topology_file(&topos, "two-tier-naive.toml", &naive_two_tier(TWO_TIER)?)?;
    let joint = [Mode::Async, Mode::Sync, Mode::Pipelined];
    let naive = [Mode::Pipelined];
    let runs: [(&str, PathBuf, &[Mode]); 2] =
        [("joint", joint_topo, &joint), ("naive", naive_topo, &naive)];
    for (label, topo, modes) in runs {
        let dir = work.join(format!("b-{label}"));
        let mut site = rtt_retry(|| {
            Site::up(
                &topo,
                &dir,
                prefix,
                &site_options(plan, Mode::Pipelined, true),
            )
        })
        .with_context(|| format!("two-tier site ({label})"))?;
        fig.rtt.push(rtt_row(
            &format!("(b) two-tier {label}"),
            plan.rtt,
            &site.rtt,
        ));
        let client_ns = site.client_ns();
        for &c in &plan.compute_ms {
            // Dropped (killed) before the site at the end of each iteration.
            let mut _web = None;
            let front = if label == "naive" {
                let (g, addr) = start_naive_web(&site, &client_ns, c)?;
                _web = Some(g);
                addr
            } else {
                let web = site
                    .topo
                    .machines
                    .iter()
                    .position(|m| m.name == "web")
                    .unwrap_or(0);
                restart_tier(&mut site, web, 0, c)?;
                site.front()
            };
            for &m in modes {
                check_interrupted()?;
                set_mode(&site, m)?;
                wait_drained(&site);
                let variant = if label == "naive" {
                    format!("naive-{m}")
                } else {
                    m.as_str().to_string()
                };
                let lat = measure_http(&client_ns, front, plan.latency_secs)?;
                eprintln!(
                    "figures: (b) {variant:<16} compute={c:>3} ms: mean {:.2} ms p50 {:.2} p99 {:.2} (n={})",
                    lat.mean_ms, lat.p50_ms, lat.p99_ms, lat.n
                );
                fig.b.push(BPoint {
                    variant,
                    compute_ms: c,
                    lat,
                });
            }
        }
        drop(site);
        if !keep_work() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// (c) response time with 1, 2, 3 protected tiers.
fn part_c(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    for &k in &plan.tiers {
        check_interrupted()?;
        let text = protected_tiers(THREE_TIER, k)?;
        let topo = topology_file(
            &work.join("topologies"),
            &format!("three-tier-{k}.toml"),
            &text,
        )?;
        let dir = work.join(format!("c-{k}"));
        let site = rtt_retry(|| {
            Site::up(
                &topo,
                &dir,
                prefix,
                &site_options(plan, Mode::Pipelined, true),
            )
        })
        .with_context(|| format!("three-tier site with {k} protected tiers"))?;
        fig.rtt.push(rtt_row(
            &format!("(c) {k} protected tiers"),
            plan.rtt,
            &site.rtt,
        ));
        for &m in &plan.tier_modes {
            check_interrupted()?;
            set_mode(&site, m)?;
            wait_drained(&site);
            let lat = measure_http(&site.client_ns(), site.front(), plan.latency_secs)?;
            eprintln!(
                "figures: (c) {k} protected tiers {m:<10}: mean {:.2} ms p50 {:.2} p99 {:.2} (n={})",
                lat.mean_ms, lat.p50_ms, lat.p99_ms, lat.n
            );
            fig.c.push(CPoint {
                tiers: k,
                mode: m.as_str().to_string(),
                lat,
            });
        }
        drop(site);
        if !keep_work() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// (d) one disaster per mode: PV/SV/CV over the last 500 requests.
fn part_d(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
    let topo = topology_file(&work.join("topologies"), "single-db.toml", SINGLE_DB)?;
    for &m in &plan.disaster_modes {
        check_interrupted()?;
        let dir = work.join(format!("d-{m}"));
        let r = rtt_retry(|| {
            let _ = std::fs::remove_dir_all(&dir);
            disaster::run_point(
                &topo,
                &dir,
                prefix,
                &site_options(plan, m, false),
                Duration::from_millis(plan.disaster_ms),
                plan.disaster_workers,
                false,
            )
        })
        .with_context(|| format!("disaster in mode {m}"))?;
        eprintln!(
            "figures: (d) {m:<10}: issued {} last500 PV {} SV {} CV {} unsafe {} failover {} ms",
            r.issued, r.window_pv, r.window_sv, r.window_cv, r.unsafe_replies, r.failover_ms
        );
        fig.d.push(DPoint::of(m, &r));
        if !keep_work() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic() -> Figures {
        let mut f = Figures {
            target_rtt_ms: 50.0,
            rtt: vec![RttRow {
                site: "(a) single-db".into(),
                target_ms: 50.0,
                median_ms: 50.02,
                mean_ms: 50.05,
                p99_ms: 50.3,
            }],
            ..Figures::default()
        };
        for (v, per) in [
            ("async", 1000.0f64),
            ("sync", 19.0),
            ("pipelined", 950.0),
            ("pg-sync-standby", 18.0),
        ] {
            for c in [1u32, 8, 64] {
                let tps = if v == "sync" || v == "pg-sync-standby" {
                    per
                } else {
                    per.min(c as f64 * 18.0)
                };
                f.a.push(APoint {
                    variant: v.into(),
                    workload: "tpcb".into(),
                    clients: c,
                    r: PgbenchResult {
                        tps,
                        latency_ms: c as f64 * 1000.0 / tps,
                        transactions: (tps * 5.0) as u64,
                        failed: 0,
                    },
                });
                f.a.push(APoint {
                    variant: v.into(),
                    workload: "insert".into(),
                    clients: c,
                    r: PgbenchResult {
                        tps: c as f64 * 19.0,
                        latency_ms: 52.5,
                        transactions: 100,
                        failed: 0,
                    },
                });
            }
        }
        for c in [0u64, 50, 100] {
            for (v, lat) in [
                ("async", c as f64 + 2.0),
                ("sync", c as f64 + 52.0),
                ("naive-pipelined", c as f64 + 52.0),
                ("pipelined", (c as f64).max(51.0) + 1.0),
            ] {
                f.b.push(BPoint {
                    variant: v.into(),
                    compute_ms: c,
                    lat: LatStats {
                        n: 50,
                        mean_ms: lat,
                        p50_ms: lat,
                        p99_ms: lat + 1.0,
                    },
                });
            }
        }
        for k in 1..=3usize {
            for (m, lat) in [("sync", 52.0 * k as f64), ("pipelined", 53.0 + k as f64)] {
                f.c.push(CPoint {
                    tiers: k,
                    mode: m.into(),
                    lat: LatStats {
                        n: 40,
                        mean_ms: lat,
                        p50_ms: lat,
                        p99_ms: lat + 2.0,
                    },
                });
            }
        }
        for (m, cv, sv) in [
            ("async", 480, 440),
            ("sync", 470, 490),
            ("pipelined", 485, 495),
        ] {
            f.d.push(DPoint {
                mode: m.into(),
                issued: 3000,
                cv: 2900,
                sv: 2950,
                pv: 2999,
                unsafe_replies: if m == "async" { 40 } else { 0 },
                window_cv: cv,
                window_sv: sv,
                window_pv: 499,
                failover_ms: 120,
            });
        }
        f
    }

    #[test]
    fn result_line_follows_the_contract() {
        let f = synthetic();
        let line = f.result_line();
        assert!(line.starts_with("RESULT rtt_ms=50.02 "), "{line}");
        let kv: BTreeMap<&str, &str> = line
            .trim_start_matches("RESULT ")
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let keys: Vec<&str> = kv.keys().copied().collect();
        assert_eq!(
            keys,
            [
                "rtt_ms",
                "tier1_ms",
                "tier3_ms",
                "tier3_sync_ms",
                "tpcb64_pipelined_over_async",
                "tpcb64_pipelined_over_pgsync",
                "tpcb64_pipelined_over_sync"
            ]
        );
        // 950 / 19 = 50.0; 950 / 1000; 950 / 18.
        assert_eq!(kv.get("tpcb64_pipelined_over_sync"), Some(&"50.00"));
        assert_eq!(kv.get("tpcb64_pipelined_over_async"), Some(&"0.95"));
        assert_eq!(kv.get("tpcb64_pipelined_over_pgsync"), Some(&"52.78"));
        assert_eq!(kv.get("tier1_ms"), Some(&"54.00"));
        assert_eq!(kv.get("tier3_sync_ms"), Some(&"156.00"));
        assert_eq!(Figures::default().result_line().matches("=na").count(), 6);
    }

    #[test]
    fn floors_are_judged_on_the_measured_values() {
        let mut f = synthetic();
        let ok = |f: &Figures| -> Vec<Option<bool>> { f.floors().iter().map(|x| x.ok).collect() };
        assert!(ok(&f).iter().all(|o| *o == Some(true)), "{:?}", f.floors());
        // Pipelined TPC-B barely above sync: the first floor must fail.
        for p in f.a.iter_mut() {
            if p.variant == "pipelined" && p.workload == "tpcb" {
                p.r.tps = 100.0;
            }
        }
        let o = ok(&f);
        assert_eq!(o[0], Some(false));
        assert_eq!(o[1], Some(false));
    }

    #[test]
    fn write_then_load_round_trips_and_draws_every_plot() {
        let dir =
            std::env::temp_dir().join(format!("pipecloud-figures-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let f = synthetic();
        let paths = f.write(&dir, false).unwrap_or_default();
        let names: Vec<String> = paths
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            names,
            [
                "fig_a_tpcb_tps.svg",
                "fig_a_tpcb_latency.svg",
                "fig_a_insert_tps.svg",
                "fig_a_insert_latency.svg",
                "fig_b_compute.svg",
                "fig_c_tiers.svg",
                "fig_d_views.svg"
            ]
        );
        let back = Figures::load(&dir).unwrap_or_default();
        assert_eq!(back.a.len(), f.a.len());
        assert_eq!(back.b, f.b);
        assert_eq!(back.c, f.c);
        assert_eq!(back.d, f.d);
        assert_eq!(back.result_line(), f.result_line());
        let svg = std::fs::read_to_string(dir.join("fig_a_tpcb_tps.svg")).unwrap_or_default();
        // One polyline per variant.
        assert_eq!(svg.matches("<polyline").count(), 4);
        let table = std::fs::read_to_string(dir.join("table.txt")).unwrap_or_default();
        assert!(table.contains("pg-sync-standby"));
        assert!(table.contains("950.0 / 67.4"), "{table}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn derived_topologies_protect_the_last_k_tiers() {
        for k in 1..=3 {
            let text = protected_tiers(THREE_TIER, k).unwrap_or_default();
            let t = Topology::parse(&text, "derived").map_err(|e| anyhow!("{e}"));
            let t = match t {
                Ok(t) => t,
                Err(e) => panic!("derived topology {k} does not parse: {e}\n{text}"),
            };
            assert_eq!(t.machines.len(), 3);
            assert_eq!(t.disks.len(), k);
            let writers: Vec<&str> = t
                .machines
                .iter()
                .filter(|m| m.writer.is_some())
                .map(|m| m.name.as_str())
                .collect();
            assert_eq!(writers, ["web", "app", "db"][3 - k..].to_vec());
            assert!(t.machines[0].outbound);
        }
        assert!(protected_tiers(THREE_TIER, 4).is_err());
    }

    #[test]
    fn naive_topology_protects_only_the_database() {
        let text = naive_two_tier(TWO_TIER).unwrap_or_default();
        let t = match Topology::parse(&text, "naive") {
            Ok(t) => t,
            Err(e) => panic!("naive topology does not parse: {e}\n{text}"),
        };
        let names: Vec<&str> = t.machines.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["db"]);
        assert!(t.machines[0].outbound);
        assert_eq!(t.disks.len(), 1);
    }

    #[test]
    fn drained_reads_the_status_summary() {
        assert_eq!(
            drained("group g: mode=sync inflight=0/67108864 committed=[3]"),
            Some(true)
        );
        assert_eq!(drained("group g: inflight=4096/67108864"), Some(false));
        assert_eq!(drained("no such field"), None);
    }

    #[test]
    fn variants_parse() {
        assert_eq!("pgsync".parse::<Variant>(), Ok(Variant::PgSync));
        assert_eq!("pipelined".parse::<Variant>(), Ok(Variant::Pipelined));
        assert!("drbd".parse::<Variant>().is_err());
    }
}
