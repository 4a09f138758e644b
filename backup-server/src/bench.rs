//! `backup-server bench` (filled in below).
use std::path::PathBuf;

pub fn run(_writes: u64, _dir: Option<PathBuf>) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
