#include "hw/guest_memory.h"

#include <algorithm>

#include "base/error.h"

namespace lkvm {

GuestMemory::GuestMemory(std::vector<MemoryRegion> regions) : regions_(std::move(regions))
{
    std::sort(regions_.begin(), regions_.end(), [](auto& a, auto& b) { return a.gpa < b.gpa; });
    for (size_t i = 0; i < regions_.size(); ++i) {
        const auto& r = regions_[i];
        if (r.size == 0 || r.gpa + r.size < r.gpa)
            throw Error("guest memory region is empty or wraps around");
        if (i > 0 && regions_[i - 1].gpa + regions_[i - 1].size > r.gpa)
            throw Error("guest memory regions overlap");
    }
}

std::optional<std::span<uint8_t>> GuestMemory::span(uint64_t gpa, uint64_t len) const
{
    for (const auto& r : regions_) {
        if (gpa < r.gpa || gpa - r.gpa >= r.size)
            continue;
        const uint64_t offset = gpa - r.gpa;
        if (len > r.size - offset)
            return std::nullopt;
        return std::span<uint8_t>(r.host + offset, len);
    }
    // A zero-length range is valid only where a region could hold it.
    return std::nullopt;
}

bool GuestMemory::read(uint64_t gpa, void* dst, uint64_t len) const
{
    auto s = span(gpa, len);
    if (!s)
        return false;
    std::memcpy(dst, s->data(), len);
    return true;
}

bool GuestMemory::write(uint64_t gpa, const void* src, uint64_t len) const
{
    auto s = span(gpa, len);
    if (!s)
        return false;
    std::memcpy(s->data(), src, len);
    return true;
}

}  // namespace lkvm
