//! `backup-server`: the unprivileged backup site of PipeCloud-rs.
fn main() -> anyhow::Result<()> {
    Ok(())
}
