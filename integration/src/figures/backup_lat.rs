//! The backup's share of a held reply's `round` (docs/design.md §8, §18): its
//! queue wait (frame received → its group commit starts) and its journal
//! append + `fdatasync` per batch, read from the backup server's `/metrics`
//! before and after a pipelined point and subtracted. The server's histograms
//! have fixed buckets, so the quantiles are bucket bounds ("≤").

/// Cumulative `(upper bound s, count)` buckets of the two histograms.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct BackupLatency {
    queue: Vec<(f64, u64)>,
    journal: Vec<(f64, u64)>,
}

const QUEUE: &str = "pipecloud_backup_queue_latency_seconds_bucket";
const JOURNAL: &str = "pipecloud_backup_journal_latency_seconds_bucket";

fn buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let mut v: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let n = rest.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((le, n))
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The bucket bound (ms) below which a share `p` of the observations fell.
fn quantile(b: &[(f64, u64)], p: f64) -> Option<f64> {
    let total = b.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (p * total as f64).ceil() as u64;
    b.iter().find(|(_, n)| *n >= want).map(|(le, _)| le * 1e3)
}

/// The bound (ms) of the highest bucket that holds an observation.
fn max_bound(b: &[(f64, u64)]) -> Option<f64> {
    let total = b.last()?.1;
    (total > 0)
        .then(|| b.iter().find(|(_, n)| *n >= total).map(|(le, _)| le * 1e3))
        .flatten()
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |ms| format!("≤{ms}"))
}

impl BackupLatency {
    /// Parses a Prometheus text exposition.
    pub(super) fn parse(text: &str) -> BackupLatency {
        BackupLatency {
            queue: buckets(text, QUEUE),
            journal: buckets(text, JOURNAL),
        }
    }

    /// What was observed after `before`.
    pub(super) fn since(&self, before: &BackupLatency) -> BackupLatency {
        let sub = |a: &[(f64, u64)], b: &[(f64, u64)]| -> Vec<(f64, u64)> {
            a.iter()
                .map(|&(le, n)| {
                    let was = b.iter().find(|(l, _)| *l == le).map_or(0, |x| x.1);
                    (le, n.saturating_sub(was))
                })
                .collect()
        };
        BackupLatency {
            queue: sub(&self.queue, &before.queue),
            journal: sub(&self.journal, &before.journal),
        }
    }

    /// `backup queue p50/p99 ≤a/≤b ms, journal+fdatasync ≤c/≤d ms (n batches)`.
    pub(super) fn line(&self) -> String {
        format!(
            "backup: queue p50/p99/max {}/{}/{} ms, journal append+fdatasync p50/p99/max {}/{}/{} ms over {} batches",
            fmt(quantile(&self.queue, 0.5)),
            fmt(quantile(&self.queue, 0.99)),
            fmt(max_bound(&self.queue)),
            fmt(quantile(&self.journal, 0.5)),
            fmt(quantile(&self.journal, 0.99)),
            fmt(max_bound(&self.journal)),
            self.journal.last().map_or(0, |x| x.1)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE pipecloud_backup_journal_latency_seconds histogram
pipecloud_backup_journal_latency_seconds_bucket{le=\"0.001\"} 10
pipecloud_backup_journal_latency_seconds_bucket{le=\"0.005\"} 98
pipecloud_backup_journal_latency_seconds_bucket{le=\"0.05\"} 100
pipecloud_backup_journal_latency_seconds_bucket{le=\"+Inf\"} 100
pipecloud_backup_queue_latency_seconds_bucket{le=\"0.001\"} 3
pipecloud_backup_queue_latency_seconds_bucket{le=\"+Inf\"} 3
";

    #[test]
    fn quantiles_are_bucket_bounds_of_the_difference() {
        let after = BackupLatency::parse(TEXT);
        assert_eq!(quantile(&after.journal, 0.5), Some(5.0));
        assert_eq!(quantile(&after.journal, 0.99), Some(50.0));
        assert_eq!(max_bound(&after.journal), Some(50.0));
        assert_eq!(max_bound(&BackupLatency::default().journal), None);
        let before = BackupLatency::parse(
            "pipecloud_backup_journal_latency_seconds_bucket{le=\"0.001\"} 10\n\
             pipecloud_backup_journal_latency_seconds_bucket{le=\"0.005\"} 10\n\
             pipecloud_backup_journal_latency_seconds_bucket{le=\"0.05\"} 10\n\
             pipecloud_backup_journal_latency_seconds_bucket{le=\"+Inf\"} 10\n",
        );
        let d = after.since(&before);
        assert_eq!(quantile(&d.journal, 0.5), Some(5.0));
        assert_eq!(d.journal.last(), Some(&(f64::INFINITY, 90)));
        assert!(d.line().contains("over 90 batches"), "{}", d.line());
        assert_eq!(quantile(&BackupLatency::default().queue, 0.5), None);
    }
}
