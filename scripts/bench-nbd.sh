#!/usr/bin/env bash
# Benchmarks the block path: fio through `nbdfuse -C 1` + loop (--direct-io=on) against
#   (1) our NBD server with a LocalImage (examples/nbd-serve.rs, io_uring), and
#   (2) `nbdkit file` on the same stack,
# plus the raw image file as a baseline. Prints IOPS and p50 completion latency per
# workload and the ratio ours/nbdkit.
#
# Workloads (4 KiB): randwrite QD1 O_DIRECT, randwrite QD32 O_DIRECT (libaio), sequential
# write QD1 O_DSYNC (each write = write + FLUSH on this path).
#
# Usage: scripts/bench-nbd.sh            (needs root, /dev/fuse, loop devices, fio, nbdkit)
# Env:   RUNTIME=15 (s per fio job on the stacks), RAW_RUNTIME=10, SIZE=1G (disk size),
#        REGION=256M (fio region), KEEP=1 (keep the temp dir)
set -euo pipefail

RUNTIME=${RUNTIME:-15}
RAW_RUNTIME=${RAW_RUNTIME:-10}
SIZE=${SIZE:-1G}
REGION=${REGION:-256M}
repo=$(cd "$(dirname "$0")/.." && pwd)

# Everything (servers, FUSE mounts) lives in a private mount namespace that dies with us.
if [ -z "${BENCH_NBD_IN_NS:-}" ]; then
  for t in fio nbdkit nbdfuse fusermount3 losetup unshare python3; do
    command -v "$t" >/dev/null || { echo "bench-nbd: missing $t (run scripts/install-deps.sh)" >&2; exit 1; }
  done
  echo "bench-nbd: building examples/nbd-serve (release)" >&2
  (cd "$repo" && cargo build --release --quiet --example nbd-serve)
  exec unshare --mount --propagation private env BENCH_NBD_IN_NS=1 bash "$0" "$@"
fi

serve_bin="$repo/target/release/examples/nbd-serve"
[ -x "$serve_bin" ] || serve_bin="${CARGO_TARGET_DIR:-$repo/target}/release/examples/nbd-serve"
T=$(mktemp -d /tmp/pc-bench-nbd.XXXXXX)
server_pid=""; fuse_pid=""; loop=""

teardown_stack() {
  # Order from NOTES.md: (umount) -> losetup -d + wait -> fusermount3 -u -> stop server.
  set +e
  if [ -n "$loop" ]; then
    losetup -d "$loop"
    local name=${loop#/dev/}
    for _ in $(seq 200); do [ -e "/sys/block/$name/loop/backing_file" ] || break; sleep 0.05; done
    loop=""
  fi
  if mountpoint -q "$T/fuse"; then fusermount3 -u "$T/fuse"; fi
  if [ -n "$fuse_pid" ]; then
    for _ in $(seq 200); do kill -0 "$fuse_pid" 2>/dev/null || break; sleep 0.05; done
    fuse_pid=""
  fi
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
    server_pid=""
  fi
  set -e
}
cleanup() {
  teardown_stack
  if [ -z "${KEEP:-}" ]; then rm -rf "$T"; else echo "kept $T" >&2; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# fio JSON -> "IOPS P50_US"
fio_summary() {
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
p50 = j["clat_ns"]["percentile"]["50.000000"] / 1000.0
print("%.0f %.0f" % (j["iops"], p50))' "$1"
}

# run_fio LABEL TARGET RUNTIME  -> writes $T/LABEL-{qd1,qd32,dsync}.json
run_fio() {
  local label=$1 target=$2 rt=$3
  local common=(--filename="$target" --bs=4k --size="$REGION" --runtime="$rt" --time_based
                --group_reporting --output-format=json --randrepeat=0)
  fio --name=qd1 --rw=randwrite --direct=1 --ioengine=libaio --iodepth=1 "${common[@]}" \
      --output="$T/$label-qd1.json" >/dev/null
  fio --name=qd32 --rw=randwrite --direct=1 --ioengine=libaio --iodepth=32 "${common[@]}" \
      --output="$T/$label-qd32.json" >/dev/null
  fio --name=dsync --rw=write --sync=dsync --ioengine=psync --iodepth=1 "${common[@]}" \
      --output="$T/$label-dsync.json" >/dev/null
}

# stack LABEL SOCKET : nbdfuse -C 1 + loop on the server listening at SOCKET, then fio.
stack() {
  local label=$1 sock=$2
  mkdir -p "$T/fuse"
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { echo "bench-nbd: $label server did not start" >&2; cat "$T/$label.log" >&2; exit 1; }
  rm -f "$T/nbdfuse.pid"
  nbdfuse -C 1 -P "$T/nbdfuse.pid" "$T/fuse/disk" "nbd+unix:///disk0?socket=$sock" \
    </dev/null >"$T/nbdfuse-$label.log" 2>&1 &
  fuse_pid=$!
  for _ in $(seq 200); do [ -s "$T/nbdfuse.pid" ] && break; sleep 0.05; done
  [ -s "$T/nbdfuse.pid" ] || { echo "bench-nbd: nbdfuse failed" >&2; cat "$T/nbdfuse-$label.log" >&2; exit 1; }
  loop=$(losetup -f --show --direct-io=on "$T/fuse/disk")
  echo "bench-nbd: $label on $loop (${RUNTIME}s per job)" >&2
  run_fio "$label" "$loop" "$RUNTIME"
  teardown_stack
}

# (1) ours
"$serve_bin" --image "$T/ours.img" --size "$SIZE" --name disk0 --socket "$T/ours.sock" \
  </dev/null >"$T/ours.log" 2>&1 &
server_pid=$!
stack ours "$T/ours.sock"

# (2) nbdkit file plugin on the same stack
truncate -s "$SIZE" "$T/kit.img"
nbdkit --foreground --unix "$T/kit.sock" file "$T/kit.img" </dev/null >"$T/nbdkit.log" 2>&1 &
server_pid=$!
stack nbdkit "$T/kit.sock"

# (3) raw file baseline
echo "bench-nbd: raw file (${RAW_RUNTIME}s per job)" >&2
run_fio raw "$T/raw.img" "$RAW_RUNTIME"

echo
printf '%-28s %10s %8s | %10s %8s | %6s | %10s %8s\n' \
  "workload (4 KiB)" "ours IOPS" "p50 us" "nbdkit" "p50 us" "ratio" "raw file" "p50 us"
for w in qd1 qd32 dsync; do
  case $w in
    qd1) name="randwrite QD1 O_DIRECT" ;;
    qd32) name="randwrite QD32 O_DIRECT" ;;
    dsync) name="seq write QD1 O_DSYNC" ;;
  esac
  read -r oi op <<<"$(fio_summary "$T/ours-$w.json")"
  read -r ki kp <<<"$(fio_summary "$T/nbdkit-$w.json")"
  read -r ri rp <<<"$(fio_summary "$T/raw-$w.json")"
  ratio=$(python3 -c "print('%.2f' % ($oi / $ki if $ki else 0))")
  printf '%-28s %10s %8s | %10s %8s | %6s | %10s %8s\n' "$name" "$oi" "$op" "$ki" "$kp" "$ratio" "$ri" "$rp"
done
