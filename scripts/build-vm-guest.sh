#!/usr/bin/env bash
# Builds the tiny test guest for VM replication from Debian packages, at test time:
#   - the Debian cloud kernel (apt-get download + dpkg -x; no install),
#   - an initramfs with busybox-static, the kernel's virtio-net and virtio-blk modules,
#     scripts/vm-guest/init and the UDP counter service (scripts/vm-guest/counter.c, gcc -static),
#   - Debian's unmodified redis-server with the shared libraries `ldd` lists for it (TCP 6379),
#   - busybox's httpd (TCP 80), whose page without a disk is root/www/index.html, made here.
# Usage: scripts/build-vm-guest.sh [OUTDIR]   (default build/cache/vm-guest)
# Prints OUTDIR; OUTDIR/vmlinuz and OUTDIR/initrd.gz are the result. Cached: a second run with
# the same inputs does nothing. Needs busybox-static, gcc and redis-server (scripts/install-deps.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../build/cache/vm-guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
stamp="$(cat "$here/vm-guest/init" "$here/vm-guest/counter.c" "$0" | sha256sum | cut -c1-16)"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$out"; exit 0
fi
[ -x /bin/busybox ] || { echo "build-vm-guest: /bin/busybox missing (install busybox-static)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# The metapackage names the current versioned kernel package.
resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
kpkg="$(resolve)"
if [ -z "$kpkg" ] && [ "$(id -u)" -eq 0 ]; then
  # No package lists yet (a fresh machine, or lists cleaned after installing): fetch them once.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
  kpkg="$(resolve)"
fi
[ -n "$kpkg" ] || { echo "build-vm-guest: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
if ! ls "$out"/"$kpkg"_*.deb >/dev/null 2>&1; then
  (cd "$out" && rm -f linux-image-*.deb && apt-get download "$kpkg" 2>&1 | grep -v unsandboxed >&2 || true)
fi
deb="$(ls "$out"/"$kpkg"_*.deb | head -1)"
dpkg -x "$deb" k
kver="${kpkg#linux-image-}"
mods="k/lib/modules/$kver/kernel"
mkdir -p root/bin root/lib/modules root/proc root/sys root/dev root/tmp root/etc
cp /bin/busybox root/bin/busybox
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/core/failover \
         drivers/net/net_failover drivers/net/virtio_net drivers/block/virtio_blk; do
  f="$mods/$m.ko"
  if [ -f "$f" ]; then cp "$f" root/lib/modules/
  elif [ -f "$f.xz" ]; then xz -dc "$f.xz" > "root/lib/modules/$(basename "$m").ko"
  else echo "build-vm-guest: module $m not in $deb" >&2; exit 1; fi
done
gcc -static -O2 -o root/bin/counter "$here/vm-guest/counter.c"
# Debian's redis-server as it is: the binary (its real file: /usr/bin/redis-server is a link, and
# redis picks its mode from its name) and every library the dynamic loader resolves for it.
redis="$(command -v redis-server || true)"
[ -n "$redis" ] || { echo "build-vm-guest: redis-server missing (install redis-server)" >&2; exit 1; }
cp -L "$redis" root/bin/redis-server
for lib in $(ldd "$redis" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}'); do
  mkdir -p "root$(dirname "$lib")"
  cp -L "$lib" "root$lib"
done
mkdir -p root/www
echo "plover guest: served from the initramfs (/www)" > root/www/index.html
cp "$here/vm-guest/init" root/init
chmod +x root/init
(cd root && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$out/initrd.gz.tmp"
cp "k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initrd.gz.tmp" "$out/initrd.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "$out"
