#!/usr/bin/env bash
# Installs the system packages PipeCloud-rs needs for its tests, harness and demo.
# Idempotent: only installs what is missing. Needs root (the test machines run as root).
set -euo pipefail
pkgs=(iptables iproute2 libnbd-bin nbdkit fuse3 qemu-utils fio util-linux e2fsprogs tcpdump procps psmisc postgresql-15 librsvg2-bin systemd)
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
# FUSE needs its device node.
[ -e /dev/fuse ] || mknod -m 666 /dev/fuse c 10 229 || true
echo "install-deps: ok" >&2
