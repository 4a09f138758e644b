#!/usr/bin/env bash
# Same-run, interleaved A/B of block-path servers through `nbdfuse -C 1` + loop (--direct-io=on):
# every round runs every variant once on every workload (fio 4 KiB randwrite QD1, randwrite QD32,
# seq write QD1 O_DSYNC), then prints the median IOPS and p50 of each variant and its ratio to
# nbdkit's median (and the median of same-round ratios). Use it to decide a change on this noisy shared machine; scripts/bench-nbd.sh
# stays the documented figure.
#
# Usage: scripts/bench-ab.sh VARIANT...        (root; env ROUNDS=3 RUNTIME=6 WORKLOADS="qd1 qd32 dsync")
#   VARIANT: nbdkit | engine | agent-async | agent-pipelined | agent-sync, optionally followed by
#            ":NAME=VALUE,NAME=VALUE" environment for the server (and its backup), and "@LABEL".
#            BIN=DIR in that list is not passed on: the variant runs `pipecloud` and `backup-server` from DIR
#            (A/B against another build: `git worktree add` + `CARGO_TARGET_DIR=... cargo build`).
#            POLICY=LINES adds `[policy]` lines (";"-separated) to the agent's topology;
#            WORKERS=N runs the agent with `--worker-threads N` (default 1);
#            AGENT_ARGS="..." adds arguments to `pipecloud agent` (e.g. "--replication-thread false");
#            BACKUP_IDLE=1 runs the backup server SCHED_IDLE (`chrt --idle 0`): it gets only CPU
#            the primary's stack leaves idle, as if it ran on another host;
#            PIN=W/R/B pins the agent's runtime workers to CPUs W, its replication thread to R and
#            the backup server's threads to B (taskset lists: "0/1/1", "0/1/0-1").
#   For the agent variants a second table gives the replication lag of each workload (the worst
#   during it, what was left when it ended, how long the backup took to ack that).
#   e.g.  scripts/bench-ab.sh nbdkit engine agent-async agent-async:PIPECLOUD_X=1@x \
#           "agent-async:POLICY=replication_coalesce_us = 5000@hold5ms"
# The agent variants run `pipecloud agent` with a real `backup-server` on loopback (journal in
# $BACKUP_DIR, default the temp dir on the same disk as the images): async and sync with
# --no-network, pipelined with its network path (it needs one). Every variant runs in a private
# network namespace the script makes (`unshare --net`), with a veth pair routing the topology's
# machine address; the namespace, its veth and the agent's rules go when the script ends.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-6}
WORKLOADS=${WORKLOADS:-qd1 qd32 dsync}
[ $# -gt 0 ] || { sed -n 2,20p "$0" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/bench-agent.sh
. "$repo/scripts/lib/bench-agent.sh"
if [ -z "${BENCH_AB_IN_NS:-}" ]; then
  (cd "$repo" && cargo build --release --quiet --example nbd-serve --bin pipecloud --bin pipecloud-loop -p pipecloud \
     && cargo build --release --quiet -p backup-server --bin backup-server)
  exec unshare --mount --net --propagation private env BENCH_AB_IN_NS=1 bash "$0" "$@"
fi
R="${CARGO_TARGET_DIR:-$repo/target}/release"
rel=$R # for loop_attach
T=$(mktemp -d /tmp/pc-ab.XXXXXX)
B=$(mktemp -d "${BACKUP_DIR:-$T}/pc-ab-backup.XXXXXX")
pids=(); L=""
stop_stack() {
  set +e
  loop_detach; L=""
  mountpoint -q "$T/fuse" && fusermount3 -u "$T/fuse"
  sleep 0.1
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  pids=()
  rm -rf "$T/nbd" "$T/s.sock" "$T/ctl.sock" "$T"/*.img "${B:?}"/*
  set -e
}
trap 'stop_stack; bench_net_down; rm -rf "$T" "$B"' EXIT
trap 'exit 143' TERM INT
bench_net_up

# start VARIANT-KIND ENV... : starts the server(s); sets $sock to the NBD socket path
start() {
  local kind=$1; shift
  case "$kind" in
    nbdkit)
      truncate -s 512M "$T/kit.img"
      env "$@" nbdkit --foreground --unix "$T/s.sock" file "$T/kit.img" </dev/null >"$T/srv.log" 2>&1 &
      pids+=($!); sock="$T/s.sock" ;;
    engine)
      env "$@" "$R/examples/nbd-serve" --image "$T/o.img" --size 512M --name disk0 \
        --socket "$T/s.sock" </dev/null >"$T/srv.log" 2>&1 &
      pids+=($!); sock="$T/s.sock" ;;
    agent-async|agent-pipelined|agent-sync)
      local port; port=$(free_port)
      "$bin/backup-server" certs --dir "$B" --server-name localhost --group bench \
        --listen "127.0.0.1:$port" >/dev/null
      local e pol="" wk=1 idle=() extra=()
      for e in "$@"; do case "$e" in POLICY=*) pol=${e#POLICY=} ;; WORKERS=*) wk=${e#WORKERS=} ;;
        BACKUP_IDLE=1) idle=(chrt --idle 0) ;; AGENT_ARGS=*) read -r -a extra <<<"${e#AGENT_ARGS=}" ;;
        PIN=*) pin=${e#PIN=} ;;
        esac; done
      env "$@" ${idle[@]+"${idle[@]}"} "$bin/backup-server" serve --config "$B/backup-server.toml" \
        </dev/null >"$T/backup.log" 2>&1 &
      pids+=($!); backup_pid=$!
      POLICY="$pol" bench_topology "$T/t.toml" "$T" "$B" "$port" "${kind#agent-}" 512M
      bench_agent_net_args "${kind#agent-}"
      env "$@" "$bin/pipecloud" agent --topology "$T/t.toml" --host h ${BENCH_NET_ARGS[@]+"${BENCH_NET_ARGS[@]}"} \
        --worker-threads "$wk" ${extra[@]+"${extra[@]}"} \
        </dev/null >"$T/srv.log" 2>&1 &
      pids+=($!); agent_pid=$!; sock="$T/nbd/disk0.sock" ;;
    *) echo "bench-ab: unknown variant kind $kind" >&2; exit 2 ;;
  esac
}

# pin_threads W/R/B: CPU affinity (taskset lists) of the agent's runtime worker threads, its
# replication thread and every thread of the backup server (threads started later, e.g. io-wq
# workers, are not pinned).
pin_threads() {
  local w r b t
  IFS=/ read -r w r b <<<"$1"
  sleep 0.2 # the threads of both processes are up by then
  for t in /proc/"$agent_pid"/task/*; do
    case "$(cat "$t/comm")" in
      tokio-rt-worker) taskset -pc "$w" "${t##*/}" >/dev/null ;;
      pc-replication) taskset -pc "$r" "${t##*/}" >/dev/null ;;
    esac
  done
  for t in /proc/"$backup_pid"/task/*; do taskset -pc "$b" "${t##*/}" >/dev/null; done
}

# The replication lag of an agent variant's workload, from `pipecloud ctl status`: repl_reset before
# fio starts the worst-lag figures afresh; repl_lag after it prints "PEAK_LAG PEAK_MS LAG DRAIN_MS":
# the most writes the backup had not acked at once during the workload, the longest a write waited
# for its ack, the writes still unacked when fio ended, and how long after that the last of them was
# acked (0 if none was pending; resolution ~10 ms, one `ctl status` per poll; "-" after 60 s).
# Tells whether a variant's IOPS only deferred the backup's work (e.g. BACKUP_IDLE=1): async mode
# lets the replica lag, by design, up to the in-flight budget; a lag that grows all run is not a
# rate the pair can sustain.
repl_reset() {
  "$bin/pipecloud" ctl --socket "$1" status --reset-peaks >/dev/null 2>&1 ||
    echo "bench-ab: could not reset the peaks of $1: its PEAK figures also cover earlier runs" >&2
}
repl_lag() {
  local st lag peak pms t0 now
  t0=$(date +%s%N)
  st=$("$bin/pipecloud" ctl --socket "$1" status 2>/dev/null) || { echo "- - - -"; return; }
  read -r lag peak pms < <(awk '$2=="disk0" {print $7, $11, $12; exit}' <<<"$st")
  [ "${lag:-x}" = 0 ] && { echo "$peak $pms 0 0"; return; }
  local first=$lag
  for _ in $(seq 6000); do
    sleep 0.01
    lag=$("$bin/pipecloud" ctl --socket "$1" status 2>/dev/null | awk '$2=="disk0" {print $7; exit}')
    [ "${lag:-x}" = 0 ] && { now=$(date +%s%N); echo "$peak $pms $first $(( (now - t0) / 1000000 ))"; return; }
  done
  echo "${peak:--} ${pms:--} ${first:--} -"
}

run() { # LABEL KIND ENV...
  local label=$1 kind=$2; shift 2
  local e rest=(); bin="$R"
  for e in "$@"; do case "$e" in BIN=*) bin=${e#BIN=} ;; *) rest+=("$e") ;; esac; done
  set -- "${rest[@]}"
  sock=""; pin=""; start "$kind" "$@"
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { echo "bench-ab: $label did not start" >&2; cat "$T/srv.log" >&2; exit 1; }
  [ -z "$pin" ] || pin_threads "$pin"
  mkdir -p "$T/fuse"; rm -f "$T/pid"
  nbdfuse -C 1 -P "$T/pid" "$T/fuse/disk" "nbd+unix:///disk0?socket=$sock" </dev/null >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do [ -s "$T/pid" ] && break; sleep 0.05; done
  loop_attach "$T/fuse/disk"; L=$loop
  for w in $WORKLOADS; do
    case $w in
      qd1) a=(--rw=randwrite --direct=1 --ioengine=libaio --iodepth=1) ;;
      qd32) a=(--rw=randwrite --direct=1 --ioengine=libaio --iodepth=32) ;;
      dsync) a=(--rw=write --sync=dsync --ioengine=psync) ;;
      *) echo "bench-ab: unknown workload $w" >&2; exit 2 ;;
    esac
    [ "${kind#agent-}" = "$kind" ] || repl_reset "$T/ctl.sock"
    fio --name=x "${a[@]}" --filename="$L" --bs=4k --size=128M --runtime="$RUNTIME" --time_based \
      --output-format=json --randrepeat=0 >"$T/fio.json"
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; c=j["clat_ns"]; print(sys.argv[2], sys.argv[3], "%.0f" % j["iops"], "%.0f" % (c["percentile"]["50.000000"] / 1000), "%.0f" % (c["percentile"]["99.000000"] / 1000), "%.0f" % (c["mean"] / 1000), sys.argv[4])' \
      "$T/fio.json" "$label" "$w" "$([ "${kind#agent-}" != "$kind" ] && repl_lag "$T/ctl.sock")" \
      | tee -a "$T/results"
  done
  stop_stack
}

for r in $(seq "$ROUNDS"); do
  echo "bench-ab: round $r of $ROUNDS" >&2
  for v in "$@"; do
    spec=${v%@*}; label=$v; [ "$spec" != "$v" ] && label=${v#*@} || label=$spec
    kind=${spec%%:*}; envs=()
    if [ "$kind" != "$spec" ]; then IFS=, read -r -a envs <<<"${spec#*:}"; fi
    run "$label" "$kind" ${envs[@]+"${envs[@]}"}
  done
done
python3 - "$T/results" <<'PY'
import sys, statistics, collections
# Each variant's IOPS and p50 are also divided by nbdkit's of the same round: the host's steal
# comes and goes in bursts of seconds to minutes, so a same-round ratio is steadier than a
# ratio of medians. "rIOPS×"/"rp50×" are the medians of those per-round ratios.
res = collections.defaultdict(list)
lag = collections.defaultdict(list)
order = []
rnd = collections.Counter()
for line in open(sys.argv[1]):
    parts = line.split()
    label, w, iops, p50 = parts[:4]
    if label not in order: order.append(label)
    res[(label, w)].append((float(iops), float(p50)))
    if len(parts) >= 10:  # agent variants: worst lag, lag when fio ended, drain time
        lag[(label, w)].append(parts[6:10])
ws = []
for (l, w) in res:
    if w not in ws: ws.append(w)
print("\n%-22s %-6s %8s %7s %6s %6s %7s %7s   %s" % ("variant", "load", "IOPS", "p50 us", "IOPS×", "p50×", "rIOPS×", "rp50×", "IOPS per round"))
for w in ws:
    base = res.get(("nbdkit", w))
    bi = statistics.median(x[0] for x in base) if base else None
    bp = statistics.median(x[1] for x in base) if base else None
    for l in order:
        xs = res.get((l, w))
        if not xs: continue
        i = statistics.median(x[0] for x in xs); p = statistics.median(x[1] for x in xs)
        ri = rp = "-"
        if base and len(base) == len(xs):
            ri = "%.2f" % statistics.median(x[0] / b[0] for x, b in zip(xs, base))
            rp = "%.2f" % statistics.median(b[1] / x[1] for x, b in zip(xs, base))
        print("%-22s %-6s %8.0f %7.0f %6s %6s %7s %7s   %s" % (l, w, i, p,
              "%.2f" % (i / bi) if bi else "-", "%.2f" % (bp / p) if bp else "-", ri, rp,
              " ".join("%.0f" % x[0] for x in xs)))
lags = [(l, w) for w in ws for l in order if lag.get((l, w))]
if lags:
    # Worst lag during the workload (writes unacked at once, longest wait for an ack), the writes
    # still unacked when fio ended and how long the backup then took to ack them ("-": not within
    # 60 s): whether a variant only deferred the backup's work. Medians over rounds, and the max.
    print("\n%-22s %-6s %9s %9s %8s %8s %8s %9s" % ("variant", "load", "peak lag", "max", "peak ms",
          "max", "end lag", "drain ms"))
    med = lambda v: "%.0f" % statistics.median(v) if v else "-"
    for (l, w) in lags:
        xs = lag[(l, w)]
        num = lambda k: [float(x[k]) for x in xs if x[k] not in ("-", "")]
        mx = lambda v: "%.0f" % max(v) if v else "-"
        print("%-22s %-6s %9s %9s %8s %8s %8s %9s" % (l, w, med(num(0)), mx(num(0)), med(num(1)),
              mx(num(1)), med(num(2)), mx(num(3)) if len(num(3)) == len(xs) else "-"))
PY
