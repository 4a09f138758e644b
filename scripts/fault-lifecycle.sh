#!/usr/bin/env bash
# Shows that the lifecycle's split-brain check can fail (issue 23 "Tests"): builds the
# agent with the TEST-ONLY feature `fault-injection` (with PIPECLOUD_FAULT_UNGATED=1 it
# keeps renewing the lease but never closes its gate), installs it next to the harness
# as `pipecloud-fault-ungated` (the normal `pipecloud` binaries are never built with the
# fault), and runs the partition schedule in async mode (only the lease gate can stop a
# cut-off primary's replies there) with `--expect-split-brain`: the harness exits
# non-zero unless the two sites' reply windows overlap.
# Debug profile on purpose, as scripts/fault-checkpoint.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/faulted-agent.sh
. scripts/lib/faulted-agent.sh
target="${CARGO_TARGET_DIR:-$PWD/target}"
log="$target/fault-lifecycle.log"
mkdir -p "$target"
build_faulted_agent fault-injection fault-ungated "$log" || {
  echo "fault-lifecycle: building the faulted agent failed (see $log)" >&2
  exit 1
}
if "$target/release/pipecloud-harness" lifecycle --topology topology/single-db.toml --rtt-ms 50 \
  --lease-ms 3000 --mode async --partition primary-quorum --expect-split-brain >>"$log" 2>&1; then
  echo "fault-lifecycle: injected fault ungated-lease caught" >&2
  grep "^RESULT" "$log"
else
  grep -E "^(RESULT|harness: lifecycle)" "$log" >&2 || true
  echo "fault-lifecycle: the harness did not report the injected fault as caught (see $log)" >&2
  exit 1
fi
