// Guest virtual to guest physical, the way the vCPU's MMU does it: walks the
// page tables in guest RAM for every x86 paging mode (none, 32-bit, PAE,
// 4-level and 5-level), with 4M/2M/1G pages. For the gdb stub, which is given
// virtual addresses. Every table entry is read through GuestMemory: a table
// outside RAM is a failed walk, never an access outside the guest.
#pragma once

#include <cstdint>
#include <optional>

#include "hw/guest_memory.h"

namespace lkvm {

// What selects the paging mode: the vCPU's control registers and EFER.
struct PagingState {
    uint64_t cr0 = 0, cr3 = 0, cr4 = 0, efer = 0;
};

struct Translation {
    uint64_t gpa;
    uint64_t page_bytes;  // of the page gpa lies in: bytes from gpa on to its end are contiguous
};

// Empty when the address is not mapped (an entry not present, a reserved
// physical address, a non-canonical address in long mode, or a table outside RAM).
std::optional<Translation> translate(const GuestMemory& memory, const PagingState& paging, uint64_t gva);

}  // namespace lkvm
