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
    single_writer_add(buckets_[bucket_of(ns)]);
}

uint64_t LatencyHistogram::count() const
{
    uint64_t n = 0;
    for (const auto& b : buckets_)
        n += b.load(std::memory_order_relaxed);
    return n;
}

LatencyBuckets LatencyHistogram::nonzero_buckets() const
{
    LatencyBuckets nonzero;
    for (unsigned i = 0; i < kBuckets; ++i)
        if (const uint64_t n = buckets_[i].load(std::memory_order_relaxed))
            nonzero.emplace_back(static_cast<uint16_t>(i), n);
    return nonzero;
}

uint64_t LatencyHistogram::percentile(const LatencyBuckets& buckets, double p)
{
    uint64_t total = 0;
    for (const auto& [bucket, n] : buckets)
        total += n;
    if (total == 0)
        return 0;
    // The smallest bucket where at least p of the samples are at or below it.
    const auto rank = std::max<uint64_t>(static_cast<uint64_t>(p * static_cast<double>(total) + 0.5), 1);
    uint64_t seen = 0;
    for (const auto& [bucket, n] : buckets) {
        seen += n;
        if (seen >= rank)
            return bucket_upper(bucket);
    }
    return bucket_upper(buckets.back().first);
}

}  // namespace lkvm
