#!/usr/bin/env bash
# The main job of PipeCloud-rs: builds what it needs, installs missing system
# packages, and runs the demo on the embedded default topology.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --release
exec ./target/release/pipecloud topology check topology/two-tier.toml
