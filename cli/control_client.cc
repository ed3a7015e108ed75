#include "kvm/control_client.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <optional>
#include <thread>

#include "base/error.h"
#include "base/log.h"

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

// ---- JSON, by hand: numbers and strings are all it needs.

std::string json_number(double value, int decimals) { return line("%.*f", decimals, value); }
std::string optional_number(std::optional<double> value, int decimals)
{
    return value ? json_number(*value, decimals) : "null";
}

// The length of the valid UTF-8 sequence at text[i], or 0 when there is none.
size_t utf8_length(std::string_view text, size_t i)
{
    const auto lead = static_cast<unsigned char>(text[i]);
    size_t length;
    uint32_t code, least;
    if (lead < 0x80)
        return 1;
    if ((lead & 0xe0) == 0xc0)
        length = 2, code = lead & 0x1f, least = 0x80;
    else if ((lead & 0xf0) == 0xe0)
        length = 3, code = lead & 0x0f, least = 0x800;
    else if ((lead & 0xf8) == 0xf0)
        length = 4, code = lead & 0x07, least = 0x10000;
    else
        return 0;
    if (i + length > text.size())
        return 0;
    for (size_t k = 1; k < length; ++k) {
        const auto next = static_cast<unsigned char>(text[i + k]);
        if ((next & 0xc0) != 0x80)
            return 0;
        code = code << 6 | (next & 0x3f);
    }
    // Overlong forms, surrogates and beyond U+10FFFF are not UTF-8 either.
    if (code < least || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff))
        return 0;
    return length;
}

// ---- The commands.

ControlConnection connect_to(const std::string& dir, const std::string& name)
{
    auto connection = ControlConnection::open(dir, name);
    if (!connection)
        throw Error("no running guest named " + name + " (see 'lkvm list')");
    return std::move(*connection);
}

int list_guests(const std::string& dir, std::FILE* out)
{
    std::vector<GuestInfo> guests;
    bool failed = false;
    for (const auto& name : running_guests(dir)) {
        try {
            if (auto connection = ControlConnection::open(dir, name))
                guests.push_back(parse_guest_info(connection->ask(ControlVerb::kInfo)));
        } catch (const Error& e) {
            log_error(e.what());
            failed = true;
        }
    }
    if (guests.empty() && !failed)
        log_info("no running guests");
    if (!guests.empty())
        std::fputs(format_guest_table(guests).c_str(), out);
    return failed ? exit_status::kError : exit_status::kOk;
}

int tell_every_guest(const std::string& dir, ControlVerb verb)
{
    const auto names = running_guests(dir);
    if (names.empty())
        log_info("no running guests");
    bool failed = false;
    for (const auto& name : names) {
        try {
            if (auto connection = ControlConnection::open(dir, name))  // none: it ended by itself meanwhile
                connection->ask(verb);
        } catch (const Error& e) {
            log_error(e.what());
            failed = true;
        }
    }
    return failed ? exit_status::kError : exit_status::kOk;
}

int show_stats(const std::string& dir, const ControlCommand& command, std::FILE* out)
{
    ControlConnection connection = connect_to(dir, command.name);
    const StatTables which{command.disks, command.iothreads, command.vcpus};
    const bool watch = command.watch_s > 0;
    const bool redraw = watch && !command.json && ::isatty(::fileno(out));
    const std::chrono::duration<double> interval(watch ? command.watch_s : 1.0);
    StatSnapshot before = parse_stat_payload(connection.ask(ControlVerb::kStat));
    for (bool first = true;; first = false) {
        std::this_thread::sleep_for(interval);
        StatSnapshot after = parse_stat_payload(connection.ask(ControlVerb::kStat));
        std::string text;
        if (command.json) {
            const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
            text = format_stat_json(before, after, which, now);
        } else {
            text = (redraw ? "\033[H\033[2J" : first ? "" : "\n") + format_stat_tables(before, after, which);
        }
        std::fputs(text.c_str(), out);
        std::fflush(out);  // each sample as it comes, also into a pipe
        if (!watch)
            return exit_status::kOk;
        before = std::move(after);
    }
}

}  // namespace

// ---- ControlConnection.

std::optional<ControlConnection> ControlConnection::open(const std::string& dir, const std::string& name,
                                                         std::chrono::milliseconds timeout)
{
    const std::string path = control_socket_path(dir, name);
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid())
        throw sys_error("cannot create a unix socket");
    // A blocking socket with a timeout on every send and receive; a unix
    // connect() waits within the send timeout when the guest's backlog is full.
    const timeval limit{static_cast<time_t>(timeout.count() / 1000), static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit));
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    path.copy(address.sun_path, sizeof(address.sun_path) - 1);  // control_socket_path() checked that it fits
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
        if (errno == ENOENT || errno == ECONNREFUSED)
            return std::nullopt;
        if (errno == EAGAIN || errno == ETIMEDOUT)
            throw Error("guest " + name + " does not accept connections (waited " +
                        std::to_string(timeout.count()) + " ms)");
        throw sys_error("cannot connect to guest " + name + " at " + path);
    }
    return ControlConnection(std::move(fd), name);
}

std::string ControlConnection::exchange(std::string_view request)
{
    while (!request.empty()) {
        const ssize_t sent = ::send(fd_.get(), request.data(), request.size(), MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && (errno == EPIPE || errno == ECONNRESET))
            throw Error("guest " + name_ + " hung up");
        if (sent < 0)
            throw sys_error("guest " + name_ + ": cannot send");
        request.remove_prefix(static_cast<size_t>(sent));
    }
    for (;;) {
        if (const size_t end = received_.find('\n'); end != std::string::npos) {
            std::string reply = received_.substr(0, end);
            received_.erase(0, end + 1);
            return reply;
        }
        if (received_.size() >= kMaxReplyBytes)
            throw Error("guest " + name_ + " sent a reply longer than " + std::to_string(kMaxReplyBytes) + " bytes");
        char buffer[65536];
        const ssize_t got = ::recv(fd_.get(), buffer, sizeof(buffer), 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got == 0 || (got < 0 && errno == ECONNRESET))
            throw Error("guest " + name_ + " hung up without answering");
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            throw Error("guest " + name_ + " did not answer in time");
        if (got < 0)
            throw sys_error("guest " + name_ + ": cannot receive");
        received_.append(buffer, static_cast<size_t>(got));
    }
}

std::string ControlConnection::ask(ControlVerb verb, const std::string& argument)
{
    ControlReply reply = parse_reply(exchange(format_request({verb, argument})));
    if (!reply.ok)
        throw Error("guest " + name_ + ": " + reply.text);
    return std::move(reply.text);
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

std::string json_string(std::string_view text)
{
    std::string out = "\"";
    for (size_t i = 0; i < text.size();) {
        const char c = text[i];
        const size_t length = utf8_length(text, i);
        if (length == 0) {
            out += "\\ufffd";
            ++i;
            continue;
        }
        if (c == '"' || c == '\\')
            out += std::string("\\") + c;
        else if (c == '\n')
            out += "\\n";
        else if (c == '\t')
            out += "\\t";
        else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
            out += line("\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
        else
            out.append(text.substr(i, length));
        i += length;
    }
    return out + "\"";
}

std::string format_stat_json(const StatSnapshot& before, const StatSnapshot& after, StatTables which,
                             double wall_time_s)
{
    auto cpu = [](int c) { return c < 0 ? std::string("null") : std::to_string(c); };
    auto us = [](std::optional<double> value) { return optional_number(value, 3); };
    std::string out = "{\"time\":" + json_number(wall_time_s, 3) +
                      (after.state.empty() ? "" : ",\"state\":" + json_string(after.state)) +
                      ",\"interval_s\":" + json_number(seconds_between(before, after), 6);
    if (show_disks(which)) {
        out += ",\"disks\":[";
        const char* comma = "";
        for (const auto& s : queue_samples(before, after)) {
            out += std::string(comma) + "{\"disk\":" + std::to_string(s.now.disk) +
                   ",\"queue\":" + std::to_string(s.now.queue) + ",\"thread\":" + json_string(s.now.thread) +
                   ",\"cpu\":" + cpu(s.now.cpu) + ",\"image\":" + json_string(s.now.image) +
                   ",\"requests\":" + std::to_string(s.now.requests) + ",\"bytes\":" + std::to_string(s.now.bytes) +
                   ",\"iops\":" + json_number(s.iops, 1) + ",\"mib_s\":" + json_number(s.mib_s, 3) +
                   ",\"in_flight\":" + std::to_string(s.now.in_flight) + ",\"p50_us\":" + us(s.p50_us) +
                   ",\"p99_us\":" + us(s.p99_us) + ",\"kicks\":" + std::to_string(s.now.kicks) +
                   ",\"interrupts\":" + std::to_string(s.now.interrupts) + ",\"errors\":" + std::to_string(s.now.errors) +
                   ",\"throttled_ns\":" + std::to_string(s.now.throttled_ns) +
                   ",\"flushes\":" + std::to_string(s.now.flushes) +
                   ",\"requests_per_kick\":" + optional_number(s.per_kick, 3) +
                   ",\"requests_per_interrupt\":" + optional_number(s.per_interrupt, 3) + "}";
            comma = ",";
        }
        out += "]";
    }
    if (show_iothreads(which)) {
        out += ",\"iothreads\":[";
        const char* comma = "";
        for (const auto& s : thread_samples(before, after)) {
            out += std::string(comma) + "{\"name\":" + json_string(s.now.name) + ",\"tid\":" + std::to_string(s.now.tid) +
                   ",\"cpu\":" + cpu(s.now.cpu) + ",\"requests\":" + std::to_string(s.now.requests) +
                   ",\"bytes\":" + std::to_string(s.now.bytes) + ",\"iops\":" + json_number(s.iops, 1) +
                   ",\"poll_ns\":" + std::to_string(s.now.poll_ns) + ",\"poll_hits\":" + std::to_string(s.now.poll_hits) +
                   ",\"wakeups\":" + std::to_string(s.now.wakeups) + ",\"poll_hit_rate\":" +
                   (s.poll_hit_rate ? json_number(*s.poll_hit_rate, 4) : "null") + "}";
            comma = ",";
        }
        out += "]";
    }
    if (show_vcpus(which)) {
        // Cumulative counters under KVM's own names, null where this kernel lacks one.
        out += ",\"vcpus\":[";
        const char* comma = "";
        for (const auto& s : vcpu_samples(before, after)) {
            out += std::string(comma) + "{\"vcpu\":" + std::to_string(s.now.index);
            for (size_t c = 0; c < kVcpuCounterNames.size(); ++c)
                out += ",\"" + std::string(kVcpuCounterNames[c]) + "\":" +
                       (s.now.counters[c] ? std::to_string(*s.now.counters[c]) : "null");
            out += ",\"exits_s\":" + optional_number(s.per_s[kVcpuExits], 1) + "}";
            comma = ",";
        }
        out += "],\"exits_per_request\":" +
               optional_number(exits_per_request(before, after, queue_samples(before, after)), 4);
    }
    return out + "}\n";
}

int run_control_command(const Command& command, const std::string& dir, std::FILE* out)
{
    const ControlCommand& control = command.control;
    switch (command.kind) {
    case Command::Kind::kList:
        return list_guests(dir, out);
    case Command::Kind::kStop:
        if (control.all)
            return tell_every_guest(dir, ControlVerb::kStop);
        connect_to(dir, control.name).ask(ControlVerb::kStop);
        return exit_status::kOk;
    case Command::Kind::kPause:
        connect_to(dir, control.name).ask(ControlVerb::kPause);
        return exit_status::kOk;
    case Command::Kind::kResume:
        connect_to(dir, control.name).ask(ControlVerb::kResume);
        return exit_status::kOk;
    case Command::Kind::kStat:
        return show_stats(dir, control, out);
    case Command::Kind::kThrottle: {
        const std::string group = connect_to(dir, control.name).ask(ControlVerb::kThrottle, control.target + " " + control.limits);
        std::fprintf(out, "%s\n", group.c_str());
        return exit_status::kOk;
    }
    default:
        throw Error("internal error: not a control command");
    }
}

int run_control_command(const Command& command) { return run_control_command(command, control_dir(), stdout); }

}  // namespace lkvm
