#!/usr/bin/env bash
# bench-nested.sh [BUILD]: fio in a 2-vCPU L2 guest, lkvm beside Debian's QEMU,
# all in ONE L1 boot of the nested rig (scripts/nested-run.sh --batch), so both
# VMMs see the same L1 kernel, memory and noise.
#
# Workload: fio 4k randread on /dev/vda (virtio-blk) or /dev/sda (virtio-scsi),
# libaio, direct=1 (the guest's block device takes O_DIRECT), QD64 as numjobs=2 x iodepth=32, one job pinned to each
# vCPU (cpus_allowed_policy=split), ${BENCH_SECONDS:-10}s time-based after a 2s
# ramp, terse output (IOPS, p99 completion latency).
# Disk: a 512 MiB image of non-zero data on a tmpfs mounted by the jobs in L1's
# RAM: the 9p-backed host tree would dominate the data path. tmpfs has no
# O_DIRECT, so both VMMs read through L1's page cache: QEMU cache=writeback
# aio=io_uring, lkvm without ",direct" (its default engine: io_uring).
# Rows: lkvm with its dedicated thread and with --iothreads 1, 2, 4 (num-queues=2,
# the defaults: SCHED_BATCH, notify=pio), --iothreads 2 under SCHED_OTHER and
# SCHED_IDLE and with notify=mmio for comparison, and QEMU with one iothread and num-queues=2; then virtio-scsi:
# lkvm --iothreads 1 and 2 (its own controller, num-queues=2) and QEMU's
# virtio-scsi-pci with one iothread and num_queues=2 (scsi rows compare with
# QEMU's scsi). BENCH_CONFIGS="NAME ..." runs only those rows (plus the QEMU
# rows they compare with). Nested SVM here now and then resets or loses an L2
# vCPU (DESIGN.md): such a run gets one retry, shown under its row; a run that
# failed twice shows its error instead.
#
# What a request costs, for every VMM alike: L1 KVM's own counters (debugfs
# kvm/exits, irq_injections, insn_emulation; all VMs, and one runs at a time)
# read when the guest says fio starts and when it ended, divided by the reads
# the guest's block layer completed in between (/sys/block/DEV/stat).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=$top/${1:-build}
seconds=${BENCH_SECONDS:-10}
kernel=$top/build/kernel/vmlinuz
initrd=$top/build/guest/initramfs-fio.cpio.gz
work=$(mktemp -d /tmp/lkvm-bench-nested.XXXXXX)
# Where the jobs ran on this host (hardware KVM) the tmpfs is mounted here too.
trap 'umount "$work/ram" 2> /dev/null || true; [ -n "${BENCH_KEEP:-}" ] && cp -r "$work" "$BENCH_KEEP"; rm -rf "$work"' EXIT

# The guest command, the same for every VMM. fio's status is the job's status
# (lkvm hands it back; QEMU loses it, hence the error field in the terse line).
guest_on() {  # guest_on DEVICE: the fio run on /dev/DEVICE
    echo "echo queues=\$(ls /sys/block/$1/mq | wc -l)
echo BENCH-START reads=\$(awk '{print \$1}' /sys/block/$1/stat)
fio --name=r --filename=/dev/$1 --rw=randread --bs=4k --ioengine=libaio --direct=1 \
--iodepth=32 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting \
--time_based --runtime=$seconds --ramp_time=2 --norandommap --randrepeat=0 \
--eta=never --output-format=terse --output=/tmp/fio.out
s=\$?; echo BENCH-END reads=\$(awk '{print \$1}' /sys/block/$1/stat)
sed 's/^/FIO;/' /tmp/fio.out; exit \$s"
}

# Every job sources this: it (re)creates the image when it is missing (also
# the case in a new L1 after the rig had to restart one) and defines vmm.
{
    printf 'set -u\ncd %q\nimg=%q/ram/disk.raw\n' "$work" "$work"
    printf 'guest=%q\nguest_scsi=%q\nkernel=%q\ninitrd=%q\nlkvm=%q\n' "$(guest_on vda)" "$(guest_on sda)" \
        "$kernel" "$initrd" "$build/lkvm"
    # An L2 boot plus shutdown takes ~20 s here; a hung guest must not stall
    # the batch (TERM first, so that lkvm says where its vCPUs were; then KILL).
    printf 'limit=%d\n' $((seconds + 2 + 75))
    cat << 'EOF'
if [ ! -f "$img" ]; then
    mkdir -p ram
    mountpoint -q ram || mount -t tmpfs -o size=600m tmpfs ram || exit 125
    head -c 1M /dev/urandom > ram/chunk
    for i in $(seq 512); do cat ram/chunk; done > "$img.tmp" && mv "$img.tmp" "$img"
    rm -f ram/chunk
fi

# L1's KVM counters: the sum over every VM, so one guest at a time.
kvm_debug=/sys/kernel/debug/kvm
[ -d "$kvm_debug" ] || mount -t debugfs debugfs /sys/kernel/debug 2> /dev/null
kvm_counters() { cat "$kvm_debug/exits" "$kvm_debug/irq_injections" "$kvm_debug/insn_emulation" 2> /dev/null | xargs; }
# wait_for LINE PID: until the guest printed LINE or the VMM is gone.
wait_for() {
    while ! grep -q "$1" ram/run.out 2> /dev/null; do
        kill -0 "$2" 2> /dev/null || return 1
        sleep 0.2
    done
}

# vmm CMD...: one guest run. A run without fio's result that did not fail on
# bad input (status 1) gets one more try and says so: nested SVM here now and
# then loses an L2 vCPU or resets it (DESIGN.md), for either VMM.
vmm() {
    local try status ino
    ino=$(stat -c %i "$img")
    for try in 1 2; do
        # Both VMMs take an OFD lock on the image, and it can outlive the
        # process a moment (io_uring releases the file late): wait for it.
        for _ in $(seq 30); do grep -q ":$ino " /proc/locks || break; sleep 1; done
        rm -f ram/run.out
        timeout -k 10 "$limit" "$@" > ram/run.out 2>&1 < /dev/null &
        local pid=$! before="" after=""
        wait_for BENCH-START $pid && before=$(kvm_counters)
        wait_for BENCH-END $pid && after=$(kvm_counters)
        wait $pid
        status=$?
        cat ram/run.out
        [ -n "$before" ] && [ -n "$after" ] && echo "KVM-COUNTERS;$before;$after"
        grep -q 'FIO;3;' ram/run.out && return 0
        [ "$status" = 1 ] && return 1
        [ $try = 2 ] || echo "bench-retry: status $status, no fio result; last line: $(grep . ram/run.out | tail -n 1)"
    done
    return "$status"
}
EOF
} > "$work/common"

configs=()
lkvm_job() {  # lkvm_job NAME DISK-OPTIONS [LKVM-OPTIONS...]
    local name=$1 opts=$2 command='$guest'; shift 2
    [[ $opts == *bus=scsi* ]] && command='$guest_scsi'
    configs+=("$name")
    { printf '. %q/common\n' "$work"
      printf 'vmm "$lkvm" run -c 2 -m 1024 -k "$kernel" -i "$initrd" -d "$img"%q' "$opts"
      (($#)) && printf ' %q' "$@"; printf ' -- sh -c "%s"\n' "$command"; } > "$work/$(printf '%02d' ${#configs[@]})-$name.sh"
}
lkvm_job dedicated ",num-queues=2"
for n in 1 2 4; do lkvm_job "iothreads-$n" ",num-queues=2" --iothreads "$n"; done
lkvm_job iothreads-2-sched-other ",num-queues=2" --iothreads 2,sched=other
lkvm_job iothreads-2-sched-idle ",num-queues=2" --iothreads 2,sched=idle
lkvm_job iothreads-2-notify-mmio ",num-queues=2,notify=mmio" --iothreads 2

qemu_job() {  # qemu_job NAME GUEST-VARIABLE DEVICE-OPTIONS...: QEMU with one iothread, same image and guest
    local name=$1 command=$2; shift 2
    configs+=("$name")
    { printf '. %q/common\n' "$work"
      # -accel kvm fails rather than falling back to TCG; init's exit-status port
      # write is ignored by QEMU, and its "poweroff -f" ends QEMU.
      printf 'vmm qemu-system-x86_64 -accel kvm -cpu host -smp 2 -m 1024 -nographic -nic none -no-reboot \\\n'
      printf '    -kernel "$kernel" -initrd "$initrd" \\\n'
      printf '    -append "console=ttyS0 panic=-1 quiet lkvm.cmd=$(printf %%s "$%s" | base64 -w 0)" \\\n' "$command"
      printf '    -object iothread,id=io0 -drive "file=$img,if=none,id=d0,format=raw,aio=io_uring,cache=writeback"'
      printf ' %q' "$@"; printf '\n'; } > "$work/$(printf '%02d' ${#configs[@]})-$name.sh"
}
qemu_job qemu guest -device virtio-blk-pci,drive=d0,iothread=io0,num-queues=2
for n in 1 2; do lkvm_job "scsi-iothreads-$n" ",bus=scsi,num-queues=2" --iothreads "$n"; done
qemu_job qemu-scsi guest_scsi -device virtio-scsi-pci,id=s0,iothread=io0,num_queues=2 -device scsi-hd,drive=d0,bus=s0.0

# BENCH_CONFIGS: only these rows, and the QEMU row each compares with.
if [ -n "${BENCH_CONFIGS:-}" ]; then
    wanted=" $BENCH_CONFIGS "
    for name in $BENCH_CONFIGS; do
        [[ $name == *scsi* ]] && wanted+=" qemu-scsi " || wanted+=" qemu "
    done
    kept=()
    for i in "${!configs[@]}"; do
        script=$work/$(printf '%02d' $((i + 1)))-${configs[i]}.sh
        if [[ $wanted == *" ${configs[i]} "* ]]; then
            kept+=("${configs[i]}")
            mv "$script" "$work/$(printf '%02d' ${#kept[@]})-${configs[i]}.sh.keep"
        else
            rm "$script"
        fi
    done
    for f in "$work"/*.keep; do mv "$f" "${f%.keep}"; done
    configs=("${kept[@]}")
fi

# The rig's speed drifts by 2x over minutes: every configuration runs once
# per round, rounds one after the other, and a row shows each round's IOPS
# and their mean, so that drift shows instead of deciding a ratio.
rounds=${BENCH_ROUNDS:-3}
for ((round = 2; round <= rounds; round++)); do
    for i in "${!configs[@]}"; do
        cp "$work/$(printf '%02d' $((i + 1)))-${configs[i]}.sh" \
            "$work/$(printf '%02d' $(((round - 1) * ${#configs[@]} + i + 1)))-${configs[i]}.sh"
    done
done

rig_status=0
bash "$top/scripts/nested-run.sh" --batch "$work" || rig_status=$?

# output NAME: every round's console output, without the serial line's \r and
# the terminal resets that SeaBIOS and Linux send under QEMU.
output() {
    local f
    for f in "$work"/[0-9][0-9]-"$1".sh.out; do
        [ -f "$f" ] && tr -d '\r' < "$f" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g'
    done
    return 0
}
# result NAME: "IOPS P99US EXITS IRQS EMULATED ROUND-IOPS...": the median over
# the rounds whose terse line shows no fio error of IOPS, p99 and L1 KVM's
# exits, interrupt injections and emulated instructions per guest read
# ("-" where a round had no counters), or nothing when no round worked.
# (Terse v3: field 5 error, 8 read IOPS, 18-37 clat percentiles in us.)
result() {
    local f
    for f in "$work"/[0-9][0-9]-"$1".sh.out; do [ -f "$f" ] && tr -d '\r' < "$f"; echo ROUND-END; done | awk '
        function median(list,    n, a, i, j, t) {
            n = split(list, a, " ")
            if (n == 0) return "-"
            for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        function keep() { if (ok) { n++; iops = iops " " fio_iops; p99 = p99 " " fio_p99; each = each " " int(fio_iops) } ok = 0 }
        /BENCH-START reads=/ { sub(/.*reads=/, ""); start = $1 + 0 }
        /BENCH-END reads=/ { sub(/.*reads=/, ""); end = $1 + 0 }
        /FIO;3;/ {
            keep()
            line = $0; sub(/.*FIO;/, "", line); split(line, f, ";")
            if (f[5] != 0) next
            for (i = 18; i <= 37; i++) if (f[i] ~ /^99\.000000%=/) fio_p99 = substr(f[i], 12)
            fio_iops = f[8]; ok = 1
        }
        /^KVM-COUNTERS;/ && ok && end > start {
            split($0, c, ";"); split(c[2], b, " "); split(c[3], a, " ")
            # L1 sums over live VMs: one that went away between the samples makes them useless.
            if (a[1] < b[1] || a[2] < b[2] || a[3] < b[3]) next
            exits = exits " " (a[1] - b[1]) / (end - start)
            irqs = irqs " " (a[2] - b[2]) / (end - start)
            emulated = emulated " " (a[3] - b[3]) / (end - start)
            keep()
        }
        /^ROUND-END/ { keep() }
        END {
            if (!n) exit
            printf "%d %d", median(iops), median(p99)
            e = median(exits); i = median(irqs); m = median(emulated)
            printf (e == "-" ? " - - -" : " %.2f %.2f %.2f"), e, i, m
            print each
        }'
}
qemu_iops=$(result qemu | cut -d' ' -f1)
qemu_scsi_iops=$(result qemu-scsi | cut -d' ' -f1)
failed=0
echo "fio 4k randread QD64 (2 jobs x iodepth 32, one per vCPU) in a 2-vCPU L2, ${seconds}s, $rounds rounds; goal: lkvm/QEMU IOPS >= 1.2"
echo "512 MiB image in L1 tmpfs, page-cached: QEMU cache=writeback aio=io_uring, lkvm without direct (aio default)"
echo "IOPS, p99 and the per-request counts are the rounds' medians; vs-QEMU compares medians (scsi rows with QEMU's scsi);"
echo "exits, irqs, emul: L1 KVM's exits, interrupts injected and instructions emulated per guest read"
printf '%-30s %8s %8s %7s %6s %6s %6s %6s  %s\n' config IOPS p99us vs-QEMU exits irqs emul queues 'IOPS per round'
for name in "${configs[@]}"; do
    read -r iops p99 exits irqs emulated each <<< "$(result "$name")" || true
    queues=$(output "$name" | sed -n 's/^queues=//p' | head -n 1)
    label=$name; [[ $name == qemu* ]] || label="lkvm $name"
    if [ -z "${iops:-}" ]; then
        failed=1
        status=$(cat "$work"/[0-9][0-9]-"$name".sh.status 2> /dev/null | sort -u | xargs)
        case $status in '') status=none;; 124|137) status="$status: timed out, the guest hung";; esac
        printf '%-30s %8s   (status %s)\n' "$label" failed "$status"
        # Show why: fio's (or the VMM's) error lines, else the end of the run's output.
        { output "$name" | grep -iE 'fio|err|bench-retry' || output "$name" | tail -n 8; } | tail -n 8 | sed 's/^/    | /'
        continue
    fi
    peer=$qemu_iops; [[ $name == *scsi* ]] && peer=$qemu_scsi_iops
    ratio=$(awk -v a="$iops" -v b="${peer:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }')
    missing=$((rounds - $(wc -w <<< "$each")))
    ((missing == 0)) || each="$each ($missing failed)"
    printf '%-30s %8s %8s %7s %6s %6s %6s %6s  %s\n' "$label" "$iops" "$p99" "$ratio" "$exits" "$irqs" "$emulated" \
        "${queues:--}" "$each"
    output "$name" | sed -n 's/^bench-retry: /    | retried after a failed first run: /p'
done
[ "$rig_status" = 0 ] || echo "bench-nested: the nested rig failed (status $rig_status)" >&2
exit $(( failed || rig_status ))
