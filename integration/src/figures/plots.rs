//! The figures drawn as SVG charts (PNG copies when `rsvg-convert` exists).
//!
//! One chart per figure, shaped like the paper's: (a) throughput and latency
//! against clients per workload (log2 clients, latency on a log scale), (b)
//! response time against the front tier's computation, (c) bars per number of
//! protected tiers, (d) the PV/SV/CV views of the last 500 requests per mode,
//! (e) checkpoints per second and pause times per guest RAM size and workload,
//! and the guest service's reply latency per mode and client count.
//! The RTT is drawn as a reference line where a response time is compared to
//! it. Drawing itself is `crate::plot`; this file only decides what is drawn.

use super::report::{ordered, APoint, Figures, A_ORDER, B_ORDER, E_MODE_ORDER, MODE_ORDER};
use crate::pgbench::Workload;
use crate::plot::{self, BarChart, LineChart, Scale, Series};
use anyhow::Result;
use std::path::{Path, PathBuf};

impl Figures {
    pub(super) fn plots(&self, dir: &Path, png: bool) -> Result<Vec<PathBuf>> {
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
            let chart = bars_per_mode(
                "(c) response time vs protected tiers (one client)",
                self.c
                    .iter()
                    .map(|p| (p.tiers, p.mode.as_str(), p.lat.p50_ms)),
                &MODE_ORDER,
                "protected tier",
                rtt_ref.clone(),
            );
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
        if !self.e_ckpt.is_empty() {
            let cats: Vec<String> = self
                .e_ckpt
                .iter()
                .map(|p| format!("{} MiB {}", p.ram_mib, p.load))
                .collect();
            let per_s = BarChart {
                title: "(e) full-state: acknowledged checkpoints per second (20 ms epochs)".into(),
                y_label: "checkpoints per second".into(),
                categories: cats.clone(),
                series: vec![(
                    "acknowledged".into(),
                    self.e_ckpt.iter().map(|p| p.ckpt_per_s).collect(),
                )],
                reference: Some((30.0, "floor 30/s".into())),
            };
            out.extend(plot::save(
                dir,
                "fig_e_checkpoints",
                &plot::bar_chart(&per_s),
                png,
            )?);
            let pause = BarChart {
                title: "(e) full-state: pause per checkpoint".into(),
                y_label: "pause, ms".into(),
                categories: cats,
                series: vec![
                    (
                        "p50".into(),
                        self.e_ckpt.iter().map(|p| p.pause_p50_ms).collect(),
                    ),
                    (
                        "p99".into(),
                        self.e_ckpt.iter().map(|p| p.pause_p99_ms).collect(),
                    ),
                ],
                reference: Some((5.0, "p50 floor 5 ms".into())),
            };
            out.extend(plot::save(
                dir,
                "fig_e_pause",
                &plot::bar_chart(&pause),
                png,
            )?);
        }
        if let Some(sw) = &self.e_switch {
            let marks: Vec<String> = sw
                .events
                .iter()
                .map(|(t, e)| format!("{e} at {t:.1} s"))
                .collect();
            let served: Vec<&crate::switch::TimelineRow> =
                sw.rows.iter().filter(|r| r.replies > 0).collect();
            let lat = LineChart {
                title: format!(
                    "(e) run-time switch: reply latency per second ({})",
                    marks.join(", ")
                ),
                x_label: "time, s".into(),
                y_label: "reply latency, ms".into(),
                x_scale: Scale::Linear,
                y_scale: Scale::Linear,
                series: vec![
                    Series {
                        label: "p50".into(),
                        points: served.iter().map(|r| (r.second as f64, r.p50_ms)).collect(),
                    },
                    Series {
                        label: "p99".into(),
                        points: served.iter().map(|r| (r.second as f64, r.p99_ms)).collect(),
                    },
                ],
                reference: rtt_ref.clone(),
            };
            out.extend(plot::save(
                dir,
                "fig_e_switch_latency",
                &plot::line_chart(&lat),
                png,
            )?);
            let bytes = LineChart {
                title: format!(
                    "(e) run-time switch: checkpoint bytes shipped per second ({})",
                    marks.join(", ")
                ),
                x_label: "time, s".into(),
                y_label: "shipped, KiB/s".into(),
                x_scale: Scale::Linear,
                y_scale: Scale::Linear,
                series: vec![Series {
                    label: "shipped (after compression)".into(),
                    points: sw
                        .rows
                        .iter()
                        .map(|r| (r.second as f64, r.shipped_bytes as f64 / 1024.0))
                        .collect(),
                }],
                reference: None,
            };
            out.extend(plot::save(
                dir,
                "fig_e_switch_bytes",
                &plot::line_chart(&bytes),
                png,
            )?);
        }
        if !self.e_lat.is_empty() {
            let chart = bars_per_mode(
                "(e) the guest's service: median reply latency per mode",
                self.e_lat
                    .iter()
                    .map(|p| (p.clients, p.mode.as_str(), p.lat.p50_ms)),
                &E_MODE_ORDER,
                "client",
                rtt_ref.clone(),
            );
            out.extend(plot::save(
                dir,
                "fig_e_latency",
                &plot::bar_chart(&chart),
                png,
            )?);
        }
        Ok(out)
    }
}

/// A median-response-time bar chart: one group per count (`N <unit>s`), one bar
/// per mode, from `(count, mode, median ms)` points.
fn bars_per_mode<'a>(
    title: &str,
    points: impl Iterator<Item = (usize, &'a str, f64)> + Clone,
    order: &[&str],
    unit: &str,
    reference: Option<(f64, String)>,
) -> BarChart {
    let mut ks: Vec<usize> = points.clone().map(|p| p.0).collect();
    ks.sort_unstable();
    ks.dedup();
    let modes = ordered(points.clone().map(|p| p.1), order);
    BarChart {
        title: title.into(),
        y_label: "median response time, ms".into(),
        categories: ks
            .iter()
            .map(|k| format!("{k} {unit}{}", if *k == 1 { "" } else { "s" }))
            .collect(),
        series: modes
            .iter()
            .map(|m| {
                let vals = ks
                    .iter()
                    .map(|k| {
                        points
                            .clone()
                            .find(|p| p.0 == *k && p.1 == m)
                            .map_or(f64::NAN, |p| p.2)
                    })
                    .collect();
                (m.clone(), vals)
            })
            .collect(),
        reference,
    }
}
