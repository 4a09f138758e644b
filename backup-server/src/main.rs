//! `backup-server`: the unprivileged backup site of PipeCloud-rs.
//!
//! ```text
//! backup-server certs --dir DIR --server-name NAME --group G [--group G2]
//! backup-server serve --config FILE
//! backup-server status   (--config FILE | --data-dir DIR)
//! backup-server failover --group G --out DIR (--config FILE | --data-dir DIR)
//! backup-server restore  --group G --at <RFC3339 | cut> --out DIR (--config | --data-dir)
//! backup-server unfence  --group G (--config | --data-dir)
//! backup-server controller --topology FILE --out DIR (--config | --data-dir)
//! backup-server confirm-takeover --out DIR
//! backup-server resync-source --image IMG --listen ADDR --group G --ca F --cert F --key F
//! backup-server resync-fetch  --image IMG --from ADDR --group G --ca F --cert F --key F
//!                             --server-name NAME (--etcd URLS --site S | --unsafe-no-fence-check)
//! backup-server bench    [--writes N] [--dir DIR]
//! backup-server bench-checkpoint [--ram-mib N] [--dirty-pages N] [--epochs N] [--dir DIR]
//! ```

mod bench;
mod bench_ckpt;

use anyhow::{anyhow, bail, Context};
use backup_server::config::{Config, Limits};
use backup_server::control::{self, fmt_ms, At, Reply, Request};
use backup_server::daemon::Daemon;
use backup_server::store::{Group, Store, StoreError};
use backup_server::volume::Materialised;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "backup-server",
    version,
    about = "PipeCloud-rs backup server (unprivileged)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Where {
    /// Server config file (its data_dir is used).
    #[arg(long, conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// Data directory (instead of --config).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// The resync link's mutual TLS: the replication link's CA and files.
#[derive(Args, Clone)]
struct ResyncTls {
    /// The group being resynced (the fetcher's certificate must be bound to it).
    #[arg(long)]
    group: String,
    /// The CA both sides' certificates chain to (the backup server's `ca.pem`).
    #[arg(long)]
    ca: PathBuf,
    /// This side's certificate: the backup server's at the source, the
    /// group's agent certificate at the fetcher.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

/// Where the fetcher asks that its site is fenced (docs/design.md §15).
#[derive(Args, Clone)]
struct FenceCheck {
    /// The group's etcd endpoints, comma-separated (http:// or https://).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "unsafe_no_fence_check"
    )]
    etcd: Vec<String>,
    /// This site's name in the group's records (`home_site` of `[quorum]`).
    #[arg(long, required_unless_present = "unsafe_no_fence_check")]
    site: Option<String>,
    /// CA of etcd's server certificates (https endpoints).
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate and key for etcd (`--client-cert-auth`).
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Overwrite the image WITHOUT asking etcd whether this site is fenced:
    /// only for groups without `[quorum]`, after the operator made sure
    /// nothing serves from this image.
    #[arg(long, conflicts_with_all = ["etcd", "site", "etcd_ca", "etcd_cert", "etcd_key"])]
    unsafe_no_fence_check: bool,
}

impl FenceCheck {
    /// Runs the check (or says loudly that it is skipped).
    fn check(&self, group: &str) -> anyhow::Result<()> {
        if self.unsafe_no_fence_check {
            eprintln!(
                "resync-fetch: WARNING: --unsafe-no-fence-check: not asking etcd whether this \
                 site is fenced; the image is overwritten on the operator's word"
            );
            return Ok(());
        }
        let site = self
            .site
            .as_deref()
            .ok_or_else(|| anyhow!("--site is needed with --etcd"))?;
        let cfg = pipecloud_quorum::etcd::EtcdConfig {
            endpoints: self.etcd.clone(),
            tls: self
                .etcd_ca
                .as_ref()
                .map(|ca| pipecloud_quorum::etcd::EtcdTls {
                    ca: ca.clone(),
                    cert: self.etcd_cert.clone(),
                    key: self.etcd_key.clone(),
                }),
            attempt_timeout: std::time::Duration::from_secs(2),
        };
        let g = backup_server::fenced::check(&cfg, group, site)?;
        eprintln!(
            "resync-fetch: site {site:?} is fenced: group {group:?} is at generation {} held by {:?}",
            g.number, g.site
        );
        Ok(())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Serve Prometheus metrics on http://ADDR/metrics (overrides the config
        /// file's `metrics` key).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Create a test CA, server and per-group agent certificates, and a config.
    Certs {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "localhost")]
        server_name: String,
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
    },
    /// Per group: agents, journal bytes, lag, committed vector, oldest restorable point.
    Status {
        #[command(flatten)]
        at: Where,
    },
    /// Stop ingest for a group and write its volumes at the largest causally closed cut.
    Failover {
        #[arg(long)]
        group: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        at: Where,
    },
    /// Write a group's volumes at the latest closed cut not after a time (or at a cut).
    Restore {
        #[arg(long)]
        group: String,
        /// RFC 3339 time (2024-05-01T12:00:00Z) or a cut ([3,0,7]).
        #[arg(long)]
        at: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        r#where: Where,
    },
    /// Allow ingest for a fenced group again.
    Unfence {
        #[arg(long)]
        group: String,
        #[command(flatten)]
        at: Where,
    },
    /// Watch the group's lease on etcd (`[quorum]`) and, per its failover
    /// policy, take over: fence, fail over to the cut, run the activation hook.
    Controller {
        /// The group's topology file (its `[quorum]` section).
        #[arg(long)]
        topology: PathBuf,
        /// Where failed-over volumes and takeover markers go.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        at: Where,
    },
    /// Failback (issue 23): serve this site's volume IMAGE, once, to the fenced
    /// old primary's `resync-fetch` (it receives only the blocks that differ).
    /// Mutual TLS: the fetcher's certificate must chain to --ca and be bound
    /// to --group; others are refused and the wait goes on.
    ResyncSource {
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        tls: ResyncTls,
    },
    /// Failback at the old primary (its agent stopped): make IMAGE
    /// byte-identical to the active site's `resync-source` at FROM, receiving
    /// only the blocks whose SHA-256 differs. First asks etcd that the
    /// group's generation is held by another site (this one is fenced).
    /// Progress every second (phase, blocks to go, bytes, ETA), also into
    /// --status FILE.
    ResyncFetch {
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        from: std::net::SocketAddr,
        #[command(flatten)]
        tls: ResyncTls,
        /// The name the source's certificate must carry (the backup server's
        /// `--server-name`).
        #[arg(long)]
        server_name: String,
        #[command(flatten)]
        fence: FenceCheck,
        #[arg(long)]
        status: Option<PathBuf>,
    },
    /// Confirm a takeover to a controller with policy `alarm-only`.
    ConfirmTakeover {
        /// The controller's --out directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Planned switch-back (docs/design.md §15): give the group's next
    /// generation to site TO, in one etcd transaction conditioned on the
    /// generation being the topology's `[quorum] home_site`'s (the active
    /// site) and on no site holding the lease (the active site's agent has
    /// stopped). TO's agent then acquires the lease and serves.
    HandOver {
        /// The active site's topology (its `[quorum]` section).
        #[arg(long)]
        topology: PathBuf,
        #[arg(long)]
        to: String,
    },
    /// Failback (offline: the server stopped): make IMAGE the base volume of
    /// DISK of GROUP before its agent first registers it here (the old
    /// primary's disk, which the resync and the journal then bring up to
    /// date). The file is moved.
    Adopt {
        #[arg(long)]
        group: String,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        image: PathBuf,
        #[command(flatten)]
        at: Where,
    },
    /// Measure ingest throughput and ack latency against a raw fdatasync baseline.
    Bench {
        /// Writes per measurement.
        #[arg(long, default_value_t = 20000)]
        writes: u64,
        /// Directory for the temporary data (default: a temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Measure how fast checkpoint epochs are made durable and acknowledged.
    BenchCheckpoint {
        /// Guest RAM size.
        #[arg(long, default_value_t = 256)]
        ram_mib: u64,
        /// Dirty pages per delta epoch.
        #[arg(long, default_value_t = 1000)]
        dirty_pages: u64,
        /// Delta epochs after the full first one.
        #[arg(long, default_value_t = 200)]
        epochs: u64,
        /// Directory for the temporary data (default: a temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn data_dir(w: &Where) -> anyhow::Result<(PathBuf, Limits)> {
    match (&w.config, &w.data_dir) {
        (Some(c), _) => {
            let cfg = Config::load(c)?;
            Ok((cfg.data_dir, cfg.limits))
        }
        (None, Some(d)) => Ok((d.clone(), Limits::default())),
        (None, None) => bail!("give --config FILE or --data-dir DIR"),
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// Runs `req` on a running server, or directly on the data dir when none runs.
fn dispatch(w: &Where, req: Request) -> anyhow::Result<Reply> {
    let (dir, limits) = data_dir(w)?;
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut shown = false;
    let mut progress = |done: u64, total: u64| {
        if !shown {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.set_length(total);
        bar.set_position(done);
    };
    if let Some(r) = control::call(&dir, &req, &mut progress) {
        bar.finish_and_clear();
        return r.map_err(|e| anyhow!(e));
    }
    let (store, _) = match Store::open(&dir, limits) {
        Ok(s) => s,
        Err(StoreError::Locked(d)) => bail!(
            "a backup-server holds {} but its control socket does not answer",
            d.display()
        ),
        Err(e) => return Err(e.into()),
    };
    let r = match req {
        Request::Status => Reply::Status(control::status(&store)),
        Request::Failover { group, out } => {
            let fence = |g: &Arc<Group>| g.fence().map_err(|e| e.to_string());
            match control::failover(&store, &group, &out, &fence, &mut progress) {
                Ok(m) => Reply::Done(m),
                Err(e) => Reply::Error(e),
            }
        }
        Request::Restore { group, at, out } => {
            match control::restore(&store, &group, &at, &out, &mut progress) {
                Ok(m) => Reply::Done(m),
                Err(e) => Reply::Error(e),
            }
        }
        Request::Unfence { group } => match store.group(&group) {
            Some(g) => match g.unfence() {
                Ok(()) => Reply::Ok(format!("group {group} unfenced")),
                Err(e) => Reply::Error(e.to_string()),
            },
            None => Reply::Error(format!("no group named {group:?}")),
        },
    };
    bar.finish_and_clear();
    Ok(r)
}

fn print_done(m: &Materialised) {
    println!("group: {}", m.group);
    println!("cut: {}", m.cut);
    println!("cut time: {}", fmt_ms(m.cut_time_ms));
    println!("writes applied from journal: {}", m.writes_applied);
    for i in &m.images {
        println!("image: {}", i.display());
    }
    if let Some(c) = &m.checkpoint {
        println!("checkpoint epoch: {}", c.epoch);
        for (name, ram, dev) in &c.machines {
            println!("machine {name}: {name}.ram ({ram} bytes), {name}.devstate ({dev} bytes)");
        }
    }
    println!("time taken: {:.3} s", m.elapsed.as_secs_f64());
}

fn finish(r: Reply) -> anyhow::Result<()> {
    match r {
        Reply::Done(m) => {
            print_done(&m);
            Ok(())
        }
        Reply::Ok(s) => {
            println!("{s}");
            Ok(())
        }
        Reply::Error(e) => bail!(e),
        Reply::Status(gs) => {
            if gs.is_empty() {
                println!("no groups");
            }
            for g in gs {
                println!(
                    "group {}{}",
                    g.name,
                    if g.fenced { " (FENCED)" } else { "" }
                );
                if let Some(f) = &g.failed {
                    println!("  JOURNAL FAILED: {f}");
                }
                println!("  connected agents: {} {:?}", g.agents.len(), g.agents);
                println!(
                    "  journal: {} bytes in {} segments",
                    g.journal_bytes, g.segments
                );
                println!("  committed vector: {}", g.committed);
                println!("  failover cut now: {}", g.durable_cut);
                println!(
                    "  lag: {} writes not yet applied to the base volumes, {} held back by the causal cut",
                    g.apply_lag_writes, g.held_by_cut_writes
                );
                if g.resyncing {
                    println!(
                        "  base volumes: a failback resync is writing them; journal apply and images wait for it"
                    );
                }
                println!(
                    "  oldest restorable point: {} (cut {})",
                    if g.oldest_cut.is_zero() {
                        "the beginning".to_string()
                    } else {
                        fmt_ms(g.oldest_time_ms)
                    },
                    g.oldest_cut
                );
                if let Some(c) = &g.checkpoint {
                    println!(
                        "  checkpoint: {} (failover: {}), last acked epoch {} (barrier {}), {:.1} epochs/s, {} bytes received, {} epochs pending",
                        c.phase,
                        if c.phase == "active" { "resume the acked epoch" } else { "causal cut" },
                        c.acked_epoch, c.barrier, c.epochs_per_s, c.bytes, c.pending_epochs
                    );
                    println!(
                        "  checkpoint agents: {:?}, machines: {:?}",
                        c.members, c.machines
                    );
                    if let Some(f) = &c.failed {
                        println!("  CHECKPOINT STORE FAILED: {f}");
                    }
                }
                for w in g.writers {
                    println!(
                        "  {}: generation {} durable {} applied {} beyond-hole {}",
                        w.writer, w.generation, w.durable, w.applied, w.ahead
                    );
                }
            }
            Ok(())
        }
        Reply::Progress { .. } => bail!("unexpected progress reply"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve {
            config,
            metrics_listen,
        } => {
            let mut cfg = Config::load(&config)?;
            cfg.metrics = metrics_listen.or(cfg.metrics);
            let d = Daemon::start(&cfg).context("starting backup-server")?;
            d.wait_for_signal();
            Ok(())
        }
        Cmd::Certs {
            dir,
            server_name,
            groups,
            listen,
        } => {
            let g = backup_server::certs::generate(&dir, &server_name, &groups, &listen)?;
            for f in &g.files {
                println!("wrote {}", f.display());
            }
            println!(
                "start the server with: backup-server serve --config {}",
                g.config.display()
            );
            Ok(())
        }
        Cmd::Status { at } => finish(dispatch(&at, Request::Status)?),
        Cmd::Failover { group, out, at } => {
            let out = absolute(&out)?;
            finish(dispatch(&at, Request::Failover { group, out })?)
        }
        Cmd::Restore {
            group,
            at,
            out,
            r#where,
        } => {
            let at: At = control::parse_at(&at).map_err(|e| anyhow!(e))?;
            let out = absolute(&out)?;
            finish(dispatch(&r#where, Request::Restore { group, at, out })?)
        }
        Cmd::Unfence { group, at } => finish(dispatch(&at, Request::Unfence { group })?),
        Cmd::Controller { topology, out, at } => {
            let out = absolute(&out)?;
            // SIGTERM: resign the lease and exit (docs/design.md §7).
            backup_server::planned_stop::install().context("installing the SIGTERM handler")?;
            backup_server::controller::run(&topology, &out, |group, volumes| {
                let req = Request::Failover {
                    group: group.to_owned(),
                    out: volumes.to_path_buf(),
                };
                match dispatch(&at, req)? {
                    Reply::Done(m) => Ok(m),
                    Reply::Error(e) => bail!(e),
                    other => bail!("unexpected reply to failover: {other:?}"),
                }
            })
        }
        Cmd::Adopt {
            group,
            disk,
            image,
            at,
        } => {
            let (dir, limits) = data_dir(&at)?;
            let (store, _) = Store::open(&dir, limits)
                .with_context(|| format!("opening {} (stop its server first)", dir.display()))?;
            let base = store.adopt_base_volume(&group, &disk, &image)?;
            println!(
                "adopt: {} is the base volume of {group}/{disk}",
                base.display()
            );
            Ok(())
        }
        Cmd::HandOver { topology, to } => {
            let n = backup_server::controller::hand_over(&topology, &to)?;
            println!("hand-over: generation {n} recorded for site {to}");
            Ok(())
        }
        Cmd::ResyncSource { image, listen, tls } => {
            let tls = backup_server::resync::SourceTls::from_files(
                &tls.ca, &tls.cert, &tls.key, &tls.group,
            )?;
            println!(
                "{}",
                backup_server::resync::serve(&image, listen, &tls)?.line()
            );
            Ok(())
        }
        Cmd::ResyncFetch {
            image,
            from,
            tls,
            server_name,
            fence,
            status,
        } => {
            // Before anything touches the image.
            fence.check(&tls.group)?;
            let tls = backup_server::resync::FetchTls::from_files(
                &tls.ca,
                &tls.cert,
                &tls.key,
                &server_name,
            )?;
            let s = backup_server::resync::fetch(&image, from, &tls, status.as_deref())?;
            println!("{}", s.line());
            Ok(())
        }
        Cmd::ConfirmTakeover { out } => {
            let f = out.join(backup_server::controller::CONFIRM_FILE);
            std::fs::write(&f, b"").with_context(|| format!("writing {}", f.display()))?;
            println!("takeover confirmed: the controller acts within one poll");
            Ok(())
        }
        Cmd::Bench { writes, dir } => bench::run(writes, dir),
        Cmd::BenchCheckpoint {
            ram_mib,
            dirty_pages,
            epochs,
            dir,
        } => bench_ckpt::run(ram_mib, dirty_pages, epochs, dir),
    }
}
