#include "hw/bus.h"

#include <algorithm>
#include <cstdio>
#include <mutex>

#include "base/error.h"

namespace lkvm {

namespace {
std::string hex(uint64_t v)
{
    char buf[24];
    std::snprintf(buf, sizeof(buf), "%#llx", static_cast<unsigned long long>(v));
    return buf;
}
}  // namespace

void Bus::add(uint64_t base, uint64_t size, BusDevice& device)
{
    if (size == 0 || base + size < base)
        throw Error(name_ + " range at " + hex(base) + " is empty or wraps around");
    std::unique_lock lock(mutex_);
    auto next = ranges_.lower_bound(base);
    if (next != ranges_.end() && next->first < base + size)
        throw Error(name_ + " range " + hex(base) + "+" + hex(size) + " overlaps the one at " + hex(next->first));
    if (next != ranges_.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second.size > base)
            throw Error(name_ + " range " + hex(base) + "+" + hex(size) + " overlaps the one at " + hex(prev->first));
    }
    ranges_.emplace(base, Range{size, &device});
}

bool Bus::remove(uint64_t base, const BusDevice& device)
{
    std::unique_lock lock(mutex_);
    auto it = ranges_.find(base);
    if (it == ranges_.end() || it->second.device != &device)
        return false;
    ranges_.erase(it);
    return true;
}

std::pair<BusDevice*, uint64_t> Bus::find(uint64_t addr, uint64_t len) const
{
    std::shared_lock lock(mutex_);
    auto it = ranges_.upper_bound(addr);
    if (it == ranges_.begin())
        return {nullptr, 0};
    --it;
    const uint64_t offset = addr - it->first;
    if (offset >= it->second.size || len > it->second.size - offset)
        return {nullptr, 0};
    return {it->second.device, offset};
}

bool Bus::read(uint64_t addr, std::span<uint8_t> data) const
{
    auto [device, offset] = find(addr, data.size());
    if (!device) {
        std::fill(data.begin(), data.end(), 0xff);
        return false;
    }
    device->read(offset, data);
    return true;
}

bool Bus::write(uint64_t addr, std::span<const uint8_t> data) const
{
    auto [device, offset] = find(addr, data.size());
    if (!device)
        return false;
    device->write(offset, data);
    return true;
}

}  // namespace lkvm
