//! `pipecloud topology check FILE...`: validate topology files and print a summary.

use anyhow::{bail, Context};
use pipecloud::core::topology::{Topology, TopologyErrors, MAX_TOPOLOGY_BYTES};
use std::io::Read as _;
use std::path::Path;

/// What `topology check` says about IPv6 (docs: `pipecloud::netfilter`).
pub const IPV6_NOTE: &str = "ipv6: held at the hold queue, untagged: IPv6 from a protected \
     machine leaves only once the backup holds its writes, so IPv6 between protected machines \
     costs one backup round trip per packet (use IPv4 between tiers)";

/// Reads a topology file (at most [`MAX_TOPOLOGY_BYTES`]) as UTF-8 text.
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open topology file {}", path.display()))?;
    let mut bytes = Vec::new();
    // Read one byte past the limit to tell "exactly at the limit" from "over it".
    file.take(MAX_TOPOLOGY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read topology file {}", path.display()))?;
    if bytes.len() > MAX_TOPOLOGY_BYTES {
        bail!(
            "topology file {} is larger than {MAX_TOPOLOGY_BYTES} bytes",
            path.display()
        );
    }
    String::from_utf8(bytes)
        .with_context(|| format!("topology file {} is not UTF-8 text", path.display()))
}

/// Reads and validates one topology file. I/O problems are the outer `Err`;
/// validation problems the inner one (every error found).
pub fn load(path: &Path) -> anyhow::Result<Result<Topology, TopologyErrors>> {
    let text = read_text(path)?;
    Ok(Topology::parse(&text, &path.display().to_string()))
}

/// Reads and validates one topology file; any problem is an error whose
/// message lists every validation error (one per line). For subcommands that
/// need a valid topology (`agent`).
pub fn load_valid(path: &Path) -> anyhow::Result<Topology> {
    match load(path)? {
        Ok(t) => Ok(t),
        Err(errors) => bail!(
            "invalid topology file {} ({} error{}):\n{errors}",
            path.display(),
            errors.len(),
            if errors.len() == 1 { "" } else { "s" }
        ),
    }
}

/// Checks every file: prints the summary of each valid one on stdout and every
/// error of the others on stderr. Returns whether all files are valid.
pub fn check(files: &[impl AsRef<Path>]) -> bool {
    let mut all_valid = true;
    for (i, path) in files.iter().enumerate() {
        let path = path.as_ref();
        if i > 0 {
            println!();
        }
        match load(path) {
            Ok(Ok(t)) => {
                println!("{}: OK", path.display());
                print!("{}", t.summary());
                println!("{IPV6_NOTE}");
            }
            Ok(Err(errors)) => {
                all_valid = false;
                for e in &errors {
                    eprintln!("{e}");
                }
                eprintln!(
                    "{}: {} error{}",
                    path.display(),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                );
            }
            Err(e) => {
                all_valid = false;
                eprintln!("{}: error: {e:#}", path.display());
            }
        }
        tracing::debug!(file = %path.display(), "topology checked");
    }
    all_valid
}
