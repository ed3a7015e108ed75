// The client side of the control socket: `lkvm list | stop | pause | resume |
// stat | throttle`.
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
    // Connects to the guest NAME in dir and reads its greeting; nullopt when
    // no guest listens there (no socket, or a stale one). Throws Error when it
    // does not accept or greet in time, or greets as something else.
    static std::optional<ControlConnection> open(const std::string& dir, const std::string& name,
                                                 std::chrono::milliseconds timeout = kControlTimeout);
    // Runs a command: its "return" value. Events before the reply are
    // skipped. Throws Error with the guest's error description, or when the
    // guest does not answer in time or hangs up.
    Json execute(std::string_view command, const Json& arguments = Json::object());
    // Sends raw bytes (none: nothing) and returns the next line the guest
    // sends, without its '\n'; throws Error on timeout or hang-up. For
    // requests execute() cannot make, and for events.
    std::string exchange(std::string_view request);

    const Json& greeting() const { return greeting_; }  // the greeting's "lkvm" object

private:
    ControlConnection(Fd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {}
    Fd fd_;
    std::string name_;
    std::string received_;  // bytes read past the last line
    Json greeting_;
};

// lkvm throttle's "iops=500,bps-wr=1048576" (checked by the command line) as
// the protocol's limits object.
Json throttle_limits_json(const std::string& limits);

// Runs a list, stop, pause, resume or stat command against the guests in dir,
// printing to out; returns lkvm's exit status. Throws Error with the line to
// print, e.g. "no running guest named NAME (see 'lkvm list')".
int run_control_command(const Command& command, const std::string& dir, std::FILE* out);
// The same in control_dir(), printing to stdout.
int run_control_command(const Command& command);

}  // namespace lkvm
