#!/usr/bin/env bash
# Follows docs/deploy.md literally: runs the guide's command blocks marked
# ```sh test:ROLE (ROLE = host or backup; `:daemon` = a long-running command, started
# in the background) in order, each in a fresh bash that first runs the guide's names
# block, inside the network namespace standing in for ROLE. No harness, no site
# builder: the test itself only builds the world around the guide (a host, a backup
# site and a client as network namespaces, linked by veths) and runs a workload on the
# protected disk: PostgreSQL 15 in the guide's container, two clients inserting
# numbered rows through the hold, one over IPv4 and one over IPv6 (each must see
# acknowledgements). It checks the guide's wiring check (`ctl status` shows packets at
# the hold), cuts the backup link, a second later kills the primary (agent first: its
# rules then drop every outbound packet), fails over by the guide, recovers PostgreSQL
# on the failed-over volume and checks that every insert a client saw acknowledged is
# there. Last, `systemd-analyze verify` on the units in deploy/systemd.
#
# Needs root. Runs in a private mount namespace; everything it creates carries a unique
# name and is removed on exit, failed or not. About 20-25 s.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PC_GUIDE_PRIVATE_MNT:-}" ]; then
  exec env PC_GUIDE_PRIVATE_MNT=1 unshare --mount --propagation private -- "$0" "$@"
fi

fail() { echo "deploy-guide-test: FAIL: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || fail "$1 not found: install the Debian package $2 (scripts/install-deps.sh)"; }
need nbdfuse libnbd-bin
need fusermount3 fuse3
need losetup util-linux
need nsenter util-linux
need setpriv util-linux
need mkfs.ext4 e2fsprogs
need iptables iptables
need ip6tables iptables
need ip iproute2
need systemd-analyze systemd
need qemu-img qemu-utils
PGBIN=/usr/lib/postgresql/15/bin
[ -x "$PGBIN/postgres" ] || fail "$PGBIN/postgres not found: install the Debian package postgresql-15"
BIN=${PIPECLOUD_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
for b in pipecloud backup-server; do
  [ -x "$BIN/$b" ] || fail "$BIN/$b not found: cargo build --release -p pipecloud -p backup-server"
done
export PATH="$BIN:$PATH"

# Unique names; the guide's paths point into a fresh work directory.
ID=pcg$(($$ % 100000))
NS_HOST=${ID}h NS_BACKUP=${ID}b NS_CLIENT=${ID}c
WORK=$(mktemp -d /var/tmp/pipecloud-guide.XXXXXX)
chmod 0755 "$WORK" # the backup server's user traverses it
export PC_ETC=$WORK/etc PC_RUN=$WORK/run PC_LIB=$WORK/lib BACKUP_ETC=$WORK/backup-etc
export BACKUP_USER=nobody CONTAINER=${ID}m MNT=$WORK/mnt
PGSOCK=/tmp/$ID-pg
DAEMONS=()

cleanup() {
  set +e
  for p in "${DAEMONS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for ns in "$CONTAINER" "$NS_HOST" "$NS_BACKUP" "$NS_CLIENT"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p"; done
  done
  sleep 0.5
  umount -l "$MNT" "$WORK/recovered" 2>/dev/null
  for f in /sys/block/loop*/loop/backing_file; do
    case "$(cat "$f" 2>/dev/null)" in "$WORK"/*) d=${f#/sys/block/}; losetup -d "/dev/${d%%/*}";; esac
  done
  fusermount3 -u -z "$PC_RUN/fuse-db-data" 2>/dev/null
  # The agent's rules live in the host namespace and go with it.
  for ns in "$CONTAINER" "$NS_HOST" "$NS_BACKUP" "$NS_CLIENT"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$WORK" "$PGSOCK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- The world around the guide: a host, a backup site, a client. ---
for ns in "$NS_HOST" "$NS_BACKUP" "$NS_CLIENT"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip link add bk0 netns "$NS_HOST" type veth peer name eth0 netns "$NS_BACKUP"
ip link add cl0 netns "$NS_HOST" type veth peer name eth0 netns "$NS_CLIENT"
ip -n "$NS_HOST" addr add 10.99.0.1/24 dev bk0
ip -n "$NS_HOST" addr add 10.200.0.1/24 dev cl0
ip -n "$NS_BACKUP" addr add 10.99.0.2/24 dev eth0
ip -n "$NS_CLIENT" addr add 10.200.0.100/24 dev eth0
ip -n "$NS_HOST" addr add fd70:6300:200::1/64 dev cl0 nodad
ip -n "$NS_CLIENT" addr add fd70:6300:200::100/64 dev eth0 nodad
for l in "$NS_HOST bk0" "$NS_HOST cl0" "$NS_BACKUP eth0" "$NS_CLIENT eth0"; do
  set -- $l
  ip -n "$1" link set "$2" up
done
ip -n "$NS_BACKUP" route add 10.0.0.0/8 via 10.99.0.1
ip -n "$NS_CLIENT" route add default via 10.200.0.1
ip -n "$NS_CLIENT" -6 route add default via fd70:6300:200::1

# --- The guide's blocks. ---
BLOCKS=$WORK/blocks
mkdir -p "$BLOCKS"
awk -v dir="$BLOCKS" '
  /^```sh test:/ { n++; tag = substr($2, 6); gsub(":", ".", tag);
                   file = sprintf("%s/%02d.%s.sh", dir, n, tag); inblock = 1; next }
  /^```/ && inblock { inblock = 0; close(file); next }
  inblock { print > file }
' "$ROOT/docs/deploy.md"
NAMES=$(ls "$BLOCKS" | head -n1)
[ -n "$NAMES" ] || fail "no marked blocks in docs/deploy.md"
ns_of() { case "$1" in host) echo "$NS_HOST";; backup) echo "$NS_BACKUP";; *) fail "unknown role $1";; esac; }
run_block() { # FILE: runs it in its role's namespace, after the names block
  local f=$1 base role daemon=""
  base=$(basename "$f" .sh)
  role=${base#*.}
  case "$role" in *.daemon) daemon=1; role=${role%.daemon};; esac
  local ns
  ns=$(ns_of "$role")
  echo "deploy-guide-test: [$role${daemon:+, background}] $(head -n1 "$f")" >&2
  if [ -n "$daemon" ]; then
    nsenter --net="/run/netns/$ns" -- setsid bash -euo pipefail -c "source '$BLOCKS/$NAMES'; source '$f'" \
      >"$WORK/$base.log" 2>&1 </dev/null &
    DAEMONS+=($!)
    disown $!
  else
    nsenter --net="/run/netns/$ns" -- bash -euo pipefail -c "source '$BLOCKS/$NAMES'; source '$f'" \
      || fail "guide block $base failed"
  fi
}
# Blocks before the failover section set up the site; the failover block(s) run
# after the disaster.
FAILOVER=$(grep -l 'backup-server failover' "$BLOCKS"/*.sh | head -n1)
[ -n "$FAILOVER" ] || fail "no failover block in docs/deploy.md"
for f in "$BLOCKS"/*.sh; do
  [ "$f" = "$FAILOVER" ] && break
  run_block "$f"
  # Give a daemon a moment to come up before the next block (the next block waits
  # for what it needs where the guide says so).
  case "$f" in *.daemon.sh) sleep 1;; esac
done
for p in "${DAEMONS[@]}"; do
  kill -0 "$p" 2>/dev/null || { tail -n 30 "$WORK"/*.log >&2; fail "a guide daemon exited early"; }
done

# --- The workload: PostgreSQL in the container, data on the protected disk. ---
mkdir -p "$MNT/pgdata" "$PGSOCK"
chown postgres: "$MNT/pgdata" "$PGSOCK"
chmod 0700 "$MNT/pgdata"
setpriv --reuid=postgres --regid=postgres --init-groups -- "$PGBIN/initdb" -A trust -U postgres \
  --locale=C -D "$MNT/pgdata" >/dev/null
printf 'host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n' >>"$MNT/pgdata/pg_hba.conf"
names() { bash -c "source '$BLOCKS/$NAMES'; echo \$$1"; }
MACHINE_IP=$(names MACHINE_IP)
MACHINE_IP6=$(names MACHINE_IP6)
nsenter --net="/run/netns/$CONTAINER" -- setpriv --reuid=postgres --regid=postgres --init-groups -- \
  "$PGBIN/postgres" -D "$MNT/pgdata" -c listen_addresses="$MACHINE_IP,$MACHINE_IP6" -c unix_socket_directories="$PGSOCK" -c dynamic_shared_memory_type=mmap \
  -c fsync=on -c synchronous_commit=on >"$WORK/postgres.log" 2>&1 </dev/null &
DAEMONS+=($!)
disown $!
psql_local() { setpriv --reuid=postgres --regid=postgres --init-groups -- psql -qAt -h "$PGSOCK" -U postgres -c "$1"; }
for i in $(seq 100); do psql_local "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
psql_local "CREATE TABLE req (id bigint PRIMARY KEY)"
# The clients: insert over the network (through the agent's hold), one numbered row per
# statement, and record each id once PostgreSQL's reply arrived; one over IPv4, one
# over IPv6 (Debian gives machines IPv6 by default: its replies must be held too).
CLIENT_LOG=$WORK/acked
: >"$CLIENT_LOG"
client() { # FIRST_ID ADDRESS: inserts FIRST_ID, FIRST_ID+1000, ... until killed
  local id=$1
  while nsenter --net="/run/netns/$NS_CLIENT" -- setpriv --reuid=postgres --regid=postgres --init-groups -- \
    psql -qAt -h "$2" -U postgres -c "INSERT INTO req VALUES ($id)" >/dev/null 2>&1; do
    echo "$id" >>"$CLIENT_LOG"
    id=$((id + 1000))
  done
}
client 1 "$MACHINE_IP" & C1=$!
client 2 "$MACHINE_IP6" & C2=$!
sleep 6
# The guide's wiring check: the hold saw the replies.
HOST_NAME=$(names HOST)
STATUS=$(nsenter --net="/run/netns/$NS_HOST" -- pipecloud ctl --topology "$PC_ETC/$(names GROUP).toml" \
  --host "$HOST_NAME" status)
SEEN=0
for k in held_total hold_passed hold_queued; do
  v=$(grep -o "$k=[0-9]*" <<<"$STATUS" | head -n1 | cut -d= -f2)
  SEEN=$((SEEN + ${v:-0}))
done
echo "deploy-guide-test: packets the hold saw: $SEEN" >&2
[ "$SEEN" -gt 0 ] || { echo "$STATUS" >&2; fail "ctl status shows no packet at the hold: the wiring bypasses the agent"; }
# --- The disaster: the link to the backup dies first, and the primary keeps running for
# a second without it (writes the backup never gets; a reply that depended on one and
# still reached the client is what the check below catches), then the agent dies (its
# rules then drop every outbound packet, so no later reply can reach the client), then
# everything else on the primary. ---
ip -n "$NS_HOST" link set bk0 down
sleep 1
AGENT_PID=$(pgrep -f "pipecloud agent --topology $PC_ETC/" | head -n1)
[ -n "$AGENT_PID" ] || fail "agent not found"
kill -9 "$AGENT_PID"
sleep 1
kill "$C1" "$C2" 2>/dev/null || true
wait "$C1" "$C2" 2>/dev/null || true
for p in $(ip netns pids "$CONTAINER"); do kill -9 "$p"; done
ACKED=$(sort -n "$CLIENT_LOG" | uniq | wc -l)
ACKED4=$(grep -c '1$' "$CLIENT_LOG" || true)
ACKED6=$(grep -c '2$' "$CLIENT_LOG" || true)
echo "deploy-guide-test: client view: $ACKED acknowledged inserts ($ACKED4 over IPv4, $ACKED6 over IPv6)" >&2
[ "$ACKED4" -gt 0 ] && [ "$ACKED6" -gt 0 ] || {
  tail -n 20 "$WORK"/*.log >&2
  fail "a client saw no acknowledged insert (IPv4 $ACKED4, IPv6 $ACKED6): nothing was checked on that path"
}

# --- Failover, by the guide. ---
run_block "$FAILOVER"
DISK=$(names DISK)
IMG=$BACKUP_ETC/failover/$DISK.img
[ -s "$IMG" ] || fail "failover wrote no $IMG"
mkdir -p "$WORK/recovered"
# mount -o loop attaches with autoclear: the device goes with the mount (and with this
# private mount namespace, however the script dies).
mount -t ext4 -o loop "$IMG" "$WORK/recovered"
rm -f "$WORK/recovered/pgdata/postmaster.pid"
setpriv --reuid=postgres --regid=postgres --init-groups -- "$PGBIN/postgres" -D "$WORK/recovered/pgdata" \
  -c listen_addresses= -c unix_socket_directories="$PGSOCK" -c port=5499 -c dynamic_shared_memory_type=mmap >"$WORK/recovery.log" 2>&1 </dev/null &
DAEMONS+=($!)
disown $!
ok=
for i in $(seq 150); do
  setpriv --reuid=postgres --regid=postgres --init-groups -- psql -qAt -h "$PGSOCK" -p 5499 -U postgres \
    -c "select 1" >/dev/null 2>&1 && { ok=1; break; }
  sleep 0.2
done
[ -n "$ok" ] || { cat "$WORK/recovery.log" >&2; fail "PostgreSQL crash recovery on the failed-over volume failed"; }
setpriv --reuid=postgres --regid=postgres --init-groups -- psql -qAt -h "$PGSOCK" -p 5499 -U postgres \
  -c "SELECT id FROM req" | sort -n >"$WORK/recovered-ids"
sort -n "$CLIENT_LOG" | uniq >"$WORK/acked-ids"
MISSING=$(comm -23 "$WORK/acked-ids" "$WORK/recovered-ids" | wc -l)
RECOVERED=$(wc -l <"$WORK/recovered-ids")
echo "deploy-guide-test: acknowledged=$ACKED recovered=$RECOVERED missing=$MISSING" >&2
if [ "$MISSING" -ne 0 ]; then
  M6=$(comm -23 "$WORK/acked-ids" "$WORK/recovered-ids" | grep -c '2$' || true)
  fail "$MISSING acknowledged inserts are missing from the failed-over volume ($((MISSING - M6)) over IPv4, $M6 over IPv6)"
fi

# --- The systemd units parse. ---
systemd-analyze verify --man=no "$ROOT"/deploy/systemd/pipecloud-backup.service \
  "$ROOT"/deploy/systemd/pipecloud-agent@.service 2>&1 | grep -v -E 'is not executable|No such file or directory' \
  | tee "$WORK/verify.log" >&2 || true
[ ! -s "$WORK/verify.log" ] || fail "systemd-analyze verify complained (above)"
echo "RESULT deploy_guide=ok acknowledged=$ACKED recovered=$RECOVERED missing=0"
