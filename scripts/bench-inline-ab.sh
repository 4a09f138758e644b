#!/usr/bin/env bash
# Same-run A/B of LocalImage's inline-write policy (src/image.rs) against `nbdkit file`:
# fio 4 KiB (randwrite QD1, randwrite QD32, seq write O_DSYNC) through `nbdfuse -C 1` + loop
# (--direct-io=on) on examples/nbd-serve with PIPECLOUD_INLINE_WRITES=never|alone|always,
# nbdkit interleaved, ROUNDS rounds. Prints "label workload IOPS p50_us" lines.
# Usage: scripts/bench-inline-ab.sh   (root; env ROUNDS=2 RUNTIME=8)
set -euo pipefail
ROUNDS=${ROUNDS:-2}
RUNTIME=${RUNTIME:-8}
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${BENCH_AB_IN_NS:-}" ]; then
  (cd "$repo" && cargo build --release --quiet --example nbd-serve)
  exec unshare --mount --propagation private env BENCH_AB_IN_NS=1 bash "$0" "$@"
fi
R="${CARGO_TARGET_DIR:-$repo/target}/release"
T=$(mktemp -d /tmp/pc-ab.XXXXXX)
sp=""; L=""
stop_stack() {
  set +e
  [ -n "$L" ] && { losetup -d "$L"; sleep 0.3; L=""; }
  mountpoint -q "$T/fuse" && fusermount3 -u "$T/fuse"
  [ -n "$sp" ] && { sleep 0.2; kill "$sp" 2>/dev/null; wait "$sp" 2>/dev/null; sp=""; }
  rm -f "$T/s.sock"
  set -e
}
trap 'stop_stack; rm -rf "$T"' EXIT
trap 'exit 143' TERM INT
truncate -s 512M "$T/kit.img"
run() { # LABEL SERVER-COMMAND...
  local label=$1; shift
  "$@" </dev/null >"$T/$label.srv.log" 2>&1 &
  sp=$!
  for _ in $(seq 200); do [ -S "$T/s.sock" ] && break; sleep 0.05; done
  mkdir -p "$T/fuse"; rm -f "$T/pid"
  nbdfuse -C 1 -P "$T/pid" "$T/fuse/disk" "nbd+unix:///disk0?socket=$T/s.sock" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 200); do [ -s "$T/pid" ] && break; sleep 0.05; done
  L=$(losetup -f --show --direct-io=on "$T/fuse/disk")
  for w in qd1 qd32 dsync; do
    case $w in
      qd1) a=(--rw=randwrite --direct=1 --ioengine=libaio --iodepth=1) ;;
      qd32) a=(--rw=randwrite --direct=1 --ioengine=libaio --iodepth=32) ;;
      dsync) a=(--rw=write --sync=dsync --ioengine=psync) ;;
    esac
    fio --name=x "${a[@]}" --filename="$L" --bs=4k --size=128M --runtime="$RUNTIME" --time_based \
      --output-format=json --randrepeat=0 >"$T/$label-$w.json"
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(sys.argv[2], sys.argv[3], "%.0f" % j["iops"], "%.0f" % (j["clat_ns"]["percentile"]["50.000000"] / 1000))' \
      "$T/$label-$w.json" "$label" "$w"
  done
  stop_stack
}
for _ in $(seq "$ROUNDS"); do
  run nbdkit nbdkit --foreground --unix "$T/s.sock" file "$T/kit.img"
  for p in never alone always; do
    rm -f "$T/o.img"
    run "engine-$p" env PIPECLOUD_INLINE_WRITES="$p" "$R/examples/nbd-serve" --image "$T/o.img" \
      --size 512M --name disk0 --socket "$T/s.sock"
  done
done
