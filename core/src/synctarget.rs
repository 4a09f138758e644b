//! The order rule at a resync target that also receives a journal
//! (docs/design.md §15, failback under reverse protection).
//!
//! During a failback the old primary's site runs a backup server for the
//! group (reverse protection): every write the active site makes is
//! journaled there. The same site's base volume is also the target of the
//! resync from the active site (the old primary's disk becomes the base
//! volume, and only the blocks whose hashes differ are sent). Reverse
//! protection starts *before* the resync, so every write after the resync's
//! start is in the journal (DRBD's SyncTarget).
//!
//! A resync block is read at the source at one instant and written at the
//! target later (the WAN in between). A journaled write to the same block made
//! at the source after that read, if applied to the base volume before the
//! block arrives, is overwritten by the older resync block: lost. So:
//!
//! **The rule**: while a base volume is being resynchronised, no journaled
//! write is applied to it and no image is materialised from it; once the resync
//! is done, the journal is applied in its order (each writer's seq order, as
//! always). The end state is right for every interleaving: for each block, the
//! resync wrote the source's content as of some instant after the journal's
//! start, and every write after that instant follows in the journal, the last
//! one being the block's content at the source.
//!
//! The base volume between the resync's end and the journal's apply is a mix
//! of instants; it is consistent only at cuts at or beyond the journal
//! position at the resync's end, which the failover's cut (the durable one)
//! always is. The tests are `core/tests/model_synctarget.rs` (every seeded
//! interleaving ends equal to the source; the injected fault, applying during
//! the resync, must lose a write).

/// Where a base volume is, as far as the resync is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetVolume {
    /// A resync is writing it (the backup server sees the resync's lock).
    Resyncing,
    /// No resync is running (none ever ran, or it finished).
    Settled,
}

/// What the applier does with journaled writes for a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// Apply them now, in journal order.
    Now,
    /// Keep them in the journal until the resync is done.
    Defer,
}

/// The rule for applying journaled writes (see the module docs).
pub fn journal_apply(volume: TargetVolume) -> Apply {
    match volume {
        TargetVolume::Resyncing => Apply::Defer,
        TargetVolume::Settled => Apply::Now,
    }
}

/// Whether images may be materialised (failover, restore) from the base
/// volume plus journal: not while a resync is writing the base volume.
pub fn may_materialise(volume: TargetVolume) -> bool {
    volume == TargetVolume::Settled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resyncing_defers_and_refuses_images() {
        assert_eq!(journal_apply(TargetVolume::Resyncing), Apply::Defer);
        assert_eq!(journal_apply(TargetVolume::Settled), Apply::Now);
        assert!(!may_materialise(TargetVolume::Resyncing));
        assert!(may_materialise(TargetVolume::Settled));
    }
}
