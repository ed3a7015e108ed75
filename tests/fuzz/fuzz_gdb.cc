// What a gdb client (or anything that connects to --gdb) sends: the byte
// stream through the packet decoder, and every packet through the stub's
// commands over a small fake VM. Nothing may crash or read outside the fake
// guest's memory; a reply always fits one packet; and a stream that decodes
// to packets decodes to the same packets framed again.
//
// Input: the raw bytes of the connection.
#include <cstring>
#include <vector>

#include "kvm/gdb_packet.h"
#include "kvm/gdb_stub.h"
#include "tests/fuzz/fuzz_input.h"

using namespace lkvm;

namespace {
struct FuzzVm : GdbTarget {
    std::vector<X86Registers> regs = std::vector<X86Registers>(2);
    std::vector<uint8_t> memory = std::vector<uint8_t>(4096);
    unsigned vcpu_count() const override { return 2; }
    bool get_registers(unsigned v, X86Registers& out) override { return v < 2 && (out = regs[v], true); }
    bool set_registers(unsigned v, const X86Registers& in) override { return v < 2 && (regs[v] = in, true); }
    size_t read_virtual(unsigned v, uint64_t gva, std::span<uint8_t> out) override
    {
        FUZZ_CHECK(v < 2);
        if (gva >= memory.size() || out.empty())
            return 0;
        const size_t n = std::min<size_t>(out.size(), memory.size() - gva);
        std::memcpy(out.data(), memory.data() + gva, n);
        return n;
    }
    size_t write_virtual(unsigned v, uint64_t gva, std::span<const uint8_t> in) override
    {
        FUZZ_CHECK(v < 2);
        if (gva >= memory.size() || in.empty())
            return 0;
        const size_t n = std::min<size_t>(in.size(), memory.size() - gva);
        std::memcpy(memory.data() + gva, in.data(), n);
        return n;
    }
    void run_guest(const GuestDebugSetup&, int step) override { FUZZ_CHECK(step < 2); }
    void reinject_breakpoint(unsigned v) override { FUZZ_CHECK(v < 2); }
    void interrupt() override {}
    void end_guest() override {}
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    GdbDecoder decoder;
    std::vector<GdbInput> inputs;
    decoder.feed(std::span(data, size), inputs);
    FuzzVm vm;
    GdbStub stub(vm);
    std::string reframed;
    for (const auto& input : inputs) {
        if (input.kind != GdbInput::Kind::kPacket)
            continue;
        reframed += gdb_frame(input.payload);
        if (const auto reply = stub.handle(input.payload))
            FUZZ_CHECK(gdb_frame(*reply).size() <= 2 * kGdbMaxPacket + 4);
        if (stub.running()) {
            // The guest stops at once: at an int3 of ours, or by Ctrl-C.
            const DebugExit exits[] = {{0, DebugExit::Kind::kException, 3, input.payload.size() % 8, 0},
                                       {1, DebugExit::Kind::kStopped, 0, 0, 0}};
            FUZZ_CHECK(stub.stopped(exits).has_value());
            FUZZ_CHECK(!stub.running());
        }
    }
    // What decoded decodes again the same once framed by us.
    GdbDecoder again;
    std::vector<GdbInput> second;
    again.feed(std::span(reinterpret_cast<const uint8_t*>(reframed.data()), reframed.size()), second);
    size_t packets = 0;
    for (const auto& input : inputs)
        if (input.kind == GdbInput::Kind::kPacket) {
            FUZZ_CHECK(packets < second.size() && second[packets].payload == input.payload);
            ++packets;
        }
    FUZZ_CHECK(packets == second.size());
    return 0;
}
