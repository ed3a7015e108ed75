#include "virtio/io_stats.h"

#include <algorithm>
#include <bit>

namespace lkvm {

unsigned LatencyHistogram::bucket_of(uint64_t ns)
{
    if (ns < kSubBuckets)
        return static_cast<unsigned>(ns);
    const unsigned log = std::min<unsigned>(static_cast<unsigned>(std::bit_width(ns)) - 1, kBuckets / kSubBuckets + 1);
    const unsigned sub = static_cast<unsigned>(ns >> (log - 3)) & (kSubBuckets - 1);
    return std::min((log - 2) * kSubBuckets + sub, kBuckets - 1);
}

uint64_t LatencyHistogram::bucket_upper(unsigned bucket)
{
    if (bucket < kSubBuckets)
        return bucket;
    const unsigned log = bucket / kSubBuckets + 2;
    const uint64_t lower = uint64_t{kSubBuckets + bucket % kSubBuckets} << (log - 3);
    return lower + (uint64_t{1} << (log - 3)) - 1;
}

void LatencyHistogram::record(uint64_t ns)
{
    buckets_[bucket_of(ns)].fetch_add(1, std::memory_order_relaxed);
}

uint64_t LatencyHistogram::count() const
{
    uint64_t n = 0;
    for (const auto& b : buckets_)
        n += b.load(std::memory_order_relaxed);
    return n;
}

uint64_t LatencyHistogram::percentile(double p) const
{
    const uint64_t total = count();
    if (total == 0)
        return 0;
    // The smallest bucket where at least p of the samples are at or below it.
    const auto rank = static_cast<uint64_t>(p * static_cast<double>(total) + 0.5);
    uint64_t seen = 0;
    for (unsigned i = 0; i < kBuckets; ++i) {
        seen += buckets_[i].load(std::memory_order_relaxed);
        if (seen >= std::max<uint64_t>(rank, 1))
            return bucket_upper(i);
    }
    return bucket_upper(kBuckets - 1);
}

}  // namespace lkvm
