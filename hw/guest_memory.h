// Guest physical memory: a few host mappings, each at a guest physical base.
// Every access is checked whole — start, end and overflow — before a guest
// address becomes a host pointer; a range that is not entirely inside one
// region is refused, never clipped.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

namespace lkvm {

struct MemoryRegion {
    uint64_t gpa;
    uint64_t size;
    uint8_t* host;
};

class GuestMemory {
public:
    // Regions must not overlap; the constructor refuses ones that do.
    explicit GuestMemory(std::vector<MemoryRegion> regions);

    const std::vector<MemoryRegion>& regions() const { return regions_; }
    // The host ranges of all regions.
    std::vector<iovec> host_ranges() const
    {
        std::vector<iovec> ranges;
        for (const MemoryRegion& r : regions_)
            ranges.push_back({r.host, r.size});
        return ranges;
    }

    // Host view of [gpa, gpa + len), or empty when any byte of it is outside RAM.
    std::optional<std::span<uint8_t>> span(uint64_t gpa, uint64_t len) const;

    bool read(uint64_t gpa, void* dst, uint64_t len) const;
    bool write(uint64_t gpa, const void* src, uint64_t len) const;

    // A copy of the object at gpa: read once, whatever the guest does to it meanwhile.
    template <typename T>
    std::optional<T> read_obj(uint64_t gpa) const
    {
        const auto bytes = span(gpa, sizeof(T));
        if (!bytes)
            return std::nullopt;
        T value;
        std::memcpy(&value, bytes->data(), sizeof(T));  // a constant size: inlined, no call
        return value;
    }
    template <typename T>
    bool write_obj(uint64_t gpa, const T& value) const
    {
        return write(gpa, &value, sizeof(T));
    }

private:
    std::vector<MemoryRegion> regions_;
};

}  // namespace lkvm
