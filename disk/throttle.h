// I/O limits with QEMU's semantics (util/throttle.c, block/throttle-groups.c),
// so that `iops=`, `bps-wr=`, `iops-max=` mean here what they mean there:
// leaky buckets that drain at the average rate, a burst rate that may last
// burst_length seconds, and iops-size for large requests. A ThrottleGroup
// holds the buckets that several request queues share (the queues of one
// disk, or of the disks of a --throttle-group) and lets them take turns when
// they must wait, so that no disk of a group starves.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>

namespace lkvm {

enum class ThrottleBucket { kBpsTotal, kBpsRead, kBpsWrite, kIopsTotal, kIopsRead, kIopsWrite };
constexpr size_t kThrottleBuckets = 6;

struct BucketLimit {
    uint64_t avg = 0;           // bytes or operations per second; 0: unlimited
    uint64_t max = 0;           // burst rate; 0: a tenth of a second of avg may come at once
    uint64_t burst_length = 1;  // seconds the burst rate may last
    bool operator==(const BucketLimit&) const = default;
};

struct ThrottleLimits {
    std::array<BucketLimit, kThrottleBuckets> buckets{};
    uint64_t iops_size = 0;  // bytes: a larger request counts as bytes/iops_size operations
    BucketLimit& operator[](ThrottleBucket b) { return buckets[static_cast<size_t>(b)]; }
    const BucketLimit& operator[](ThrottleBucket b) const { return buckets[static_cast<size_t>(b)]; }
    bool limits_anything() const;
    bool operator==(const ThrottleLimits&) const = default;
};

// QEMU's largest limit (THROTTLE_VALUE_MAX).
constexpr uint64_t kThrottleValueMax = 1'000'000'000'000'000ull;

// Why the limits cannot be used (QEMU's rules, in our option names), or nullopt.
std::optional<std::string> throttle_limits_problem(const ThrottleLimits& limits);

// The buckets' arithmetic, for one thread at a time; times in ns of any
// monotonic clock.
class LeakyBuckets {
public:
    explicit LeakyBuckets(const ThrottleLimits& limits = {}, uint64_t now_ns = 0);
    // New limits empty the buckets, as QEMU's throttle_config does.
    void set_limits(const ThrottleLimits& limits, uint64_t now_ns);
    const ThrottleLimits& limits() const { return limits_; }
    // How long a request in that direction must wait before it may go; 0: now.
    uint64_t wait_ns(bool write, uint64_t now_ns);
    // Counts a request that goes.
    void account(bool write, uint64_t bytes);

private:
    struct Level {
        double level = 0;
        double burst_level = 0;  // only with burst_length > 1
    };
    void leak(uint64_t now_ns);

    ThrottleLimits limits_;
    std::array<Level, kThrottleBuckets> levels_{};
    uint64_t previous_leak_ns_ = 0;
};

// Limits shared by request queues that may run on different threads.
class ThrottleGroup {
public:
    // A queue with requests held back by the group.
    class Member {
    public:
        virtual ~Member() = default;
        // Its turn has come: called from any thread, under the group's lock,
        // so it must only hand the work to the member's own thread.
        virtual void resume() = 0;
    };

    struct Verdict {
        bool go = false;       // counted: submit it
        uint64_t wait_ns = 0;  // when not: try again after this long; 0: at resume()
    };

    explicit ThrottleGroup(std::string name, const ThrottleLimits& limits = {});
    const std::string& name() const { return name_; }
    // Cheap, for the request path: false when nothing is limited.
    bool active() const { return active_.load(std::memory_order_relaxed); }
    ThrottleLimits limits() const;
    // From any thread; members waiting try again at once.
    void set_limits(const ThrottleLimits& limits);

    // May member's next request go now? `more` says whether the member holds
    // others behind it: it then goes to the back of the line, and the next
    // member in line is resumed.
    Verdict admit(Member& member, bool write, uint64_t bytes, bool more);
    // A member that stops: out of the line.
    void leave(Member& member);

private:
    void resume_front(const Member* except);

    const std::string name_;
    mutable std::mutex mutex_;
    LeakyBuckets buckets_;
    std::atomic<bool> active_{false};
    std::deque<Member*> line_;  // members waiting, in the order they are served
};

}  // namespace lkvm
