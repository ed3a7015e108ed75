// What a machine is made of: the disks, controllers, I/O threads and limits
// the command line describes, as plain data. The command line (cli/) parses
// into it and the machine (kvm/machine.h) is built from it; the control
// protocol (api/) shares its throttle limit syntax.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.h"
#include "base/log.h"
#include "disk/disk_image.h"
#include "disk/error_policy.h"
#include "disk/throttle.h"
#include "hw/bus.h"
#include "virtio/io_thread_policy.h"

namespace lkvm {

constexpr const char* kVersion = "0.1.0";

// Exit statuses of lkvm itself; a guest command's own status passes through unchanged.
namespace exit_status {
constexpr int kOk = 0;
constexpr int kError = 1;         // bad command line or setup failure
constexpr int kGuestPanic = 121;  // the guest kernel panicked
constexpr int kVcpuFault = 122;   // triple fault or KVM internal error on a vCPU
constexpr int kIoThreadFailed = 123;  // an I/O thread's loop failed (a bug, or the host failing lkvm)
constexpr int kTimeout = 124;     // --timeout expired (as timeout(1) says it)
}  // namespace exit_status

enum class DiskBus { kBlk, kScsi };

// Where a disk's queue notify registers are when neither the disk nor its
// controller says (notify=): kMemory is "mmio" (BAR 0, a length-0 ioeventfd:
// KVM's fast MMIO path on Intel VMX), kPort is "pio" (an I/O BAR: a port
// write needs no instruction emulation on AMD SVM, where an MMIO one does).
// The default is pio: in the nested rig (SVM) it cut L1 KVM's exits and emulated
// instructions per request against mmio, and on VMX a port write exits as
// cheaply as a fast-MMIO one (no instruction emulation either way).
constexpr AddressSpace kDefaultNotify = AddressSpace::kPort;

struct DiskSpec {
    std::string path;
    DiskBus bus = DiskBus::kBlk;
    bool read_only = false;
    CacheMode cache = CacheMode::kWriteback;  // cache=MODE; `direct` says none
    DetectZeroes detect_zeroes = DetectZeroes::kOff;
    bool snapshot = false;  // the image stays as it is; writes go to a temporary overlay
    std::string engine;  // empty: io_uring where the kernel has it, else native
    std::string serial;
    unsigned num_queues = 0;        // 0: one per vCPU
    std::vector<unsigned> iothreads;  // iothread=K[+K...]: the group threads its queues go to
    uint16_t ioprio = 0;            // ioprio::value(class, level); 0: none
    std::optional<AddressSpace> notify;  // notify=mmio|pio; unset: kDefaultNotify
    // bus=scsi only
    std::string controller;         // shared with the disks naming it; empty: a controller of its own
    unsigned lun = 0;
    uint16_t rotation_rate = 0;     // 0: not reported, 1: non-rotating (SSD), else RPM
    bool discard = true;            // discard=unmap (true) or ignore
    ThrottleLimits throttle;        // iops=, bps-wr=, ...: limits of its own
    std::string throttle_group;     // throttle-group=NAME: limits it shares (a --throttle-group)
    IoErrorPolicy write_error = IoErrorPolicy::kEnospc;  // werror=, QEMU's default
    IoErrorPolicy read_error = IoErrorPolicy::kReport;   // rerror=
};

constexpr unsigned kMaxDiskQueues = 64;
constexpr unsigned kMaxScsiLun = 16383;

// A whole decimal number; throws "OPTION 'TEXT': not a number" otherwise.
uint64_t parse_number(const std::string& option, const std::string& text);

// QEMU's legacy -drive throttling names: iops=, iops-rd=, iops-wr=, bps=,
// bps-rd=, bps-wr=, each with -max= (burst rate) and -max-length= (burst
// seconds), and iops-size=. True when `item` is one of them (set in limits);
// false when it is not a throttle option. Throws for a bad value.
bool parse_throttle_item(const std::string& where, const std::string& item, ThrottleLimits& limits);

// A --throttle-group: limits the disks naming it share.
struct ThrottleGroupSpec {
    std::string name;
    ThrottleLimits limits;
};
// "iops=500,bps-wr=1048576": the whole set of limits (those not named are
// none); `where` starts the one line a bad one gets, `hint` ends it (where
// the options are explained).
ThrottleLimits parse_throttle_limits(const std::string& where, const std::string& text,
                                     const std::string& hint = " (see 'lkvm --help')");

// A --scsi-controller: what the disks sharing controller C share.
struct ScsiControllerSpec {
    std::string name;
    unsigned num_queues = 0;          // 0: one per vCPU
    std::vector<unsigned> iothreads;
    std::optional<AddressSpace> notify;  // unset: kDefaultNotify
};

// --iothreads: a group of I/O threads every disk's queues share.
struct IoThreadsSpec {
    unsigned count = 0;
    std::vector<int> affinity;  // thread k runs on affinity[k % size]; empty: not pinned
    uint64_t poll_max_ns = 32768, poll_grow = 0, poll_shrink = 0;  // QEMU's defaults
    unsigned aio_max_batch = 0;
    IoThreadPolicy policy = IoThreadPolicy::kBatch;  // also the dedicated threads'
};
constexpr unsigned kMaxIoThreads = 64;

// "0-3,6" -> {0,1,2,3,6}
std::vector<int> parse_cpu_list(const std::string& option, const std::string& text);

// Checks the group against the CPUs this host has online: throws for a CPU
// that is not; returns a warning line when there are more threads than CPUs.
std::string check_iothreads_on_host(const IoThreadsSpec& spec, const std::vector<int>& online);

// The whole machine, as `lkvm run` describes it.
struct RunOptions {
    std::string kernel;  // empty: the default kernel next to the binary
    std::string initrd;  // empty: the default initramfs next to the binary
    std::string params;  // appended to the default kernel command line
    std::string name;
    unsigned cpus = 1;
    uint64_t mem_mib = 512;
    std::vector<DiskSpec> disks;
    std::vector<ScsiControllerSpec> scsi_controllers;
    std::vector<ThrottleGroupSpec> throttle_groups;
    IoThreadsSpec iothreads;  // count 0: every disk has its own thread
    bool stats = false;       // print per-thread and per-queue I/O statistics at exit
    std::string console_log;  // --console-log FILE: the guest's console output is also appended there
    unsigned timeout_s = 0;   // --timeout SECS: stop the guest after that long, exit kTimeout; 0: never
    unsigned boot_timeout_s = 30;  // --boot-timeout SECS: warn when the console is still silent then; 0: never
    bool force_kvm = false;   // --force-kvm: run on a KVM that cannot run an ordinary guest (PVM, no VT-x/AMD-V)
    bool quiet = false;       // --quiet: only the guest's output (lkvm's own messages: errors only)
    LogLevel log_level = LogLevel::kInfo;  // --loglevel error|warn|info|debug (--quiet: kError)
    std::vector<std::string> command;  // after "--": what the guest init runs
    // --gdb [HOST:]PORT: a gdb stub there (port 0: none); --gdb-wait: the
    // vCPUs wait at their first instruction for gdb to continue them.
    std::string gdb_host = "127.0.0.1";
    uint16_t gdb_port = 0;
    bool gdb_wait = false;
};

// A disk device lkvm builds: a virtio-blk disk, or a virtio-scsi controller
// with its disks (the disks naming one controller share it).
struct DiskDevicePlan {
    DiskBus bus = DiskBus::kBlk;
    std::string controller;          // a shared SCSI controller's name; empty otherwise
    std::vector<size_t> disks;       // indices into RunOptions::disks, in command-line order
    unsigned num_queues = 0;         // resolved: the vCPU count when not given
    std::vector<unsigned> iothreads;  // group threads its queues go to; empty: round robin
    AddressSpace notify = kDefaultNotify;  // resolved: where its queue notify registers are
};
// In the order their first disk appears on the command line.
std::vector<DiskDevicePlan> plan_disk_devices(const RunOptions& options);


// What every guest gets before the user's -p text.
constexpr const char* kDefaultKernelParams = "console=ttyS0 panic=-1 quiet";

// The full kernel command line: defaults, the guest command for our init as
// lkvm.cmd=BASE64(shell-quoted argv) (which survives any characters), then -p.
std::string kernel_cmdline(const RunOptions& options);

// POSIX-shell single quoting of each argument, space separated.
std::string shell_quote(const std::vector<std::string>& argv);
std::string base64(std::string_view data);
}  // namespace lkvm
