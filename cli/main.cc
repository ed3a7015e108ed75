#include <cstdio>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/log.h"
#include "kvm/cli.h"
#include "kvm/control_client.h"
#include "kvm/machine.h"

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
        case Command::Kind::kRun: {
            Machine machine(cmd.run);
            return machine.run();
        }
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
