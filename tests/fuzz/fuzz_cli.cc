// The option parsers of `lkvm run`: -d, --iothreads and --scsi-controller
// on the input as one value, then the whole command line with the input's
// lines as arguments (`run ...`, or `stat ...` and the other control
// commands), and the disk devices planned from what it accepted.
// A bad value must be refused with lkvm::Error (one line for the user),
// never another exception, and what is accepted must keep the limits the
// rest of lkvm relies on.
//
// Input: text; its lines are the arguments after `lkvm`.
#include <algorithm>
#include <string>
#include <vector>

#include "cli/command_line.h"
#include "tests/fuzz/fuzz_input.h"

using namespace lkvm;

namespace {
template <typename F>
void refused_or(F&& parse)
{
    try {
        parse();
    } catch (const Error&) {
    }
}

void check_iothreads(const IoThreadsSpec& spec)
{
    FUZZ_CHECK(spec.count >= 1 && spec.count <= kMaxIoThreads && spec.aio_max_batch <= 1024);
    for (size_t i = 0; i < spec.affinity.size(); ++i) {
        FUZZ_CHECK(spec.affinity[i] >= 0 && spec.affinity[i] < 4096);
        FUZZ_CHECK(std::count(spec.affinity.begin(), spec.affinity.end(), spec.affinity[i]) == 1);
    }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    const std::string text(reinterpret_cast<const char*>(data), size);

    refused_or([&] {
        const DiskSpec disk = parse_disk_spec(text);
        FUZZ_CHECK(!disk.path.empty() && disk.num_queues <= kMaxDiskQueues && disk.lun <= kMaxScsiLun);
        FUZZ_CHECK(disk.serial.size() <= (disk.bus == DiskBus::kBlk ? 20u : 36u));
    });
    refused_or([&] { check_iothreads(parse_iothreads_spec(text)); });
    refused_or([&] {
        const ScsiControllerSpec controller = parse_scsi_controller_spec(text);
        FUZZ_CHECK(!controller.name.empty() && controller.num_queues <= kMaxDiskQueues);
    });

    std::vector<std::string> args;
    for (size_t start = 0; start <= text.size();) {
        const size_t end = std::min(text.find('\n', start), text.size());
        args.push_back(text.substr(start, end - start));
        start = end + 1;
    }
    refused_or([&] {
        const Command command = parse_command_line(args);
        if (command.kind != Command::Kind::kRun)
            return;
        const RunOptions& run = command.run;
        if (run.iothreads.count)
            check_iothreads(run.iothreads);
        std::vector<int> planned(run.disks.size());
        for (const DiskDevicePlan& plan : plan_disk_devices(run)) {
            FUZZ_CHECK(!plan.disks.empty() && plan.num_queues >= 1 && plan.num_queues <= kMaxDiskQueues);
            for (const unsigned k : plan.iothreads)
                FUZZ_CHECK(k < run.iothreads.count);
            for (const size_t d : plan.disks)
                ++planned.at(d);
        }
        FUZZ_CHECK(std::ranges::all_of(planned, [](int n) { return n == 1; }));
        kernel_cmdline(run);
    });
    return 0;
}
