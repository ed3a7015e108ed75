#include "kvm/stat_snapshot.h"

#include <charconv>
#include <fstream>
#include <map>

namespace lkvm {

StatSnapshot sample_io_stats(const std::vector<std::unique_ptr<IoThread>>& threads,
                              const std::vector<std::unique_ptr<DiskDevice>>& disks)
{
    StatSnapshot sample;
    sample.time_ns = monotonic_ns();
    std::map<const IoThread*, int> cpu_of;  // each thread's /proc file read once
    for (const auto& t : threads) {
        const ThreadStats& s = t->stats();
        const IoCounters io = s.io.counters();
        const pid_t tid = t->tid();
        const int cpu = tid ? thread_last_cpu(tid) : -1;
        cpu_of[t.get()] = cpu;
        sample.threads.push_back({.name = t->name(),
                                  .tid = tid,
                                  .cpu = cpu,
                                  .pinned_cpu = t->options().cpu,
                                  .requests = io.requests,
                                  .bytes = io.bytes,
                                  .batches = s.batches.load(std::memory_order_relaxed),
                                  .wakeups = s.wakeups.load(std::memory_order_relaxed),
                                  .poll_hits = s.poll_hits.load(std::memory_order_relaxed),
                                  .poll_ns = s.poll_ns.load(std::memory_order_relaxed),
                                  .latency = s.io.latency().nonzero_buckets()});
    }
    for (size_t d = 0; d < disks.size(); ++d) {
        const DiskDevice& disk = *disks[d];
        for (unsigned q = 0; q < disk.request_queues(); ++q) {
            const QueueStats& s = disk.queue_stats(q);
            const IoCounters io = s.counters();
            const IoThread& thread = disk.queue_thread(q);
            const auto cpu = cpu_of.find(&thread);
            sample.queues.push_back({.disk = static_cast<unsigned>(d),
                                     .queue = q,
                                     .thread = thread.name(),
                                     .image = disk.describe(),
                                     .cpu = cpu == cpu_of.end() ? -1 : cpu->second,
                                     .requests = io.requests,
                                     .bytes = io.bytes,
                                     .in_flight = s.in_flight(),
                                     .latency = s.latency().nonzero_buckets(),
                                     .kicks = s.kicks(),
                                     .interrupts = s.interrupts(),
                                     .errors = s.errors(),
                                     .throttled_ns = s.throttled_ns(),
                                     .flushes = s.flushes()});
        }
    }
    return sample;
}

std::optional<int> parse_proc_stat_cpu(std::string_view line)
{
    // Field 2 is the command in parentheses, which may itself hold spaces and
    // ')': count the fields from the last ')', the end of field 2.
    constexpr int kProcessorField = 39;
    const size_t comm_end = line.rfind(')');
    if (comm_end == std::string_view::npos)
        return std::nullopt;
    std::string_view rest = line.substr(comm_end + 1);
    for (int field = 3;; ++field) {
        const size_t start = rest.find_first_not_of(" \n");
        if (start == std::string_view::npos)
            return std::nullopt;
        rest.remove_prefix(start);
        const std::string_view value = rest.substr(0, rest.find_first_of(" \n"));
        rest.remove_prefix(value.size());
        if (field < kProcessorField)
            continue;
        int cpu = -1;
        const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), cpu);
        if (error != std::errc() || end != value.data() + value.size() || cpu < 0)
            return std::nullopt;
        return cpu;
    }
}

int thread_last_cpu(pid_t tid)
{
    std::ifstream file("/proc/self/task/" + std::to_string(tid) + "/stat");
    std::string line;
    if (!std::getline(file, line))
        return -1;
    return parse_proc_stat_cpu(line).value_or(-1);
}

}  // namespace lkvm
