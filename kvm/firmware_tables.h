// The tables a PC BIOS leaves for the kernel to find its CPUs, interrupt
// controllers and platform: the Intel MultiProcessor tables (found with
// acpi=off, or by kernels without ACPI) and ACPI 6 tables — RSDP, XSDT, a
// hardware-reduced FADT, MADT and a DSDT holding the PCI host bridge and
// the \_S5 sleep state. Kernels without CONFIG_X86_MPPARSE see CPUs only
// through the MADT, so both are always written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lkvm {

struct PlatformInfo {
    unsigned cpus = 1;
    uint32_t cpu_signature = 0;  // CPUID.1:EAX
    uint32_t cpu_features = 0;   // CPUID.1:EDX
};

constexpr uint8_t kIoApicId(unsigned cpus) { return static_cast<uint8_t>(cpus); }

// Bytes to place at guest address `base`: the MP floating pointer followed by the config table.
std::vector<uint8_t> build_mp_tables(uint64_t base, const PlatformInfo& platform);

struct AcpiTables {
    std::vector<uint8_t> bytes;  // to place at the base address given
    uint64_t rsdp = 0;           // guest address of the RSDP
};
AcpiTables build_acpi_tables(uint64_t base, const PlatformInfo& platform);

// Real-mode code for the BIOS reset vector (F000:FFF0). Linux jumps there
// when other reboot methods are not used (hardware-reduced ACPI makes it pick
// EFI, then "BIOS"): the stub writes the ACPI reset register, so every reboot
// path ends in a reset lkvm sees.
std::vector<uint8_t> reset_vector_stub();

// Sum of bytes, as every MP and ACPI checksum wants it to come out: zero.
uint8_t byte_sum(const uint8_t* data, size_t len);

}  // namespace lkvm
