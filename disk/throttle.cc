#include "disk/throttle.h"

#include <algorithm>
#include <chrono>
#include <cmath>

namespace lkvm {

namespace {
constexpr double kNsPerSecond = 1e9;
constexpr const char* kBucketOption[kThrottleBuckets] = {"bps", "bps-rd", "bps-wr", "iops", "iops-rd", "iops-wr"};

// The buckets a request in a direction fills and must wait for: its bytes
// and operations, total and of its direction.
constexpr std::array<ThrottleBucket, 4> kBucketsOf[2] = {
    {ThrottleBucket::kBpsTotal, ThrottleBucket::kIopsTotal, ThrottleBucket::kBpsRead, ThrottleBucket::kIopsRead},
    {ThrottleBucket::kBpsTotal, ThrottleBucket::kIopsTotal, ThrottleBucket::kBpsWrite, ThrottleBucket::kIopsWrite},
};
bool counts_bytes(ThrottleBucket b) { return static_cast<size_t>(b) < 3; }

uint64_t steady_ns()
{
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// Rounded up: a timer that fires a little early would find the bucket still over.
uint64_t wait_for(double extra, uint64_t rate)
{
    return static_cast<uint64_t>(std::ceil(extra * kNsPerSecond / static_cast<double>(rate)));
}
}  // namespace

bool ThrottleLimits::limits_anything() const
{
    return std::ranges::any_of(buckets, [](const BucketLimit& b) { return b.avg != 0; });
}

std::optional<std::string> throttle_limits_problem(const ThrottleLimits& limits)
{
    for (const auto [total, read, write] : {std::array{0, 1, 2}, std::array{3, 4, 5}}) {
        const auto& b = limits.buckets;
        if ((b[total].avg && (b[read].avg || b[write].avg)) || (b[total].max && (b[read].max || b[write].max)))
            return std::string(kBucketOption[total]) + " and " + kBucketOption[read] + "/" + kBucketOption[write] +
                   " cannot be used together";
    }
    if (limits.iops_size && !limits[ThrottleBucket::kIopsTotal].avg && !limits[ThrottleBucket::kIopsRead].avg &&
        !limits[ThrottleBucket::kIopsWrite].avg)
        return std::string("iops-size needs an iops limit (iops=, iops-rd= or iops-wr=)");
    for (size_t i = 0; i < kThrottleBuckets; ++i) {
        const BucketLimit& b = limits.buckets[i];
        const std::string name = kBucketOption[i];
        if (b.avg > kThrottleValueMax || b.max > kThrottleValueMax)
            return name + " limits must be at most " + std::to_string(kThrottleValueMax);
        if (b.burst_length == 0)
            return name + "-max-length must be at least 1";
        if (b.burst_length > 1 && !b.max)
            return name + "-max-length needs " + name + "-max";
        if (b.max && b.burst_length > kThrottleValueMax / b.max)
            return name + "-max-length is too long for " + name + "-max";
        if (b.max && !b.avg)
            return name + "-max needs " + name + "=";
        if (b.max && b.max < b.avg)
            return name + "-max cannot be lower than " + name + "=";
    }
    return std::nullopt;
}

LeakyBuckets::LeakyBuckets(const ThrottleLimits& limits, uint64_t now_ns) { set_limits(limits, now_ns); }

void LeakyBuckets::set_limits(const ThrottleLimits& limits, uint64_t now_ns)
{
    limits_ = limits;
    levels_ = {};
    previous_leak_ns_ = now_ns;
}

void LeakyBuckets::leak(uint64_t now_ns)
{
    if (now_ns <= previous_leak_ns_)
        return;
    const double seconds = static_cast<double>(now_ns - previous_leak_ns_) / kNsPerSecond;
    previous_leak_ns_ = now_ns;
    for (size_t i = 0; i < kThrottleBuckets; ++i) {
        const BucketLimit& b = limits_.buckets[i];
        Level& l = levels_[i];
        l.level = std::max(l.level - static_cast<double>(b.avg) * seconds, 0.0);
        if (b.burst_length > 1)
            l.burst_level = std::max(l.burst_level - static_cast<double>(b.max) * seconds, 0.0);
    }
}

uint64_t LeakyBuckets::wait_ns(bool write, uint64_t now_ns)
{
    leak(now_ns);
    uint64_t longest = 0;
    for (const ThrottleBucket which : kBucketsOf[write]) {
        const BucketLimit& b = limits_[which];
        const Level& l = levels_[static_cast<size_t>(which)];
        if (!b.avg)
            continue;
        // Without a burst rate a tenth of a second of avg may still come at
        // once, or every other request would wait; with one, the bucket
        // holds burst_length seconds of it.
        const double bucket = b.max ? static_cast<double>(b.max) * static_cast<double>(b.burst_length)
                                    : static_cast<double>(b.avg) / 10;
        uint64_t wait = 0;
        if (l.level > bucket)
            wait = wait_for(l.level - bucket, b.avg);
        else if (b.burst_length > 1 && l.burst_level > static_cast<double>(b.max) / 10)
            wait = wait_for(l.burst_level - static_cast<double>(b.max) / 10, b.max);
        longest = std::max(longest, wait);
    }
    return longest;
}

void LeakyBuckets::account(bool write, uint64_t bytes)
{
    const double operations = limits_.iops_size && bytes > limits_.iops_size
                                  ? static_cast<double>(bytes) / static_cast<double>(limits_.iops_size)
                                  : 1.0;
    for (const ThrottleBucket which : kBucketsOf[write]) {
        const double units = counts_bytes(which) ? static_cast<double>(bytes) : operations;
        Level& l = levels_[static_cast<size_t>(which)];
        l.level += units;
        if (limits_[which].burst_length > 1)
            l.burst_level += units;
    }
}

ThrottleGroup::ThrottleGroup(std::string name, const ThrottleLimits& limits) : name_(std::move(name))
{
    set_limits(limits);
}

ThrottleLimits ThrottleGroup::limits() const
{
    std::lock_guard lock(mutex_);
    return buckets_.limits();
}

void ThrottleGroup::set_limits(const ThrottleLimits& limits)
{
    std::lock_guard lock(mutex_);
    buckets_.set_limits(limits, steady_ns());
    active_.store(limits.limits_anything(), std::memory_order_relaxed);
    resume_front(nullptr);
}

ThrottleGroup::Verdict ThrottleGroup::admit(Member& member, bool write, uint64_t bytes, bool more)
{
    std::lock_guard lock(mutex_);
    const bool queued = std::ranges::find(line_, &member) != line_.end();
    if (!line_.empty() && line_.front() != &member) {
        if (!queued)
            line_.push_back(&member);
        return {false, 0};  // another member's turn
    }
    if (const uint64_t wait = buckets_.wait_ns(write, steady_ns())) {
        if (!queued)
            line_.push_back(&member);  // the line was empty: it is the front now
        return {false, wait};
    }
    buckets_.account(write, bytes);
    if (queued) {
        line_.pop_front();
        if (more)
            line_.push_back(&member);
        resume_front(&member);
    }
    return {true, 0};
}

void ThrottleGroup::leave(Member& member)
{
    std::lock_guard lock(mutex_);
    const bool was_front = !line_.empty() && line_.front() == &member;
    std::erase(line_, &member);
    if (was_front)
        resume_front(nullptr);
}

void ThrottleGroup::resume_front(const Member* except)
{
    if (!line_.empty() && line_.front() != except)
        line_.front()->resume();
}

}  // namespace lkvm
