// The boot protocol, firmware tables, CPUID, the command line and the console filters.
#include <doctest/doctest.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "base/error.h"
#include "cli/command_line.h"
#include "hw/guest_memory.h"
#include "kvm/boot.h"
#include "kvm/console.h"
#include "kvm/cpuid.h"
#include "kvm/firmware_tables.h"
#include "kvm/layout.h"
#include "tests/unit/test_util.h"

using namespace lkvm;

using lkvm::test::error_of;

namespace {
std::vector<uint8_t> real_bzimage()
{
    const char* path = std::getenv("LKVM_TEST_KERNEL");
    std::ifstream f(path ? path : "build/kernel/vmlinuz", std::ios::binary | std::ios::ate);
    REQUIRE_MESSAGE(f.good(), "the Debian kernel is missing: run scripts/install-deps.sh");
    // One read, not a byte at a time through istreambuf_iterator: that took
    // 40 s per call in the sanitizer trees, where the tests are built at -O0.
    std::vector<uint8_t> data(static_cast<size_t>(f.tellg()));
    f.seekg(0);
    REQUIRE(f.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size())));
    return data;
}

}  // namespace

TEST_CASE("bzImage: a real kernel's setup header is parsed and validated")
{
    const auto file = real_bzimage();
    const BzImage image = parse_bzimage(file, "vmlinuz");
    // Copies: setup_header is packed, and CHECK binds a reference to what it
    // is given (clang's UBSan: reference binding to a misaligned address).
    CHECK(uint32_t{image.header.header} == 0x53726448u);
    CHECK(uint16_t{image.header.version} >= 0x020c);
    CHECK((image.header.xloadflags & XLF_KERNEL_64) != 0);
    CHECK(image.setup.size() % 512 == 0);
    CHECK(image.setup.size() + image.kernel.size() == file.size());
    CHECK(image.max_cmdline >= 255);
    CHECK(image.init_size >= image.kernel.size());
}

TEST_CASE("bzImage: broken and old images are refused with what is wrong")
{
    auto file = real_bzimage();
    CHECK(error_of([&] { parse_bzimage(std::span(file).first(100), "k"); }).find("not a bzImage (too small)") != std::string::npos);
    auto bad_magic = file;
    bad_magic[0x202] = 'X';
    CHECK(error_of([&] { parse_bzimage(bad_magic, "k"); }).find("not a bzImage (no setup header)") != std::string::npos);
    auto old = file;
    old[0x206] = 0x04;  // version 2.04
    CHECK(error_of([&] { parse_bzimage(old, "k"); }).find("boot protocol 2.4 is too old") != std::string::npos);
    auto no64 = file;
    no64[0x236] &= ~XLF_KERNEL_64;
    CHECK(error_of([&] { parse_bzimage(no64, "k"); }).find("no 64-bit entry point") != std::string::npos);
    auto truncated = std::vector<uint8_t>(file.begin(), file.begin() + 2048);
    truncated[0x1f1] = 60;  // setup larger than the file
    CHECK(error_of([&] { parse_bzimage(truncated, "k"); }).find("truncated") != std::string::npos);
}

TEST_CASE("e820: RAM below the PCI hole, the rest above 4 GiB, BIOS areas reserved")
{
    const auto small = e820_map(512ull << 20);
    REQUIRE(small.size() == 4);
    CHECK(small[0].addr == 0);
    CHECK(small[0].size == layout::kEbdaStart);
    CHECK(small[0].type == 1);
    CHECK(small[1].type == 2);
    CHECK(small[2].addr == layout::kBiosStart);
    CHECK(small[2].type == 2);
    CHECK(small[3].addr == layout::kKernel);
    CHECK(small[3].addr + small[3].size == 512ull << 20);

    const auto big = e820_map(4096ull << 20);
    REQUIRE(big.size() == 5);
    CHECK(big[3].addr + big[3].size == layout::kPciHoleStart);
    CHECK(big[4].addr == layout::k4GiB);
    CHECK(big[4].size == (4096ull << 20) - layout::kPciHoleStart);
    for (const auto& e : big)
        CHECK_FALSE((e.addr < layout::k4GiB && e.addr + e.size > layout::kPciHoleStart));
}

TEST_CASE("boot: the zero page, command line, page tables and GDT land where the kernel looks")
{
    const auto file = real_bzimage();
    const BzImage image = parse_bzimage(file, "vmlinuz");
    const uint64_t ram_size = 256ull << 20;
    std::vector<uint8_t> ram(ram_size);
    GuestMemory mem({{0, ram_size, ram.data()}});
    const uint64_t initrd_size = 3 << 20;
    const uint64_t initrd = place_initrd(image, ram_size, initrd_size);
    CHECK(initrd % 4096 == 0);
    CHECK(initrd + initrd_size <= ram_size);
    CHECK(initrd >= layout::kKernel + image.init_size);
    load_linux(mem, image, "console=ttyS0 foo=bar", ram_size, {initrd, initrd_size, 0xe0000});

    boot_params params{};
    REQUIRE(mem.read(layout::kBootParams, &params, sizeof(params)));
    CHECK(params.hdr.type_of_loader == 0xff);
    CHECK(uint32_t{params.hdr.cmd_line_ptr} == layout::kCmdline);
    CHECK(uint32_t{params.hdr.ramdisk_image} == initrd);
    CHECK(uint32_t{params.hdr.ramdisk_size} == initrd_size);
    CHECK(uint64_t{params.acpi_rsdp_addr} == 0xe0000);
    CHECK(params.e820_entries == 4);
    CHECK(uint64_t{params.e820_table[3].addr} == layout::kKernel);
    CHECK(std::string(reinterpret_cast<char*>(&ram[layout::kCmdline])) == "console=ttyS0 foo=bar");
    CHECK(std::memcmp(&ram[layout::kKernel], image.kernel.data(), 4096) == 0);
    CHECK(entry_point_64() == layout::kKernel + 0x200);
    // The identity map covers 4 GiB with 2 MiB pages: check one entry in the last directory.
    const uint64_t pde = *mem.read_obj<uint64_t>(layout::kPageDirectories + 3 * 4096 + 511 * 8);
    CHECK(pde == (((3ull << 30) + 511 * (2ull << 20)) | 0x83));
    CHECK(*mem.read_obj<uint64_t>(layout::kGdt + 0x10) == 0x00af9b000000ffffull);
}

TEST_CASE("boot: an initrd or command line that does not fit is refused")
{
    const auto file = real_bzimage();
    const BzImage image = parse_bzimage(file, "vmlinuz");
    CHECK(error_of([&] { place_initrd(image, 128ull << 20, 200ull << 20); }).find("does not fit") != std::string::npos);
    std::vector<uint8_t> ram(128ull << 20);
    GuestMemory mem({{0, ram.size(), ram.data()}});
    const std::string huge(image.max_cmdline + 1, 'x');
    CHECK(error_of([&] { load_linux(mem, image, huge, ram.size(), {}); }).find("kernel command line is") != std::string::npos);
}

namespace {
// Reads a little-endian integer out of a table.
template <typename T>
T at(const std::vector<uint8_t>& t, size_t off)
{
    T v;
    std::memcpy(&v, &t[off], sizeof(T));
    return v;
}
}  // namespace

TEST_CASE("MP tables: floating pointer, checksums and one entry per CPU")
{
    const uint64_t base = layout::kMpTables;
    const auto t = build_mp_tables(base, {4, 0x800f12, 0x178bfbff});
    CHECK(std::string(t.begin(), t.begin() + 4) == "_MP_");
    CHECK(byte_sum(t.data(), 16) == 0);
    const uint32_t table = at<uint32_t>(t, 4);
    REQUIRE(table == base + 16);
    const size_t off = table - base;
    CHECK(std::string(t.begin() + off, t.begin() + off + 4) == "PCMP");
    const uint16_t length = at<uint16_t>(t, off + 4);
    CHECK(off + length == t.size());
    CHECK(byte_sum(&t[off], length) == 0);
    CHECK(at<uint32_t>(t, off + 36) == layout::kLocalApic);
    // Walk the entries: processors first, BSP flagged once.
    size_t p = off + 44, processors = 0, bsps = 0, ioapics = 0, irqs = 0;
    for (unsigned i = 0; i < at<uint16_t>(t, off + 34); ++i) {
        switch (t[p]) {
        case 0:
            ++processors;
            bsps += (t[p + 3] & 2) ? 1 : 0;
            CHECK(t[p + 1] == processors - 1);
            p += 20;
            break;
        case 2:
            ++ioapics;
            CHECK(t[p + 1] == kIoApicId(4));
            CHECK(at<uint32_t>(t, p + 4) == layout::kIoApic);
            p += 8;
            break;
        case 3: ++irqs; p += 8; break;
        default: p += 8; break;
        }
    }
    CHECK(p == t.size());
    CHECK(processors == 4);
    CHECK(bsps == 1);
    CHECK(ioapics == 1);
    CHECK(irqs == 16 + 31);  // ISA IRQs and each PCI slot's INTA#
}

TEST_CASE("ACPI: RSDP -> XSDT -> FADT (hardware-reduced) and MADT, DSDT with the host bridge and _S5")
{
    const uint64_t base = layout::kAcpiTables;
    const auto tables = build_acpi_tables(base, {3, 0, 0});
    const auto& t = tables.bytes;
    REQUIRE(tables.rsdp == base);
    CHECK(std::string(t.begin(), t.begin() + 8) == "RSD PTR ");
    CHECK(byte_sum(t.data(), 20) == 0);
    CHECK(byte_sum(t.data(), 36) == 0);
    const size_t xsdt = at<uint64_t>(t, 24) - base;
    auto table_ok = [&](size_t off, const char* sig) {
        CHECK(std::string(t.begin() + off, t.begin() + off + 4) == sig);
        CHECK(byte_sum(&t[off], at<uint32_t>(t, off + 4)) == 0);
    };
    table_ok(xsdt, "XSDT");
    REQUIRE(at<uint32_t>(t, xsdt + 4) == 36 + 16);
    const size_t fadt = at<uint64_t>(t, xsdt + 36) - base;
    const size_t madt = at<uint64_t>(t, xsdt + 44) - base;
    table_ok(fadt, "FACP");
    CHECK(at<uint32_t>(t, fadt + 4) == 276);
    CHECK((at<uint32_t>(t, fadt + 112) & (1u << 20)) != 0);  // HW_REDUCED_ACPI
    CHECK((at<uint32_t>(t, fadt + 112) & (1u << 10)) != 0);  // RESET_REG_SUP
    CHECK(at<uint64_t>(t, fadt + 116 + 4) == 0x602);        // reset register address
    CHECK(t[fadt + 128] == 1);
    CHECK(at<uint64_t>(t, fadt + 244 + 4) == 0x600);        // sleep control
    const size_t dsdt = at<uint64_t>(t, fadt + 140) - base;
    CHECK(at<uint32_t>(t, fadt + 40) == base + dsdt);
    table_ok(dsdt, "DSDT");
    const std::string aml(t.begin() + dsdt, t.begin() + dsdt + at<uint32_t>(t, dsdt + 4));
    CHECK(aml.find("PCI0") != std::string::npos);
    CHECK(aml.find("_S5_") != std::string::npos);
    CHECK(aml.find("COM1") != std::string::npos);
    CHECK(aml.find("RTC0") != std::string::npos);
    CHECK(aml.find(std::string("\x0c\x41\xd0\x0b\x00", 5)) != std::string::npos);  // EisaId("PNP0B00")
    CHECK((at<uint16_t>(t, fadt + 109) & (1u << 5)) == 0);  // IAPC_BOOT_ARCH: a CMOS RTC is present
    CHECK(aml.find("_PRT") != std::string::npos);
    CHECK(aml.find(std::string("\x0c\x41\xd0\x0a\x03", 5)) != std::string::npos);  // EisaId("PNP0A03")
    // The I/O window the host bridge gives I/O BARs from is one the _CRS forwards (WordIO descriptors).
    bool io_window_forwarded = false;
    for (size_t w = aml.find(std::string("\x88\x0d\x00\x01", 4)); w != std::string::npos;
         w = aml.find(std::string("\x88\x0d\x00\x01", 4), w + 1)) {
        const auto min = at<uint16_t>(t, dsdt + w + 8), max = at<uint16_t>(t, dsdt + w + 10);
        io_window_forwarded |= min <= layout::kPciIoBase && max >= layout::kPciIoBase + layout::kPciIoSize - 1;
    }
    CHECK(io_window_forwarded);

    table_ok(madt, "APIC");
    size_t p = madt + 44, lapics = 0, ioapics = 0;
    while (p < madt + at<uint32_t>(t, madt + 4)) {
        if (t[p] == 0) {
            CHECK(t[p + 3] == lapics);  // APIC ID
            CHECK(at<uint32_t>(t, p + 4) == 1);
            ++lapics;
        }
        ioapics += t[p] == 1;
        p += t[p + 1];
    }
    CHECK(lapics == 3);
    CHECK(ioapics == 1);
}

TEST_CASE("reset vector: the stub writes the ACPI reset value to the reset register")
{
    const auto stub = reset_vector_stub();
    REQUIRE(stub.size() <= 16);  // it must fit between F000:FFF0 and 1 MiB
    CHECK(stub[0] == 0xb0);
    CHECK(stub[1] == 0x01);
    CHECK(stub[2] == 0xba);
    CHECK((stub[3] | stub[4] << 8) == 0x602);
    CHECK(stub[5] == 0xee);
}

TEST_CASE("cpuid: each vCPU reports its own APIC ID and the hypervisor bit")
{
    std::vector<kvm_cpuid_entry2> supported(3);
    supported[0].function = 1;
    supported[0].ebx = 0xff00ffff;
    supported[1].function = 0xb;
    supported[2].function = 0x40000000;
    supported[2].ebx = 0x4b4d564b;
    const auto v = cpuid_for_vcpu(supported, {3, 4, true});
    CHECK((v[0].ebx >> 24) == 3);
    CHECK(((v[0].ebx >> 16) & 0xff) == 4);
    CHECK((v[0].ebx & 0xffff) == 0xffff);
    CHECK((v[0].ecx & (1u << 31)) != 0);
    CHECK((v[0].ecx & (1u << 24)) != 0);
    CHECK(v[1].edx == 3);
    CHECK(v[2].ebx == 0x4b4d564b);
}

TEST_CASE("cli: run options in kvmtool's spellings")
{
    const auto cmd = parse_command_line({"run", "-k", "bz", "--initrd=rd", "-p", "a=1", "--params", "b=2", "-c", "2",
                                         "--mem", "1G", "--name", "g", "--", "sh", "-c", "exit 7"});
    REQUIRE(cmd.kind == Command::Kind::kRun);
    CHECK(cmd.run.kernel == "bz");
    CHECK(cmd.run.initrd == "rd");
    CHECK(cmd.run.params == "a=1 b=2");
    CHECK(cmd.run.cpus == 2);
    CHECK(cmd.run.mem_mib == 1024);
    CHECK(cmd.run.name == "g");
    CHECK(cmd.run.command == std::vector<std::string>{"sh", "-c", "exit 7"});
    CHECK(parse_command_line({"run", "-m", "256"}).run.mem_mib == 256);
    CHECK(parse_command_line({"run", "-m", "300M"}).run.mem_mib == 300);
    CHECK(parse_command_line({}).kind == Command::Kind::kHelp);
    CHECK(parse_command_line({"--help"}).kind == Command::Kind::kHelp);
    CHECK(parse_command_line({"version"}).kind == Command::Kind::kVersion);
    CHECK(parse_command_line({"run", "--help"}).kind == Command::Kind::kRunHelp);
}

TEST_CASE("cli: every bad input has its own one-line message")
{
    auto msg = [](std::vector<std::string> args) { return error_of([&] { parse_command_line(args); }); };
    CHECK(msg({"run", "-c", "0"}) == "-c 0: a guest needs at least one vCPU (see 'lkvm run --help')");
    CHECK(msg({"run", "-c", "x"}) == "-c 'x': not a number (see 'lkvm run --help')");
    CHECK(msg({"run", "-c", "-1"}) == "-c '-1': not a number (see 'lkvm run --help')");
    CHECK(msg({"run", "-c", "5000"}) == "-c 5000: more vCPUs than KVM allows (see 'lkvm run --help')");
    CHECK(msg({"run", "-m", "63"}) == "-m 63: too little memory, a guest needs at least 64 MiB (see 'lkvm run --help')");
    CHECK(msg({"run", "-m", "lots"}) == "-m 'lots': not a number (see 'lkvm run --help')");
    CHECK(msg({"run", "-m", "99999999999G"}).find("far more memory") != std::string::npos);
    CHECK(msg({"run", "--bogus"}) == "unknown option '--bogus' (see 'lkvm run --help')");
    CHECK(msg({"run", "-k"}) == "option -k needs a value (see 'lkvm run --help')");
    CHECK(msg({"run", "stray"}) == "unexpected argument 'stray': put the guest command after '--' (see 'lkvm run --help')");
    CHECK(msg({"run", "--"}) == "nothing after '--': give the command the guest should run (see 'lkvm run --help')");
    CHECK(msg({"fly"}) == "unknown command 'fly' (see 'lkvm --help')");
}

TEST_CASE("cli: the guest command travels quoted and base64-encoded after the defaults, before -p")
{
    CHECK(shell_quote({"sh", "-c", "echo 'hi' there"}) == "'sh' '-c' 'echo '\\''hi'\\'' there'");
    CHECK(base64("") == "");
    CHECK(base64("f") == "Zg==");
    CHECK(base64("fo") == "Zm8=");
    CHECK(base64("foo") == "Zm9v");
    CHECK(base64("foobar") == "Zm9vYmFy");
    RunOptions options;
    CHECK(kernel_cmdline(options) == kDefaultKernelParams);
    options.params = "acpi=off";
    options.command = {"true"};
    CHECK(kernel_cmdline(options) == std::string(kDefaultKernelParams) + " lkvm.cmd=" + base64("'true'") + " acpi=off");
}

TEST_CASE("panic watch: the banner starts a panic and the end marker completes it")
{
    PanicWatch watch;
    auto feed = [&](std::string_view s) {
        PanicWatch::Event last = PanicWatch::Event::kNone;
        for (char c : s)
            if (auto e = watch.feed(static_cast<uint8_t>(c)); e != PanicWatch::Event::kNone)
                last = e;
        return last;
    };
    CHECK(feed("booting\r\n") == PanicWatch::Event::kNone);
    CHECK_FALSE(watch.panicked());
    CHECK(feed("[    1.0] Kernel panic - not syncing: Attempted to kill init!\r\n") == PanicWatch::Event::kPanicStarted);
    CHECK(watch.message() == "Kernel panic - not syncing: Attempted to kill init!");
    CHECK(feed("Call Trace:\r\n") == PanicWatch::Event::kNone);
    CHECK(feed("---[ end Kernel panic - not syncing: Attempted to kill init! ]---\r\n") == PanicWatch::Event::kPanicEnded);
}

TEST_CASE("escape filter: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A, other keys pass")
{
    EscapeFilter f;
    auto feed = [&](std::string_view s) { return f.feed(std::span(reinterpret_cast<const uint8_t*>(s.data()), s.size())); };
    auto r = feed("ls\r");
    CHECK(r.to_guest == "ls\r");
    CHECK_FALSE(r.quit);
    r = feed("\x01\x01" "a");
    CHECK(r.to_guest == "\x01" "a");
    r = feed("\x01");  // escape split across reads
    CHECK(r.to_guest.empty());
    r = feed("c");
    CHECK(r.to_guest == "\x01" "c");
    r = feed("q\x01x");
    CHECK(r.to_guest == "q");
    CHECK(r.quit);
}

TEST_CASE("cli: -d options, and what is refused")
{
    const auto d = parse_disk_spec("img.raw,ro,direct,aio=sync,serial=abc");
    CHECK(d.path == "img.raw");
    CHECK(d.read_only);
    CHECK(d.cache == CacheMode::kNone);  // `direct` is cache=none
    CHECK(d.engine == "sync");
    CHECK(d.serial == "abc");
    CHECK(parse_disk_spec("plain.raw").engine.empty());  // the host's best: io_uring or native
    CHECK(parse_command_line({"run", "-d", "a.raw", "--disk", "b.raw,ro"}).run.disks.size() == 2);
    CHECK(error_of([] { parse_disk_spec(",ro"); }).find("no image path") != std::string::npos);
    CHECK(error_of([] { parse_disk_spec("a,fast"); }).find("unknown disk option 'fast'") != std::string::npos);
    CHECK(error_of([] { parse_disk_spec("a,aio=x"); }).find("aio=x is not an engine") != std::string::npos);
    CHECK(error_of([] { parse_disk_spec("a,serial=123456789012345678901"); }).find("20 bytes") != std::string::npos);
}

TEST_CASE("cli: cache= and detect-zeroes= on -d, QEMU's names; bad values and conflicts refused with one line")
{
    CHECK(parse_disk_spec("a.raw").cache == CacheMode::kWriteback);  // QEMU's default
    CHECK(parse_disk_spec("a.raw").detect_zeroes == DetectZeroes::kOff);
    const std::pair<const char*, CacheMode> modes[] = {{"none", CacheMode::kNone},
                                                       {"writeback", CacheMode::kWriteback},
                                                       {"writethrough", CacheMode::kWritethrough},
                                                       {"directsync", CacheMode::kDirectsync},
                                                       {"unsafe", CacheMode::kUnsafe}};
    for (const auto& m : modes) {
        const char* name = m.first;  // not a structured binding: clang's CAPTURE lambda cannot take one
        const CacheMode mode = m.second;
        CAPTURE(name);
        CHECK(parse_disk_spec(std::string("a.raw,cache=") + name).cache == mode);
        CHECK(parse_disk_spec(std::string("a.raw,bus=scsi,cache=") + name).cache == mode);
        CHECK(std::string(cache_mode_name(mode)) == name);
    }
    // `direct` is O_DIRECT: cache=none, and agrees with the two modes that have it.
    CHECK(parse_disk_spec("a.raw,direct").cache == CacheMode::kNone);
    CHECK(parse_disk_spec("a.raw,direct,cache=none").cache == CacheMode::kNone);
    CHECK(parse_disk_spec("a.raw,cache=directsync,direct").cache == CacheMode::kDirectsync);
    CHECK(parse_disk_spec("a.raw,detect-zeroes=off").detect_zeroes == DetectZeroes::kOff);
    CHECK(parse_disk_spec("a.raw,detect-zeroes=on").detect_zeroes == DetectZeroes::kOn);
    CHECK(parse_disk_spec("a.raw,detect-zeroes=unmap").detect_zeroes == DetectZeroes::kUnmap);
    CHECK(parse_disk_spec("a.raw,detect-zeroes=unmap,discard=unmap").detect_zeroes == DetectZeroes::kUnmap);
    CHECK(parse_disk_spec("a.raw,detect-zeroes=on,discard=ignore").detect_zeroes == DetectZeroes::kOn);
    const auto run = parse_command_line({"run", "-d", "a.raw,cache=unsafe,detect-zeroes=unmap"}).run;
    CHECK(run.disks.at(0).cache == CacheMode::kUnsafe);
    CHECK(run.disks.at(0).detect_zeroes == DetectZeroes::kUnmap);

    auto refused = [](const std::string& spec) {
        const std::string e = error_of([&] { parse_command_line({"run", "-d", spec}); });
        CHECK(e.find('\n') == std::string::npos);
        return e;
    };
    for (const char* bad : {"a.raw,cache=", "a.raw,cache=off", "a.raw,cache=None", "a.raw,cache=direct",
                            "a.raw,cache=write-back"}) {
        CAPTURE(bad);
        CHECK(refused(bad).find("is not none, writeback, writethrough, directsync or unsafe") != std::string::npos);
    }
    CHECK(refused("a.raw,cache=off").find("-d a.raw,cache=off: cache=off is not") != std::string::npos);
    for (const char* bad : {"a.raw,detect-zeroes=", "a.raw,detect-zeroes=yes", "a.raw,detect-zeroes=ON",
                            "a.raw,detect-zeroes=discard"}) {
        CAPTURE(bad);
        CHECK(refused(bad).find("is not off, on or unmap") != std::string::npos);
    }
    CHECK(refused("a.raw,detect-zeroes=yes").find("detect-zeroes=yes is not off, on or unmap") != std::string::npos);
    for (const char* conflict : {"a.raw,direct,cache=writeback", "a.raw,cache=writethrough,direct",
                                 "a.raw,direct,cache=unsafe", "a.raw,bus=scsi,direct,cache=writeback"}) {
        CAPTURE(conflict);
        CHECK(refused(conflict).find("'direct' (cache=none) conflicts with cache=") != std::string::npos);
    }
    // As QEMU: unmap deallocates, which discard=ignore forbids.
    CHECK(refused("a.raw,detect-zeroes=unmap,discard=ignore")
              .find("detect-zeroes=unmap needs discard=unmap") != std::string::npos);
    CHECK(refused("a.raw,discard=ignore,bus=scsi,detect-zeroes=unmap")
              .find("detect-zeroes=unmap needs discard=unmap") != std::string::npos);
    CHECK(run_usage().find("cache=writeback|none|writethrough|directsync|unsafe") != std::string::npos);
    CHECK(run_usage().find("detect-zeroes=off|on|unmap") != std::string::npos);
}

TEST_CASE("cli: notify=mmio|pio on disks and shared SCSI controllers; one named default")
{
    CHECK_FALSE(parse_disk_spec("a.raw").notify.has_value());
    CHECK(parse_disk_spec("a.raw,notify=pio").notify == AddressSpace::kPort);
    CHECK(parse_disk_spec("a.raw,notify=mmio").notify == AddressSpace::kMemory);
    CHECK(parse_disk_spec("a.raw,bus=scsi,notify=pio").notify == AddressSpace::kPort);
    const auto run = parse_command_line({"run", "-d", "a.raw,notify=pio", "-d", "b.raw", "-d",
                                         "c.raw,bus=scsi,controller=c0", "-d", "d.raw,bus=scsi,controller=c1,lun=1",
                                         "--scsi-controller", "c0,notify=pio,num-queues=2", "-d",
                                         "e.raw,bus=scsi,notify=mmio"})
                         .run;
    REQUIRE(run.scsi_controllers.size() == 1);
    CHECK(run.scsi_controllers[0].notify == AddressSpace::kPort);
    const auto plans = plan_disk_devices(run);
    REQUIRE(plans.size() == 5);
    CHECK(plans[0].notify == AddressSpace::kPort);
    CHECK(plans[1].notify == kDefaultNotify);  // neither disk nor controller says
    CHECK(plans[2].notify == AddressSpace::kPort);
    CHECK(plans[2].num_queues == 2);
    CHECK(plans[3].notify == kDefaultNotify);  // a controller without --scsi-controller
    CHECK(plans[4].notify == AddressSpace::kMemory);
    CHECK(run_usage().find(std::string("notify=mmio|pio (default ") +
                           (kDefaultNotify == AddressSpace::kPort ? "pio" : "mmio") + ")") != std::string::npos);

    auto refused = [](std::vector<std::string> args) {
        return error_of([&] { parse_command_line(args); });
    };
    const std::string bad = refused({"run", "-d", "a.raw,notify=port"});
    CHECK(bad.find("-d a.raw,notify=port: notify=port is not mmio or pio") != std::string::npos);
    CHECK(bad.find('\n') == std::string::npos);
    CHECK(refused({"run", "-d", "a.raw,notify="}).find("notify= is not mmio or pio") != std::string::npos);
    CHECK(refused({"run", "-d", "a.raw,notify=PIO"}).find("is not mmio or pio") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c0", "--scsi-controller", "c0,notify=io"})
              .find("--scsi-controller c0,notify=io: notify=io is not mmio or pio") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c0,notify=pio"})
              .find("notify= on a disk that shares scsi controller c0; set it on the controller: --scsi-controller "
                    "c0,notify=mmio|pio") != std::string::npos);
}

TEST_CASE("cli: --iothreads and the disk options that map queues to threads")
{
    const auto run = parse_command_line({"run", "-c", "2", "--iothreads",
                                         "4,affinity=0-1,3,poll-max-ns=0,poll-grow=4,poll-shrink=2,aio-max-batch=32", "-d",
                                         "a.raw,num-queues=4,iothread=1+3,ioprio=be/7,aio=io_uring", "--stats"})
                         .run;
    CHECK(run.iothreads.count == 4);
    CHECK(run.iothreads.affinity == std::vector<int>{0, 1, 3});
    CHECK(run.iothreads.poll_max_ns == 0);
    CHECK(run.iothreads.poll_grow == 4);
    CHECK(run.iothreads.poll_shrink == 2);
    CHECK(run.iothreads.aio_max_batch == 32);
    CHECK(run.stats);
    REQUIRE(run.disks.size() == 1);
    CHECK(run.disks[0].num_queues == 4);
    CHECK(run.disks[0].iothreads == std::vector<unsigned>{1, 3});
    CHECK(run.disks[0].ioprio == (2 << 13 | 7));
    CHECK(run.disks[0].engine == "io_uring");
    CHECK(parse_disk_spec("a,ioprio=idle").ioprio == (3 << 13));
    CHECK(parse_disk_spec("a,ioprio=rt").ioprio == (1 << 13 | 4));
    const auto defaults = parse_command_line({"run", "--iothreads", "2"}).run.iothreads;
    CHECK(defaults.poll_max_ns == 32768);  // QEMU's
    CHECK(defaults.poll_grow == 0);
    CHECK(defaults.poll_shrink == 0);
    CHECK(defaults.affinity.empty());
    CHECK(defaults.policy == IoThreadPolicy::kBatch);
    CHECK(parse_command_line({"run", "--iothreads", "2,sched=other"}).run.iothreads.policy == IoThreadPolicy::kOther);
    CHECK(parse_command_line({"run", "--iothreads", "2,sched=idle"}).run.iothreads.policy == IoThreadPolicy::kIdle);
    CHECK(parse_command_line({"run"}).run.iothreads.policy == IoThreadPolicy::kBatch);  // dedicated threads too

    auto refused = [](std::vector<std::string> args) {
        return error_of([&] { parse_command_line(args); });
    };
    CHECK(refused({"run", "--iothreads", "0"}).find("give 1 to 64 I/O threads") != std::string::npos);
    CHECK(refused({"run", "--iothreads", "65"}).find("give 1 to 64 I/O threads") != std::string::npos);
    CHECK(refused({"run", "--iothreads", "x"}).find("not a number") != std::string::npos);
    CHECK(refused({"run", "--iothreads", "2,affinity=3-1"}).find("not a CPU range") != std::string::npos);
    CHECK(refused({"run", "--iothreads", "2,spin=1"}).find("unknown option 'spin=1'") != std::string::npos);
    CHECK(refused({"run", "--iothreads", "2,sched=fifo"}).find("sched=fifo is not batch, other or idle") !=
          std::string::npos);
    CHECK(refused({"run", "--iothreads", "2,aio-max-batch=5000"}).find("more than an engine holds") != std::string::npos);
    CHECK(refused({"run", "--iothreads", "2", "-d", "a.raw,iothread=5"}).find("has threads 0-1") != std::string::npos);
    CHECK(refused({"run", "-d", "a.raw,iothread=0"}).find("add --iothreads N") != std::string::npos);
    CHECK(refused({"run", "-d", "a.raw,num-queues=0"}).find("is not 1-64") != std::string::npos);
    CHECK(refused({"run", "-d", "a.raw,num-queues=65"}).find("is not 1-64") != std::string::npos);
    CHECK(refused({"run", "-d", "a.raw,ioprio=high"}).find("not rt, be or idle") != std::string::npos);
    CHECK(refused({"run", "-d", "a.raw,ioprio=be/8"}).find("not 0-7") != std::string::npos);
}

TEST_CASE("cli: the group against the host's online CPUs")
{
    IoThreadsSpec spec;
    spec.count = 2;
    CHECK(check_iothreads_on_host(spec, {0, 1}).empty());
    spec.count = 3;
    CHECK(check_iothreads_on_host(spec, {0, 1}).find("more I/O threads than the host's 2 online CPUs") !=
          std::string::npos);
    spec.affinity = {1, 5};
    CHECK(error_of([&] { check_iothreads_on_host(spec, {0, 1}); }).find("CPU 5 is not online") != std::string::npos);
    CHECK(parse_cpu_list("x", "0-2,7,1") == std::vector<int>{0, 1, 2, 7});
}

TEST_CASE("cli: SCSI disks, shared controllers and what is refused")
{
    const auto own = parse_disk_spec("a.raw,bus=scsi,rotation-rate=1,discard=ignore,serial=0123456789012345678901234");
    CHECK(own.bus == DiskBus::kScsi);
    CHECK(own.controller.empty());
    CHECK(own.lun == 0);
    CHECK(own.rotation_rate == 1);
    CHECK_FALSE(own.discard);
    CHECK(own.serial.size() == 25);  // SCSI serials may be longer than virtio-blk's 20 bytes
    CHECK(parse_disk_spec("a.raw,bus=scsi").discard);
    CHECK_FALSE(parse_disk_spec("a.raw,discard=ignore").discard);  // virtio-blk too
    CHECK(parse_disk_spec("a.raw,discard=unmap").discard);
    CHECK(parse_disk_spec("a.raw").bus == DiskBus::kBlk);

    const auto run = parse_command_line({"run", "-c", "3", "--iothreads", "2", "-d", "blk.raw", "-d",
                                         "a.raw,bus=scsi,controller=c0,lun=2", "-d", "own.raw,bus=scsi,num-queues=2",
                                         "-d", "b.raw,bus=scsi,controller=c0,lun=5,ro", "--scsi-controller",
                                         "c0,iothread=1,num-queues=4"})
                         .run;
    REQUIRE(run.scsi_controllers.size() == 1);
    CHECK(run.scsi_controllers[0].name == "c0");
    const auto plans = plan_disk_devices(run);
    REQUIRE(plans.size() == 3);
    CHECK(plans[0].bus == DiskBus::kBlk);
    CHECK(plans[0].disks == std::vector<size_t>{0});
    CHECK(plans[0].num_queues == 3);  // one per vCPU
    CHECK(plans[1].bus == DiskBus::kScsi);
    CHECK(plans[1].controller == "c0");
    CHECK(plans[1].disks == std::vector<size_t>{1, 3});
    CHECK(plans[1].num_queues == 4);
    CHECK(plans[1].iothreads == std::vector<unsigned>{1});
    CHECK(plans[2].bus == DiskBus::kScsi);
    CHECK(plans[2].disks == std::vector<size_t>{2});
    CHECK(plans[2].num_queues == 2);

    auto refused = [](std::vector<std::string> args) {
        return error_of([&] { parse_command_line(args); });
    };
    CHECK(refused({"run", "--iothreads", "2", "-d", "a,bus=scsi,controller=c0,iothread=1"})
              .find("shares scsi controller c0; set it on the controller: --scsi-controller c0,iothread=K") !=
          std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c0,num-queues=2"})
              .find("--scsi-controller c0,num-queues=Q") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c0", "-d", "b,bus=scsi,controller=c0"})
              .find("already has a lun 0") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c0", "--scsi-controller", "c1"}).find("c1: no disk uses it") !=
          std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c0", "--scsi-controller", "c0", "--scsi-controller", "c0"})
              .find("given twice") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c0", "--scsi-controller", "c0,iothread=3", "--iothreads", "2"})
              .find("has threads 0-1") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c0", "--scsi-controller", "c0,spin=1"})
              .find("unknown option 'spin=1'") != std::string::npos);
    CHECK(refused({"run", "-d", "a,rotation-rate=1"}).find("rotation-rate= is for SCSI disks; add bus=scsi") !=
          std::string::npos);
    CHECK(refused({"run", "-d", "a,lun=1"}).find("lun= is for SCSI disks") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=ide"}).find("bus=ide is not blk or scsi") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,lun=16384"}).find("is not 0-16383") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,rotation-rate=65535"}).find("is not 0-65534") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,discard=trim"}).find("not unmap or ignore") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,controller=c/0"}).find("name it with letters") != std::string::npos);
    CHECK(refused({"run", "-d", "a,bus=scsi,serial=0123456789012345678901234567890123456"}).find("36 bytes") !=
          std::string::npos);
}

TEST_CASE("cli: list, stop, pause, resume and stat")
{
    CHECK(parse_command_line({"list"}).kind == Command::Kind::kList);
    const auto stop = parse_command_line({"stop", "web-1"});
    CHECK(stop.kind == Command::Kind::kStop);
    CHECK(stop.control.name == "web-1");
    CHECK_FALSE(stop.control.all);
    const auto all = parse_command_line({"stop", "--all"});
    CHECK(all.control.all);
    CHECK(all.control.name.empty());
    CHECK(parse_command_line({"pause", "g"}).kind == Command::Kind::kPause);
    CHECK(parse_command_line({"pause", "g"}).control.name == "g");
    CHECK(parse_command_line({"resume", "g"}).kind == Command::Kind::kResume);

    const auto plain = parse_command_line({"stat", "g"});
    CHECK(plain.kind == Command::Kind::kStat);
    CHECK(plain.control.name == "g");
    CHECK_FALSE(plain.control.disks);
    CHECK_FALSE(plain.control.iothreads);
    CHECK_FALSE(plain.control.json);
    CHECK(plain.control.watch_s == 0);
    const auto full = parse_command_line({"stat", "--disks", "g", "--iothreads", "--json", "--watch", "0.5"});
    CHECK(full.control.name == "g");
    CHECK(full.control.disks);
    CHECK(full.control.iothreads);
    CHECK(full.control.json);
    CHECK(full.control.watch_s == 0.5);
    CHECK(parse_command_line({"stat", "g", "--watch=3600"}).control.watch_s == 3600);
    CHECK(parse_command_line({"stat", "g", "--help"}).kind == Command::Kind::kHelp);
    CHECK(parse_command_line({"list", "-h"}).kind == Command::Kind::kHelp);
}

TEST_CASE("cli: what list, stop, pause, resume and stat refuse")
{
    auto msg = [](std::vector<std::string> args) { return error_of([&] { parse_command_line(args); }); };
    CHECK(msg({"list", "x"}) == "list: unexpected argument 'x': list takes none (see 'lkvm --help')");
    CHECK(msg({"list", "--all"}) == "list: unknown option '--all' (see 'lkvm --help')");
    CHECK(msg({"stop"}) == "stop: which guest? give its NAME (or --all) as 'lkvm list' shows it");
    CHECK(msg({"pause"}) == "pause: which guest? give its NAME as 'lkvm list' shows it");
    CHECK(msg({"resume"}) == "resume: which guest? give its NAME as 'lkvm list' shows it");
    CHECK(msg({"stat"}) == "stat: which guest? give its NAME as 'lkvm list' shows it");
    CHECK(msg({"stop", "a", "b"}) == "stop: unexpected argument 'b': one guest at a time (see 'lkvm --help')");
    CHECK(msg({"stop", "--all", "a"}) == "stop: give a guest's NAME or --all, not both (see 'lkvm --help')");
    CHECK(msg({"pause", "--all"}) == "pause: unknown option '--all' (see 'lkvm --help')");
    CHECK(msg({"resume", "g", "--json"}) == "resume: unknown option '--json' (see 'lkvm --help')");
    CHECK(msg({"stop", "a/b"}) ==
          "stop 'a/b': use only letters, digits, '.', '_' and '-' in a guest name (see 'lkvm --help')");
    CHECK(msg({"pause", ".x"}) == "pause '.x': a guest name cannot start with '.' or '-' (see 'lkvm --help')");
    CHECK(msg({"stat", std::string(65, 'n')}) ==
          "stat '" + std::string(65, 'n') + "': a guest name is at most 64 characters (see 'lkvm --help')");
    CHECK(msg({"stat", "g", "--bogus"}) == "stat: unknown option '--bogus' (see 'lkvm --help')");
    CHECK(msg({"stat", "g", "--watch"}) == "option --watch needs a value: the seconds between samples (see 'lkvm --help')");
    for (const std::string bad : {"0", "-1", "3601", "abc", "nan", "inf", "1s", ""})
        CHECK_MESSAGE(msg({"stat", "g", "--watch", bad}) ==
                          "stat --watch '" + bad +
                              "': give the seconds between samples, more than 0 and at most 3600 (see 'lkvm --help')",
                      bad);
}

TEST_CASE("cli: --console-log, --timeout, --quiet, --loglevel, and --name's rules")
{
    const auto run = parse_command_line({"run", "--console-log", "out.log", "--timeout", "30", "--quiet", "--loglevel",
                                         "debug", "--name", "web-1.test"})
                         .run;
    CHECK(run.console_log == "out.log");
    CHECK(run.timeout_s == 30);
    CHECK(run.quiet);
    CHECK(run.log_level == LogLevel::kDebug);
    CHECK(run.name == "web-1.test");
    const auto defaults = parse_command_line({"run"}).run;
    CHECK(defaults.console_log.empty());
    CHECK(defaults.timeout_s == 0);
    CHECK_FALSE(defaults.quiet);
    CHECK(defaults.log_level == LogLevel::kInfo);
    CHECK(parse_command_line({"run", "--quiet"}).run.log_level == LogLevel::kInfo);  // the machine maps quiet
    CHECK(parse_command_line({"run", "--loglevel=error"}).run.log_level == LogLevel::kError);
    CHECK(parse_command_line({"run", "--loglevel", "warn"}).run.log_level == LogLevel::kWarn);
    CHECK(parse_command_line({"run", "--loglevel", "info"}).run.log_level == LogLevel::kInfo);
    CHECK(parse_command_line({"run", "--timeout=1000000"}).run.timeout_s == 1000000);
    CHECK(parse_command_line({"run", "--console-log=a b.log"}).run.console_log == "a b.log");

    auto msg = [](std::vector<std::string> args) { return error_of([&] { parse_command_line(args); }); };
    CHECK(msg({"run", "--console-log="}) == "--console-log needs a file name (see 'lkvm run --help')");
    CHECK(msg({"run", "--console-log"}) == "option --console-log needs a value (see 'lkvm run --help')");
    CHECK(msg({"run", "--timeout", "0"}) == "--timeout 0: give 1 to 1000000 seconds (see 'lkvm run --help')");
    CHECK(msg({"run", "--timeout", "1000001"}) == "--timeout 1000001: give 1 to 1000000 seconds (see 'lkvm run --help')");
    CHECK(msg({"run", "--timeout", "5s"}) == "--timeout '5s': not a number (see 'lkvm run --help')");
    CHECK(msg({"run", "--loglevel", "loud"}) == "--loglevel loud: use error, warn, info or debug (see 'lkvm run --help')");
    CHECK(msg({"run", "--name", "a/b"}) ==
          "--name 'a/b': use only letters, digits, '.', '_' and '-' in a guest name (see 'lkvm run --help')");
    CHECK(msg({"run", "--name="}) == "--name '': a guest name cannot be empty (see 'lkvm run --help')");
    CHECK(msg({"run", "--name", "-x"}) == "--name '-x': a guest name cannot start with '.' or '-' (see 'lkvm run --help')");
    CHECK(msg({"run", "--name", std::string(65, 'n')}) ==
          "--name '" + std::string(65, 'n') + "': a guest name is at most 64 characters (see 'lkvm run --help')");
    CHECK(parse_command_line({"run", "--name", std::string(64, 'n')}).run.name.size() == 64);
}

TEST_CASE("cli: werror= and rerror= take QEMU's policies, werror=enospc by default")
{
    const DiskSpec plain = parse_disk_spec("a.raw");
    CHECK(plain.write_error == IoErrorPolicy::kEnospc);
    CHECK(plain.read_error == IoErrorPolicy::kReport);
    const DiskSpec set = parse_disk_spec("a.raw,werror=stop,rerror=ignore");
    CHECK(set.write_error == IoErrorPolicy::kStop);
    CHECK(set.read_error == IoErrorPolicy::kIgnore);
    CHECK(parse_disk_spec("a.raw,werror=report").write_error == IoErrorPolicy::kReport);
    CHECK(parse_disk_spec("a.raw,bus=scsi,werror=ignore").write_error == IoErrorPolicy::kIgnore);
    CHECK(error_of([] { parse_disk_spec("a.raw,werror=pause"); }) ==
          "-d a.raw,werror=pause: werror=pause is not report, ignore, stop or enospc (see 'lkvm run --help')");
    CHECK(error_of([] { parse_disk_spec("a.raw,rerror=enospc"); }) ==
          "-d a.raw,rerror=enospc: rerror=enospc is not report, ignore or stop (see 'lkvm run --help')");
}
