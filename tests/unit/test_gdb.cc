// The gdb stub below KVM: packet framing, the commands over a fake VM, the
// page walker it reads guest memory through, and the gate's debugger stops.
#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "hw/guest_memory.h"
#include "kvm/gdb_packet.h"
#include "kvm/gdb_stub.h"
#include "kvm/page_walk.h"
#include "kvm/vcpu_gate.h"

using namespace lkvm;

namespace {
std::vector<GdbInput> decode(std::string_view bytes)
{
    GdbDecoder decoder;
    std::vector<GdbInput> out;
    decoder.feed({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, out);
    return out;
}

// A VM of `vcpus` vCPUs whose virtual memory is flat (gva = offset in `memory`).
struct FakeVm : GdbTarget {
    unsigned vcpus = 2;
    std::vector<X86Registers> regs = std::vector<X86Registers>(2);
    std::vector<uint8_t> memory = std::vector<uint8_t>(0x10000);
    uint64_t base = 0xffffffff81000000ull;  // where memory starts, as a kernel's text
    std::vector<std::pair<GuestDebugSetup, int>> runs;
    std::vector<unsigned> reinjected;
    int interrupts = 0, ended = 0;

    unsigned vcpu_count() const override { return vcpus; }
    bool get_registers(unsigned v, X86Registers& out) override { return v < vcpus && (out = regs[v], true); }
    bool set_registers(unsigned v, const X86Registers& in) override { return v < vcpus && (regs[v] = in, true); }
    size_t read_virtual(unsigned, uint64_t gva, std::span<uint8_t> out) override
    {
        if (gva < base || gva - base >= memory.size())
            return 0;
        const size_t n = std::min<size_t>(out.size(), memory.size() - (gva - base));
        std::memcpy(out.data(), memory.data() + (gva - base), n);
        return n;
    }
    size_t write_virtual(unsigned, uint64_t gva, std::span<const uint8_t> in) override
    {
        if (gva < base || gva - base >= memory.size())
            return 0;
        const size_t n = std::min<size_t>(in.size(), memory.size() - (gva - base));
        std::memcpy(memory.data() + (gva - base), in.data(), n);
        return n;
    }
    void run_guest(const GuestDebugSetup& debug, int step) override { runs.emplace_back(debug, step); }
    void reinject_breakpoint(unsigned v) override { reinjected.push_back(v); }
    void interrupt() override { ++interrupts; }
    void end_guest() override { ++ended; }
};

std::string hex_of(uint64_t v)
{
    char text[20];
    std::snprintf(text, sizeof(text), "%llx", static_cast<unsigned long long>(v));
    return text;
}
}  // namespace

TEST_CASE("gdb packets: framing, checksums, escapes, acks and Ctrl-C")
{
    SUBCASE("a packet, acks and an interrupt between packets")
    {
        const auto in = decode("+$g#67-\x03$m0,4#fd");
        REQUIRE(in.size() == 5);
        CHECK(in[0].kind == GdbInput::Kind::kAck);
        CHECK(in[1].kind == GdbInput::Kind::kPacket);
        CHECK(in[1].payload == "g");
        CHECK(in[2].kind == GdbInput::Kind::kNack);
        CHECK(in[3].kind == GdbInput::Kind::kInterrupt);
        CHECK(in[4].kind == GdbInput::Kind::kPacket);
        CHECK(in[4].payload == "m0,4");
    }
    SUBCASE("a wrong or malformed checksum is a bad packet, and the next one still decodes")
    {
        for (const char* bad : {"$g#00", "$g#6", "$g#zz"}) {
            CAPTURE(bad);
            const auto in = decode(std::string(bad) + "+$g#67");
            REQUIRE(in.size() >= 2);
            CHECK(in.front().kind == GdbInput::Kind::kBadPacket);
            CHECK(in.back().kind == GdbInput::Kind::kPacket);
        }
    }
    SUBCASE("a packet split across reads")
    {
        GdbDecoder decoder;
        std::vector<GdbInput> out;
        for (const char c : std::string("$qC#b4"))
            decoder.feed(std::span(reinterpret_cast<const uint8_t*>(&c), 1), out);
        REQUIRE(out.size() == 1);
        CHECK(out[0].payload == "qC");
    }
    SUBCASE("escapes: gdb_frame's output decodes to what went in")
    {
        const std::string payload = std::string("X0,4:") + "$#}*" + '\0';
        const std::string framed = gdb_frame(payload);
        CHECK(framed.find("$#}*") == std::string::npos);  // escaped on the wire
        const auto in = decode(framed);
        REQUIRE(in.size() == 1);
        CHECK(in[0].kind == GdbInput::Kind::kPacket);
        CHECK(in[0].payload == payload);
    }
    SUBCASE("a packet longer than we take is refused, not kept whole")
    {
        const std::string huge = gdb_frame(std::string(kGdbMaxPacket + 100, 'a'));
        const auto in = decode(huge);
        REQUIRE(in.size() == 1);
        CHECK(in[0].kind == GdbInput::Kind::kBadPacket);
    }
    SUBCASE("a lone escape at the end is a bad packet")
    {
        const auto in = decode("$}#7d");
        REQUIRE(in.size() == 1);
        CHECK(in[0].kind == GdbInput::Kind::kBadPacket);
    }
    SUBCASE("hex")
    {
        std::vector<uint8_t> bytes;
        CHECK(from_hex("00ff7A", bytes));
        CHECK(bytes == std::vector<uint8_t>{0, 0xff, 0x7a});
        CHECK(to_hex(bytes) == "00ff7a");
        CHECK_FALSE(from_hex("0", bytes));
        CHECK_FALSE(from_hex("0g", bytes));
        uint64_t n;
        CHECK(parse_hex_number("ffffffff81000000", n));
        CHECK(n == 0xffffffff81000000ull);
        CHECK_FALSE(parse_hex_number("", n));
        CHECK_FALSE(parse_hex_number("1ffffffffffffffff", n));  // more than 64 bits
        CHECK_FALSE(parse_hex_number("-1", n));
    }
}

TEST_CASE("gdb stub: threads, registers and the target description")
{
    FakeVm vm;
    GdbStub stub(vm);
    CHECK(stub.handle("qSupported:multiprocess+;swbreak+").value().find("qXfer:features:read+") != std::string::npos);
    CHECK(stub.handle("qfThreadInfo") == "m1,2");
    CHECK(stub.handle("qsThreadInfo") == "l");
    CHECK(stub.handle("T2") == "OK");
    CHECK(stub.handle("T3") == "E16");  // no such vCPU
    CHECK(stub.handle("?") == "T05thread:1;");
    CHECK(stub.handle("vMustReplyEmpty") == "");
    CHECK(stub.handle("Hg3") == "E16");

    SUBCASE("g is every register in gdb's order, of the thread Hg picked")
    {
        vm.regs[1].gpr[0] = 0x1122334455667788ull;  // rax
        vm.regs[1].gpr[7] = 0xffffc90000001000ull;  // rsp
        vm.regs[1].rip = 0xffffffff81000010ull;
        vm.regs[1].cr3 = 0x1234000;
        REQUIRE(stub.handle("Hg2") == "OK");
        const std::string g = stub.handle("g").value();
        size_t bytes = 0;
        for (unsigned n = 0; n < GdbStub::register_count(); ++n)
            bytes += GdbStub::register_bytes(vm.regs[1], n).size();
        CHECK(g.size() == 2 * bytes);
        CHECK(g.substr(0, 16) == "8877665544332211");  // little-endian
        CHECK(stub.handle("p10") == "10000081ffffffff");   // register 16: rip
        CHECK(stub.handle("p7") == "0010000000c9ffff");    // rsp
        CHECK(stub.handle("p3d") == "0040230100000000");   // 61: cr3, after cr0 and cr2
        CHECK(stub.handle("p41") == "E16");                // past the last
        // P writes one register; G writes them all back.
        CHECK(stub.handle("P10=20000081ffffffff") == "OK");
        CHECK(vm.regs[1].rip == 0xffffffff81000020ull);
        CHECK(stub.handle("P10=20") == "E16");  // wrong size
        CHECK(stub.handle("G" + g) == "OK");
        CHECK(vm.regs[1].rip == 0xffffffff81000010ull);
        CHECK(stub.handle("G" + g.substr(2)) == "E16");
        CHECK(vm.regs[0].rip == 0);  // the other vCPU untouched
    }
    SUBCASE("the target description names the registers in the order g has them")
    {
        std::string xml;
        for (uint64_t offset = 0;;) {
            const std::string part = stub.handle("qXfer:features:read:target.xml:" + hex_of(offset) + ",100").value();
            REQUIRE(!part.empty());
            xml += part.substr(1);
            offset += part.size() - 1;
            if (part[0] == 'l')
                break;
            REQUIRE(part[0] == 'm');
        }
        CHECK(xml == GdbStub::target_xml());
        CHECK(xml.find("<architecture>i386:x86-64</architecture>") != std::string::npos);
        const size_t rax = xml.find("name=\"rax\""), rip = xml.find("name=\"rip\""), gs = xml.find("name=\"gs\""),
                     st0 = xml.find("name=\"st0\""), xmm15 = xml.find("name=\"xmm15\""), cr3 = xml.find("name=\"cr3\"");
        CHECK(rax < rip);
        CHECK(rip < gs);
        CHECK(gs < st0);
        CHECK(st0 < xmm15);
        CHECK(xmm15 < cr3);
        size_t regs = 0;
        for (size_t at = xml.find("<reg "); at != std::string::npos; at = xml.find("<reg ", at + 1))
            ++regs;
        CHECK(regs == GdbStub::register_count());
        CHECK(stub.handle("qXfer:features:read:other.xml:0,100") == "E00");
    }
}

TEST_CASE("gdb stub: memory, and software breakpoints that reads never show")
{
    FakeVm vm;
    GdbStub stub(vm);
    const uint64_t text = vm.base + 0x100;
    const uint8_t original[8] = {0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5};
    std::memcpy(vm.memory.data() + 0x100, original, sizeof(original));
    const std::string text_hex = hex_of(text);

    CHECK(stub.handle("m" + text_hex + ",8") == "f30f1efa554889e5");
    CHECK(stub.handle("m10,8") == "E0e");  // not mapped
    CHECK(stub.handle("m" + hex_of(vm.base + vm.memory.size() - 2) + ",8") == "0000");  // a prefix
    CHECK(stub.handle("mzz,8") == "E16");

    REQUIRE(stub.handle("Z0," + text_hex + ",1") == "OK");
    CHECK(vm.memory[0x100] == 0xcc);                                   // an int3 in the guest
    CHECK(stub.handle("m" + text_hex + ",8") == "f30f1efa554889e5");  // not in what gdb reads
    CHECK(stub.debug_setup().software_breakpoints);
    // A write across the breakpoint changes what the int3 hides, not the int3.
    CHECK(stub.handle("M" + text_hex + ",2:9090") == "OK");
    CHECK(vm.memory[0x100] == 0xcc);
    CHECK(vm.memory[0x101] == 0x90);
    CHECK(stub.handle("m" + text_hex + ",2") == "9090");
    CHECK(stub.handle("X" + text_hex + ",1:\x66") == "OK");  // binary
    CHECK(stub.handle("m" + text_hex + ",1") == "66");
    CHECK(stub.handle("M" + text_hex + ",2:90") == "E16");  // length and data disagree
    REQUIRE(stub.handle("z0," + text_hex + ",1") == "OK");
    CHECK(vm.memory[0x100] == 0x66);
    CHECK_FALSE(stub.debug_setup().software_breakpoints);
    CHECK(stub.handle("Z0,10,1") == "E0e");  // nowhere to put it
}

TEST_CASE("gdb stub: a watched range that is not one aligned piece takes a debug register per piece")
{
    // gdb sends what `watch` names, aligned or not (a uts nodename at +0x41, 8 bytes).
    FakeVm vm;
    GdbStub stub(vm);
    CHECK(stub.handle("Z2,ffffffff82000041,8") == "OK");
    GuestDebugSetup setup = stub.debug_setup();
    CHECK(setup.dr[0] == 0xffffffff82000041ull);  // 1 byte
    CHECK(setup.dr[1] == 0xffffffff82000042ull);  // 2 bytes
    CHECK(setup.dr[2] == 0xffffffff82000044ull);  // 4 bytes
    CHECK(setup.dr[3] == 0xffffffff82000048ull);  // 1 byte
    CHECK((setup.dr7 & 0xff) == 0xaa);
    CHECK(((setup.dr7 >> 16) & 0xffff) == 0x1d51);  // LEN 1, 2, 4, 1 bytes; RW write each
    CHECK(stub.handle("Z1,ffffffff81000100,1") == "E1c");  // all four registers taken
    CHECK(stub.handle("Z2,ffffffff82000041,8") == "OK");   // the same range again: already there
    CHECK(stub.handle("z2,ffffffff82000041,8") == "OK");  // removes every piece
    CHECK((stub.debug_setup().dr7 & 0xff) == 0);
    CHECK(stub.handle("Z2,ffffffff82000041,7") == "OK");  // 1 + 2 + 4 bytes
    CHECK((stub.debug_setup().dr7 & 0xff) == 0x2a);
    CHECK(stub.handle("Z4,ffffffff82000100,10") == "E1c");  // 8 + 8: one register left
    CHECK(stub.handle("Z4,ffffffff82000100,8") == "OK");
    CHECK(stub.handle("Z2,ffffffffffffffff,2") == "E16");  // past the top of the address space
}

TEST_CASE("gdb stub: hardware breakpoints and watchpoints in the debug registers")
{
    FakeVm vm;
    GdbStub stub(vm);
    CHECK(stub.handle("Z1,ffffffff81000100,1") == "OK");
    CHECK(stub.handle("Z2,ffffffff82000008,8") == "OK");
    CHECK(stub.handle("Z4,ffffffff82000010,4") == "OK");
    CHECK(stub.handle("Z3,ffffffff82000010,4") == "");    // read-only: x86 has none
    // Unaligned or odd ranges take a register per aligned piece: not enough left.
    CHECK(stub.handle("Z2,ffffffff82000009,8") == "E1c");
    CHECK(stub.handle("Z2,ffffffff82000008,3") == "E1c");
    CHECK(stub.handle("Z2,ffffffff82000008,0") == "E16");
    GuestDebugSetup setup = stub.debug_setup();
    CHECK(setup.hardware_breakpoints);
    CHECK(setup.dr[0] == 0xffffffff81000100ull);
    CHECK(setup.dr[1] == 0xffffffff82000008ull);
    CHECK(setup.dr[2] == 0xffffffff82000010ull);
    // Slot 0: enabled, execute, 1 byte; 1: write, 8 bytes; 2: read/write, 4 bytes.
    CHECK((setup.dr7 & 0x3f) == 0x2a);
    CHECK(((setup.dr7 >> 16) & 0xf) == 0x0);
    CHECK(((setup.dr7 >> 20) & 0xf) == 0x9);
    CHECK(((setup.dr7 >> 24) & 0xf) == 0xf);
    CHECK(stub.handle("Z2,ffffffff82000020,1") == "OK");
    CHECK(stub.handle("Z2,ffffffff82000028,1") == "E1c");  // four registers, all taken
    CHECK(stub.handle("z2,ffffffff82000008,8") == "OK");
    CHECK((stub.debug_setup().dr7 & 0xc) == 0);  // slot 1 off

    SUBCASE("a watchpoint that fires is reported with its address")
    {
        CHECK_FALSE(stub.handle("c").has_value());
        REQUIRE(vm.runs.size() == 1);
        CHECK(vm.runs[0].second == -1);
        const DebugExit exit{1, DebugExit::Kind::kException, 1, 0xffffffff81000200ull, 1u << 2};
        CHECK(stub.stopped(std::span(&exit, 1)) == "T05thread:2;awatch:ffffffff82000010;");
        const DebugExit bp{0, DebugExit::Kind::kException, 1, 0xffffffff81000100ull, 1u << 0};
        CHECK_FALSE(stub.handle("c").has_value());
        CHECK(stub.stopped(std::span(&bp, 1)) == "T05thread:1;hwbreak:;");
    }
}

TEST_CASE("gdb stub: continue, step, stops and the guest's own int3s")
{
    FakeVm vm;
    GdbStub stub(vm);
    const uint64_t ours = vm.base + 0x200, guests = vm.base + 0x300;
    REQUIRE(stub.handle("Z0," + hex_of(ours) + ",1") == "OK");
    vm.memory[0x300] = 0xcc;  // the guest's own int3 (Linux patches code with them)

    SUBCASE("while it runs, only a stop answers; a packet gets an error")
    {
        CHECK_FALSE(stub.handle("vCont;c").has_value());
        CHECK(stub.running());
        CHECK(vm.runs.back().first.software_breakpoints);
        CHECK(stub.handle("g") == "E16");
        const DebugExit exits[] = {{1, DebugExit::Kind::kException, 3, ours, 0},
                                   {0, DebugExit::Kind::kException, 3, ours, 0}};
        CHECK(stub.stopped(exits) == "T05thread:2;swbreak:;");  // the first; the other runs its int3 again later
        CHECK_FALSE(stub.running());
        CHECK(stub.handle("?") == "T05thread:2;swbreak:;");
        CHECK(stub.handle("qC") == "QC2");  // registers now of the vCPU that stopped
    }
    SUBCASE("the guest's own int3 goes back to the guest, and it runs on")
    {
        CHECK_FALSE(stub.handle("c").has_value());
        const DebugExit exit{0, DebugExit::Kind::kException, 3, guests, 0};
        CHECK_FALSE(stub.stopped(std::span(&exit, 1)).has_value());
        CHECK(vm.reinjected == std::vector<unsigned>{0});
        CHECK(stub.running());
    }
    SUBCASE("a breakpoint gdb took out meanwhile is neither reported nor given to the guest")
    {
        CHECK_FALSE(stub.handle("c").has_value());
        const uint64_t gone = vm.base + 0x400;
        const DebugExit exit{0, DebugExit::Kind::kException, 3, gone, 0};
        CHECK_FALSE(stub.stopped(std::span(&exit, 1)).has_value());
        CHECK(vm.reinjected.empty());
    }
    SUBCASE("s steps the vCPU Hc names, alone; vCont;s:N steps N")
    {
        CHECK(stub.handle("Hc2") == "OK");
        CHECK_FALSE(stub.handle("s").has_value());
        CHECK(vm.runs.back().second == 1);
        const DebugExit step{1, DebugExit::Kind::kException, 1, 0xffffffff81000005ull, 1u << 14};
        CHECK(stub.stopped(std::span(&step, 1)) == "T05thread:2;");
        CHECK_FALSE(stub.handle("vCont;s:1;c").has_value());
        CHECK(vm.runs.back().second == 0);
        CHECK(stub.stopped(std::span(&step, 1)).has_value());
        CHECK(stub.handle("vCont?") == "vCont;c;C;s;S");
        CHECK(stub.handle("vCont;x") == "E16");
        CHECK(stub.handle("vCont;s:9") == "E16");
    }
    SUBCASE("c with an address moves rip first")
    {
        CHECK_FALSE(stub.handle("cffffffff81000040").has_value());
        CHECK(vm.regs[0].rip == 0xffffffff81000040ull);
    }
    SUBCASE("Ctrl-C's stop is SIGINT")
    {
        CHECK_FALSE(stub.handle("c").has_value());
        const DebugExit exit{0, DebugExit::Kind::kStopped, 0, 0, 0};
        CHECK(stub.stopped(std::span(&exit, 1)) == "T02thread:1;");
    }
    SUBCASE("detach takes our breakpoints out of the guest and forgets them")
    {
        REQUIRE(stub.handle("Z1,ffffffff81000100,1") == "OK");
        CHECK(stub.handle("D") == "OK");
        CHECK(vm.memory[0x200] == 0);
        CHECK(vm.memory[0x300] == 0xcc);  // the guest's own stays
        const GuestDebugSetup none = stub.debug_setup();
        CHECK_FALSE(none.software_breakpoints);
        CHECK_FALSE(none.hardware_breakpoints);
    }
    SUBCASE("k ends the guest")
    {
        CHECK_FALSE(stub.handle("k").has_value());
        CHECK(vm.ended == 1);
    }
}

TEST_CASE("gdb stub: hostile packets get an error or an empty reply, never a crash")
{
    FakeVm vm;
    GdbStub stub(vm);
    for (const char* packet :
         {"", "m", "m,", "m1", "mffffffffffffffff,ffffffffffffffff", "M", "M1,1", "M1,1:", "Mffffffffffffffff,2:0000",
          "X1,", "Z", "Z0", "Z0,", "Z9,1,1", "z0,zz,1", "p", "pffffffffffffffff", "P=", "P0=", "G0", "H", "Hx1", "T",
          "qXfer:features:read:", "qXfer:features:read:target.xml:ffffffffffffffff,ffff", "qThreadExtraInfo,",
          "vCont;", "vCont;c:ffffffffffffffffff", "C", "S;", "c12345678901234567"}) {
        CAPTURE(packet);
        const auto reply = stub.handle(packet);
        if (stub.running()) {
            const DebugExit stop{0, DebugExit::Kind::kStopped, 0, 0, 0};
            stub.stopped(std::span(&stop, 1));
        }
        CHECK((!reply || reply->empty() || reply->front() == 'E' || reply->front() == 'O' || reply->front() == 'l' ||
               reply->front() == 'm' || std::isxdigit(static_cast<unsigned char>(reply->front()))));
    }
    // A big read is cut to what fits one packet.
    const std::string big = stub.handle("m" + hex_of(vm.base) + ",100000").value();
    CHECK(big.size() <= kGdbMaxPacket);
    CHECK(big.size() > 1000);
}

TEST_CASE("page walk: every paging mode, large pages, and nothing outside RAM")
{
    std::vector<uint8_t> ram(64 << 20);
    GuestMemory memory{{{0, ram.size(), ram.data()}}};
    auto put64 = [&](uint64_t gpa, uint64_t v) { std::memcpy(ram.data() + gpa, &v, 8); };
    auto put32 = [&](uint64_t gpa, uint32_t v) { std::memcpy(ram.data() + gpa, &v, 4); };
    constexpr uint64_t P = 1, PS = 1 << 7;
    constexpr uint64_t kPg = 1ull << 31, kPae = 1 << 5, kPse = 1 << 4, kLa57 = 1 << 12, kLma = 1 << 10;

    SUBCASE("no paging: linear is physical")
    {
        const auto t = translate(memory, {0, 0, 0, 0}, 0x12345);
        REQUIRE(t);
        CHECK(t->gpa == 0x12345);
    }
    SUBCASE("4-level: 4K, 2M and 1G pages, canonical addresses only")
    {
        // A kernel-like address: PML4 511, PDPT 510, then a PD.
        const uint64_t gva = 0xffffffff81234567ull;
        put64(0x1000 + 8 * 511, 0x2000 | P);
        put64(0x2000 + 8 * 510, 0x3000 | P);
        const uint64_t pd_index = (gva >> 21) & 511, pt_index = (gva >> 12) & 511;
        put64(0x3000 + 8 * pd_index, 0x4000 | P);
        put64(0x4000 + 8 * pt_index, 0x7000 | P);
        const PagingState paging{kPg, 0x1000, kPae, kLma};
        auto t = translate(memory, paging, gva);
        REQUIRE(t);
        CHECK(t->gpa == 0x7567);
        CHECK(t->page_bytes == 0x1000 - 0x567);
        // The same PD entry as a 2M page.
        put64(0x3000 + 8 * pd_index, 0x1000000 | P | PS);
        t = translate(memory, paging, gva);
        REQUIRE(t);
        CHECK(t->gpa == 0x1000000 + (gva & 0x1fffff));
        // The PDPT entry as a 1G page (its base below RAM's end only in the low bits we read).
        put64(0x2000 + 8 * 510, 0x0 | P | PS);
        t = translate(memory, paging, gva);
        REQUIRE(t);
        CHECK(t->gpa == (gva & 0x3fffffff));
        CHECK(t->page_bytes == 0x40000000 - (gva & 0x3fffffff));
        CHECK_FALSE(translate(memory, paging, 0x0000800000000000ull));  // not canonical
        CHECK_FALSE(translate(memory, paging, 0x1000));                 // PML4 0 not present
    }
    SUBCASE("5-level")
    {
        const uint64_t gva = 0xff00000000001234ull;  // canonical in 57 bits
        put64(0x1000 + 8 * ((gva >> 48) & 511), 0x2000 | P);
        put64(0x2000 + 8 * ((gva >> 39) & 511), 0x3000 | P);
        put64(0x3000 + 8 * ((gva >> 30) & 511), 0x4000 | P);
        put64(0x4000 + 8 * ((gva >> 21) & 511), 0x5000 | P);
        put64(0x5000 + 8 * ((gva >> 12) & 511), 0x9000 | P);
        const PagingState paging{kPg, 0x1000, kPae | kLa57, kLma};
        const auto t = translate(memory, paging, gva);
        REQUIRE(t);
        CHECK(t->gpa == 0x9234);
        CHECK_FALSE(translate(memory, {kPg, 0x1000, kPae, kLma}, gva));  // not canonical with 4 levels
    }
    SUBCASE("PAE and 32-bit paging with 4M pages")
    {
        const uint64_t gva = 0xc0401234;
        put64(0x1000 + 8 * 3, 0x2000 | P);
        put64(0x2000 + 8 * ((gva >> 21) & 511), 0x3000 | P);
        put64(0x3000 + 8 * ((gva >> 12) & 511), 0x8000 | P);
        auto t = translate(memory, {kPg, 0x1000, kPae, 0}, gva);
        REQUIRE(t);
        CHECK(t->gpa == 0x8234);
        put32(0x5000 + 4 * (gva >> 22), 0x00800000 | P | PS);
        t = translate(memory, {kPg, 0x5000, kPse, 0}, gva);
        REQUIRE(t);
        CHECK(t->gpa == 0x800000 + (gva & 0x3fffff));
        put32(0x5000 + 4 * (gva >> 22), 0x6000 | P);
        put32(0x6000 + 4 * ((gva >> 12) & 1023), 0xa000 | P);
        t = translate(memory, {kPg, 0x5000, kPse, 0}, gva);
        REQUIRE(t);
        CHECK(t->gpa == 0xa234);
    }
    SUBCASE("a table outside RAM is a failed walk, not a read outside the guest")
    {
        put64(0x1000, 0x7ffffff000ull | P);  // PML4 0 -> a PDPT far past RAM
        CHECK_FALSE(translate(memory, {kPg, 0x1000, kPae, kLma}, 0x1000));
        CHECK_FALSE(translate(memory, {kPg, 0xfffffffff000ull, kPae, kLma}, 0x1000));  // cr3 itself outside
    }
}

TEST_CASE("vCPU gate: a debugger stop holds every vCPU; a step lets one run")
{
    std::atomic<int> kicks{0};
    VcpuGate gate([&] { ++kicks; });
    gate.set_threads(2);
    std::atomic<uint64_t> runs[2] = {0, 0};
    std::vector<std::thread> threads;
    for (unsigned i = 0; i < 2; ++i)
        threads.emplace_back([&, i] {
            while (!gate.stopping()) {
                if (gate.held(i)) {
                    gate.park(i, [] {});
                    continue;
                }
                ++runs[i];
                std::this_thread::yield();
            }
            gate.leave();
        });
    gate.debug_stop();
    gate.wait_parked();
    CHECK(gate.debug_stopped());
    CHECK_FALSE(gate.paused());  // not lkvm pause: lkvm resume cannot let these go
    gate.resume();
    const uint64_t held[2] = {runs[0].load(), runs[1].load()};
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK(runs[0] == held[0]);
    CHECK(runs[1] == held[1]);
    gate.debug_resume(1);  // a step of vCPU 1
    while (runs[1] == held[1])
        std::this_thread::yield();
    CHECK(runs[0] == held[0]);
    gate.debug_stop();
    gate.wait_parked();
    gate.debug_resume(-1);
    while (runs[0] == held[0])
        std::this_thread::yield();
    gate.stop();
    for (auto& t : threads)
        t.join();
    CHECK(kicks >= 2);
}
