// The x86 Linux boot protocol (Documentation/arch/x86/boot.rst): parse and
// validate a bzImage's setup header, lay out the e820 map, build the zero
// page, and the identity page tables and GDT for the 64-bit entry point.
#pragma once

#include <asm/bootparam.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "hw/guest_memory.h"

namespace lkvm {

struct BzImage {
    setup_header header;                 // as found in the file, validated
    std::span<const uint8_t> setup;      // the real-mode part (unused: we enter in 64-bit mode)
    std::span<const uint8_t> kernel;     // the protected-mode part, loaded at 1 MiB
    uint64_t max_cmdline = 0;            // bytes, without the terminating NUL
    uint64_t initrd_addr_max = 0;
    uint64_t init_size = 0;              // memory the kernel needs from its load address
};

// Throws lkvm::Error naming the problem ("not a bzImage", "boot protocol too old", ...).
// `name` is the file name used in messages; the image bytes must outlive the result.
BzImage parse_bzimage(std::span<const uint8_t> image, const std::string& name);

struct E820Entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;  // E820_TYPE_RAM / E820_TYPE_RESERVED
};

// RAM below the PCI hole and the rest above 4 GiB, with the EBDA and BIOS area reserved.
std::vector<E820Entry> e820_map(uint64_t ram_size);

// Guest-physical regions that hold RAM for a VM of ram_size bytes.
struct RamLayout {
    uint64_t low_size;   // at gpa 0
    uint64_t high_size;  // at gpa 4 GiB
};
RamLayout ram_layout(uint64_t ram_size);

struct BootSetup {
    uint64_t initrd_addr = 0;
    uint64_t initrd_size = 0;
    uint64_t rsdp_addr = 0;  // 0 when there are no ACPI tables
};

// Where an initrd of `size` bytes goes: as high as allowed and page aligned,
// above the kernel. Throws when it does not fit.
uint64_t place_initrd(const BzImage& image, uint64_t ram_size, uint64_t size);

// Throws when the kernel cannot decompress in ram_size or the command line is too long for it.
void check_boot_fits(const BzImage& image, const std::string& cmdline, uint64_t ram_size);

// Writes the kernel, command line, zero page, page tables and GDT into guest memory.
void load_linux(const GuestMemory& memory, const BzImage& image, const std::string& cmdline,
                uint64_t ram_size, const BootSetup& setup);

}  // namespace lkvm

namespace lkvm {
// Where the vCPU starts: startup_64, 0x200 past the protected-mode kernel.
uint64_t entry_point_64();
}  // namespace lkvm
