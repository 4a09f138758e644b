//! `pipecloud`: the host agent and operator CLI.
fn main() -> anyhow::Result<()> {
    Ok(())
}
