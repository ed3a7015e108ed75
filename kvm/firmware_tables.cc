#include "kvm/firmware_tables.h"

#include <cstring>
#include <string_view>

#include "hw/cmos_rtc.h"
#include "hw/platform.h"
#include "hw/pci.h"
#include "hw/serial8250.h"
#include "kvm/layout.h"

namespace lkvm {

uint8_t byte_sum(const uint8_t* data, size_t len)
{
    uint8_t sum = 0;
    for (size_t i = 0; i < len; ++i)
        sum += data[i];
    return sum;
}

namespace {

// Little-endian table writer with back-patching.
class Bytes {
public:
    size_t size() const { return b_.size(); }
    std::vector<uint8_t>& vec() { return b_; }
    void u8(uint8_t v) { b_.push_back(v); }
    void u16(uint16_t v) { put(v); }
    void u32(uint32_t v) { put(v); }
    void u64(uint64_t v) { put(v); }
    void text(std::string_view s, size_t width)
    {
        for (size_t i = 0; i < width; ++i)
            b_.push_back(i < s.size() ? static_cast<uint8_t>(s[i]) : ' ');
    }
    void zeros(size_t n) { b_.insert(b_.end(), n, 0); }
    void align(size_t a) { zeros((a - b_.size() % a) % a); }
    void append(const std::vector<uint8_t>& v) { b_.insert(b_.end(), v.begin(), v.end()); }
    template <typename T>
    void patch(size_t at, T v) { std::memcpy(&b_[at], &v, sizeof(T)); }
    // Sets the byte at `at` so that bytes [from, to) sum to zero.
    void checksum(size_t at, size_t from, size_t to)
    {
        b_[at] = 0;
        b_[at] = static_cast<uint8_t>(-byte_sum(&b_[from], to - from));
    }

private:
    template <typename T>
    void put(T v)
    {
        uint8_t raw[sizeof(T)];
        std::memcpy(raw, &v, sizeof(T));
        b_.insert(b_.end(), raw, raw + sizeof(T));
    }
    std::vector<uint8_t> b_;
};

constexpr uint8_t kLocalApicVersion = 0x14, kIoApicVersion = 0x11;
constexpr unsigned kIsaIrqs = 16;

// ---------------------------------------------------------------- MP tables
enum MpEntry : uint8_t { kMpProcessor = 0, kMpBus = 1, kMpIoApic = 2, kMpIoInterrupt = 3, kMpLocalInterrupt = 4 };
enum MpIrqType : uint8_t { kMpInt = 0, kMpNmi = 1, kMpExtInt = 3 };
constexpr uint8_t kMpPciBus = 0, kMpIsaBus = 1;
constexpr uint16_t kMpLevelActiveHigh = 0x0d;  // polarity 01 (high), trigger 11 (level)

}  // namespace

std::vector<uint8_t> build_mp_tables(uint64_t base, const PlatformInfo& platform)
{
    Bytes t;
    // Floating pointer structure (16 bytes), then the configuration table.
    t.text("_MP_", 4);
    t.u32(static_cast<uint32_t>(base + 16));
    t.u8(1);  // length in 16-byte units
    t.u8(4);  // spec revision 1.4
    t.u8(0);  // checksum
    t.zeros(5);
    t.checksum(10, 0, 16);

    const size_t table = t.size();
    t.text("PCMP", 4);
    t.u16(0);  // length, patched
    t.u8(4);
    t.u8(0);   // checksum, patched
    t.text("LKVM", 8);
    t.text("LKVM-PC", 12);
    t.u32(0);  // OEM table
    t.u16(0);  // OEM table size
    t.u16(0);  // entry count, patched
    t.u32(static_cast<uint32_t>(layout::kLocalApic));
    t.u32(0);  // extended table length and checksum
    uint16_t entries = 0;

    for (unsigned cpu = 0; cpu < platform.cpus; ++cpu, ++entries) {
        t.u8(kMpProcessor);
        t.u8(static_cast<uint8_t>(cpu));
        t.u8(kLocalApicVersion);
        t.u8(cpu == 0 ? 0x3 : 0x1);  // enabled, and bootstrap processor for cpu 0
        t.u32(platform.cpu_signature);
        t.u32(platform.cpu_features);
        t.zeros(8);
    }
    t.u8(kMpBus), t.u8(kMpPciBus), t.text("PCI", 6), ++entries;
    t.u8(kMpBus), t.u8(kMpIsaBus), t.text("ISA", 6), ++entries;

    const uint8_t ioapic = kIoApicId(platform.cpus);
    t.u8(kMpIoApic), t.u8(ioapic), t.u8(kIoApicVersion), t.u8(1), ++entries;
    t.u32(static_cast<uint32_t>(layout::kIoApic));

    // ISA IRQs reach IOAPIC pins of the same number, as KVM's default GSI routing wires them.
    for (uint8_t irq = 0; irq < kIsaIrqs; ++irq, ++entries) {
        t.u8(kMpIoInterrupt), t.u8(irq == 0 ? kMpExtInt : kMpInt), t.u16(0);
        t.u8(kMpIsaBus), t.u8(irq), t.u8(ioapic), t.u8(irq);
    }
    // Each slot's INTA# (source IRQ: slot << 2 | pin) on its level-triggered GSI.
    for (unsigned slot = 1; slot < PciHostBridge::kMaxSlots; ++slot, ++entries) {
        t.u8(kMpIoInterrupt), t.u8(kMpInt), t.u16(kMpLevelActiveHigh);
        t.u8(kMpPciBus), t.u8(static_cast<uint8_t>(slot << 2)), t.u8(ioapic), t.u8(pci_intx_gsi(slot));
    }
    // LINT0 is the 8259's virtual wire, LINT1 NMI, on every local APIC.
    t.u8(kMpLocalInterrupt), t.u8(kMpExtInt), t.u16(0), t.u8(kMpIsaBus), t.u8(0), t.u8(0xff), t.u8(0), ++entries;
    t.u8(kMpLocalInterrupt), t.u8(kMpNmi), t.u16(0), t.u8(kMpIsaBus), t.u8(0), t.u8(0xff), t.u8(1), ++entries;

    t.patch<uint16_t>(table + 4, static_cast<uint16_t>(t.size() - table));
    t.patch<uint16_t>(table + 34, entries);
    t.checksum(table + 7, table, t.size());
    return t.vec();
}

namespace {

// ---------------------------------------------------------------- ACPI

void acpi_header(Bytes& t, std::string_view signature, uint8_t revision)
{
    t.text(signature, 4);
    t.u32(0);  // length, patched by finish_table
    t.u8(revision);
    t.u8(0);   // checksum, patched by finish_table
    t.text("LKVM", 6);
    t.text("LKVMPC", 8);
    t.u32(1);
    t.text("LKVM", 4);
    t.u32(1);
}

void finish_table(Bytes& t, size_t start)
{
    t.patch<uint32_t>(start + 4, static_cast<uint32_t>(t.size() - start));
    t.checksum(start + 9, start, t.size());
}

// Generic Address Structure for a byte-wide I/O port.
void gas_io_byte(Bytes& t, uint16_t port)
{
    t.u8(1);  // system I/O space
    t.u8(8);  // bit width
    t.u8(0);  // bit offset
    t.u8(1);  // byte access
    t.u64(port);
}

// AML: just the handful of constructs the DSDT needs.
namespace aml {
using Code = std::vector<uint8_t>;

Code cat(std::initializer_list<Code> parts)
{
    Code out;
    for (const auto& p : parts)
        out.insert(out.end(), p.begin(), p.end());
    return out;
}

// PkgLength (ACPI 6.4 section 20.2.4) counts its own bytes too.
Code pkg_length(size_t body)
{
    if (body + 1 < 0x40)
        return {static_cast<uint8_t>(body + 1)};
    size_t n = 2;
    while (n < 4 && body + n >= (size_t{1} << (4 + 8 * (n - 1))))
        ++n;
    const size_t total = body + n;
    Code out = {static_cast<uint8_t>(((n - 1) << 6) | (total & 0xf))};
    for (size_t i = 1; i < n; ++i)
        out.push_back(static_cast<uint8_t>(total >> (4 + 8 * (i - 1))));
    return out;
}

Code name_seg(std::string_view s) { return Code(s.begin(), s.end()); }
Code integer(uint32_t v)
{
    if (v == 0) return {0x00};
    if (v == 1) return {0x01};
    if (v <= 0xff) return {0x0a, static_cast<uint8_t>(v)};
    return {0x0c, static_cast<uint8_t>(v), static_cast<uint8_t>(v >> 8), static_cast<uint8_t>(v >> 16),
            static_cast<uint8_t>(v >> 24)};
}
Code name(std::string_view seg, const Code& value) { return cat({{0x08}, name_seg(seg), value}); }
Code scope(std::string_view path, const Code& body)
{
    Code inner = cat({name_seg(path), body});
    return cat({{0x10}, pkg_length(inner.size()), inner});
}
Code device(std::string_view seg, const Code& body)
{
    Code inner = cat({name_seg(seg), body});
    return cat({{0x5b, 0x82}, pkg_length(inner.size()), inner});
}
Code buffer(const Code& bytes)
{
    Code inner = cat({integer(static_cast<uint32_t>(bytes.size())), bytes});
    return cat({{0x11}, pkg_length(inner.size()), inner});
}
Code package(const std::vector<Code>& elements)
{
    Code inner = {static_cast<uint8_t>(elements.size())};
    for (const auto& e : elements)
        inner.insert(inner.end(), e.begin(), e.end());
    return cat({{0x12}, pkg_length(inner.size()), inner});
}
Code package(std::initializer_list<uint32_t> values)
{
    std::vector<Code> elements;
    for (uint32_t v : values)
        elements.push_back(integer(v));
    return package(elements);
}
// EISA ID "PNP0A03" compressed as _HID wants it.
Code eisa_id(std::string_view id)
{
    auto hex = [](char c) { return static_cast<uint8_t>(c <= '9' ? c - '0' : c - 'A' + 10); };
    const uint8_t c1 = id[0] - 0x40, c2 = id[1] - 0x40, c3 = id[2] - 0x40;
    return {0x0c, static_cast<uint8_t>((c1 << 2) | (c2 >> 3)), static_cast<uint8_t>(((c2 & 7) << 5) | c3),
            static_cast<uint8_t>((hex(id[3]) << 4) | hex(id[4])), static_cast<uint8_t>((hex(id[5]) << 4) | hex(id[6]))};
}

// Resource descriptors for _CRS.
void le(Code& c, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; ++i)
        c.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
// Word/DWord address space descriptor: producer, fixed min and max.
Code address_space(uint8_t tag, int width, uint8_t type, uint8_t type_flags, uint64_t min, uint64_t max)
{
    Code c = {tag};
    le(c, 3 + 5 * width, 2);
    c.push_back(type);
    c.push_back(0x0c);  // MinFixed | MaxFixed, positive decode, producer
    c.push_back(type_flags);
    le(c, 0, width);              // granularity
    le(c, min, width);
    le(c, max, width);
    le(c, 0, width);              // translation
    le(c, max - min + 1, width);  // length
    return c;
}
Code word_bus(uint16_t min, uint16_t max) { return address_space(0x88, 2, 2, 0, min, max); }
Code word_io(uint16_t min, uint16_t max) { return address_space(0x88, 2, 1, 3, min, max); }
Code dword_memory(uint32_t min, uint32_t max) { return address_space(0x87, 4, 0, 1, min, max); }
Code io_port(uint16_t base, uint8_t length)
{
    return {0x47, 0x01, static_cast<uint8_t>(base), static_cast<uint8_t>(base >> 8), static_cast<uint8_t>(base),
            static_cast<uint8_t>(base >> 8), 0x01, length};
}
Code irq_no_flags(unsigned irq)
{
    const uint16_t mask = static_cast<uint16_t>(1u << irq);
    return {0x22, static_cast<uint8_t>(mask), static_cast<uint8_t>(mask >> 8)};
}
Code end_tag() { return {0x79, 0x00}; }
}  // namespace aml

std::vector<uint8_t> dsdt_body()
{
    const uint16_t cfg = PciHostBridge::kConfigAddressPort;
    // Linux keeps a BAR where the bridge put it only if a _CRS window holds it.
    static_assert(layout::kPciIoBase >= PciHostBridge::kConfigAddressPort + PciHostBridge::kPortSpan &&
                      layout::kPciIoBase + layout::kPciIoSize <= 0x10000,
                  "the PCI I/O BAR window must lie in the host bridge's I/O range above 0xcff");
    const auto crs = aml::cat({
        aml::word_bus(0, 0xff),
        aml::io_port(cfg, PciHostBridge::kPortSpan),
        aml::word_io(0, cfg - 1),
        aml::word_io(cfg + PciHostBridge::kPortSpan, 0xffff),
        aml::dword_memory(static_cast<uint32_t>(layout::kPciMmioBase),
                          static_cast<uint32_t>(layout::kPciMmioBase + layout::kPciMmioSize - 1)),
        aml::end_tag(),
    });
    // _PRT: slot N's INTA# is GSI pci_intx_gsi(N), as in the MP table.
    std::vector<aml::Code> routes;
    for (unsigned slot = 1; slot < PciHostBridge::kMaxSlots; ++slot)
        routes.push_back(aml::package({(slot << 16) | 0xffff, 0, 0, pci_intx_gsi(slot)}));
    const auto pci0 = aml::device("PCI0", aml::cat({
        aml::name("_HID", aml::eisa_id("PNP0A03")),
        aml::name("_UID", aml::integer(0)),
        aml::name("_CRS", aml::buffer(crs)),
        aml::name("_PRT", aml::package(routes)),
    }));
    // COM1 must be described: in hardware-reduced mode ISA IRQs are not
    // set up by default, and the 8250 driver gets IRQ 4 only through PNP.
    const auto com1 = aml::device("COM1", aml::cat({
        aml::name("_HID", aml::eisa_id("PNP0501")),
        aml::name("_UID", aml::integer(1)),
        aml::name("_CRS", aml::buffer(aml::cat({
                              aml::io_port(Serial8250::kCom1Base, 8),
                              aml::irq_no_flags(Serial8250::kCom1Irq),
                              aml::end_tag(),
                          }))),
    }));
    // The RTC too: without a PNP0B00 device Linux registers one with IRQ 8,
    // which hardware-reduced mode never sets up, and its probe fails. No IRQ
    // here: lkvm does not raise IRQ 8, and without one Linux keeps the clock
    // and offers no alarms rather than waiting for one that never comes.
    const auto rtc = aml::device("RTC0", aml::cat({
        aml::name("_HID", aml::eisa_id("PNP0B00")),
        aml::name("_CRS", aml::buffer(aml::cat({
                              aml::io_port(CmosRtc::kIndexPort, CmosRtc::kSpan),
                              aml::end_tag(),
                          }))),
    }));
    return aml::cat({
        aml::scope("\\_SB_", aml::cat({pci0, com1, rtc})),
        // \_S5: SLP_TYPa and SLP_TYPb for soft-off, as PowerControl decodes them.
        aml::name("_S5_", aml::package({PowerControl::kS5SleepType, PowerControl::kS5SleepType, 0, 0})),
    });
}

}  // namespace

std::vector<uint8_t> reset_vector_stub()
{
    const uint16_t port = PowerControl::kReset;
    return {
        0xb0, PowerControl::kResetValue,                                            // mov al, 1
        0xba, static_cast<uint8_t>(port), static_cast<uint8_t>(port >> 8),        // mov dx, 0x602
        0xee,                                                                     // out dx, al
        0xf4,                                                                     // hlt
        0xeb, 0xfd,                                                               // jmp back to hlt
    };
}

AcpiTables build_acpi_tables(uint64_t base, const PlatformInfo& platform)
{
    Bytes t;
    // RSDP (ACPI 2.0+ form, 36 bytes).
    t.text("RSD PTR ", 8);
    t.u8(0);  // checksum of the first 20 bytes
    t.text("LKVM", 6);
    t.u8(2);  // revision: XSDT present
    t.u32(0); // RSDT address: none
    t.u32(36);
    t.u64(0); // XSDT address, patched
    t.u8(0);  // extended checksum
    t.zeros(3);
    t.align(16);

    const size_t dsdt = t.size();
    acpi_header(t, "DSDT", 2);
    t.append(dsdt_body());
    finish_table(t, dsdt);
    t.align(16);

    // FADT, ACPI 6.0 layout (276 bytes), hardware-reduced.
    const size_t fadt = t.size();
    acpi_header(t, "FACP", 6);
    t.u32(0);                                     // FIRMWARE_CTRL: no FACS
    t.u32(static_cast<uint32_t>(base + dsdt));    // DSDT
    t.zeros(109 - 44);                            // legacy PM blocks: none in hardware-reduced mode
    t.u16(1 << 2);                                // IAPC_BOOT_ARCH: no VGA; no 8042; a CMOS RTC (bit 5 clear)
    t.u8(0);
    t.u32((1 << 4) | (1 << 5) | (1 << 10) | (1 << 20));  // PWR_BUTTON, SLP_BUTTON, RESET_REG_SUP, HW_REDUCED_ACPI
    gas_io_byte(t, PowerControl::kReset);        // RESET_REG
    t.u8(PowerControl::kResetValue);
    t.u16(0);                                     // ARM_BOOT_ARCH
    t.u8(0);                                      // minor version
    t.u64(0);                                     // X_FIRMWARE_CTRL
    t.u64(base + dsdt);                           // X_DSDT
    t.zeros(244 - 148);                           // X_ PM and GPE blocks: none
    gas_io_byte(t, PowerControl::kSleepControl);  // SLEEP_CONTROL_REG
    gas_io_byte(t, PowerControl::kSleepStatus);   // SLEEP_STATUS_REG
    t.text("LKVM", 8);                            // hypervisor vendor identity
    finish_table(t, fadt);
    t.align(16);

    const size_t madt = t.size();
    acpi_header(t, "APIC", 5);
    t.u32(static_cast<uint32_t>(layout::kLocalApic));
    t.u32(0);  // flags: the 8259s are not used in hardware-reduced mode
    for (unsigned cpu = 0; cpu < platform.cpus; ++cpu) {
        t.u8(0), t.u8(8);  // processor local APIC
        t.u8(static_cast<uint8_t>(cpu)), t.u8(static_cast<uint8_t>(cpu));
        t.u32(1);          // enabled
    }
    t.u8(1), t.u8(12), t.u8(kIoApicId(platform.cpus)), t.u8(0);  // I/O APIC, GSI base 0
    t.u32(static_cast<uint32_t>(layout::kIoApic));
    t.u32(0);
    t.u8(4), t.u8(6), t.u8(0xff), t.u16(0), t.u8(1);  // LINT1 is NMI on every processor
    finish_table(t, madt);
    t.align(16);

    const size_t xsdt = t.size();
    acpi_header(t, "XSDT", 1);
    t.u64(base + fadt);
    t.u64(base + madt);
    finish_table(t, xsdt);

    t.patch<uint64_t>(24, base + xsdt);
    t.checksum(8, 0, 20);
    t.checksum(32, 0, 36);
    return {t.vec(), base};
}

}  // namespace lkvm
