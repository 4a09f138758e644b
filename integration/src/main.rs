//! `pipecloud-harness`: builds emulated primary/WAN/backup sites out of network
//! namespaces on one machine and runs real servers, clients and disasters in them.

mod app;
mod client;
mod netns;
mod pg;
mod site;
mod sys;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pipecloud-harness", about = "PipeCloud-rs integration harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Compdb {
            tier,
            listen,
            db,
            next,
            compute_ms,
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
            })
        }
    }
}
