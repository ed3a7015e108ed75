#include "kvm/io_stats_table.h"

#include <charconv>
#include <cstdio>
#include <fstream>
#include <map>

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
std::string ratio_text(std::optional<double> value) { return value ? line("%.2f", *value) : "-"; }
std::string count_text(std::optional<uint64_t> value) { return value ? std::to_string(*value) : "-"; }
}  // namespace

std::optional<double> ratio(uint64_t part, uint64_t whole)
{
    if (whole == 0)
        return std::nullopt;
    return static_cast<double>(part) / static_cast<double>(whole);
}

std::optional<uint64_t> total_exits(std::span<const StatSnapshot::Vcpu> vcpus)
{
    uint64_t sum = 0;
    for (const auto& vcpu : vcpus) {
        if (!vcpu.counters[kVcpuExits])
            return std::nullopt;
        sum += *vcpu.counters[kVcpuExits];
    }
    return vcpus.empty() ? std::nullopt : std::optional(sum);
}

std::string format_io_stats(const std::vector<std::unique_ptr<IoThread>>& threads,
                            const std::vector<std::unique_ptr<DiskDevice>>& disks,
                            std::span<const StatSnapshot::Vcpu> vcpus)
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
    out += line("%-5s %5s %-12s %10s %10s %8s %8s %10s %10s %8s %8s %8s %8s %11s  %s\n", "disk", "queue", "thread", "requests",
                "MiB", "p50-us", "p99-us", "kicks", "interrupts", "req/kick", "req/irq", "errors", "flushes", "throttled-s", "image");
    uint64_t requests = 0;
    for (size_t d = 0; d < disks.size(); ++d) {
        const DiskDevice& disk = *disks[d];
        for (unsigned q = 0; q < disk.request_queues(); ++q) {
            const QueueStats& s = disk.queue_stats(q);
            const IoCounters io = s.counters();
            requests += io.requests;
            out += line("%-5zu %5u %-12s %10llu %10.1f %8.1f %8.1f %10llu %10llu %8s %8s %8llu %8llu %11.2f  ", d, q,
                        disk.queue_thread(q).name().c_str(), (unsigned long long)io.requests, mib(io.bytes),
                        us(s.latency().percentile(0.5)), us(s.latency().percentile(0.99)),
                        (unsigned long long)s.kicks(), (unsigned long long)s.interrupts(),
                        ratio_text(ratio(io.requests, s.kicks())).c_str(),
                        ratio_text(ratio(io.requests, s.interrupts())).c_str(), (unsigned long long)s.errors(),
                        (unsigned long long)s.flushes(),
                        static_cast<double>(s.throttled_ns()) / 1e9) +
                   disk.describe() + "\n";
        }
    }
    if (vcpus.empty())
        return out;
    out += line("%-5s", "vcpu");
    for (const auto column : kVcpuCounterColumns)
        out += line(" %12s", std::string(column).c_str());
    out += "\n";
    for (const auto& vcpu : vcpus) {
        out += line("%-5u", vcpu.index);
        for (const auto& counter : vcpu.counters)
            out += line(" %12s", count_text(counter).c_str());
        out += "\n";
    }
    const auto exits = total_exits(vcpus);
    return out + "exits per disk request: " + ratio_text(exits ? ratio(*exits, requests) : std::nullopt) + "\n";
}

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
                                  .requests = io.requests,
                                  .bytes = io.bytes,
                                  .batches = s.batches.load(std::memory_order_relaxed),
                                  .wakeups = s.wakeups.load(std::memory_order_relaxed),
                                  .poll_hits = s.poll_hits.load(std::memory_order_relaxed),
                                  .poll_ns = s.poll_ns.load(std::memory_order_relaxed)});
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
