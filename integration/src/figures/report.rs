//! What one run of the figures measured, and its text forms.
//!
//! [`Figures`] holds every measured point (the WAN's RTT per site, and the
//! points of figures (a) to (d)). From it come the paper-style table (stdout
//! and `table.txt`), one CSV file per figure plus `summary.txt`, the floors
//! of the issue judged on the measured values, and the final `RESULT ...`
//! line. The CSV files are the run's record: `figures --replot DIR` reads
//! them back with [`Figures::load`] and renders table and plots again, so the
//! writer and the reader live side by side here.

use super::hold::HoldRow;
use super::latency::LatStats;
use crate::disaster::PointResult;
use crate::pgbench::PgbenchResult;
use crate::run::ms;
use crate::wan::RttReport;
use anyhow::{anyhow, bail, Context, Result};
use pipecloud_core::topology::Mode;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Measured RTT of one site.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RttRow {
    site: String,
    target_ms: f64,
    median_ms: f64,
    mean_ms: f64,
    p99_ms: f64,
}

pub(super) fn rtt_row(site: &str, target: Duration, r: &RttReport) -> RttRow {
    RttRow {
        site: site.to_string(),
        target_ms: ms(target),
        median_ms: ms(r.median),
        mean_ms: ms(r.mean),
        p99_ms: ms(r.p99),
    }
}

/// One point of figure (a).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct APoint {
    pub(super) variant: String,
    pub(super) workload: String,
    pub(super) clients: u32,
    pub(super) r: PgbenchResult,
}

/// One point of figure (b).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct BPoint {
    pub(super) variant: String,
    pub(super) compute_ms: u64,
    pub(super) lat: LatStats,
}

/// One point of figure (c).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct CPoint {
    pub(super) tiers: usize,
    pub(super) mode: String,
    pub(super) lat: LatStats,
}

/// One disaster of figure (d).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct DPoint {
    pub(super) mode: String,
    issued: i64,
    cv: usize,
    sv: usize,
    pv: usize,
    unsafe_replies: usize,
    pub(super) window_cv: usize,
    pub(super) window_sv: usize,
    pub(super) window_pv: usize,
    failover_ms: u64,
}

impl DPoint {
    pub(super) fn of(mode: Mode, r: &PointResult) -> DPoint {
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

/// One checkpoint point of figure (e): a guest RAM size and workload.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ECkpt {
    pub(super) ram_mib: u64,
    /// `light` (idle service) or `heavy` (memory-writing).
    pub(super) load: String,
    /// Length of the window, s.
    pub(super) secs: f64,
    /// Checkpoints the backup acknowledged per second.
    pub(super) ckpt_per_s: f64,
    /// Pauses the percentiles are over.
    pub(super) pauses: u64,
    pub(super) pause_p50_ms: f64,
    pub(super) pause_p99_ms: f64,
    /// Dirty page bytes per checkpoint (before compression).
    pub(super) raw_bytes: f64,
    /// Bytes shipped per checkpoint (after compression; `None`: not reported).
    pub(super) shipped_bytes: Option<f64>,
    /// 1-minute load average at the end of the window.
    pub(super) load_avg: String,
}

impl ECkpt {
    /// 1 − shipped / raw.
    pub(super) fn reduction(&self) -> Option<f64> {
        self.shipped_bytes
            .filter(|_| self.raw_bytes > 0.0)
            .map(|s| 1.0 - s / self.raw_bytes)
    }
}

/// One reply-latency point of figure (e): the guest's counter service.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ELat {
    pub(super) mode: String,
    pub(super) clients: usize,
    pub(super) lat: LatStats,
    /// Replies per second over all connections.
    pub(super) rps: f64,
    pub(super) load_avg: String,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Figures {
    pub(super) target_rtt_ms: f64,
    pub(super) rtt: Vec<RttRow>,
    pub(super) a: Vec<APoint>,
    pub(super) b: Vec<BPoint>,
    pub(super) c: Vec<CPoint>,
    pub(super) d: Vec<DPoint>,
    /// Figure (e): checkpoints, and the guest service's reply latency.
    pub(super) e_ckpt: Vec<ECkpt>,
    pub(super) e_lat: Vec<ELat>,
    /// Figure (e): a run-time switch pipelined → checkpoint → pipelined under
    /// client load (not kept by `--replot`).
    pub(super) e_switch: Option<crate::switch::SwitchLoad>,
    /// Hold breakdown of the pipelined points of (a) (issue 20).
    pub(super) holds: Vec<HoldRow>,
    /// Context of the run (machine load), printed under the table.
    pub(super) notes: Vec<String>,
}

/// Order of variants in tables and legends.
pub(super) const A_ORDER: [&str; 5] = [
    "async",
    "sync",
    "pipelined",
    "pg-sync-standby",
    "no-replication",
];
pub(super) const B_ORDER: [&str; 4] = ["async", "sync", "naive-pipelined", "pipelined"];
pub(super) const MODE_ORDER: [&str; 3] = ["async", "sync", "pipelined"];
pub(super) const E_MODE_ORDER: [&str; 3] = ["async", "pipelined", "checkpoint"];

pub(super) fn ordered<'a>(present: impl Iterator<Item = &'a str>, order: &[&str]) -> Vec<String> {
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
struct Floor {
    what: String,
    value: Option<f64>,
    bound: String,
    ok: Option<bool>,
}

impl Figures {
    /// Measured RTT (median) of the first site, else the target.
    pub(super) fn rtt_ms(&self) -> f64 {
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
        self.ratio_at(a, b, "tpcb", 64)
    }

    fn ratio_at(&self, a: &str, b: &str, workload: &str, clients: u32) -> Option<f64> {
        let x = self.tps(a, workload, clients)?;
        let y = self.tps(b, workload, clients)?;
        (y > 0.0).then(|| x / y)
    }

    /// Held time minus the measured RTT at TPC-B 64 clients (p50, p99), ms.
    fn hold_extra(&self) -> (Option<f64>, Option<f64>) {
        let rtt = self.rtt_ms();
        let row = self
            .holds
            .iter()
            .find(|h| h.workload == "tpcb" && h.clients == 64);
        let f = |v: f64| (!v.is_nan()).then_some(v - rtt);
        (
            row.and_then(|h| f(h.hold_p50)),
            row.and_then(|h| f(h.hold_p99)),
        )
    }

    pub(super) fn c_median(&self, tiers: usize, mode: &str) -> Option<f64> {
        self.c
            .iter()
            .find(|p| p.tiers == tiers && p.mode == mode)
            .map(|p| p.lat.p50_ms)
    }

    /// The checkpoint point of figure (e) at `ram` MiB with workload `load`.
    pub(super) fn e_point(&self, ram: u64, load: &str) -> Option<&ECkpt> {
        self.e_ckpt
            .iter()
            .find(|p| p.ram_mib == ram && p.load == load)
    }

    /// The floors at this RTT.
    fn floors(&self) -> Vec<Floor> {
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
        ge(
            "TPC-B 256 clients: pipelined / async (tps)",
            self.ratio_at("pipelined", "async", "tpcb", 256),
            0.9,
        );
        ge(
            "INSERT 64 clients: pipelined / pg-sync-standby (tps)",
            self.ratio_at("pipelined", "pg-sync-standby", "insert", 64),
            1.0,
        );
        let (x50, x99) = self.hold_extra();
        for (what, value, max) in [
            ("TPC-B 64: held minus RTT, p50 (ms)", x50, 5.0),
            ("TPC-B 64: held minus RTT, p99 (ms)", x99, 50.0),
        ] {
            v.push(Floor {
                what: what.into(),
                value,
                bound: format!("<= {max}"),
                ok: value.map(|x| x <= max),
            });
        }
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
        let light = self.e_point(256, "light");
        let heavy = self.e_point(256, "heavy");
        for (what, value, bound, ok) in [
            (
                "(e) 256 MiB light: acked checkpoints/s",
                light.map(|p| p.ckpt_per_s),
                ">= 30",
                light.map(|p| p.ckpt_per_s >= 30.0),
            ),
            (
                "(e) 256 MiB light: pause p50 (ms)",
                light.map(|p| p.pause_p50_ms),
                "<= 5",
                light.map(|p| p.pause_p50_ms <= 5.0),
            ),
            (
                "(e) 256 MiB heavy: 1 - shipped/raw bytes",
                heavy.and_then(ECkpt::reduction),
                ">= 0.6",
                heavy.and_then(ECkpt::reduction).map(|r| r >= 0.6),
            ),
        ] {
            v.push(Floor {
                what: what.into(),
                value,
                bound: bound.into(),
                ok,
            });
        }
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
    pub(super) fn result_line(&self) -> String {
        format!(
            "RESULT rtt_ms={:.2} tpcb64_pipelined_over_sync={} tpcb64_pipelined_over_async={} tpcb64_pipelined_over_pgsync={} tier1_ms={} tier3_ms={} tier3_sync_ms={} insert64_pipelined_over_pgsync={} hold_extra_p50_ms={} hold_extra_p99_ms={} tpcb256_pipelined_over_async={} ckpt_per_s_256mib={} ckpt_pause_p50_ms={} ckpt_bytes_reduction={} switch_drops={}",
            self.rtt_ms(),
            f2(self.ratio("pipelined", "sync")),
            f2(self.ratio("pipelined", "async")),
            f2(self.ratio("pipelined", "pg-sync-standby")),
            f2(self.c_median(1, "pipelined")),
            f2(self.c_median(3, "pipelined")),
            f2(self.c_median(3, "sync")),
            f2(self.ratio_at("pipelined", "pg-sync-standby", "insert", 64)),
            f2(self.hold_extra().0),
            f2(self.hold_extra().1),
            f2(self.ratio_at("pipelined", "async", "tpcb", 256)),
            f2(self.e_point(256, "light").map(|p| p.ckpt_per_s)),
            f2(self.e_point(256, "light").map(|p| p.pause_p50_ms)),
            f2(self.e_point(256, "heavy").and_then(ECkpt::reduction)),
            self.e_switch
                .as_ref()
                .map_or_else(|| "na".to_owned(), |w| w.drops.to_string()),
        )
    }

    /// The paper-style table (also written to `table.txt`).
    pub(super) fn table(&self) -> String {
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
        if !self.holds.is_empty() {
            let _ = writeln!(
                s,
                "\n== (a) pipelined: where a held reply's time goes, ms (p50/p99; extra = held - RTT {:.2})",
                self.rtt_ms()
            );
            for h in &self.holds {
                let _ = writeln!(s, "{}", h.line(self.rtt_ms()));
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
        if !self.e_ckpt.is_empty() {
            let _ = writeln!(
                s,
                "\n== (e) full-state checkpoints of the guest (20 ms epochs): acknowledged per second, pause, bytes per checkpoint"
            );
            let _ = writeln!(
                s,
                "{:>8} {:<6} {:>8} {:>10} {:>10} {:>12} {:>12} {:>9} {:>5}",
                "RAM MiB",
                "load",
                "ckpt/s",
                "pause p50",
                "pause p99",
                "raw B/ckpt",
                "shipped B",
                "reduction",
                "load"
            );
            for p in &self.e_ckpt {
                let _ = writeln!(
                    s,
                    "{:>8} {:<6} {:>8.1} {:>10.2} {:>10.2} {:>12.0} {:>12} {:>9} {:>5}",
                    p.ram_mib,
                    p.load,
                    p.ckpt_per_s,
                    p.pause_p50_ms,
                    p.pause_p99_ms,
                    p.raw_bytes,
                    p.shipped_bytes
                        .map_or_else(|| "na".to_string(), |b| format!("{b:.0}")),
                    f2(p.reduction()),
                    p.load_avg
                );
            }
        }
        if !self.e_lat.is_empty() {
            let modes = ordered(self.e_lat.iter().map(|p| p.mode.as_str()), &E_MODE_ORDER);
            let _ = writeln!(
                s,
                "\n== (e) the guest's counter service: reply latency p50 / p99 ms, requests/s"
            );
            let mut head = format!("{:>8}", "clients");
            for m in &modes {
                let _ = write!(head, " {:>28}", m);
            }
            let _ = writeln!(s, "{head}");
            let mut cs: Vec<usize> = self.e_lat.iter().map(|p| p.clients).collect();
            cs.sort_unstable();
            cs.dedup();
            for c in cs {
                let mut line = format!("{:>8}", c);
                for m in &modes {
                    let cell = self
                        .e_lat
                        .iter()
                        .find(|p| &p.mode == m && p.clients == c)
                        .map_or_else(
                            || "-".to_string(),
                            |p| {
                                format!("{:.1} / {:.1}, {:.1}/s", p.lat.p50_ms, p.lat.p99_ms, p.rps)
                            },
                        );
                    let _ = write!(line, " {:>28}", cell);
                }
                let _ = writeln!(s, "{line}");
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
    pub(super) fn write(&self, dir: &Path, png: bool) -> Result<Vec<PathBuf>> {
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
        let mut h = format!("{}\n", super::hold::CSV_HEADER);
        for r in &self.holds {
            let _ = writeln!(h, "{}", r.csv());
        }
        w("hold.csv", h)?;
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
        let mut e = String::from(
            "ram_mib,load,secs,ckpt_per_s,pauses,pause_p50_ms,pause_p99_ms,raw_bytes,shipped_bytes,load_avg\n",
        );
        for p in &self.e_ckpt {
            let _ = writeln!(
                e,
                "{},{},{:.3},{:.3},{},{:.3},{:.3},{:.1},{},{}",
                p.ram_mib,
                p.load,
                p.secs,
                p.ckpt_per_s,
                p.pauses,
                p.pause_p50_ms,
                p.pause_p99_ms,
                p.raw_bytes,
                p.shipped_bytes
                    .map_or_else(|| "na".to_string(), |b| format!("{b:.1}")),
                p.load_avg
            );
        }
        w("fig_e_ckpt.csv", e)?;
        let mut e = String::from("mode,clients,n,mean_ms,p50_ms,p99_ms,rps,load_avg\n");
        for p in &self.e_lat {
            let _ = writeln!(
                e,
                "{},{},{},{:.3},{:.3},{:.3},{:.3},{}",
                p.mode,
                p.clients,
                p.lat.n,
                p.lat.mean_ms,
                p.lat.p50_ms,
                p.lat.p99_ms,
                p.rps,
                p.load_avg
            );
        }
        w("fig_e_latency.csv", e)?;
        if let Some(sw) = &self.e_switch {
            w("fig_e_switch.csv", crate::switch::timeline_csv(&sw.rows))?;
        }
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

    /// Reads the CSV files written by [`Figures::write`].
    pub(super) fn load(dir: &Path) -> Result<Figures> {
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
        for r in rows(dir, "hold.csv", super::hold::CSV_FIELDS)? {
            f.holds.push(HoldRow::from_csv(&r).map_err(|e| anyhow!(e))?);
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
        for r in rows(dir, "fig_e_ckpt.csv", 10)? {
            f.e_ckpt.push(ECkpt {
                ram_mib: num(&r[0], "ram_mib")?,
                load: r[1].clone(),
                secs: num(&r[2], "secs")?,
                ckpt_per_s: num(&r[3], "ckpt_per_s")?,
                pauses: num(&r[4], "pauses")?,
                pause_p50_ms: num(&r[5], "pause_p50_ms")?,
                pause_p99_ms: num(&r[6], "pause_p99_ms")?,
                raw_bytes: num(&r[7], "raw_bytes")?,
                shipped_bytes: if r[8] == "na" {
                    None
                } else {
                    Some(num(&r[8], "shipped_bytes")?)
                },
                load_avg: r[9].clone(),
            });
        }
        for r in rows(dir, "fig_e_latency.csv", 8)? {
            f.e_lat.push(ELat {
                mode: r[0].clone(),
                clients: num(&r[1], "clients")?,
                lat: LatStats {
                    n: num(&r[2], "n")?,
                    mean_ms: num(&r[3], "mean_ms")?,
                    p50_ms: num(&r[4], "p50_ms")?,
                    p99_ms: num(&r[5], "p99_ms")?,
                },
                rps: num(&r[6], "rps")?,
                load_avg: r[7].clone(),
            });
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
        for (ram, load, per_s, shipped) in [
            (256u64, "light", 48.0, 20_000.0),
            (256, "heavy", 44.0, 250_000.0),
            (64, "light", 50.0, 10_000.0),
        ] {
            f.e_ckpt.push(ECkpt {
                ram_mib: ram,
                load: load.into(),
                secs: 10.0,
                ckpt_per_s: per_s,
                pauses: 480,
                pause_p50_ms: 1.5,
                pause_p99_ms: 6.0,
                raw_bytes: if load == "heavy" {
                    1_000_000.0
                } else {
                    90_000.0
                },
                shipped_bytes: Some(shipped),
                load_avg: "4.20".into(),
            });
        }
        for (m, c, p50) in [
            ("checkpoint", 1usize, 75.0),
            ("pipelined", 1, 52.0),
            ("async", 16, 2.0),
        ] {
            f.e_lat.push(ELat {
                mode: m.into(),
                clients: c,
                lat: LatStats {
                    n: 100,
                    mean_ms: p50,
                    p50_ms: p50,
                    p99_ms: p50 * 2.0,
                },
                rps: (1000.0 / p50 * c as f64).round(),
                load_avg: "4.20".into(),
            });
        }
        f.holds.push(HoldRow {
            workload: "tpcb".into(),
            clients: 64,
            released: 5000,
            hold_p50: 53.0,
            hold_p99: 70.0,
            explained_share: 1.0,
            ..HoldRow::default()
        });
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
                "ckpt_bytes_reduction",
                "ckpt_pause_p50_ms",
                "ckpt_per_s_256mib",
                "hold_extra_p50_ms",
                "hold_extra_p99_ms",
                "insert64_pipelined_over_pgsync",
                "rtt_ms",
                "switch_drops",
                "tier1_ms",
                "tier3_ms",
                "tier3_sync_ms",
                "tpcb256_pipelined_over_async",
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
        assert_eq!(kv.get("insert64_pipelined_over_pgsync"), Some(&"1.00"));
        assert_eq!(kv.get("hold_extra_p50_ms"), Some(&"2.98"));
        assert_eq!(kv.get("hold_extra_p99_ms"), Some(&"19.98"));
        assert_eq!(kv.get("tpcb256_pipelined_over_async"), Some(&"na"));
        assert_eq!(kv.get("ckpt_per_s_256mib"), Some(&"48.00"));
        assert_eq!(kv.get("ckpt_pause_p50_ms"), Some(&"1.50"));
        assert_eq!(kv.get("ckpt_bytes_reduction"), Some(&"0.75"));
        assert_eq!(Figures::default().result_line().matches("=na").count(), 14);
    }

    #[test]
    fn floors_are_judged_on_the_measured_values() {
        let mut f = synthetic();
        let ok = |f: &Figures| -> Vec<Option<bool>> { f.floors().iter().map(|x| x.ok).collect() };
        assert!(ok(&f).iter().flatten().all(|o| *o), "{:?}", f.floors());
        assert_eq!(
            ok(&f).iter().filter(|o| o.is_none()).count(),
            1,
            "no 256-client point"
        );
        // Pipelined TPC-B barely above sync: the first floor must fail.
        for p in f.a.iter_mut() {
            if p.variant == "pipelined" && p.workload == "tpcb" {
                p.r.tps = 100.0;
            }
        }
        let o = ok(&f);
        assert_eq!(o[0], Some(false));
        assert_eq!(o[1], Some(false));
        // (e): compression that saves too little misses its floor; none reported: no value.
        let i = f
            .e_ckpt
            .iter()
            .position(|p| p.ram_mib == 256 && p.load == "heavy")
            .unwrap_or(usize::MAX);
        let reduction = |f: &Figures| {
            f.floors()
                .into_iter()
                .find(|x| x.what.contains("shipped/raw"))
                .map(|x| (x.value, x.ok))
        };
        assert_eq!(reduction(&f), Some((Some(0.75), Some(true))));
        f.e_ckpt[i].shipped_bytes = Some(500_000.0);
        assert_eq!(reduction(&f), Some((Some(0.5), Some(false))));
        f.e_ckpt[i].shipped_bytes = None;
        assert_eq!(reduction(&f), Some((None, None)));
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
                "fig_d_views.svg",
                "fig_e_checkpoints.svg",
                "fig_e_pause.svg",
                "fig_e_latency.svg"
            ]
        );
        let back = Figures::load(&dir).unwrap_or_default();
        assert_eq!(back.a.len(), f.a.len());
        assert_eq!(back.b, f.b);
        assert_eq!(back.c, f.c);
        assert_eq!(back.d, f.d);
        assert_eq!(back.holds, f.holds);
        assert_eq!(back.e_ckpt, f.e_ckpt);
        assert_eq!(back.e_lat, f.e_lat);
        assert_eq!(back.result_line(), f.result_line());
        let svg = std::fs::read_to_string(dir.join("fig_a_tpcb_tps.svg")).unwrap_or_default();
        // One polyline per variant.
        assert_eq!(svg.matches("<polyline").count(), 4);
        let table = std::fs::read_to_string(dir.join("table.txt")).unwrap_or_default();
        assert!(table.contains("pg-sync-standby"));
        assert!(table.contains("950.0 / 67.4"), "{table}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
