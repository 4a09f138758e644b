//! Serves one local image over NBD (for benchmarks and manual interop checks).
//!
//! ```text
//! cargo run --release --example nbd-serve -- --image /tmp/disk.img --size 1G \
//!     --name disk0 --socket /tmp/nbd.sock
//! nbdinfo 'nbd+unix:///disk0?socket=/tmp/nbd.sock'
//! ```
//! Runs until SIGINT/SIGTERM, then finishes in-flight requests and exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use pipecloud::image::{ImageOptions, LocalImage};
use pipecloud::nbd::NbdServer;

#[derive(Parser, Debug)]
#[command(about = "Serve a local image file as an NBD export")]
struct Args {
    /// Image file (created or extended sparsely to --size).
    #[arg(long)]
    image: PathBuf,
    /// Disk size: bytes, or with a K/M/G/T suffix (powers of 1024).
    #[arg(long)]
    size: String,
    /// Export name.
    #[arg(long, default_value = "disk0")]
    name: String,
    /// Unix socket to listen on.
    #[arg(long, conflicts_with = "tcp")]
    socket: Option<PathBuf>,
    /// TCP address to listen on (e.g. 127.0.0.1:10809).
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// Use the blocking thread pool instead of io_uring.
    #[arg(long)]
    thread_pool: bool,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        Some('T' | 't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("invalid size {s:?}"))?;
    n.checked_mul(1u64 << shift)
        .with_context(|| format!("size {s:?} overflows"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let size = parse_size(&args.size)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building tokio runtime")?;
    rt.block_on(async move {
        let options = ImageOptions {
            force_thread_pool: args.thread_pool,
            ..ImageOptions::default()
        };
        let image = LocalImage::open_with(&args.image, size, options)
            .with_context(|| format!("opening image {}", args.image.display()))?;
        let server = NbdServer::new();
        server.add_export(args.name.clone(), Arc::new(image))?;
        let handle = match (&args.socket, args.tcp) {
            (Some(path), _) => server.serve_unix(path).await?,
            (None, Some(addr)) => server.serve_tcp(addr).await?,
            (None, None) => bail!("give --socket or --tcp"),
        };
        eprintln!("serving {}", handle.uri(&args.name));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        handle.shutdown().await;
        Ok(())
    })
}
