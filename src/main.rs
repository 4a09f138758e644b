//! `pipecloud`: the host agent and operator CLI.
//!
//! ```text
//! pipecloud topology check FILE...          validate topology files, print summaries
//! pipecloud agent --topology FILE --host N  run the host agent
//! pipecloud ctl [--socket PATH] status      query a running agent
//! pipecloud ctl [--socket PATH] mode MODE   switch the group's mode
//! pipecloud ctl [--socket PATH] attach      end a detached agent's detached state
//! pipecloud ctl [--socket PATH] hold        the hold breakdown's histograms
//! pipecloud ctl [--socket PATH] tails       the last tail episodes of held replies
//! pipecloud vm start --topology F --machine M      boot a QEMU guest of the topology
//! pipecloud vm restore --topology F --machine M --ram R --device-state S --disk [NAME=]FILE
//!                                                  resume a guest from a checkpoint
//! pipecloud vm cmdline --topology F --machine M    print its QEMU command line
//! ```
//!
//! Exit status: 0 on success, 1 on failure (invalid topology, I/O error), 2 on
//! bad usage. Logs go to stderr, filtered by `RUST_LOG` (default `info`).

mod cli;

use clap::{Parser, Subcommand};
use pipecloud::core::topology::Mode;
use std::path::PathBuf;
use std::process::ExitCode;

/// PipeCloud-rs: pipelined synchronous disaster-recovery replication.
#[derive(Parser, Debug)]
#[command(name = "pipecloud", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Topology files.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Run the host agent for one primary host of a topology.
    Agent(AgentArgs),
    /// Talk to a running agent over its control socket.
    Ctl(CtlArgs),
    /// QEMU guests of a topology (`[machine.vm]`): start, restore, command line.
    #[command(subcommand)]
    Vm(cli::vm::VmCommand),
}

#[derive(Subcommand, Debug)]
enum TopologyCommand {
    /// Validate topology files; print a summary of each valid one, and every
    /// error (file:line:column, field, what is expected) of the others.
    Check {
        /// Topology files (TOML).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// The topology file of the protection group.
    #[arg(long, value_name = "FILE")]
    topology: PathBuf,
    /// Which `[[host]]` of the topology this agent runs.
    #[arg(long, value_name = "NAME")]
    host: String,
    /// Serve disks only; do not install netfilter rules or open NFQUEUE.
    #[arg(long)]
    no_network: bool,
    /// Seconds to wait for the backup server's first welcome.
    #[arg(long, default_value_t = 60)]
    connect_wait_s: u64,
    /// Threads of the async runtime (NBD connections, control; the replication
    /// session too with `--replication-thread false`).
    /// The io_uring and network-path drivers have their own threads. One is
    /// the measured best on a 2-core host: every hand-off between runtime
    /// threads is a cross-CPU wake-up (docs/machine.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    worker_threads: u16,
    /// Run the replication session (TLS, TCP, acks) on a thread of its own
    /// (`false`: on the runtime above, with the NBD connections). Its own thread
    /// takes that work off the thread serving the guests; in async mode it is woken
    /// once per batch (docs/machine.md).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    replication_thread: bool,
    /// Serve without the backup until `pipecloud ctl attach` (the activation at
    /// a site whose backup is gone: docs/design.md §15). Loud in `ctl status`
    /// and the metrics (`protection=DETACHED`, `pipecloud_group_detached`).
    #[arg(long)]
    detached: bool,
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The agent's control socket (default: the host's `ctl_socket` in the topology).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Topology file to find the control socket in (with --host, default: first host).
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Host of the topology whose agent to ask.
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Print the group's state: mode, pending and committed vectors, held packets.
    Status {
        /// After printing, start the worst-lag figures (PEAK_LAG, PEAK_MS) afresh.
        #[arg(long)]
        reset_peaks: bool,
    },
    /// Print the hold breakdown's histograms, machine-readable (docs/design.md §8).
    Hold,
    /// Attach a detached agent (`agent --detached`): start replicating to the
    /// topology's backup.
    Attach,
    /// Print the last tail episodes of held replies, one per line (docs/design.md §8).
    Tails,
    /// Switch the group's replication mode.
    Mode {
        /// async | sync | pipelined | checkpoint
        #[arg(value_parser = parse_mode)]
        mode: Mode,
    },
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse::<Mode>().map_err(|e| e.to_string())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (impossible here) would only be ignored.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Topology(TopologyCommand::Check { files }) => {
            Ok(if cli::topology::check(&files) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Agent(args) => {
            let topology = cli::topology::load_valid(&args.topology)?;
            if topology.host(&args.host).is_none() {
                let hosts: Vec<&str> = topology.hosts.iter().map(|h| h.name.as_str()).collect();
                anyhow::bail!(
                    "host `{}` is not declared in {} (its hosts: {})",
                    args.host,
                    args.topology.display(),
                    hosts.join(", ")
                );
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(usize::from(args.worker_threads))
                .enable_all()
                .build()?;
            rt.block_on(pipecloud::agent::run(pipecloud::agent::AgentOptions {
                topology: args.topology,
                host: args.host,
                no_network: args.no_network,
                connect_wait: std::time::Duration::from_secs(args.connect_wait_s),
                replication_thread: args.replication_thread,
                detached: args.detached,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Vm(command) => cli::vm::run(command),
        Command::Ctl(args) => {
            let socket = match (&args.socket, &args.topology) {
                (Some(s), _) => s.clone(),
                (None, Some(t)) => {
                    let topo = cli::topology::load_valid(t)?;
                    let host = match &args.host {
                        Some(h) => topo.host(h).cloned(),
                        None => topo.hosts.first().cloned(),
                    };
                    host.map(|h| h.ctl_socket)
                        .ok_or_else(|| anyhow::anyhow!("no such host in {}", t.display()))?
                }
                (None, None) => {
                    anyhow::bail!("give --socket PATH or --topology FILE [--host NAME]")
                }
            };
            let out = match args.command {
                CtlCommand::Status { reset_peaks } => pipecloud::ctl::status(&socket, reset_peaks)?,
                CtlCommand::Hold => pipecloud::ctl::request(&socket, "hold")?,
                CtlCommand::Attach => pipecloud::ctl::attach(&socket, None)?,
                CtlCommand::Tails => pipecloud::ctl::request(&socket, "tails")?,
                CtlCommand::Mode { mode } => {
                    let m = pipecloud::agent::block_mode(mode)?;
                    pipecloud::ctl::set_mode(&socket, m, None)?
                }
            };
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pipecloud: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
