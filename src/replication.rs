//! Replication client: streams writes to the backup server. (in progress)
