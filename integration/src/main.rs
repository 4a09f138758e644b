//! `pipecloud-harness`: builds emulated primary/WAN/backup sites out of network
//! namespaces on one machine and runs real servers, clients and disasters in them.
//!
//! Every command ends with one line `RESULT key=value ...`.

mod app;
mod client;
mod disaster;
mod failback;
mod figures;
mod fullstate;
mod lifecycle;
mod live;
mod netns;
mod partition;
mod pg;
mod pgbench;
mod plot;
mod run;
mod site;
mod standby;
mod switch;
mod sys;
mod wan;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pipecloud_core::topology::Mode;
use std::path::PathBuf;
use std::time::Duration;

/// Prefix of every namespace the harness creates (`site down` removes them all).
const PREFIX: &str = "pch";

#[derive(Parser)]
#[command(name = "pipecloud-harness", about = "PipeCloud-rs integration harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum SiteCmd {
    /// Build the site and keep it running until Ctrl-C.
    Up {
        #[arg(long)]
        topology: PathBuf,
        #[arg(long, default_value_t = 50)]
        rtt_ms: u64,
        #[arg(long, default_value = "pipelined")]
        mode: Mode,
        /// Give the machines and the client IPv6 addresses too (see `disaster --ipv6-client`).
        #[arg(long)]
        ipv6_client: bool,
    },
    /// Remove everything a site (or a crashed run) left behind: namespaces and the
    /// work directories of `site up` runs that are no longer running.
    Down,
    /// Run a command inside a live site, as MACHINE: in its network namespace and the
    /// site's mount namespace (where the protected disks are mounted). MACHINE is a
    /// machine or host (dom0) name of the topology, or client, backup, wan, lan.
    Exec {
        /// The `site up` to enter (its pid, shown in its work directory's name);
        /// needed only when several run.
        #[arg(long)]
        pid: Option<u32>,
        machine: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Build or remove an emulated site.
    Site {
        #[command(subcommand)]
        cmd: SiteCmd,
    },
    /// The disaster-recovery lifecycle on a lease (issue 23): load on the primary,
    /// disaster, automatic failover decided on etcd, clients served by the backup.
    Lifecycle {
        #[arg(long)]
        topology: PathBuf,
        #[arg(long, default_value_t = 50)]
        rtt_ms: u64,
        /// The group's lease (whole seconds).
        #[arg(long, default_value_t = 3000)]
        lease_ms: u64,
        /// `async` holds nothing: only the lease gate stops a cut-off primary's
        /// replies (acknowledged writes may then be lost: not checked).
        #[arg(long, default_value = "pipelined")]
        mode: Mode,
        /// Seconds of load before the disaster.
        #[arg(long, default_value_t = 8)]
        load_s: u64,
        /// Instead of the disaster, one partition schedule during the load
        /// (docs/design.md §7): `primary-backup`, `primary-quorum`,
        /// `backup-quorum`, `witness-down` or `flapping`.
        #[arg(long, conflicts_with = "schedules")]
        partition: Option<String>,
        /// Instead of the disaster, this many random partition schedules
        /// (1–3 faults each), each on a fresh site: a RESULT line each, then
        /// a summary.
        #[arg(long)]
        schedules: Option<u64>,
        /// Seed of the first random schedule (the i-th uses seed + i).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The check's own test: the agents keep the lease but do not obey it
        /// (runs `pipecloud-fault-ungated`, the agent built with the TEST-ONLY
        /// `fault-injection` feature by scripts/fault-lifecycle.sh); the run
        /// must then see the two sites' replies overlap and, with a partition
        /// cutting the primary from the etcd majority, the primary answer
        /// past its lease.
        #[arg(long)]
        expect_split_brain: bool,
    },
    /// Randomized disasters: CV ⊆ SV check per point. On a guest topology
    /// (`[machine.vm]`): `checkpoint` is the full-state disaster, `switch` a
    /// disaster inside a run-time switch phase (`--phase`), and a disk-only mode
    /// the cold boot from the failed-over disk.
    Disaster {
        #[arg(long)]
        topology: PathBuf,
        /// async | sync | pipelined | checkpoint | switch (guest topologies).
        #[arg(long, default_value = "pipelined")]
        mode: DisasterMode,
        /// With `--mode switch`: the switch phase the disaster falls in.
        #[arg(long, value_enum)]
        phase: Option<switch::Target>,
        #[arg(long, default_value_t = 5)]
        points: usize,
        #[arg(long, default_value_t = 50)]
        rtt_ms: u64,
        /// Seed of the disaster instants.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Client threads.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Shortest and longest run before the disaster, in ms.
        #[arg(long, default_value_t = 1000)]
        min_ms: u64,
        #[arg(long, default_value_t = 4000)]
        max_ms: u64,
        /// Fail (exit 1) unless some point shows unsafe replies (for the async control).
        #[arg(long)]
        expect_unsafe: bool,
        /// Also restore each point at the middle of its run (point-in-time check).
        #[arg(long)]
        pitr: bool,
        /// Give the machines and the client IPv6 (ULA) addresses too, and let the
        /// client talk to the front machine over IPv6 (PostgreSQL and the front tier
        /// listen on it); everything else is unchanged.
        #[arg(long)]
        ipv6_client: bool,
        /// Test only, `--mode checkpoint`: inject a fault the check must catch
        /// (`release-before-ack`: the agent built with that TEST-ONLY feature, by
        /// scripts/fault-fullstate.sh, releases output before its epoch is acked).
        #[arg(long, value_enum)]
        inject_fault: Option<fullstate::Fault>,
    },
    /// A guest group switched pipelined → checkpoint → pipelined under client
    /// load, no disaster: `switch_drops` (broken client connections) and the
    /// reply latency per second (CSV).
    SwitchLoad {
        #[arg(long)]
        topology: PathBuf,
        /// Client connections, each sending requests back to back.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds in each mode (before, during and after checkpointing).
        #[arg(long, default_value_t = 8)]
        hold_s: u64,
        /// The per-second timeline: `second,replies,p50_ms,p99_ms,max_ms,phase,event`.
        #[arg(long, default_value = "switch-load.csv")]
        csv: PathBuf,
    },
    /// Build only the network and the WAN emulation, and measure the achieved RTT.
    Wan {
        #[arg(long)]
        topology: PathBuf,
        #[arg(long, default_value_t = 50)]
        rtt_ms: u64,
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// The paper's figures (SoCC'11 §6): table, CSV files and plots.
    Figures(Box<figures::FiguresArgs>),
    /// The demo: a short version of figures (a), (c), one disaster and one
    /// full-state disaster of the test guest.
    Demo(figures::DemoArgs),
    /// Runs one CompDB tier (used inside a machine's namespace).
    Compdb {
        #[arg(long)]
        tier: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        db: Option<String>,
        #[arg(long)]
        next: Option<std::net::SocketAddr>,
        #[arg(long, default_value_t = 0)]
        compute_ms: u64,
        /// Computation after the next tier replied.
        #[arg(long, default_value_t = 0)]
        post_compute_ms: u64,
    },
}

/// Where runs keep their files (`PIPECLOUD_WORK`, default /var/tmp/pipecloud-harness).
fn work_base() -> PathBuf {
    std::env::var_os("PIPECLOUD_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/pipecloud-harness"))
}

fn work_dir(tag: &str) -> PathBuf {
    work_base().join(format!("{tag}-{}", std::process::id()))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        println!(
            "RESULT status=error error={:?}",
            format!("{e:#}").lines().next().unwrap_or("")
        );
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Figures(a) => figures::figures(*a),
        Cmd::Demo(a) => figures::demo(a),
        Cmd::Compdb {
            tier,
            listen,
            db,
            next,
            compute_ms,
            post_compute_ms,
        } => {
            if let Some(db) = &db {
                app::prepare_db(db)?;
            }
            app::serve(app::TierConfig {
                tier,
                listen,
                db,
                next,
                compute_ms,
                post_compute_ms,
            })
        }
        Cmd::Wan {
            topology,
            rtt_ms,
            samples,
        } => {
            let text = std::fs::read_to_string(&topology)?;
            let topo =
                pipecloud_core::topology::Topology::parse(&text, &topology.display().to_string())
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            let prefix = format!("{PREFIX}{}", std::process::id());
            let net = site::Network::build(&topo, &prefix)?;
            let probe = std::net::SocketAddr::new(site::BACKUP_IP.into(), 7990);
            let (_wan, r) = wan::start_calibrated(
                &net.names.wan(),
                Duration::from_millis(rtt_ms),
                &net.names.host(0),
                &net.names.backup(),
                probe,
                samples,
            )?;
            println!(
                "RESULT target_rtt_ms={rtt_ms} samples={} median_ms={:.3} mean_ms={:.3} p99_ms={:.3}",
                r.samples,
                run::ms(r.median),
                run::ms(r.mean),
                run::ms(r.p99)
            );
            Ok(())
        }
        Cmd::Site { cmd: SiteCmd::Down } => {
            netns::cleanup_prefix(PREFIX);
            let dirs = live::remove_dead_site_dirs(&work_base());
            println!("RESULT status=ok cleaned_prefix={PREFIX} removed_work_dirs={dirs}");
            Ok(())
        }
        Cmd::Site {
            cmd: SiteCmd::Exec { pid, machine, cmd },
        } => {
            use std::os::unix::process::CommandExt;
            let site = live::pick_site(&work_base(), pid)?;
            let err = live::exec_command(&site, PREFIX, &machine, &cmd)?.exec();
            Err(err).context("executing nsenter")
        }
        Cmd::Site {
            cmd:
                SiteCmd::Up {
                    topology,
                    rtt_ms,
                    mode,
                    ipv6_client,
                },
        } => {
            sys::ensure_private_mount_ns()?;
            let work = work_dir("site");
            // Dropped after the site (declared first): the work directory goes on
            // Ctrl-C and on a failed start alike.
            let _work_guard = live::RemoveOnDrop(work.clone());
            let opts = site_opts(rtt_ms, mode, ipv6_client);
            let site = run::Site::up(
                &topology,
                &work,
                &format!("{PREFIX}{}", std::process::id()),
                &opts,
            )?;
            println!(
                "RESULT status=up pid={} rtt_ms={:.2} work={} front={}",
                std::process::id(),
                run::ms(site.rtt.median),
                work.display(),
                site.front()
            );
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = stop.clone();
            ctrlc_flag(s2);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
            }
            drop(site);
            Ok(())
        }
        Cmd::Lifecycle {
            topology,
            rtt_ms,
            lease_ms,
            mode,
            load_s,
            partition,
            schedules,
            seed,
            expect_split_brain,
        } => {
            if expect_split_brain {
                // The TEST-ONLY faulted agent (scripts/fault-lifecycle.sh builds it);
                // the variable is read by it (fault-injection builds only).
                let faulted = run::bin("pipecloud-fault-ungated");
                if !faulted.is_file() {
                    anyhow::bail!(
                        "{} not found: --expect-split-brain needs the agent built with the TEST-ONLY \
                         feature fault-injection (scripts/fault-lifecycle.sh builds it)",
                        faulted.display()
                    );
                }
                std::env::set_var(run::AGENT_ENV, &faulted);
                std::env::set_var("PIPECLOUD_FAULT_UNGATED", "1");
            }
            let lease = Duration::from_millis(lease_ms);
            let runs: Vec<Option<partition::Schedule>> = match (schedules, partition.as_deref()) {
                (Some(n), _) => (0..n)
                    .map(|i| Some(partition::Schedule::generate(seed.wrapping_add(i), lease)))
                    .collect(),
                (None, Some(name)) => vec![Some(
                    partition::Schedule::named(name, lease).with_context(|| {
                        format!(
                            "--partition {name}: one of {}",
                            partition::schedule::NAMES.join(", ")
                        )
                    })?,
                )],
                (None, None) => vec![None],
            };
            sys::ensure_private_mount_ns()?;
            let opts = site_opts(rtt_ms, mode, false);
            let zero_rpo = matches!(mode, Mode::Sync | Mode::Pipelined);
            let (mut failed, mut split_total, mut lost_total, mut faults) = (0, 0, 0, 0);
            let mut took_over = 0;
            let mut worst_stop = Duration::ZERO;
            let mut worst_converge = Duration::ZERO;
            for (i, sched) in runs.iter().enumerate() {
                let label = sched
                    .as_ref()
                    .map_or("disaster".to_string(), |s| s.to_string());
                if sched.is_some() {
                    eprintln!("harness: lifecycle: schedule {i}: {label}");
                }
                let work = work_base().join(format!("lifecycle-{}-{i}", std::process::id()));
                // A site whose measured RTT is off is rebuilt (as `disaster` does).
                let mut attempt = 0;
                let r = loop {
                    let r = lifecycle::run(
                        &topology,
                        &work,
                        &format!("{PREFIX}{}", std::process::id()),
                        opts.clone(),
                        lease_ms,
                        Duration::from_secs(load_s),
                        sched.as_ref(),
                    );
                    match r {
                        Err(e) if attempt < 2 && format!("{e:#}").contains("refusing to run") => {
                            attempt += 1;
                            eprintln!("harness: lifecycle: {e:#}; retrying");
                            let _ = std::fs::remove_dir_all(&work);
                        }
                        r => break r,
                    }
                }
                .with_context(|| format!("lifecycle {label} (work dir {})", work.display()));
                let r = match r {
                    Ok(r) => r,
                    Err(e) if runs.len() > 1 => {
                        eprintln!("error: {e:#}");
                        println!(
                            "RESULT status=error schedule={label:?} error={:?}",
                            format!("{e:#}").lines().next().unwrap_or("")
                        );
                        failed += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if std::env::var_os("PIPECLOUD_KEEP").is_none() {
                    let _ = std::fs::remove_dir_all(&work);
                }
                let converge = r.converge.unwrap_or_default();
                println!(
                    "RESULT rto_s={:.3} takeover_s={:.3} failback_resync_bytes={} disk_bytes={} \
                     split_brain_windows={} lost_acked={} partitions={} replies_primary={} \
                     replies_backup={} resync_blocks={} resync_s={:.2} live_resync_inserts={} \
                     unprotected_ms={:.1} reverse_ms={:.1} attach_gap_ms={:.0} switchback_s={:.2} switchback_lost={} \
                     home_ms={:.1} home_generation={} acked_total={} lease_ms={lease_ms} \
                     rtt_ms={rtt_ms} mode={mode} takeover={} failback={} primary_stop_s={:.3} \
                     converge_s={:.3} acked_while_cut={} primary_gap_s={} schedule={label:?}",
                    r.rto.as_secs_f64(),
                    r.takeover.as_secs_f64(),
                    r.failback.resync_bytes,
                    r.failback.disk_bytes,
                    r.split_brain_windows,
                    r.lost_acked,
                    r.partitions,
                    r.acked_primary,
                    r.acked_backup,
                    r.failback.blocks_sent,
                    r.failback.secs,
                    r.failback.live_inserts,
                    r.failback.unprotected_ms,
                    r.failback.reverse_ms,
                    r.failback.attach_gap_ms,
                    r.failback.switchback_s,
                    r.failback.switchback_lost,
                    r.failback.home_ms,
                    r.failback.home_generation,
                    r.failback.acked_total,
                    u8::from(r.took_over),
                    if r.took_over { "done" } else { "skipped" },
                    r.primary_stop.as_secs_f64(),
                    converge.as_secs_f64(),
                    r.acked_while_cut,
                    r.primary_gap
                        .map_or("-".to_string(), |g| format!("{:.3}", g.as_secs_f64())),
                );
                if expect_split_brain {
                    if r.split_brain_windows == 0 {
                        anyhow::bail!(
                            "--expect-split-brain: the ungated primary's replies did not overlap the backup's: \
                             the check cannot fail (was pipecloud-fault-ungated built with --features fault-injection?)"
                        );
                    }
                    let cut_from_quorum = sched.as_ref().is_some_and(|s| {
                        !partition::schedule::primary_without_quorum(&s.events()).is_empty()
                    });
                    if cut_from_quorum && r.primary_stop <= lease {
                        anyhow::bail!(
                            "--expect-split-brain: the ungated primary stopped within its lease: \
                             the stop check cannot fail"
                        );
                    }
                    continue;
                }
                let bad = [
                    (
                        r.split_brain_windows > 0,
                        "the two sites' reply windows overlapped",
                    ),
                    (
                        zero_rpo && r.lost_acked > 0,
                        "acknowledged requests were lost",
                    ),
                    (
                        zero_rpo && r.failback.switchback_lost > 0,
                        "acknowledged requests were lost by the switch-back",
                    ),
                    (
                        r.primary_stop > lease,
                        "the partitioned primary answered after its lease",
                    ),
                    (
                        r.primary_gap.is_some_and(|g| g > lease),
                        "the primary stopped serving though it kept its quorum and its backup",
                    ),
                    (
                        zero_rpo && r.acked_while_cut > 0,
                        "the primary acknowledged inserts while its replication link was cut",
                    ),
                    (
                        converge > partition::converge_bound(lease),
                        "replies resumed later than the convergence bound",
                    ),
                ];
                for (_, what) in bad.iter().filter(|(b, _)| *b) {
                    eprintln!("harness: lifecycle: {label}: {what}");
                }
                failed += usize::from(bad.iter().any(|(b, _)| *b));
                split_total += r.split_brain_windows;
                lost_total += r.lost_acked;
                faults += r.partitions;
                took_over += usize::from(r.took_over);
                worst_stop = worst_stop.max(r.primary_stop);
                worst_converge = worst_converge.max(converge);
            }
            if schedules.is_some() && !expect_split_brain {
                println!(
                    "RESULT schedules={} failed={failed} split_brain_windows={split_total} \
                     lost_acked={lost_total} partitions={faults} takeovers={took_over} \
                     max_primary_stop_s={:.3} max_converge_s={:.3} lease_ms={lease_ms} \
                     rtt_ms={rtt_ms} mode={mode} seed={seed}",
                    runs.len(),
                    worst_stop.as_secs_f64(),
                    worst_converge.as_secs_f64()
                );
            }
            if failed > 0 {
                anyhow::bail!(
                    "the lifecycle failed in {failed} of {} runs (lost acknowledged requests, overlapped \
                     the two sites' replies, a primary answering past its lease, or no convergence)",
                    runs.len()
                );
            }
            Ok(())
        }
        Cmd::SwitchLoad {
            topology,
            clients,
            hold_s,
            csv,
        } => {
            sys::ensure_private_mount_ns()?;
            let work = work_dir("switch-load");
            let r = switch::load(
                &topology,
                &work,
                &format!("{PREFIX}{}", std::process::id()),
                clients,
                Duration::from_secs(hold_s),
                &csv,
                None,
            );
            if std::env::var_os("PIPECLOUD_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(&work);
            }
            let r = r.with_context(|| format!("switch-load (work dir {})", work.display()))?;
            if r.drops > 0 {
                anyhow::bail!(
                    "{} of {clients} client connections broke across the switches",
                    r.drops
                );
            }
            Ok(())
        }
        Cmd::Disaster {
            topology,
            mode,
            phase,
            points,
            rtt_ms,
            seed,
            workers,
            min_ms,
            max_ms,
            expect_unsafe,
            pitr,
            ipv6_client,
            inject_fault,
        } => {
            sys::ensure_private_mount_ns()?;
            if phase.is_some() != (mode == DisasterMode::Switch) {
                anyhow::bail!("--phase goes with --mode switch, and --mode switch needs --phase");
            }
            let mode = match mode {
                DisasterMode::Mode(Mode::Checkpoint) => {
                    return fullstate_disaster(
                        &topology,
                        points,
                        seed,
                        min_ms,
                        max_ms,
                        inject_fault,
                    );
                }
                _ if inject_fault.is_some() => {
                    anyhow::bail!("--inject-fault is for --mode checkpoint")
                }
                DisasterMode::Switch => None,
                DisasterMode::Mode(m) => Some(m),
            };
            if mode.is_none() || is_guest_topology(&topology)? {
                let m = mode.unwrap_or(Mode::Pipelined);
                let tag = mode.map_or_else(|| "switch".to_owned(), |m| m.to_string());
                return switch::disaster(&switch::DisasterRun {
                    topology: &topology,
                    base: &work_dir(&format!("disaster-guest-{tag}")),
                    prefix: &format!("{PREFIX}{}", std::process::id()),
                    mode: m,
                    target: phase,
                    points,
                    seed,
                    run_ms: (min_ms, max_ms),
                });
            }
            let mode = mode.unwrap_or(Mode::Pipelined);
            let name = topology
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let base = work_dir(&format!("disaster-{name}-{mode}"));
            let opts = site_opts(rtt_ms, mode, ipv6_client);
            let mut rng = disaster::Rng(seed);
            let (mut cv, mut sv, mut pv, mut unsafe_total, mut unsafe_points) = (0, 0, 0, 0, 0);
            let (mut pitr_rows, mut pitr_missing) = (0, 0);
            let check = disaster::Check { mode, pitr };
            let mut failed_points = 0;
            // Ctrl-C / SIGTERM: finish the current point (its site tears down), then
            // stop and print the RESULT of the points run so far.
            let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            ctrlc_flag(interrupted.clone());
            let mut done = 0;
            for i in 0..points {
                if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                    eprintln!("harness: interrupted after {done} points");
                    break;
                }
                done += 1;
                let run_for = Duration::from_millis(rng.range(min_ms, max_ms));
                let dir = disaster::point_dir(&base, i);
                // A point whose site refused to start because the measured RTT was
                // off (a load burst on this shared machine) is retried, at most twice.
                let mut attempt = 0;
                let r = loop {
                    let r = disaster::run_point(
                        &topology,
                        &dir,
                        &format!("{PREFIX}{}", std::process::id()),
                        &opts,
                        run_for,
                        workers,
                        pitr,
                    );
                    match r {
                        Err(e) if attempt < 2 && format!("{e:#}").contains("refusing to run") => {
                            attempt += 1;
                            eprintln!("harness: point {i}: {e:#}; retrying");
                            let _ = std::fs::remove_dir_all(&dir);
                        }
                        r => break r,
                    }
                }
                .with_context(|| format!("disaster point {i} (work dir {})", dir.display()))?;
                println!(
                    "point {i}: run {:?} issued={} cv={} sv={} pv={} unsafe={} last500: cv={} sv={} pv={} failover={}ms {}",
                    run_for, r.issued, r.cv, r.sv, r.pv, r.unsafe_replies, r.window_cv,
                    r.window_sv, r.window_pv, r.failover_ms, r.cut
                );
                let why = r.failures(&check);
                for w in &why {
                    println!("point {i}: FAIL: {w}");
                }
                failed_points += usize::from(!why.is_empty());
                pitr_rows += r.pitr_rows;
                pitr_missing += r.pitr_missing_acked;
                cv += r.cv;
                sv += r.sv;
                pv += r.pv;
                unsafe_total += r.unsafe_replies;
                if r.unsafe_replies > 0 {
                    unsafe_points += 1;
                }
                if std::env::var_os("PIPECLOUD_KEEP").is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            // The points' directories are gone (unless kept): so is the run's.
            let _ = std::fs::remove_dir(&base);
            println!(
                "RESULT topology={name} mode={mode} ipv6_client={ipv6_client} points={done} unsafe_replies={unsafe_total} unsafe_points={unsafe_points} cv={cv} sv={sv} pv={pv} pitr_rows={pitr_rows} pitr_missing_acked={pitr_missing} failed_points={failed_points}"
            );
            if failed_points > 0 {
                anyhow::bail!("{failed_points} of {done} points failed (the FAIL lines say why)");
            }
            if done == 0 || done < points {
                anyhow::bail!("only {done} of {points} points ran: the run proves too little");
            }
            if expect_unsafe && unsafe_total == 0 {
                anyhow::bail!("mode {mode} showed no unsafe reply in {points} points: the test is too weak to fail");
            }
            Ok(())
        }
    }
}

/// `disaster --mode`: a replication mode, or `switch` (guest topologies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DisasterMode {
    Mode(Mode),
    Switch,
}

impl std::str::FromStr for DisasterMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "switch" => Ok(DisasterMode::Switch),
            m => m
                .parse::<Mode>()
                .map(DisasterMode::Mode)
                .map_err(|e| format!("{e} (or switch)")),
        }
    }
}

/// Whether the topology's machines are QEMU guests (`[machine.vm]`).
fn is_guest_topology(path: &std::path::Path) -> Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let t = pipecloud_core::topology::Topology::parse(&text, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(t.machines.iter().any(|m| m.vm.is_some()))
}

/// `disaster --mode checkpoint` (issue 21): see `fullstate`.
fn fullstate_disaster(
    topology: &std::path::Path,
    points: usize,
    seed: u64,
    min_ms: u64,
    max_ms: u64,
    fault: Option<fullstate::Fault>,
) -> Result<()> {
    let name = topology
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    fullstate::build_guest()?;
    let base = work_dir(&format!("disaster-{name}-checkpoint"));
    let mut rng = disaster::Rng(seed);
    let (mut resumed, mut survived, mut gaps, mut unsafe_replies, mut fsck) = (0, 0, 0, 0, 0);
    let (mut failed, mut done) = (0, 0);
    for i in 0..points {
        let run_for = Duration::from_millis(rng.range(min_ms, max_ms));
        let dir = disaster::point_dir(&base, i);
        let t_point = std::time::Instant::now();
        let r = fullstate::run_point(
            topology,
            &dir,
            &format!("{PREFIX}{}", std::process::id()),
            run_for,
            fault,
        )
        .with_context(|| format!("full-state point {i} (work dir {})", dir.display()))?;
        println!(
            "point {i}: run {run_for:?} replies before={} after={} resumed={} survived={} gaps={} unsafe={} fsck_clean={} missing_in_log={} failover_epoch={} acked_per_s={} failover={}ms restore={}ms point={:.1}s load={}",
            r.replies_before, r.replies_after, r.resumed, r.survived, r.counter_gaps,
            r.unsafe_replies, r.fsck_clean, r.missing_in_log, r.epoch,
            r.acked_per_s.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}")),
            r.failover_ms, r.restore_ms,
            t_point.elapsed().as_secs_f64(),
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
        );
        println!("point {i}: agent before the disaster: {}", r.status);
        let why = r.failures();
        for w in &why {
            println!("point {i}: FAIL: {w}");
        }
        failed += usize::from(!why.is_empty());
        resumed += usize::from(r.resumed);
        survived += usize::from(r.survived);
        fsck += usize::from(r.fsck_clean);
        gaps += r.counter_gaps;
        unsafe_replies += r.unsafe_replies;
        if std::env::var_os("PIPECLOUD_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        done = i + 1;
        // A point escapes the fault when a checkpoint happened to fall between
        // the guest's reply and its release (the reply's disk write was still
        // held): the first caught point is enough.
        if fault.is_some() && !why.is_empty() {
            println!("point {i}: the injected fault was caught");
            break;
        }
    }
    let _ = std::fs::remove_dir(&base);
    let points = done;
    println!(
        "RESULT topology={name} mode=checkpoint points={points} resumed={resumed} connections_survived={survived} counter_gaps={gaps} unsafe_replies={unsafe_replies} fsck_clean={fsck} source=epochs{}",
        if fault.is_some() { " fault=release-before-ack" } else { "" }
    );
    match fault {
        None if failed > 0 => {
            anyhow::bail!("{failed} of {points} points failed (the FAIL lines say why)")
        }
        Some(_) if failed == 0 => anyhow::bail!(
            "the injected fault went unnoticed in {points} points: the check is too weak"
        ),
        _ => Ok(()),
    }
}

fn site_opts(rtt_ms: u64, mode: Mode, ipv6_client: bool) -> run::SiteOptions {
    run::SiteOptions {
        rtt: Duration::from_millis(rtt_ms),
        mode,
        compute_ms: Vec::new(),
        tiers: true,
        rtt_tolerance: Duration::from_millis(1),
        outbound_override: None,
        ipv6_client,
        quorum_lease_ms: None,
    }
}

/// Sets `flag` on SIGINT/SIGTERM.
fn ctrlc_flag(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    static FLAG: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}
