#!/usr/bin/env bash
# Builds the test guest of the full-state mode (issue 21 §1) from Debian packages:
# the kernel of linux-image-cloud-amd64 (downloaded with `apt-get download`, never
# installed), a busybox-static initramfs holding the virtio modules, mke2fs, our
# static counter service (guest-service/) and scripts/guest/init.
#
# Output: $TARGET/guest/<key>/{vmlinuz,initrd.cpio.gz}, where <key> hashes every
# input, plus $TARGET/guest/vmlinuz and $TARGET/guest/initrd.cpio.gz (symlinks to
# the newest build; topology/guest.toml points at them). A second run with the
# same inputs only prints the paths. $TARGET is $CARGO_TARGET_DIR or ./target.
#
# Needs: apt-get, dpkg-deb (the kernel), busybox-static, cpio, e2fsprogs, gzip,
# and cargo (scripts/install-deps.sh installs the Debian ones).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
target="${CARGO_TARGET_DIR:-$PWD/target}"
out="$target/guest"
mkdir -p "$out/debs"
die() { echo "build-guest: $*" >&2; exit 1; }
for c in busybox:busybox-static cpio:cpio mke2fs:e2fsprogs gzip:gzip dpkg-deb:dpkg apt-get:apt; do
  command -v "${c%%:*}" >/dev/null || die "\`${c%%:*}\` is missing: install the Debian package ${c#*:}"
done
static() { { ldd "$1" 2>&1 || true; } | grep -Eq 'not a dynamic executable|statically linked'; }
static "$(command -v busybox)" ||
  die "$(command -v busybox) is not static: install the Debian package busybox-static"

# 1. The kernel package: the one linux-image-cloud-amd64 depends on, cached by name.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq >/dev/null 2>&1 || true
  kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
fi
if [ -z "$kpkg" ]; then # no package lists at all: use a kernel package already cached
  deb=$(ls -t "$out"/debs/linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -1)
  [ -n "$deb" ] || die "cannot resolve linux-image-cloud-amd64 (apt-get update failed?) and no kernel cached in $out/debs"
else
  deb=$(ls "$out"/debs/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    (cd "$out/debs" && apt-get download "$kpkg" >/dev/null 2>&1) || die "apt-get download $kpkg failed"
    deb=$(ls "$out"/debs/"${kpkg}"_*.deb | head -1)
  fi
fi

# 2. The service, static (the gnu target with crt-static; libc6-dev ships libc.a).
svc_target=x86_64-unknown-linux-gnu
RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' \
  nice -n 10 cargo build --quiet --release -p pipecloud-guest-service --target "$svc_target"
svc="$target/$svc_target/release/pipecloud-guest-service"
static "$svc" || die "$svc is not statically linked (is libc6-dev's libc.a there?)"

# 3. mke2fs with the libraries it loads (copied as they are on this machine).
mke2fs_bin=$(command -v mke2fs)
libs=$(ldd "$mke2fs_bin" | awk '/=>/ {print $3} $1 ~ /^\// {print $1}' | sort -u)

# The key: every input's content.
key=$( { sha256sum "$deb" "$(command -v busybox)" "$svc" scripts/guest/init scripts/build-guest.sh "$mke2fs_bin" $libs \
           /etc/mke2fs.conf | awk '{print $1}'; } | sha256sum | cut -c1-16)
dir="$out/$key"
if [ ! -s "$dir/initrd.cpio.gz" ]; then
  tmp=$(mktemp -d "$out/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  dpkg-deb -x "$deb" "$tmp/k"
  root="$tmp/root"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/local/sbin,etc,lib/modules,proc,sys,dev,data,tmp}
  cp "$(command -v busybox)" "$root/bin/busybox"
  cp scripts/guest/init "$root/init"
  chmod 755 "$root/init"
  cp "$svc" "$root/usr/bin/pipecloud-guest-service"
  cp /etc/mke2fs.conf "$root/etc/"
  cp "$mke2fs_bin" "$root/usr/local/sbin/mke2fs.e2fsprogs" # busybox has its own mke2fs (ext2 only)
  for l in $libs; do mkdir -p "$root$(dirname "$l")"; cp -L "$l" "$root$l"; done
  for m in virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
           virtio_blk failover net_failover virtio_net; do
    f=$(find "$tmp/k/lib/modules" -name "$m.ko*" | head -1)
    [ -n "$f" ] || die "module $m not in $deb"
    case "$f" in
      *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
      *.ko.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
      *) die "module $f: unknown compression" ;;
    esac
  done
  mkdir -p "$tmp/out"
  cp "$tmp"/k/boot/vmlinuz-* "$tmp/out/vmlinuz"
  (cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 > "$tmp/out/initrd.cpio.gz")
  rm -rf "$dir"
  mv "$tmp/out" "$dir"
fi
ln -sfn "$key/vmlinuz" "$out/vmlinuz"
# Older builds go (one guest is about 17 MB).
for old in "$out"/*/; do
  case "$(basename "$old")" in "$key" | debs) ;; *) rm -rf "$old" ;; esac
done
ln -sfn "$key/initrd.cpio.gz" "$out/initrd.cpio.gz"
echo "build-guest: $dir ($(basename "$deb"))"
