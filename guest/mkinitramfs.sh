#!/usr/bin/env bash
# Builds the default guest initramfs, build/guest/initramfs.cpio.gz: busybox,
# our init, and the guest kernel's virtio and SCSI modules in load order.
# With --fio it builds build/guest/initramfs-fio.cpio.gz instead: the same
# plus fio and the shared libraries it needs (some 80 MB, so the everyday
# image stays small and quick to boot).
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
modules=(virtio_pci virtio_blk virtio_scsi sd_mod)
: > "$root/etc/modules.order"
for m in "${modules[@]}"; do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$root/lib/modules/$kver/"
    basename "$ko" >> "$root/etc/modules.order"
done
echo "$kver" > "$root/etc/modules.version"

if [ "$with_fio" = 1 ]; then
    cp /usr/bin/fio "$root/usr/bin/fio"
    ldd /usr/bin/fio | awk '/=> \// {print $3} /^\t\/[^ ]*ld-linux/ {print $1}' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
fi

cp "$top/guest/init" "$root/init"
mkdir -p "$(dirname "$out")"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -6 > "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out ($(du -h "$out" | cut -f1))"
