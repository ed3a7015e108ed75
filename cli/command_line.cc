#include "cli/command_line.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <optional>

#include "api/control.h"
#include "base/text.h"
#include "disk/ioprio.h"

namespace lkvm {

namespace {

const std::string kRunHint = " (see 'lkvm run --help')";
const std::string kHint = " (see 'lkvm --help')";

// "512", "512M", "2G" -> MiB.
uint64_t parse_mib(const std::string& option, std::string text)
{
    uint64_t scale = 1;
    if (!text.empty() && (text.back() == 'G' || text.back() == 'g')) {
        scale = 1024;
        text.pop_back();
    } else if (!text.empty() && (text.back() == 'M' || text.back() == 'm')) {
        text.pop_back();
    }
    const uint64_t value = parse_number(option, text);
    if (value > (uint64_t{1} << 40) / scale)
        throw Error(option + " " + text + ": far more memory than any host has" + kRunHint);
    return value * scale;
}

struct OptionSpec {
    const char* short_name;
    const char* long_name;
};
constexpr OptionSpec kKernel{"-k", "--kernel"}, kInitrd{"-i", "--initrd"}, kParams{"-p", "--params"},
    kCpus{"-c", "--cpus"}, kMem{"-m", "--mem"}, kName{nullptr, "--name"}, kDisk{"-d", "--disk"},
    kIoThreads{nullptr, "--iothreads"}, kScsiController{nullptr, "--scsi-controller"},
    kThrottleGroup{nullptr, "--throttle-group"},
    kConsoleLog{nullptr, "--console-log"}, kTimeout{nullptr, "--timeout"}, kLogLevel{nullptr, "--loglevel"},
    kGdb{nullptr, "--gdb"}, kBootTimeout{nullptr, "--boot-timeout"};

// Matches "-k X", "--kernel X" and "--kernel=X"; advances i past the value.
std::optional<std::string> take_value(const std::vector<std::string>& args, size_t& i, const OptionSpec& spec)
{
    const std::string& arg = args[i];
    const std::string long_eq = std::string(spec.long_name) + "=";
    if (arg.rfind(long_eq, 0) == 0)
        return arg.substr(long_eq.size());
    if (arg != spec.long_name && !(spec.short_name && arg == spec.short_name))
        return std::nullopt;
    if (i + 1 >= args.size())
        throw Error("option " + arg + " needs a value" + kRunHint);
    return args[++i];
}

// Disks naming a controller share it; what they share is set on the
// controller, so a disk's own iothread= or num-queues= would be ambiguous.
void check_scsi_topology(const RunOptions& run)
{
    std::vector<std::pair<std::string, unsigned>> luns;  // (controller, lun) taken
    for (const auto& disk : run.disks) {
        if (disk.controller.empty())
            continue;
        const std::string where = "-d " + disk.path;
        const std::string on = " on the controller: --scsi-controller " + disk.controller;
        if (!disk.iothreads.empty())
            throw Error(where + ": iothread= on a disk that shares scsi controller " + disk.controller +
                        "; set it" + on + ",iothread=K" + kRunHint);
        if (disk.num_queues)
            throw Error(where + ": num-queues= on a disk that shares scsi controller " + disk.controller +
                        "; set it" + on + ",num-queues=Q" + kRunHint);
        if (disk.notify)
            throw Error(where + ": notify= on a disk that shares scsi controller " + disk.controller +
                        "; set it" + on + ",notify=mmio|pio" + kRunHint);
        if (std::ranges::find(luns, std::pair{disk.controller, disk.lun}) != luns.end())
            throw Error(where + ": scsi controller " + disk.controller + " already has a lun " +
                        std::to_string(disk.lun) + "; give each disk its own lun=L" + kRunHint);
        luns.emplace_back(disk.controller, disk.lun);
    }
    for (size_t c = 0; c < run.scsi_controllers.size(); ++c) {
        const std::string& name = run.scsi_controllers[c].name;
        if (std::ranges::none_of(luns, [&](const auto& taken) { return taken.first == name; }))
            throw Error("--scsi-controller " + name + ": no disk uses it; add -d PATH,bus=scsi,controller=" + name +
                        kRunHint);
        for (size_t e = 0; e < c; ++e)
            if (run.scsi_controllers[e].name == name)
                throw Error("--scsi-controller " + name + " is given twice" + kRunHint);
    }
}

// Every group named is defined once, and a disk keeps either limits of its
// own or a group's: both would be two sets of limits for one disk.
void check_throttle_groups(const RunOptions& run)
{
    for (size_t g = 0; g < run.throttle_groups.size(); ++g)
        for (size_t e = 0; e < g; ++e)
            if (run.throttle_groups[e].name == run.throttle_groups[g].name)
                throw Error("--throttle-group " + run.throttle_groups[g].name + " is given twice" + kRunHint);
    for (const auto& disk : run.disks) {
        if (disk.throttle_group.empty())
            continue;
        const std::string where = "-d " + disk.path + ",throttle-group=" + disk.throttle_group;
        if (std::ranges::none_of(run.throttle_groups, [&](const auto& g) { return g.name == disk.throttle_group; }))
            throw Error(where + ": no such group; define it with --throttle-group " + disk.throttle_group +
                        ",iops=..." + kRunHint);
        if (disk.throttle.limits_anything() || disk.throttle.iops_size)
            throw Error(where + ": the disk also has limits of its own; set them on the group (--throttle-group " +
                        disk.throttle_group + ",...)" + kRunHint);
    }
}

RunOptions parse_run(const std::vector<std::string>& args, size_t i, bool& help)
{
    RunOptions run;
    for (; i < args.size(); ++i) {
        const std::string& arg = args[i];
        if (arg == "--") {
            run.command.assign(args.begin() + static_cast<long>(i) + 1, args.end());
            if (run.command.empty())
                throw Error("nothing after '--': give the command the guest should run" + kRunHint);
            break;
        }
        if (arg == "-h" || arg == "--help") {
            help = true;
            return run;
        }
        if (auto v = take_value(args, i, kKernel)) {
            run.kernel = *v;
        } else if (auto v = take_value(args, i, kInitrd)) {
            run.initrd = *v;
        } else if (auto v = take_value(args, i, kParams)) {
            run.params += run.params.empty() ? *v : " " + *v;
        } else if (auto v = take_value(args, i, kDisk)) {
            run.disks.push_back(parse_disk_spec(*v));
        } else if (auto v = take_value(args, i, kScsiController)) {
            run.scsi_controllers.push_back(parse_scsi_controller_spec(*v));
        } else if (auto v = take_value(args, i, kThrottleGroup)) {
            run.throttle_groups.push_back(parse_throttle_group_spec(*v));
        } else if (auto v = take_value(args, i, kIoThreads)) {
            run.iothreads = parse_iothreads_spec(*v);
        } else if (arg == "--stats") {
            run.stats = true;
        } else if (auto v = take_value(args, i, kName)) {
            // It names the guest's control socket file too.
            if (const std::string problem = guest_name_problem(*v); !problem.empty())
                throw Error("--name '" + *v + "': " + problem + kRunHint);
            run.name = *v;
        } else if (auto v = take_value(args, i, kConsoleLog)) {
            if (v->empty())
                throw Error("--console-log needs a file name" + kRunHint);
            run.console_log = *v;
        } else if (auto v = take_value(args, i, kTimeout)) {
            const uint64_t seconds = parse_number("--timeout", *v);
            if (seconds < 1 || seconds > 1000000)
                throw Error("--timeout " + *v + ": give 1 to 1000000 seconds" + kRunHint);
            run.timeout_s = static_cast<unsigned>(seconds);
        } else if (auto v = take_value(args, i, kBootTimeout)) {
            const uint64_t seconds = parse_number("--boot-timeout", *v);
            if (seconds > 1000000)
                throw Error("--boot-timeout " + *v + ": give 0 (off) to 1000000 seconds" + kRunHint);
            run.boot_timeout_s = static_cast<unsigned>(seconds);
        } else if (arg == "--force-kvm") {
            run.force_kvm = true;
        } else if (arg == "--quiet") {
            run.quiet = true;
        } else if (auto v = take_value(args, i, kGdb)) {
            // [HOST:]PORT; an IPv6 host is [ADDR]:PORT.
            const size_t colon = v->rfind(':');
            std::string host = colon == std::string::npos ? "127.0.0.1" : v->substr(0, colon);
            if (host.size() > 2 && host.front() == '[' && host.back() == ']')
                host = host.substr(1, host.size() - 2);
            const std::string port = colon == std::string::npos ? *v : v->substr(colon + 1);
            const uint64_t n = parse_number("--gdb", port);
            if (host.empty() || n < 1 || n > 65535)
                throw Error("--gdb " + *v + ": give [HOST:]PORT with a port from 1 to 65535, e.g. --gdb 1234" + kRunHint);
            run.gdb_host = host;
            run.gdb_port = static_cast<uint16_t>(n);
        } else if (arg == "--gdb-wait") {
            run.gdb_wait = true;
        } else if (auto v = take_value(args, i, kLogLevel)) {
            constexpr std::pair<const char*, LogLevel> kLevels[] = {
                {"error", LogLevel::kError}, {"warn", LogLevel::kWarn}, {"info", LogLevel::kInfo}, {"debug", LogLevel::kDebug}};
            const auto level = std::ranges::find(kLevels, *v, &std::pair<const char*, LogLevel>::first);
            if (level == std::end(kLevels))
                throw Error("--loglevel " + *v + ": use error, warn, info or debug" + kRunHint);
            run.log_level = level->second;
        } else if (auto v = take_value(args, i, kCpus)) {
            const uint64_t n = parse_number("-c", *v);
            if (n == 0)
                throw Error("-c 0: a guest needs at least one vCPU" + kRunHint);
            if (n > 4096)
                throw Error("-c " + *v + ": more vCPUs than KVM allows" + kRunHint);
            run.cpus = static_cast<unsigned>(n);
        } else if (auto v = take_value(args, i, kMem)) {
            run.mem_mib = parse_mib("-m", *v);
            if (run.mem_mib < kMinMemMib)
                throw Error("-m " + *v + ": too little memory, a guest needs at least " +
                            std::to_string(kMinMemMib) + " MiB" + kRunHint);
        } else if (!arg.empty() && arg[0] == '-') {
            throw Error("unknown option '" + arg + "'" + kRunHint);
        } else {
            throw Error("unexpected argument '" + arg + "': put the guest command after '--'" + kRunHint);
        }
    }
    auto check_iothreads = [&](const std::string& where, const std::vector<unsigned>& iothreads) {
        for (const unsigned k : iothreads) {
            if (run.iothreads.count == 0)
                throw Error(where + ",iothread=" + std::to_string(k) +
                            ": iothread= picks threads of the group; add --iothreads N" + kRunHint);
            if (k >= run.iothreads.count)
                throw Error(where + ",iothread=" + std::to_string(k) + ": --iothreads " +
                            std::to_string(run.iothreads.count) + " has threads 0-" +
                            std::to_string(run.iothreads.count - 1) + kRunHint);
        }
    };
    for (const auto& disk : run.disks)
        check_iothreads("-d " + disk.path, disk.iothreads);
    check_scsi_topology(run);
    check_throttle_groups(run);
    for (const auto& controller : run.scsi_controllers)
        check_iothreads("--scsi-controller " + controller.name, controller.iothreads);
    if (run.gdb_wait && run.gdb_port == 0)
        throw Error("--gdb-wait waits for gdb: add --gdb [HOST:]PORT" + kRunHint);
    return run;
}

// "--watch SECS": more than 0, at most an hour, fractions allowed.
double parse_watch(const std::string& text)
{
    double seconds = 0;
    const char* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, seconds);
    if (text.empty() || ec != std::errc() || ptr != end || !std::isfinite(seconds) || seconds <= 0 || seconds > 3600)
        throw Error("stat --watch '" + text + "': give the seconds between samples, more than 0 and at most 3600" +
                    kHint);
    return seconds;
}

// list | stop NAME|--all | pause NAME | resume NAME | stat NAME [--disks] [--iothreads] [--vcpus] [--json] [--watch SECS]
constexpr std::pair<const char*, Command::Kind> kControlCommands[] = {{"list", Command::Kind::kList},
                                                                      {"stop", Command::Kind::kStop},
                                                                      {"pause", Command::Kind::kPause},
                                                                      {"resume", Command::Kind::kResume},
                                                                      {"stat", Command::Kind::kStat},
                                                                      {"throttle", Command::Kind::kThrottle}};

Command parse_control(const std::vector<std::string>& args, Command::Kind kind)
{
    using Kind = Command::Kind;
    const std::string& verb = args[0];
    Command cmd;
    cmd.kind = kind;
    ControlCommand& control = cmd.control;
    for (size_t i = 1; i < args.size(); ++i) {
        const std::string& arg = args[i];
        if (arg == "-h" || arg == "--help")
            return Command{};  // the general help, which has these commands
        if (cmd.kind == Kind::kStop && arg == "--all") {
            control.all = true;
        } else if (cmd.kind == Kind::kStat && arg == "--disks") {
            control.disks = true;
        } else if (cmd.kind == Kind::kStat && arg == "--iothreads") {
            control.iothreads = true;
        } else if (cmd.kind == Kind::kStat && arg == "--vcpus") {
            control.vcpus = true;
        } else if (cmd.kind == Kind::kStat && arg == "--json") {
            control.json = true;
        } else if (cmd.kind == Kind::kStat && arg.starts_with("--watch=")) {
            control.watch_s = parse_watch(arg.substr(8));
        } else if (cmd.kind == Kind::kStat && arg == "--watch") {
            if (i + 1 >= args.size())
                throw Error("option --watch needs a value: the seconds between samples" + kHint);
            control.watch_s = parse_watch(args[++i]);
        } else if (arg.starts_with("-")) {
            throw Error(verb + ": unknown option '" + arg + "'" + kHint);
        } else if (cmd.kind == Kind::kThrottle && !control.name.empty() && control.target.empty()) {
            control.target = arg;
        } else if (cmd.kind == Kind::kThrottle && !control.target.empty() && control.limits.empty()) {
            control.limits = arg;
            parse_throttle_limits("throttle " + control.target + " " + arg, arg);
        } else if (cmd.kind == Kind::kList || !control.name.empty()) {
            throw Error(verb + ": unexpected argument '" + arg + "'" +
                        (cmd.kind == Kind::kList ? ": list takes none" : ": one guest at a time") + kHint);
        } else {
            if (const std::string problem = guest_name_problem(arg); !problem.empty())
                throw Error(verb + " '" + arg + "': " + problem + kHint);
            control.name = arg;
        }
    }
    if (cmd.kind == Kind::kList)
        return cmd;
    if (control.all && !control.name.empty())
        throw Error("stop: give a guest's NAME or --all, not both" + kHint);
    if (!control.all && control.name.empty())
        throw Error(verb + ": which guest? give its NAME" + (cmd.kind == Kind::kStop ? " (or --all)" : "") +
                    " as 'lkvm list' shows it");
    if (cmd.kind == Kind::kThrottle && control.limits.empty())
        throw Error("throttle " + control.name + ": give a disk (its number in lkvm stat, or its image) or a " +
                    "--throttle-group name, then the limits, e.g. 'lkvm throttle " + control.name + " 0 iops=500'" +
                    kHint);
    return cmd;
}

// "key=value" items: the value when item starts with key=.
std::optional<std::string> value_of(const std::string& item, const char* key)
{
    const std::string prefix = std::string(key) + "=";
    if (item.rfind(prefix, 0) != 0)
        return std::nullopt;
    return item.substr(prefix.size());
}

uint16_t parse_ioprio(const std::string& where, const std::string& text)
{
    const auto slash = text.find('/');
    const std::string name = text.substr(0, slash);
    const auto klass = name == "rt"     ? ioprio::Class::kRealtime
                       : name == "be"   ? ioprio::Class::kBestEffort
                       : name == "idle" ? ioprio::Class::kIdle
                                        : ioprio::Class::kNone;
    if (klass == ioprio::Class::kNone)
        throw Error(where + ": ioprio class '" + name + "' is not rt, be or idle" + kRunHint);
    uint64_t level = klass == ioprio::Class::kIdle ? 0 : ioprio::kDefaultLevel;
    if (slash != std::string::npos)
        level = parse_number(where + " ioprio level", text.substr(slash + 1));
    const auto value = level < ioprio::kLevels ? ioprio::value(klass, static_cast<unsigned>(level)) : std::nullopt;
    if (!value)
        throw Error(where + ": ioprio level " + std::to_string(level) + " is not 0-7" + kRunHint);
    return *value;
}

unsigned parse_num_queues(const std::string& where, const std::string& text)
{
    const uint64_t n = parse_number(where + ": num-queues", text);
    if (n < 1 || n > kMaxDiskQueues)
        throw Error(where + ": num-queues=" + text + " is not 1-" + std::to_string(kMaxDiskQueues) + kRunHint);
    return static_cast<unsigned>(n);
}

std::string notify_name(AddressSpace space) { return space == AddressSpace::kPort ? "pio" : "mmio"; }

AddressSpace parse_notify(const std::string& where, const std::string& text)
{
    if (text == "mmio")
        return AddressSpace::kMemory;
    if (text == "pio")
        return AddressSpace::kPort;
    throw Error(where + ": notify=" + text + " is not mmio or pio" + kRunHint);
}

IoErrorPolicy parse_error_policy(const std::string& where, const char* option, const std::string& text, bool writes)
{
    if (text == "report")
        return IoErrorPolicy::kReport;
    if (text == "ignore")
        return IoErrorPolicy::kIgnore;
    if (text == "stop")
        return IoErrorPolicy::kStop;
    if (text == "enospc" && writes)
        return IoErrorPolicy::kEnospc;
    throw Error(where + ": " + option + "=" + text + " is not report, ignore" + (writes ? ", stop or enospc" : " or stop") +
                kRunHint);
}

std::string parse_throttle_group_name(const std::string& where, const std::string& name)
{
    if (name.empty() || !std::ranges::all_of(name, [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_'; }))
        throw Error(where + ": throttle group '" + name + "': name it with letters, digits, '-' or '_'" + kRunHint);
    return name;
}

CacheMode parse_cache_mode(const std::string& where, const std::string& text)
{
    for (const CacheMode mode : {CacheMode::kNone, CacheMode::kWriteback, CacheMode::kWritethrough,
                                 CacheMode::kDirectsync, CacheMode::kUnsafe})
        if (text == cache_mode_name(mode))
            return mode;
    throw Error(where + ": cache=" + text + " is not none, writeback, writethrough, directsync or unsafe" + kRunHint);
}

DetectZeroes parse_detect_zeroes(const std::string& where, const std::string& text)
{
    for (const DetectZeroes mode : {DetectZeroes::kOff, DetectZeroes::kOn, DetectZeroes::kUnmap})
        if (text == detect_zeroes_name(mode))
            return mode;
    throw Error(where + ": detect-zeroes=" + text + " is not off, on or unmap" + kRunHint);
}

std::vector<unsigned> parse_iothread_list(const std::string& where, const std::string& text)
{
    std::vector<unsigned> threads;
    for (const auto& k : split(text, '+'))
        threads.push_back(
            static_cast<unsigned>(std::min<uint64_t>(parse_number(where + ": iothread", k), kMaxIoThreads)));
    return threads;
}

}  // namespace

DiskSpec parse_disk_spec(const std::string& text)
{
    DiskSpec disk;
    std::vector<std::string> scsi_only;  // options given that only a SCSI disk takes
    const std::string where = "-d " + text;
    const auto items = split(text, ',');
    if (items[0].empty())
        throw Error(where + ": no image path before the options" + kRunHint);
    disk.path = items[0];
    bool direct = false;
    std::optional<CacheMode> cache;
    for (size_t i = 1; i < items.size(); ++i) {
        const std::string& item = items[i];
        if (item == "ro") {
            disk.read_only = true;
        } else if (item == "direct") {
            direct = true;
        } else if (auto v = value_of(item, "cache")) {
            cache = parse_cache_mode(where, *v);
        } else if (auto v = value_of(item, "detect-zeroes")) {
            disk.detect_zeroes = parse_detect_zeroes(where, *v);
        } else if (item == "snapshot") {
            disk.snapshot = true;
        } else if (auto v = value_of(item, "aio")) {
            disk.engine = *v;
            if (disk.engine != "sync" && disk.engine != "native" && disk.engine != "io_uring" && disk.engine != "null")
                throw Error(where + ": aio=" + disk.engine + " is not an engine; use io_uring, native, sync or null" +
                            kRunHint);
        } else if (auto v = value_of(item, "serial")) {
            disk.serial = *v;
        } else if (auto v = value_of(item, "num-queues")) {
            disk.num_queues = parse_num_queues(where, *v);
        } else if (auto v = value_of(item, "iothread")) {
            disk.iothreads = parse_iothread_list(where, *v);
        } else if (auto v = value_of(item, "ioprio")) {
            disk.ioprio = parse_ioprio(where, *v);
        } else if (auto v = value_of(item, "notify")) {
            disk.notify = parse_notify(where, *v);
        } else if (auto v = value_of(item, "bus")) {
            if (*v != "blk" && *v != "scsi")
                throw Error(where + ": bus=" + *v + " is not blk or scsi" + kRunHint);
            disk.bus = *v == "scsi" ? DiskBus::kScsi : DiskBus::kBlk;
        } else if (auto v = value_of(item, "controller")) {
            if (v->empty() || !std::ranges::all_of(*v, [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_'; }))
                throw Error(where + ": controller=" + *v + ": name it with letters, digits, '-' or '_'" + kRunHint);
            disk.controller = *v;
            scsi_only.push_back("controller=");
        } else if (auto v = value_of(item, "lun")) {
            const uint64_t lun = parse_number(where + ": lun", *v);
            if (lun > kMaxScsiLun)
                throw Error(where + ": lun=" + *v + " is not 0-" + std::to_string(kMaxScsiLun) + kRunHint);
            disk.lun = static_cast<unsigned>(lun);
            scsi_only.push_back("lun=");
        } else if (auto v = value_of(item, "rotation-rate")) {
            const uint64_t rate = parse_number(where + ": rotation-rate", *v);
            if (rate > 0xfffe)
                throw Error(where + ": rotation-rate=" + *v + " is not 0-65534 (1: SSD, else RPM)" + kRunHint);
            disk.rotation_rate = static_cast<uint16_t>(rate);
            scsi_only.push_back("rotation-rate=");
        } else if (auto v = value_of(item, "discard")) {
            if (*v != "unmap" && *v != "ignore")
                throw Error(where + ": discard=" + *v + " is not unmap or ignore" + kRunHint);
            disk.discard = *v == "unmap";
        } else if (auto v = value_of(item, "werror")) {
            disk.write_error = parse_error_policy(where, "werror", *v, true);
        } else if (auto v = value_of(item, "rerror")) {
            disk.read_error = parse_error_policy(where, "rerror", *v, false);
        } else if (auto v = value_of(item, "throttle-group")) {
            disk.throttle_group = parse_throttle_group_name(where, *v);
        } else if (parse_throttle_item(where, item, disk.throttle)) {
        } else {
            throw Error(where + ": unknown disk option '" + item +
                        "' (ro, snapshot, direct, cache=, detect-zeroes=, aio=, serial=, num-queues=, iothread=, ioprio=, notify=, "
                        "bus=, controller=, lun=, rotation-rate=, discard=, iops=, bps=, ..., throttle-group=, werror=, rerror=)" +
                        kRunHint);
        }
    }
    // `direct` is O_DIRECT: cache=none's old spelling, and part of directsync.
    if (direct && cache && *cache != CacheMode::kNone && *cache != CacheMode::kDirectsync)
        throw Error(where + ": 'direct' (cache=none) conflicts with cache=" + cache_mode_name(*cache) +
                    "; give only one of them" + kRunHint);
    disk.cache = cache.value_or(direct ? CacheMode::kNone : CacheMode::kWriteback);
    // As QEMU: unmap means deallocating, which discard=ignore forbids.
    if (disk.detect_zeroes == DetectZeroes::kUnmap && !disk.discard)
        throw Error(where + ": detect-zeroes=unmap needs discard=unmap; use detect-zeroes=on with discard=ignore" +
                    kRunHint);
    if (disk.snapshot && disk.read_only)
        throw Error(where + ": snapshot and ro together: a snapshot disk is writable and drops its writes at exit; "
                            "give one of them" + kRunHint);
    if (disk.bus == DiskBus::kBlk) {
        if (!scsi_only.empty())
            throw Error(where + ": " + scsi_only.front() + " is for SCSI disks; add bus=scsi" + kRunHint);
        if (disk.serial.size() > 20)
            throw Error(where + ": serial is longer than virtio-blk's 20 bytes" + kRunHint);
    }
    if (disk.bus == DiskBus::kScsi && disk.serial.size() > 36)
        throw Error(where + ": serial is longer than 36 bytes" + kRunHint);
    if (const auto problem = throttle_limits_problem(disk.throttle))
        throw Error(where + ": " + *problem + kRunHint);
    return disk;
}

ThrottleGroupSpec parse_throttle_group_spec(const std::string& text)
{
    ThrottleGroupSpec group;
    const std::string where = "--throttle-group " + text;
    const auto comma = text.find(',');
    group.name = parse_throttle_group_name(where, text.substr(0, comma));
    if (comma != std::string::npos)
        group.limits = parse_throttle_limits(where, text.substr(comma + 1), kRunHint);
    return group;
}

ScsiControllerSpec parse_scsi_controller_spec(const std::string& text)
{
    ScsiControllerSpec controller;
    const std::string where = "--scsi-controller " + text;
    const auto items = split(text, ',');
    controller.name = items[0];
    if (controller.name.empty())
        throw Error(where + ": give the controller's name first, as the disks' controller= says" + kRunHint);
    for (size_t i = 1; i < items.size(); ++i) {
        if (auto v = value_of(items[i], "num-queues"))
            controller.num_queues = parse_num_queues(where, *v);
        else if (auto v = value_of(items[i], "iothread"))
            controller.iothreads = parse_iothread_list(where, *v);
        else if (auto v = value_of(items[i], "notify"))
            controller.notify = parse_notify(where, *v);
        else
            throw Error(where + ": unknown option '" + items[i] + "' (num-queues=, iothread=, notify=)" + kRunHint);
    }
    return controller;
}

IoThreadsSpec parse_iothreads_spec(const std::string& text)
{
    IoThreadsSpec spec;
    const std::string where = "--iothreads " + text;
    const auto items = split(text, ',');
    const uint64_t n = parse_number("--iothreads", items[0]);
    if (n < 1 || n > kMaxIoThreads)
        throw Error(where + ": give 1 to " + std::to_string(kMaxIoThreads) + " I/O threads" + kRunHint);
    spec.count = static_cast<unsigned>(n);
    for (size_t i = 1; i < items.size(); ++i) {
        const std::string& item = items[i];
        if (auto v = value_of(item, "affinity")) {
            // The CPU list has commas of its own: "affinity=0-1,3" takes the "3" too.
            std::string cpus = *v;
            while (i + 1 < items.size() && !items[i + 1].empty() && std::isdigit(static_cast<unsigned char>(items[i + 1][0])))
                cpus += "," + items[++i];
            spec.affinity = parse_cpu_list(where + ": affinity", cpus);
        } else if (auto v = value_of(item, "poll-max-ns")) {
            spec.poll_max_ns = parse_number(where + ": poll-max-ns", *v);
        } else if (auto v = value_of(item, "poll-grow")) {
            spec.poll_grow = parse_number(where + ": poll-grow", *v);
        } else if (auto v = value_of(item, "poll-shrink")) {
            spec.poll_shrink = parse_number(where + ": poll-shrink", *v);
        } else if (auto v = value_of(item, "aio-max-batch")) {
            const uint64_t b = parse_number(where + ": aio-max-batch", *v);
            if (b > 1024)
                throw Error(where + ": aio-max-batch=" + *v + " is more than an engine holds (1024)" + kRunHint);
            spec.aio_max_batch = static_cast<unsigned>(b);
        } else if (auto v = value_of(item, "sched")) {
            if (*v == "batch")
                spec.policy = IoThreadPolicy::kBatch;
            else if (*v == "other")
                spec.policy = IoThreadPolicy::kOther;
            else if (*v == "idle")
                spec.policy = IoThreadPolicy::kIdle;
            else
                throw Error(where + ": sched=" + *v + " is not batch, other or idle" + kRunHint);
        } else {
            throw Error(where + ": unknown option '" + item +
                        "' (affinity=, poll-max-ns=, poll-grow=, poll-shrink=, aio-max-batch=, sched=)" + kRunHint);
        }
    }
    return spec;
}

Command parse_command_line(const std::vector<std::string>& args)
{
    Command cmd;
    if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
        cmd.kind = Command::Kind::kHelp;
        return cmd;
    }
    if (args[0] == "version" || args[0] == "--version") {
        cmd.kind = Command::Kind::kVersion;
        return cmd;
    }
    if (args[0] == "run") {
        bool help = false;
        cmd.run = parse_run(args, 1, help);
        cmd.kind = help ? Command::Kind::kRunHelp : Command::Kind::kRun;
        return cmd;
    }
    for (const auto& [name, kind] : kControlCommands)
        if (args[0] == name)
            return parse_control(args, kind);
    throw Error("unknown command '" + args[0] + "'" + kHint);
}

std::string usage()
{
    return "usage: lkvm COMMAND [ARGS]\n"
           "\n"
           "commands:\n"
           "  run                 boot a Linux guest (lkvm run --help)\n"
           "  list                the running guests: NAME PID STATE VCPUS MEM DISKS\n"
           "  stop NAME | --all   power a guest (or every one) off\n"
           "  pause NAME          stop a guest's vCPUs where they are\n"
           "  resume NAME         let a paused guest's vCPUs run again\n"
           "  stat NAME [--disks] [--iothreads] [--vcpus] [--json] [--watch SECS]\n"
           "                      a guest's I/O over one second: per disk queue IOPS, MiB/s,\n"
           "                      requests in flight, p50/p99 latency, kicks and interrupts\n"
           "                      of that second; per I/O thread IOPS and polling; per vCPU\n"
           "                      KVM's exits by reason, and exits per disk request.\n"
           "                      --disks, --iothreads or --vcpus: those tables only;\n"
           "                      --json: one JSON object per sample and\n"
           "                      line; --watch SECS: a new sample (and interval) every\n"
           "                      SECS (up to 3600) until interrupted\n"
           "  throttle NAME DISK|GROUP LIMITS\n"
           "                      new limits for a disk (its number in lkvm stat, or its\n"
           "                      image) or a --throttle-group while the guest runs, as\n"
           "                      QEMU's block_set_io_throttle: LIMITS as -d takes them\n"
           "                      (iops=500,bps-wr=10485760); those not named become none\n"
           "  version             print the version\n"
           "  help                this text\n"
           "\n"
           "A guest is NAME as 'lkvm run --name' gave it, else guest-PID. The control\n"
           "sockets are in $XDG_RUNTIME_DIR/lkvm/, or ~/.lkvm/ without one.\n";
}

std::string run_usage()
{
    return "usage: lkvm run [OPTIONS] [-- COMMAND [ARGS...]]\n"
           "\n"
           "Boots a Linux bzImage on KVM with its console on this terminal. With a\n"
           "COMMAND the guest runs it and lkvm exits with its status; without one the\n"
           "guest gives you a shell. Ctrl-A x quits.\n"
           "\n"
           "options:\n"
           "  -k, --kernel BZIMAGE   kernel to boot (default: kernel/vmlinuz beside lkvm in a\n"
           "                         build tree, else PREFIX/share/lkvm/vmlinuz once installed)\n"
           "  -i, --initrd FILE      initramfs (default: guest/initramfs.cpio.gz beside lkvm,\n"
           "                         else PREFIX/share/lkvm/initramfs.cpio.gz)\n"
           "  -p, --params \"ARGS\"    appended to the kernel command line\n"
           "                         (default: console=ttyS0 panic=-1 quiet)\n"
           "  -c, --cpus N           vCPUs (default 1)\n"
           "  -m, --mem MiB          guest memory, e.g. 512 or 2G (default 512)\n"
           "  -d, --disk PATH[,OPTION...]\n"
           "                         a raw image or block device as a virtio-blk disk (repeatable).\n"
           "                         Options: ro, direct, aio=io_uring|native|sync|null (default\n"
           "                         io_uring where the kernel has it, else native), serial=S,\n"
           "                         num-queues=Q (default: one per vCPU), iothread=K[+K...] (the\n"
           "                         group threads its queues go to), ioprio=rt|be|idle[/0-7],\n"
           "                         notify=mmio|pio (default " + notify_name(kDefaultNotify) + "): where the guest kicks\n"
           "                         its queues, a memory BAR (KVM's fast path on Intel VMX)\n"
           "                         or an I/O BAR (no instruction emulation on AMD SVM).\n"
           "                         bus=scsi makes it a SCSI disk (/dev/sdX) on a virtio-scsi\n"
           "                         controller of its own, or with controller=C[,lun=L] on\n"
           "                         controller C shared with other disks; SCSI disks also take\n"
           "                         rotation-rate=N (1: SSD)\n"
           "                         discard=unmap|ignore (default unmap): whether the guest's\n"
           "                         discards punch holes in the image.\n"
           "                         cache=writeback|none|writethrough|directsync|unsafe (default\n"
           "                         writeback; 'direct' is cache=none), as QEMU's: see README.\n"
           "                         detect-zeroes=off|on|unmap (default off): writes of zeroes\n"
           "                         become write-zeroes (unmap: holes, with discard=unmap)\n"
           "                         snapshot: the image is opened read-only and stays as it is;\n"
           "                         the guest writes to a temporary overlay in $TMPDIR (default\n"
           "                         /var/tmp), gone when lkvm exits\n"
           "                         limits, as QEMU's: iops=, iops-rd=, iops-wr=, bps=, bps-rd=,\n"
           "                         bps-wr= (per second), each with -max= (burst rate) and\n"
           "                         -max-length= (burst seconds), iops-size=BYTES;\n"
           "                         throttle-group=NAME: limits shared with other disks\n"
           "                         werror=report|ignore|stop|enospc (default enospc: a full\n"
           "                         host disk pauses the guest until lkvm resume),\n"
           "                         rerror=report|ignore|stop (default report), as QEMU's\n"
           "      --throttle-group NAME[,iops=N][,bps=N]...\n"
           "                         limits the disks naming it share, taking turns\n"
           "      --scsi-controller C[,num-queues=Q][,iothread=K[+K...]][,notify=mmio|pio]\n"
           "                         queues, I/O threads and notify of the shared controller C\n"
           "      --iothreads N[,affinity=CPUS][,poll-max-ns=NS][,poll-grow=G][,poll-shrink=S][,aio-max-batch=B]\n"
           "                  [,sched=batch|other|idle]\n"
           "                         serve every disk's queues from a group of N I/O threads\n"
           "                         (iothread0..N-1), round robin; without it each disk has its\n"
           "                         own thread. affinity pins thread k to the k-th CPU listed;\n"
           "                         polling defaults as QEMU's (poll-max-ns=32768, 0: off);\n"
           "                         sched: the threads' host policy (default batch: a kick\n"
           "                         does not preempt the vCPU that sent it)\n"
           "      --stats            print per-thread and per-queue I/O statistics at exit\n"
           "      --name NAME        a name for this guest, for lkvm list/stop/pause/resume/stat\n"
           "                         (letters, digits, '.', '_', '-'; default guest-PID)\n"
           "      --console-log FILE the guest's console output is also appended to FILE\n"
           "      --timeout SECS     stop the guest after SECS seconds (1-1000000), exit 124\n"
           "      --boot-timeout SECS\n"
           "                         warn, with each vCPU's RIP, when the guest has not\n"
           "                         touched its console in SECS seconds (default 30,\n"
           "                         0: never); the guest keeps running\n"
           "      --force-kvm        boot even on a KVM that cannot run an ordinary kernel (PVM,\n"
           "                         no VT-x/AMD-V), e.g. a PVM-enabled guest kernel\n"
           "      --gdb [HOST:]PORT  a gdb stub on HOST (default 127.0.0.1) PORT: gdb vmlinux\n"
           "                         -ex 'target remote :PORT' stops the guest and debugs it\n"
           "      --gdb-wait         with --gdb: the vCPUs wait at their first instruction\n"
           "                         until gdb continues them\n"
           "      --quiet            only the guest's output; of lkvm's own messages, errors\n"
           "      --loglevel LEVEL   lkvm's messages: error, warn, info (default) or debug\n"
           "  -h, --help             this text\n"
           "\n"
           "exit status: the guest command's status; 0 when the guest powers off or\n"
           "reboots; 1 for bad input; 121 after a guest kernel panic; 122 when a vCPU\n"
           "triple-faults or KVM fails to run it; 124 when --timeout expires.\n";
}

}  // namespace lkvm
