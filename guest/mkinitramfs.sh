#!/usr/bin/env bash
# Builds the default guest initramfs, build/guest/initramfs.cpio.gz: busybox,
# our init, the guest kernel's virtio and SCSI modules in load order, a few
# sg3-utils tools (/usr/bin/sg_inq, sg_vpd, ...) and util-linux's blkdiscard
# (/usr/sbin/blkdiscard, by full path: busybox's has no -z), with the shared
# libraries they need. With --fio it builds build/guest/initramfs-fio.cpio.gz instead:
# the same plus fio and its libraries (some 80 MB, so the everyday image
# stays small and quick to boot).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
kroot=$top/build/kernel/root
kver=$(cat "$top/build/kernel/version")
out=$top/build/guest/initramfs.cpio.gz
with_fio=0
if [ "${1:-}" = --fio ]; then
    with_fio=1
    out=$top/build/guest/initramfs-fio.cpio.gz
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,root,lib/modules/"$kver"}

cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

# Modules in dependency order, each once.
modules=(virtio_pci virtio_blk virtio_scsi sd_mod sg)
: > "$root/etc/modules.order"
for m in "${modules[@]}"; do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$root/lib/modules/$kver/"
    basename "$ko" >> "$root/etc/modules.order"
done
echo "$kver" > "$root/etc/modules.version"

# Copies programs (absolute paths) into the image where they are on the host,
# with the shared libraries and the dynamic loader they need, each library once.
add_programs() {
    local prog lib
    for prog in "$@"; do
        [ -x "$prog" ] || { echo "mkinitramfs: no $prog; run scripts/install-deps.sh" >&2; exit 1; }
        mkdir -p "$root$(dirname "$prog")"
        rm -f "$root$prog"  # a busybox applet's link: cp would write through it
        cp -L "$prog" "$root$prog"
    done
    ldd "$@" | awk '/=> \// {print $3} /^\t\/[^ ]*ld-linux/ {print $1}' | sort -u | while read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

# SCSI tools for the system tests, run against the virtio-scsi disk. Util-linux's
# blkdiscard has -z (BLKZEROOUT), busybox's does not; busybox's sh runs its own
# applets ahead of PATH, so a plain "blkdiscard" is busybox's: call util-linux's
# as /usr/sbin/blkdiscard.
add_programs /usr/bin/sg_{inq,vpd,readcap,modes,unmap,write_same,sync,turs,luns,reset} /usr/sbin/blkdiscard

if [ "$with_fio" = 1 ]; then
    add_programs /usr/bin/fio
fi

cp "$top/guest/init" "$root/init"
mkdir -p "$(dirname "$out")"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -6 > "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out ($(du -h "$out" | cut -f1))"
