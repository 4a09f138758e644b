//! Figure (a): pgbench throughput and latency against the number of clients,
//! per replication variant, on ONE database.
//!
//! The agent's modes (`async`, `sync`, `pipelined`) are switched at run time on
//! a single running site, interleaved point by point, so a drift of the
//! machine's background load hits every variant alike; PostgreSQL's own
//! synchronous standby is attached afterwards across the same WAN. The largest
//! client count carries the headline ratios, so it is repeated and each
//! variant's median run is kept.

use super::hold::HoldRow;
use super::report::{rtt_row, APoint, Figures};
use super::rig::{rtt_retry, site_options, topology_file, BareRig, Rig};
use super::{check_interrupted, Plan, SINGLE_DB};
use crate::pgbench::{self, PgbenchResult};
use crate::run::Site;
use crate::standby::SyncStandby;
use anyhow::{bail, Context, Result};
use pipecloud::netpath::HoldSnapshot;
use pipecloud_core::topology::Mode;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// A replication variant of figure (a).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Variant {
    Async,
    Sync,
    Pipelined,
    /// PostgreSQL's synchronous streaming replication to a standby across the WAN.
    PgSync,
    /// PostgreSQL on a plain directory, no replication (only with `--no-agent`).
    Plain,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Async,
        Variant::Sync,
        Variant::Pipelined,
        Variant::PgSync,
        Variant::Plain,
    ];

    /// Name in tables, CSV files and on the command line.
    fn as_str(self) -> &'static str {
        match self {
            Variant::Async => "async",
            Variant::Sync => "sync",
            Variant::Pipelined => "pipelined",
            Variant::PgSync => "pg-sync-standby",
            Variant::Plain => "no-replication",
        }
    }

    /// The agent's mode during the variant's points (`None`: no agent).
    /// PostgreSQL's standby runs over an `async` agent when there is one: the
    /// agent's hold must not add its round trip to the standby's (it did once,
    /// when the standby first ran interleaved: 2 RTT a commit).
    fn mode(self) -> Option<Mode> {
        match self {
            Variant::Async | Variant::PgSync => Some(Mode::Async),
            Variant::Sync => Some(Mode::Sync),
            Variant::Pipelined => Some(Mode::Pipelined),
            Variant::Plain => None,
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

/// A change of the rig toggled point by point for a same-run A/B (`figures --ab`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Knob {
    /// The WAN emulator's delay thread at real-time priority ([`crate::wan::WanDelay::set_realtime`]).
    WanRealtime,
    /// `net.ipv4.tcp_slow_start_after_idle = 0` in the site's host and backup
    /// namespaces (the replication stream keeps its window across idle moments;
    /// on by default since the A/B in docs/results.md: the tail of the held
    /// replies of INSERT shrank at 64, 128 and 256 clients).
    TcpKeepWindow,
    /// pgbench runs one thread per client instead of two
    /// ([`pgbench::Threads`]): a client's blocking round trip (connecting,
    /// preparing) no longer stalls the other clients of its thread. On by
    /// default since the A/B in docs/design.md §16 (TPC-B 256 clients,
    /// pipelined / async 0.18 with two threads, 0.97 with one per client).
    PgbenchThreadPerClient,
    /// The agents' network-path driver threads at real-time priority
    /// (`SCHED_FIFO` 1), set from outside with `chrt` on the running agents,
    /// whatever `host.netpath_priority` says: the release part of the hold
    /// breakdown is the driver's wake-up after the committed vector moved.
    AgentRealtime,
    /// The agents' replication thread (`pc-replication`: the TLS stream to
    /// the backup, acks in) at `SCHED_FIFO` 1, with `chrt`: the round part's
    /// tail under load.
    ReplRealtime,
    /// `net.ipv4.tcp_wmem` max 32 MiB (default 4 MiB) in the site's host
    /// namespaces: at 50 ms RTT a 4 MiB send buffer caps one TCP stream at
    /// about 84 MB/s, and `ss -tin` showed the replication stream
    /// `sndbuf_limited` while bursts of page writes queued behind it.
    TcpBigSndbuf,
    /// Every thread on a held reply's way at `SCHED_FIFO` 1, with `chrt`: the
    /// agents' replication thread and runtime workers (`pc-replication`,
    /// `tokio-rt-worker`) and the backup's network and journal threads
    /// (`backup-net`, `backup-journal`). The tail episodes' rounds of ~300 ms
    /// came with seconds of run-queue wait of exactly these threads per point
    /// (docs/design.md §8).
    PathRealtime,
    /// The replication stream under Reno instead of the machine's default
    /// congestion control (BBR on the test machines; CUBIC is not in their
    /// `tcp_allowed_congestion_control`, so a namespace may not pick it): the knob sets
    /// `net.ipv4.tcp_congestion_control` in the site's host and backup
    /// namespaces and closes the agents' replication connections (`ss -K`),
    /// which reconnect under it. BBR's ProbeRTT drains the stream to 4 packets
    /// for 200 ms about every 10 s; the tail episodes of ~300 ms (docs/design.md §8).
    /// Since the agent sets its side of the stream to CUBIC itself, the knob
    /// moves only the backup's side (the acks).
    TcpReno,
}

impl Knob {
    fn as_str(self) -> &'static str {
        match self {
            Knob::WanRealtime => "wan-rt",
            Knob::TcpKeepWindow => "tcp-keep-window",
            Knob::PgbenchThreadPerClient => "pgbench-thread-per-client",
            Knob::AgentRealtime => "agent-rt",
            Knob::ReplRealtime => "repl-rt",
            Knob::TcpBigSndbuf => "tcp-big-sndbuf",
            Knob::PathRealtime => "path-rt",
            Knob::TcpReno => "tcp-reno",
        }
    }

    /// Its setting outside an A/B.
    pub(super) fn default_on(self) -> bool {
        match self {
            Knob::WanRealtime => crate::wan::REALTIME_DEFAULT,
            Knob::TcpKeepWindow => true,
            Knob::PgbenchThreadPerClient => true,
            Knob::AgentRealtime => true,
            Knob::ReplRealtime => false,
            Knob::TcpBigSndbuf => false,
            Knob::PathRealtime => false,
            Knob::TcpReno => false,
        }
    }
}

impl std::str::FromStr for Knob {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "wan-rt" => Ok(Knob::WanRealtime),
            "tcp-keep-window" => Ok(Knob::TcpKeepWindow),
            "pgbench-thread-per-client" => Ok(Knob::PgbenchThreadPerClient),
            "agent-rt" => Ok(Knob::AgentRealtime),
            "repl-rt" => Ok(Knob::ReplRealtime),
            "tcp-big-sndbuf" => Ok(Knob::TcpBigSndbuf),
            "path-rt" => Ok(Knob::PathRealtime),
            "tcp-reno" => Ok(Knob::TcpReno),
            _ => Err(format!(
                "unknown knob {s:?} (expected wan-rt, tcp-keep-window, pgbench-thread-per-client, agent-rt, repl-rt, tcp-big-sndbuf, path-rt or tcp-reno)"
            )),
        }
    }
}

/// Most spread between repeated runs of a point (max - min over the median)
/// before the point is reported as noisy.
const NOISY_SPREAD: f64 = 0.10;

/// A note when the repeated runs `rs` (sorted by tps) of a point spread more
/// than [`NOISY_SPREAD`].
fn noisy<T>(
    label: &str,
    workload: &str,
    clients: u32,
    rs: &[(PgbenchResult, T)],
) -> Option<String> {
    let (first, last) = (rs.first()?.0.tps, rs.last()?.0.tps);
    let median = rs.get(rs.len() / 2)?.0.tps;
    let spread = (last - first) / median.max(f64::MIN_POSITIVE);
    (rs.len() > 1 && spread > NOISY_SPREAD).then(|| {
        format!(
            "noisy point: {label} {workload} {clients} clients: {} runs span {:.0}% of the median ({first:.1} .. {last:.1} tps)",
            rs.len(),
            spread * 100.0
        )
    })
}

/// Tail episodes printed one by one per pipelined point (the worst first).
const TAIL_DETAIL: usize = 8;

/// Wall-clock Unix ms (the agent stamps its tail episodes so).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One pgbench run and, for pipelined, its hold breakdown.
type Run = (PgbenchResult, Option<HoldSnapshot>);

/// A point's variant name: with the knob of an A/B on, `variant+knob`.
fn label(v: Variant, knob: Option<Knob>, on: Option<bool>) -> String {
    match (knob, on) {
        (Some(k), Some(true)) => format!("{}+{}", v.as_str(), k.as_str()),
        _ => v.as_str().to_string(),
    }
}

/// pgbench's threading with [`Knob::PgbenchThreadPerClient`] on or off.
fn pgbench_threads(per_client: bool) -> pgbench::Threads {
    if per_client {
        pgbench::Threads::PerClient
    } else {
        pgbench::Threads::Two
    }
}

/// (a) pgbench vs clients per variant, on ONE site (modes switched at run time).
pub(super) fn part_a(plan: &Plan, work: &Path, prefix: &str, fig: &mut Figures) -> Result<()> {
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
    for k in [Knob::WanRealtime, Knob::TcpKeepWindow] {
        rig.set_knob(k, k.default_on());
    }
    let mut threads = pgbench_threads(Knob::PgbenchThreadPerClient.default_on());
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
    // Every variant interleaved per point (so a drift of the machine's
    // background load hits them alike), PostgreSQL's own synchronous standby
    // included: attached once, paused between its points (standby.rs).
    let pass = plan.variants.clone();
    {
        let mut standby = None;
        if pass.contains(&Variant::PgSync) {
            if let Rig::Site(_) = &rig {
                rig.set_mode(Mode::Async)?;
            }
            let t = Instant::now();
            let mut s = SyncStandby::attach(rig.db()?, &rig.standby_plan(&dir)?)?;
            s.pause()?;
            standby = Some(s);
            eprintln!(
                "figures: (a) synchronous standby attached across the WAN in {:.1} s (paused between its points)",
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
                // 64 clients and more carry the headline ratios: repeat them
                // (interleaved) and keep each variant's median run.
                let reps = if c >= top.min(64) {
                    plan.top_reps.max(1)
                } else {
                    1
                };
                let mut runs: BTreeMap<(Variant, String), Vec<Run>> = BTreeMap::new();
                // With `--ab KNOB`: each variant with the knob off, then on, interleaved.
                let settings: Vec<Option<bool>> = match plan.ab {
                    Some(_) => vec![Some(false), Some(true)],
                    None => vec![None],
                };
                for _ in 0..reps {
                    for &on in &settings {
                        if let (Some(k), Some(on)) = (plan.ab, on) {
                            if k == Knob::PgbenchThreadPerClient {
                                threads = pgbench_threads(on);
                            } else {
                                rig.set_knob(k, on);
                            }
                        }
                        for &v in &pass {
                            check_interrupted()?;
                            match (v.mode(), &rig) {
                                // The standby needs no agent (`--no-agent`).
                                (Some(_), Rig::Bare(_)) if v == Variant::PgSync => {}
                                (Some(m), _) => rig.set_mode(m)?,
                                (None, _) => {}
                            }
                            rig.drain();
                            if let (Some(s), Variant::PgSync) = (standby.as_mut(), v) {
                                let t = Instant::now();
                                s.resume().context("resuming the standby")?;
                                eprintln!(
                                    "figures: (a) standby caught up and synchronous in {:.1} s",
                                    t.elapsed().as_secs_f64()
                                );
                            }
                            let label = label(v, plan.ab, on);
                            // The warm-up runs on the measured run's own
                            // connections (connecting and preparing cost held
                            // round trips: pgbench::run_point); the hold
                            // breakdown starts when it ends.
                            let point = pgbench::Point {
                                workload: w,
                                clients: c,
                                threads,
                                warmup: Duration::from_secs(plan.warmup_secs),
                                duration: Duration::from_secs(plan.secs),
                            };
                            let mut held = None;
                            let mut backup_before = None;
                            let mut started_ms = 0;
                            let mut path_before = None;
                            let mut cpu_before = None;
                            let mut at_start = || {
                                if v == Variant::Pipelined {
                                    held = rig.hold();
                                    backup_before = rig.backup_latency();
                                    path_before = rig.path_counters();
                                    cpu_before = rig.cpu_wait();
                                    started_ms = unix_ms();
                                }
                            };
                            let outcome = pgbench::run_point(&ep, point, &dir, &mut at_start);
                            if let (Some(s), Variant::PgSync) = (standby.as_mut(), v) {
                                s.pause().context("pausing the standby")?;
                            }
                            match outcome {
                                Ok((r, shape)) => {
                                    let mut per_second: Vec<String> = shape
                                        .per_second
                                        .iter()
                                        .map(|t| format!("{t:.0}"))
                                        .collect();
                                    if shape.warmup_lines > 0 {
                                        per_second.insert(
                                            shape.warmup_lines.min(per_second.len()),
                                            "|".into(),
                                        );
                                    }
                                    eprintln!(
                                        "figures: (a) {label:<16} {w:<16} clients={c:<3} connect {} ms, tps per second (warm-up | measured): {}{}",
                                        shape.connect_ms.map_or_else(|| "?".into(), |m| format!("{m:.0}")),
                                        per_second.join(" "),
                                        if shape.measured_from_progress || plan.warmup_secs == 0 {
                                            ""
                                        } else {
                                            " (too few progress lines after the warm-up: the whole run's summary)"
                                        }
                                    );
                                    eprintln!(
                                        "figures: (a) {label:<16} {w:<16} clients={c:<3} tps={:>9.1} latency={:>9.2} ms failed={} load {}",
                                        r.tps, r.latency_ms, r.failed, super::loadavg1()
                                    );
                                    let hold = held
                                        .zip(rig.hold())
                                        .map(|(before, after)| after.since(&before));
                                    if let Some(h) = &hold {
                                        eprintln!(
                                            "figures: (a)   hold {}",
                                            HoldRow::of(w.as_str(), c, h)
                                                .line(rig.rtt().median.as_secs_f64() * 1e3)
                                        );
                                        if let Some(d) = backup_before
                                            .zip(rig.backup_latency())
                                            .map(|(b, a)| a.since(&b))
                                        {
                                            eprintln!("figures: (a)   {}", d.line());
                                        }
                                        if let Some(l) = path_before
                                            .zip(rig.path_counters())
                                            .map(|(b, a)| a.line_since(&b))
                                        {
                                            eprintln!("figures: (a)   {l}");
                                        }
                                        if let Some(l) =
                                            cpu_before.zip(rig.cpu_wait()).map(|(b, a)| {
                                                a.line_since(
                                                    &b,
                                                    unix_ms().saturating_sub(started_ms) as f64
                                                        / 1e3,
                                                )
                                            })
                                        {
                                            eprintln!("figures: (a)   {l}");
                                        }
                                        let (events, cps) = rig.tails();
                                        for l in super::tails::lines(
                                            &events,
                                            &cps,
                                            &rig.wan_stalls(),
                                            started_ms,
                                            unix_ms(),
                                            TAIL_DETAIL,
                                        ) {
                                            eprintln!("figures: (a)   {l}");
                                        }
                                    }
                                    runs.entry((v, label)).or_default().push((r, hold));
                                }
                                Err(e) => {
                                    eprintln!("figures: (a) {label} {w} clients={c}: FAILED: {e:#}")
                                }
                            }
                        }
                    }
                }
                // Back to the default between points.
                if let Some(k) = plan.ab {
                    if k == Knob::PgbenchThreadPerClient {
                        threads = pgbench_threads(k.default_on());
                    } else {
                        rig.set_knob(k, k.default_on());
                    }
                }
                for ((_, label), mut rs) in runs {
                    rs.sort_by(|a, b| a.0.tps.total_cmp(&b.0.tps));
                    if let Some(note) = noisy(&label, w.as_str(), c, &rs) {
                        eprintln!("figures: (a) {note}");
                        fig.notes.push(note);
                    }
                    if let Some((r, hold)) = rs.get(rs.len() / 2).cloned() {
                        fig.a.push(APoint {
                            variant: label.clone(),
                            workload: w.as_str().to_string(),
                            clients: c,
                            r,
                        });
                        if let Some(h) = hold.filter(|_| label == Variant::Pipelined.as_str()) {
                            fig.holds.push(HoldRow::of(w.as_str(), c, &h));
                        }
                    }
                }
            }
        }
        drop(standby);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_label_and_noisy_points() {
        assert_eq!("wan-rt".parse::<Knob>(), Ok(Knob::WanRealtime));
        assert_eq!("tcp-keep-window".parse::<Knob>(), Ok(Knob::TcpKeepWindow));
        assert!("nagle".parse::<Knob>().is_err());
        assert_eq!("path-rt".parse::<Knob>(), Ok(Knob::PathRealtime));
        assert_eq!("tcp-reno".parse::<Knob>(), Ok(Knob::TcpReno));
        assert_eq!(
            "pgbench-thread-per-client".parse::<Knob>(),
            Ok(Knob::PgbenchThreadPerClient)
        );
        assert_eq!(pgbench_threads(true).count(256), 256);
        assert_eq!(pgbench_threads(false).count(256), 2);
        assert_eq!(pgbench_threads(false).count(1), 1);
        let on = label(Variant::Pipelined, Some(Knob::WanRealtime), Some(true));
        assert_eq!(on, "pipelined+wan-rt");
        assert_eq!(
            label(Variant::Async, Some(Knob::WanRealtime), Some(false)),
            "async"
        );
        let run = |tps: f64| {
            (
                PgbenchResult {
                    tps,
                    ..PgbenchResult::default()
                },
                (),
            )
        };
        assert_eq!(
            noisy("async", "tpcb", 64, &[run(100.0), run(105.0), run(109.0)]),
            None
        );
        let n = noisy("async", "tpcb", 64, &[run(100.0), run(105.0), run(120.0)]).unwrap();
        assert!(n.contains("span 19%"), "{n}");
        assert_eq!(noisy("async", "tpcb", 64, &[run(100.0)]), None);
    }

    #[test]
    fn variants_parse() {
        assert_eq!("pgsync".parse::<Variant>(), Ok(Variant::PgSync));
        assert_eq!("pipelined".parse::<Variant>(), Ok(Variant::Pipelined));
        assert!("drbd".parse::<Variant>().is_err());
    }
}
