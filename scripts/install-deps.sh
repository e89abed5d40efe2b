#!/usr/bin/env bash
# Installs the Debian packages the build, `make test` and `make demo` need on a minimal Debian 12,
# when missing (Swift itself comes from swift.org, not Debian: the first line is what its
# toolchain needs). Extra package names as arguments are installed too.
# Idempotent; runs as root without prompts (CI has no standard input); without root it lists, in
# one line, what it would install and exits 1.
set -euo pipefail
pkgs=(
  binutils git ca-certificates libcurl4-openssl-dev libedit2 libgcc-12-dev libpython3-dev \
  libsqlite3-0 libstdc++-12-dev libxml2-dev libz3-dev tzdata zlib1g-dev  # the Swift toolchain; git + TLS for SwiftPM
  libibverbs-dev librdmacm-dev rdma-core ibverbs-providers   # verbs (no device here; see docs)
  libdb-dev db5.3-util                                      # Berkeley DB 5.3 and its tools
  libxxhash-dev                                             # XXH3 page hashing
  redis-server redis-tools                                  # Interpose tests and benchmark (real Redis under LD_PRELOAD)
  memcached                                                 # Interpose: a server shape the shim must refuse
  qemu-system-x86 busybox-static gcc libc6-dev xz-utils     # VM replication tests (scripts/build-vm-guest.sh)
  libnbd-bin                                                # nbdinfo: reads a VM disk's dirty bitmap from QEMU's NBD export
  python3 iproute2                                          # doc check and plots; network namespaces in the tests
  mount util-linux                                          # tmpfs and FUSE mounts (disk-full, power-cut); setpriv, prlimit (doctor)
  libfuse3-dev fuse3 pkg-config                             # power-cut tests: a FUSE file system that drops unsynced writes
)
pkgs+=("$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1 || ! sudo -n true 2>/dev/null; then
    echo "install-deps: installing ${missing[*]} needs root: run 'make deps' as root (or with passwordless sudo)" >&2
    exit 1
  fi
  sudo="sudo -n"
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
