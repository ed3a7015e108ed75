#include "kvm/machine_config.h"

#include <algorithm>
#include <charconv>

#include "base/text.h"

namespace lkvm {

namespace {

const std::string kRunHint = " (see 'lkvm run --help')";

}  // namespace

uint64_t parse_number(const std::string& option, const std::string& text)
{
    uint64_t value = 0;
    const char* end = text.data() + text.size();
    auto [ptr, ec] = std::from_chars(text.data(), end, value);
    if (text.empty() || ec != std::errc() || ptr != end)
        throw Error(option + " '" + text + "': not a number" + kRunHint);
    return value;
}

bool parse_throttle_item(const std::string& where, const std::string& item, ThrottleLimits& limits)
{
    const auto equals = item.find('=');
    if (equals == std::string::npos)
        return false;
    const std::string key = item.substr(0, equals), text = item.substr(equals + 1);
    const auto number = [&] { return parse_number(where + ": " + key, text); };
    if (key == "iops-size") {
        limits.iops_size = number();
        return true;
    }
    static constexpr std::pair<const char*, ThrottleBucket> kBuckets[] = {
        {"bps", ThrottleBucket::kBpsTotal},   {"bps-rd", ThrottleBucket::kBpsRead},
        {"bps-wr", ThrottleBucket::kBpsWrite}, {"iops", ThrottleBucket::kIopsTotal},
        {"iops-rd", ThrottleBucket::kIopsRead}, {"iops-wr", ThrottleBucket::kIopsWrite}};
    for (const auto& [name, bucket] : kBuckets) {
        const std::string base = name;
        if (key == base)
            limits[bucket].avg = number();
        else if (key == base + "-max")
            limits[bucket].max = number();
        else if (key == base + "-max-length")
            limits[bucket].burst_length = number();
        else
            continue;
        return true;
    }
    return false;
}

// `hint`: where the options are explained (lkvm help, or lkvm run --help).
ThrottleLimits parse_throttle_limits(const std::string& where, const std::string& text, const std::string& hint)
{
    ThrottleLimits limits;
    for (const auto& item : split(text, ','))
        if (!parse_throttle_item(where, item, limits))
            throw Error(where + ": '" + item +
                        "' is not a limit (iops=, iops-rd=, iops-wr=, bps=, bps-rd=, bps-wr=, each also -max= and "
                        "-max-length=, iops-size=; 0: none)" +
                        hint);
    if (const auto problem = throttle_limits_problem(limits))
        throw Error(where + ": " + *problem + hint);
    return limits;
}

std::vector<int> parse_cpu_list(const std::string& option, const std::string& text)
{
    std::vector<int> cpus;
    for (const auto& range : split(text, ',')) {
        const auto dash = range.find('-');
        const uint64_t first = parse_number(option, range.substr(0, dash));
        const uint64_t last = dash == std::string::npos ? first : parse_number(option, range.substr(dash + 1));
        if (last < first || last >= 4096)
            throw Error(option + " '" + text + "': '" + range + "' is not a CPU range" + kRunHint);
        for (uint64_t c = first; c <= last; ++c)
            if (std::find(cpus.begin(), cpus.end(), static_cast<int>(c)) == cpus.end())
                cpus.push_back(static_cast<int>(c));
    }
    return cpus;
}

std::string check_iothreads_on_host(const IoThreadsSpec& spec, const std::vector<int>& online)
{
    for (const int cpu : spec.affinity)
        if (std::find(online.begin(), online.end(), cpu) == online.end())
            throw Error("--iothreads affinity: CPU " + std::to_string(cpu) + " is not online on this host (online: " +
                        std::to_string(online.size()) + " CPUs); pick CPUs from /sys/devices/system/cpu/online");
    if (spec.count > online.size())
        return "--iothreads " + std::to_string(spec.count) + ": more I/O threads than the host's " +
               std::to_string(online.size()) + " online CPUs; they will share CPUs";
    return "";
}

std::vector<DiskDevicePlan> plan_disk_devices(const RunOptions& options)
{
    const unsigned default_queues = std::min(options.cpus, kMaxDiskQueues);
    std::vector<DiskDevicePlan> plans;
    for (size_t i = 0; i < options.disks.size(); ++i) {
        const DiskSpec& disk = options.disks[i];
        if (disk.controller.empty()) {
            plans.push_back({disk.bus, "", {i}, disk.num_queues ? disk.num_queues : default_queues, disk.iothreads,
                             disk.notify.value_or(kDefaultNotify)});
            continue;
        }
        auto shared = std::ranges::find(plans, disk.controller, &DiskDevicePlan::controller);
        if (shared != plans.end()) {
            shared->disks.push_back(i);
            continue;
        }
        DiskDevicePlan plan{DiskBus::kScsi, disk.controller, {i}, default_queues, {}, kDefaultNotify};
        for (const auto& c : options.scsi_controllers)
            if (c.name == disk.controller) {
                plan.num_queues = c.num_queues ? c.num_queues : default_queues;
                plan.iothreads = c.iothreads;
                plan.notify = c.notify.value_or(kDefaultNotify);
            }
        plans.push_back(std::move(plan));
    }
    return plans;
}

std::string shell_quote(const std::vector<std::string>& argv)
{
    std::string out;
    for (const auto& arg : argv) {
        if (!out.empty())
            out += ' ';
        out += '\'';
        for (char c : arg)
            out += c == '\'' ? std::string("'\\''") : std::string(1, c);
        out += '\'';
    }
    return out;
}

std::string base64(std::string_view data)
{
    static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    size_t i = 0;
    for (; i + 2 < data.size(); i += 3) {
        const uint32_t v = (uint8_t(data[i]) << 16) | (uint8_t(data[i + 1]) << 8) | uint8_t(data[i + 2]);
        for (int shift = 18; shift >= 0; shift -= 6)
            out += kAlphabet[(v >> shift) & 63];
    }
    if (const size_t rest = data.size() - i; rest) {
        const uint32_t v = (uint8_t(data[i]) << 16) | (rest == 2 ? uint8_t(data[i + 1]) << 8 : 0);
        out += kAlphabet[(v >> 18) & 63];
        out += kAlphabet[(v >> 12) & 63];
        out += rest == 2 ? kAlphabet[(v >> 6) & 63] : '=';
        out += '=';
    }
    return out;
}

std::string kernel_cmdline(const RunOptions& options)
{
    // -p comes last so that it can override what precedes it.
    std::string cmdline = kDefaultKernelParams;
    if (!options.command.empty())
        cmdline += " lkvm.cmd=" + base64(shell_quote(options.command));
    if (!options.params.empty())
        cmdline += " " + options.params;
    return cmdline;
}

}  // namespace lkvm
