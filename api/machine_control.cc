#include "api/machine_control.h"

#include <algorithm>
#include <array>

#include "base/log.h"

namespace lkvm {

namespace {

constexpr std::array<std::string_view, 7> kCommands{"info", "stat", "pause", "resume", "stop", "throttle", "subscribe"};

std::string command_list()
{
    std::string list;
    for (const auto command : kCommands)
        list += (list.empty() ? "" : ", ") + std::string(command);
    return list;
}

void take_no_arguments(const ControlRequest& request)
{
    if (!request.arguments.empty())
        throw Error("parameter '" + request.arguments.begin().key() + "' is unexpected: " + request.command +
                    " takes no arguments");
}

// throttle's {"target": "0" or 0, "limits": {"iops": 500, ...}}: the same names and
// checks as -d's and --throttle-group's limits.
std::pair<std::string, ThrottleLimits> throttle_arguments(const Json& arguments)
{
    for (const auto& [key, value] : arguments.items())
        if (key != "target" && key != "limits")
            throw Error("parameter '" + key + "' is unexpected (throttle takes target and limits)");
    const auto target = arguments.find("target");
    if (target == arguments.end() || !(target->is_string() || target->is_number_unsigned()))
        throw Error("throttle needs 'target': a disk's index or image, or a throttle group's name");
    const auto limits = arguments.find("limits");
    if (limits == arguments.end() || !limits->is_object())
        throw Error("throttle needs 'limits': an object such as {\"iops\": 500, \"bps-wr\": 1048576}");
    const std::string name = target->is_string() ? target->get<std::string>() : std::to_string(target->get<uint64_t>());
    std::string items;
    for (const auto& [key, value] : limits->items()) {
        // Only plain names: the items below are "key=value,...".
        if (key.empty() || !std::ranges::all_of(key, [](char c) { return (c >= 'a' && c <= 'z') || c == '-'; }))
            throw Error("throttle: '" + key + "' is not a limit");
        if (!value.is_number_unsigned())
            throw Error("throttle: limit '" + key + "' must be a whole number (0: none)");
        items += (items.empty() ? "" : ",") + key + "=" + std::to_string(value.get<uint64_t>());
    }
    // {}: no limits at all, as iops=0 and the rest would say.
    return {name, items.empty() ? ThrottleLimits{} : parse_throttle_limits("throttle " + name, items, "")};
}

}  // namespace

MachineCommand parse_machine_command(const ControlRequest& request)
{
    using Kind = MachineCommand::Kind;
    static constexpr std::array<std::pair<std::string_view, Kind>, 6> kKinds{{{"info", Kind::kInfo},
                                                                              {"stat", Kind::kStat},
                                                                              {"pause", Kind::kPause},
                                                                              {"resume", Kind::kResume},
                                                                              {"stop", Kind::kStop},
                                                                              {"throttle", Kind::kThrottle}}};
    const auto known = std::ranges::find(kKinds, request.command, &std::pair<std::string_view, Kind>::first);
    if (known == kKinds.end())
        throw ControlError(ControlErrorClass::kCommandNotFound,
                           "the command " + request.command + " has not been found (commands: " + command_list() + ")");
    if (known->second != Kind::kThrottle) {
        take_no_arguments(request);
        return {known->second, {}, {}};
    }
    auto [target, limits] = throttle_arguments(request.arguments);
    return {Kind::kThrottle, std::move(target), limits};
}

Json run_machine_command(Machine& machine, const MachineCommand& command)
{
    switch (command.kind) {
    case MachineCommand::Kind::kInfo:
        return machine.info();
    case MachineCommand::Kind::kStat:
        return machine.sample_io_stats();
    case MachineCommand::Kind::kPause:
        machine.pause();
        break;
    case MachineCommand::Kind::kResume:
        machine.resume();
        break;
    case MachineCommand::Kind::kStop:
        machine.request_stop();
        break;
    case MachineCommand::Kind::kThrottle:
        try {
            return {{"group", machine.set_throttle(command.target, command.limits)}};
        } catch (const Error& e) {
            throw ControlError(ControlErrorClass::kDeviceNotFound, e.what());
        }
    }
    return Json::object();
}

std::string event_name(const MachineEvent& event)
{
    switch (event.kind) {
    case MachineEvent::Kind::kPaused:
        return "paused";
    case MachineEvent::Kind::kResumed:
        return "resumed";
    case MachineEvent::Kind::kIoError:
        return "io-error";
    case MachineEvent::Kind::kShutdown:
        return "shutdown";
    }
    return "unknown";
}

Json event_data(const MachineEvent& event)
{
    Json data = Json::object();
    if (!event.reason.empty())
        data["reason"] = event.reason;
    if (event.kind == MachineEvent::Kind::kShutdown)
        data["exit_status"] = event.exit_status;
    return data;
}

MachineControl::MachineControl(Machine& machine)
    : machine_(machine),
      server_(machine.main_loop(), control_dir(), machine.name(),
              [&machine](const ControlRequest& request) {
                  return run_machine_command(machine, parse_machine_command(request));
              })
{
    machine_.watch([this](const MachineEvent& event) { server_.send_event(event_name(event), event_data(event)); });
}

MachineControl::~MachineControl() { machine_.watch(nullptr); }

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

}  // namespace lkvm
