#!/usr/bin/env bash
# Installs the system packages PipeCloud-rs needs for its tests, harness and demo,
# then checks that every command they run is there: a missing one is an error naming
# its package, never a test that later skips. Idempotent: only installs what is
# missing. Needs root (the test machines run as root).
set -euo pipefail
pkgs=(iptables iproute2 libnbd-bin nbdkit fuse3 qemu-utils fio mount util-linux e2fsprogs tcpdump procps psmisc postgresql-15 librsvg2-bin systemd etcd-server etcd-client
  qemu-system-x86 busybox-static cpio libc6-dev)  # the last four: the test guest (scripts/build-guest.sh)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || apt-get update
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Every command the tests (tests/, */tests), the harness (integration/) and the
# scripts run, with the package that installs it. Found with a grep for
# Command::new / sh(&[...]) / pg_bin(...) and the commands of scripts/*.sh.
pg=/usr/lib/postgresql/15/bin
need=(
  "ip iproute2"
  "iptables iptables" "ip6tables iptables" "iptables-save iptables"
  "ip6tables-save iptables" "iptables-restore iptables"
  "nbdinfo libnbd-bin" "nbdcopy libnbd-bin" "nbdfuse libnbd-bin"
  "nbdkit nbdkit" "fusermount3 fuse3"
  "qemu-io qemu-utils" "qemu-img qemu-utils" "fio fio"
  "losetup mount" "mount mount" "umount mount"
  "unshare util-linux" "nsenter util-linux" "setpriv util-linux" "mountpoint util-linux"
  "mkfs.ext4 e2fsprogs" "fsck.ext4 e2fsprogs" "e2fsck e2fsprogs" "debugfs e2fsprogs" "mke2fs e2fsprogs"
  "qemu-system-x86_64 qemu-system-x86" "busybox busybox-static" "cpio cpio" "dpkg-deb dpkg"
  "pkill procps" "sysctl procps"
  "rsvg-convert librsvg2-bin"
  "$pg/postgres postgresql-15" "$pg/initdb postgresql-15" "$pg/pg_ctl postgresql-15"
  "$pg/pgbench postgresql-15" "$pg/psql postgresql-client-15"
  "$pg/pg_basebackup postgresql-client-15"
  "etcd etcd-server" "etcdctl etcd-client"
)
bad=0
for entry in "${need[@]}"; do
  read -r cmd pkg <<<"$entry"
  command -v "$cmd" >/dev/null 2>&1 && continue
  bad=1
  found=""
  for d in /usr/sbin /sbin /usr/bin /bin; do [ -x "$d/$cmd" ] && { found=$d; break; }; done
  if [ -n "$found" ]; then
    echo "install-deps: \`$cmd\` is in $found, which is not on PATH ($PATH): add it" >&2
  else
    echo "install-deps: \`$cmd\` is missing: install the Debian package $pkg" >&2
  fi
done

# FUSE needs its device node and the kernel's fuse file system; the mount tests
# also need loop devices.
if [ ! -c /dev/fuse ]; then
  mknod -m 666 /dev/fuse c 10 229 ||
    { echo "install-deps: /dev/fuse is missing and could not be made (mknod c 10 229)" >&2; bad=1; }
fi
grep -qw fuse /proc/filesystems ||
  { echo "install-deps: the kernel has no fuse file system (modprobe fuse)" >&2; bad=1; }
[ -c /dev/loop-control ] ||
  { echo "install-deps: /dev/loop-control is missing: load the loop driver (modprobe loop)" >&2; bad=1; }

# The test guest is linked statically (glibc's libc.a) and its busybox must be static.
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] ||
  { echo "install-deps: libc.a is missing: install the Debian package libc6-dev" >&2; bad=1; }
{ ldd "$(command -v busybox 2>/dev/null || echo /bin/busybox)" 2>&1 || true; } | grep -Eq 'not a dynamic executable|statically linked' ||
  { echo "install-deps: busybox is not the static one: install the Debian package busybox-static" >&2; bad=1; }

[ "$bad" = 0 ] || { echo "install-deps: FAILED (see above)" >&2; exit 1; }
echo "install-deps: ok" >&2
