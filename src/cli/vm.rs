//! `pipecloud vm start|restore|cmdline`: the operator's commands for QEMU
//! guests (`pipecloud::vm` does the work).

use pipecloud::vm::host::{command_for, Started};
use pipecloud::vm::{DiskSource, RestoreOptions, StartOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Which {
    /// The topology file.
    #[arg(long, value_name = "FILE")]
    topology: PathBuf,
    /// The machine (a `[[machine]]` with a `[machine.vm]` table).
    #[arg(long, value_name = "NAME")]
    machine: String,
}

#[derive(clap::Subcommand, Debug)]
pub enum VmCommand {
    /// Boot the guest: its tap, then QEMU with its disks from the agent's NBD
    /// export (the agent must be serving them), or from image files with
    /// `--disk` (a cold boot at the backup site after a disk-only failover).
    /// Prints QEMU's pid.
    Start {
        #[command(flatten)]
        which: Which,
        /// Run QEMU in the foreground until it exits (default: daemonized).
        #[arg(long)]
        foreground: bool,
        /// Library to preload into QEMU (the full-state capture shim).
        #[arg(long, value_name = "LIB")]
        preload: Option<PathBuf>,
        /// Disk image instead of the NBD export: `NAME=FILE`, or `FILE` when the
        /// machine has one disk. Repeat per disk.
        #[arg(long = "disk", value_name = "[NAME=]FILE")]
        disks: Vec<String>,
    },
    /// Resume the guest from a checkpoint (RAM image, device state and disk
    /// images, e.g. from `backup-server failover`) with the same configuration.
    Restore {
        #[command(flatten)]
        which: Which,
        /// Guest RAM image (exactly the guest's RAM size).
        #[arg(long, value_name = "FILE")]
        ram: PathBuf,
        /// Saved device state (QEMU migration stream, RAM excluded).
        #[arg(long, value_name = "FILE")]
        device_state: PathBuf,
        /// Disk image: `NAME=FILE`, or `FILE` when the machine has one disk. Repeat per disk.
        #[arg(long = "disk", value_name = "[NAME=]FILE", required = true)]
        disks: Vec<String>,
        /// Library to preload into QEMU (the full-state capture shim).
        #[arg(long, value_name = "LIB")]
        preload: Option<PathBuf>,
    },
    /// Print the guest's QEMU command line (as `vm start` runs it; with
    /// `--incoming`, as `vm restore` does, with `--disk` files).
    Cmdline {
        #[command(flatten)]
        which: Which,
        /// The restore form: `-incoming defer`, disks from files.
        #[arg(long)]
        incoming: bool,
        /// Disk image files (with --incoming), as for `vm restore`.
        #[arg(long = "disk", value_name = "[NAME=]FILE")]
        disks: Vec<String>,
    },
}

/// `NAME=FILE` pairs; a bare `FILE` names the machine's only disk.
fn disk_args(which: &Which, args: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let t = super::topology::load_valid(&which.topology)?;
    let disks = t.disks_of(&which.machine);
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((name, file)) => Ok((name.to_owned(), PathBuf::from(file))),
            None if disks.len() == 1 => Ok((disks[0].name.clone(), PathBuf::from(a))),
            None => anyhow::bail!(
                "machine `{}` has {} disks: write --disk NAME=FILE",
                which.machine,
                disks.len()
            ),
        })
        .collect()
}

fn report(what: &str, machine: &str, s: &Started) {
    println!("{what} {machine}: pid {} ({} ms)", s.pid, s.elapsed_ms);
}

/// Runs one `vm` subcommand.
pub fn run(command: VmCommand) -> anyhow::Result<ExitCode> {
    match command {
        VmCommand::Start {
            which,
            foreground,
            preload,
            disks,
        } => {
            let disks = disk_args(&which, &disks)?;
            let s = pipecloud::vm::start(&StartOptions {
                topology: which.topology,
                machine: which.machine.clone(),
                foreground,
                preload,
                disks,
            })?;
            if !foreground {
                report("started", &which.machine, &s);
            }
        }
        VmCommand::Restore {
            which,
            ram,
            device_state,
            disks,
            preload,
        } => {
            let disks = disk_args(&which, &disks)?;
            let s = pipecloud::vm::restore(&RestoreOptions {
                topology: which.topology,
                machine: which.machine.clone(),
                ram,
                device_state,
                disks,
                preload,
            })?;
            report("restored", &which.machine, &s);
        }
        VmCommand::Cmdline {
            which,
            incoming,
            disks,
        } => {
            let source = if incoming {
                DiskSource::Files(disk_args(&which, &disks)?)
            } else {
                DiskSource::Nbd
            };
            let cmd = command_for(&which.topology, &which.machine, &source, incoming, true)?;
            println!("{cmd}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
