# The gdb side of the system test "gdb" (tests/system/run.sh): run as
#   gdb -batch -nx -x tests/system/gdb_session.py
# with LKVM_GDB_PORT, and the guest's own kallsyms addresses of linux_banner
# and init_uts_ns in LKVM_BANNER and LKVM_UTS. Prints key=value lines for
# run.sh to check; the guest is waiting for its hostname to change.
import os

import gdb


def say(key, value):
    print("%s=%s" % (key, value), flush=True)


gdb.execute("set pagination off")
gdb.execute("target remote 127.0.0.1:%s" % os.environ["LKVM_GDB_PORT"])
inferior = gdb.selected_inferior()
threads = sorted(inferior.threads(), key=lambda t: t.num)
# Each vCPU a thread, named as lkvm names it (qThreadExtraInfo).
for line in gdb.execute("info threads", to_string=True).splitlines():
    if "(vCPU " in line:
        say("thread", line.split("(")[1].split(")")[0])

# Memory by virtual address, through the stopped vCPU's page tables: the
# kernel's banner, as the guest's /proc/version prints it.
banner = bytes(inferior.read_memory(int(os.environ["LKVM_BANNER"], 16), 64)).split(b"\0")[0]
say("banner", banner.decode("ascii", "replace").strip())
say("cr3_nonzero", int(int(gdb.parse_and_eval("$cr3")) != 0))

# One instruction on a vCPU that is not halted (a step over hlt would wait for
# an interrupt that stepping holds off): the pc moves on, nowhere else.
stepped = None
for t in threads:
    t.switch()
    pc = int(gdb.parse_and_eval("$pc"))
    before = bytes(inferior.read_memory(pc - 1, 1))
    if before != b"\xf4":
        stepped = (t.num, pc)
        break
if stepped:
    gdb.execute("stepi")
    after = int(gdb.parse_and_eval("$pc"))
    say("stepi", "thread %d moved %s" % (stepped[0], "yes" if after != stepped[1] else "no"))
    say("stepi_stayed_on_thread", int(gdb.selected_thread().num == stepped[0]))
else:
    say("stepi", "every vCPU halted")

# A write: the guest's hostname, in init_uts_ns; the guest waits for it.
uts = int(os.environ["LKVM_UTS"], 16)
found = inferior.search_memory(uts, 1024, b"lkvm-gdb-marker")
say("marker_found", int(found is not None))
if found is not None:
    inferior.write_memory(found, b"gdb-wrote-this\0")
    say("marker_after", bytes(inferior.read_memory(found, 15)).split(b"\0")[0].decode())
gdb.execute("detach")
say("detached", 1)
