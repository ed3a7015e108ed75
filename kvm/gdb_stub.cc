#include "kvm/gdb_stub.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kvm/gdb_packet.h"

namespace lkvm {
namespace {
constexpr uint8_t kInt3 = 0xcc;
constexpr uint64_t kDr6SingleStep = 1ull << 14;
constexpr unsigned kGpr = 16, kRip = 16, kEflags = 17, kSegments = 18, kSt = 24, kFpControl = 32, kXmm = 40,
                   kMxcsr = 56, kFsBase = 57, kGsBase = 58, kControl = 59, kRegisterCount = 65;
constexpr const char* kGprNames[kGpr] = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                                         "r8",  "r9",  "r10", "r11", "r12", "r13", "r14", "r15"};
constexpr const char* kSegmentNames[6] = {"cs", "ss", "ds", "es", "fs", "gs"};
constexpr const char* kFpControlNames[8] = {"fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"};
constexpr const char* kControlNames[6] = {"cr0", "cr2", "cr3", "cr4", "cr8", "efer"};

// Register n's bytes inside regs (x86 is little-endian, as gdb wants them).
std::span<uint8_t> register_span(X86Registers& r, unsigned n)
{
    auto bytes = [](auto& v) { return std::span<uint8_t>(reinterpret_cast<uint8_t*>(&v), sizeof(v)); };
    if (n < kRip)
        return bytes(r.gpr[n]);
    if (n == kRip)
        return bytes(r.rip);
    if (n == kEflags)
        return bytes(r.eflags);
    if (n < kSt)
        return bytes(r.segment[n - kSegments]);
    if (n < kFpControl)
        return bytes(r.st[n - kSt]);
    if (n < kXmm) {
        uint32_t* control[8] = {&r.fctrl, &r.fstat, &r.ftag, &r.fiseg, &r.fioff, &r.foseg, &r.fooff, &r.fop};
        return bytes(*control[n - kFpControl]);
    }
    if (n < kMxcsr)
        return bytes(r.xmm[n - kXmm]);
    if (n == kMxcsr)
        return bytes(r.mxcsr);
    if (n == kFsBase)
        return bytes(r.fs_base);
    if (n == kGsBase)
        return bytes(r.gs_base);
    if (n < kRegisterCount) {
        uint64_t* control[6] = {&r.cr0, &r.cr2, &r.cr3, &r.cr4, &r.cr8, &r.efer};
        return bytes(*control[n - kControl]);
    }
    return {};
}

std::string build_target_xml()
{
    std::string xml = "<?xml version=\"1.0\"?>\n<!DOCTYPE target SYSTEM \"gdb-target.dtd\">\n<target>\n"
                      "<architecture>i386:x86-64</architecture>\n";
    auto reg = [&](const std::string& name, unsigned bits, const char* type, const char* group = nullptr) {
        xml += "<reg name=\"" + name + "\" bitsize=\"" + std::to_string(bits) + "\" type=\"" + type + "\"";
        if (group)
            xml += std::string(" group=\"") + group + "\"";
        xml += "/>\n";
    };
    xml += "<feature name=\"org.gnu.gdb.i386.core\">\n";
    for (unsigned i = 0; i < kGpr; ++i)
        reg(kGprNames[i], 64, i == 6 || i == 7 ? "data_ptr" : "int64");
    reg("rip", 64, "code_ptr");
    reg("eflags", 32, "int32");
    for (const char* name : kSegmentNames)
        reg(name, 32, "int32");
    for (unsigned i = 0; i < 8; ++i)
        reg("st" + std::to_string(i), 80, "i387_ext");
    for (const char* name : kFpControlNames)
        reg(name, 32, "int", "float");
    xml += "</feature>\n<feature name=\"org.gnu.gdb.i386.sse\">\n"
           "<vector id=\"v4f\" type=\"ieee_single\" count=\"4\"/>\n"
           "<vector id=\"v2d\" type=\"ieee_double\" count=\"2\"/>\n"
           "<vector id=\"v16i8\" type=\"int8\" count=\"16\"/>\n"
           "<vector id=\"v8i16\" type=\"int16\" count=\"8\"/>\n"
           "<vector id=\"v4i32\" type=\"int32\" count=\"4\"/>\n"
           "<vector id=\"v2i64\" type=\"int64\" count=\"2\"/>\n"
           "<union id=\"vec128\"><field name=\"v4_float\" type=\"v4f\"/><field name=\"v2_double\" type=\"v2d\"/>"
           "<field name=\"v16_int8\" type=\"v16i8\"/><field name=\"v8_int16\" type=\"v8i16\"/>"
           "<field name=\"v4_int32\" type=\"v4i32\"/><field name=\"v2_int64\" type=\"v2i64\"/>"
           "<field name=\"uint128\" type=\"uint128\"/></union>\n";
    for (unsigned i = 0; i < 16; ++i)
        reg("xmm" + std::to_string(i), 128, "vec128", "vector");
    reg("mxcsr", 32, "int", "vector");
    xml += "</feature>\n<feature name=\"org.gnu.gdb.i386.segments\">\n";
    reg("fs_base", 64, "int");
    reg("gs_base", 64, "int");
    xml += "</feature>\n<feature name=\"org.lkvm.gdb.x86.control\">\n";
    for (const char* name : kControlNames)
        reg(name, 64, "int64", "system");
    xml += "</feature>\n</target>\n";
    return xml;
}

// "a,b": the two hex numbers.
bool parse_pair(std::string_view s, uint64_t& a, uint64_t& b)
{
    const size_t comma = s.find(',');
    return comma != std::string_view::npos && parse_hex_number(s.substr(0, comma), a) &&
           parse_hex_number(s.substr(comma + 1), b);
}

std::string hex_number(uint64_t v)
{
    char text[20];
    std::snprintf(text, sizeof(text), "%llx", static_cast<unsigned long long>(v));
    return text;
}

constexpr const char* kErrorBadArgs = "E16";  // EINVAL, as gdbserver numbers it
constexpr const char* kErrorMemory = "E0e";   // EFAULT
}  // namespace

const std::string& GdbStub::target_xml()
{
    static const std::string xml = build_target_xml();
    return xml;
}

unsigned GdbStub::register_count() { return kRegisterCount; }

std::vector<uint8_t> GdbStub::register_bytes(const X86Registers& regs, unsigned n)
{
    X86Registers copy = regs;
    const auto bytes = register_span(copy, n);
    return {bytes.begin(), bytes.end()};
}

bool GdbStub::set_register_bytes(X86Registers& regs, unsigned n, std::span<const uint8_t> bytes)
{
    const auto dst = register_span(regs, n);
    if (dst.empty() || dst.size() != bytes.size())
        return false;
    std::memcpy(dst.data(), bytes.data(), bytes.size());
    return true;
}

GuestDebugSetup GdbStub::debug_setup() const
{
    GuestDebugSetup setup;
    setup.software_breakpoints = !software_.empty();
    setup.dr7 = 0x600;  // GE and the always-one bit 10, as after reset
    for (unsigned i = 0; i < hardware_.size(); ++i) {
        if (!hardware_[i])
            continue;
        const HwPoint& p = *hardware_[i];
        // R/W: 00 execute, 01 write, 11 read or write. LEN: 00 1, 01 2, 11 4, 10 8 bytes.
        const uint64_t rw = p.type == 1 ? 0 : p.type == 2 ? 1 : 3;
        const uint64_t len = p.type == 1 || p.len == 1 ? 0 : p.len == 2 ? 1 : p.len == 4 ? 3 : 2;
        setup.hardware_breakpoints = true;
        setup.dr[i] = p.addr;
        setup.dr7 |= (2ull << (2 * i)) | (rw << (16 + 4 * i)) | (len << (18 + 4 * i));
    }
    return setup;
}

std::optional<std::string> GdbStub::handle(std::string_view packet)
{
    if (packet.empty())
        return std::string();
    if (running_)
        return std::string(kErrorBadArgs);  // gdb sends only Ctrl-C while the guest runs
    const char command = packet[0];
    const std::string_view args = packet.substr(1);
    switch (command) {
    case '?':
        return last_stop_.value_or("T05thread:" + hex_number(general_vcpu_ + 1) + ";");
    case 'g':
        return registers_reply();
    case 'G': {
        X86Registers regs;
        std::vector<uint8_t> bytes;
        if (!from_hex(args, bytes) || !target_.get_registers(general_vcpu_, regs))
            return std::string(kErrorBadArgs);
        size_t at = 0;
        for (unsigned n = 0; n < kRegisterCount; ++n) {
            const size_t size = register_span(regs, n).size();
            if (at + size > bytes.size())
                return std::string(kErrorBadArgs);
            set_register_bytes(regs, n, std::span(bytes).subspan(at, size));
            at += size;
        }
        return std::string(target_.set_registers(general_vcpu_, regs) ? "OK" : kErrorBadArgs);
    }
    case 'p': {
        uint64_t n;
        X86Registers regs;
        if (!parse_hex_number(args, n) || n >= kRegisterCount || !target_.get_registers(general_vcpu_, regs))
            return std::string(kErrorBadArgs);
        return to_hex(register_bytes(regs, static_cast<unsigned>(n)));
    }
    case 'P': {
        const size_t eq = args.find('=');
        uint64_t n;
        std::vector<uint8_t> bytes;
        X86Registers regs;
        if (eq == std::string_view::npos || !parse_hex_number(args.substr(0, eq), n) || n >= kRegisterCount ||
            !from_hex(args.substr(eq + 1), bytes) || !target_.get_registers(general_vcpu_, regs) ||
            !set_register_bytes(regs, static_cast<unsigned>(n), bytes))
            return std::string(kErrorBadArgs);
        return std::string(target_.set_registers(general_vcpu_, regs) ? "OK" : kErrorBadArgs);
    }
    case 'm':
        return read_memory(args);
    case 'M':
        return write_memory(args, false);
    case 'X':
        return write_memory(args, true);
    case 'Z':
    case 'z':
        return breakpoint(args, command == 'Z');
    case 'c':
    case 's':
    case 'C':
    case 'S': {
        // C/S carry a signal first ("Csig;addr"): a guest has no signals to give.
        std::string_view address = args;
        if (command == 'C' || command == 'S') {
            const size_t semicolon = args.find(';');
            address = semicolon == std::string_view::npos ? std::string_view() : args.substr(semicolon + 1);
        }
        std::string error = resume(command == 's' || command == 'S', address);
        if (!error.empty())
            return error;
        return std::nullopt;
    }
    case 'H': {
        if (args.empty())
            return std::string(kErrorBadArgs);
        int vcpu;
        if (!parse_thread(args.substr(1), vcpu))
            return std::string(kErrorBadArgs);
        // -1 (all) and 0 (any) leave the choice as it is.
        if (vcpu >= 0 && args[0] == 'g')
            general_vcpu_ = static_cast<unsigned>(vcpu);
        else if (vcpu >= 0 && args[0] == 'c')
            step_vcpu_ = static_cast<unsigned>(vcpu);
        else if (args[0] != 'g' && args[0] != 'c')
            return std::string(kErrorBadArgs);
        return std::string("OK");
    }
    case 'T': {
        int vcpu;
        return std::string(parse_thread(args, vcpu) && vcpu >= 0 ? "OK" : kErrorBadArgs);
    }
    case 'D':
        detach();
        return std::string("OK");
    case 'k':
        target_.end_guest();
        return std::nullopt;
    case 'v':
        if (args.starts_with("Cont?"))
            return std::string("vCont;c;C;s;S");
        if (args.starts_with("Cont;"))
            return vcont(args.substr(5));
        return std::string();  // vMustReplyEmpty and the rest: not supported
    case 'q':
        if (args.starts_with("Supported"))
            return "PacketSize=" + hex_number(kGdbMaxPacket) + ";qXfer:features:read+;swbreak+;hwbreak+";
        if (args == "Attached")
            return std::string("1");
        if (args == "C")
            return "QC" + hex_number(general_vcpu_ + 1);
        if (args == "fThreadInfo") {
            std::string reply = "m";
            for (unsigned i = 0; i < target_.vcpu_count(); ++i)
                reply += (i ? "," : "") + hex_number(i + 1);
            return reply;
        }
        if (args == "sThreadInfo")
            return std::string("l");
        if (args.starts_with("ThreadExtraInfo,")) {
            int vcpu;
            if (!parse_thread(args.substr(16), vcpu) || vcpu < 0)
                return std::string(kErrorBadArgs);
            const std::string name = "vCPU " + std::to_string(vcpu);
            return to_hex({reinterpret_cast<const uint8_t*>(name.data()), name.size()});
        }
        if (args.starts_with("Xfer:features:read:"))
            return xfer(args.substr(19));
        if (args.starts_with("Symbol"))
            return std::string("OK");
        return std::string();
    default:
        return std::string();  // an empty reply: "not supported", as the protocol says
    }
}

bool GdbStub::parse_thread(std::string_view id, int& vcpu) const
{
    // -1: all threads, 0: any thread; both leave the choice to us.
    uint64_t n = 0;
    if (id != "-1" && (!parse_hex_number(id, n) || n > target_.vcpu_count()))
        return false;
    vcpu = static_cast<int>(n) - 1;
    return true;
}

std::string GdbStub::registers_reply()
{
    X86Registers regs;
    if (!target_.get_registers(general_vcpu_, regs))
        return kErrorBadArgs;
    std::string hex;
    for (unsigned n = 0; n < kRegisterCount; ++n)
        hex += to_hex(register_span(regs, n));
    return hex;
}

size_t GdbStub::read_clean(uint64_t addr, std::span<uint8_t> out)
{
    const size_t done = target_.read_virtual(general_vcpu_, addr, out);
    for (auto it = software_.lower_bound(addr); it != software_.end() && it->first - addr < done; ++it)
        out[it->first - addr] = it->second;
    return done;
}

std::string GdbStub::read_memory(std::string_view args)
{
    uint64_t addr, len;
    if (!parse_pair(args, addr, len))
        return kErrorBadArgs;
    len = std::min<uint64_t>(len, (kGdbMaxPacket - 4) / 2);
    if (len == 0)
        return "";
    std::vector<uint8_t> bytes(len);
    const size_t done = read_clean(addr, bytes);
    if (done == 0 && len != 0)
        return kErrorMemory;
    return to_hex(std::span(bytes).first(done));
}

std::string GdbStub::write_memory(std::string_view args, bool binary)
{
    const size_t colon = args.find(':');
    uint64_t addr, len;
    if (colon == std::string_view::npos || !parse_pair(args.substr(0, colon), addr, len))
        return kErrorBadArgs;
    const std::string_view data = args.substr(colon + 1);
    std::vector<uint8_t> bytes;
    if (binary)
        bytes.assign(data.begin(), data.end());
    else if (!from_hex(data, bytes))
        return kErrorBadArgs;
    if (bytes.size() != len)
        return kErrorBadArgs;
    if (len == 0)
        return "OK";
    // Over one of our breakpoints: the new byte is what the int3 hides now.
    for (auto it = software_.lower_bound(addr); it != software_.end() && it->first - addr < len; ++it) {
        it->second = bytes[it->first - addr];
        bytes[it->first - addr] = kInt3;
    }
    return target_.write_virtual(general_vcpu_, addr, bytes) == len ? "OK" : kErrorMemory;
}

std::string GdbStub::breakpoint(std::string_view args, bool insert)
{
    // "type,addr,kind"
    const size_t first = args.find(',');
    uint64_t type, addr, kind;
    if (first == std::string_view::npos || !parse_hex_number(args.substr(0, first), type))
        return kErrorBadArgs;
    std::string_view rest = args.substr(first + 1);
    if (const size_t semicolon = rest.find(';'); semicolon != std::string_view::npos)
        rest = rest.substr(0, semicolon);  // conditions for the target to evaluate: we do not offer them
    if (!parse_pair(rest, addr, kind))
        return kErrorBadArgs;
    if (type == 0) {
        auto it = software_.find(addr);
        if (!insert) {
            if (it != software_.end()) {
                const uint8_t original = it->second;
                software_.erase(it);
                if (target_.write_virtual(general_vcpu_, addr, std::span(&original, 1)) != 1)
                    return kErrorMemory;
            }
            return "OK";
        }
        if (it != software_.end())
            return "OK";
        uint8_t original;
        if (target_.read_virtual(general_vcpu_, addr, std::span(&original, 1)) != 1 ||
            target_.write_virtual(general_vcpu_, addr, std::span(&kInt3, 1)) != 1)
            return kErrorMemory;
        software_[addr] = original;
        return "OK";
    }
    // x86 debug registers watch writes, or reads and writes, never reads alone.
    if (type != 1 && type != 2 && type != 4)
        return "";
    const uint64_t len = type == 1 ? 1 : kind;
    if (len == 0 || len > 4 * 8 || addr + len < addr)
        return kErrorBadArgs;
    auto asked = [&](const std::optional<HwPoint>& p) {
        return p && p->type == static_cast<int>(type) && p->asked_addr == addr && p->asked_len == len;
    };
    if (!insert) {
        for (auto& p : hardware_)
            if (asked(p))
                p.reset();
        return "OK";
    }
    if (std::any_of(hardware_.begin(), hardware_.end(), asked))
        return "OK";
    // The hardware watches aligned 1, 2, 4 or 8 bytes: cut the range into the
    // fewest such pieces, as Linux's ptrace does for gdb on a native process.
    std::vector<HwPoint> pieces;
    for (uint64_t at = addr, left = len; left > 0;) {
        uint64_t size = 8;
        while (size > left || at % size)
            size /= 2;
        pieces.push_back({static_cast<int>(type), at, size, addr, len});
        at += size;
        left -= size;
    }
    const auto free = static_cast<size_t>(std::count(hardware_.begin(), hardware_.end(), std::nullopt));
    if (pieces.size() > free)
        return "E1c";  // ENOSPC: not enough of the four debug registers are free
    auto slot = hardware_.begin();
    for (const HwPoint& piece : pieces) {
        slot = std::find(slot, hardware_.end(), std::nullopt);
        *slot = piece;
    }
    return "OK";
}

std::string GdbStub::resume(bool step, std::string_view address)
{
    if (!address.empty()) {
        uint64_t rip;
        X86Registers regs;
        const unsigned vcpu = step ? step_vcpu_ : general_vcpu_;
        if (!parse_hex_number(address, rip) || !target_.get_registers(vcpu, regs))
            return kErrorBadArgs;
        regs.rip = rip;
        if (!target_.set_registers(vcpu, regs))
            return kErrorBadArgs;
    }
    running_ = true;
    target_.run_guest(debug_setup(), step ? static_cast<int>(step_vcpu_) : -1);
    return "";
}

std::optional<std::string> GdbStub::vcont(std::string_view actions)
{
    // "s:2;c": the first action that steps a thread wins; otherwise all continue.
    int step = -1;
    bool any = false;
    while (!actions.empty()) {
        const size_t semicolon = actions.find(';');
        std::string_view action = actions.substr(0, semicolon);
        actions = semicolon == std::string_view::npos ? std::string_view() : actions.substr(semicolon + 1);
        if (action.empty())
            return std::string(kErrorBadArgs);
        const char what = action[0];
        std::string_view thread;
        if (const size_t colon = action.find(':'); colon != std::string_view::npos)
            thread = action.substr(colon + 1);
        if (what != 'c' && what != 'C' && what != 's' && what != 'S')
            return std::string(kErrorBadArgs);
        int vcpu = -1;
        if (!thread.empty() && !parse_thread(thread, vcpu))
            return std::string(kErrorBadArgs);
        any = true;
        if ((what == 's' || what == 'S') && step < 0)
            step = vcpu >= 0 ? vcpu : static_cast<int>(step_vcpu_);
    }
    if (!any)
        return std::string(kErrorBadArgs);
    if (step >= 0)
        step_vcpu_ = static_cast<unsigned>(step);
    running_ = true;
    target_.run_guest(debug_setup(), step);
    return std::nullopt;
}

std::string GdbStub::xfer(std::string_view args) const
{
    // "target.xml:offset,length"
    const size_t colon = args.find(':');
    uint64_t offset, length;
    if (colon == std::string_view::npos || !parse_pair(args.substr(colon + 1), offset, length))
        return kErrorBadArgs;
    if (args.substr(0, colon) != "target.xml")
        return "E00";
    const std::string& xml = target_xml();
    if (offset >= xml.size())
        return "l";
    length = std::min<uint64_t>(length, kGdbMaxPacket - 8);
    const std::string part = xml.substr(offset, length);
    return (offset + part.size() < xml.size() ? "m" : "l") + part;
}

std::string GdbStub::stop_reply(const DebugExit& exit) const
{
    const std::string thread = "thread:" + hex_number(exit.vcpu + 1) + ";";
    if (exit.kind == DebugExit::Kind::kStopped)
        return "T02" + thread;  // SIGINT: what gdb shows for its Ctrl-C
    if (exit.exception == 3)
        return "T05" + thread + "swbreak:;";
    if (exit.dr6 & kDr6SingleStep)
        return "T05" + thread;
    for (unsigned i = 0; i < hardware_.size(); ++i) {
        if (!(exit.dr6 & (1ull << i)) || !hardware_[i])
            continue;
        const HwPoint& p = *hardware_[i];
        if (p.type == 1)
            return "T05" + thread + "hwbreak:;";
        return "T05" + thread + (p.type == 2 ? "watch:" : "awatch:") + hex_number(p.addr) + ";";
    }
    return "T05" + thread;
}

std::optional<std::string> GdbStub::stopped(std::span<const DebugExit> exits)
{
    const DebugExit* reported = nullptr;
    for (const DebugExit& exit : exits) {
        if (exit.kind == DebugExit::Kind::kException && exit.exception == 3 && !software_.contains(exit.pc)) {
            // Not ours now. Still an int3 there: the guest's own (Linux patches
            // code with them), so it gets it. Otherwise one of ours that was
            // taken out meanwhile: the vCPU runs the original instruction.
            uint8_t byte = 0;
            if (target_.read_virtual(exit.vcpu, exit.pc, std::span(&byte, 1)) == 1 && byte == kInt3)
                target_.reinject_breakpoint(exit.vcpu);
            continue;
        }
        if (!reported)
            reported = &exit;
    }
    if (!reported || !running_)
        return std::nullopt;
    running_ = false;
    general_vcpu_ = step_vcpu_ = reported->vcpu;
    last_stop_ = stop_reply(*reported);
    return last_stop_;
}

void GdbStub::detach()
{
    for (const auto& [addr, original] : software_)
        target_.write_virtual(general_vcpu_, addr, std::span(&original, 1));
    software_.clear();
    hardware_ = {};
    last_stop_.reset();
    running_ = false;
}

}  // namespace lkvm
