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
#
# The rig runs the jobs two at a time (LKVM_RIG_LANES), in registration order
# except for the long ones listed in long_jobs, which start first. So a job
# must not collide with the one beside it: the files it writes in $work are
# named after it (or live in a mktemp directory), an image two jobs open is
# opened ,ro by both (lkvm locks images: a collision fails loudly), and a
# tmpfs it mounts has a directory of its own.
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
result() { ls "$work"/[0-9][0-9][0-9]-"$1".sh."$2" 2>/dev/null | head -n 1; }

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

# One boot checks what any guest must get right: its vCPUs, memory and command line.
job basics            run -c 1 -m 512 -p foo=bar -- sh -c 'echo cpus=$(nproc); grep MemTotal /proc/meminfo; cat /proc/cmdline'
# The console's last lines with 2 vCPUs: once the console is idle, the command
# prints nearly a transmit buffer's worth (4 KiB) on vCPU 0 while the UART's
# interrupt is on vCPU 1, and exits at once; none of it may be lost (the hangup
# of the console when the command's session ended used to throw away what the
# UART had not sent yet).
job cpus-2-acpi       run -c 2 -- sh -c 'echo cpus=$(nproc); echo madt=$(dmesg | grep -c "Using ACPI (MADT) for SMP")
echo 2 > /proc/irq/$(cat /sys/class/tty/ttyS0/irq)/smp_affinity; taskset -p 1 $$ > /dev/null; sleep 1; seq 1 700; echo console-tail'
job cpus-2-mptable    run -c 2 -p acpi=off -- sh -c 'echo cpus=$(nproc); dmesg | grep -c "found SMP MP-table"'
job exit-7            run -- sh -c 'exit 7'
job reboot            run -- reboot -f
job reboot-i8042      run -p acpi=off -- reboot -f
job poweroff          run -- poweroff -f
job panic             run -- sh -c 'echo c > /proc/sysrq-trigger'
job triple-fault      run -p reboot=t -- reboot -f
job too-many-cpus     run -c 254000
job kvm-max-cpus      run -c 255
job fio-image         run -i "$top/build/guest/initramfs-fio.cpio.gz" -- fio --version

# Disks: the host's own files, seen and written by the guest.
truncate -s 64M "$work/marker.raw" "$work/direct.raw" "$work/second.raw" "$work/inuse.raw"
printf 'HOST-MARKER-4f2a' | dd of="$work/marker.raw" conv=notrunc status=none
cp "$work/marker.raw" "$work/marker-rw.raw"  # disk-marker's own: the others share marker.raw read-only
truncate -s 16M "$work/ro.raw"
printf 'READ-ONLY-CONTENT' | dd of="$work/ro.raw" conv=notrunc status=none
ro_sum=$(md5sum < "$work/ro.raw")
# The default notify=pio: the guest's driver claims the port BAR its notify capability names.
job disk-marker       run -d "$work/marker-rw.raw,serial=marker-disk" -- sh -c 'head -c 16 /dev/vda; echo; cat /sys/block/vda/serial; echo; cat /sys/block/vda/size; grep -E "^ *[0-9a-f]+-[0-9a-f]+ : virtio-pci-modern" /proc/ioports | sed "s/^ */ioport /"'
job disk-direct-write run -d "$work/direct.raw" -- sh -c 'yes LKVM-PATTERN-0123456789 | head -c 4194304 | dd of=/dev/vda bs=65536 iflag=fullblock oflag=direct 2>&1 | tail -n 1; sync'
job disk-read-only    run -d "$work/ro.raw,ro" -- sh -c 'cat /sys/block/vda/ro; echo overwrite | dd of=/dev/vda conv=fsync 2>&1; head -c 17 /dev/vda; echo'
job disk-two          run -d "$work/marker.raw,ro" -d "$work/second.raw,aio=sync" -- sh -c 'ls /sys/block | grep vd | tr "\n" " "; echo; echo second-disk-data | dd of=/dev/vdb conv=fsync status=none; head -c 16 /dev/vdb; echo'
job disk-intx         run -p pci=nomsi -d "$work/marker.raw,ro" -- sh -c 'head -c 16 /dev/vda; echo; grep -c "IO-APIC.*virtio" /proc/interrupts'
# notify=mmio: the same data through queue notify registers in the memory BAR
# (the default, pio, is what the jobs above use). The guest's /proc/ioports shows
# whether the driver claimed an I/O BAR (it claims only the BARs its
# capabilities name, and the notify structure is the only thing there).
truncate -s 64M "$work/direct-mmio.raw"
ioports='grep -E "^ *[0-9a-f]+-[0-9a-f]+ : virtio-pci-modern" /proc/ioports | sed "s/^ */ioport /"; echo ioports=$(grep -c virtio-pci-modern /proc/ioports)'
job disk-mmio        run -c 2 -d "$work/marker.raw,ro,serial=marker-disk,notify=mmio" -d "$work/direct-mmio.raw,notify=mmio" -- sh -c "head -c 16 /dev/vda; echo; cat /sys/block/vda/serial; echo; cat /sys/block/vda/size
yes LKVM-MMIO-PATTERN-98765 | head -c 4194304 | dd of=/dev/vdb bs=65536 iflag=fullblock oflag=direct 2>&1 | tail -n 1; sync; $ioports"
script disk-in-use    '"$LKVM" run -d inuse.raw -- sh -c "echo first-up; sleep 60" > disk-in-use-first.out 2>&1 < /dev/null &
first=$!
for i in $(seq 1 120); do grep -q "^first-up" disk-in-use-first.out 2>/dev/null && break; sleep 0.5; done
"$LKVM" run -d inuse.raw -- true; echo "second=$?"
kill $first; wait $first 2>/dev/null; echo "first stopped"'

# An I/O thread group: two queues, two threads, a fio verify job through both.
truncate -s 64M "$work/group.raw"
script iothreads-group '"$LKVM" run -c 2 -i '"$top"'/build/guest/initramfs-fio.cpio.gz --iothreads 2 -d group.raw --stats -- sh -c "echo mq=\$(ls /sys/block/vda/mq | wc -l); fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=4M --offset_increment=16M --numjobs=2 --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 --group_reporting > /tmp/fio.log 2>&1; s=\$?; grep -E \"err=|verify\" /tmp/fio.log | head -n 5; echo fio=\$s" > group.out 2>&1 < /dev/null &
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
job iothreads-over-cpus run --iothreads 3 -- true

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
job scsi-marker run -d "$work/scsi-marker.raw,bus=scsi,serial=scsi-marker,rotation-rate=1" -- sh -c "head -c 16 /dev/sda; echo; $scsi_list
sg_inq /dev/sda; sg_vpd -p sn /dev/sda; sg_vpd -p di /dev/sda; sg_vpd -p bl /dev/sda; sg_vpd -p bdc /dev/sda; sg_vpd -p lbpv /dev/sda; sg_readcap -l /dev/sda
reported() { echo \$1=\$(dmesg | grep -c 'Power-on or device reset occurred'); }
reported resets-before; sg_reset -d /dev/sda; echo sg_reset=\$?
echo after-reset=\$(dd if=/dev/sda bs=512 count=1 iflag=direct status=none | head -c 16); reported resets-after"
job scsi-write run -d "$work/scsi-write.raw,bus=scsi" -- sh -c 'yes LKVM-SCSI-PATTERN-42 | head -c 4194304 | dd of=/dev/sda bs=65536 iflag=fullblock oflag=direct 2>&1 | tail -n 1; sync'
# notify=mmio set on a shared controller, as its disks cannot say it themselves.
truncate -s 64M "$work/scsi-mmio.raw"
job scsi-write-mmio run -c 2 -d "$work/scsi-mmio.raw,bus=scsi,controller=c0,lun=0" --scsi-controller c0,notify=mmio,num-queues=2 -- sh -c "yes LKVM-SCSI-MMIO-PATTERN | head -c 4194304 | dd of=/dev/sda bs=65536 iflag=fullblock oflag=direct 2>&1 | tail -n 1; sync; $ioports"
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
# leaves the image as it was.
script blk-discard '
mkdir -p tmpfs-blk && mount -t tmpfs -o size=64m lkvm-blk-discard tmpfs-blk || exit 1
img=tmpfs-blk/blk-discard.raw
yes DISCARD-ME | head -c 16777216 > $img
before=$(stat -c %b $img)
"$LKVM" run -d $img -- sh -c "cat /sys/block/vda/queue/discard_max_bytes /sys/block/vda/queue/write_zeroes_max_bytes; /usr/sbin/blkdiscard -o 1048576 -l 4194304 /dev/vda; echo blkdiscard=\$?; /usr/sbin/blkdiscard -z -o 8388608 -l 1048576 /dev/vda; echo zeroout=\$?" < /dev/null
echo status=$?
after=$(stat -c %b $img)
echo "blocks before=$before after=$after"
[ $after -lt $before ] && echo sparse
cmp -s -n 4194304 -i 1048576:0 $img /dev/zero && echo zeroes
cmp -s -n 1048576 -i 8388608:0 $img /dev/zero && echo zeroed-out
yes DISCARD-ME | head -c 1048576 > tmpfs-blk/head
cmp -s -n 1048576 $img tmpfs-blk/head && echo head-kept
cp $img tmpfs-blk/copy.raw
"$LKVM" run -d tmpfs-blk/copy.raw,discard=ignore -- sh -c "blkdiscard /dev/vda; echo ignored=\$?" < /dev/null
cmp -s $img tmpfs-blk/copy.raw && echo unchanged
for i in $(seq 20); do umount tmpfs-blk 2> /dev/null && break; sleep 0.5; done
mountpoint -q tmpfs-blk && umount -l tmpfs-blk
true'

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
cat > enospc-guest.sh << "EOF"
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
"$LKVM" run --name enospc -d full-blk/disk.raw -d full-scsi/disk.raw,bus=scsi -- sh -c "$(cat enospc-guest.sh)" \
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

# The control socket: lkvm list/stat/pause/resume/stop against a guest running fio.
truncate -s 64M "$work/ctl.raw"
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
print(\"bogus-reply:\", s.recv(4096).decode().strip())" "$XDG_RUNTIME_DIR/lkvm/fioguest.sock"
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
job control-timeout run --timeout 5 -- sleep 1000
job control-output run --quiet --console-log "$work/console.log" -- sh -c 'echo hello-console-log; echo quiet-guest; exit 3'

# The long jobs start first, longest first, so that the last jobs to finish are short ones.
long_jobs=(control-socket iothreads-group disk-enospc blk-discard scsi-discard)
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
echo "guests: ${#jobs[@]} jobs in $((SECONDS - rig_started)) s, ${LKVM_RIG_LANES:-2} at a time; retries: $((rig_retries + job_retries)) ($rig_retries by the rig, $job_retries inside jobs)"
# Where the time went, to keep the suite within its budget.
for f in "$work"/*.sh.seconds; do
    [ -f "$f" ] && printf '%s %s\n' "$(cat "$f")" "$(basename "$f" .sh.seconds | cut -d- -f2-)"
done | sort -rn | head -n 5 | awk '{ s = s sep $2 " " $1 " s"; sep = ", " } END { if (s) print "slowest guests: " s }'

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
expect fio-image 0 '^fio-[0-9]'
expect disk-marker 0 '^HOST-MARKER-4f2a$' '^marker-disk$' '^131072$' '^ioport [0-9a-f]+-[0-9a-f]+ : virtio-pci-modern$'
expect disk-direct-write 0 '^64\+0 records out'
if cmp -s -n 4194304 "$work/direct.raw" <(yes LKVM-PATTERN-0123456789 | head -c 4194304); then pass disk-direct-verified
else fail disk-direct-verified "the host file does not hold the pattern the guest wrote with O_DIRECT" "$(result disk-direct-write out)"; fi
expect disk-read-only 0 '^1$' 'READ-ONLY-CONTENT'
if [ "$(md5sum < "$work/ro.raw")" = "$ro_sum" ]; then pass disk-read-only-unchanged
else fail disk-read-only-unchanged "the read-only image changed" "$(result disk-read-only out)"; fi
expect disk-intx 0 '^HOST-MARKER-4f2a$' '^[1-9]$'
expect disk-two 0 '^vda vdb $' '^second-disk-data$'
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
expect control-socket 0 'fioguest +[0-9]+ +running +2 ' '^pause=0$' '^listed-paused$' '^paused-moved=0$' '^resume=0$' \
    '^counted-from-idle$' '^resumed-moves$' '^two-clients$' '^interval-latency ' '^json-kicks-exits ' '^bogus-reply: LKVM/1 error' '^still-running$' '^adds-up$' '^stop=0$' '^status=0$' \
    '^socket-gone$' '^pause-gone=1$'
expect control-timeout 124 '--timeout'
expect_in control-output control-console-log 3 'hello-console-log'
if grep -q hello-console-log "$work/console.log" 2> /dev/null; then pass control-console-log-file
else fail control-console-log-file "the console log lacks the guest's output" "$(result control-output out)"; fi
expect_in control-output control-quiet 3 '^quiet-guest'
if grep -q '^lkvm:' "$(result control-output out)"; then fail control-quiet-silent "lkvm printed its own lines with --quiet" "$(result control-output out)"
else pass control-quiet-silent; fi
expect kvm-max-cpus 1 '^lkvm: -c 255: (this host.s KVM|lkvm) runs at most [0-9]+ vCPUs in one guest'

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
refuse scsi-disk-missing 'disk /nonexistent.raw: No such file' run -d /nonexistent.raw,bus=scsi
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
