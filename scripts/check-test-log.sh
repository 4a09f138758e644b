#!/usr/bin/env bash
# Fails unless a `cargo test` log shows that every check really ran. A test that
# could not run its check has not passed it, so this fails on:
# - any line with the word SKIP (a test that prints it checked nothing);
# - any ignored or skipped test other than the deliberate ones listed below;
# - ignored tests the log counts (`test result: ... N ignored`, once per test
#   binary) but does not name on a `test NAME ... ignored` line (output of
#   parallel tests spliced into that line): they cannot be told apart.
# Usage: scripts/check-test-log.sh target/test-output.log
set -euo pipefail
log=${1:?usage: check-test-log.sh LOG}
[ -s "$log" ] || { echo "check-test-log: $log is missing or empty" >&2; exit 1; }

# The only tests that may be ignored, by name, and why:
allowed=(
  # tests/netns_nfq.rs: the agent process that fail_closed_on_agent_kill runs as
  # its own child (it fails when run on its own).
  child_hold_agent
  # tests/fullstate_capture.rs: the page-writing child process of the scan tests
  # (it fails when run on its own).
  child_dirty_writer
  # tests/replication.rs: figures, not a check (latency and throughput per mode,
  # printed for a reader); run on demand with --ignored.
  figures_write_latency_and_throughput_per_mode
)

fail=0
if grep -nw 'SKIP' "$log" >&2; then
  echo "check-test-log: the lines above say SKIP: a check did not run" >&2
  fail=1
fi
named=0
while read -r name outcome; do
  named=$((named + 1))
  short=${name##*::}
  ok=0
  for a in "${allowed[@]}"; do [ "$short" = "$a" ] && ok=1; done
  if [ "$ok" = 0 ]; then
    echo "check-test-log: test $name was $outcome: it checked nothing" >&2
    fail=1
  fi
done < <(sed -nE 's/^test ([^ ]+) \.\.\. (ignored|skipped).*/\1 \2/p' "$log")
counted=$(sed -nE 's/^test result: .* ([0-9]+) ignored.*/\1/p' "$log" | awk '{s += $1} END {print s + 0}')
if [ "$counted" != "$named" ]; then
  echo "check-test-log: the summaries count $counted ignored tests, $named are named" >&2
  fail=1
fi
[ "$fail" = 0 ] || exit 1
echo "check-test-log: no skipped check ($named deliberately ignored: ${allowed[*]})" >&2
