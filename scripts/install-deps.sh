#!/usr/bin/env bash
# Installs what building, testing and running lkvm need on Debian 12. Idempotent:
# it only calls apt-get for packages that are missing, and only fetches the guest
# kernel when build/kernel is not already unpacked.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)

# make test's sanitizer tiers need nothing more: g++ brings its ASan, UBSan and
# TSan runtimes (libgcc-12-dev depends on libasan8, libubsan1, libtsan2), and
# the clang ASan+UBSan tier uses clang's runtime from libclang-rt-dev below.
packages=(g++ make pkg-config libboost-dev libaio-dev liburing-dev doctest-dev
          qemu-system-x86 busybox-static cpio fio kmod xz-utils zstd procps
          sg3-utils util-linux python3
          # the control socket's JSON (nlohmann's header-only library), and socat for its system test
          nlohmann-json3-dev socat
          # the gdb stub's system test: Debian's gdb against the guest, and ip to bring up L1's loopback
          gdb iproute2
          # make install's man page (scdoc writes it), and the install test's man -l and
          # bash completion (the completion uses bash-completion's helpers, as installed ones do)
          scdoc man-db bash-completion
          # make fuzz: clang and its libFuzzer runtime (Debian 12's default clang is 14;
          # libclang-rt-dev is what -fsanitize=fuzzer links, and only a recommend of clang)
          clang libclang-rt-dev)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || { echo "install-deps: missing ${missing[*]}; run this script as root" >&2; exit 1; }
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The guest (and nested-rig L1) kernel: the image package linux-image-amd64 points at.
kdir=$top/build/kernel
if [ ! -f "$kdir/.unpacked" ]; then
    [ -n "$(apt-cache policy linux-image-amd64 | awk '/Candidate/ {print $2}' | grep -v none)" ] || apt-get update -qq
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "install-deps: cannot find the kernel package behind linux-image-amd64" >&2; exit 1; }
    echo "install-deps: fetching $pkg"
    rm -rf "$kdir" && mkdir -p "$kdir"
    # apt fetches as user _apt: give it a directory it may write to.
    dl=$(mktemp -d)
    chmod 755 "$dl"
    chown _apt "$dl" 2>/dev/null || true
    (cd "$dl" && apt-get download -qq "$pkg")
    dpkg -x "$dl"/*.deb "$kdir/root"
    rm -rf "$dl"
    kver=$(ls "$kdir/root/lib/modules")
    depmod -b "$kdir/root" "$kver"
    ln -sf "root/boot/vmlinuz-$kver" "$kdir/vmlinuz"
    echo "$kver" > "$kdir/version"
    touch "$kdir/.unpacked"
fi
