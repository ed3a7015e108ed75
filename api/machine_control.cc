#include "api/machine_control.h"

#include "base/log.h"

namespace lkvm {

MachineControl::MachineControl(Machine& machine)
    : machine_(machine),
      server_(machine.main_loop(), control_dir(), machine.name(),
              [this](const ControlRequest& request) { return answer(request); })
{
}

std::unique_ptr<MachineControl> MachineControl::serve(Machine& machine)
{
    try {
        return std::make_unique<MachineControl>(machine);
    } catch (const GuestNameTaken&) {
        throw;
    } catch (const Error& e) {
        log_warn(std::string(e.what()) + "; running without a control socket (lkvm list, stat and stop will not see it)");
        return nullptr;
    }
}

std::string MachineControl::answer(const ControlRequest& request)
{
    switch (request.verb) {
    case ControlVerb::kInfo:
        return format_guest_info(machine_.info());
    case ControlVerb::kStop:
        machine_.request_stop();
        return "";
    case ControlVerb::kPause:
        machine_.pause();
        return "";
    case ControlVerb::kResume:
        machine_.resume();
        return "";
    case ControlVerb::kStat:
        return format_stat_payload(machine_.sample_io_stats());
    case ControlVerb::kThrottle: {
        // The limits never hold a space; an image path may.
        const std::string& argument = request.argument;
        const auto space = argument.rfind(' ');
        if (space == std::string::npos)
            throw Error("throttle: give a disk or group, then the limits");
        const ThrottleLimits limits = parse_throttle_limits("throttle " + argument, argument.substr(space + 1));
        return "group=" + machine_.set_throttle(argument.substr(0, space), limits);
    }
    }
    throw Error("unknown control request");
}

}  // namespace lkvm
