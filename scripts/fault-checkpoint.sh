#!/usr/bin/env bash
# Shows that the checkpoint tests can fail (issue 21): builds the backup server with
# the TEST-ONLY fault `fault-ack-on-commit` (it acknowledges an epoch as soon as its
# Commit arrives, before pages, device state or the barrier's disk writes are
# durable) and runs backup-server/tests/checkpoint.rs against it. The run must FAIL
# with the premature-Ack finding (deterministic); the crash test usually also sees
# a failover older than an Ack the agent received (depends on the kill instants).
# Debug profile on purpose: the release binaries the rest of scripts/test.sh uses
# are never rebuilt with the fault.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${CARGO_TARGET_DIR:-$PWD/target}/fault-checkpoint.log"
mkdir -p "$(dirname "$log")"
if cargo test -p backup-server --test checkpoint --features fault-ack-on-commit >"$log" 2>&1; then
  echo "fault-checkpoint: the checkpoint tests PASSED against a server that acks before anything is durable" >&2
  exit 1
fi
needle="although the disk writes up to the barrier of epoch 2 were not sent"
grep -q "$needle" "$log" || {
  echo "fault-checkpoint: the fault run failed, but not with \"$needle\" (see $log)" >&2
  exit 1
}
crash=$(grep -c "the agent saw Ack" "$log" || true)
echo "fault-checkpoint: injected fault ack-on-commit caught (premature Ack; crash test failovers older than an Ack: $crash)"
