#!/usr/bin/env bash
# Boots the demo guest (through the nested rig where this host has no hardware
# KVM) and runs a short command that shows what the guest sees.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
echo "demo: booting a 2-vCPU, 512 MiB guest with one disk through scripts/nested-run.sh (hardware KVM if this host has it, else the nested rig)"
disk=$top/build/demo-disk.raw
[ -f "$disk" ] || truncate -s 256M "$disk"
start=$(date +%s%N)
status=0
"$top/scripts/nested-run.sh" run -c 2 -m 512 -d "$disk,serial=lkvm-demo" -- sh -c '
    echo "kernel:  $(uname -r) ($(uname -m))"
    echo "cpus:    $(nproc) online, via $(dmesg | grep -q "ACPI (MADT)" && echo ACPI || echo MP tables)"
    echo "memory:  $(sed -n "s/MemTotal: *//p" /proc/meminfo)"
    for d in /sys/block/vd*; do
        echo "disk:    /dev/${d##*/} $(( $(cat $d/size) / 2048 )) MiB, serial $(cat $d/serial), $(ls $d/mq | wc -l) queue(s)"
    done
    echo "cmdline: $(sed "s/ lkvm.cmd=[^ ]*//" /proc/cmdline)"' || status=$?
echo "demo: guest exited with status $status after $(( ($(date +%s%N) - start) / 1000000 )) ms"
echo "demo: for an interactive shell run: scripts/nested-run.sh run -c 2   (Ctrl-A x or 'poweroff -f' to leave)"
exit $status
