#include <cstdio>
#include <string>
#include <vector>

#include "api/machine_control.h"
#include "base/error.h"
#include "base/log.h"
#include "cli/command_line.h"
#include "cli/control_client.h"
#include "cli/stat_tables.h"
#include "kvm/machine.h"

namespace {

using namespace lkvm;

int run_machine(const RunOptions& options)
{
    Machine machine(options);
    // Before the guest runs: a name already taken ends lkvm here, with one line.
    auto control = MachineControl::serve(machine);
    const int status = machine.run();
    control.reset();  // the guest is over: its socket goes at once
    if (options.stats) {
        log_info("I/O statistics");
        std::fputs(format_io_stats(machine.sample_io_stats()).c_str(), stderr);  // asked for: shown at any log level
    }
    return status;
}

}  // namespace

int main(int argc, char** argv)
{
    using namespace lkvm;
    try {
        const Command cmd = parse_command_line(std::vector<std::string>(argv + 1, argv + argc));
        switch (cmd.kind) {
        case Command::Kind::kHelp:
            std::fputs(usage().c_str(), stdout);
            return exit_status::kOk;
        case Command::Kind::kRunHelp:
            std::fputs(run_usage().c_str(), stdout);
            return exit_status::kOk;
        case Command::Kind::kVersion:
            std::printf("lkvm %s\n", kVersion);
            return exit_status::kOk;
        case Command::Kind::kRun:
            return run_machine(cmd.run);
        case Command::Kind::kList:
        case Command::Kind::kStop:
        case Command::Kind::kPause:
        case Command::Kind::kResume:
        case Command::Kind::kStat:
        case Command::Kind::kThrottle:
            return run_control_command(cmd);
        }
    } catch (const Error& e) {
        log_error(e.what());
    } catch (const std::exception& e) {
        log_error(std::string("internal error: ") + e.what());
    }
    return exit_status::kError;
}
