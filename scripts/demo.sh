#!/usr/bin/env bash
# Boots the demo guest (through the nested rig where this host has no hardware
# KVM) and runs a short command that shows what the guest sees.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
echo "demo: booting a 2-vCPU, 512 MiB guest with lkvm$( [ -c /dev/kvm ] || echo ' inside the nested rig (no /dev/kvm here)')"
start=$(date +%s%N)
status=0
"$top/scripts/nested-run.sh" run -c 2 -m 512 -- sh -c '
    echo "kernel:  $(uname -r) ($(uname -m))"
    echo "cpus:    $(nproc) online, via $(dmesg | grep -q "ACPI (MADT)" && echo ACPI || echo MP tables)"
    echo "memory:  $(sed -n "s/MemTotal: *//p" /proc/meminfo)"
    echo "disks:   $(ls /sys/block | grep -v -e ^loop -e ^ram | tr "\n" " ")"
    [ -n "$(ls /sys/block | grep -v -e ^loop -e ^ram)" ] || echo "         (none attached; add one with -d once virtio-blk lands)"
    echo "cmdline: $(cat /proc/cmdline)"' || status=$?
echo "demo: guest exited with status $status after $(( ($(date +%s%N) - start) / 1000000 )) ms"
echo "demo: for an interactive shell run: scripts/nested-run.sh run -c 2   (Ctrl-A x or 'poweroff -f' to leave)"
exit $status
