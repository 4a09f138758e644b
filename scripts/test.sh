#!/usr/bin/env bash
# The whole test suite of PipeCloud-rs (what CI runs). Needs root: the network,
# block-path and end-to-end tests build namespaces, NFQUEUE rules and loop devices.
# Long runs (millions of model schedules, many disaster points) are separate
# documented commands; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
export PIPECLOUD_MODEL_SCHEDULES="${PIPECLOUD_MODEL_SCHEDULES:-100000}"
mkdir -p target
# Release mode: the model test runs 100k schedules, the block tests push real I/O.
cargo build --workspace --release --all-targets
# The test guest of the full-state tests (Debian kernel + busybox initramfs + our service; cached).
./scripts/build-guest.sh
# The agent's replication tests use this server binary instead of building their own
# (a `cargo build -p backup-server` there would rebuild TLS crates with other features).
export PIPECLOUD_BACKUP_SERVER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/backup-server"
cargo test --workspace --release --no-fail-fast -- --nocapture 2>&1 | tee target/test-output.log
# A check that did not run must not pass: no SKIP line, no test ignored but the
# deliberate ones, and the core's model test printed its summary.
./scripts/check-test-log.sh target/test-output.log
grep -E '^model: [1-9][0-9]* schedules' target/test-output.log ||
  { echo "test.sh: the core's model test printed no summary: it did not run" >&2; exit 1; }
grep -E '^model-epoch: [1-9][0-9]* schedules' target/test-output.log ||
  { echo "test.sh: the epoch model test printed no summary: it did not run" >&2; exit 1; }
./scripts/deploy-guide-test.sh  # docs/deploy.md followed literally, then a disaster check (issue 18)

# End-to-end disaster checks (issue 6): real PostgreSQL on protected disks, an
# emulated 50 ms WAN, the whole primary site killed at random instants.
# sync and pipelined must never show an unsafe reply (client view ⊆ secondary
# view); async is the control and must show some, or the check is too weak.
H=./target/release/pipecloud-harness
POINTS="${PIPECLOUD_E2E_POINTS:-2}"
for topo in single-db two-host; do
  for mode in sync pipelined; do
    "$H" disaster --topology "topology/$topo.toml" --mode "$mode" --points "$POINTS" --seed 7 --pitr
  done
  "$H" disaster --topology "topology/$topo.toml" --mode async --points "$POINTS" --seed 7 --expect-unsafe
done
"$H" disaster --topology topology/single-db.toml --mode pipelined --points 1 --seed 7 --ipv6-client  # issue 18: client over IPv6
./scripts/fault-checkpoint.sh  # issue 21: the checkpoint tests catch an ack before durability
# issue 21: the full-state disaster (agent epochs, output held until acked, failover
# resumes the guest; one TCP connection must survive with the counter continuing).
# Its fault run (scripts/fault-fullstate.sh) is not here yet: the fault is caught only
# in some points (docs/design.md §12).
"$H" disaster --topology topology/guest.toml --mode checkpoint --points "$POINTS" --seed 7
# issue 22: a disaster inside each phase of the run-time switch (docs/design.md §17): the
# check follows the backup's failover (full-state: the same connection continues the
# counter; disk-only: cold boot, every acknowledged request in the guest's on-disk log),
# and a switch in and out under client load must break no connection (switch_drops=0).
for phase in seeding first-epoch leaving; do
  "$H" disaster --topology topology/guest.toml --mode switch --phase "$phase" --points "$POINTS" --seed 7
done
"$H" switch-load --topology topology/guest.toml --clients 4 --hold-s 5 --csv target/switch-load.csv
# issue 23: the DR lifecycle on a lease (real etcd and PostgreSQL, 50 ms WAN): the serving primary cut
# from the etcd majority, automatic failover, then failback (1 % of the disk changed on each side),
# reverse protection (a reply at the active site held for the reverse round trip), the resync of only
# the differing blocks while a client keeps inserting, and the planned switch-back (the home image must
# equal the active site's at the pause; home serves under forward protection). The harness fails unless
# split_brain_windows=0 lost_acked=0 switchback_lost=0. Its fault run: an agent that ignores its lease
# must be caught. The failback's order rule has its own model test (core/tests/model_synctarget.rs,
# with the injected ApplyDuringResync) in the workspace tests above.
"$H" lifecycle --topology topology/single-db.toml --rtt-ms 50 --lease-ms 3000 --partition primary-quorum
# Two more partition schedules (docs/design.md §7; ~40 s each, no takeover so no failback): the
# replication link cut for 4 leases (pipelined must stall: acked_while_cut=0, then resume) and the
# witness's etcd member killed then restarted (nothing may change). Every schedule also asserts the
# primary stops within its lease of losing the etcd majority and replies resume within the bound.
for p in primary-backup witness-down; do
  "$H" lifecycle --topology topology/single-db.toml --rtt-ms 50 --lease-ms 3000 --partition "$p"
done
./scripts/fault-lifecycle.sh
echo "test.sh: all tests passed"
