// The client side of the control socket: `lkvm list | stop | pause | resume |
// stat`, and what they print.
#pragma once

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "api/control.h"
#include "base/fd.h"
#include "cli/command_line.h"

namespace lkvm {

constexpr std::chrono::milliseconds kControlTimeout{2000};

// One connection to a running guest; several requests may go over it.
class ControlConnection {
public:
    // Connects to the guest NAME in dir; nullopt when no guest listens there
    // (no socket, or a stale one). Throws Error when it does not accept in time.
    static std::optional<ControlConnection> open(const std::string& dir, const std::string& name,
                                                 std::chrono::milliseconds timeout = kControlTimeout);
    // The payload of the reply; throws Error with the guest's error message,
    // or when the guest does not answer in time or hangs up.
    std::string ask(ControlVerb verb, const std::string& argument = {});
    // Sends raw bytes (none: nothing) and returns the next reply line without
    // its '\n'; throws Error on timeout or hang-up. For requests ask() cannot make.
    std::string exchange(std::string_view request);

private:
    ControlConnection(Fd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {}
    Fd fd_;
    std::string name_;
    std::string received_;  // bytes read past the last reply line
};

// Runs a list, stop, pause, resume or stat command against the guests in dir,
// printing to out; returns lkvm's exit status. Throws Error with the line to
// print, e.g. "no running guest named NAME (see 'lkvm list')".
int run_control_command(const Command& command, const std::string& dir, std::FILE* out);
// The same in control_dir(), printing to stdout.
int run_control_command(const Command& command);

}  // namespace lkvm
