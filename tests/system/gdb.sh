# The system tests "gdb" and "gdb-breakpoints" (tests/system/run.sh), run
# inside the rig's L1 or on a host with KVM: Debian's gdb against lkvm's stub
# and the Debian kernel, booted with nokaslr.
#
# gdb.sh session: the guest names itself lkvm-gdb-marker, prints its kallsyms
# addresses and waits (up to 300 s) until its hostname changes;
# gdb_session.py connects, reads the banner through the page tables, steps a
# vCPU, writes the hostname in the guest's memory and detaches; the guest
# then prints it and exits 3.
#
# gdb.sh breakpoints: the guest waits for its hostname to become each
# gdb-armed-* in turn and then makes the call gdb_breakpoints.py set a
# breakpoint or watchpoint for (sync: int3; sync -f: a debug register;
# hostname: a write watchpoint), then exits 3 once gdb has let it go. The
# rig's L1 is QEMU's TCG, which does not hand these traps to the L2
# hypervisor: there an int3 lkvm placed reaches the guest's own handler (an
# "int3: 0000" oops) and a debug-register breakpoint never fires (seen in
# the rig, 2026-12-04). So on a TCG CPU this mode says so and exits 77,
# which run.sh reports as skipped. Everywhere else (hardware KVM) it runs in
# full.
#
# lkvm's own lines (stderr) go to a file apart from the guest's console
# (stdout): "gdb disconnected" comes as the guest prints its hostname, and
# in one file it can land in the middle of that line.
# Usage: LKVM=build/lkvm bash gdb.sh session|breakpoints
here=$(cd "$(dirname "$0")" && pwd)
mode=${1:?session or breakpoints}
if [ "$mode" = breakpoints ] && grep -q 'QEMU TCG CPU' /proc/cpuinfo; then
    echo "skipped: this host's CPU is QEMU's TCG, which does not deliver #BP and #DB intercepts to a nested guest"
    exit 77
fi
ip link set lo up 2> /dev/null  # the rig's L1 starts with loopback down
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -p "${XDG_RUNTIME_DIR:-/tmp}")  # the rig: L1's tmpfs, not 9p
if [ "$mode" = session ]; then
    guest='grep -w -e linux_banner -e init_uts_ns /proc/kallsyms; echo kallsyms-done
(while :; do :; done) &
end=$(($(date +%s) + 300))
while [ "$(hostname)" = lkvm-gdb-marker ] && [ $(date +%s) -lt $end ]; do sleep 0.2; done
echo "guest-hostname=$(hostname)"; exit 3'
else
    guest='grep -w -e init_uts_ns -e __x64_sys_sync -e __x64_sys_syncfs /proc/kallsyms; echo kallsyms-done
wait_for() { end=$(($(date +%s) + 300)); while [ "$(hostname)" != $1 ] && [ $(date +%s) -lt $end ]; do sleep 0.2; done; echo "guest-saw=$(hostname)"; }
wait_for gdb-armed-sw; sync; echo sync=$?
wait_for gdb-armed-hw; sync -f /; echo syncfs=$?
wait_for gdb-armed-wp; hostname lkvm-watched; echo "hostname=$(hostname)"; exit 3'
fi
"$LKVM" run --gdb "$port" -c 2 -p nokaslr -- sh -c "hostname lkvm-gdb-marker
$guest" > "$log" 2> "$log.err" &
pid=$!
for _ in $(seq 600); do grep -q kallsyms-done "$log" && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
symbol() { tr -d '\r' < "$log" | sed -n "s/^\([0-9a-f]*\) [dDrRtT] $1\$/\1/p"; }
export LKVM_GDB_PORT=$port LKVM_BANNER=$(symbol linux_banner) LKVM_UTS=$(symbol init_uts_ns) \
    LKVM_SYNC=$(symbol __x64_sys_sync) LKVM_SYNCFS=$(symbol __x64_sys_syncfs)
echo "kallsyms: linux_banner=$LKVM_BANNER init_uts_ns=$LKVM_UTS __x64_sys_sync=$LKVM_SYNC __x64_sys_syncfs=$LKVM_SYNCFS"
timeout 300 gdb -batch -nx -x "$here/gdb_$mode.py" 2>&1 | grep -v "No executable has been specified\|determining executable automatically"
wait $pid
status=$?
cat "$log.err"
tr -d '\r' < "$log"
rm -f "$log" "$log.err"
exit $status
