//! The agent's side of a full-state test against the real backup server
//! (tests/support/backup.rs): causal state, a checkpoint link and a
//! replication client with one 1 MiB disk `vmdisk` (writer 0, machine 0), and
//! the epoch driver's settings (a pause every 20 ms, at most 16 unacked
//! epochs). Include it after `backup`:
//!
//! ```ignore
//! #[path = "support/backup.rs"]
//! mod backup;
//! #[path = "support/checkpoint_agent.rs"]
//! mod checkpoint_agent;
//! ```

use crate::backup::{Backup, Scratch};
use pipecloud::causal::CausalState;
use pipecloud::core::epoch::EpochLimits;
use pipecloud::core::WriterId;
use pipecloud::fullstate::driver::DriverConfig;
use pipecloud::replication::checkpoint::CheckpointLink;
use pipecloud::replication::{fresh_generation, DiskSpec, ReplicationClient, ReplicationConfig};
use std::sync::Arc;
use std::time::Duration;

/// The replication side of the agent, connected to `backup`.
pub struct CheckpointAgent {
    pub causal: Arc<CausalState>,
    pub link: Arc<CheckpointLink>,
    pub client: ReplicationClient,
}

impl CheckpointAgent {
    /// Starts the client as agent `agent` of group id `group_id` (its
    /// generation file in `scratch`). Call inside a tokio runtime.
    pub fn start(
        backup: &Backup,
        scratch: &Scratch,
        group_id: u16,
        agent: &str,
    ) -> CheckpointAgent {
        let causal = Arc::new(CausalState::new(1));
        let link = Arc::new(CheckpointLink::new(16 << 20));
        let config = ReplicationConfig {
            group_id,
            agent: agent.into(),
            disks: vec![DiskSpec {
                name: "vmdisk".into(),
                size: 1 << 20,
                writer: WriterId(0),
                machine: 0,
            }],
            generation: fresh_generation(Some(&scratch.0.join("generation"))).expect("generation"),
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_secs(3),
            checkpoint: Some(Arc::clone(&link)),
            ..backup.client_config()
        };
        let client = ReplicationClient::start(config, Arc::clone(&causal)).expect("client");
        CheckpointAgent {
            causal,
            link,
            client,
        }
    }
}

/// The epoch driver's settings for the one machine of [`CheckpointAgent`].
pub fn driver_config() -> DriverConfig {
    DriverConfig {
        interval: Duration::from_millis(20),
        qmp_timeout: Duration::from_secs(5),
        limits: EpochLimits { max_unacked: 16 },
        writers: vec![(0, WriterId(0))],
        machines: vec![0],
    }
}
