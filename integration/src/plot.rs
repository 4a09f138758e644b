//! Minimal SVG charts for the figures: line charts (linear or log2 x axis,
//! linear or log10 y axis, optional dashed reference line) and grouped bar
//! charts. No dependencies: the output is plain SVG 1.1 text; PNG copies are made
//! with `rsvg-convert` (Debian `librsvg2-bin`) when it is installed.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Chart size in SVG user units (pixels in the PNG).
const W: f64 = 760.0;
const H: f64 = 460.0;
/// Plot area margins: left, right, top, bottom.
const ML: f64 = 78.0;
const MR: f64 = 170.0;
const MT: f64 = 44.0;
const MB: f64 = 58.0;

/// Colours of series, in order (colour-blind friendly palette).
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
];

/// Scale of an axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Base-2 logarithmic (x axis of client counts 1, 2, 4, ... 64).
    Log2,
    /// Base-10 logarithmic (latencies spanning 1 ms .. 10 s).
    Log10,
}

/// One named series of (x, y) points; non-finite or (on a log axis) non-positive
/// values are skipped.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Clone, Debug)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_scale: Scale,
    pub y_scale: Scale,
    pub series: Vec<Series>,
    /// A dashed horizontal reference line (e.g. the RTT) with its label.
    pub reference: Option<(f64, String)>,
}

/// A grouped bar chart: one group per category, one bar per series.
#[derive(Clone, Debug)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    /// (series label, one value per category).
    pub series: Vec<(String, Vec<f64>)>,
    pub reference: Option<(f64, String)>,
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Formats a tick value compactly (1, 2.5, 100, 1.2k, 10k).
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        let k = v / 1000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{}k", k.round() as i64)
        } else {
            format!("{k:.1}k")
        }
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// "Nice" linear ticks covering `[lo, hi]` (about `n` of them).
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo, lo + 1.0) };
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let last = (hi / step).ceil() * step;
    let mut v = Vec::new();
    let mut i = 0.0;
    while first + i * step <= last + step * 1e-9 && v.len() < 50 {
        v.push(first + i * step);
        i += 1.0;
    }
    v
}

/// Maps data values to pixels along one axis.
#[derive(Clone, Copy, Debug)]
struct Axis {
    scale: Scale,
    lo: f64,
    hi: f64,
    p0: f64,
    p1: f64,
}

impl Axis {
    fn f(&self, v: f64) -> f64 {
        match self.scale {
            Scale::Linear => v,
            Scale::Log2 => v.log2(),
            Scale::Log10 => v.log10(),
        }
    }
    fn px(&self, v: f64) -> f64 {
        let (a, b) = (self.f(self.lo), self.f(self.hi));
        let t = if b > a {
            (self.f(v) - a) / (b - a)
        } else {
            0.5
        };
        self.p0 + t * (self.p1 - self.p0)
    }
    fn usable(&self, v: f64) -> bool {
        v.is_finite() && (self.scale == Scale::Linear || v > 0.0)
    }
    /// Tick positions (data values).
    fn ticks(&self) -> Vec<f64> {
        match self.scale {
            Scale::Linear => nice_ticks(self.lo, self.hi, 6)
                .into_iter()
                .filter(|t| *t >= self.lo - 1e-9 && *t <= self.hi + 1e-9)
                .collect(),
            Scale::Log2 => {
                let mut v = Vec::new();
                let mut t = 2f64.powf(self.lo.log2().floor());
                while t <= self.hi * 1.0001 && v.len() < 40 {
                    if t >= self.lo * 0.9999 {
                        v.push(t);
                    }
                    t *= 2.0;
                }
                v
            }
            Scale::Log10 => {
                let mut v = Vec::new();
                let mut d = 10f64.powf(self.lo.log10().floor());
                while d <= self.hi * 1.0001 && v.len() < 40 {
                    for m in [1.0, 2.0, 5.0] {
                        let t = d * m;
                        if t >= self.lo * 0.9999 && t <= self.hi * 1.0001 {
                            v.push(t);
                        }
                    }
                    d *= 10.0;
                }
                v
            }
        }
    }
}

/// Data range of an axis, padded; log axes snap to powers of their base.
fn range(values: impl Iterator<Item = f64>, scale: Scale, zero_based: bool) -> (f64, f64) {
    let vals: Vec<f64> = values
        .filter(|v| v.is_finite() && (scale == Scale::Linear || *v > 0.0))
        .collect();
    let (mut lo, mut hi) = vals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    if !lo.is_finite() {
        return match scale {
            Scale::Linear => (0.0, 1.0),
            _ => (1.0, 10.0),
        };
    }
    match scale {
        Scale::Linear => {
            if zero_based && lo > 0.0 {
                lo = 0.0;
            }
            if hi <= lo {
                hi = lo + 1.0;
            }
            let ticks = nice_ticks(lo, hi * 1.04, 6);
            let top = ticks.last().copied().unwrap_or(hi);
            (lo.min(ticks.first().copied().unwrap_or(lo)), top.max(hi))
        }
        Scale::Log2 => {
            lo = 2f64.powf(lo.log2().floor());
            hi = 2f64.powf(hi.log2().ceil());
            if hi <= lo {
                hi = lo * 2.0;
            }
            (lo, hi)
        }
        Scale::Log10 => {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
            (lo, hi)
        }
    }
}

fn header(s: &mut String, title: &str) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        W / 2.0,
        esc(title)
    );
}

fn frame(s: &mut String, x_label: &str, y_label: &str) {
    let (x0, x1, y0, y1) = (ML, W - MR, H - MB, MT);
    let _ = writeln!(
        s,
        r#"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        x1 - x0,
        y0 - y1
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        H - 14.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0,
        esc(y_label)
    );
}

fn y_ticks(s: &mut String, y: &Axis) {
    for t in y.ticks() {
        let py = y.px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{ML}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#dddddd"/>"##,
            W - MR
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            ML - 6.0,
            py + 4.0,
            tick_label(t)
        );
    }
}

fn reference_line(s: &mut String, y: &Axis, reference: &Option<(f64, String)>) {
    if let Some((v, label)) = reference {
        if y.usable(*v) && *v >= y.lo && *v <= y.hi {
            let py = y.px(*v);
            let _ = writeln!(
                s,
                r##"<line x1="{ML}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#555555" stroke-dasharray="6 4"/>"##,
                W - MR
            );
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{:.1}" fill="#555555" font-size="11">{}</text>"##,
                ML + 4.0,
                py - 4.0,
                esc(label)
            );
        }
    }
}

fn legend(s: &mut String, labels: &[String], bars: bool) {
    for (i, l) in labels.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let y = MT + 12.0 + 20.0 * i as f64;
        let x = W - MR + 14.0;
        if bars {
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{}" width="16" height="10" fill="{c}"/>"#,
                y - 8.0
            );
        } else {
            let _ = writeln!(
                s,
                r#"<line x1="{x}" y1="{}" x2="{}" y2="{}" stroke="{c}" stroke-width="2.5"/><circle cx="{}" cy="{}" r="3.5" fill="{c}"/>"#,
                y - 3.0,
                x + 22.0,
                y - 3.0,
                x + 11.0,
                y - 3.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            x + 28.0,
            y + 1.0,
            esc(l)
        );
    }
}

/// Renders a line chart as SVG text.
pub fn line_chart(c: &LineChart) -> String {
    let xs = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (xlo, xhi) = range(xs, c.x_scale, false);
    let ys = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(c.reference.iter().map(|r| r.0));
    let (ylo, yhi) = range(ys, c.y_scale, true);
    let x = Axis {
        scale: c.x_scale,
        lo: xlo,
        hi: xhi,
        p0: ML,
        p1: W - MR,
    };
    let y = Axis {
        scale: c.y_scale,
        lo: ylo,
        hi: yhi,
        p0: H - MB,
        p1: MT,
    };
    let mut s = String::new();
    header(&mut s, &c.title);
    y_ticks(&mut s, &y);
    for t in x.ticks() {
        let px = x.px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{MT}" x2="{px:.1}" y2="{}" stroke="#eeeeee"/>"##,
            H - MB
        );
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#,
            H - MB + 18.0,
            tick_label(t)
        );
    }
    frame(&mut s, &c.x_label, &c.y_label);
    reference_line(&mut s, &y, &c.reference);
    for (i, ser) in c.series.iter().enumerate() {
        let col = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> = ser
            .points
            .iter()
            .filter(|(a, b)| x.usable(*a) && y.usable(*b))
            .map(|(a, b)| (x.px(*a), y.px(*b)))
            .collect();
        if pts.len() > 1 {
            let d: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{col}" stroke-width="2.5"/>"#,
                d.join(" ")
            );
        }
        for (a, b) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{a:.1}" cy="{b:.1}" r="3.5" fill="{col}"/>"#
            );
        }
    }
    let labels: Vec<String> = c.series.iter().map(|s| s.label.clone()).collect();
    legend(&mut s, &labels, false);
    s.push_str("</svg>\n");
    s
}

/// Renders a grouped bar chart as SVG text (linear y axis from 0).
pub fn bar_chart(c: &BarChart) -> String {
    let ys = c
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .chain(c.reference.iter().map(|r| r.0));
    let (ylo, yhi) = range(ys, Scale::Linear, true);
    let y = Axis {
        scale: Scale::Linear,
        lo: ylo,
        hi: yhi,
        p0: H - MB,
        p1: MT,
    };
    let mut s = String::new();
    header(&mut s, &c.title);
    y_ticks(&mut s, &y);
    frame(&mut s, "", &c.y_label);
    let ncat = c.categories.len().max(1) as f64;
    let group_w = (W - MR - ML) / ncat;
    let nser = c.series.len().max(1) as f64;
    let bar_w = group_w * 0.8 / nser;
    for (ci, cat) in c.categories.iter().enumerate() {
        let gx = ML + group_w * ci as f64 + group_w * 0.1;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            ML + group_w * (ci as f64 + 0.5),
            H - MB + 18.0,
            esc(cat)
        );
        for (si, (_, vals)) in c.series.iter().enumerate() {
            let Some(v) = vals.get(ci).copied().filter(|v| v.is_finite()) else {
                continue;
            };
            let col = COLOURS[si % COLOURS.len()];
            let top = y.px(v.max(ylo));
            let base = y.px(ylo.max(0.0));
            let bx = gx + bar_w * si as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{col}"/>"#,
                top.min(base),
                (bar_w - 2.0).max(1.0),
                (base - top).abs()
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                bx + bar_w / 2.0 - 1.0,
                top.min(base) - 3.0,
                tick_label((v * 10.0).round() / 10.0)
            );
        }
    }
    reference_line(&mut s, &y, &c.reference);
    let labels: Vec<String> = c.series.iter().map(|s| s.0.clone()).collect();
    legend(&mut s, &labels, true);
    s.push_str("</svg>\n");
    s
}

/// Whether `rsvg-convert` is available for PNG copies.
pub fn png_converter() -> bool {
    Command::new("rsvg-convert")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Writes `svg` to `<dir>/<stem>.svg` and, when `png` is set, a PNG copy next to
/// it. Returns the paths written (the SVG first).
pub fn save(dir: &Path, stem: &str, svg: &str, png: bool) -> Result<Vec<PathBuf>> {
    let svg_path = dir.join(format!("{stem}.svg"));
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    let mut out = vec![svg_path.clone()];
    if png {
        let png_path = dir.join(format!("{stem}.png"));
        let ok = Command::new("rsvg-convert")
            .args(["-f", "png", "-b", "white", "-o"])
            .arg(&png_path)
            .arg(&svg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            out.push(png_path);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(y_scale: Scale) -> LineChart {
        LineChart {
            title: "TPC-B <scale 1>".into(),
            x_label: "clients".into(),
            y_label: "tps".into(),
            x_scale: Scale::Log2,
            y_scale,
            series: vec![
                Series {
                    label: "sync".into(),
                    points: vec![(1.0, 18.0), (8.0, 19.0), (64.0, 19.5)],
                },
                Series {
                    label: "pipelined".into(),
                    points: vec![(1.0, 18.0), (8.0, 150.0), (64.0, 900.0), (128.0, f64::NAN)],
                },
            ],
            reference: Some((50.0, "RTT".into())),
        }
    }

    #[test]
    fn line_chart_has_every_point_and_escapes_text() {
        let svg = line_chart(&chart(Scale::Linear));
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // 6 finite points plus 2 legend markers.
        assert_eq!(svg.matches("<circle").count(), 8);
        assert!(svg.contains("TPC-B &lt;scale 1&gt;"));
        assert!(svg.contains("stroke-dasharray"), "reference line drawn");
        // Log2 x ticks 1, 2, 4, ..., 64.
        for t in ["1", "2", "4", "8", "16", "32", "64"] {
            assert!(svg.contains(&format!(">{t}</text>")), "x tick {t}");
        }
    }

    #[test]
    fn log_y_axis_skips_non_positive_values() {
        let mut c = chart(Scale::Log10);
        c.series[0].points.push((2.0, 0.0));
        let svg = line_chart(&c);
        assert_eq!(svg.matches("<circle").count(), 8);
        assert!(svg.contains(">1k</text>") || svg.contains(">1000</text>"));
    }

    #[test]
    fn points_map_inside_the_plot_area() {
        let svg = line_chart(&chart(Scale::Linear));
        for cap in svg.split("<circle cx=\"").skip(1) {
            let mut it = cap.split('"');
            let cx: f64 = it.next().unwrap_or("x").parse().unwrap_or(-1.0);
            let cy: f64 = it.nth(1).unwrap_or("x").parse().unwrap_or(-1.0);
            assert!((ML - 0.01..=W).contains(&cx), "cx {cx}");
            assert!((MT - 0.01..=H - MB + 0.01).contains(&cy), "cy {cy}");
        }
    }

    #[test]
    fn bar_chart_draws_one_bar_per_value() {
        let c = BarChart {
            title: "views".into(),
            y_label: "requests".into(),
            categories: vec!["async".into(), "sync".into(), "pipelined".into()],
            series: vec![
                ("PV".into(), vec![500.0, 480.0, 490.0]),
                ("SV".into(), vec![470.0, 480.0, 488.0]),
                ("CV".into(), vec![495.0, 470.0, f64::NAN]),
            ],
            reference: None,
        };
        let svg = bar_chart(&c);
        // 8 bars + 3 legend swatches + background.
        assert_eq!(svg.matches("<rect").count(), 8 + 3 + 1 + 1);
    }

    #[test]
    fn nice_ticks_cover_the_range() {
        let t = nice_ticks(0.0, 973.0, 6);
        assert_eq!(t.first().copied(), Some(0.0));
        assert!(t.last().copied().unwrap_or(0.0) >= 973.0);
        assert!(t.len() <= 12);
        assert_eq!(tick_label(1000.0), "1000");
        assert_eq!(tick_label(20000.0), "20k");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(0.25), "0.25");
    }
}
