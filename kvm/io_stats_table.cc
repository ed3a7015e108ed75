#include "kvm/io_stats_table.h"

#include <cstdio>

namespace lkvm {

namespace {
std::string line(const char* format, auto... values)
{
    char buffer[256];
    std::snprintf(buffer, sizeof(buffer), format, values...);
    return buffer;
}

double mib(uint64_t bytes) { return static_cast<double>(bytes) / (1 << 20); }
double us(uint64_t ns) { return static_cast<double>(ns) / 1000; }
}  // namespace

std::string format_io_stats(const std::vector<std::unique_ptr<IoThread>>& threads,
                            const std::vector<std::unique_ptr<DiskDevice>>& disks)
{
    std::string out = line("%-12s %4s %10s %10s %9s %9s %9s %8s %8s %8s\n", "thread", "cpu", "requests", "MiB",
                           "batches", "wakeups", "poll-hits", "poll-us", "p50-us", "p99-us");
    for (const auto& t : threads) {
        const ThreadStats& s = t->stats();
        const IoCounters io = s.io.counters();
        const int cpu = t->options().cpu;
        out += line("%-12s %4s %10llu %10.1f %9llu %9llu %9llu %8.1f %8.1f %8.1f\n", t->name().c_str(),
                    cpu < 0 ? "-" : std::to_string(cpu).c_str(), (unsigned long long)io.requests, mib(io.bytes),
                    (unsigned long long)s.batches.load(), (unsigned long long)s.wakeups.load(),
                    (unsigned long long)s.poll_hits.load(), us(s.poll_ns.load()), us(s.io.latency().percentile(0.5)),
                    us(s.io.latency().percentile(0.99)));
    }
    out += line("%-5s %5s %-12s %10s %10s %8s %8s  %s\n", "disk", "queue", "thread", "requests", "MiB", "p50-us",
                "p99-us", "image");
    for (size_t d = 0; d < disks.size(); ++d) {
        const DiskDevice& disk = *disks[d];
        for (unsigned q = 0; q < disk.request_queues(); ++q) {
            const QueueStats& s = disk.queue_stats(q);
            const IoCounters io = s.counters();
            out += line("%-5zu %5u %-12s %10llu %10.1f %8.1f %8.1f  %s\n", d, q, disk.queue_thread(q).name().c_str(),
                        (unsigned long long)io.requests, mib(io.bytes), us(s.latency().percentile(0.5)),
                        us(s.latency().percentile(0.99)), disk.describe().c_str());
        }
    }
    return out;
}

}  // namespace lkvm
