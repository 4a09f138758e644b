//! Model test of the resync target's order rule (`docs/design.md §15`,
//! `pipecloud_core::synctarget`).
//!
//! Every schedule is a pure function of one seed. The source (the active
//! site's volume) and the target (the old primary's, now the base volume of
//! the backup server at home) share a history, then diverge on random blocks.
//! Reverse protection starts first: from then on every source write is also
//! appended to the target's journal. The resync then walks the blocks in
//! order as `backup-server resync-fetch` does: the target hashes a block, the
//! source compares it with the block's content *at that instant* and, if it
//! differs, sends the content, which arrives at the target later (FIFO, as on
//! TCP). In between, at random, the source keeps writing and the applier asks
//! the rule whether it may apply the next journaled write. At the end the
//! resync is done and the journal is applied to its end; the target must
//! equal the source.
//!
//! The injected fault (`Bug::ApplyDuringResync`: the applier ignores the
//! rule) must be caught by some seed, or the check proves nothing.
//!
//! Environment: `PIPECLOUD_SYNCTARGET_SCHEDULES` (default 5 000).

use pipecloud_core::synctarget::{journal_apply, Apply, TargetVolume};
use std::collections::VecDeque;

#[path = "model/rng.rs"]
#[allow(dead_code)]
mod rng;
use rng::Rng;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bug {
    None,
    ApplyDuringResync,
}

/// Runs one schedule; returns whether the target ended equal to the source.
fn schedule(seed: u64, bug: Bug) -> bool {
    let mut rng = Rng::new(seed);
    let blocks = 1 + rng.below(12) as usize;
    // Content is a version number; fresh versions come from one counter.
    let mut version: u64 = 1;
    let mut fresh = || {
        version += 1;
        version
    };
    let common: Vec<u64> = (0..blocks).map(|_| fresh()).collect();
    let mut source = common.clone();
    let mut target = common;
    // The old primary's writes after the failover cut, and the active site's
    // writes before reverse protection started: not journaled.
    for _ in 0..rng.below(blocks as u64 + 1) {
        let b = rng.below(blocks as u64) as usize;
        target[b] = fresh();
    }
    for _ in 0..rng.below(blocks as u64 + 1) {
        let b = rng.below(blocks as u64) as usize;
        source[b] = fresh();
    }
    let mut journal: Vec<(usize, u64)> = Vec::new();
    let mut applied = 0usize;
    // The resync: next block to hash, blocks in flight (index, content).
    let mut next = 0usize;
    let mut in_flight: VecDeque<(usize, u64)> = VecDeque::new();
    let mut state = TargetVolume::Resyncing;
    while state == TargetVolume::Resyncing {
        match rng.below(4) {
            0 => {
                // The active site writes (and the agent journals it).
                let b = rng.below(blocks as u64) as usize;
                let v = fresh();
                source[b] = v;
                journal.push((b, v));
            }
            1 if next < blocks => {
                // Hash at the target, compare at the source now.
                if target[next] != source[next] {
                    in_flight.push_back((next, source[next]));
                }
                next += 1;
            }
            2 if !in_flight.is_empty() => {
                if let Some((b, v)) = in_flight.pop_front() {
                    target[b] = v;
                }
            }
            _ => {
                let may = bug == Bug::ApplyDuringResync || journal_apply(state) == Apply::Now;
                if may && applied < journal.len() {
                    let (b, v) = journal[applied];
                    target[b] = v;
                    applied += 1;
                }
            }
        }
        if next == blocks && in_flight.is_empty() {
            state = TargetVolume::Settled;
        }
    }
    assert_eq!(journal_apply(state), Apply::Now);
    for &(b, v) in &journal[applied..] {
        target[b] = v;
    }
    target == source
}

fn schedules() -> u64 {
    std::env::var("PIPECLOUD_SYNCTARGET_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000)
}

#[test]
fn resync_then_journal_ends_equal_to_the_source() {
    for seed in 0..schedules() {
        assert!(
            schedule(seed, Bug::None),
            "seed {seed}: the target differs from the source"
        );
    }
}

#[test]
fn applying_during_the_resync_is_caught() {
    let caught = (0..schedules())
        .filter(|&s| !schedule(s, Bug::ApplyDuringResync))
        .count();
    eprintln!(
        "ApplyDuringResync: {caught} of {} schedules lose a write",
        schedules()
    );
    assert!(
        caught > 0,
        "the injected fault was never caught: the model proves nothing"
    );
}
