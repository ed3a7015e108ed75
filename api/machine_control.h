// A running machine served on its control socket: requests become calls of
// the Machine's public methods, on its main loop.
#pragma once

#include <memory>
#include <string>

#include "api/control.h"
#include "kvm/machine.h"

namespace lkvm {

class MachineControl {
public:
    // Listens on DIR/NAME.sock (DIR: control_dir()) on the machine's main
    // loop. Throws GuestNameTaken when another guest has the name; when no
    // socket can be made at all (a home on 9p or NFS) it warns and returns
    // null: the guest runs, unseen by lkvm list.
    static std::unique_ptr<MachineControl> serve(Machine& machine);

    explicit MachineControl(Machine& machine);  // throws as serve() does, and warns of nothing
    MachineControl(const MachineControl&) = delete;
    MachineControl& operator=(const MachineControl&) = delete;

private:
    std::string answer(const ControlRequest& request);

    Machine& machine_;
    ControlServer server_;
};

}  // namespace lkvm
