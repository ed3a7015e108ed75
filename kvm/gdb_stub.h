// The gdb stub's protocol: gdb's packets in, replies out, over a GdbTarget
// that stands for the VM. All-stop, as `qemu -s` is: when one vCPU stops,
// every vCPU stops; each vCPU is a gdb thread (vCPU N is thread N + 1).
// No sockets and no KVM here: unit-tested with a fake target, and the
// packet layer (gdb_packet.h) fuzzed.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lkvm {

// A vCPU's registers as gdb's i386:x86-64 target description has them.
struct X86Registers {
    std::array<uint64_t, 16> gpr{};  // rax rbx rcx rdx rsi rdi rbp rsp r8..r15: gdb's order
    uint64_t rip = 0;
    uint32_t eflags = 0;
    std::array<uint32_t, 6> segment{};  // selectors: cs ss ds es fs gs
    std::array<std::array<uint8_t, 10>, 8> st{};
    uint32_t fctrl = 0, fstat = 0, ftag = 0, fiseg = 0, fioff = 0, foseg = 0, fooff = 0, fop = 0;
    std::array<std::array<uint8_t, 16>, 16> xmm{};
    uint32_t mxcsr = 0;
    uint64_t fs_base = 0, gs_base = 0;
    uint64_t cr0 = 0, cr2 = 0, cr3 = 0, cr4 = 0, cr8 = 0, efer = 0;
};

// The debug setup the guest runs with (KVM_SET_GUEST_DEBUG).
struct GuestDebugSetup {
    bool software_breakpoints = false;  // int3 stops the guest (our breakpoints are int3s in its memory)
    bool hardware_breakpoints = false;  // dr0-3 and dr7 below
    std::array<uint64_t, 4> dr{};
    uint64_t dr7 = 0;
};

// What made a vCPU leave the guest for the debugger (KVM_EXIT_DEBUG), or a stop we asked for.
struct DebugExit {
    unsigned vcpu = 0;
    enum class Kind { kException, kStopped } kind = Kind::kException;
    uint32_t exception = 0;  // 1 (#DB) or 3 (#BP)
    uint64_t pc = 0;         // linear address of the instruction
    uint64_t dr6 = 0;        // #DB: which debug register fired, or single step (BS)
};

class GdbTarget {
public:
    virtual ~GdbTarget() = default;
    virtual unsigned vcpu_count() const = 0;
    // These are called only while every vCPU is stopped.
    virtual bool get_registers(unsigned vcpu, X86Registers& out) = 0;
    virtual bool set_registers(unsigned vcpu, const X86Registers& in) = 0;
    // By guest virtual address, through vCPU's page tables: bytes done (a
    // prefix of the range; 0 when its first byte is not mapped in RAM).
    virtual size_t read_virtual(unsigned vcpu, uint64_t gva, std::span<uint8_t> out) = 0;
    virtual size_t write_virtual(unsigned vcpu, uint64_t gva, std::span<const uint8_t> in) = 0;
    // Lets the guest run with `debug` on every vCPU; step_vcpu >= 0: that vCPU
    // alone runs one instruction (the others stay stopped). A DebugExit follows.
    virtual void run_guest(const GuestDebugSetup& debug, int step_vcpu) = 0;
    // The guest's own int3 at vCPU's pc (not one of ours): deliver it to the guest.
    virtual void reinject_breakpoint(unsigned vcpu) = 0;
    // Stops every vCPU soon (Ctrl-C); a DebugExit of kind kStopped follows.
    virtual void interrupt() = 0;
    // gdb's kill: ends the guest.
    virtual void end_guest() = 0;
};

class GdbStub {
public:
    explicit GdbStub(GdbTarget& target) : target_(target) {}

    // A packet from gdb. The reply to send, or nothing yet: after c or s the
    // reply is the stop reply, which stopped() gives when the guest stops.
    std::optional<std::string> handle(std::string_view packet);
    // Every vCPU has stopped, for these exits (one or more vCPUs at once).
    // The stop reply for gdb, or nothing when none was for gdb (the guest's
    // own int3s, given back to it): the guest then runs on.
    std::optional<std::string> stopped(std::span<const DebugExit> exits);
    // gdb went away or detached (D): our breakpoints out of the guest, and
    // none kept. The caller then lets the guest run without debugging.
    void detach();
    bool running() const { return running_; }
    // The debug setup for the guest as it stands (no stepping).
    GuestDebugSetup debug_setup() const;

    // The target description gdb reads (qXfer:features:read:target.xml).
    static const std::string& target_xml();
    // Register n in gdb's numbering, as its bytes in the target's order; empty past the last.
    static std::vector<uint8_t> register_bytes(const X86Registers& regs, unsigned n);
    static bool set_register_bytes(X86Registers& regs, unsigned n, std::span<const uint8_t> bytes);
    static unsigned register_count();

private:
    // One debug register's part of what gdb asked for: a watched range that
    // is not one aligned 1/2/4/8-byte piece takes one register per piece.
    struct HwPoint {
        int type = 0;  // gdb's Z type: 1 execute, 2 write, 3 read, 4 access
        uint64_t addr = 0;  // this register's piece
        uint64_t len = 0;
        uint64_t asked_addr = 0;  // the range gdb gave, which z removes whole
        uint64_t asked_len = 0;
    };
    std::string resume(bool step, std::string_view args);
    std::string stop_reply(const DebugExit& exit) const;
    std::string read_memory(std::string_view args);
    std::string write_memory(std::string_view args, bool binary);
    std::string breakpoint(std::string_view args, bool insert);
    std::string registers_reply();
    bool parse_thread(std::string_view id, int& vcpu) const;
    std::string xfer(std::string_view args) const;
    std::optional<std::string> vcont(std::string_view args);
    // Reads guest memory with our breakpoints' original bytes in place of their int3s.
    size_t read_clean(uint64_t addr, std::span<uint8_t> out);

    GdbTarget& target_;
    bool running_ = false;
    unsigned general_vcpu_ = 0;  // Hg: registers and memory
    unsigned step_vcpu_ = 0;     // Hc: what s steps
    std::optional<std::string> last_stop_;
    std::map<uint64_t, uint8_t> software_;  // address -> the byte our int3 replaced
    std::array<std::optional<HwPoint>, 4> hardware_{};
};

}  // namespace lkvm
