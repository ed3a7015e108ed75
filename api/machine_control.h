// A running machine served on its control socket: each command calls one of
// the Machine's public methods on its main loop, and the machine's events go
// to the clients that subscribed.
//
//   info                          -> {"name", "state", "pid", "vcpus", "mem_mib", "disks": [PATH...]}
//   stat                          -> the counters now (api/protocol.h: StatSnapshot)
//   pause, resume, stop           -> {}
//   throttle {"target": DISK|GROUP, "limits": {"iops": N, "bps-wr": N, ...}} -> {"group": NAME}
//   subscribe                     -> {}, then events: paused, resumed, io-error, shutdown
#pragma once

#include <memory>
#include <string>

#include "api/control.h"
#include "kvm/machine.h"

namespace lkvm {

// What a request asks the machine to do, its arguments checked.
struct MachineCommand {
    enum class Kind { kInfo, kStat, kPause, kResume, kStop, kThrottle } kind = Kind::kInfo;
    std::string target;     // throttle: a disk's index or image, or a throttle group
    ThrottleLimits limits;  // throttle
};
// Throws ControlError (CommandNotFound) for an unknown command, Error for bad arguments.
MachineCommand parse_machine_command(const ControlRequest& request);
// Does it: the reply's value; throws ControlError (DeviceNotFound: no such
// throttle target). On the machine's main loop.
Json run_machine_command(Machine& machine, const MachineCommand& command);

// A machine event as the protocol names it ("paused", ...) and its data.
std::string event_name(const MachineEvent& event);
Json event_data(const MachineEvent& event);

class MachineControl {
public:
    // Listens on DIR/NAME.sock (DIR: control_dir()) on the machine's main
    // loop. Throws GuestNameTaken when another guest has the name; when no
    // socket can be made at all (a home on 9p or NFS) it warns and returns
    // null: the guest runs, unseen by lkvm list.
    static std::unique_ptr<MachineControl> serve(Machine& machine);

    explicit MachineControl(Machine& machine);  // throws as serve() does, and warns of nothing
    ~MachineControl();
    MachineControl(const MachineControl&) = delete;
    MachineControl& operator=(const MachineControl&) = delete;

private:
    Machine& machine_;
    ControlServer server_;
};

}  // namespace lkvm
