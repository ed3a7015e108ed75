# The gdb side of the system test "gdb-breakpoints" (tests/system/gdb.sh
# breakpoints): run as
#   gdb -batch -nx -x tests/system/gdb_breakpoints.py
# with LKVM_GDB_PORT, and the guest's own kallsyms addresses of init_uts_ns,
# __x64_sys_sync and __x64_sys_syncfs in LKVM_UTS, LKVM_SYNC and LKVM_SYNCFS.
# The guest waits for its hostname to become each gdb-armed-* in turn and
# then makes the call gdb is waiting for: sync (an int3 breakpoint), sync -f
# (a debug-register breakpoint), hostname (a write watchpoint on its own
# nodename), then exits. Prints key=value lines for run.sh to check.
import os
import re

import gdb


def say(key, value):
    print("%s=%s" % (key, value), flush=True)


def current_vcpu():
    for line in gdb.execute("info threads", to_string=True).splitlines():
        if line.startswith("*") and "(vCPU " in line:
            return line.split("(")[1].split(")")[0]
    return "none"


def raw_read(addr, length):
    """The stub's own answer to 'm', past gdb's shadowing of its breakpoints."""
    reply = gdb.execute("maint packet m%x,%x" % (addr, length), to_string=True)
    return re.search(r'received: "([0-9a-f]*)"', reply).group(1)


def signal_guest(hostname):
    """Rewrites the guest's nodename, which the guest polls, and lets it run."""
    inferior.write_memory(nodename, hostname.encode() + b"\0")
    return gdb.execute("continue", to_string=True)


gdb.execute("set pagination off")
# Breakpoints stay in guest memory while it is stopped, so that a raw read
# shows whether the stub hides its int3 bytes.
gdb.execute("set breakpoint always-inserted on")
gdb.execute("target remote 127.0.0.1:%s" % os.environ["LKVM_GDB_PORT"])
inferior = gdb.selected_inferior()
sync = int(os.environ["LKVM_SYNC"], 16)
syncfs = int(os.environ["LKVM_SYNCFS"], 16)
nodename = inferior.search_memory(int(os.environ["LKVM_UTS"], 16), 1024, b"lkvm-gdb-marker")
say("marker_found", int(nodename is not None))

# An int3 breakpoint on the sync system call.
original = bytes(inferior.read_memory(sync, 8)).hex()
gdb.execute("break *0x%x" % sync)
say("sw_raw_before_hit_is_original", int(raw_read(sync, 8) == original))
signal_guest("gdb-armed-sw")
pc = int(gdb.parse_and_eval("$pc"))
say("sw_hit_vcpu", current_vcpu())
say("sw_pc_is_symbol", int(pc == sync))
say("sw_rip_register_is_symbol", int(int(gdb.execute("info registers rip", to_string=True).split()[1], 16) == sync))
shown = gdb.execute("x/8xb 0x%x" % sync, to_string=True)
say("sw_x8xb_is_original", int("".join(b[2:] for b in re.findall(r"0x[0-9a-f]{2}\b", shown.split(":", 1)[1])) == original))
say("sw_raw_at_hit_is_original", int(raw_read(sync, 8) == original))
# One instruction on from the breakpoint, on the vCPU that hit it.
vcpu = current_vcpu()
gdb.execute("stepi")
say("stepi_from_breakpoint_moved", int(int(gdb.parse_and_eval("$pc")) != sync))
say("stepi_same_vcpu", int(current_vcpu() == vcpu))
gdb.execute("delete")

# A hardware breakpoint (a debug register) on syncfs.
gdb.execute("hbreak *0x%x" % syncfs)
signal_guest("gdb-armed-hw")
say("hw_hit_vcpu", current_vcpu())
say("hw_pc_is_symbol", int(int(gdb.parse_and_eval("$pc")) == syncfs))
gdb.execute("delete")

# A write watchpoint on the guest's own nodename, which 'hostname' rewrites.
inferior.write_memory(nodename, b"gdb-armed-wp\0")
gdb.execute("watch *(long *)0x%x" % nodename)
stop = gdb.execute("continue", to_string=True)
say("watch_hit_vcpu", current_vcpu())
say("watch_reported", int("atchpoint" in stop and "New value" in stop))
# The trap comes after the store: the watched bytes are no longer gdb's.
say("watch_saw_store", int(bytes(inferior.read_memory(nodename, 8)) != b"gdb-arme"))
gdb.execute("delete")

# The guest finishes its hostname call and exits.
gdb.execute("detach")
say("detached", 1)
