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
# Release mode: the model test runs 100k schedules, the block tests push real I/O.
cargo build --workspace --release --all-targets
cargo test --workspace --release -- --nocapture 2>&1 | tee target/test-output.log
grep -E '^model: ' target/test-output.log || true
