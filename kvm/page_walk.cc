#include "kvm/page_walk.h"

namespace lkvm {
namespace {
constexpr uint64_t kCr0Pg = 1ull << 31;
constexpr uint64_t kCr4Pse = 1ull << 4;
constexpr uint64_t kCr4Pae = 1ull << 5;
constexpr uint64_t kCr4La57 = 1ull << 12;
constexpr uint64_t kEferLma = 1ull << 10;
constexpr uint64_t kPresent = 1;
constexpr uint64_t kLargePage = 1ull << 7;
// Bits 12..51 of an entry: the next table's, or the page's, physical address.
constexpr uint64_t kAddressMask = 0x000ffffffffff000ull;

// A walk over tables of 8-byte entries: 4- and 5-level long mode, and PAE.
// levels: how many tables from cr3 down; large_from: the highest level
// (1 is the page table itself) at which PS maps a page.
std::optional<Translation> walk64(const GuestMemory& memory, uint64_t table, uint64_t gva, int levels, int large_from)
{
    for (int level = levels; level >= 1; --level) {
        const int shift = 12 + 9 * (level - 1);
        const uint64_t index = (gva >> shift) & 511;
        const auto entry = memory.read_obj<uint64_t>(table + 8 * index);
        if (!entry || !(*entry & kPresent))
            return std::nullopt;
        if (level == 1 || (level <= large_from && (*entry & kLargePage))) {
            const uint64_t page = 1ull << shift;
            const uint64_t base = *entry & kAddressMask & ~(page - 1);
            const uint64_t offset = gva & (page - 1);
            return Translation{base + offset, page - offset};
        }
        table = *entry & kAddressMask;
    }
    return std::nullopt;
}
}  // namespace

std::optional<Translation> translate(const GuestMemory& memory, const PagingState& paging, uint64_t gva)
{
    if (!(paging.cr0 & kCr0Pg)) {
        const uint64_t linear = gva & 0xffffffffull;  // no paging: a linear address is physical
        return Translation{linear, 0x100000000ull - linear};
    }
    if (paging.efer & kEferLma) {
        const bool five = paging.cr4 & kCr4La57;
        const int bits = five ? 57 : 48;
        // Canonical: the bits above the top one repeat it.
        const auto high = static_cast<int64_t>(gva) >> (bits - 1);
        if (high != 0 && high != -1)
            return std::nullopt;
        return walk64(memory, paging.cr3 & kAddressMask, gva, five ? 5 : 4, 3);
    }
    const uint64_t gva32 = gva & 0xffffffffull;
    if (paging.cr4 & kCr4Pae) {
        // PAE: four 8-byte PDPTEs at cr3 (32-byte aligned), then 2 levels of 512.
        const auto pdpte = memory.read_obj<uint64_t>((paging.cr3 & 0xffffffe0ull) + 8 * (gva32 >> 30));
        if (!pdpte || !(*pdpte & kPresent))
            return std::nullopt;
        return walk64(memory, *pdpte & kAddressMask, gva32, 2, 2);
    }
    // 32-bit paging: two levels of 1024 4-byte entries, 4M pages with PSE.
    const auto pde = memory.read_obj<uint32_t>((paging.cr3 & 0xfffff000ull) + 4 * (gva32 >> 22));
    if (!pde || !(*pde & kPresent))
        return std::nullopt;
    if ((paging.cr4 & kCr4Pse) && (*pde & kLargePage)) {
        // Bits 13..20 of a 4M entry are physical address bits 32..39.
        const uint64_t base = (uint64_t{*pde} & 0xffc00000ull) | ((uint64_t{*pde} & 0x1fe000ull) << 19);
        const uint64_t offset = gva32 & 0x3fffff;
        return Translation{base + offset, 0x400000 - offset};
    }
    const auto pte = memory.read_obj<uint32_t>((*pde & 0xfffff000ull) + 4 * ((gva32 >> 12) & 1023));
    if (!pte || !(*pte & kPresent))
        return std::nullopt;
    const uint64_t offset = gva32 & 0xfff;
    return Translation{(*pte & 0xfffff000ull) + offset, 0x1000 - offset};
}

}  // namespace lkvm
