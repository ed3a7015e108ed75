// Where things live in guest physical memory. The low addresses follow what
// Linux expects of a PC BIOS; above 3 GiB is the PCI hole with the IOAPIC,
// local APIC and the KVM private pages at its top.
#pragma once

#include <cstdint>

namespace lkvm::layout {

constexpr uint64_t kGdt = 0x500;
constexpr uint64_t kBootParams = 0x7000;        // the zero page
constexpr uint64_t kBootStack = 0x8ff0;
constexpr uint64_t kPml4 = 0x9000;              // identity map of the first 4 GiB:
constexpr uint64_t kPdpt = 0xa000;              //   PML4, PDPT and four page
constexpr uint64_t kPageDirectories = 0xb000;   //   directories of 2 MiB pages
constexpr uint64_t kCmdline = 0x20000;
constexpr uint64_t kCmdlineMax = 0x10000;
constexpr uint64_t kEbdaStart = 0x9fc00;        // low RAM ends here
constexpr uint64_t kBiosStart = 0xe0000;        // reserved up to 1 MiB
constexpr uint64_t kAcpiTables = 0xe0000;       // RSDP and the tables it points to
constexpr uint64_t kAcpiTablesEnd = 0xf0000;
constexpr uint64_t kMpTables = 0xf0000;         // MP floating pointer and config table
constexpr uint64_t kMpTablesEnd = 0x100000;
constexpr uint64_t kResetVector = 0xffff0;     // F000:FFF0
constexpr uint64_t kKernel = 0x100000;

constexpr uint64_t kPciHoleStart = 0xc0000000;  // 3 GiB
constexpr uint64_t k4GiB = 0x100000000;
constexpr uint64_t kPciMmioBase = kPciHoleStart;
constexpr uint64_t kPciMmioSize = 0xfec00000 - kPciHoleStart;
// Port I/O BARs: well above the legacy ports (COM1, i8042, the ACPI power
// registers at 0x600, PCI configuration at 0xcf8), as PC firmware does; the
// DSDT's host bridge _CRS forwards this whole range to PCI.
constexpr uint64_t kPciIoBase = 0x6000;
constexpr uint64_t kPciIoSize = 0x10000 - kPciIoBase;
constexpr uint64_t kIoApic = 0xfec00000;
constexpr uint64_t kLocalApic = 0xfee00000;
constexpr uint64_t kIdentityMapPage = 0xfffbc000;  // KVM_SET_IDENTITY_MAP_ADDR (one page)
constexpr uint64_t kTss = 0xfffbd000;              // KVM_SET_TSS_ADDR (three pages)

}  // namespace lkvm::layout
