//! `pipecloud-harness`: builds emulated primary/WAN/backup sites out of namespaces.
fn main() -> anyhow::Result<()> {
    Ok(())
}
