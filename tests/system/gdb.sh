# The system test "gdb" (tests/system/run.sh), run inside the rig's L1 or on
# a host with KVM: Debian's gdb against lkvm's stub and the Debian kernel.
# The guest names itself lkvm-gdb-marker, prints its kallsyms addresses and
# waits (up to 300 s) until its hostname changes; gdb_session.py connects,
# reads the banner through the page tables, steps a vCPU, writes the hostname
# in the guest's memory and detaches; the guest then prints it and exits 3.
# Hardware breakpoints, watchpoints and int3 breakpoints are not exercised
# here: the rig's QEMU TCG does not deliver them to an L2 guest (see the
# unit tests, which cover them below KVM).
# lkvm's own lines (stderr) go to a file apart from the guest's console
# (stdout): "gdb disconnected" comes as the guest prints its hostname, and
# in one file it can land in the middle of that line.
# Usage: LKVM=build/lkvm bash gdb.sh
here=$(cd "$(dirname "$0")" && pwd)
ip link set lo up 2> /dev/null  # the rig's L1 starts with loopback down
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -p "${XDG_RUNTIME_DIR:-/tmp}")  # the rig: L1's tmpfs, not 9p
"$LKVM" run --gdb "$port" -c 2 -p nokaslr -- sh -c 'hostname lkvm-gdb-marker
grep -w -e linux_banner -e init_uts_ns /proc/kallsyms; echo kallsyms-done
(while :; do :; done) &
end=$(($(date +%s) + 300))
while [ "$(hostname)" = lkvm-gdb-marker ] && [ $(date +%s) -lt $end ]; do sleep 0.2; done
echo "guest-hostname=$(hostname)"; exit 3' > "$log" 2> "$log.err" &
pid=$!
for _ in $(seq 600); do grep -q kallsyms-done "$log" && break; kill -0 $pid 2> /dev/null || break; sleep 0.5; done
symbol() { tr -d '\r' < "$log" | sed -n "s/^\([0-9a-f]*\) [dDrR] $1\$/\1/p"; }
export LKVM_GDB_PORT=$port LKVM_BANNER=$(symbol linux_banner) LKVM_UTS=$(symbol init_uts_ns)
echo "kallsyms: linux_banner=$LKVM_BANNER init_uts_ns=$LKVM_UTS"
timeout 300 gdb -batch -nx -x "$here/gdb_session.py" 2>&1 | grep -v "No executable has been specified\|determining executable automatically"
wait $pid
status=$?
cat "$log.err"
tr -d '\r' < "$log"
rm -f "$log" "$log.err"
exit $status
