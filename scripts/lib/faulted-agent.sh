# shellcheck shell=bash
# Shared by scripts/fault-lifecycle.sh and scripts/fault-fullstate.sh (sourced, not run).
# (scripts/fault-checkpoint.sh does not use it: its fault is in the backup server and runs as
# a cargo test, not as a binary the harness starts.)

# build_faulted_agent FEATURE NAME LOG
# Builds the agent with the TEST-ONLY cargo feature FEATURE (debug profile: the release
# binaries the rest of scripts/test.sh uses are never rebuilt with a fault), installs it next
# to the harness as $target/release/pipecloud-NAME (the harness starts it by that name; it is
# removed when the calling script exits) and sets FAULTED_AGENT to that path. The normal
# target/debug/pipecloud is put back as it was (removed if there was none), so no faulted
# binary is left under the agent's own name. Build output goes to LOG (overwritten).
build_faulted_agent() {
  local feature=$1 name=$2 log=$3
  local target="${CARGO_TARGET_DIR:-$PWD/target}"
  local agent="$target/debug/pipecloud"
  local saved="$target/debug/.pipecloud-before-$name.$$"
  mkdir -p "$target/release" "$target/debug"
  rm -f "$saved"
  if [ -e "$agent" ]; then cp -p "$agent" "$saved"; fi
  local built=0
  cargo build -p pipecloud --bin pipecloud --features "$feature" >"$log" 2>&1 || built=$?
  if [ "$built" -eq 0 ]; then
    FAULTED_AGENT="$target/release/pipecloud-$name"
    cp "$agent" "$FAULTED_AGENT"
    # shellcheck disable=SC2064  # the path is fixed now, on purpose
    trap "rm -f '$FAULTED_AGENT'" EXIT
  fi
  if [ -e "$saved" ]; then mv -f "$saved" "$agent"; else rm -f "$agent"; fi
  if [ "$built" -ne 0 ]; then
    echo "building the agent with feature $feature failed (see $log)" >&2
    return 1
  fi
}
