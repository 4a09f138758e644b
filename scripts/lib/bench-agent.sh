# Shared by scripts/bench-nbd.sh and scripts/cpu-per-write.sh (sourced, not run).

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
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
ip = "10.10.0.10"
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
