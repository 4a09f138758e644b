//! The hold breakdown of a pipelined point of figure (a) (issue 20): what the
//! agent's `ctl hold` histograms recorded during the point (the difference of
//! two snapshots), reduced to the quantiles the table, `hold.csv` and the
//! `RESULT` line show. `hold_extra` is the held time minus the WAN round trip
//! measured for the site: what a reply pays beyond the physical floor.

use pipecloud::netpath::{HistSnapshot, HoldSnapshot};
use std::fmt::Write as _;

/// One pipelined point's breakdown (ms unless named otherwise).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct HoldRow {
    pub(super) workload: String,
    pub(super) clients: u32,
    /// Packets released after a hold during the point.
    pub(super) released: u64,
    pub(super) hold_p50: f64,
    pub(super) hold_p99: f64,
    pub(super) hold_mean: f64,
    pub(super) dep_send_p50: f64,
    pub(super) dep_send_p99: f64,
    pub(super) round_p50: f64,
    pub(super) round_p99: f64,
    pub(super) release_p50: f64,
    pub(super) release_p99: f64,
    pub(super) dep_age_p50: f64,
    /// Writes beyond the committed vector a tag needed on arrival.
    pub(super) waits_p50: f64,
    pub(super) waits_p99: f64,
    /// Share of released packets split into parts (the rest: remote, behind, unexplained).
    pub(super) explained_share: f64,
}

/// CSV header of `hold.csv`.
pub(super) const CSV_HEADER: &str = "workload,clients,released,hold_p50_ms,hold_p99_ms,hold_mean_ms,dep_send_p50_ms,dep_send_p99_ms,round_p50_ms,round_p99_ms,release_p50_ms,release_p99_ms,dep_age_p50_ms,waits_for_p50,waits_for_p99,explained_share";
/// Fields of a `hold.csv` row.
pub(super) const CSV_FIELDS: usize = 16;

fn q(h: &HistSnapshot, p: f64, scale: f64) -> f64 {
    h.quantile(p).map_or(f64::NAN, |v| v / scale)
}

impl HoldRow {
    /// The row of `s` (what one point recorded).
    pub(super) fn of(workload: &str, clients: u32, s: &HoldSnapshot) -> HoldRow {
        let n = s.hold_us.count();
        HoldRow {
            workload: workload.to_string(),
            clients,
            released: n,
            hold_p50: q(&s.hold_us, 0.5, 1e3),
            hold_p99: q(&s.hold_us, 0.99, 1e3),
            hold_mean: s.hold_us.mean().map_or(f64::NAN, |v| v / 1e3),
            dep_send_p50: q(&s.dep_send_us, 0.5, 1e3),
            dep_send_p99: q(&s.dep_send_us, 0.99, 1e3),
            round_p50: q(&s.round_us, 0.5, 1e3),
            round_p99: q(&s.round_us, 0.99, 1e3),
            release_p50: q(&s.release_us, 0.5, 1e3),
            release_p99: q(&s.release_us, 0.99, 1e3),
            dep_age_p50: q(&s.dep_age_us, 0.5, 1e3),
            waits_p50: q(&s.waits_for, 0.5, 1.0),
            waits_p99: q(&s.waits_for, 0.99, 1.0),
            explained_share: if n == 0 {
                f64::NAN
            } else {
                s.explained as f64 / n as f64
            },
        }
    }

    /// The numbers after workload, clients and released, in CSV order.
    fn values(&self) -> [f64; 13] {
        [
            self.hold_p50,
            self.hold_p99,
            self.hold_mean,
            self.dep_send_p50,
            self.dep_send_p99,
            self.round_p50,
            self.round_p99,
            self.release_p50,
            self.release_p99,
            self.dep_age_p50,
            self.waits_p50,
            self.waits_p99,
            self.explained_share,
        ]
    }

    /// One line for the log and the table.
    pub(super) fn line(&self, rtt_ms: f64) -> String {
        let [h50, h99, mean, s50, s99, r50, r99, l50, l99, age, w50, w99, explained] =
            self.values();
        format!(
            "{:<8} {:>4} released={:<7} hold p50/p99 {h50:.1}/{h99:.1} mean {mean:.1} (extra {:+.1}/{:+.1}) = send {s50:.1}/{s99:.1} + round {r50:.1}/{r99:.1} + release {l50:.1}/{l99:.1}; newest dep {age:.1} old, waits for {w50:.0}/{w99:.0} writes; explained {:.0}%",
            self.workload,
            self.clients,
            self.released,
            h50 - rtt_ms,
            h99 - rtt_ms,
            explained * 100.0,
        )
    }

    pub(super) fn csv(&self) -> String {
        let mut s = format!("{},{},{}", self.workload, self.clients, self.released);
        for v in self.values() {
            let _ = write!(s, ",{v:.3}");
        }
        s
    }

    pub(super) fn from_csv(r: &[String]) -> Result<HoldRow, String> {
        let f = |i: usize| -> Result<f64, String> {
            r.get(i)
                .ok_or_else(|| format!("hold.csv: missing field {i}"))?
                .parse::<f64>()
                .map_err(|e| format!("hold.csv field {i}: {e}"))
        };
        let mut v = [0.0; 13];
        for (i, x) in v.iter_mut().enumerate() {
            *x = f(3 + i)?;
        }
        let [hold_p50, hold_p99, hold_mean, dep_send_p50, dep_send_p99, round_p50, round_p99, release_p50, release_p99, dep_age_p50, waits_p50, waits_p99, explained_share] =
            v;
        Ok(HoldRow {
            workload: r.first().cloned().unwrap_or_default(),
            clients: f(1)? as u32,
            released: f(2)? as u64,
            hold_p50,
            hold_p99,
            hold_mean,
            dep_send_p50,
            dep_send_p99,
            round_p50,
            round_p99,
            release_p50,
            release_p99,
            dep_age_p50,
            waits_p50,
            waits_p99,
            explained_share,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_csv() {
        let s = HoldSnapshot {
            hold_us: "530000;".parse().unwrap(),
            ..HoldSnapshot::default()
        };
        let h: HistSnapshot = "106000;".parse().unwrap();
        assert_eq!(h.count(), 0);
        let r = HoldRow::of("tpcb", 64, &s);
        assert!(r.hold_p50.is_nan());
        let full = HoldRow {
            workload: "tpcb".into(),
            clients: 64,
            released: 10,
            hold_p50: 53.0,
            hold_p99: 70.5,
            explained_share: 0.9,
            ..HoldRow::default()
        };
        let fields: Vec<String> = full.csv().split(',').map(str::to_string).collect();
        assert_eq!(fields.len(), CSV_FIELDS);
        assert_eq!(HoldRow::from_csv(&fields), Ok(full.clone()));
        assert!(
            full.line(50.0).contains("extra +3.0/+20.5"),
            "{}",
            full.line(50.0)
        );
        assert_eq!(CSV_HEADER.split(',').count(), CSV_FIELDS);
    }
}
