// The gdb stub end to end below KVM: Debian's gdb against GdbServer on a
// real TCP socket, over a scripted VM that stops the way KVM does (an int3
// of ours, a debug register that fired, a single step, Ctrl-C). What the
// rig's QEMU cannot deliver to an L2 guest (int3 and debug-register exits)
// is covered here, with the same gdb as the system test.
#include <doctest/doctest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include <sys/socket.h>
#include <sys/time.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kvm/gdb_server.h"

using namespace lkvm;

namespace {
constexpr uint64_t kBase = 0xffffffff81000000ull;  // the scripted guest's memory, at a kernel address

// The VM as KVM would behave under the debug setup gdb asked for: a
// continue runs into the lowest int3 of ours at or after rip, or else fires
// the first write watchpoint (writing there, as the guest would), or else
// runs until interrupted; a step moves rip by one instruction of 1 byte.
struct ScriptedVm : GdbVm {
    boost::asio::io_context& io;
    GdbServer* server = nullptr;
    std::vector<uint8_t> memory = std::vector<uint8_t>(0x2000, 0x90);  // nops
    std::array<X86Registers, 2> regs{};
    std::atomic<bool> stopped = true;  // the test thread reads it while the server's loop runs: sockets order nothing for TSan
    std::vector<DebugExit> exits;
    std::vector<std::string> log;

    explicit ScriptedVm(boost::asio::io_context& io) : io(io)
    {
        regs[0].rip = regs[1].rip = kBase + 0x100;
        regs[1].rip = kBase + 0x800;
        regs[0].cr3 = 0x1000;
    }
    void stop_with(const DebugExit& exit)
    {
        stopped = true;
        exits.push_back(exit);
        boost::asio::post(io, [this] { server->vm_stopped(); });
    }
    unsigned vcpu_count() const override { return 2; }
    bool get_registers(unsigned v, X86Registers& out) override { return v < 2 && (out = regs[v], true); }
    bool set_registers(unsigned v, const X86Registers& in) override { return v < 2 && (regs[v] = in, true); }
    size_t read_virtual(unsigned, uint64_t gva, std::span<uint8_t> out) override
    {
        if (gva < kBase || gva - kBase >= memory.size() || out.empty())
            return 0;
        const size_t n = std::min<size_t>(out.size(), memory.size() - (gva - kBase));
        std::memcpy(out.data(), memory.data() + (gva - kBase), n);
        return n;
    }
    size_t write_virtual(unsigned, uint64_t gva, std::span<const uint8_t> in) override
    {
        if (gva < kBase || gva - kBase >= memory.size() || in.empty())
            return 0;
        const size_t n = std::min<size_t>(in.size(), memory.size() - (gva - kBase));
        std::memcpy(memory.data() + (gva - kBase), in.data(), n);
        return n;
    }
    void run_guest(const GuestDebugSetup& debug, int step) override
    {
        stopped = false;
        if (step >= 0) {
            log.push_back("step " + std::to_string(step));
            regs[step].rip += 1;
            return stop_with({static_cast<unsigned>(step), DebugExit::Kind::kException, 1, regs[step].rip, 1u << 14});
        }
        log.push_back("continue");
        if (debug.software_breakpoints) {
            for (uint64_t at = regs[0].rip - kBase; at < memory.size(); ++at)
                if (memory[at] == 0xcc) {
                    regs[0].rip = kBase + at;
                    return stop_with({0, DebugExit::Kind::kException, 3, kBase + at, 0});
                }
        }
        for (unsigned i = 0; i < 4 && debug.hardware_breakpoints; ++i) {
            const uint64_t enabled = (debug.dr7 >> (2 * i)) & 3, rw = (debug.dr7 >> (16 + 4 * i)) & 3;
            if (enabled && rw == 1 && debug.dr[i] >= kBase) {
                memory[debug.dr[i] - kBase] += 1;  // the guest writes there
                return stop_with({1, DebugExit::Kind::kException, 1, regs[1].rip, 1ull << i});
            }
        }
    }
    void reinject_breakpoint(unsigned) override { log.push_back("reinject"); }
    void interrupt() override { stop_with({0, DebugExit::Kind::kStopped, 0, 0, 0}); }
    void end_guest() override { log.push_back("end"); }
    void stop_and_wait() override { stopped = true; }
    bool debug_stopped() const override { return stopped; }
    std::vector<DebugExit> take_debug_exits() override { return std::exchange(exits, {}); }
};

std::string run_gdb(uint16_t port, const std::string& commands)
{
    const std::string command = "timeout 60 gdb -batch -nx -ex 'set pagination off' -ex 'target remote 127.0.0.1:" +
                                std::to_string(port) + "' " + commands + " 2>&1";
    std::string out;
    FILE* pipe = ::popen(command.c_str(), "r");
    REQUIRE_MESSAGE(pipe, "cannot start gdb: run scripts/install-deps.sh");
    char buffer[4096];
    size_t n;
    while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0)
        out.append(buffer, n);
    ::pclose(pipe);
    return out;
}

// One lkvm-like main loop with the server on an ephemeral port, and a gdb session against it.
struct Session {
    boost::asio::io_context io{1};
    ScriptedVm vm{io};
    std::optional<GdbServer> server;
    std::thread loop;
    Session()
    {
        server.emplace(io, "127.0.0.1", 0, vm);
        vm.server = &*server;
    }
    std::string gdb(const std::string& commands)
    {
        auto work = boost::asio::make_work_guard(io);
        loop = std::thread([this] { io.run(); });
        const std::string out = run_gdb(server->port(), commands);
        work.reset();
        boost::asio::post(io, [this] { io.stop(); });
        loop.join();
        INFO(out);
        return out;
    }
};

bool has(const std::string& out, const std::string& what) { return out.find(what) != std::string::npos; }
}  // namespace

TEST_CASE("gdb stub with Debian's gdb: threads, registers, memory")
{
    Session s;
    s.vm.memory[0x100] = 0x55;
    const std::string out =
        s.gdb("-ex 'info threads' -ex 'info registers rip' -ex 'info registers cr3' -ex 'x/2xb 0xffffffff81000100' "
              "-ex 'set {char}0xffffffff81000101 = 0x48' -ex 'thread 2' -ex 'info registers rip' -ex detach");
    CHECK(has(out, "(vCPU 0)"));
    CHECK(has(out, "(vCPU 1)"));
    CHECK(has(out, "rip            0xffffffff81000100"));
    CHECK(has(out, "cr3            0x1000"));
    CHECK(has(out, "0x55\t0x90"));
    CHECK(s.vm.memory[0x101] == 0x48);
    CHECK(has(out, "rip            0xffffffff81000800"));
    CHECK(has(out, "detached"));
    CHECK_FALSE(s.vm.stopped.load());  // gdb gone: the guest runs on
}

TEST_CASE("gdb stub with Debian's gdb: an int3 breakpoint, hidden from reads, then a step and a continue")
{
    Session s;
    s.vm.memory[0x180] = 0x0f;
    const std::string out = s.gdb(
        "-ex 'break *0xffffffff81000180' -ex continue -ex 'info registers rip' -ex 'x/1xb 0xffffffff81000180' "
        "-ex stepi -ex 'info registers rip' -ex 'delete' -ex detach");
    CHECK(has(out, "Breakpoint 1, 0xffffffff81000180"));
    CHECK(has(out, "rip            0xffffffff81000180"));
    CHECK(has(out, "0xffffffff81000180:\t0x0f"));  // the original byte, not the int3
    CHECK(has(out, "rip            0xffffffff81000181"));
    CHECK(s.vm.memory[0x180] == 0x0f);  // out of the guest again
    CHECK(std::find(s.vm.log.begin(), s.vm.log.end(), "step 0") != s.vm.log.end());
}

TEST_CASE("gdb stub with Debian's gdb: a hardware watchpoint fires on the guest's write")
{
    Session s;
    const std::string out =
        s.gdb("-ex 'watch *(char *)0xffffffff81000400' -ex continue -ex 'info registers rip' -ex delete -ex detach");
    CHECK(has(out, "Hardware watchpoint 1"));
    CHECK(has(out, "Old value = -112"));  // 0x90
    CHECK(has(out, "New value = -111"));
    CHECK(has(out, "rip            0xffffffff81000800"));  // vCPU 1 did it
}

TEST_CASE("gdb stub with Debian's gdb: a watchpoint on an unaligned long takes it in aligned pieces")
{
    // gdb asks for the 8 bytes as they are (Z2 at ...401, 8); a stub that
    // wants them aligned makes gdb say "Could not insert hardware watchpoint".
    Session s;
    const std::string out =
        s.gdb("-ex 'watch *(long *)0xffffffff81000401' -ex continue -ex delete -ex detach");
    CHECK(has(out, "Hardware watchpoint 1"));
    CHECK(has(out, "Old value = -8029759185026510704"));  // 0x9090909090909090
    CHECK(has(out, "New value = -8029759185026510703"));  // its first byte written
    CHECK_FALSE(has(out, "Could not insert"));
}

TEST_CASE("gdb stub: Ctrl-C (0x03) stops a running guest with SIGINT; a bad checksum gets '-'")
{
    // gdb's batch mode cannot send Ctrl-C between commands: the bytes it would send, by hand.
    boost::asio::io_context io{1};
    ScriptedVm vm{io};
    GdbServer server(io, "127.0.0.1", 0, vm);
    vm.server = &server;
    auto work = boost::asio::make_work_guard(io);
    std::thread loop([&] { io.run(); });
    boost::asio::io_context client_io;
    boost::asio::ip::tcp::socket client(client_io);
    client.connect({boost::asio::ip::make_address("127.0.0.1"), server.port()});
    const timeval limit{30, 0};  // a broken server fails the test instead of hanging it
    ::setsockopt(client.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    auto exchange = [&](const std::string& bytes, const std::string& until) {
        boost::asio::write(client, boost::asio::buffer(bytes));
        std::string got;
        std::array<char, 512> buffer;
        while (got.find(until) == std::string::npos) {
            const size_t n = client.read_some(boost::asio::buffer(buffer));
            got.append(buffer.data(), n);
        }
        return got;
    };
    CHECK(exchange("$g#00", "-") == "-");  // a wrong checksum: sent again, please
    CHECK(exchange(gdb_frame("vCont;c"), "+") == "+");
    CHECK_FALSE(vm.stopped.load());
    const std::string stop = exchange("\x03", "#");
    CHECK(stop.find("$T02thread:1;#") != std::string::npos);
    CHECK(vm.stopped.load());
    client.close();
    work.reset();
    boost::asio::post(io, [&] { io.stop(); });
    loop.join();
}
