#!/usr/bin/env bash
# System tests: real guests booted by build/lkvm through scripts/nested-run.sh
# (one shared L1 boot for all of them), plus the bad-input cases that lkvm
# must refuse before it touches KVM, run right here. One line per test, then
# "N passed, N failed".
#
# Adding a guest test is one place: register a job (`job NAME LKVM-ARGS...`, or
# `script NAME BASH-CODE` for a script of its own) among the others, and check
# its result with `expect NAME STATUS REGEX...` (or any pass/fail code using
# `result NAME out|status`) in the checks after the rig has run. Several checks
# may read one job's output: `expect_in JOB NAME STATUS REGEX...` names each.
# A test whose lkvm options are those of a guest that is already there is a
# `part GUEST NAME GUEST-CODE` of it instead (no boot of its own; see guest()),
# checked the same way.
#
# The rig runs the jobs one at a time (LKVM_RIG_LANES=2: two), in registration order
# except for the long ones listed in long_jobs, which start first. So a job
# must not collide with the one beside it: the files it writes in $work are
# named after it (or live in a mktemp directory), an image two jobs open is
# opened ,ro by both (lkvm locks images: a collision fails loudly), and a
# tmpfs it mounts has a directory of its own. The rig runs every $work/*.sh
# as a job: no other file there ends in .sh (a guest's script is NAME.cmd).
set -uo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
lkvm=$top/${LKVM_BUILD:-build}/lkvm
kernel=$top/build/kernel/vmlinuz
work=$(mktemp -d /tmp/lkvm-system.XXXXXX)
trap 'rm -rf "$work"' EXIT
passed=0 failed=0

pass() { echo "ok   system: $1"; passed=$((passed + 1)); }
fail() {
    echo "FAIL system: $1: $2"
    [ -f "$3" ] && tail -n 20 "$3" | sed 's/^/      | /'
    failed=$((failed + 1))
}

# ---------------------------------------------------------------- guests
# job NAME LKVM-ARGS...: one lkvm run, queued for the shared L1 boot.
jobs=()
job() {
    local name=$1; shift
    jobs+=("$name")
    { printf 'cd %q\n' "$work"; printf 'exec %q' "$lkvm"; printf ' %q' "$@"; printf '\n'; } \
        > "$work/$((100 + ${#jobs[@]}))-$name.sh"
}
# script NAME BASH-CODE: a job that is a script of its own (several lkvm runs, say); $LKVM is lkvm.
script() {
    local name=$1; shift
    jobs+=("$name")
    { printf 'cd %q\nLKVM=%q\n' "$work" "$lkvm"; printf '%s\n' "$1"; } > "$work/$((100 + ${#jobs[@]}))-$name.sh"
}
# guest NAME LKVM-ARGS...: one lkvm run whose guest runs the parts registered
# with `part NAME PART CODE`, one after the other in registration order, each
# as `sh -c CODE` (as a job's own command would run). After the rig each part
# gets an output and a status of its own, as if it were a job: the lines it
# printed plus lkvm's own (lkvm: ...) lines, and its shell's status, or lkvm's
# when lkvm did not end with 0. Jobs whose lkvm options are the same share one
# guest this way: an L2 boot in the rig costs 15-30 s. What lkvm's exit path
# or options test stays a job of its own. The whole command goes on the guest's
# kernel command line (2 KiB at most), so a guest takes a few short parts.
declare -A guest_file guest_args guest_cmd
parts=()
guest() {
    local name=$1; shift
    jobs+=("$name")
    guest_file[$name]=$work/$((100 + ${#jobs[@]}))-$name.sh
    guest_args[$name]=$(printf ' %q' "$@")
    guest_cmd[$name]=
}
part() {
    local guest=$1 name=$2 code=${3//\'/\'\\\'\'}
    parts+=("$guest $name")
    guest_cmd[$guest]+="echo @@part $name; sh -c '$code'; printf '\n@@end %s %s\n' $name \$?"$'\n'
    { printf 'cd %q\n' "$work"; printf 'exec %q%s -- sh -c %q\n' "$lkvm" "${guest_args[$guest]}" "${guest_cmd[$guest]}"; } > "${guest_file[$guest]}"
}
result() { ls "$work"/parts/"$1".sh."$2" "$work"/[0-9][0-9][0-9]-"$1".sh."$2" 2>/dev/null | head -n 1; }

# expect NAME STATUS [REGEX...]: status must match and every REGEX must be found in the output.
expect() { expect_in "$1" "$@"; }
# expect_in JOB NAME STATUS [REGEX...]: the same, for one of several checks on one job's output.
expect_in() {
    local job=$1 name=$2 want=$3; shift 3
    local out status
    out=$(result "$job" out); status=$(cat "$(result "$job" status)" 2>/dev/null)
    if [ "$status" != "$want" ]; then
        fail "$name" "exit status ${status:-none}, expected $want" "$out"; return
    fi
    for re in "$@"; do
        tr -d '\r' < "$out" | grep -qE -- "$re" || { fail "$name" "output lacks /$re/" "$out"; return; }
    done
    pass "$name"
}

# One boot checks what any guest must get right: its vCPUs, memory and command
# line; and that an I/O thread group larger than the host's CPUs is only
# warned about (it has no disk to serve here).
guest one-cpu run -c 1 -m 512 -p foo=bar --iothreads 3
part one-cpu basics 'echo cpus=$(nproc); grep MemTotal /proc/meminfo; cat /proc/cmdline'
part one-cpu iothreads-over-cpus true
job cpus-2-mptable    run -c 2 -p acpi=off -- sh -c 'echo cpus=$(nproc); dmesg | grep -c "found SMP MP-table"'
job exit-7            run -- sh -c 'exit 7'
job reboot            run -- reboot -f
job reboot-i8042      run -p acpi=off -- reboot -f
job poweroff          run -- poweroff -f
job panic             run -- sh -c 'echo c > /proc/sysrq-trigger'
job triple-fault      run -p reboot=t -- reboot -f
echo '# rig: the guest triple-faults on purpose (reboot=t): its vCPU at the reset vector is no sign of the rig' \
    >> "$(ls "$work"/[0-9][0-9][0-9]-triple-fault.sh)"
job too-many-cpus     run -c 254000
job kvm-max-cpus      run -c 255
script gdb "LKVM=\"\$LKVM\" bash $(printf %q "$top/tests/system/gdb.sh") session"
script gdb-breakpoints "LKVM=\"\$LKVM\" bash $(printf %q "$top/tests/system/gdb.sh") breakpoints"
# The CMOS RTC: the guest's kernel finds it and sets its clock from it, busybox
# hwclock reads it, and a time the guest writes keeps running. The guest
# prints the RTC's time and this script stamps that line with the host's
# time as it arrives (lkvm writes the console unbuffered): the two are
# within 2 s, the whole seconds of either clock.
script rtc 'set -o pipefail
"$LKVM" run -- sh -c "echo broken=\$(dmesg | grep -c \"broken or not accessible\"); dmesg | grep -E \"rtc0|system clock\"
hwclock -u -r; echo hwclock-r=\$?; echo rtc-now=\$(cat /sys/class/rtc/rtc0/since_epoch)
date -u -s @1000000000 > /dev/null; hwclock -u -w; echo hwclock-w=\$?; sleep 2; hwclock -u -r
d=\$((\$(cat /sys/class/rtc/rtc0/since_epoch) - 1000000000)); echo set-plus=\$d; [ \$d -ge 1 ] && [ \$d -le 60 ] && echo rtc-set-advances; true" |
{ cr=$(printf "\r"); while IFS= read -r line; do line=${line%"$cr"}   # no tr here: its output waits in a buffer
case $line in rtc-now=*) echo "$line host-now=$(date +%s)";; *) printf "%s\n" "$line";; esac; done; }'

# Disks: the host's own files, seen and written by the guest.
truncate -s 64M "$work/marker.raw" "$work/direct.raw" "$work/second.raw" "$work/inuse.raw"
printf 'HOST-MARKER-4f2a' | dd of="$work/marker.raw" conv=notrunc status=none
truncate -s 16M "$work/ro.raw"
printf 'READ-ONLY-CONTENT' | dd of="$work/ro.raw" conv=notrunc status=none
ro_sum=$(md5sum < "$work/ro.raw")
# One guest, four disks (vda-vdd), each a part's own. The default
# notify=pio: the guest's driver claims the port BAR its notify capability names.
guest blk-disks run -d "$work/marker.raw,ro,serial=marker-disk" -d "$work/second.raw,aio=sync" -d "$work/direct.raw" -d "$work/ro.raw,ro"
part blk-disks disk-two 'ls /sys/block | grep vd | tr "\n" " "; echo; echo second-disk-data | dd of=/dev/vdb conv=fsync status=none; head -c 16 /dev/vdb; echo'
part blk-disks disk-marker 'head -c 16 /dev/vda; echo; cat /sys/block/vda/serial; echo; cat /sys/block/vda/size; grep -E "^ *[0-9a-f]+-[0-9a-f]+ : virtio-pci-modern" /proc/ioports | sed "s/^ */ioport /"'
part blk-disks disk-direct-write 'yes LKVM-PATTERN-0123456789 | head -c 4194304 | dd of=/dev/vdc bs=65536 iflag=fullblock oflag=direct 2>&1 | tail -n 1; sync'
part blk-disks disk-read-only 'cat /sys/block/vdd/ro; echo overwrite | dd of=/dev/vdd conv=fsync 2>&1; head -c 17 /dev/vdd; echo'
job disk-intx         run -p pci=nomsi -d "$work/marker.raw,ro" -- sh -c 'head -c 16 /dev/vda; echo; grep -c "IO-APIC.*virtio" /proc/interrupts'
# notify=mmio: the same data through queue notify registers in the memory BAR
# (the default, pio, is what the jobs above use). The guest's /proc/ioports shows
# whether the driver claimed an I/O BAR (it claims only the BARs its
# capabilities name, and the notify structure is the only thing there).
# (The guest two-cpus-mmio below, with notify=mmio SCSI beside them.)
truncate -s 64M "$work/direct-mmio.raw"
ioports='grep -E "^ *[0-9a-f]+-[0-9a-f]+ : virtio-pci-modern" /proc/ioports | sed "s/^ */ioport /"; echo ioports=$(grep -c virtio-pci-modern /proc/ioports)'
script disk-in-use    '"$LKVM" run -d inuse.raw -- sh -c "echo first-up; sleep 60" > disk-in-use-first.out 2>&1 < /dev/null &
first=$!
for i in $(seq 1 120); do grep -q "^first-up" disk-in-use-first.out 2>/dev/null && break; sleep 0.5; done
"$LKVM" run -d inuse.raw -- true; echo "second=$?"
kill $first; wait $first 2>/dev/null; echo "first stopped"'

# An I/O thread group: two queues, two threads, a fio verify job through both
# (and fio-image: the fio image boots and has fio).
truncate -s 64M "$work/group.raw"
script iothreads-group '"$LKVM" run -c 2 -i '"$top"'/build/guest/initramfs-fio.cpio.gz --iothreads 2 -d group.raw --stats -- sh -c "fio --version; echo mq=\$(ls /sys/block/vda/mq | wc -l); fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=4M --offset_increment=16M --numjobs=2 --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 --group_reporting > /tmp/fio.log 2>&1; s=\$?; grep -E \"err=|verify\" /tmp/fio.log | head -n 5; echo fio=\$s" > group.out 2>&1 < /dev/null &
pid=$!
names=
for i in $(seq 1 120); do
    names=$(cat /proc/$pid/task/*/comm 2> /dev/null | grep -E "^iothread" | sort | tr "\n" " ")
    [ "$names" = "iothread0 iothread1 " ] && break
    sleep 0.5
done
echo "threads: $names"
wait $pid; echo "status=$?"
cat group.out
# Queue rows: disk queue thread requests MiB p50 p99 kicks interrupts ...; vCPU rows: vcpu exits ...
awk "/^disk +queue/ { q = 1; next } /^vcpu / { q = 0; v = 1; next } /^exits per/ { v = 0 }
     q && \$1 ~ /^[0-9]+\$/ { rows++; requests += \$4; if (\$8 > \$4 || \$9 > \$4) over++ }
     v && \$1 ~ /^[0-9]+\$/ { vcpus++; if (\$2 > 0) counted++ }
     END { print (rows && requests > 0 && !over ? \"kicks-irqs-within-requests\" : \"kicks-irqs-off\"), rows, requests
           print (vcpus && counted == vcpus ? \"exits-counted\" : \"no-exits\"), vcpus }" group.out'

# What a request costs, from lkvm's own --stats: each queue's kicks and
# interrupts (at most one of each per request) and KVM's exits per vCPU.

# SCSI disks on virtio-scsi controllers.
truncate -s 64M "$work/scsi-marker.raw" "$work/scsi-write.raw" "$work/scsi-a.raw"
printf 'SCSI-MARKER-77c1' | dd of="$work/scsi-marker.raw" conv=notrunc status=none
truncate -s 16M "$work/scsi-ro.raw"
printf 'SCSI-READ-ONLY' | dd of="$work/scsi-ro.raw" conv=notrunc status=none
scsi_ro_sum=$(md5sum < "$work/scsi-ro.raw")
# Every disk as "H:C:T:L rot=R ro=R size=S".
scsi_list='for d in /sys/block/sd*; do echo "$(basename $(readlink $d/device)) rot=$(cat $d/queue/rotational) ro=$(cat $d/ro) size=$(cat $d/size)"; done'
# Two disks, each on a controller of its own: which of sda and sdb is which
# depends on the order the guest probed them in; the serial tells.
guest scsi-disks run -d "$work/scsi-marker.raw,bus=scsi,serial=scsi-marker,rotation-rate=1" -d "$work/scsi-write.raw,bus=scsi"
# marker_is 0 (or 1): sets disk to the /dev/sdX whose serial is (or is not) scsi-marker.
marker_is() { echo "for s in /sys/block/sd*; do sg_vpd -p sn /dev/\${s##*/} | grep -q scsi-marker; [ \$? = $1 ] && disk=/dev/\${s##*/}; done"; }
part scsi-disks scsi-marker "$(marker_is 0); head -c 16 \$disk; echo; $scsi_list
sg_inq \$disk; sg_vpd -p sn \$disk; sg_vpd -p di \$disk; sg_vpd -p bl \$disk; sg_vpd -p bdc \$disk; sg_vpd -p lbpv \$disk; sg_readcap -l \$disk
reported() { echo \$1=\$(dmesg | grep -c 'Power-on or device reset occurred'); }
reported resets-before; sg_reset -d \$disk; echo sg_reset=\$?
echo after-reset=\$(dd if=\$disk bs=512 count=1 iflag=direct status=none | head -c 16); reported resets-after"
part scsi-disks scsi-write "$(marker_is 1); yes LKVM-SCSI-PATTERN-42 | head -c 4194304 | dd of=\$disk bs=65536 iflag=fullblock oflag=direct 2>&1 | tail -n 1; sync"
# Two vCPUs, and every device notified through its memory BAR: the two
# disks of disk-mmio (vda, vdb) and a SCSI controller's (sda): notify=mmio set
# on a shared controller, as its disks cannot say it themselves.
truncate -s 64M "$work/scsi-mmio.raw"
guest two-cpus-mmio run -c 2 -d "$work/marker.raw,ro,serial=marker-disk,notify=mmio" -d "$work/direct-mmio.raw,notify=mmio" \
    -d "$work/scsi-mmio.raw,bus=scsi,controller=c0,lun=0" --scsi-controller c0,notify=mmio,num-queues=2
part two-cpus-mmio disk-mmio "head -c 16 /dev/vda; echo; cat /sys/block/vda/serial; echo; cat /sys/block/vda/size
yes LKVM-MMIO-PATTERN-98765 | head -c 4194304 | dd of=/dev/vdb bs=65536 iflag=fullblock oflag=direct 2>&1 | tail -n 1; sync; $ioports"
part two-cpus-mmio scsi-write-mmio "yes LKVM-SCSI-MMIO-PATTERN | head -c 4194304 | dd of=/dev/sda bs=65536 iflag=fullblock oflag=direct 2>&1 | tail -n 1; sync; $ioports"
# The console's last lines with 2 vCPUs: once the console is idle, the part
# prints nearly a transmit buffer's worth (4 KiB) on vCPU 0 while the UART's
# interrupt is on vCPU 1, and the guest ends at once (this is its last part);
# none of it may be lost (the hangup of the console when the command's session
# ended used to throw away what the UART had not sent yet).
part two-cpus-mmio cpus-2-acpi 'echo cpus=$(nproc); echo madt=$(dmesg | grep -c "Using ACPI (MADT) for SMP")
echo 2 > /proc/irq/$(cat /sys/class/tty/ttyS0/irq)/smp_affinity; taskset -p 1 $$ > /dev/null; sleep 1; seq 1 700; echo console-tail'
job scsi-two-luns run -c 2 --iothreads 2 --stats -d "$work/scsi-a.raw,bus=scsi,controller=c0,lun=0" \
    -d "$work/scsi-ro.raw,bus=scsi,controller=c0,lun=1,ro" --scsi-controller c0,iothread=1,num-queues=2 -- sh -c "$scsi_list
rw=\$(ls /sys/bus/scsi/devices/*:0:0:0/block); ro=\$(ls /sys/bus/scsi/devices/*:0:0:1/block)
sg_luns -R /dev/\$rw
echo lun0-data | dd of=/dev/\$rw conv=fsync status=none; head -c 9 /dev/\$rw; echo
echo overwrite | dd of=/dev/\$ro conv=fsync 2>&1; echo dd=\$?
sg=\$(ls /sys/bus/scsi/devices/*:0:0:1/scsi_generic); sg_write_same --lba=0 --num=1 /dev/\$sg 2>&1; echo ws=\$?
head -c 14 /dev/\$ro; echo"
# Discard on a tmpfs of L1's own, where holes can be punched (the 9p share
# cannot): the range reads back as zeroes and the file takes less space.
script scsi-discard '
mkdir -p tmpfs && mount -t tmpfs -o size=64m lkvm-discard tmpfs || exit 1
img=tmpfs/scsi-discard.raw
yes DISCARD-ME | head -c 16777216 > $img
before=$(stat -c %b $img)
"$LKVM" run -d $img,bus=scsi -- sh -c "cat /sys/block/sda/queue/discard_max_bytes; blkdiscard -o 1048576 -l 4194304 /dev/sda; echo blkdiscard=\$?" < /dev/null
echo status=$?
after=$(stat -c %b $img)
echo "blocks before=$before after=$after"
[ $after -lt $before ] && echo sparse
cmp -s -n 4194304 -i 1048576:0 $img /dev/zero && echo zeroes
yes DISCARD-ME | head -c 1048576 > tmpfs/head
cmp -s -n 1048576 $img tmpfs/head && echo head-kept
# io_uring lets go of a file a moment after its ring is gone.
for i in $(seq 20); do umount tmpfs 2> /dev/null && break; sleep 0.5; done
mountpoint -q tmpfs && umount -l tmpfs
true'

# The same on virtio-blk: DISCARD punches the hole, WRITE_ZEROES (blkdiscard
# -z, which lets the device unmap) zeroes another range, and discard=ignore
# (the guest's second disk, a copy of the image as it was) leaves its image as it was.
script blk-discard '
mkdir -p tmpfs-blk && mount -t tmpfs -o size=64m lkvm-blk-discard tmpfs-blk || exit 1
img=tmpfs-blk/blk-discard.raw
yes DISCARD-ME | head -c 16777216 > $img
cp $img tmpfs-blk/copy.raw
before=$(stat -c %b $img)
"$LKVM" run -d $img -d tmpfs-blk/copy.raw,discard=ignore -- sh -c "cat /sys/block/vda/queue/discard_max_bytes /sys/block/vda/queue/write_zeroes_max_bytes; /usr/sbin/blkdiscard -o 1048576 -l 4194304 /dev/vda; echo blkdiscard=\$?; /usr/sbin/blkdiscard -z -o 8388608 -l 1048576 /dev/vda; echo zeroout=\$?
blkdiscard /dev/vdb; echo ignored=\$?" < /dev/null
echo status=$?
after=$(stat -c %b $img)
echo "blocks before=$before after=$after"
[ $after -lt $before ] && echo sparse
cmp -s -n 4194304 -i 1048576:0 $img /dev/zero && echo zeroes
cmp -s -n 1048576 -i 8388608:0 $img /dev/zero && echo zeroed-out
yes DISCARD-ME | head -c 1048576 > tmpfs-blk/head
cmp -s -n 1048576 $img tmpfs-blk/head && echo head-kept
yes DISCARD-ME | head -c 16777216 | cmp -s tmpfs-blk/copy.raw - && echo unchanged
for i in $(seq 20); do umount tmpfs-blk 2> /dev/null && break; sleep 0.5; done
mountpoint -q tmpfs-blk && umount -l tmpfs-blk
true'

# Snapshot disks: the guest writes and reads back its data, the image stays
# byte for byte as it was. The overlay goes to $TMPDIR (the default, /var/tmp,
# over the rig's 9p share; below, a tmpfs of L1's own), and two guests
# snapshot one image at once (the second of them is snapshot-write's guest:
# -d snap.raw,snapshot with the default TMPDIR).
truncate -s 64M "$work/snap.raw"
printf 'SNAPSHOT-BASE-9d3e' | dd of="$work/snap.raw" conv=notrunc status=none
yes SNAPSHOT-BASE-FILL | head -c 1048576 | dd of="$work/snap.raw" bs=65536 seek=96 iflag=fullblock conv=notrunc status=none
snap_sum=$(md5sum < "$work/snap.raw")
# p X: 4 MiB of a pattern; written at 1 MiB + 512 (the clusters at either
# end only partly), read back; then a few bytes into one sector (the guest's
# page cache writes the 4 KiB around them), the image's own data at 0 and
# 6 MiB, and WRITE_ZEROES at 8 MiB.
snap_guest='p() { yes LKVM-SNAPSHOT-$1 | head -c 4194304; }
echo ro=$(cat /sys/block/vda/ro)
p $1 | dd of=/dev/vda bs=512 seek=2049 iflag=fullblock oflag=direct 2>&1 | tail -n 1
[ "$(dd if=/dev/vda bs=512 skip=2049 count=8192 iflag=direct status=none | md5sum)" = "$(p $1 | md5sum)" ] && echo readback-ok
echo partial-sector-data | dd of=/dev/vda bs=512 seek=12001 conv=fsync status=none
dd if=/dev/vda bs=512 skip=12001 count=1 iflag=direct status=none | head -c 19; echo
dd if=/dev/vda bs=512 count=1 iflag=direct status=none | head -c 18; echo
[ "$(dd if=/dev/vda bs=65536 skip=96 count=16 iflag=direct status=none | md5sum)" = "$(yes SNAPSHOT-BASE-FILL | head -c 1048576 | md5sum)" ] && echo base-fill-ok
/usr/sbin/blkdiscard -z -o 8388608 -l 65536 /dev/vda && [ "$(dd if=/dev/vda bs=65536 skip=128 count=1 iflag=direct status=none | md5sum)" = "$(head -c 65536 /dev/zero | md5sum)" ] && echo zeroes-ok'
printf '%s\n' "$snap_guest" > "$work/snap-guest.cmd"
printf '%s\n' "$snap_guest" | sed 's/vda/sda/g' > "$work/snap-guest-scsi.cmd"
script snapshot-scsi-tmpfs-dir 'TMPDIR=/run "$LKVM" run -d snap.raw,snapshot,bus=scsi,aio=sync -- sh -c "$(cat snap-guest-scsi.cmd)" _ S'
script snapshot-two-guests 'g=$(cat snap-guest.cmd)
"$LKVM" run -d snap.raw,snapshot -- sh -c "$g; echo first-up; sleep 15
[ \"\$(dd if=/dev/vda bs=512 skip=2049 count=8192 iflag=direct status=none | md5sum)\" = \"\$(p F | md5sum)\" ] && echo first-still-own" _ F > first-snap.out 2>&1 < /dev/null &
first=$!
for i in $(seq 120); do grep -q "^first-up" first-snap.out 2> /dev/null && break; kill -0 $first 2> /dev/null || break; sleep 0.5; done
"$LKVM" run -d snap.raw,snapshot -- sh -c "$g" _ G; echo second=$?
wait $first; echo first=$?
tr -d "\r" < first-snap.out | sed "s/^/first: /"'

# A disk that fills up under the guest: each image is sparse, 8 MiB on a
# 2 MiB tmpfs of L1's own. The guest writes past what fits with O_DIRECT
# (its page cache cannot hide the error), sees it, reads back what was
# written and keeps using the disk; lkvm keeps running, says so once per
# disk, and `lkvm stat` counts the errors while the guest waits on its
# console for the go-ahead.
script disk-enospc '
for d in blk scsi; do
    mkdir -p full-$d && mount -t tmpfs -o size=2m lkvm-enospc-$d full-$d || exit 1
    truncate -s 8M full-$d/disk.raw
done
cat > enospc-guest.cmd << "EOF"
p() { yes LKVM-ENOSPC | head -c $1; }
for d in vda sda; do
p 4194304 | dd of=/dev/$d bs=256k iflag=fullblock oflag=direct 2> /tmp/e; echo "$d dd=$? $(grep -v records /tmp/e)"
n=$(sed -n "s/^\([0-9]*\)+0 records out/\1/p" /tmp/e); echo "$d written=$n"
[ "$(dd if=/dev/$d bs=256k count=$n iflag=direct status=none | md5sum)" = "$(p $((n << 18)) | md5sum)" ] && echo "$d readback-ok"
done
echo "kernel vda=$(dmesg | grep -c "I/O error, dev vda") sda=$(dmesg | grep -cE "(critical space allocation|I/O) error, dev sda")"
echo guest-waiting
read -r go; echo "guest-got=$go"
p 262144 | dd of=/dev/vda bs=256k oflag=direct status=none && echo rewrite-ok
exit 42
EOF
# The guest waits on its console: lkvm reads its input from a FIFO that this script holds open.
export XDG_RUNTIME_DIR=$(mktemp -d "${XDG_RUNTIME_DIR:-/tmp}/lkvm-enospc.XXXXXX")
mkfifo $XDG_RUNTIME_DIR/console
exec 3<> $XDG_RUNTIME_DIR/console
"$LKVM" run --name enospc -d full-blk/disk.raw,werror=report -d full-scsi/disk.raw,bus=scsi,werror=report -- sh -c "$(cat enospc-guest.cmd)" \
    < $XDG_RUNTIME_DIR/console > enospc.out 2>&1 &
pid=$!
for i in $(seq 240); do grep -qs "^guest-waiting" enospc.out && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
"$LKVM" stat enospc --disks > stat.txt; echo stat=$?
cat stat.txt
# Errors per image, from the table (its errors column) and from the JSON.
awk "NR == 1 { for (i = 1; i <= NF; i++) if (\$i == \"errors\") c = i; next }
     c && /full-blk\/disk.raw/ { blk += \$c } c && /full-scsi\/disk.raw/ { scsi += \$c }
     END { print \"table-errors blk=\" blk + 0, \"scsi=\" scsi + 0 }" stat.txt
"$LKVM" stat enospc --disks --json | head -n 1 | python3 -c "
import json, sys
d = json.loads(sys.stdin.readline())[\"disks\"]
n = lambda image: sum(q[\"errors\"] for q in d if q[\"image\"].startswith(image))
print(\"json-errors blk=%d scsi=%d\" % (n(\"full-blk/disk.raw\"), n(\"full-scsi/disk.raw\")))"
"$LKVM" list | grep -q "^enospc .*running" && echo still-running
echo go >&3
wait $pid; echo status=$?
exec 3>&-
tr -d "\r" < enospc.out
for d in blk scsi; do echo "lkvm-reports $d=$(grep -c "^lkvm: .*full-$d/disk.raw: I/O error" enospc.out)"; done
for d in blk scsi; do
    for i in $(seq 20); do umount full-$d 2> /dev/null && break; sleep 0.5; done
    mountpoint -q full-$d && umount -l full-$d
done
true'

# werror=stop: a disk whose file system fills up pauses the guest, lkvm
# list and stat say why, and once the host has made room (the tmpfs grows)
# lkvm resume retries what failed: fio's verify then finds every block.
script werror-stop '
mkdir -p full-stop && mount -t tmpfs -o size=1m lkvm-werror full-stop || exit 1
truncate -s 8M full-stop/disk.raw
export XDG_RUNTIME_DIR=$(mktemp -d "${XDG_RUNTIME_DIR:-/tmp}/lkvm-werror.XXXXXX")
"$LKVM" run --name wstop -i '"$top"'/build/guest/initramfs-fio.cpio.gz -d full-stop/disk.raw,werror=stop -- sh -c "
fio --name=v --filename=/dev/vda --rw=write --bs=64k --size=2M --ioengine=libaio --direct=1 --iodepth=4 \
    --verify=crc32c --do_verify=1 > /tmp/fio.log 2>&1; echo fio=\$?; grep -E \"err=|verify\" /tmp/fio.log | head -n 3" \
    > wstop.out 2>&1 < /dev/null &
pid=$!
# A client subscribed to the events sees the stop, the pause and the rest.
for i in $(seq 240); do [ -S "$XDG_RUNTIME_DIR/lkvm/wstop.sock" ] && break; kill -0 $pid 2> /dev/null || break; sleep 0.25; done
python3 '"$top"'/tests/system/control_json.py --events "$XDG_RUNTIME_DIR/lkvm/wstop.sock" > wstop-events.out 2>&1 &
events=$!
for i in $(seq 240); do "$LKVM" list 2> /dev/null | grep -q "^wstop .*paused (io-error" && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
"$LKVM" list | grep "^wstop" | sed "s/^/listed: /"
"$LKVM" stat wstop --disks | head -n 1 | sed "s/^/stat: /"
sleep 1
"$LKVM" list | grep -q "^wstop .*paused" && echo still-paused
mount -o remount,size=16m full-stop
"$LKVM" resume wstop; echo resume=$?
wait $pid; echo status=$?
wait $events; cat wstop-events.out
tr -d "\r" < wstop.out
for i in $(seq 20); do umount full-stop 2> /dev/null && break; sleep 0.5; done
mountpoint -q full-stop && umount -l full-stop
true'

# Crash consistency: lkvm killed with SIGKILL at a random moment while the
# guest writes numbered blocks with O_DIRECT, saying each one it saw complete.
# Every block it said so of must be on the image, two rounds over.
script crash-kill '
# A round whose lkvm ended before the kill, with a vCPU reset to the reset
# vector that the guest never asked for, is the rig failing (DESIGN.md):
# that round runs once more, and says so.
retried=0
round=1
while [ $round -le 2 ]; do
    rm -f crash.raw; truncate -s 16M crash.raw
    "$LKVM" run -d crash.raw -- sh -c "i=0; while [ \$i -lt 4096 ]; do
        printf block-%08d- \$i | dd of=/dev/vda bs=4096 seek=\$i conv=sync oflag=direct status=none && echo written=\$i
        i=\$((i + 1)); done" > crash.out 2>&1 < /dev/null &
    pid=$!
    for i in $(seq 600); do grep -q "^written=" crash.out && break; kill -0 $pid 2> /dev/null || break; sleep 0.1; done
    sleep 0.$((RANDOM % 10))$((RANDOM % 10))
    if ! kill -9 $pid 2> /dev/null; then
        wait $pid; status=$?
        if [ $retried = 0 ] && [ $status = 122 ] && grep -q "triple fault (KVM_EXIT_SHUTDOWN) at RIP 0xfff0 CS 0xf000" crash.out; then
            echo "retried once: the rig reset a vCPU in round $round: $(grep -m 1 "triple fault" crash.out)"
            retried=1
            continue
        fi
        echo "round $round: lkvm ended by itself before the kill (status $status):"; tail -n 5 crash.out
    fi
    wait $pid 2> /dev/null
    last=$(tr -d "\r" < crash.out | sed -n "s/^written=\([0-9]*\)$/\1/p" | tail -n 1)
    python3 -c "
import sys
last = int(sys.argv[1] or -1)
data = open(\"crash.raw\", \"rb\").read()
lost = [i for i in range(last + 1) if data[i * 4096:i * 4096 + 15] != b\"block-%08d-\" % i]
print(\"round $round: %d blocks seen complete, %s\" % (last + 1, \"all on the image\" if last >= 0 and not lost else \"lost %s\" % lost[:5]))" "$last"
    round=$((round + 1))
done'

# Cache modes and detect-zeroes, in one boot: a disk per cache mode (on the
# 9p share, which has O_DIRECT) and a detect-zeroes=unmap disk on a tmpfs of
# L1's own (holes can be punched there). The guest says what each disk's
# cache is; meanwhile the host reads how lkvm opened each image
# (/proc/PID/fdinfo: O_DIRECT 040000, O_DSYNC 010000) and counts the flushes
# (lkvm stat) that fsync on the writeback and unsafe disks, and O_DIRECT
# writes after the guest turned the writeback disk's cache off, brought.
# tmpfs in L1 has no O_DIRECT: cache=none and directsync are refused there.
script cache-modes '
mkdir -p tmpfs-cache && mount -t tmpfs -o size=64m lkvm-cache tmpfs-cache || exit 1
modes="none writeback writethrough directsync unsafe"
for m in $modes; do truncate -s 16M cache-$m.raw; done
zimg=tmpfs-cache/zeroes.raw
yes ZEROES-OVER-ME | head -c 8388608 > $zimg
echo "zeroes-blocks-before=$(stat -c %b $zimg)"
for m in none directsync; do
    truncate -s 1M tmpfs-cache/refused-$m.raw
    "$LKVM" run -d tmpfs-cache/refused-$m.raw,cache=$m -- true > refused-$m.out 2>&1 < /dev/null
    echo "refused-$m status=$? lines=$(wc -l < refused-$m.out) $(cat refused-$m.out)"
done
cat > cache-guest.cmd << "GUEST"
for d in vda vdb vdc vdd vde vdf; do echo "$d cache=$(cat /sys/block/$d/queue/write_cache)"; done
echo guest-waiting-1; read -r go
for d in vdb vde; do yes FLUSH-ME | head -c 1048576 | dd of=/dev/$d bs=64k conv=fsync status=none; echo "$d fsync=$?"; done
echo guest-waiting-2; read -r go
echo "write through" > /sys/block/vdb/cache_type; echo "vdb switched=$(cat /sys/block/vdb/queue/write_cache)"
yes WT | head -c 65536 | dd of=/dev/vdb bs=4096 seek=1024 oflag=direct status=none; echo "vdb direct-writes=$?"
dd if=/dev/zero of=/dev/vdf bs=1M count=4 oflag=direct status=none; echo "vdf zeroes=$?"
echo guest-waiting-3; read -r go
GUEST
export XDG_RUNTIME_DIR=$(mktemp -d "${XDG_RUNTIME_DIR:-/tmp}/lkvm-cache.XXXXXX")
mkfifo $XDG_RUNTIME_DIR/console
exec 3<> $XDG_RUNTIME_DIR/console
disks=""; for m in $modes; do disks="$disks -d cache-$m.raw,cache=$m"; done
"$LKVM" run --name caches $disks -d $zimg,detect-zeroes=unmap -- sh -c "$(cat cache-guest.cmd)" \
    < $XDG_RUNTIME_DIR/console > cache.out 2>&1 &
pid=$!
stage() { for i in $(seq 240); do grep -qs "^guest-waiting-$1" cache.out && return; kill -0 $pid 2> /dev/null || return; sleep 0.5; done; }
flushes() {
    "$LKVM" stat caches --disks --json | head -n 1 | python3 -c "
import json, sys
d = json.loads(sys.stdin.readline())[\"disks\"]
print(\" \".join(\"%s=%d\" % (m, sum(q[\"flushes\"] for q in d if q[\"image\"] == \"cache-%s.raw\" % m)) for m in sys.argv[1:]))" $modes
}
stage 1
# Every description lkvm holds of an image (io_uring keeps one of its own) has the flags.
python3 -c "
import os, sys
fds, seen = \"/proc/%s/fd\" % sys.argv[1], {}
for fd in os.listdir(fds):
    name = os.path.basename(os.readlink(os.path.join(fds, fd)))
    if name.startswith(\"cache-\") and name.endswith(\".raw\"):
        flags = int(open(\"/proc/%s/fdinfo/%s\" % (sys.argv[1], fd)).read().split()[3], 8)
        seen.setdefault(name[6:-4], set()).add(\"direct=%d dsync=%d\" % (flags >> 14 & 1, flags >> 12 & 1))
for mode, kinds in sorted(seen.items()):
    print(\"fdinfo\", mode, \" / \".join(sorted(kinds)))" $pid
echo "flushes-1 $(flushes)"
echo go >&3; stage 2
echo "flushes-2 $(flushes)"
echo go >&3; stage 3
echo "flushes-3 $(flushes)"
echo go >&3
wait $pid; echo status=$?
exec 3>&-
tr -d "\r" < cache.out
echo "zeroes-blocks-after=$(stat -c %b $zimg)"
cmp -s -n 4194304 $zimg /dev/zero && echo zeroes-read-back
for i in $(seq 20); do umount tmpfs-cache 2> /dev/null && break; sleep 0.5; done
mountpoint -q tmpfs-cache && umount -l tmpfs-cache
true'

# The control socket: lkvm list/stat/pause/resume/stop against a guest running fio.
truncate -s 64M "$work/ctl.raw" "$work/ctl-json.raw"
script control-socket '
# One attempt, as a function: the nested rig now and then resets an L2 vCPU
# (a spurious triple fault, DESIGN.md) under this long run; then it runs again.
attempt() {
# Sockets cannot live on the rig'"'"'s 9p share: the rig gives jobs a tmpfs /run.
export XDG_RUNTIME_DIR=$(mktemp -d "${XDG_RUNTIME_DIR:-/tmp}/lkvm-control.XXXXXX")
requests() { "$LKVM" stat fioguest --json | head -n 1 | python3 -c "import json, sys; print(sum(q[\"requests\"] for q in json.loads(sys.stdin.readline())[\"disks\"]))"; }
"$LKVM" run --name fioguest -c 2 -i '"$top"'/build/guest/initramfs-fio.cpio.gz -d ctl.raw -- sh -c "sleep 2; echo fio-idle; sleep 6; echo fio-start
fio --name=r --filename=/dev/vda --rw=randread --bs=4k --ioengine=libaio --direct=1 --iodepth=8 --time_based --runtime=25 --eta=never --output-format=json --output=/tmp/fio.json
grep -m 1 total_ios /tmp/fio.json | tr -dc 0-9 | sed s/^/fio-ios=/; echo; echo fio-done; sleep 1000" > guest.out 2>&1 < /dev/null &
pid=$!
# The count before fio must be taken while the disk is idle, or fio'"'"'s first requests go uncounted.
for i in $(seq 240); do grep -q "^fio-idle" guest.out && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
before=$(requests)
grep -q "^fio-start" guest.out || echo counted-from-idle
for i in $(seq 240); do grep -q "^fio-start" guest.out && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
"$LKVM" list
sleep 4
"$LKVM" pause fioguest; echo pause=$?
"$LKVM" list | grep -q "fioguest.*paused" && echo listed-paused
p1=$(requests); sleep 3; p2=$(requests)
echo paused-moved=$((p2 - p1))
"$LKVM" resume fioguest; echo resume=$?
sleep 3; r=$(requests)
[ $r -gt $p2 ] && echo resumed-moves
# Two clients at once, then a bogus request: an error reply, and the guest keeps running.
"$LKVM" stat fioguest --json > s1.json & "$LKVM" stat fioguest --json > s2.json; wait $!
python3 -c "import json; [json.loads(open(f).readline()) for f in (\"s1.json\", \"s2.json\")]" && echo two-clients
# The percentiles are the interval'"'"'s: a queue that served requests in it has them.
python3 -c "
d = __import__(\"json\").loads(open(\"s1.json\").readline())[\"disks\"]
busy = [q for q in d if q[\"iops\"] > 0]
print(\"interval-latency\" if busy and all(0 < q[\"p50_us\"] <= q[\"p99_us\"] for q in busy) else \"no-latency\", d)"
# Kicks, interrupts and the exits KVM counted per vCPU are in the JSON too.
python3 -c "
j = __import__(\"json\").loads(open(\"s1.json\").readline())
queues = all(k in q for q in j[\"disks\"] for k in (\"kicks\", \"interrupts\", \"requests_per_kick\", \"requests_per_interrupt\"))
vcpus = len(j[\"vcpus\"]) == 2 and all(v[\"exits\"] > 0 for v in j[\"vcpus\"])
print(\"json-kicks-exits\" if queues and vcpus and \"exits_per_request\" in j else \"json-lacks\", j[\"vcpus\"])"
python3 -c "
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b\"HELLO there\n\")
f = s.makefile(\"rb\"); f.readline()  # the greeting
print(\"bogus-reply:\", f.readline().decode().strip())" "$XDG_RUNTIME_DIR/lkvm/fioguest.sock"
"$LKVM" list | grep -q "fioguest.*running" && echo still-running
for i in $(seq 240); do grep -q "^fio-done" guest.out && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
after=$(requests)
ios=$(sed -n "s/.*fio-ios=\([0-9]*\).*/\1/p" guest.out | head -n 1)
echo "fio-ios=$ios counted=$((after - before))"
python3 -c "import sys; a, b = int(sys.argv[1]), int(sys.argv[2]); print(\"adds-up\" if a > 0 and abs(a - b) <= a // 200 + 16 else \"off\")" "$ios" $((after - before))
"$LKVM" stop fioguest; echo stop=$?
wait $pid; echo status=$?
grep -v "^fio-" guest.out | tail -n 5
[ -e "$XDG_RUNTIME_DIR/lkvm/fioguest.sock" ] || echo socket-gone
"$LKVM" pause fioguest; echo pause-gone=$?
}
attempt > control-first.out 2>&1
if grep -q "^status=122$" control-first.out && grep -q "triple fault (KVM_EXIT_SHUTDOWN)" control-first.out; then
    echo "retried once: the rig reset a vCPU under the first attempt: $(grep -m 1 "triple fault" control-first.out)"
    attempt
else
    cat control-first.out
fi'
# The JSON protocol itself, as scripts speak it: socat for a request by hand,
# then tests/system/control_json.py (a subscriber sees pause, resume and
# shutdown events; bad requests get error replies while the guest goes on).
script control-json '
export XDG_RUNTIME_DIR=$(mktemp -d "${XDG_RUNTIME_DIR:-/tmp}/lkvm-control.XXXXXX")
sock=$XDG_RUNTIME_DIR/lkvm/jguest.sock
"$LKVM" run --name jguest -d '"$work"'/ctl-json.raw -- sh -c "echo guest-up; sleep 1000" > json-guest.out 2>&1 < /dev/null &
pid=$!
for i in $(seq 240); do grep -q "^guest-up" json-guest.out && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
printf "%s\n" "{\"execute\": \"info\", \"id\": \"by-hand\"}" | socat -t 5 - "UNIX-CONNECT:$sock" > socat.out
python3 -c "
import json, sys
lines = [json.loads(l) for l in open(\"socat.out\")]
print(\"socat\", \"greeted\" if \"lkvm\" in lines[0] else lines[0], lines[1][\"return\"][\"name\"], lines[1][\"id\"])"
"$LKVM" stat jguest --json --watch 1 | head -n 2 | python3 -c "
import json, sys
samples = [json.loads(l) for l in sys.stdin]
print(\"stat-json\", len(samples), \"ok\" if all(\"disks\" in s and \"interval_s\" in s for s in samples) else samples)"
python3 '"$top"'/tests/system/control_json.py "$sock"
wait $pid; echo status=$?
[ -e "$sock" ] || echo socket-gone'
job control-timeout run --timeout 5 -- sleep 1000
job control-output run --quiet --console-log "$work/console.log" -- sh -c 'echo hello-console-log; echo quiet-guest; exit 3'

# Throttling: a disk of its own limits, two disks sharing a --throttle-group,
# and lkvm throttle lowering the first while the guest runs. The limits are
# low because the nested rig itself does a hundred or so IOPS, and a few dozen
# on a busy host.
for d in 0 1 2; do truncate -s 64M "$work/thr$d.raw"; done
script throttle '
export XDG_RUNTIME_DIR=$(mktemp -d "${XDG_RUNTIME_DIR:-/tmp}/lkvm-control.XXXXXX")
"$LKVM" run --name thr -c 2 -i '"$top"'/build/guest/initramfs-fio.cpio.gz --throttle-group pair,iops=20 \
    -d thr0.raw,iops=16 -d thr1.raw,throttle-group=pair -d thr2.raw,throttle-group=pair -- sh -c "
fio=\"fio --rw=randread --bs=4k --ioengine=libaio --direct=1 --iodepth=8 --time_based --runtime=5 --eta=never --minimal\"
\$fio --name=alone --filename=/dev/vda | cut -d\";\" -f3,8 | tr \";\" =
\$fio --name=g1 --filename=/dev/vdb --name=g2 --filename=/dev/vdc | cut -d\";\" -f3,8 | tr \";\" =
echo phase1-done; sleep 4
\$fio --name=lowered --filename=/dev/vda | cut -d\";\" -f3,8 | tr \";\" =" > thr-guest.out 2>&1 < /dev/null &
pid=$!
for i in $(seq 600); do grep -q "^phase1-done" thr-guest.out && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
"$LKVM" stat thr --json | head -n 1 | python3 -c "
import json, sys
d = json.loads(sys.stdin.readline())[\"disks\"]
print(\"held-back\" if all(q[\"throttled_ns\"] > 0 for q in d if q[\"requests\"] > 0) else \"not-held\", d)"
"$LKVM" throttle thr 0 iops=6; echo throttle=$?
"$LKVM" throttle thr nosuch iops=20; echo throttle-nosuch=$?
wait $pid; echo status=$?
cat thr-guest.out
# Loose bands only (half to one and a half times the limit): hosts differ, and are busy.
band() { awk -v n="$1" -v v="$2" -v lo="$3" -v hi="$4" "BEGIN { print n (v >= lo && v <= hi ? \"-in-band\" : \"-out-of-band\") \"=\" v }"; }
iops() { sed -n "s/^$1=\([0-9]*\).*/\1/p" thr-guest.out | head -n 1; }
band alone "$(iops alone)" 8 24
band g1 "$(iops g1)" 5 15
band g2 "$(iops g2)" 5 15
band lowered "$(iops lowered)" 3 9'


# The long jobs start first, longest first, so that the last jobs to finish are short ones.
long_jobs=(control-socket crash-kill throttle iothreads-group werror-stop disk-enospc cache-modes blk-discard scsi-discard)
for i in "${!long_jobs[@]}"; do
    f=$(ls "$work"/[0-9][0-9][0-9]-"${long_jobs[i]}".sh 2> /dev/null)
    [ -n "$f" ] && mv "$f" "$work/$(printf '%03d' "$i")-${long_jobs[i]}.sh"
done

rig_started=$SECONDS
LKVM_RIG_TIMEOUT=${LKVM_RIG_TIMEOUT:-240} "$top/scripts/nested-run.sh" --batch "$work" 2> "$work/rig.err"
rig_status=$?
if [ $rig_status != 0 ]; then
    echo "nested rig failed (status $rig_status):"; sed 's/^/      | /' "$work/rig.err"
elif [ -s "$work/rig.err" ]; then
    echo "the nested rig recovered:"; sed 's/^/      | /' "$work/rig.err"
fi
# Every retry is counted and shown: the rig's own (a job rerun in a new L1) and
# a job's (a script that ran its guest again after the rig reset a vCPU).
rig_retries=$(grep -c '^nested-run: retrying ' "$work/rig.err")
job_retries=$(cat "$work"/*.sh.out 2> /dev/null | grep -c '^retried once: ')
grep -h '^retried once: ' "$work"/*.sh.out 2> /dev/null | sed 's/^/      | /'
echo "guests: ${#jobs[@]} jobs (${#parts[@]} parts in shared guests) in $((SECONDS - rig_started)) s, ${LKVM_RIG_LANES:-1} at a time; retries: $((rig_retries + job_retries)) ($rig_retries by the rig, $job_retries inside jobs)"
# Where the time went, to keep the suite within its budget.
for f in "$work"/*.sh.seconds; do
    [ -f "$f" ] && printf '%s %s\n' "$(cat "$f")" "$(basename "$f" .sh.seconds | cut -d- -f2-)"
done | sort -rn | head -n 5 | awk '{ s = s sep $2 " " $1 " s"; sep = ", " } END { if (s) print "slowest guests: " s }'

# Each part of a shared guest becomes a result of its own (result PART ...).
mkdir -p "$work/parts"
for p in "${parts[@]}"; do
    read -r guest name <<< "$p"
    out=$(result "$guest" out); status=$(cat "$(result "$guest" status)" 2> /dev/null)
    [ -f "$out" ] || continue
    rm -f "$work/parts/$name.sh.status"
    tr -d '\r' < "$out" | awk -v begin="@@part $name" -v end="@@end $name " -v status="$work/parts/$name.sh.status" '
        $0 == begin { inside = 1; next }
        inside && index($0, end) == 1 { inside = 0; print substr($0, length(end) + 1) > status; next }
        inside || /^lkvm: / { print }' > "$work/parts/$name.sh.out"
    # A part that did not finish shows the whole guest; lkvm's own failure is every part's.
    [ -f "$work/parts/$name.sh.status" ] || cp "$out" "$work/parts/$name.sh.out"
    if [ "$status" != 0 ]; then
        rm -f "$work/parts/$name.sh.status"
        [ -n "$status" ] && echo "$status" > "$work/parts/$name.sh.status"
    fi
done

expect_in basics cpus-1 0 '^cpus=1$'
expect cpus-2-acpi 0 '^cpus=2' '^madt=1$'
expect_in cpus-2-acpi console-tail-2cpus 0 '^699$' '^700$' '^console-tail$'
expect cpus-2-mptable 0 '^cpus=2' '^1$'
# MemTotal is what is left after the kernel's own reservations: 440-512 MiB.
mem_out=$(result basics out)
mem_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB.*/\1/p' "$mem_out" 2>/dev/null)
if [ -n "$mem_kb" ] && (( mem_kb > 440 * 1024 && mem_kb <= 512 * 1024 )); then pass mem-512
else fail mem-512 "MemTotal ${mem_kb:-missing} kB, expected 440-512 MiB" "$mem_out"; fi
expect_in basics cmdline 0 'foo=bar'
expect exit-7 7
expect reboot 0
expect reboot-i8042 0
expect poweroff 0
expect panic 121 '^lkvm: guest kernel panic: Kernel panic - not syncing: sysrq triggered crash'
expect triple-fault 122 '^lkvm: vCPU 0: triple fault \(KVM_EXIT_SHUTDOWN\) at RIP 0x[0-9a-f]+'
expect too-many-cpus 1 '^lkvm: -c 254000: more vCPUs than KVM allows'
expect_in iothreads-group fio-image 0 '^fio-[0-9]'
expect gdb 3 '^thread=vCPU 0$' '^thread=vCPU 1$' '^banner=Linux version ' '^cr3_nonzero=1$' '^stepi=thread [0-9]+ moved yes$' \
    '^stepi_stayed_on_thread=1$' '^marker_after=gdb-wrote-this$' '^detached=1$' '^guest-hostname=gdb-wrote-this$' \
    'gdb disconnected.*the guest runs on'
# Where the host cannot deliver the traps (QEMU's TCG: see gdb.sh) the job
# says so and is counted neither way.
if [ "$(cat "$(result gdb-breakpoints status)" 2>/dev/null)" = 77 ]; then
    echo "skip system: gdb-breakpoints: $(grep -m1 '^skipped: ' "$(result gdb-breakpoints out)")"
else
    expect gdb-breakpoints 3 '^marker_found=1$' '^sw_raw_before_hit_is_original=1$' '^sw_hit_vcpu=vCPU [0-9]+$' \
        '^sw_pc_is_symbol=1$' '^sw_rip_register_is_symbol=1$' '^sw_x8xb_is_original=1$' '^sw_raw_at_hit_is_original=1$' \
        '^stepi_from_breakpoint_moved=1$' '^stepi_same_vcpu=1$' '^hw_hit_vcpu=vCPU [0-9]+$' '^hw_pc_is_symbol=1$' \
        '^watch_hit_vcpu=vCPU [0-9]+$' '^watch_reported=1$' '^watch_saw_store=1$' '^detached=1$' \
        '^sync=0$' '^syncfs=0$' '^hostname=lkvm-watched$'
fi
expect rtc 0 '^broken=0$' 'registered as rtc0' 'setting system clock to 20[0-9]{2}-' '^hwclock-r=0$' \
    '^hwclock-w=0$' ' 2001( |$)' '^rtc-set-advances$'
read -r rtc_now host_now < <(sed -n 's/^rtc-now=\([0-9]*\) host-now=\([0-9]*\)$/\1 \2/p' "$(result rtc out)" 2>/dev/null)
if [ -n "${rtc_now:-}" ] && [ -n "${host_now:-}" ] && (( rtc_now - host_now >= -2 && rtc_now - host_now <= 2 )); then
    pass rtc-near-host
else
    fail rtc-near-host "the guest's RTC read ${rtc_now:-nothing} when the host's clock said ${host_now:-nothing}" "$(result rtc out)"
fi
expect disk-marker 0 '^HOST-MARKER-4f2a$' '^marker-disk$' '^131072$' '^ioport [0-9a-f]+-[0-9a-f]+ : virtio-pci-modern$'
expect disk-direct-write 0 '^64\+0 records out'
if cmp -s -n 4194304 "$work/direct.raw" <(yes LKVM-PATTERN-0123456789 | head -c 4194304); then pass disk-direct-verified
else fail disk-direct-verified "the host file does not hold the pattern the guest wrote with O_DIRECT" "$(result disk-direct-write out)"; fi
expect disk-read-only 0 '^1$' 'READ-ONLY-CONTENT'
if [ "$(md5sum < "$work/ro.raw")" = "$ro_sum" ]; then pass disk-read-only-unchanged
else fail disk-read-only-unchanged "the read-only image changed" "$(result disk-read-only out)"; fi
expect disk-intx 0 '^HOST-MARKER-4f2a$' '^[1-9]$'
expect disk-two 0 '^vda vdb vdc vdd $' '^second-disk-data$'
expect disk-mmio 0 '^HOST-MARKER-4f2a$' '^marker-disk$' '^131072$' '^64\+0 records out' '^ioports=0$'
if cmp -s -n 4194304 "$work/direct-mmio.raw" <(yes LKVM-MMIO-PATTERN-98765 | head -c 4194304); then pass disk-direct-mmio-verified
else fail disk-direct-mmio-verified "the host file does not hold the pattern the guest wrote with notify=mmio" "$(result disk-mmio out)"; fi
expect disk-in-use 0 'inuse.raw: in use by another lkvm' '^second=1$'
expect iothreads-group 0 '^threads: iothread0 iothread1 $' '^status=0$' '^mq=2$' '^fio=0$' \
    '^iothread0 +- +[1-9][0-9]* ' '^iothread1 +- +[1-9][0-9]* ' '^0 +0 +iothread0 ' '^0 +1 +iothread1 ' \
    '^kicks-irqs-within-requests 2 [1-9][0-9]*$' '^exits-counted 2$' \
    '^vcpu +exits +io +mmio +halt +irq +irq-win +signal +irq-inj +emul$' '^exits per disk request: [0-9]+\.[0-9]{2}$'
expect iothreads-over-cpus 0 '^lkvm: --iothreads 3: more I/O threads than the host.s 2 online CPUs; they will share CPUs$'
expect scsi-marker 0 '^SCSI-MARKER-77c1$' '^[0-9]+:0:0:0 rot=0 ro=0 size=131072$' 'Vendor identification: LKVM' \
    'Unit serial number: scsi-marker' 'scsi-marker' 'Maximum transfer length: 65536' '[Nn]on-rotating medium' \
    'LBPU\): 1' 'Last LBA=131071' '^resets-before=0$' '^sg_reset=0$' '^after-reset=SCSI-MARKER-77c1$' '^resets-after=1$'
expect scsi-write 0 '^64\+0 records out'
if cmp -s -n 4194304 "$work/scsi-write.raw" <(yes LKVM-SCSI-PATTERN-42 | head -c 4194304); then pass scsi-write-verified
else fail scsi-write-verified "the host file does not hold the pattern the guest wrote to /dev/sda" "$(result scsi-write out)"; fi
expect scsi-write-mmio 0 '^64\+0 records out' '^ioports=0$'
if cmp -s -n 4194304 "$work/scsi-mmio.raw" <(yes LKVM-SCSI-MMIO-PATTERN | head -c 4194304); then pass scsi-write-mmio-verified
else fail scsi-write-mmio-verified "the host file does not hold the pattern the guest wrote with notify=mmio" "$(result scsi-write-mmio out)"; fi
expect scsi-two-luns 0 '^[0-9]+:0:0:0 rot=1 ro=0 size=131072$' '^[0-9]+:0:0:1 rot=1 ro=1 size=32768$' '2 lun entr' '^lun0-data$' \
    '^dd=1$' '^ws=[1-9]' '[Dd]ata protect' '^SCSI-READ-ONLY$' '^0 +0 +iothread1 ' '^0 +1 +iothread1 '
if [ "$(md5sum < "$work/scsi-ro.raw")" = "$scsi_ro_sum" ] && [ "$(head -c 9 "$work/scsi-a.raw")" = lun0-data ]; then
    pass scsi-two-luns-host-files
else fail scsi-two-luns-host-files "LUN 0 lacks the guest's write or the read-only LUN changed" "$(result scsi-two-luns out)"; fi
expect scsi-discard 0 '^status=0$' '^blkdiscard=0$' '^[1-9][0-9]*$' '^sparse$' '^zeroes$' '^head-kept$'
expect blk-discard 0 '^status=0$' '^blkdiscard=0$' '^zeroout=0$' '^1073741824$' '^sparse$' '^zeroes$' '^zeroed-out$' '^head-kept$' '^ignored=0$' '^unchanged$'
expect disk-enospc 0 '^vda dd=1 dd: .*/dev/vda.*: (Input/output|I/O) error$' '^vda written=[1-9][0-9]*$' '^vda readback-ok$' \
    '^sda dd=1 dd: .*/dev/sda.*: No space left on device$' '^sda written=[1-9][0-9]*$' '^sda readback-ok$' \
    '^kernel vda=[1-9][0-9]* sda=[1-9][0-9]*$' '^stat=0$' '^table-errors blk=[1-9][0-9]* scsi=[1-9][0-9]*$' \
    '^json-errors blk=[1-9][0-9]* scsi=[1-9][0-9]*$' '^still-running$' '^guest-got=go$' '^rewrite-ok$' '^status=42$' \
    '^lkvm: disk full-blk/disk.raw: I/O error \(No space left on device\); the guest gets IOERR' \
    '^lkvm: disk full-scsi/disk.raw: I/O error \(No space left on device\); the guest gets a CHECK CONDITION' \
    '^lkvm-reports blk=1$' '^lkvm-reports scsi=1$'
snap_expect=('^ro=0$' '^8192\+0 records out' '^readback-ok$' '^partial-sector-data$' '^SNAPSHOT-BASE-9d3e$' '^base-fill-ok$' '^zeroes-ok$')
expect_in snapshot-two-guests snapshot-write 0 "${snap_expect[@]}" '^second=0$' 'snapshot, the guest.s writes go to a temporary overlay in /var/tmp'
expect snapshot-scsi-tmpfs-dir 0 "${snap_expect[@]}" 'temporary overlay in /run'
expect snapshot-two-guests 0 "${snap_expect[@]}" '^second=0$' '^first=0$' '^first: readback-ok$' '^first: first-up$' '^first: first-still-own$'
if [ "$(md5sum < "$work/snap.raw")" = "$snap_sum" ]; then pass snapshot-image-unchanged
else fail snapshot-image-unchanged "a snapshot guest changed its image" "$(result snapshot-two-guests out)"; fi
expect control-socket 0 'fioguest +[0-9]+ +running +2 ' '^pause=0$' '^listed-paused$' '^paused-moved=0$' '^resume=0$' \
    '^counted-from-idle$' '^resumed-moves$' '^two-clients$' '^interval-latency ' '^json-kicks-exits ' '^bogus-reply: \{"error":\{"class":"GenericError","desc":"JSON parse error' '^still-running$' '^adds-up$' '^stop=0$' '^status=0$' \
    '^socket-gone$' '^pause-gone=1$'
# Each cache mode as the guest sees it and as lkvm opened the image; unsafe
# flushes nothing; with the cache turned off each O_DIRECT write is flushed (16 of 4 KiB).
expect cache-modes 0 '^vda cache=write back$' '^vdb cache=write back$' '^vdc cache=write through$' \
    '^vdd cache=write through$' '^vde cache=write back$' '^vdf cache=write back$' \
    '^fdinfo none direct=1 dsync=0$' '^fdinfo writeback direct=0 dsync=0$' '^fdinfo writethrough direct=0 dsync=1$' \
    '^fdinfo directsync direct=1 dsync=1$' '^fdinfo unsafe direct=0 dsync=0$' \
    '^refused-none status=1 lines=1 lkvm: disk tmpfs-cache/refused-none.raw: this filesystem does not support O_DIRECT, which cache=none' \
    '^refused-directsync status=1 lines=1 .*cache=directsync needs; use cache=writethrough' \
    '^vdb fsync=0$' '^vde fsync=0$' '^vdb switched=write through$' '^vdb direct-writes=0$' '^vdf zeroes=0$' '^status=0$' \
    '^zeroes-read-back$'
cache_out=$(result cache-modes out)
if [ -f "$cache_out" ]; then
    # flushes-N ... writeback=W ... unsafe=U: fsync flushed the writeback disk, not the unsafe one; 16 more after the switch.
    counts() { sed -n "s/^flushes-$1 .*writeback=\([0-9]*\).*unsafe=\([0-9]*\).*/\1 \2/p" "$cache_out"; }
    read -r wb1 un1 <<< "$(counts 1)"; read -r wb2 un2 <<< "$(counts 2)"; read -r wb3 un3 <<< "$(counts 3)"
    if [ -n "$wb3" ] && [ "$un3" = 0 ] && [ "$wb2" -gt "$wb1" ] && [ $((wb3 - wb2)) -ge 16 ]; then pass cache-modes-flushes
    else fail cache-modes-flushes "flushes writeback ${wb1:-?}/${wb2:-?}/${wb3:-?}, unsafe ${un1:-?}/${un2:-?}/${un3:-?}" "$cache_out"; fi
    # 4 MiB of the 8 MiB overwritten with zeroes: at least 3 MiB (6144 blocks) freed.
    before=$(sed -n 's/^zeroes-blocks-before=//p' "$cache_out"); after=$(sed -n 's/^zeroes-blocks-after=//p' "$cache_out")
    if [ -n "$after" ] && [ $((before - after)) -ge 6144 ]; then pass cache-modes-detect-zeroes-unmap
    else fail cache-modes-detect-zeroes-unmap "blocks before=${before:-?} after=${after:-?}" "$cache_out"; fi
fi
expect control-json 0 '^socat greeted jguest by-hand$' '^stat-json 2 ok$' '^greeting ok$' "^subscribe \\{'return': \\{\\}, 'id': 'w1'\\}$" \
    '^stat ok$' '^bad unknown CommandNotFound$' '^bad not-json GenericError$' '^bad truncated GenericError$' \
    '^bad not-utf8 GenericError$' '^bad deep GenericError$' '^bad wrong-type GenericError$' '^bad no-execute GenericError$' \
    '^after-bad running jguest$' "^pause \\{'return': \\{\\}\\}$" '^event paused$' '^info-paused paused$' \
    '^event resumed$' '^event shutdown exit_status=0 timestamp-ok$' '^after-shutdown None$' '^status=0$' '^socket-gone$'
expect control-timeout 124 '--timeout'
expect_in control-output control-console-log 3 'hello-console-log'
if grep -q hello-console-log "$work/console.log" 2> /dev/null; then pass control-console-log-file
else fail control-console-log-file "the console log lacks the guest's output" "$(result control-output out)"; fi
expect_in control-output control-quiet 3 '^quiet-guest'
if grep -q '^lkvm:' "$(result control-output out)"; then fail control-quiet-silent "lkvm printed its own lines with --quiet" "$(result control-output out)"
else pass control-quiet-silent; fi
expect kvm-max-cpus 1 '^lkvm: -c 255: (this host.s KVM|lkvm) runs at most [0-9]+ vCPUs in one guest'

expect werror-stop 0 '^listed: wstop .*paused \(io-error: disk full-stop/disk.raw write error \(No space left on device\)\)' \
    '^event io-error disk full-stop/disk.raw write error \(No space left on device\)$' '^event paused io-error$' \
    '^event resumed $' '^event shutdown $' \
    '^stat: guest paused \(io-error: disk full-stop/disk.raw write error' '^still-paused$' '^resume=0$' '^status=0$' '^fio=0$' \
    '^lkvm: disk full-stop/disk.raw write error \(No space left on device\); the guest is paused'
expect crash-kill 0 '^round 1: [1-9][0-9]* blocks seen complete, all on the image$' \
    '^round 2: [1-9][0-9]* blocks seen complete, all on the image$'
expect throttle 0 '^held-back ' '^group=0$' '^throttle=0$' "^lkvm: guest thr: throttle: no disk or throttle group 'nosuch'" \
    '^throttle-nosuch=1$' '^status=0$' '^alone-in-band=' '^g1-in-band=' '^g2-in-band=' '^lowered-in-band='

# ---------------------------------------------------------------- bad input, no KVM needed
# refuse NAME REGEX LKVM-ARGS...: lkvm must exit 1 with one line matching REGEX and leave nothing behind.
refuse() {
    local name=$1 re=$2; shift 2
    local dir="$work/refuse-$name"
    mkdir -p "$dir"
    (cd "$dir" && "$lkvm" "$@" > "$dir.out" 2>&1 < /dev/null)
    local status=$? lines
    lines=$(wc -l < "$dir.out")
    if [ $status != 1 ]; then fail "bad-input $name" "exit status $status, expected 1" "$dir.out"
    elif [ "$lines" != 1 ]; then fail "bad-input $name" "$lines lines of output, expected 1" "$dir.out"
    elif ! grep -qE -- "$re" "$dir.out"; then fail "bad-input $name" "message lacks /$re/" "$dir.out"
    elif [ -n "$(ls -A "$dir")" ]; then fail "bad-input $name" "left files behind: $(ls -A "$dir")" "$dir.out"
    else pass "bad-input $name"; fi
}
printf 'not a kernel\n%.0s' {1..200} > "$work/not-a-kernel"
mkdir -p "$work/a-directory"
refuse missing-kernel   'kernel /nonexistent: No such file' run -k /nonexistent
refuse kernel-is-dir    'is a directory' run -k "$work/a-directory"
refuse not-bzimage      'not a bzImage' run -k "$work/not-a-kernel"
refuse missing-initrd   'initrd /nonexistent: No such file' run -k "$kernel" -i /nonexistent
refuse cpus-0           '^lkvm: -c 0: a guest needs at least one vCPU' run -c 0
refuse cpus-word        "^lkvm: -c 'two': not a number" run -c two
refuse mem-too-small    '^lkvm: -m 16: too little memory' run -m 16
refuse mem-too-large    '^lkvm: -m [0-9]+: the host has only [0-9]+ MiB' run -m 100000000
refuse unknown-option   "^lkvm: unknown option '--frobnicate'" run --frobnicate
refuse missing-value    '^lkvm: option -k needs a value' run -k
refuse unknown-command  "^lkvm: unknown command 'fly'" fly
refuse nothing-after-dashes "^lkvm: nothing after '--'" run --
refuse throttle-no-group '^lkvm: -d a.raw,throttle-group=g: no such group' run -d a.raw,throttle-group=g
refuse throttle-bad-limit '^lkvm: -d a.raw,iops-max=5: iops-max needs iops=' run -d a.raw,iops-max=5
# Bad disks are refused before KVM is touched, and the image stays as it was.
truncate -s 1000 "$work/odd.raw"
odd_sum=$(md5sum < "$work/odd.raw")
refuse disk-missing     'disk /nonexistent.raw: No such file' run -d /nonexistent.raw
refuse disk-directory   'is a directory; give a raw image file or a block device' run -d "$work/a-directory"
refuse disk-odd-size    'size 1000 is not a multiple of 512 bytes' run -d "$work/odd.raw"
refuse disk-bad-option  "unknown disk option 'fast'" run -d "$work/odd.raw,fast"
refuse disk-bad-engine  'aio=turbo is not an engine' run -d "$work/odd.raw,aio=turbo"
refuse disk-no-path     'no image path before the options' run -d ,ro
refuse iothreads-0      '^lkvm: --iothreads 0: give 1 to 64 I/O threads' run --iothreads 0 -d "$work/odd.raw"
refuse iothreads-65     '^lkvm: --iothreads 65: give 1 to 64 I/O threads' run --iothreads 65 -d "$work/odd.raw"
refuse iothread-5-of-2  'iothread=5: --iothreads 2 has threads 0-1' run --iothreads 2 -d "$work/odd.raw,iothread=5"
refuse iothread-no-group 'iothread= picks threads of the group; add --iothreads N' run -d "$work/odd.raw,iothread=1"
refuse iothreads-offline-cpu 'CPU 4000 is not online on this host' run --iothreads 2,affinity=0,4000
refuse disk-num-queues  'num-queues=0 is not 1-64' run -d "$work/odd.raw,num-queues=0"
refuse disk-ioprio      "ioprio class 'urgent' is not rt, be or idle" run -d "$work/odd.raw,ioprio=urgent"
refuse disk-bad-notify  '^lkvm: -d .*odd.raw,notify=port: notify=port is not mmio or pio' run -d "$work/odd.raw,notify=port"
refuse scsi-notify-shared 'notify= on a disk that shares scsi controller c0; set it on the controller: --scsi-controller c0,notify=mmio.pio' \
    run -d "$work/odd.raw,bus=scsi,controller=c0,notify=pio"
refuse scsi-controller-bad-notify 'c0,notify=fast: notify=fast is not mmio or pio' \
    run -d "$work/odd.raw,bus=scsi,controller=c0" --scsi-controller c0,notify=fast
refuse scsi-iothread-shared 'iothread= on a disk that shares scsi controller c0; set it on the controller: --scsi-controller c0,iothread=K' \
    run --iothreads 2 -d "$work/odd.raw,bus=scsi,controller=c0,iothread=1"
refuse scsi-lun-twice   'scsi controller c0 already has a lun 0' run -d "$work/odd.raw,bus=scsi,controller=c0" -d "$work/ro.raw,bus=scsi,controller=c0,ro"
refuse scsi-option-on-blk 'rotation-rate= is for SCSI disks; add bus=scsi' run -d "$work/odd.raw,rotation-rate=1"
refuse scsi-controller-unused 'scsi-controller c9: no disk uses it' run --scsi-controller c9 -d "$work/odd.raw"
refuse scsi-bad-discard 'discard=trim is not unmap or ignore' run -d "$work/odd.raw,bus=scsi,discard=trim"
refuse scsi-bad-bus     'bus=ide is not blk or scsi' run -d "$work/odd.raw,bus=ide"
refuse scsi-lun-range   'lun=20000 is not 0-16383' run -d "$work/odd.raw,bus=scsi,lun=20000"
refuse disk-bad-cache   '^lkvm: -d .*odd.raw,cache=fast: cache=fast is not none, writeback, writethrough, directsync or unsafe' run -d "$work/odd.raw,cache=fast"
refuse disk-bad-detect-zeroes 'detect-zeroes=yes is not off, on or unmap' run -d "$work/odd.raw,detect-zeroes=yes"
refuse disk-direct-writeback "'direct' \(cache=none\) conflicts with cache=writeback; give only one of them" run -d "$work/odd.raw,direct,cache=writeback"
refuse disk-detect-unmap-ignore 'detect-zeroes=unmap needs discard=unmap' run -d "$work/odd.raw,bus=scsi,discard=ignore,detect-zeroes=unmap"
refuse scsi-disk-missing 'disk /nonexistent.raw: No such file' run -d /nonexistent.raw,bus=scsi
refuse disk-snapshot-ro 'snapshot and ro together' run -d "$work/odd.raw,ro,snapshot"
truncate -s 1M "$work/snap-refused.raw"
TMPDIR=/nonexistent refuse disk-snapshot-tmpdir 'snapshot: cannot create the overlay in /nonexistent .*set TMPDIR to a writable directory' \
    run -d "$work/snap-refused.raw,snapshot"
if [ "$(md5sum < "$work/odd.raw")" = "$odd_sum" ]; then pass "bad-input disk-untouched"
else fail "bad-input disk-untouched" "a refused image was modified" ""; fi

# No /dev/kvm: hide it in a private mount namespace.
if command -v unshare > /dev/null && unshare --mount true 2> /dev/null; then
    out="$work/no-kvm.out"
    unshare --mount sh -c "mount -t tmpfs none /dev && exec '$lkvm' run -- true" > "$out" 2>&1 < /dev/null
    status=$?
    if [ $status = 1 ] && grep -q '^lkvm: /dev/kvm does not exist: load KVM (modprobe kvm-intel or kvm-amd).*scripts/nested-run.sh' "$out"; then
        pass "bad-input no-dev-kvm"
    else
        fail "bad-input no-dev-kvm" "exit status $status" "$out"
    fi
fi

echo "system: $passed passed, $failed failed"
[ $failed = 0 ]
