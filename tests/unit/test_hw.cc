// Buses, guest memory, PCI configuration space, the UART and the platform devices.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "base/error.h"
#include "base/fd.h"
#include "base/log.h"
#include "hw/bus.h"
#include "hw/guest_memory.h"
#include "hw/pci.h"
#include "hw/platform.h"
#include "hw/serial8250.h"
#include "kvm/console.h"
#include "kvm/kvm.h"
#include "kvm/vcpu_gate.h"
#include "kvm/virtio_host.h"
#include "tests/unit/test_util.h"

using namespace lkvm;

namespace {
struct RecordingDevice : BusDevice {
    uint64_t last_offset = ~0ull;
    std::vector<uint8_t> written;
    void read(uint64_t offset, std::span<uint8_t> data) override
    {
        last_offset = offset;
        for (auto& b : data)
            b = 0x5a;
    }
    void write(uint64_t offset, std::span<const uint8_t> data) override
    {
        last_offset = offset;
        written.assign(data.begin(), data.end());
    }
};
}  // namespace

TEST_CASE("bus: dispatches by range with offsets relative to the device")
{
    Bus bus("test");
    RecordingDevice a, b;
    bus.add(0x100, 0x10, a);
    bus.add(0x110, 0x10, b);
    std::array<uint8_t, 2> buf{};
    CHECK(bus.read(0x112, buf));
    CHECK(b.last_offset == 2);
    CHECK(buf[0] == 0x5a);
    const uint8_t v[] = {1, 2, 3, 4};
    CHECK(bus.write(0x10c, v));
    CHECK(a.last_offset == 0xc);
    CHECK(a.written == std::vector<uint8_t>{1, 2, 3, 4});
}

TEST_CASE("bus: unclaimed and straddling accesses read all ones and reach no device")
{
    Bus bus("test");
    RecordingDevice a;
    bus.add(0x100, 0x10, a);
    std::array<uint8_t, 4> buf{};
    CHECK_FALSE(bus.read(0x200, buf));
    CHECK(buf == std::array<uint8_t, 4>{0xff, 0xff, 0xff, 0xff});
    CHECK_FALSE(bus.read(0x10e, buf));  // runs past the end of the range
    CHECK(a.last_offset == ~0ull);
    CHECK_FALSE(bus.read(0xff, buf));   // starts before it
}

TEST_CASE("bus: overlapping, empty and wrapping ranges are refused")
{
    Bus bus("test");
    RecordingDevice a;
    bus.add(0x100, 0x10, a);
    CHECK_THROWS_AS(bus.add(0x108, 0x10, a), Error);
    CHECK_THROWS_AS(bus.add(0xf8, 0x10, a), Error);
    CHECK_THROWS_AS(bus.add(0x100, 0x10, a), Error);
    CHECK_THROWS_AS(bus.add(0x300, 0, a), Error);
    CHECK_THROWS_AS(bus.add(~0ull - 4, 0x10, a), Error);
    bus.add(0x110, 0x10, a);  // adjacent is fine
    CHECK(bus.remove(0x100, a));
    bus.add(0x108, 0x8, a);   // and the freed space is usable again
}

TEST_CASE("bus: a range is removed only by the device that owns it")
{
    Bus bus("test");
    RecordingDevice a, b;
    bus.add(0x100, 0x10, b);
    CHECK_THROWS_AS(bus.add(0x100, 0x10, a), Error);  // a BAR placed over another: b keeps the range
    CHECK_FALSE(bus.remove(0x100, a));                 // and a moving on does not take it
    const uint8_t v[] = {1};
    CHECK(bus.write(0x104, v));
    CHECK(b.last_offset == 4);
    CHECK_FALSE(bus.remove(0x108, b));  // not where b's range starts
    CHECK(bus.remove(0x100, b));
    CHECK_FALSE(bus.remove(0x100, b));
    CHECK_FALSE(bus.write(0x104, v));
}

TEST_CASE("bus: a device may re-register ranges on its own bus while it handles an access")
{
    // What a configuration write through port 0xcfc does when it moves an I/O BAR.
    struct Mover : BusDevice {
        Bus* bus = nullptr;
        RecordingDevice moved;
        void read(uint64_t, std::span<uint8_t>) override {}
        void write(uint64_t, std::span<const uint8_t>) override
        {
            bus->remove(0x200, moved);
            bus->add(0x300, 0x10, moved);
        }
    } mover;
    Bus bus("test");
    mover.bus = &bus;
    bus.add(0x100, 0x10, mover);
    bus.add(0x200, 0x10, mover.moved);
    const uint8_t v[] = {1};
    CHECK(bus.write(0x100, v));
    CHECK_FALSE(bus.write(0x200, v));
    CHECK(bus.write(0x305, v));
    CHECK(mover.moved.last_offset == 5);
}

// A guest can place BAR A at BAR B's base; A is then refused (B keeps the
// range), and when A moves on, the host must not take B's range down with it:
// the bus removes a range only for the device that owns it.
TEST_CASE("virtio host: moving a BAR away never unmaps the device it was placed over")
{
    std::optional<Kvm> kvm;
    std::optional<Vm> vm;
    try {
        kvm.emplace(Kvm::open());
        vm.emplace(*kvm);
    } catch (const Error& e) {
        MESSAGE("skipped, no usable /dev/kvm here: " << e.what());
        return;
    }
    Bus mmio("mmio"), pio("pio");
    KvmVirtioHost host(*vm, mmio, pio);
    RecordingDevice a, b;
    const uint8_t v[] = {1};
    CHECK(host.map_bar(AddressSpace::kMemory, b, 0, 0x10000, 0x1000));
    CHECK_FALSE(host.map_bar(AddressSpace::kMemory, a, 0, 0x10000, 0x1000));  // aliased onto B: refused
    // A moves on from where it never got a range.
    CHECK(host.map_bar(AddressSpace::kMemory, a, 0x10000, 0x20000, 0x1000));
    CHECK(mmio.write(0x10004, v));
    CHECK(b.last_offset == 4);
    CHECK(mmio.write(0x20008, v));
    CHECK(a.last_offset == 8);
    // The same in port space, and an unmap (new address 0) of a range that is not the device's.
    CHECK(host.map_bar(AddressSpace::kPort, b, 0, 0x6000, 0x10));
    CHECK_FALSE(host.map_bar(AddressSpace::kPort, a, 0x6000, 0, 0x10));
    CHECK(pio.write(0x6002, v));
    CHECK(b.last_offset == 2);
}

TEST_CASE("guest memory: every range is checked whole")
{
    std::vector<uint8_t> low(0x1000), high(0x1000);
    GuestMemory mem({{0, low.size(), low.data()}, {0x10000, high.size(), high.data()}});
    CHECK(mem.span(0, 0x1000).has_value());
    CHECK(mem.span(0xfff, 1).has_value());
    CHECK_FALSE(mem.span(0xfff, 2).has_value());          // crosses the end
    CHECK_FALSE(mem.span(0x1000, 1).has_value());         // in the gap
    CHECK_FALSE(mem.span(0x800, 0x10000).has_value());    // spans into the next region
    CHECK_FALSE(mem.span(0x10ff0, ~0ull).has_value());    // length overflows
    CHECK_FALSE(mem.span(~0ull, 2).has_value());          // address wraps
    CHECK(mem.write_obj<uint32_t>(0x10010, 0xdeadbeef));
    CHECK(mem.read_obj<uint32_t>(0x10010) == 0xdeadbeef);
    CHECK_FALSE(mem.read_obj<uint64_t>(0x10ffc).has_value());
    CHECK_THROWS_AS(GuestMemory({{0, 0x2000, low.data()}, {0x1000, 0x1000, high.data()}}), Error);
}

namespace {
struct TestPciDevice : PciDevice {
    int changes = 0;
    TestPciDevice() : PciDevice(0x1af4, 0x1042, 0x010000, 1, 0x1af4, 2)
    {
        add_bar(0, 0x4000, BarKind::kMem64);
        const uint8_t body[] = {0xaa, 0xbb};
        add_capability(0x09, body);
    }
    void config_changed() override { ++changes; }
};
constexpr uint32_t config_address(unsigned slot, unsigned reg) { return 0x80000000u | (slot << 11) | reg; }
}  // namespace

TEST_CASE("pci: configuration mechanism #1 reaches the host bridge and the devices")
{
    PciHostBridge bridge(0xc0000000, 0x10000000, 0x6000, 0xa000);
    TestPciDevice device;
    const unsigned slot = bridge.add_device(device);
    CHECK(slot == 1);

    auto out32 = [&](uint64_t off, uint32_t v) {
        bridge.write(off, std::span(reinterpret_cast<const uint8_t*>(&v), 4));
    };
    auto in = [&](uint64_t off, size_t size) {
        uint32_t v = 0;
        bridge.read(off, std::span(reinterpret_cast<uint8_t*>(&v), size));
        return v;
    };
    out32(0, config_address(0, 0));
    CHECK(in(0, 4) == config_address(0, 0));
    CHECK(in(4, 4) == 0x29c08086u);                 // the host bridge
    out32(0, config_address(0, 8));
    CHECK(in(4 + 3, 1) == 0x06);                    // class: bridge
    out32(0, config_address(slot, 0));
    CHECK(in(4, 2) == 0x1af4);
    CHECK(in(6, 2) == 0x1042);                      // byte offsets within the data port
    out32(0, config_address(7, 0));
    CHECK(in(4, 4) == 0xffffffffu);                 // an empty slot
    out32(0, 0x00000000u | (slot << 11));           // enable bit clear
    CHECK(in(4, 4) == 0xffffffffu);
}

TEST_CASE("pci: BARs size, move and report changes; read-only fields stay")
{
    PciHostBridge bridge(0xc0000000, 0x10000000, 0x6000, 0xa000);
    TestPciDevice device;
    bridge.add_device(device);
    CHECK(device.bar_address(0) == 0xc0000000);
    CHECK((device.config_read(0x10, 4) & 0x6) == 0x4);  // 64-bit memory BAR

    device.config_write(0x10, 4, 0xffffffff);
    device.config_write(0x14, 4, 0xffffffff);
    CHECK(device.config_read(0x10, 4) == (0xffffc000u | 0x4));
    CHECK(device.config_read(0x14, 4) == 0xffffffffu);
    CHECK(device.changes > 0);

    device.config_write(0x10, 4, 0xd0000000);
    device.config_write(0x14, 4, 0x1);
    CHECK(device.bar_address(0) == 0x1d0000000ull);

    device.config_write(0x00, 4, 0x12345678);  // vendor/device are read-only
    CHECK(device.config_read(0x00, 4) == 0x10421af4u);
    device.config_write(0x04, 2, 0x0002);
    CHECK(device.memory_enabled());

    // Capability list: status bit set, pointer to 0x40, entry intact.
    CHECK((device.config_read(0x06, 2) & 0x10) != 0);
    CHECK(device.config_read(0x34, 1) == 0x40);
    CHECK(device.config_read(0x40, 4) == 0xbbaa0009u);
}

namespace {
struct IoBarDevice : PciDevice {
    IoBarDevice() : PciDevice(0x1af4, 0x1042, 0x010000, 1, 0x1af4, 2)
    {
        add_bar(0, 0x4000, BarKind::kMem64);
        add_bar(2, 0x40, BarKind::kIo);
        add_bar(3, 4, BarKind::kIo);
    }
};
struct BadBar : PciDevice {
    BadBar(unsigned index, uint64_t size, BarKind kind) : PciDevice(0x1af4, 0x1042, 0x010000, 1, 0x1af4, 2)
    {
        add_bar(index, size, kind);
    }
};
}  // namespace

TEST_CASE("pci: I/O BARs: bit 0 set, ports from the I/O window, sizing, 16-bit decode, I/O enable")
{
    PciHostBridge bridge(0xc0000000, 0x10000000, 0x6000, 0xa000);
    IoBarDevice a, b;
    bridge.add_device(a);
    bridge.add_device(b);
    CHECK(a.bar_address(0) == 0xc0000000);          // memory BARs as before
    CHECK(a.config_read(0x18, 4) == (0x6000u | 1));  // I/O space indicator
    CHECK(a.bar_address(2) == 0x6000);
    CHECK(a.bar_address(3) == 0x6040);
    CHECK(b.bar_address(2) == 0x6080);               // aligned to its size, after a's
    CHECK(b.bar_address(3) == 0x60c0);
    CHECK_FALSE(a.io_enabled());
    a.config_write(0x04, 2, 0x1);
    CHECK(a.io_enabled());
    CHECK_FALSE(a.memory_enabled());

    // Sizing: all ones reads back the size mask, bit 0 stays; the upper 16 bits are hardwired to zero.
    a.config_write(0x18, 4, 0xffffffff);
    CHECK(a.config_read(0x18, 4) == 0xffc1u);
    a.config_write(0x1c, 4, 0xffffffff);
    CHECK(a.config_read(0x1c, 4) == 0xfffdu);
    // A guest's value keeps only what decodes: aligned, below 64K.
    a.config_write(0x18, 4, 0x12347fff);
    CHECK(a.bar_address(2) == 0x7fc0);
    a.config_write(0x18, 1, 0x00);                   // byte writes too
    CHECK(a.config_read(0x18, 4) == (0x7f00u | 1));

    CHECK_THROWS_AS(BadBar(2, 2, PciDevice::BarKind::kIo), Error);    // below 4 bytes
    CHECK_THROWS_AS(BadBar(2, 12, PciDevice::BarKind::kIo), Error);   // not a power of two
    CHECK_THROWS_AS(BadBar(2, 512, PciDevice::BarKind::kIo), Error);  // beyond PCI's 256
    CHECK_THROWS_AS(PciHostBridge(0xc0000000, 0x1000, 0xf000, 0x2000), Error);  // past 64K ports

    // The window runs out: an error, not an overlap.
    PciHostBridge small(0xc0000000, 0x10000000, 0x6000, 0x80);
    IoBarDevice c, d;
    small.add_device(c);
    CHECK_THROWS_AS(small.add_device(d), Error);
}

namespace {
struct UartHarness {
    std::vector<bool> irq_levels;
    std::string output;
    Serial8250 uart{[this](bool high) { irq_levels.push_back(high); },
                    [this](uint8_t b) { output.push_back(static_cast<char>(b)); }};
    uint8_t in(unsigned reg)
    {
        uint8_t v = 0;
        uart.read(reg, std::span(&v, 1));
        return v;
    }
    void out(unsigned reg, uint8_t v) { uart.write(reg, std::span(&v, 1)); }
    bool irq() const { return !irq_levels.empty() && irq_levels.back(); }
};
}  // namespace

TEST_CASE("8250: transmit, line status and the divisor latch")
{
    UartHarness h;
    CHECK(h.in(5) == 0x60);  // THR empty and transmitter empty, no data
    h.out(0, 'h');
    h.out(0, 'i');
    CHECK(h.output == "hi");
    h.out(3, 0x80);          // DLAB
    h.out(0, 0x01);
    h.out(1, 0x00);
    CHECK(h.in(0) == 0x01);
    CHECK(h.output == "hi"); // divisor writes are not output
    h.out(3, 0x03);
    h.out(7, 0x42);
    CHECK(h.in(7) == 0x42);  // scratch register
}

TEST_CASE("8250: receive interrupt follows data, THRE interrupt is acknowledged by IIR")
{
    UartHarness h;
    h.out(1, 0x01);          // receive interrupt enabled
    CHECK_FALSE(h.irq());
    const uint8_t keys[] = {'a', 'b'};
    h.uart.receive(keys);
    CHECK(h.irq());
    CHECK((h.in(2) & 0x0f) == 0x04);
    CHECK((h.in(5) & 0x01) == 0x01);
    CHECK(h.in(0) == 'a');
    CHECK(h.in(0) == 'b');
    CHECK_FALSE(h.irq());
    CHECK((h.in(2) & 0x0f) == 0x01);

    h.out(1, 0x03);          // THRE enabled while the transmitter is empty: raised at once
    CHECK(h.irq());
    CHECK((h.in(2) & 0x0f) == 0x02);
    CHECK_FALSE(h.irq());    // that read acknowledged it
    h.out(0, 'x');           // and the next byte sent raises it again
    CHECK(h.irq());
}

// What Linux's 8250 driver relies on to keep transmitting: its startup test
// (serial8250_do_startup) acknowledges THRE by reading IIR, turns THRI off and
// on, and expects THRE again; were it not re-raised, the driver would treat the
// UART as buggy and fall back to polling it from a timer. And an IIR read that
// reports received data must leave a pending THRE for the next read.
TEST_CASE("8250: THRE is raised again when THRI is re-enabled, and acknowledged only when IIR reports it")
{
    UartHarness h;
    h.out(1, 0x02);
    CHECK((h.in(2) & 0x0f) == 0x02);
    CHECK((h.in(2) & 0x0f) == 0x01);  // acknowledged
    h.out(1, 0x00);
    h.out(1, 0x02);
    CHECK(h.irq());
    CHECK((h.in(2) & 0x0f) == 0x02);

    h.out(1, 0x03);
    h.out(0, 'x');                    // THRE pending again
    const uint8_t key = 'k';
    h.uart.receive(std::span(&key, 1));
    CHECK((h.in(2) & 0x0f) == 0x04);  // received data first
    CHECK(h.in(0) == 'k');
    CHECK(h.irq());
    CHECK((h.in(2) & 0x0f) == 0x02);  // THRE survived the read that reported data
    CHECK_FALSE(h.irq());
}

TEST_CASE("8250: loopback returns transmitted bytes and wires modem lines")
{
    UartHarness h;
    h.out(4, 0x10 | 0x02);   // loopback, RTS
    h.out(0, 'z');
    CHECK(h.output.empty());
    CHECK(h.in(0) == 'z');
    CHECK((h.in(6) & 0xf0) == 0x10);  // CTS from RTS
    h.out(2, 0x07);          // FIFO enable and clear
    CHECK((h.in(2) & 0xc0) == 0xc0);
}

TEST_CASE("i8042: command 0xfe resets; a controller with nothing attached answers its probe")
{
    std::vector<GuestRequest> requests;
    I8042 kbc([&](GuestRequest r) { requests.push_back(r); });
    auto out = [&](uint16_t port, uint8_t v) { kbc.write(port - I8042::kDataPort, std::span(&v, 1)); };
    auto in = [&](uint16_t port) {
        uint8_t v = 0;
        kbc.read(port - I8042::kDataPort, std::span(&v, 1));
        return v;
    };
    CHECK((in(0x64) & 0x01) == 0);
    out(0x64, 0xaa);
    CHECK((in(0x64) & 0x01) == 1);
    CHECK(in(0x60) == 0x55);
    out(0x64, 0x60);
    out(0x60, 0x47);
    out(0x64, 0x20);
    CHECK(in(0x60) == 0x47);
    CHECK(requests.empty());
    out(0x64, 0xfe);
    REQUIRE(requests.size() == 1);
    CHECK(requests[0] == GuestRequest::kReset);
}

TEST_CASE("ACPI power registers: S5 powers off, the reset value resets, the exit port reports")
{
    std::vector<GuestRequest> requests;
    std::vector<int> exits;
    PowerControl power([&](GuestRequest r) { requests.push_back(r); }, [&](uint8_t s) { exits.push_back(s); });
    auto out = [&](uint16_t port, uint8_t v) { power.write(port - PowerControl::kBase, std::span(&v, 1)); };
    out(PowerControl::kSleepControl, 5 << 2);          // SLP_TYP without SLP_EN: nothing
    out(PowerControl::kSleepControl, (3 << 2) | 0x20); // S3: not supported, nothing
    CHECK(requests.empty());
    out(PowerControl::kSleepControl, (5 << 2) | 0x20);
    out(PowerControl::kReset, 0x02);                   // not the reset value
    out(PowerControl::kReset, PowerControl::kResetValue);
    out(PowerControl::kExitStatus, 7);
    CHECK(requests == std::vector<GuestRequest>{GuestRequest::kPowerOff, GuestRequest::kReset});
    CHECK(exits == std::vector<int>{7});
}

namespace {
// What fn writes to stderr (fd 2, where lkvm logs).
std::string stderr_of(const std::function<void()>& fn)
{
    std::fflush(stderr);
    FILE* capture = std::tmpfile();
    REQUIRE(capture != nullptr);
    const int saved = ::dup(STDERR_FILENO);
    ::dup2(::fileno(capture), STDERR_FILENO);
    fn();
    std::fflush(stderr);
    ::dup2(saved, STDERR_FILENO);
    ::close(saved);
    std::rewind(capture);
    std::string out;
    char buffer[256];
    while (const size_t n = std::fread(buffer, 1, sizeof(buffer), capture))
        out.append(buffer, n);
    std::fclose(capture);
    return out;
}
}  // namespace

TEST_CASE("log: a level shows its own messages and the more severe ones; --quiet's level only errors")
{
    auto every_level = [] {
        log_error("e");
        log_warn("w");
        log_info("i");
        log_debug("d");
    };
    set_log_level(LogLevel::kError);
    CHECK(stderr_of(every_level) == "lkvm: e\n");
    set_log_level(LogLevel::kWarn);
    CHECK(stderr_of(every_level) == "lkvm: e\nlkvm: w\n");
    set_log_level(LogLevel::kInfo);
    CHECK(stderr_of(every_level) == "lkvm: e\nlkvm: w\nlkvm: i\n");
    set_log_level(LogLevel::kDebug);
    CHECK(stderr_of(every_level) == "lkvm: e\nlkvm: w\nlkvm: i\nlkvm: d\n");
    CHECK(stderr_of([] { log_at(LogLevel::kWarn, "disk 0: I/O error"); }) == "lkvm: disk 0: I/O error\n");
    set_log_level(LogLevel::kInfo);  // the default, for the tests that follow
}

TEST_CASE("console: --console-log gets what the guest prints, appended to what the file held")
{
    test::TempDir dir;
    const std::string path = (dir.path / "console.log").string();
    std::ofstream(path) << "earlier run\n";
    int out[2];
    REQUIRE(::pipe(out) == 0);
    Fd out_read(out[0]), out_write(out[1]);
    Fd no_input(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    {
        const Fd log = open_console_log(path);
        Console console(no_input.get(), out_write.get(), log.get());
        for (const char c : std::string("Linux version 6.1\r\n"))
            console.output(static_cast<uint8_t>(c));
    }
    char buffer[64] = {};
    CHECK(std::string(buffer, static_cast<size_t>(::read(out_read.get(), buffer, sizeof(buffer)))) ==
          "Linux version 6.1\r\n");
    std::stringstream logged;
    logged << std::ifstream(path).rdbuf();
    CHECK(logged.str() == "earlier run\nLinux version 6.1\r\n");

    // A new file is created, readable by all as 0644 asks (less the umask), writable by us.
    const std::string fresh = (dir.path / "fresh.log").string();
    { const Fd log = open_console_log(fresh); }
    struct stat st {};
    REQUIRE(::stat(fresh.c_str(), &st) == 0);
    CHECK((st.st_mode & 0200) != 0);
    CHECK((st.st_mode & 0111) == 0);
    CHECK_THROWS_WITH_AS(open_console_log((dir.path / "no-such-dir" / "x.log").string()),
                         doctest::Contains("--console-log"), Error);
}

namespace {
// Stand-ins for vCPU threads: each "runs the guest" in slices that a kick
// ends early, as KVM_RUN returns on a signal, and looks at the gate between.
struct FakeVcpus {
    std::atomic<bool> kicked{false};
    VcpuGate gate{[this] { kicked = true; }};
    std::vector<std::atomic<uint64_t>> runs;
    std::vector<std::thread> threads;

    explicit FakeVcpus(unsigned count, unsigned exits_after = ~0u) : runs(count)
    {
        gate.set_threads(count);
        for (unsigned i = 0; i < count; ++i)
            threads.emplace_back([this, i, exits_after] {
                while (!gate.stopping()) {
                    if (gate.held(i)) {
                        gate.park(i, [this] { kicked = false; });
                        continue;
                    }
                    if (runs[i] == exits_after)
                        break;  // as a vCPU that ended the guest (a triple fault)
                    ++runs[i];
                    for (int slice = 0; slice < 100 && !kicked; ++slice)
                        std::this_thread::sleep_for(std::chrono::microseconds(10));
                }
                gate.leave();
            });
    }
    ~FakeVcpus() { stop(); }
    void stop()
    {
        gate.stop();
        for (auto& t : threads)
            if (t.joinable())
                t.join();
    }
    uint64_t total() const
    {
        uint64_t n = 0;
        for (const auto& r : runs)
            n += r;
        return n;
    }
    void wait_for_runs(uint64_t more)
    {
        const uint64_t target = total() + more;
        for (int waited = 0; total() < target && waited < 5000; ++waited)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        REQUIRE(total() >= target);
    }
};
}  // namespace

TEST_CASE("vCPU gate: pause returns with every vCPU parked, resume lets them run, both idempotent")
{
    FakeVcpus vcpus(4);
    vcpus.wait_for_runs(8);
    for (int round = 0; round < 3; ++round) {
        vcpus.gate.pause();
        CHECK(vcpus.gate.paused());
        vcpus.gate.pause();
        const uint64_t parked_at = vcpus.total();
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        CHECK(vcpus.total() == parked_at);  // nobody entered the guest while paused
        vcpus.gate.resume();
        vcpus.gate.resume();
        CHECK_FALSE(vcpus.gate.paused());
        vcpus.wait_for_runs(8);
    }
}

TEST_CASE("vCPU gate: a stop ends paused vCPUs at once; a vCPU that left its loop is not waited for")
{
    SUBCASE("stop while paused")
    {
        FakeVcpus vcpus(3);
        vcpus.gate.pause();
        const auto start = std::chrono::steady_clock::now();
        vcpus.stop();
        CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(2));
        vcpus.gate.pause();  // after a stop: returns, nothing to pause
        vcpus.gate.resume();
    }
    SUBCASE("a vCPU ended the guest")
    {
        FakeVcpus vcpus(2, 3);
        vcpus.threads[0].join();
        vcpus.threads[1].join();
        vcpus.gate.pause();  // both left their loops: nothing to wait for
        CHECK(vcpus.gate.paused());
    }
    SUBCASE("pause before the vCPUs start: they park at once")
    {
        std::atomic<bool> ran{false};
        VcpuGate gate([] {});
        gate.pause();
        gate.set_threads(1);
        std::thread vcpu([&] {
            while (!gate.stopping()) {
                if (gate.held(0)) {
                    gate.park(0, [] {});
                    continue;
                }
                ran = true;
                break;
            }
            gate.leave();
        });
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        CHECK_FALSE(ran);
        gate.resume();
        vcpu.join();
        CHECK(ran);
    }
}
