#!/usr/bin/env bash
# Benchmarks the block path: fio through `nbdfuse -C 1` + loop (--direct-io=on) against
#   (1) `pipecloud agent` (the product: NBD export -> ReplicatedDisk -> io_uring LocalImage,
#       replicating over mutual TLS to a real `backup-server` on loopback, RTT ~ 0) in
#       `async` mode, then switched at run time (`pipecloud ctl mode`) to `sync`, both with
#       --no-network (a pure block client); then a second agent (fresh image and backup) in
#       `pipelined` mode, which needs the agent's network path: no packet flows, but its
#       rules, queues and kernel tagger are in place as in production,
#   (2) our NBD server alone on a LocalImage (examples/nbd-serve.rs: no replication),
#   (3) `nbdkit file` on the same stack,
# plus the raw image file as a baseline. Everything runs in a private network namespace the
# script makes (`unshare --net`: loopback, and a veth pair routing the topology's machine
# address for the network path); it, the veth and the agent's rules go when the script ends.
# Prints IOPS and p50 completion latency per
# workload and the ratios against nbdkit. nbdkit runs twice (before and after ours) and
# the better of its two runs is the baseline, so a load spike cannot flatter us.
#
# Workloads (4 KiB): randwrite QD1 O_DIRECT, randwrite QD32 O_DIRECT (libaio), sequential
# write QD1 O_DSYNC (each write = write + FLUSH on this path).
#
# Usage: scripts/bench-nbd.sh            (needs root, /dev/fuse, loop devices, fio, nbdkit)
# Env:   RUNTIME=15 (s per fio job on the stacks), RAW_RUNTIME=10, SIZE=1G (disk size),
#        REGION=256M (fio region), KEEP=1 (keep the temp dir),
#        BACKUP_DIR=DIR (where the backup server keeps its journal and volumes;
#        default: the temp dir on the same disk as the images, so the backup's
#        fdatasyncs compete with the primary's writes as they would not with a
#        remote backup; BACKUP_DIR=/dev/shm takes the disk out of that)
set -euo pipefail

RUNTIME=${RUNTIME:-15}
RAW_RUNTIME=${RAW_RUNTIME:-10}
SIZE=${SIZE:-1G}
REGION=${REGION:-256M}
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/bench-agent.sh
. "$repo/scripts/lib/bench-agent.sh"

# Everything (servers, FUSE mounts, the agent's network path) lives in a private mount and
# network namespace that dies with us.
if [ -z "${BENCH_NBD_IN_NS:-}" ]; then
  for t in fio nbdkit nbdfuse fusermount3 setpriv unshare python3 ip; do
    command -v "$t" >/dev/null || { echo "bench-nbd: missing $t (run scripts/install-deps.sh)" >&2; exit 1; }
  done
  echo "bench-nbd: building examples/nbd-serve (release)" >&2
  (cd "$repo" && cargo build --release --quiet --example nbd-serve --bin pipecloud --bin pipecloud-loop -p pipecloud \
     && cargo build --release --quiet -p backup-server --bin backup-server)
  exec unshare --mount --net --propagation private env BENCH_NBD_IN_NS=1 bash "$0" "$@"
fi

rel="${CARGO_TARGET_DIR:-$repo/target}/release"
serve_bin="$rel/examples/nbd-serve"
T=$(mktemp -d /tmp/pc-bench-nbd.XXXXXX)
B=$(mktemp -d "${BACKUP_DIR:-$T}/pc-bench-backup.XXXXXX")
server_pid=""; fuse_pid=""; loop=""; backup_pid=""; A=""

teardown_stack() {
  # Order from docs/machine.md ("Network namespaces and mounts"): (umount) -> loop device gone -> fusermount3 -u -> stop server.
  set +e
  loop_detach
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
stop_backup() {
  if [ -n "$backup_pid" ]; then kill "$backup_pid" 2>/dev/null; wait "$backup_pid" 2>/dev/null; fi
  backup_pid=""
}
cleanup() {
  teardown_stack
  stop_backup
  bench_net_down
  if [ -z "${KEEP:-}" ]; then rm -rf "$T" "$B"; else echo "kept $T $B" >&2; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT
bench_net_up

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
  for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.05; done
  mkdir -p "$T/fuse"
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { echo "bench-nbd: $label server did not start" >&2; cat "$T/$label.log" >&2; exit 1; }
  rm -f "$T/nbdfuse.pid"
  nbdfuse -C 1 -P "$T/nbdfuse.pid" "$T/fuse/disk" "nbd+unix:///disk0?socket=$sock" \
    </dev/null >"$T/nbdfuse-$label.log" 2>&1 &
  fuse_pid=$!
  for _ in $(seq 200); do [ -s "$T/nbdfuse.pid" ] && break; sleep 0.05; done
  [ -s "$T/nbdfuse.pid" ] || { echo "bench-nbd: nbdfuse failed" >&2; cat "$T/nbdfuse-$label.log" >&2; exit 1; }
  loop_attach "$T/fuse/disk"
  echo "bench-nbd: $label on $loop (${RUNTIME}s per job)" >&2
  run_fio "$label" "$loop" "$RUNTIME"
}

# start_agent MODE: the agent under test in MODE, with its own work dir ($T/agent-MODE: image,
# NBD and control sockets) and a real backup-server on loopback (journal in $B/MODE).
start_agent() {
  local mode=$1 port
  A="$T/agent-$mode"
  mkdir -p "$A" "$B/$mode"
  port=$(free_port)
  "$rel/backup-server" certs --dir "$B/$mode" --server-name localhost --group bench \
    --listen "127.0.0.1:$port" >/dev/null
  "$rel/backup-server" serve --config "$B/$mode/backup-server.toml" </dev/null \
    >"$T/backup-$mode.log" 2>&1 &
  backup_pid=$!
  bench_topology "$A/bench.toml" "$A" "$B/$mode" "$port" "$mode" "$SIZE"
  bench_agent_net_args "$mode"
  "$rel/pipecloud" agent --topology "$A/bench.toml" --host h ${BENCH_NET_ARGS[@]+"${BENCH_NET_ARGS[@]}"} \
    </dev/null >"$T/agent-$mode.log" 2>&1 &
  server_pid=$!
}
agent_mode() {
  "$rel/pipecloud" ctl --socket "$A/ctl.sock" mode "$1" >/dev/null
}
# For the reader only (a figure, not a check): a failed status leaves its error in the file.
agent_status() {
  "$rel/pipecloud" ctl --socket "$A/ctl.sock" status >"$T/agent-status-$1.txt" 2>&1 || true
}

# nbdkit file plugin on the same stack (first of two runs)
truncate -s "$SIZE" "$T/kit.img"
kit() {
  nbdkit --foreground --unix "$T/kit.sock" file "$T/kit.img" </dev/null >"$T/nbdkit.log" 2>&1 &
  server_pid=$!
  stack "$1" "$T/kit.sock"
  teardown_stack
  rm -f "$T/kit.sock"
}
kit nbdkit1

# the agent: async, then sync on the same export (switched at run time), --no-network
start_agent async
stack agent-async "$A/nbd/disk0.sock"
agent_mode sync
echo "bench-nbd: agent switched to sync" >&2
run_fio agent-sync "$loop" "$RUNTIME"
agent_status async-sync
teardown_stack
stop_backup

# the agent in pipelined mode, with its network path (a fresh image, as async had)
start_agent pipelined
stack agent-pipelined "$A/nbd/disk0.sock"
agent_status pipelined
teardown_stack
stop_backup

# our NBD server alone (no replication)
"$serve_bin" --image "$T/ours.img" --size "$SIZE" --name disk0 --socket "$T/ours.sock" \
  </dev/null >"$T/ours.log" 2>&1 &
server_pid=$!
stack engine "$T/ours.sock"
teardown_stack

kit nbdkit2

# raw file baseline
echo "bench-nbd: raw file (${RAW_RUNTIME}s per job)" >&2
run_fio raw "$T/raw.img" "$RAW_RUNTIME"

echo
python3 - "$T" <<'PY'
import json, sys, os
T = sys.argv[1]
def summ(label, w):
    j = json.load(open(os.path.join(T, f"{label}-{w}.json")))["jobs"][0]["write"]
    return j["iops"], j["clat_ns"]["percentile"]["50.000000"] / 1000.0
names = {"qd1": "randwrite QD1 O_DIRECT", "qd32": "randwrite QD32 O_DIRECT", "dsync": "seq write QD1 O_DSYNC"}
rows = ["agent-async", "agent-pipelined", "agent-sync", "engine"]
print("%-24s %-16s %9s %8s | %9s %8s | %6s %6s" % ("workload (4 KiB)", "server", "IOPS", "p50 us", "nbdkit", "p50 us", "IOPS×", "p50×"))
result = []
for w, name in names.items():
    k1, k2 = summ("nbdkit1", w), summ("nbdkit2", w)
    ki, kp = max(k1[0], k2[0]), min(k1[1], k2[1])   # nbdkit's better run
    for r in rows:
        oi, op = summ(r, w)
        iops_x = oi / ki if ki else 0.0
        p50_x = kp / op if op else 0.0               # >1: ours has the lower latency
        print("%-24s %-16s %9.0f %8.0f | %9.0f %8.0f | %6.2f %6.2f" % (name, r, oi, op, ki, kp, iops_x, p50_x))
        if r in ("agent-async", "agent-pipelined"):
            result.append(f"{r.split('-')[1]}_{w}_iops_x={iops_x:.2f}")
    ri, rp = summ("raw", w)
    print("%-24s %-16s %9.0f %8.0f" % (name, "raw file", ri, rp))
print("nbdkit runs (before/after): " + ", ".join(
    "%s %.0f/%.0f IOPS" % (w, summ("nbdkit1", w)[0], summ("nbdkit2", w)[0]) for w in names))
print("RESULT " + " ".join(result))
PY
