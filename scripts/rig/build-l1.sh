#!/usr/bin/env bash
# Builds the nested rig's L1 initramfs (build/rig/l1.cpio.gz): busybox, the
# kernel's KVM and 9p modules in load order, and scripts/rig/l1-init.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
kroot=$top/build/kernel/root
kver=$(cat "$top/build/kernel/version")
out=$top/build/rig/l1.cpio.gz

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,etc,lib/modules/"$kver"}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# kvm-amd with the parameters DESIGN.md found keep a 2-vCPU L2 stable under TCG.
kvm_amd_args="vgif=0 vls=0 lbrv=0 tsc_scaling=0 avic=0 pause_filter_count=0"
for m in kvm-amd virtio_pci 9pnet_virtio 9p virtio_blk; do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$root/lib/modules/$kver/"
    name=$(basename "$ko")
    if [ "$name" = kvm-amd.ko ]; then echo "$name $kvm_amd_args"; else echo "$name"; fi
done > "$root/etc/modules.order"

install -m 755 "$top/scripts/rig/l1-init" "$root/init"
mkdir -p "$(dirname "$out")"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out.tmp"
mv "$out.tmp" "$out"
