#!/usr/bin/env python3
# Writes the seed corpora, tests/fuzz/corpus/<target>/, in the input formats
# each target's header comment describes: a few small inputs that reach past
# the first checks (a bzImage header, a probed virtio-pci device, a chain on a
# valid ring), so a short run starts from the interesting paths. Run it again
# after changing a target's input format.
import os
import struct

top = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def seed(target, name, data):
    d = os.path.join(top, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


# ---- chain: header, ops, then memory (region A at 0, 2048 bytes; B at 2048, 1024).
NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def chain_input(qsize, descs, heads, flags=0, ops=b"", extra=()):
    desc_at, avail_at, used_at = 0, 16 * qsize, 16 * qsize + 8 + 2 * qsize
    used_at = (used_at + 3) & ~3
    mem = bytearray(1024)
    for i, d in enumerate(descs):
        mem[desc_at + 16 * i:desc_at + 16 * i + 16] = d
    mem[avail_at:avail_at + 4] = struct.pack("<HH", 0, len(heads))
    for i, h in enumerate(heads):
        mem[avail_at + 4 + 2 * i:avail_at + 6 + 2 * i] = struct.pack("<H", h)
    for at, data in extra:
        mem[at:at + len(data)] = data
    header = struct.pack("<HBBHHHHB", qsize, flags, 0, 0, desc_at, avail_at, used_at, len(ops) // 5)
    return header + ops + bytes(mem)


pop = struct.pack("<BHH", 0, 0, 0)
seed("chain", "blk-read", chain_input(4, [desc(0x300, 16, NEXT, 1), desc(0x400, 512, WRITE | NEXT, 2),
                                          desc(0x900, 1, WRITE)], [0], ops=pop))
seed("chain", "indirect", chain_input(4, [desc(0x200, 32, INDIRECT)], [0],
                                      extra=[(0x200, desc(0x880, 16, NEXT, 1) + desc(0x8c0, 64, WRITE))]))
seed("chain", "event-idx", chain_input(8, [desc(0x300, 16), desc(0x310, 16, WRITE)], [0, 1], flags=1,
                                       ops=pop + struct.pack("<BHH", 2, 0, 0) + pop + struct.pack("<BHH", 3, 0, 0)))
seed("chain", "loop", chain_input(2, [desc(0x300, 16, NEXT, 1), desc(0x310, 16, NEXT, 0)], [0]))

# ---- blk: u64 capacity, u8 read-only, u8 readable, u8 writable, buffers.


def blk(readable, writable, capacity=2048, ro=0):
    out = struct.pack("<QBBB", capacity, ro, len(readable), len(writable))
    for data in readable:
        out += struct.pack("<H", len(data)) + data
    for length in writable:
        out += struct.pack("<H", length)
    return out


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


seed("blk", "in", blk([blk_header(0, 0)], [512, 1]))
seed("blk", "out", blk([blk_header(1, 2047), bytes(512)], [1]))
seed("blk", "out-ro", blk([blk_header(1, 0) + bytes(512)], [1], ro=1))
seed("blk", "get-id", blk([blk_header(8, 0)], [21]))
seed("blk", "short-header", blk([b"\0" * 8], [1]))

# ---- scsi: op 0 = a command: LUN, CDB, data-in bytes, data-out bytes and buffers, data.


def lun(n):
    return bytes([1, 0, n >> 8 | (0x40 if n >= 256 else 0), n & 0xff, 0, 0, 0, 0])


def cmd(cdb, data_in=0, data_out=b"", to=0, buffers=1):
    return (bytes([0]) + lun(to) + bytes([len(cdb)]) + bytes(cdb) +
            struct.pack("<IHB", data_in, len(data_out), buffers - 1) + data_out)


RESET, NEXUS = bytes([2]), bytes([3])
seed("scsi", "scan", cmd([0x12, 0, 0, 0, 36, 0], 36) + cmd([0x12, 1, 0x83, 0, 255, 0], 255, to=1) +
     cmd([0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256) + cmd([0x9e, 0x10] + [0] * 11 + [32, 0, 0], 32, to=256) +
     cmd([0x12, 0, 0, 0, 36, 0], 36, to=7))
seed("scsi", "read-write", cmd([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512) +
     cmd([0x2a, 0x08, 0, 0, 0, 1, 0, 0, 1, 0], 0, bytes(range(256)) * 2, buffers=3) +
     cmd([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, bytes(512), to=1))
seed("scsi", "mode", cmd([0x1a, 0, 0x3f, 0, 255, 0], 255) +
     cmd([0x15, 0x10, 0, 0, 24, 0], 0, bytes([0, 0, 0, 0, 0x08, 0x12]) + bytes(18)) +
     cmd([0x5a, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0], 255))
seed("scsi", "unmap-same", cmd([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], 0,
                               struct.pack(">HH4xQI4x", 22, 16, 8, 8)) +
     cmd([0x93, 0x08] + [0] * 8 + [0, 0, 0, 16, 0, 0], 0, bytes(512)))
seed("scsi", "unit-attention", RESET + cmd([0x00] * 6) + cmd([0x03, 0, 0, 0, 18, 0], 18) + NEXUS +
     cmd([0x25] + [0] * 9, 8))

# ---- virtio_pci: u8 queues - 1, u8 flags, then 12-byte ops (op, offset, size code, value).
SIZE = {1: 0, 2: 1, 4: 2, 8: 3}


def op(kind, offset, size, value=0):
    return struct.pack("<BHBQ", kind, offset, SIZE[size], value)


def bar(offset, size, value):
    return op(0, offset, size, value)


def config(offset, size, value):
    return op(2, offset, size, value)


MSIX_CONTROL = 0x86  # capabilities from 0x40: common, ISR, device (16 bytes each), notify (20), MSI-X
probe = (bar(0x14, 1, 1) + bar(0x14, 1, 3) + bar(0x08, 4, 1) + bar(0x0c, 4, 1) + bar(0x08, 4, 0) +
         bar(0x0c, 4, 0x30000000) + bar(0x14, 1, 0xb) + bar(0x10, 2, 0) + bar(0x16, 2, 0) + bar(0x1a, 2, 1) +
         bar(0x18, 2, 16) + bar(0x20, 4, 0x1000) + bar(0x28, 4, 0x2000) + bar(0x30, 4, 0x3000) +
         bar(0x1c, 2, 1) + bar(0x14, 1, 0xf))
msix = (config(MSIX_CONTROL, 2, 0x8000) + bar(0x4000, 8, 0xfee00000) + bar(0x4008, 4, 0x20) + bar(0x400c, 4, 0) +
        bar(0x4010, 8, 0xfee00000) + bar(0x4018, 4, 0x21) + bar(0x401c, 4, 1))
seed("virtio_pci", "probe-msix", bytes([1, 0]) + config(4, 2, 6) + msix + probe + op(7, 0, 1) + bar(0x3000, 2, 0) +
     op(1, 0x5000, 8) + bar(0x401c, 4, 0) + op(8, 0, 1) + op(1, 0x14, 1) + bar(0x14, 1, 0))
seed("virtio_pci", "probe-intx-pio", bytes([0, 3]) + config(4, 2, 7) + probe + op(6, 0, 2) + op(7, 0, 1) +
     op(1, 0x1000, 1) + op(8, 0, 1) + bar(0x14, 1, 3))
seed("virtio_pci", "bar-moves", bytes([2, 1]) + op(4, 0, 4, 0x80000810) + op(4, 4, 4, 0xffffffff) + op(5, 4, 4) +
     op(4, 0, 4, 0x80000804) + op(4, 4, 2, 7) + op(4, 0, 4, 0x80000818) + op(4, 4, 4, 0x7000) +
     op(9, 0, 1, 1) + config(0x10, 4, 0xd0000000) + op(9, 0, 1, 0) + config(4, 2, 0))

# ---- control: one line, a request or a reply.
seed("control", "info", '{"execute": "info"}')
seed("control", "stat-id", '{"execute": "stat", "id": [1, "a"]}')
seed("control", "throttle", '{"execute": "throttle", "arguments": {"target": "0", "limits": {"iops": 500, "bps-wr": 1048576}}}')
seed("control", "subscribe", '{"execute": "subscribe"}')
seed("control", "reply-info",
     '{"return": {"name": "g", "state": "running", "pid": 42, "vcpus": 2, "mem_mib": 512, "disks": ["a.raw", "b c.raw"]}}')
seed("control", "reply-stat",
     '{"return": {"time_ns": 5, "threads": [{"name": "iothread0", "tid": 7, "cpu": 0, "requests": 1, "bytes": 2, '
     '"batches": 1, "wakeups": 1, "poll_hits": 0, "poll_ns": 0, "latency": [[3, 1]]}], "queues": [{"disk": 0, "queue": 0, '
     '"thread": "iothread0", "image": "a.raw", "cpu": 1, "requests": 3, "bytes": 4, "in_flight": 0, '
     '"latency": [[3, 1], [5, 2]], "kicks": 1, "interrupts": 1, "errors": 0, "throttled_ns": 0, "flushes": 0}], '
     '"vcpus": [{"vcpu": 0, "exits": 9, "io_exits": 1, "insn_emulation": 2}]}}')
seed("control", "reply-error", '{"error": {"class": "GenericError", "desc": "no such guest"}}')
seed("control", "event", '{"event": "paused", "timestamp": {"seconds": 1, "microseconds": 2}, "data": {}}')
seed("control", "greeting", '{"lkvm": {"version": "0.1.0", "capabilities": ["events"]}}')

# ---- cli: a -d or --iothreads value, or lkvm's arguments one per line.
seed("cli", "disk", "disk.raw,ro,direct,aio=io_uring,serial=S1,num-queues=2,iothread=0+1,ioprio=be/3,notify=mmio")
seed("cli", "iothreads", "2,affinity=0-1,3,poll-max-ns=0,poll-grow=2,poll-shrink=0,aio-max-batch=32,sched=idle")
seed("cli", "run", "run\n-c\n2\n--iothreads\n2\n-d\na.raw,bus=scsi,controller=c0,lun=0,rotation-rate=1\n"
     "-d\nb.raw,bus=scsi,controller=c0,lun=1,ro,discard=ignore\n--scsi-controller\nc0,num-queues=2,iothread=1\n"
     "-d\nc.raw,num-queues=4,notify=pio\n--\nsh\n-c\ntrue")
seed("cli", "stat", "stat\nguest-1\n--disks\n--json\n--watch\n0.5")

# ---- gdb: the bytes gdb sends over the connection.


def rsp(payload):
    return "$%s#%02x" % (payload, sum(payload.encode("latin1")) & 255)


seed("gdb", "session", "+" + "".join(rsp(p) for p in (
    "qSupported:multiprocess+;swbreak+;hwbreak+", "?", "qfThreadInfo", "Hg2", "g", "m100,8", "Z0,100,1", "vCont;c")))
seed("gdb", "registers", rsp("p10") + rsp("P10=1000000000000000") + rsp("qXfer:features:read:target.xml:0,ffb"))
seed("gdb", "watch", rsp("Z2,200,8") + rsp("Z4,210,4") + rsp("s") + rsp("z2,200,8") + "\x03" + rsp("D"))
seed("gdb", "binary", (rsp("X100,4:ab}\x03cd") + rsp("M100,2:9090")).encode("latin1"))

# ---- bzimage: a kernel image; the setup header at 0x1f1.


def bzimage(setup_sects=1, version=0x020f, loadflags=1, xloadflags=1, jump=0x6a, kernel=512, init_size=0x10000):
    image = bytearray((max(setup_sects, 1) if setup_sects else 4) * 512 + 512 + kernel)
    image[0x1f1] = setup_sects
    struct.pack_into("<H", image, 0x1fe, 0xaa55)
    image[0x200:0x202] = bytes([0xeb, jump])
    struct.pack_into("<IH", image, 0x202, 0x53726448, version)
    image[0x211] = loadflags
    struct.pack_into("<I", image, 0x22c, 0x7fffffff)
    struct.pack_into("<HI", image, 0x236, xloadflags, 2047)
    struct.pack_into("<I", image, 0x260, init_size)
    return bytes(image)


seed("bzimage", "valid", bzimage())
seed("bzimage", "setup-sects-0", bzimage(setup_sects=0))
seed("bzimage", "short-header", bzimage(jump=0x10))
seed("bzimage", "old-protocol", bzimage(version=0x0206))
seed("bzimage", "huge-init-size", bzimage(init_size=0xffffffff))
