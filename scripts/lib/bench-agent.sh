# shellcheck shell=bash
# Shared by scripts/bench-ab.sh, scripts/bench-nbd.sh and scripts/cpu-per-write.sh (sourced, not run).

# The protected machine's address in the benchmarks' topology, and the veth pair that routes it.
BENCH_MACHINE_IP=10.10.0.10
BENCH_VETH=pcbench0

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The benchmarks run in a private network namespace of their own (`unshare --net`, made when the
# script re-executes itself): mode `pipelined` needs the agent's network path (the agent refuses
# it with --no-network), and that path's rules and queues must live and die there, with the backup
# server on the same namespace's loopback. bench_net_up brings loopback up and adds a veth pair
# (both ends in the namespace) whose first end routes the machine's address, so the agent finds
# the machine's interface; no packet flows on it. It refuses to touch a namespace that has any
# link but loopback (a fresh one has only that), so it never adds the veth to the host's.
bench_net_up() {
  local links
  links=$(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')
  if [ "$links" != "lo " ]; then
    echo "bench: not a fresh network namespace (links: $links): refusing to add $BENCH_VETH" >&2
    return 1
  fi
  ip link set lo up
  ip link add "$BENCH_VETH" type veth peer name "${BENCH_VETH}p"
  ip addr add "${BENCH_MACHINE_IP%.*}.1/24" dev "$BENCH_VETH"
  ip link set "$BENCH_VETH" up
  ip link set "${BENCH_VETH}p" up
}
# bench_net_down: removes the veth pair (from the EXIT trap; the namespace itself goes with the
# script's last process, and with it whatever rules the agent left there).
bench_net_down() {
  ip link del "$BENCH_VETH" 2>/dev/null || true
}

# bench_agent_net_args MODE: sets BENCH_NET_ARGS to the `pipecloud agent` arguments for MODE:
# none for `pipelined` (it runs with its network path), `--no-network` otherwise (async and sync
# run as a pure block client, as they always have here).
# shellcheck disable=SC2034 # read by the scripts that source this file
bench_agent_net_args() {
  BENCH_NET_ARGS=(--no-network)
  [ "$1" != pipelined ] || BENCH_NET_ARGS=()
}

# bench_topology FILE WORKDIR CERTDIR PORT MODE SIZE: the one-disk topology of the benchmarks
# (host "h", machine "m", disk "disk0" with its image in WORKDIR, backup on 127.0.0.1:PORT using
# the certificates `backup-server certs --group bench` wrote into CERTDIR).
# Env POLICY: extra `[policy]` lines, ";"-separated (e.g. POLICY="replication_coalesce_us = 2000").
bench_topology() {
  local file=$1 work=$2 certs=$3 port=$4 mode=$5 size=$6
  cat >"$file" <<TOML
[group]
name = "bench"
id = 9
mode = "$mode"
[backup]
endpoint = "127.0.0.1:$port"
server_name = "localhost"
ca = "$certs/ca.pem"
cert = "$certs/bench-agent.pem"
key = "$certs/bench-agent.key"
[policy]
$(printf '%s\n' "${POLICY:-}" | tr ';' '\n')
[[host]]
name = "h"
nbd_dir = "$work/nbd"
ctl_socket = "$work/ctl.sock"
[[machine]]
name = "m"
ip = "$BENCH_MACHINE_IP"
host = "h"
outbound = true
writer = true
[[disk]]
name = "disk0"
machine = "m"
image = "$work/agent.img"
size = "$size"
TOML
}

# Loop devices that go with the script however it ends (docs/machine.md, src/loopdev.rs):
# loop_attach FILE sets $loop to an autoclear loop device (direct I/O) on FILE, held by a
# background `pipecloud-loop` ($loop_holder) that dies with the script (setpriv --pdeathsig);
# loop_detach ends the holder, so the device (nothing mounts it) detaches, and waits for that.
# Needs $rel, the release directory holding pipecloud-loop.
loop_attach() {
  local out
  out=$(mktemp)
  # shellcheck disable=SC2016 # $PIPECLOUD_LOOP expands in the inner sh
  setpriv --pdeathsig KILL -- "${rel:?}/pipecloud-loop" attach --direct-io "$1" -- \
    setpriv --pdeathsig KILL -- sh -c 'echo "$PIPECLOUD_LOOP" >"$1"; exec sleep 86400' sh "$out" &
  loop_holder=$!
  for _ in $(seq 200); do [ -s "$out" ] && break; sleep 0.05; done
  loop=$(cat "$out"); rm -f "$out"
  [ -n "$loop" ] || { echo "bench: pipecloud-loop could not attach $1" >&2; return 1; }
}
loop_detach() {
  [ -n "${loop_holder:-}" ] || return 0
  kill "$loop_holder" 2>/dev/null; wait "$loop_holder" 2>/dev/null || true
  for _ in $(seq 200); do [ -e "/sys/block/${loop#/dev/}/loop/backing_file" ] || break; sleep 0.05; done
  loop=""; loop_holder=""
}
