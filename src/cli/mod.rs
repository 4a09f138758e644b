//! Subcommands of the `pipecloud` binary (the binary's edge: `anyhow` errors).
//!
//! One module per subcommand group. `agent` and `ctl` are placeholders until
//! the agent driver and its control socket land.

pub mod topology;
pub mod vm;
