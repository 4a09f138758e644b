#!/usr/bin/env bash
# The main job of PipeCloud-rs: installs missing system packages, builds, and runs
# the demo on the embedded default topology: a short pgbench comparison (async,
# sync, pipelined, PostgreSQL's synchronous standby) over an emulated 50 ms WAN,
# response time with 1-3 protected tiers, one disaster per mode with the
# client/secondary/primary views, and one full-state disaster of the test guest
# (QEMU, `checkpoint` mode: one client connection survives the failover; the last
# counter value before and the first after are printed). Prints a paper-style
# table, the achieved RTT and the paths of the plots; leaves nothing behind but
# its output directory (and the cached guest image under target/guest/).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --release --bins
cargo build --release -p pipecloud-shim   # the capture shim QEMU preloads (full-state segment)
exec ./target/release/pipecloud-harness demo "$@"
