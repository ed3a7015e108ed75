#include "kvm/boot.h"

#include <algorithm>
#include <cstring>

#include "base/error.h"
#include "kvm/layout.h"

namespace lkvm {

namespace {
constexpr uint64_t kSetupHeaderOffset = 0x1f1;
constexpr uint16_t kBootFlag = 0xaa55;
constexpr uint32_t kHeaderMagic = 0x53726448;  // "HdrS"
constexpr uint16_t kMinProtocol = 0x020c;      // 2.12: xloadflags and the 64-bit entry
constexpr uint64_t kEntry64Offset = 0x200;
constexpr uint8_t kLoaderUndefined = 0xff;
constexpr uint32_t kE820Ram = 1, kE820Reserved = 2;
constexpr uint64_t kPageSize = 4096;
constexpr uint64_t k2MiB = 2 << 20;

std::string protocol_string(uint16_t version)
{
    return std::to_string(version >> 8) + "." + std::to_string(version & 0xff);
}
}  // namespace

BzImage parse_bzimage(std::span<const uint8_t> image, const std::string& name)
{
    BzImage out{};
    const std::string prefix = "kernel " + name + ": ";
    if (image.size() < 1024)
        throw Error(prefix + "not a bzImage (too small); pass an x86 bzImage such as arch/x86/boot/bzImage");
    // The header extends to 0x202 + the byte at 0x201; copy no more than we know.
    const size_t header_end = 0x202 + image[0x201];
    const size_t copy = std::min(sizeof(setup_header), header_end - kSetupHeaderOffset);
    std::memcpy(&out.header, image.data() + kSetupHeaderOffset, copy);
    const setup_header& h = out.header;
    if (h.boot_flag != kBootFlag || h.header != kHeaderMagic)
        throw Error(prefix + "not a bzImage (no setup header); pass an x86 bzImage such as arch/x86/boot/bzImage");
    if (h.version < kMinProtocol)
        throw Error(prefix + "boot protocol " + protocol_string(h.version) + " is too old: lkvm needs 2.12 or newer");
    if (!(h.loadflags & LOADED_HIGH))
        throw Error(prefix + "a zImage that loads low is not supported; build a bzImage");
    if (!(h.xloadflags & XLF_KERNEL_64))
        throw Error(prefix + "has no 64-bit entry point; lkvm boots 64-bit x86 kernels");
    const uint64_t setup_sects = h.setup_sects ? h.setup_sects : 4;
    const uint64_t setup_size = (setup_sects + 1) * 512;
    if (setup_size >= image.size())
        throw Error(prefix + "truncated: the setup code is larger than the file");
    out.setup = image.subspan(0, setup_size);
    out.kernel = image.subspan(setup_size);
    out.max_cmdline = h.cmdline_size;
    out.initrd_addr_max = h.initrd_addr_max;
    out.init_size = std::max<uint64_t>(h.init_size, out.kernel.size());
    return out;
}

RamLayout ram_layout(uint64_t ram_size)
{
    const uint64_t low = std::min(ram_size, layout::kPciHoleStart);
    return {low, ram_size - low};
}

std::vector<E820Entry> e820_map(uint64_t ram_size)
{
    const RamLayout ram = ram_layout(ram_size);
    std::vector<E820Entry> map = {
        {0, layout::kEbdaStart, kE820Ram},
        {layout::kEbdaStart, 0xa0000 - layout::kEbdaStart, kE820Reserved},
        {layout::kBiosStart, layout::kKernel - layout::kBiosStart, kE820Reserved},
        {layout::kKernel, ram.low_size - layout::kKernel, kE820Ram},
    };
    if (ram.high_size)
        map.push_back({layout::k4GiB, ram.high_size, kE820Ram});
    return map;
}

uint64_t place_initrd(const BzImage& image, uint64_t ram_size, uint64_t size)
{
    const uint64_t kernel_end = layout::kKernel + ((image.init_size + k2MiB - 1) & ~(k2MiB - 1));
    const uint64_t top = std::min(ram_layout(ram_size).low_size, image.initrd_addr_max + 1);
    if (size > top || (top - size) < kernel_end)
        throw Error("initrd of " + std::to_string(size >> 20) + " MiB does not fit below " +
                    std::to_string(top >> 20) + " MiB next to the kernel; give the guest more memory with -m");
    return (top - size) & ~(kPageSize - 1);
}

namespace {
void write_or_throw(const GuestMemory& memory, uint64_t gpa, const void* src, uint64_t len, const char* what)
{
    if (!memory.write(gpa, src, len))
        throw Error(std::string(what) + " does not fit in guest memory; give the guest more memory with -m");
}

// Identity-maps the first 4 GiB with 2 MiB pages: enough for the kernel, the
// zero page, the command line and the initrd wherever they sit below 4 GiB.
void write_page_tables(const GuestMemory& memory)
{
    constexpr uint64_t kPresentWritable = 0x3, kHuge = 0x80;
    const uint64_t pml4e = layout::kPdpt | kPresentWritable;
    write_or_throw(memory, layout::kPml4, &pml4e, sizeof(pml4e), "page tables");
    for (uint64_t gib = 0; gib < 4; ++gib) {
        const uint64_t pd = layout::kPageDirectories + gib * kPageSize;
        const uint64_t pdpte = pd | kPresentWritable;
        write_or_throw(memory, layout::kPdpt + gib * 8, &pdpte, 8, "page tables");
        for (uint64_t i = 0; i < 512; ++i) {
            const uint64_t pde = ((gib << 30) + i * k2MiB) | kPresentWritable | kHuge;
            write_or_throw(memory, pd + i * 8, &pde, 8, "page tables");
        }
    }
}

void write_gdt(const GuestMemory& memory)
{
    // null, null, __BOOT_CS (0x10: 64-bit code), __BOOT_DS (0x18: flat data)
    const uint64_t gdt[] = {0, 0, 0x00af9b000000ffff, 0x00cf93000000ffff};
    write_or_throw(memory, layout::kGdt, gdt, sizeof(gdt), "GDT");
}
}  // namespace

void check_boot_fits(const BzImage& image, const std::string& cmdline, uint64_t ram_size)
{
    if (layout::kKernel + image.init_size > ram_layout(ram_size).low_size)
        throw Error("the kernel needs " + std::to_string((layout::kKernel + image.init_size) >> 20) +
                    " MiB to decompress; give the guest more memory with -m");
    if (cmdline.size() > image.max_cmdline || cmdline.size() >= layout::kCmdlineMax)
        throw Error("kernel command line is " + std::to_string(cmdline.size()) + " bytes; this kernel takes at most " +
                    std::to_string(std::min<uint64_t>(image.max_cmdline, layout::kCmdlineMax - 1)) +
                    ": shorten -p or the guest command");
}

void load_linux(const GuestMemory& memory, const BzImage& image, const std::string& cmdline,
                uint64_t ram_size, const BootSetup& setup)
{
    check_boot_fits(image, cmdline, ram_size);
    write_or_throw(memory, layout::kKernel, image.kernel.data(), image.kernel.size(), "the kernel");
    write_or_throw(memory, layout::kCmdline, cmdline.c_str(), cmdline.size() + 1, "the command line");

    boot_params params{};
    params.hdr = image.header;
    params.hdr.type_of_loader = kLoaderUndefined;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.vid_mode = 0xffff;  // "normal"
    params.hdr.code32_start = layout::kKernel;
    params.hdr.cmd_line_ptr = layout::kCmdline;
    params.hdr.ramdisk_image = static_cast<uint32_t>(setup.initrd_addr);
    params.hdr.ramdisk_size = static_cast<uint32_t>(setup.initrd_size);
    params.ext_ramdisk_image = static_cast<uint32_t>(setup.initrd_addr >> 32);
    params.ext_ramdisk_size = static_cast<uint32_t>(setup.initrd_size >> 32);
    params.acpi_rsdp_addr = setup.rsdp_addr;
    const auto map = e820_map(ram_size);
    params.e820_entries = static_cast<uint8_t>(map.size());
    for (size_t i = 0; i < map.size(); ++i)
        params.e820_table[i] = {map[i].addr, map[i].size, map[i].type};
    write_or_throw(memory, layout::kBootParams, &params, sizeof(params), "the zero page");

    write_page_tables(memory);
    write_gdt(memory);
}

uint64_t entry_point_64()
{
    return layout::kKernel + kEntry64Offset;
}

}  // namespace lkvm
