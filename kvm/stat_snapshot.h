// What a running guest is and does, as plain values: what it is made of
// (GuestInfo), and its counters per I/O thread, per disk queue and per vCPU
// (StatSnapshot). What `lkvm list`, `lkvm stat` and the --stats table at exit
// show; their formatting is cli/stat_tables.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvm/vcpu_stats.h"
#include "virtio/io_thread.h"
#include "virtio/request_queue.h"

namespace lkvm {

// What a guest is (the table `lkvm list` prints).
struct GuestInfo {
    std::string name, state;  // state: "running" or "paused"
    int pid = 0;
    unsigned vcpus = 0;
    uint64_t mem_mib = 0;
    std::vector<std::string> disks;  // image paths, in command-line order
    bool operator==(const GuestInfo&) const = default;
};

// Everything at one moment, as plain values. Counters and latency histograms
// count from the start: rates and percentiles over an interval come from two
// snapshots.
struct StatSnapshot {
    struct Thread {
        std::string name;
        int tid = 0;        // 0: not running yet
        int cpu = -1;       // the host CPU it last ran on; -1: unknown
        int pinned_cpu = -1;  // the CPU --iothreads affinity= gave it; -1: not pinned
        uint64_t requests = 0, bytes = 0;
        uint64_t batches = 0, wakeups = 0, poll_hits = 0;
        uint64_t poll_ns = 0;  // its current poll time
        LatencyBuckets latency;  // of the requests it completed so far
        bool operator==(const Thread&) const = default;
    };
    struct Queue {
        unsigned disk = 0;   // the disk device, in command-line order
        unsigned queue = 0;  // its request queue
        std::string thread;  // the I/O thread serving it
        std::string image;   // the device's image(s)
        int cpu = -1;        // where that thread last ran; -1: unknown
        uint64_t requests = 0, bytes = 0, in_flight = 0;
        LatencyBuckets latency;  // of the requests completed so far
        uint64_t kicks = 0, interrupts = 0;
        uint64_t errors = 0;  // requests the disk failed
        uint64_t throttled_ns = 0;  // time its throttle group held requests back
        uint64_t flushes = 0;  // flushes that reached the disk
        bool operator==(const Queue&) const = default;
    };
    struct Vcpu {
        unsigned index = 0;
        VcpuCounters counters{};
        bool operator==(const Vcpu&) const = default;
    };
    uint64_t time_ns = 0;  // monotonic_ns() when taken
    std::string state;     // the guest's, when not plainly running ("paused (io-error: ...)"); empty: running
    std::vector<Thread> threads;
    std::vector<Queue> queues;
    std::vector<Vcpu> vcpus;  // empty where KVM has no statistics fd
    bool operator==(const StatSnapshot&) const = default;
};

StatSnapshot sample_io_stats(const std::vector<std::unique_ptr<IoThread>>& threads,
                              const std::vector<std::unique_ptr<DiskDevice>>& disks);

// The CPU a task last ran on: field 39 ("processor") of its /proc/.../stat
// line. nullopt when the line does not have it.
std::optional<int> parse_proc_stat_cpu(std::string_view stat_line);
// The same for a thread of this process, read from /proc/self/task/TID/stat; -1: unknown.
int thread_last_cpu(pid_t tid);

}  // namespace lkvm
