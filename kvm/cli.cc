#include "kvm/cli.h"

#include <charconv>
#include <optional>

namespace lkvm {

namespace {

const std::string kRunHint = " (see 'lkvm run --help')";

uint64_t parse_number(const std::string& option, const std::string& text)
{
    uint64_t value = 0;
    const char* end = text.data() + text.size();
    auto [ptr, ec] = std::from_chars(text.data(), end, value);
    if (text.empty() || ec != std::errc() || ptr != end)
        throw Error(option + " '" + text + "': not a number" + kRunHint);
    return value;
}

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
    kCpus{"-c", "--cpus"}, kMem{"-m", "--mem"}, kName{nullptr, "--name"}, kDisk{"-d", "--disk"};

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
        } else if (auto v = take_value(args, i, kName)) {
            run.name = *v;
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
    return run;
}

}  // namespace

DiskSpec parse_disk_spec(const std::string& text)
{
    DiskSpec disk;
    const std::string hint = " (see 'lkvm run --help')";
    size_t start = 0;
    bool first = true;
    while (start <= text.size()) {
        const size_t comma = text.find(',', start);
        const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        start = comma == std::string::npos ? text.size() + 1 : comma + 1;
        if (first) {
            if (item.empty())
                throw Error("-d " + text + ": no image path before the options" + hint);
            disk.path = item;
            first = false;
        } else if (item == "ro") {
            disk.read_only = true;
        } else if (item == "direct") {
            disk.direct = true;
        } else if (item.rfind("aio=", 0) == 0) {
            disk.engine = item.substr(4);
            if (disk.engine != "sync" && disk.engine != "native" && disk.engine != "null")
                throw Error("-d " + text + ": aio=" + disk.engine + " is not an engine; use sync, native or null" + hint);
        } else if (item.rfind("serial=", 0) == 0) {
            disk.serial = item.substr(7);
            if (disk.serial.size() > 20)
                throw Error("-d " + text + ": serial is longer than virtio-blk's 20 bytes" + hint);
        } else {
            throw Error("-d " + text + ": unknown disk option '" + item +
                        "' (ro, direct, aio=sync|native|null, serial=S)" + hint);
        }
    }
    return disk;
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
    throw Error("unknown command '" + args[0] + "' (see 'lkvm --help')");
}

std::string usage()
{
    return "usage: lkvm COMMAND [ARGS]\n"
           "\n"
           "commands:\n"
           "  run       boot a Linux guest (lkvm run --help)\n"
           "  version   print the version\n"
           "  help      this text\n";
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
           "  -k, --kernel BZIMAGE   kernel to boot (default: the Debian kernel in build/kernel)\n"
           "  -i, --initrd FILE      initramfs (default: build/guest/initramfs.cpio.gz)\n"
           "  -p, --params \"ARGS\"    appended to the kernel command line\n"
           "                         (default: console=ttyS0 panic=-1 quiet)\n"
           "  -c, --cpus N           vCPUs (default 1)\n"
           "  -m, --mem MiB          guest memory, e.g. 512 or 2G (default 512)\n"
           "  -d, --disk PATH[,ro][,direct][,aio=sync|native|null][,serial=S]\n"
           "                         a raw image or block device as a virtio-blk disk, served by\n"
           "                         its own I/O thread (repeatable; default aio=native)\n"
           "      --name NAME        a name for this guest\n"
           "  -h, --help             this text\n"
           "\n"
           "exit status: the guest command's status; 0 when the guest powers off or\n"
           "reboots; 1 for bad input; 121 after a guest kernel panic; 122 when a vCPU\n"
           "triple-faults or KVM fails to run it.\n";
}

}  // namespace lkvm

namespace lkvm {

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
