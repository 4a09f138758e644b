//! `pipecloud-loop`: loop devices for scripts that cannot outlive their users
//! (`src/loopdev.rs` says how).
//!
//! ```text
//! pipecloud-loop attach [--direct-io] [--read-only] FILE -- CMD [ARG...]
//!     attach FILE to a free loop device with autoclear, run CMD with the device in
//!     $PIPECLOUD_LOOP while holding it open, exit with CMD's status; the device is
//!     detached when CMD has ended and no mount of it is left
//! pipecloud-loop reap
//!     detach loop devices backed by a `pcloop-<pid>-*` file whose process is gone
//! ```
//!
//! Exit status: CMD's (128 + signal if a signal ended it); 1 on failure; 2 on bad usage.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use pipecloud::loopdev::{reap_stale, AttachOptions, LoopDevice};

/// Loop devices that cannot outlive their users.
#[derive(Parser, Debug)]
#[command(name = "pipecloud-loop", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Attach FILE (autoclear) and run CMD with the device in $PIPECLOUD_LOOP.
    Attach {
        /// Open FILE with O_DIRECT (like `losetup --direct-io=on`).
        #[arg(long)]
        direct_io: bool,
        /// A read-only device.
        #[arg(long)]
        read_only: bool,
        file: PathBuf,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Detach stale `pcloop-<pid>-*` devices whose process is gone.
    Reap,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Reap => {
            reap_stale();
            ExitCode::SUCCESS
        }
        Cmd::Attach {
            direct_io,
            read_only,
            file,
            cmd,
        } => {
            let opts = AttachOptions {
                direct_io,
                read_only,
            };
            let dev = match LoopDevice::attach(&file, opts) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("pipecloud-loop: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let status = Command::new(&cmd[0])
                .args(&cmd[1..])
                .env("PIPECLOUD_LOOP", dev.path())
                .status();
            drop(dev);
            match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
                    ExitCode::from(u8::try_from(code).unwrap_or(1))
                }
                Err(e) => {
                    eprintln!("pipecloud-loop: running {}: {e}", cmd[0]);
                    ExitCode::FAILURE
                }
            }
        }
    }
}
