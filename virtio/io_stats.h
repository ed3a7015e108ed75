// I/O statistics, written by the one I/O thread that owns them and read by
// anyone (the --stats table at exit, a control socket while running):
// relaxed atomics, so a reader sees each number whole, never a torn one.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lkvm {

// A histogram's non-empty buckets as (bucket, count), buckets ascending:
// what a reader keeps of one (two of them, subtracted, are an interval's).
using LatencyBuckets = std::vector<std::pair<uint16_t, uint64_t>>;

// Latencies in log-linear buckets: 8 per power of two (at most 12.5 % error),
// from 1 ns to about 2^40 ns (18 minutes), with no allocation.
class LatencyHistogram {
public:
    static constexpr unsigned kSubBuckets = 8;
    static constexpr unsigned kBuckets = 41 * kSubBuckets;

    void record(uint64_t ns);
    uint64_t count() const;
    // The latency below which fraction p (0..1) of the recorded ones fall:
    // the upper edge of the bucket it lands in; 0 when nothing was recorded.
    uint64_t percentile(double p) const { return percentile(nonzero_buckets(), p); }
    static uint64_t percentile(const LatencyBuckets& buckets, double p);
    LatencyBuckets nonzero_buckets() const;

    static unsigned bucket_of(uint64_t ns);
    static uint64_t bucket_upper(unsigned bucket);

private:
    std::array<std::atomic<uint64_t>, kBuckets> buckets_{};
};

// Counters a queue (or a whole thread) keeps; plain values in a snapshot.
struct IoCounters {
    uint64_t requests = 0;
    uint64_t bytes = 0;
};

// Statistics have one writer each (the I/O thread that owns them) and any
// number of readers: the writer adds with a relaxed load and store, never a
// locked read-modify-write, and readers still see each number whole.
inline void single_writer_add(std::atomic<uint64_t>& counter, uint64_t n = 1)
{
    counter.store(counter.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

class QueueStats {
public:
    // A request took a slot: in flight until completed() or dropped().
    void started() { single_writer_add(in_flight_); }
    void completed(uint64_t bytes, uint64_t latency_ns)
    {
        single_writer_add(requests_);
        single_writer_add(bytes_, bytes);
        latency_.record(latency_ns);
        single_writer_add(in_flight_, -1ull);
    }
    // A request its queue stopped waiting for (a reset): never answered, not counted.
    void dropped() { single_writer_add(in_flight_, -1ull); }
    IoCounters counters() const
    {
        return {requests_.load(std::memory_order_relaxed), bytes_.load(std::memory_order_relaxed)};
    }
    // Requests started and not yet completed or dropped: what the disk is working on now.
    uint64_t in_flight() const { return in_flight_.load(std::memory_order_relaxed); }
    const LatencyHistogram& latency() const { return latency_; }

    // Guest notifications read from the queue's eventfd (`kicks` that KVM
    // coalesced into one read count as that many), and interrupts raised.
    void kicked(uint64_t kicks) { single_writer_add(kicks_, kicks); }
    // A request the disk failed (an I/O error, a short transfer): the guest got an error status.
    void failed() { single_writer_add(errors_); }
    uint64_t errors() const { return errors_.load(std::memory_order_relaxed); }
    // A flush that reached the disk (cache=unsafe's never do).
    void flushed() { single_writer_add(flushes_); }
    uint64_t flushes() const { return flushes_.load(std::memory_order_relaxed); }
    void interrupted() { single_writer_add(interrupts_); }
    uint64_t kicks() const { return kicks_.load(std::memory_order_relaxed); }
    uint64_t interrupts() const { return interrupts_.load(std::memory_order_relaxed); }
    // Time the queue held requests back for its throttle group.
    void throttled(uint64_t ns) { single_writer_add(throttled_ns_, ns); }
    uint64_t throttled_ns() const { return throttled_ns_.load(std::memory_order_relaxed); }

    // The kernel thread id that serves this queue, and whether another one
    // ever did: each queue belongs to exactly one I/O thread.
    void served_by(int tid)
    {
        const int before = served_by_.load(std::memory_order_relaxed);
        if (before == tid)
            return;
        if (before != 0)
            moved_.store(true, std::memory_order_relaxed);
        served_by_.store(tid, std::memory_order_relaxed);
    }
    int server() const { return served_by_.load(std::memory_order_relaxed); }
    bool moved() const { return moved_.load(std::memory_order_relaxed); }

private:
    std::atomic<uint64_t> requests_{0}, bytes_{0}, in_flight_{0};
    std::atomic<uint64_t> kicks_{0}, interrupts_{0}, errors_{0}, throttled_ns_{0}, flushes_{0};
    std::atomic<int> served_by_{0};
    std::atomic<bool> moved_{false};
    LatencyHistogram latency_;
};

// What an I/O thread did: its queues' requests plus how it spent its time.
struct ThreadStats {
    QueueStats io;                        // every request of every queue it serves
    std::atomic<uint64_t> batches{0};     // engine submissions
    std::atomic<uint64_t> wakeups{0};     // woken from sleep (a notify, a completion, a post)
    std::atomic<uint64_t> poll_hits{0};   // work found by busy-polling, no sleep
    std::atomic<uint64_t> poll_ns{0};     // the current poll time

    void add(std::atomic<uint64_t>& counter, uint64_t n = 1) { single_writer_add(counter, n); }
    void set(std::atomic<uint64_t>& value, uint64_t n) { value.store(n, std::memory_order_relaxed); }
};

}  // namespace lkvm
