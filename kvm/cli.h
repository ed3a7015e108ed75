// The lkvm command line, kvmtool-compatible: parsing and validation only,
// no side effects, so every bad input has a unit test.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/error.h"

namespace lkvm {

constexpr const char* kVersion = "0.1.0";

// Exit statuses of lkvm itself; a guest command's own status passes through unchanged.
namespace exit_status {
constexpr int kOk = 0;
constexpr int kError = 1;         // bad command line or setup failure
constexpr int kGuestPanic = 121;  // the guest kernel panicked
constexpr int kVcpuFault = 122;   // triple fault or KVM internal error on a vCPU
}  // namespace exit_status

struct DiskSpec {
    std::string path;
    bool read_only = false;
    bool direct = false;
    std::string engine = "native";
    std::string serial;
};

// "PATH[,ro][,direct][,aio=sync|native|null][,serial=S]"
DiskSpec parse_disk_spec(const std::string& text);

struct RunOptions {
    std::string kernel;  // empty: the default kernel next to the binary
    std::string initrd;  // empty: the default initramfs next to the binary
    std::string params;  // appended to the default kernel command line
    std::string name;
    unsigned cpus = 1;
    uint64_t mem_mib = 512;
    std::vector<DiskSpec> disks;
    std::vector<std::string> command;  // after "--": what the guest init runs
};

struct Command {
    enum class Kind { kHelp, kRunHelp, kVersion, kRun };
    Kind kind = Kind::kHelp;
    RunOptions run;
};

constexpr unsigned kMinMemMib = 64;

// Throws lkvm::Error with the one line to print for any bad input.
Command parse_command_line(const std::vector<std::string>& args);

std::string usage();
std::string run_usage();

}  // namespace lkvm

namespace lkvm {
// What every guest gets before the user's -p text.
constexpr const char* kDefaultKernelParams = "console=ttyS0 panic=-1 quiet";

// The full kernel command line: defaults, the guest command for our init as
// lkvm.cmd=BASE64(shell-quoted argv) (which survives any characters), then -p.
std::string kernel_cmdline(const RunOptions& options);

// POSIX-shell single quoting of each argument, space separated.
std::string shell_quote(const std::vector<std::string>& argv);
std::string base64(std::string_view data);
}  // namespace lkvm
