#!/usr/bin/env bash
# CPU time per 4 KiB write, per thread, of the processes behind `nbdfuse -C 1` + loop while fio
# runs randwrite: where a block-path write spends CPU (user and system) and how often each thread
# sleeps (voluntary context switches per write). Complements scripts/bench-nbd.sh, whose IOPS
# ratios only say how much slower; this says where.
#
# Usage: scripts/cpu-per-write.sh [agent|engine|nbdkit]     (needs root, /dev/fuse, loop, fio)
# Env:   MODE=async|pipelined|sync (agent), QD=32, RT=8 (s), BACKUP_DIR=/dev/shm (backup journal:
#        tmpfs by default so its fdatasyncs do not load the disk), WORKERS (agent --worker-threads),
#        PERF=1 (also `perf record -a -g` 5 s into $PERF_OUT, default /tmp/cpu-per-write.perf),
#        SYSCALLS=1 (also count the server's (and backup's) syscalls per write with `perf stat`;
#        the tracepoints slow everything: CPU figures of such a run are not comparable),
#        SCHED=1 with PERF=1 (`perf sched record` 3 s instead: `perf sched latency -i $PERF_OUT`),
#        KEEPLOG=FILE (keep the server's log there),
#        FIO_ARGS="..." (more fio options, after the defaults: e.g. "--rw=write --sync=1 --iodepth=1"
#        for O_DSYNC writes, each a write + FLUSH on this path)
# Runs in a private network namespace of its own (`unshare --net`, loopback and a veth pair routing
# the topology's machine address): MODE=pipelined runs the agent with its network path (it needs
# one), async and sync with --no-network. The namespace and the agent's rules go when it ends.
set -euo pipefail
what=${1:-agent}
case "$what" in agent|engine|nbdkit) ;; *) echo "usage: $0 [agent|engine|nbdkit]" >&2; exit 2;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/bench-agent.sh
. "$repo/scripts/lib/bench-agent.sh"
rel="${CARGO_TARGET_DIR:-$repo/target}/release"
if [ -z "${CPW_IN_NS:-}" ]; then
  (cd "$repo" && cargo build --release --quiet --bin pipecloud --bin pipecloud-loop --example nbd-serve -p pipecloud \
     && cargo build --release --quiet -p backup-server --bin backup-server)
  exec unshare --mount --net --propagation private env CPW_IN_NS=1 bash "$0" "$@"
fi
T=$(mktemp -d /tmp/pc-cpw.XXXXXX)
B=$(mktemp -d "${BACKUP_DIR:-/dev/shm}/pc-cpw-backup.XXXXXX")
loop=""; pids=()
cleanup() {
  set +e
  loop_detach
  mountpoint -q "$T/fuse" && fusermount3 -u "$T/fuse"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  bench_net_down
  [ -z "${KEEPLOG:-}" ] || cp "$T/server.log" "$KEEPLOG"; rm -rf "$T" "$B"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
bench_net_up
mkdir -p "$T/nbd" "$T/fuse"
sock="$T/nbd/disk0.sock"
case "$what" in
  nbdkit)
    truncate -s 1G "$T/kit.img"
    nbdkit --foreground --unix "$sock" file "$T/kit.img" </dev/null >"$T/server.log" 2>&1 &
    pids+=($!); server=$! ;;
  engine)
    "$rel/examples/nbd-serve" --image "$T/img" --size 1G --name disk0 --socket "$sock" \
      </dev/null >"$T/server.log" 2>&1 &
    pids+=($!); server=$! ;;
  agent)
    port=$(free_port)
    "$rel/backup-server" certs --dir "$B" --server-name localhost --group bench \
      --listen "127.0.0.1:$port" >/dev/null
    "$rel/backup-server" serve --config "$B/backup-server.toml" </dev/null >"$T/backup.log" 2>&1 &
    pids+=($!); backup=$!
    bench_topology "$T/t.toml" "$T" "$B" "$port" "${MODE:-async}" 1G
    bench_agent_net_args "${MODE:-async}"
    "$rel/pipecloud" agent --topology "$T/t.toml" --host h ${BENCH_NET_ARGS[@]+"${BENCH_NET_ARGS[@]}"} \
      ${WORKERS:+--worker-threads "$WORKERS"} </dev/null >"$T/server.log" 2>&1 &
    pids+=($!); server=$! ;;
esac
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "cpu-per-write: server did not start" >&2; cat "$T/server.log" >&2; exit 1; }
nbdfuse -C 1 -P "$T/nbdfuse.pid" "$T/fuse/disk" "nbd+unix:///disk0?socket=$sock" \
  </dev/null >"$T/nbdfuse.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do [ -s "$T/nbdfuse.pid" ] && break; sleep 0.05; done
nbdfuse_pid=$(cat "$T/nbdfuse.pid")
loop_attach "$T/fuse/disk"
watch_pids="$server ${backup:-} $nbdfuse_pid"
# pid comm utime stime voluntary_ctxt_switches, per thread (ticks of 10 ms)
snap() {
  for p in $watch_pids; do
    for t in /proc/"$p"/task/*; do
      [ -r "$t/stat" ] || continue
      echo "$p $(tr ' ' _ <"$t/comm") $(awk '{print $14, $15}' "$t/stat") \
        $(awk '/^voluntary_ctxt_switches/{print $2}' "$t/status")"
    done
  done
}
snap >"$T/s0"
head -1 /proc/stat >"$T/stat0"
if [ -n "${PERF:-}" ]; then
  if [ -n "${SCHED:-}" ]; then perf sched record -o "${PERF_OUT:-/tmp/cpu-per-write.perf}" -- sleep 3 >/dev/null 2>&1 &
  else perf record -F 2000 -a -g -o "${PERF_OUT:-/tmp/cpu-per-write.perf}" -- sleep 5 >/dev/null 2>&1 & fi
fi
if [ -n "${SYSCALLS:-}" ]; then
  # syscalls of the server (and backup) processes during the run, per write (printed below)
  perf_stat=()
  for p in $server ${backup:-}; do
    perf stat -e 'syscalls:sys_enter_*' -p "$p" -x, -o "$T/syscalls-$p.csv" -- sleep "${RT:-8}" \
      >/dev/null 2>&1 &
    perf_stat+=($!)
  done
fi
read -r -a fio_args <<<"${FIO_ARGS:-}" || true
fio --name=w --rw=randwrite --direct=1 --ioengine=libaio --iodepth="${QD:-32}" --filename="$loop" \
  --bs=4k --size=256M --runtime="${RT:-8}" --time_based --randrepeat=0 --output-format=json \
  --output="$T/fio.json" ${fio_args[@]+"${fio_args[@]}"} >/dev/null
snap >"$T/s1"
head -1 /proc/stat >"$T/stat1"
# perf stat exits non-zero when interrupted, as it is here: harmless (a figure, not a check).
[ -z "${SYSCALLS:-}" ] || wait "${perf_stat[@]}" || true
wait_perf() { [ -z "${PERF:-}" ] || sleep 1; }
wait_perf
python3 - "$T" "$what" <<'PY'
import json, sys, os
T, what = sys.argv[1], sys.argv[2]
w = json.load(open(os.path.join(T, "fio.json")))["jobs"][0]["write"]
ios = w["total_ios"]
hz = os.sysconf("SC_CLK_TCK")
def load(name):
    d = {}
    for line in open(os.path.join(T, name)):
        p, comm, ut, st, vol = line.split()
        k = (p, comm)
        a = d.setdefault(k, [0, 0, 0])
        a[0] += int(ut); a[1] += int(st); a[2] += int(vol)
    return d
a, b = load("s0"), load("s1")
us = lambda ticks: ticks * 1e6 / hz / ios
print(f"{what}: {w['iops']:.0f} IOPS, p50 {w['clat_ns']['percentile']['50.000000']/1000:.0f} us, {ios} writes")
print(f"{'pid':>7} {'thread':<18} {'cpu us/write':>12} {'user':>6} {'sys':>6} {'sleeps/write':>12}")
total = 0.0
for k in sorted(b):
    z = a.get(k, [0, 0, 0])
    u, s, v = b[k][0] - z[0], b[k][1] - z[1], b[k][2] - z[2]
    if u + s == 0 and v == 0:
        continue
    total += us(u + s)
    print(f"{k[0]:>7} {k[1]:<18} {us(u+s):12.1f} {us(u):6.1f} {us(s):6.1f} {v/ios:12.2f}")
for sc in sorted(f for f in os.listdir(T) if f.startswith("syscalls-")):
    rows = []
    for line in open(os.path.join(T, sc)):
        f = line.strip().split(",")
        if len(f) > 2 and f[0].isdigit() and int(f[0]) > 0:
            rows.append((int(f[0]), f[2].split(":")[-1].removeprefix("sys_enter_")))
    rows.sort(reverse=True)
    pid = sc.removeprefix("syscalls-").removesuffix(".csv")
    print(f"syscalls per write, pid {pid}: " + ", ".join(f"{n} {c / ios:.2f}" for c, n in rows[:10]))
c0 = [int(x) for x in open(os.path.join(T, "stat0")).read().split()[1:9]]
c1 = [int(x) for x in open(os.path.join(T, "stat1")).read().split()[1:9]]
d = [b - a for a, b in zip(c0, c1)]
names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
tot = sum(d) or 1
print("whole machine during the run: " + ", ".join(f"{n} {100 * x / tot:.0f}%" for n, x in zip(names, d) if x))
print(f"total (server{', backup' if what == 'agent' else ''}, nbdfuse): {total:.1f} us of CPU per write")
PY
