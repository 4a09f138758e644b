//! Drives stock `pgbench` from the client namespace against a PostgreSQL server
//! of the emulated site, and parses its summary.
//!
//! Two workloads (figure (a)):
//! - [`Workload::TpcB`]: pgbench's TPC-B-like transaction at scale 1 — one row of
//!   `pgbench_branches` that every transaction updates (the hot row: the analogue
//!   of the paper's table lock). The five statements are sent as ONE pipelined
//!   batch (`\startpipeline` ... `\endpipeline`), so a transaction costs one client
//!   round trip, like a stored procedure or an application server's batch. (With
//!   one round trip per statement, every intermediate reply of a black-box
//!   database would also wait for the commit of earlier transactions under
//!   pipelined synchrony, while the row lock is held.)
//! - [`Workload::TpcBInteractive`]: the same transaction with one client round
//!   trip per statement (pgbench's built-in `tpcb-like`), for comparison.
//! - [`Workload::Insert`]: one single-row autocommit `INSERT` of an 8-byte value
//!   per transaction, no contention (the paper's MySQL insert client, Fig. 9).

use crate::sys::{ns_cmd, run};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

/// A pgbench workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    TpcB,
    TpcBInteractive,
    Insert,
}

impl Workload {
    /// Every workload, in table order.
    pub const ALL: [Workload; 3] = [Workload::TpcB, Workload::TpcBInteractive, Workload::Insert];

    /// Short name used on the command line, in tables and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::TpcB => "tpcb",
            Workload::TpcBInteractive => "tpcb-interactive",
            Workload::Insert => "insert",
        }
    }

    /// Human title used in plots.
    pub fn title(self) -> &'static str {
        match self {
            Workload::TpcB => "TPC-B, scale 1 (one hot row)",
            Workload::TpcBInteractive => "TPC-B, one round trip per statement",
            Workload::Insert => "single-row INSERT",
        }
    }

    /// The custom script text (pgbench `-f`).
    pub fn script(self) -> &'static str {
        match self {
            Workload::TpcB => TPCB_PIPELINED,
            Workload::TpcBInteractive => TPCB_INTERACTIVE,
            Workload::Insert => INSERT_ONLY,
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.as_str() == s.trim())
            .ok_or_else(|| {
                format!("unknown workload {s:?} (expected tpcb, tpcb-interactive or insert)")
            })
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const TPCB_PIPELINED: &str = r"\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
\startpipeline
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
\endpipeline
";

const TPCB_INTERACTIVE: &str = r"\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
";

const INSERT_ONLY: &str = r"\set v random(1, 1000000000)
INSERT INTO pgbench_ins (v) VALUES (:v);
";

/// Where pgbench runs and what it talks to.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Network namespace pgbench runs in (the client's).
    pub client_ns: String,
    pub host: Ipv4Addr,
    pub port: u16,
}

impl Endpoint {
    fn base(&self, prog: &str) -> std::process::Command {
        let mut c = ns_cmd(&self.client_ns, &crate::pg::pg_bin(prog));
        c.args([
            "-h",
            &self.host.to_string(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        c
    }
}

/// Creates the pgbench tables at scale `scale` (`pgbench -i`) and the insert-only
/// table, then checkpoints so the runs start from a clean state.
pub fn init(ep: &Endpoint, scale: u32) -> Result<()> {
    let mut c = ep.base("pgbench");
    c.args(["-i", "-q", "-s", &scale.to_string(), "postgres"]);
    run(&mut c).context("pgbench -i")?;
    sql(
        ep,
        "DROP TABLE IF EXISTS pgbench_ins; CREATE TABLE pgbench_ins (v bigint NOT NULL); CHECKPOINT;",
    )?;
    Ok(())
}

/// Runs SQL through psql from the client namespace.
pub fn sql(ep: &Endpoint, text: &str) -> Result<String> {
    let mut c = ep.base("psql");
    c.args(crate::pg::PSQL_FLAGS)
        .args(["-d", "postgres", "-c", text]);
    run(&mut c)
}

/// Summary of one pgbench run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PgbenchResult {
    /// Transactions per second, without the initial connection time.
    pub tps: f64,
    /// Mean transaction latency in ms.
    pub latency_ms: f64,
    /// Transactions completed.
    pub transactions: u64,
    /// Transactions that failed (serialization/deadlock, reported by pgbench 15).
    pub failed: u64,
}

/// How one pgbench run went over time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunShape {
    /// tps of each second of the run (`--progress 1`), warm-up included.
    pub per_second: Vec<f64>,
    /// How many of them are the warm-up's.
    pub warmup_lines: usize,
    /// Whether the result came from the progress lines after the warm-up
    /// (else: pgbench's summary of the whole run).
    pub measured_from_progress: bool,
    /// pgbench's `initial connection time` (ms): with replies held one round
    /// trip, every connection's handshake (SYN-ACK, SSL refusal, startup)
    /// costs several, and pgbench connects a thread's clients one by one.
    pub connect_ms: Option<f64>,
}

/// How pgbench spreads its clients over its threads (`-j`).
///
/// A pgbench thread serves its clients from one event loop, but a few of its
/// calls block the whole thread for one client's round trip: every new
/// connection's handshake, and with `-M prepared` each statement's first
/// `PQprepare` (pgbench 15 prepares the six statements of a `\startpipeline`
/// block one blocking call at a time). Under pipelined synchrony each of these
/// replies is held one WAN round trip, so a thread with 128 clients spends
/// 128 × 6 × RTT (38 s at 50 ms) preparing before its last client runs, while
/// its other clients' replies wait unread in their sockets (issue 20: the
/// 256-client stall, docs/design.md §16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Two threads (the machine's cores), as pgbench is usually run here.
    Two,
    /// One thread per client, like an application with one connection per
    /// worker: a client's blocking round trip stalls only itself.
    PerClient,
}

impl Threads {
    /// pgbench's `-j` for `clients` clients.
    pub fn count(self, clients: u32) -> u32 {
        match self {
            Threads::Two => clients.clamp(1, 2),
            Threads::PerClient => clients.max(1),
        }
    }
}

/// One point: what pgbench runs and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub workload: Workload,
    pub clients: u32,
    pub threads: Threads,
    /// Seconds run first and not measured, on the same connections.
    pub warmup: Duration,
    /// Seconds measured after the warm-up.
    pub duration: Duration,
}

/// Runs one point in ONE pgbench process: `warmup`, then `duration` measured.
/// The warm-up shares the measured run's connections, so neither connecting
/// nor each connection's first statements (`PQprepare`: one held round trip
/// each under pipelined synchrony) fall into the measurement; the result is
/// taken from pgbench's progress lines after the warm-up ([`measured`]).
/// `at_measure_start` runs when the warm-up's last progress line arrives
/// (before starting pgbench when there is no warm-up). Returns the measured
/// result and the shape of the whole run.
pub fn run_point(
    ep: &Endpoint,
    point: Point,
    script_dir: &Path,
    at_measure_start: &mut dyn FnMut(),
) -> Result<(PgbenchResult, RunShape)> {
    use std::io::{BufRead, Read};
    let Point {
        workload,
        clients,
        threads,
        warmup,
        duration,
    } = point;
    let script = script_dir.join(format!("pgbench-{}.sql", workload.as_str()));
    std::fs::write(&script, workload.script())
        .with_context(|| format!("writing {}", script.display()))?;
    let threads = threads.count(clients);
    let total = warmup.as_secs() + duration.as_secs().max(1);
    let mut c = ep.base("pgbench");
    c.args(["-n", "-M", "prepared", "-s", "1", "-P", "1"])
        .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
        .args(["-T", &total.to_string()])
        .arg("-f")
        .arg(&script)
        .arg("postgres");
    let what = || format!("pgbench {} with {clients} clients", workload.as_str());
    let warm_secs = warmup.as_secs_f64();
    if warm_secs == 0.0 {
        at_measure_start();
    }
    let mut child = c
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(what)?;
    let mut stdout_pipe = child.stdout.take().context("pgbench stdout")?;
    let stdout_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout_pipe.read_to_string(&mut s);
        s
    });
    let mut stderr = String::new();
    let mut started = warm_secs == 0.0;
    if let Some(pipe) = child.stderr.take() {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if !started && progress_line(&line).is_some_and(|p| p.at_s >= warm_secs - 0.05) {
                at_measure_start();
                started = true;
            }
            stderr.push_str(&line);
            stderr.push('\n');
        }
    }
    let status = child.wait().with_context(what)?;
    let stdout = stdout_reader
        .join()
        .map_err(|_| anyhow::anyhow!("pgbench stdout reader panicked"))?;
    if !status.success() {
        anyhow::bail!("{} failed ({status}): {}", what(), stderr.trim());
    }
    let connect_ms = stdout.lines().find_map(|l| {
        l.trim()
            .strip_prefix("initial connection time =")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    let summary = parse_summary(&stdout)?;
    let progress: Vec<Progress> = stderr.lines().filter_map(progress_line).collect();
    let (result, measured_from_progress) = match measured(&progress, warm_secs, duration, clients) {
        Some(r) if warm_secs > 0.0 => (r, true),
        _ => (summary, false),
    };
    Ok((
        result,
        RunShape {
            per_second: progress.iter().map(|p| p.tps).collect(),
            warmup_lines: if warm_secs > 0.0 {
                warmup_end(&progress, warm_secs).map_or(progress.len(), |b| b + 1)
            } else {
                0
            },
            measured_from_progress,
            connect_ms,
        },
    ))
}

/// One `progress: T s, X tps, ...` line of pgbench `-P`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Seconds since the benchmark started.
    pub at_s: f64,
    /// Transactions per second since the previous line.
    pub tps: f64,
    /// Failed transactions since the previous line.
    pub failed: u64,
}

/// Parses one progress line (`None` for any other line).
pub fn progress_line(line: &str) -> Option<Progress> {
    let rest = line.trim().strip_prefix("progress:")?;
    let mut p = Progress {
        at_s: 0.0,
        tps: 0.0,
        failed: 0,
    };
    for (i, field) in rest.split(',').enumerate() {
        let words: Vec<&str> = field.split_whitespace().collect();
        match (i, words.as_slice()) {
            (0, [t, "s", ..]) => p.at_s = t.parse().ok()?,
            (1, [x, "tps", ..]) => p.tps = x.parse().ok()?,
            (_, [n, "failed", ..]) => p.failed = n.parse().ok()?,
            _ => {}
        }
    }
    Some(p)
}

/// Index of the progress line that ends the warm-up: the first whose time
/// reaches `warmup_s` (a late line that straddles the boundary belongs to the
/// warm-up, so nothing of it is measured).
fn warmup_end(progress: &[Progress], warmup_s: f64) -> Option<usize> {
    progress.iter().position(|p| p.at_s >= warmup_s - 0.05)
}

/// The result over the progress lines after the warm-up ([`warmup_end`])
/// up to the end of the measured `duration`:
/// transactions are each line's tps times its interval (a late line covers a
/// longer one); the latency is Little's law over the `clients` closed loops,
/// as pgbench's own summary computes it (the progress lines' mean latency
/// leaves out transactions still running at the window's end: biased low
/// when the latency is as long as the window, e.g. PostgreSQL standby's
/// TPC-B). `None` when those lines cover less than half of `duration` (pgbench's thread 0 did not report: the
/// caller falls back to the whole run's summary).
pub fn measured(
    progress: &[Progress],
    warmup_s: f64,
    duration: Duration,
    clients: u32,
) -> Option<PgbenchResult> {
    let b = warmup_end(progress, warmup_s)?;
    let mut prev = progress[b].at_s;
    let (mut secs, mut tx, mut failed) = (0.0, 0.0, 0);
    // After `-T` pgbench starts no new transaction and only drains the ones
    // in flight: lines past the end do not describe the load.
    let end = warmup_s + duration.as_secs_f64() + 0.05;
    for p in progress[b + 1..].iter().take_while(|p| p.at_s <= end) {
        let dt = p.at_s - prev;
        prev = p.at_s;
        secs += dt;
        tx += p.tps * dt;
        failed += p.failed;
    }
    if secs < duration.as_secs_f64() / 2.0 || secs <= 0.0 {
        return None;
    }
    Some(PgbenchResult {
        tps: tx / secs,
        latency_ms: if tx > 0.0 {
            f64::from(clients) * secs * 1e3 / tx
        } else {
            f64::NAN
        },
        transactions: tx.round() as u64,
        failed,
    })
}

/// Parses pgbench's summary (the lines `number of transactions actually
/// processed: N`, `number of failed transactions: N (x%)`, `latency average = X ms`,
/// `tps = X (without initial connection time)`).
pub fn parse_summary(out: &str) -> Result<PgbenchResult> {
    let mut r = PgbenchResult::default();
    let (mut have_tps, mut have_lat) = (false, false);
    for line in out.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
            let n = rest.split('/').next().unwrap_or("").trim();
            r.transactions = n.parse().with_context(|| format!("bad line {line:?}"))?;
        } else if let Some(rest) = line.strip_prefix("number of failed transactions:") {
            let n = rest.split_whitespace().next().unwrap_or("");
            r.failed = n.parse().with_context(|| format!("bad line {line:?}"))?;
        } else if let Some(rest) = line.strip_prefix("latency average =") {
            let n = rest.split_whitespace().next().unwrap_or("");
            r.latency_ms = n.parse().with_context(|| format!("bad line {line:?}"))?;
            have_lat = true;
        } else if let Some(rest) = line.strip_prefix("tps =") {
            if line.contains("without initial connection time") || !have_tps {
                let n = rest.split_whitespace().next().unwrap_or("");
                r.tps = n.parse().with_context(|| format!("bad line {line:?}"))?;
                have_tps = true;
            }
        }
    }
    if !have_tps || !have_lat {
        bail!("pgbench printed no summary:\n{out}");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: /tmp/x.sql
scaling factor: 1
query mode: prepared
number of clients: 64
number of threads: 2
maximum number of tries: 1
duration: 5 s
number of transactions actually processed: 4711
number of failed transactions: 0 (0.000%)
latency average = 67.654 ms
initial connection time = 512.345 ms
tps = 945.983211 (without initial connection time)
";

    #[test]
    fn parses_the_pgbench_15_summary() {
        let r = parse_summary(SAMPLE).unwrap_or_default();
        assert_eq!(r.transactions, 4711);
        assert_eq!(r.failed, 0);
        assert!((r.latency_ms - 67.654).abs() < 1e-9);
        assert!((r.tps - 945.983211).abs() < 1e-9);
    }

    #[test]
    fn parses_the_progress_lines() {
        let e = "pgbench (15.8)\nprogress: 1.0 s, 212.0 tps, lat 301.2 ms stddev 20.1, 0 failed\n\
                 progress: 2.0 s, 3410.5 tps, lat 74.9 ms stddev 3.0, 0 failed\n";
        let p: Vec<Progress> = e.lines().filter_map(progress_line).collect();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            Progress {
                at_s: 1.0,
                tps: 212.0,
                failed: 0
            }
        );
        assert_eq!(p[1].tps, 3410.5);
        assert!(progress_line("tps = 3.0").is_none());
    }

    #[test]
    fn measures_after_the_warm_up() {
        let line = |at_s: f64, tps: f64| Progress {
            at_s,
            tps,
            failed: 1,
        };
        // Two warm-up seconds (slow: connecting, preparing), then a late
        // line covering two seconds, then one more.
        let p = [
            line(1.0, 5.0),
            line(2.0, 50.0),
            line(4.0, 100.0),
            line(5.0, 200.0),
        ];
        let r = measured(&p, 2.0, Duration::from_secs(3), 10).unwrap_or_default();
        assert_eq!(r.transactions, 400);
        assert!((r.tps - 400.0 / 3.0).abs() < 1e-9, "{r:?}");
        // 10 clients at 133.3 tps: 75 ms each.
        assert!((r.latency_ms - 75.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.failed, 2);
        // Too little after the warm-up: the caller uses the summary.
        assert_eq!(measured(&p[..2], 2.0, Duration::from_secs(3), 10), None);
        assert_eq!(measured(&p, 4.0, Duration::from_secs(3), 10), None);
        // A late line straddling the warm-up's end is the warm-up's.
        let r = measured(&p, 3.0, Duration::from_secs(2), 10).unwrap_or_default();
        assert_eq!(r.transactions, 200);
        // Lines after the measured time (pgbench draining) are left out.
        let r = measured(&p, 2.0, Duration::from_secs(2), 10).unwrap_or_default();
        assert_eq!(r.transactions, 200);
    }

    #[test]
    fn a_run_without_summary_is_an_error() {
        assert!(parse_summary("pgbench: error: connection refused\n").is_err());
    }

    #[test]
    fn workloads_round_trip_their_names() {
        for w in Workload::ALL {
            assert_eq!(w.as_str().parse::<Workload>(), Ok(w));
            assert!(w.script().ends_with('\n'));
        }
        assert!("tpcc".parse::<Workload>().is_err());
        assert!(Workload::TpcB.script().contains("\\startpipeline"));
        assert!(!Workload::TpcBInteractive
            .script()
            .contains("\\startpipeline"));
    }
}
