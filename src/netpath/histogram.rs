//! A fixed-size, always-on latency histogram with ~3 % resolution: what the hold
//! breakdown (issue 20) records per released packet.
//!
//! Log-linear buckets (as in HdrHistogram): values below 32 have a bucket each;
//! above, every power of two is split into 32 equal buckets, so a bucket's
//! width is at most 1/32 of its lower bound (at 50 ms: 1.0 ms wide; the
//! quantiles interpolate inside the bucket). Values are whole units (the callers
//! use microseconds or counts) and saturate at 2^36. Recording is one relaxed
//! `fetch_add` on each of two atomics; readers take a [`HistSnapshot`] and may
//! subtract an earlier one to get the distribution of an interval. Bounded:
//! [`BUCKETS`] counters, whatever is recorded.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Sub-buckets per power of two (log2).
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Largest value kept apart (larger ones count as this).
pub const MAX_VALUE: u64 = 1 << 36;
/// Buckets of a histogram.
pub const BUCKETS: usize = bucket_of(MAX_VALUE) + 1;

const fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    (((shift + 1) as u64) << SUB_BITS) as usize + sub as usize
}

/// Smallest value of bucket `i`, and its width.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, 1);
    }
    let shift = (i >> SUB_BITS) - 1;
    let sub = i & (SUB - 1);
    ((SUB + sub) << shift, 1 << shift)
}

/// The histogram (module docs).
#[derive(Debug)]
pub struct LogHistogram {
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Default for LogHistogram {
    fn default() -> Self {
        LogHistogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }
}

impl LogHistogram {
    /// Records one value.
    pub fn record(&self, v: u64) {
        let v = v.min(MAX_VALUE);
        self.counts[bucket_of(v)].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> HistSnapshot {
        HistSnapshot {
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            sum: self.sum.load(Relaxed),
        }
    }
}

/// A copy of a [`LogHistogram`]'s counts (serialised sparse: `[bucket, count]` pairs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistSnapshot {
    counts: Vec<u64>,
    sum: u64,
}

impl Serialize for HistSnapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let sparse: Vec<(usize, u64)> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i, *c))
            .collect();
        let mut st = s.serialize_struct("HistSnapshot", 2)?;
        st.serialize_field("sum", &self.sum)?;
        st.serialize_field("buckets", &sparse)?;
        st.end()
    }
}

/// The compact text form `ctl hold` prints and the harness reads back:
/// `SUM;BUCKET:COUNT,BUCKET:COUNT,...` (non-empty buckets only).
impl std::fmt::Display for HistSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{};", self.sum)?;
        let mut first = true;
        for (i, c) in self.counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{i}:{c}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for HistSnapshot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (sum, rest) = s
            .split_once(';')
            .ok_or_else(|| format!("histogram {s:?}: expected SUM;BUCKET:COUNT,..."))?;
        let sum = sum
            .parse()
            .map_err(|e| format!("histogram sum {sum:?}: {e}"))?;
        let mut buckets = Vec::new();
        for pair in rest.split(',').filter(|p| !p.is_empty()) {
            let parsed = pair
                .split_once(':')
                .and_then(|(i, c)| Some((i.parse().ok()?, c.parse().ok()?)));
            buckets.push(parsed.ok_or_else(|| format!("histogram bucket {pair:?}"))?);
        }
        Ok(HistSnapshot::from_sparse(sum, &buckets))
    }
}

impl HistSnapshot {
    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of the values recorded.
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Rebuilds a snapshot from its sparse form (`[bucket, count]` pairs);
    /// out-of-range buckets are ignored.
    pub fn from_sparse(sum: u64, buckets: &[(usize, u64)]) -> HistSnapshot {
        let mut counts = vec![0; BUCKETS];
        for &(i, c) in buckets {
            if let Some(x) = counts.get_mut(i) {
                *x += c;
            }
        }
        HistSnapshot { counts, sum }
    }

    /// What was recorded since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistSnapshot) -> HistSnapshot {
        HistSnapshot {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
                .collect(),
            sum: self.sum.saturating_sub(earlier.sum),
        }
    }

    /// The `q`-quantile (0..=1), interpolated inside its bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * n as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let (lo, width) = bounds(i);
                let frac = (rank - seen as f64) / c as f64;
                return Some(lo as f64 + frac * width as f64);
            }
            seen += c;
        }
        None
    }

    /// Mean of the values; `None` when empty.
    pub fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum as f64 / n as f64)
    }

    /// Cumulative counts at each upper bound of `les` (for a Prometheus
    /// histogram): a bucket counts under every bound at or above its lower end,
    /// so a bound inside a bucket may count up to 3 % too early; values above
    /// the last bound only count in the total.
    pub fn cumulative(&self, les: &[u64]) -> Vec<(u64, u64)> {
        les.iter()
            .map(|&le| {
                let c = self
                    .counts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bounds(*i).0 <= le)
                    .map(|(_, c)| *c)
                    .sum();
                (le, c)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_once_and_are_narrow() {
        let mut last = None;
        for v in (0..5000u64).chain([49_999, 50_000, 1 << 20, MAX_VALUE]) {
            let i = bucket_of(v);
            let (lo, w) = bounds(i);
            assert!(lo <= v && v < lo + w, "{v} in bucket {i} = [{lo}, +{w})");
            assert!(w == 1 || w * 32 <= lo, "bucket {i} too wide");
            if let Some(l) = last {
                assert!(i >= l, "buckets grow with the value");
            }
            last = Some(i);
        }
        assert_eq!(bucket_of(MAX_VALUE), BUCKETS - 1);
    }

    #[test]
    fn quantiles_and_intervals() {
        let h = LogHistogram::default();
        for v in 1..=100 {
            h.record(v * 1000); // 1..100 ms in µs
        }
        let a = h.snapshot();
        let p50 = a.quantile(0.5).unwrap();
        assert!((p50 - 50_000.0).abs() < 1_600.0, "{p50}");
        let p99 = a.quantile(0.99).unwrap();
        assert!((p99 - 99_000.0).abs() < 3_200.0, "{p99}");
        assert_eq!(a.count(), 100);
        assert_eq!(a.mean(), Some(50_500.0));
        for _ in 0..10 {
            h.record(7);
        }
        let d = h.snapshot().since(&a);
        assert_eq!(d.count(), 10);
        assert_eq!(d.quantile(0.5), Some(7.5));
        assert_eq!(HistSnapshot::default().quantile(0.5), None);
        assert_eq!(d.to_string(), "70;7:10");
        assert_eq!("70;7:10".parse::<HistSnapshot>(), Ok(d));
        assert_eq!(
            "0;".parse::<HistSnapshot>(),
            Ok(HistSnapshot::from_sparse(0, &[]))
        );
        assert!("7:10".parse::<HistSnapshot>().is_err());
        assert!("1;x:1".parse::<HistSnapshot>().is_err());
        assert_eq!(
            a.cumulative(&[10_000, 1_000_000]),
            vec![(10_000, 10), (1_000_000, 100)]
        );
    }
}
