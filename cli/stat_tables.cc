#include "cli/stat_tables.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>

#include "api/protocol.h"

namespace lkvm {

namespace {

std::string line(const char* format, auto... values)
{
    char buffer[512];
    std::snprintf(buffer, sizeof(buffer), format, values...);
    return buffer;
}

std::string cpu_text(int cpu) { return cpu < 0 ? "-" : std::to_string(cpu); }
// A value with `decimals` decimals, or "-" for none.
std::string decimal(std::optional<double> value, int decimals)
{
    return value ? line("%.*f", decimals, *value) : std::string("-");
}

// ---- Rates over the interval between two samples.

double seconds_between(const StatSnapshot& before, const StatSnapshot& after)
{
    return after.time_ns > before.time_ns ? static_cast<double>(after.time_ns - before.time_ns) / 1e9 : 0;
}

// A counter's growth (a counter never shrinks; if it seems to, nothing happened).
uint64_t growth(uint64_t now, uint64_t then) { return now > then ? now - then : 0; }

struct QueueSample {
    const StatSnapshot::Queue& now;
    uint64_t requests;  // completed in the interval
    double iops, mib_s, kicks_s, interrupts_s;
    std::optional<double> p50_us, p99_us;  // of the requests completed in the interval; none: no request
    std::optional<double> per_kick, per_interrupt;  // requests per kick, per interrupt; none: no kick, no interrupt
    double throttled;  // share of the interval its throttle group held requests back, 0-1
};

// The requests a histogram gained between two samples. A bucket that lost
// counts means they started over (a device reset): then all of `now` is new.
LatencyBuckets latency_growth(const LatencyBuckets& now, const LatencyBuckets& then)
{
    LatencyBuckets grown;
    auto at = now.begin();
    for (const auto& [bucket, count] : then) {
        for (; at != now.end() && at->first < bucket; ++at)
            grown.push_back(*at);
        if (at == now.end() || at->first != bucket || at->second < count)
            return now;
        if (at->second > count)
            grown.emplace_back(bucket, at->second - count);
        ++at;
    }
    grown.insert(grown.end(), at, now.end());
    return grown;
}

struct ThreadSample {
    const StatSnapshot::Thread& now;
    double iops;
    std::optional<double> poll_hit_rate;  // none: neither polled nor woken in the interval
};

std::vector<QueueSample> queue_samples(const StatSnapshot& before, const StatSnapshot& after)
{
    const double seconds = seconds_between(before, after);
    std::vector<QueueSample> samples;
    for (const auto& now : after.queues) {
        // A queue the first sample lacks (a device reset between) counts from now on.
        const auto then = std::ranges::find_if(
            before.queues, [&](const auto& q) { return q.disk == now.disk && q.queue == now.queue; });
        const auto& base = then == before.queues.end() ? now : *then;
        const uint64_t requests = growth(now.requests, base.requests);
        const uint64_t kicks = growth(now.kicks, base.kicks);
        const uint64_t interrupts = growth(now.interrupts, base.interrupts);
        const double mib = static_cast<double>(growth(now.bytes, base.bytes)) / (1 << 20);
        const LatencyBuckets latency = latency_growth(now.latency, base.latency);
        const double throttled_s = static_cast<double>(growth(now.throttled_ns, base.throttled_ns)) / 1e9;
        auto percentile_us = [&](double p) -> std::optional<double> {
            if (latency.empty())
                return std::nullopt;
            return static_cast<double>(LatencyHistogram::percentile(latency, p)) / 1000;
        };
        auto rate = [&](double count) { return seconds > 0 ? count / seconds : 0; };
        samples.push_back({now, requests, rate(static_cast<double>(requests)), rate(mib),
                           rate(static_cast<double>(kicks)), rate(static_cast<double>(interrupts)),
                           percentile_us(0.5), percentile_us(0.99), ratio(requests, kicks),
                           ratio(requests, interrupts), seconds > 0 ? std::min(throttled_s / seconds, 1.0) : 0});
    }
    return samples;
}

struct VcpuSample {
    const StatSnapshot::Vcpu& now;
    std::array<std::optional<double>, kVcpuCounterNames.size()> per_s;  // none: a counter this kernel lacks
};

std::vector<VcpuSample> vcpu_samples(const StatSnapshot& before, const StatSnapshot& after)
{
    const double seconds = seconds_between(before, after);
    std::vector<VcpuSample> samples;
    for (const auto& now : after.vcpus) {
        const auto then = std::ranges::find(before.vcpus, now.index, &StatSnapshot::Vcpu::index);
        const auto& base = then == before.vcpus.end() ? now : *then;
        VcpuSample& sample = samples.emplace_back(VcpuSample{now, {}});
        for (size_t c = 0; c < kVcpuCounterNames.size(); ++c) {
            if (!now.counters[c])
                continue;
            const uint64_t count = growth(*now.counters[c], base.counters[c].value_or(0));
            sample.per_s[c] = seconds > 0 ? static_cast<double>(count) / seconds : 0;
        }
    }
    return samples;
}

// All vCPUs' exits per disk request completed in the interval; none: no counters, or no request.
std::optional<double> exits_per_request(const StatSnapshot& before, const StatSnapshot& after,
                                        const std::vector<QueueSample>& queues)
{
    const auto exits_now = total_exits(after.vcpus);
    const auto exits_then = total_exits(before.vcpus);
    if (!exits_now || !exits_then)
        return std::nullopt;
    uint64_t requests = 0;
    for (const auto& q : queues)
        requests += q.requests;
    return ratio(growth(*exits_now, *exits_then), requests);
}

std::vector<ThreadSample> thread_samples(const StatSnapshot& before, const StatSnapshot& after)
{
    const double seconds = seconds_between(before, after);
    std::vector<ThreadSample> samples;
    for (const auto& now : after.threads) {
        const auto then = std::ranges::find(before.threads, now.name, &StatSnapshot::Thread::name);
        const auto& base = then == before.threads.end() ? now : *then;
        const double requests = static_cast<double>(growth(now.requests, base.requests));
        const uint64_t hits = growth(now.poll_hits, base.poll_hits);
        const uint64_t wakeups = growth(now.wakeups, base.wakeups);
        std::optional<double> hit_rate;
        if (hits + wakeups)
            hit_rate = static_cast<double>(hits) / static_cast<double>(hits + wakeups);
        samples.push_back({now, seconds > 0 ? requests / seconds : 0, hit_rate});
    }
    return samples;
}

bool show_all(StatTables which) { return !which.disks && !which.iothreads && !which.vcpus; }
bool show_disks(StatTables which) { return which.disks || show_all(which); }
bool show_iothreads(StatTables which) { return which.iothreads || show_all(which); }
bool show_vcpus(StatTables which) { return which.vcpus || show_all(which); }

// ---- JSON.

// A rate rounded to `decimals` places, or null for none: the digits a reader needs.
Json rounded(std::optional<double> value, int decimals)
{
    if (!value)
        return nullptr;
    const double scale = std::pow(10.0, decimals);
    return std::round(*value * scale) / scale;
}
Json cpu_json(int cpu) { return cpu < 0 ? Json(nullptr) : Json(cpu); }

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

std::string format_io_stats(const StatSnapshot& snapshot)
{
    std::string out = line("%-12s %4s %10s %10s %9s %9s %9s %8s %8s %8s\n", "thread", "cpu", "requests", "MiB",
                           "batches", "wakeups", "poll-hits", "poll-us", "p50-us", "p99-us");
    const auto percentile_us = [](const LatencyBuckets& latency, double p) {
        return us(LatencyHistogram::percentile(latency, p));
    };
    for (const auto& t : snapshot.threads)
        out += line("%-12s %4s %10llu %10.1f %9llu %9llu %9llu %8.1f %8.1f %8.1f\n", t.name.c_str(),
                    cpu_text(t.pinned_cpu).c_str(), (unsigned long long)t.requests, mib(t.bytes),
                    (unsigned long long)t.batches, (unsigned long long)t.wakeups, (unsigned long long)t.poll_hits,
                    us(t.poll_ns), percentile_us(t.latency, 0.5), percentile_us(t.latency, 0.99));
    out += line("%-5s %5s %-12s %10s %10s %8s %8s %10s %10s %8s %8s %8s %8s %11s  %s\n", "disk", "queue", "thread", "requests",
                "MiB", "p50-us", "p99-us", "kicks", "interrupts", "req/kick", "req/irq", "errors", "flushes", "throttled-s", "image");
    uint64_t requests = 0;
    for (const auto& q : snapshot.queues) {
        requests += q.requests;
        out += line("%-5u %5u %-12s %10llu %10.1f %8.1f %8.1f %10llu %10llu %8s %8s %8llu %8llu %11.2f  ", q.disk, q.queue,
                    q.thread.c_str(), (unsigned long long)q.requests, mib(q.bytes), percentile_us(q.latency, 0.5),
                    percentile_us(q.latency, 0.99), (unsigned long long)q.kicks, (unsigned long long)q.interrupts,
                    ratio_text(ratio(q.requests, q.kicks)).c_str(), ratio_text(ratio(q.requests, q.interrupts)).c_str(),
                    (unsigned long long)q.errors, (unsigned long long)q.flushes,
                    static_cast<double>(q.throttled_ns) / 1e9) +
               q.image + "\n";
    }
    const auto& vcpus = snapshot.vcpus;
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

// ---- What the commands print.

std::string format_guest_table(const std::vector<GuestInfo>& guests)
{
    int width = 4;
    for (const auto& guest : guests)
        width = std::max(width, static_cast<int>(guest.name.size()));
    std::string out = line("%-*s %8s %-7s %5s %7s  %s\n", width, "NAME", "PID", "STATE", "VCPUS", "MEM", "DISKS");
    for (const auto& guest : guests) {
        std::string disks;
        for (const auto& disk : guest.disks)
            disks += (disks.empty() ? "" : ",") + disk;
        out += line("%-*s %8d %-7s %5u %6lluM  ", width, guest.name.c_str(), guest.pid, guest.state.c_str(),
                    guest.vcpus, static_cast<unsigned long long>(guest.mem_mib)) +
               (disks.empty() ? "-" : disks) + "\n";
    }
    return out;
}

std::string format_stat_tables(const StatSnapshot& before, const StatSnapshot& after, StatTables which)
{
    std::string out = after.state.empty() ? "" : "guest " + after.state + "\n";
    if (show_disks(which)) {
        out += line("%-4s %5s %-12s %4s %9s %8s %9s %8s %8s %8s %8s %8s %8s %7s %8s %6s  %s\n", "disk", "queue", "thread",
                    "cpu", "IOPS", "MiB/s", "in-flight", "p50-us", "p99-us", "kicks/s", "irqs/s", "req/kick", "req/irq",
                    "errors", "flushes", "thr%", "image");
        for (const auto& s : queue_samples(before, after))
            out += line("%-4u %5u %-12s %4s %9.0f %8.1f %9llu %8s %8s %8.0f %8.0f %8s %8s %7llu %8llu %6.1f  ", s.now.disk, s.now.queue,
                        s.now.thread.c_str(), cpu_text(s.now.cpu).c_str(), s.iops, s.mib_s,
                        static_cast<unsigned long long>(s.now.in_flight), decimal(s.p50_us, 1).c_str(),
                        decimal(s.p99_us, 1).c_str(), s.kicks_s, s.interrupts_s, decimal(s.per_kick, 2).c_str(),
                        decimal(s.per_interrupt, 2).c_str(), static_cast<unsigned long long>(s.now.errors),
                        static_cast<unsigned long long>(s.now.flushes),
                        100 * s.throttled) +
                   s.now.image + "\n";
    }
    if (show_iothreads(which)) {
        if (!out.empty())
            out += "\n";
        out += line("%-12s %8s %4s %9s %9s %9s\n", "thread", "tid", "cpu", "IOPS", "poll-ns", "poll-hit%");
        for (const auto& s : thread_samples(before, after))
            out += line("%-12s %8d %4s %9.0f %9llu %9s\n", s.now.name.c_str(), s.now.tid, cpu_text(s.now.cpu).c_str(),
                        s.iops, static_cast<unsigned long long>(s.now.poll_ns),
                        s.poll_hit_rate ? line("%.1f", *s.poll_hit_rate * 100).c_str() : "-");
    }
    if (which.vcpus && after.vcpus.empty())
        out += "no vCPU exit counters: this guest's KVM has no binary statistics fd\n";
    if (show_vcpus(which) && !after.vcpus.empty()) {
        if (!out.empty())
            out += "\n";
        out += line("%-5s", "vcpu");
        for (const auto column : kVcpuCounterColumns)
            out += line(" %10s", (std::string(column) + "/s").c_str());
        out += "\n";
        for (const auto& s : vcpu_samples(before, after)) {
            out += line("%-5u", s.now.index);
            for (const auto& rate : s.per_s)
                out += line(" %10s", decimal(rate, 0).c_str());
            out += "\n";
        }
        out += "exits per disk request: " +
               decimal(exits_per_request(before, after, queue_samples(before, after)), 2) + "\n";
    }
    return out;
}

std::string format_stat_json(const StatSnapshot& before, const StatSnapshot& after, StatTables which,
                             double wall_time_s)
{
    Json out{{"time", rounded(wall_time_s, 3)}};
    if (!after.state.empty())
        out["state"] = after.state;
    out["interval_s"] = rounded(seconds_between(before, after), 6);
    const auto queues = queue_samples(before, after);
    if (show_disks(which)) {
        Json& disks = out["disks"] = Json::array();
        for (const auto& s : queues)
            disks.push_back({{"disk", s.now.disk},
                             {"queue", s.now.queue},
                             {"thread", s.now.thread},
                             {"cpu", cpu_json(s.now.cpu)},
                             {"image", s.now.image},
                             {"requests", s.now.requests},
                             {"bytes", s.now.bytes},
                             {"iops", rounded(s.iops, 1)},
                             {"mib_s", rounded(s.mib_s, 3)},
                             {"in_flight", s.now.in_flight},
                             {"p50_us", rounded(s.p50_us, 3)},
                             {"p99_us", rounded(s.p99_us, 3)},
                             {"kicks", s.now.kicks},
                             {"interrupts", s.now.interrupts},
                             {"errors", s.now.errors},
                             {"throttled_ns", s.now.throttled_ns},
                             {"flushes", s.now.flushes},
                             {"requests_per_kick", rounded(s.per_kick, 3)},
                             {"requests_per_interrupt", rounded(s.per_interrupt, 3)}});
    }
    if (show_iothreads(which)) {
        Json& threads = out["iothreads"] = Json::array();
        for (const auto& s : thread_samples(before, after))
            threads.push_back({{"name", s.now.name},
                               {"tid", s.now.tid},
                               {"cpu", cpu_json(s.now.cpu)},
                               {"requests", s.now.requests},
                               {"bytes", s.now.bytes},
                               {"iops", rounded(s.iops, 1)},
                               {"poll_ns", s.now.poll_ns},
                               {"poll_hits", s.now.poll_hits},
                               {"wakeups", s.now.wakeups},
                               {"poll_hit_rate", rounded(s.poll_hit_rate, 4)}});
    }
    if (show_vcpus(which)) {
        // Cumulative counters under KVM's own names, null where this kernel lacks one.
        Json& vcpus = out["vcpus"] = Json::array();
        for (const auto& s : vcpu_samples(before, after)) {
            Json vcpu{{"vcpu", s.now.index}};
            for (size_t c = 0; c < kVcpuCounterNames.size(); ++c)
                vcpu[std::string(kVcpuCounterNames[c])] = s.now.counters[c] ? Json(*s.now.counters[c]) : Json(nullptr);
            vcpu["exits_s"] = rounded(s.per_s[kVcpuExits], 1);
            vcpus.push_back(std::move(vcpu));
        }
        out["exits_per_request"] = rounded(exits_per_request(before, after, queues), 4);
    }
    return json_line(out);
}

}  // namespace lkvm
