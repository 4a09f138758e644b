#!/usr/bin/env bash
# Shows that the full-state disaster check can fail (issue 21 "Tests"): builds the
# agent with the TEST-ONLY fault `fault-release-before-ack` (its epoch loop releases
# each epoch's output as soon as the epoch opens, before any checkpoint of it is
# acknowledged), installs it next to the harness as `pipecloud-fault-release-before-ack` (the
# normal `pipecloud` binaries are never built with the fault), and runs up to 5 points
# of the full-state disaster with `--inject-fault release-before-ack`, stopping at the
# first that FAILS (a point escapes when a checkpoint falls between the guest's reply
# and its release: 3 of 6 points seen). The harness exits non-zero unless a point FAILS (a client that saw replies the resumed guest does
# not remember: counter gaps, unsafe replies or a dead connection).
# Debug profile on purpose, as scripts/fault-checkpoint.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/faulted-agent.sh
. scripts/lib/faulted-agent.sh
target="${CARGO_TARGET_DIR:-$PWD/target}"
log="$target/fault-fullstate.log"
mkdir -p "$target"
build_faulted_agent fault-release-before-ack fault-release-before-ack "$log" || {
  echo "fault-fullstate: building the faulted agent failed (see $log)" >&2
  exit 1
}
if "$target/release/pipecloud-harness" disaster --topology topology/guest.toml --mode checkpoint \
  --points 5 --seed "${FAULT_SEED:-11}" --inject-fault release-before-ack >>"$log" 2>&1; then
  grep -E "^(point|RESULT)" "$log" >&2 || true
  echo "fault-fullstate: injected fault release-before-ack caught" >&2
  grep "^RESULT" "$log"
else
  grep -E "^(point|RESULT)" "$log" >&2 || true
  echo "fault-fullstate: the harness did not report the injected fault as caught (see $log)" >&2
  exit 1
fi
