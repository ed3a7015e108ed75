// The control socket: how `lkvm list|stop|pause|resume|stat|throttle` and
// scripts reach a running lkvm. Each guest listens on DIR/NAME.sock (DIR:
// control_dir()) and speaks the JSON lines of api/protocol.h.
#pragma once

#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "api/protocol.h"
#include "base/error.h"

namespace lkvm {

constexpr size_t kMaxGuestNameLength = 64;

// ---- Guest names: each becomes a file name, DIR/NAME.sock.

// Why `name` cannot name a guest, or "" when it can: 1-64 of [A-Za-z0-9._-],
// not starting with '.' or '-'.
std::string guest_name_problem(std::string_view name);
// The name of a guest run without --name: "guest-<pid>".
std::string default_guest_name();

// ---- Where the sockets live.

// "$XDG_RUNTIME_DIR/lkvm/" when xdg_runtime_dir is set, absolute and an
// existing directory, else "$HOME/.lkvm/" (home null or empty: the passwd
// entry's). The arguments are the environment's values (null: unset); the
// only things looked at are whether that directory exists and, without a
// HOME, the passwd entry. Throws when there is no absolute home either.
std::string control_dir(const char* xdg_runtime_dir, const char* home);
// The same from this process's environment.
std::string control_dir();
// dir + name + ".sock"; throws for a bad name or a path longer than a unix
// socket address holds.
std::string control_socket_path(const std::string& dir, const std::string& name);
// Creates dir mode 0700 when missing; throws when it is not a directory (a
// symlink counts as not), belongs to another user, or others may write to it.
void ensure_control_dir(const std::string& dir);
// The names of the guests listening in dir, sorted, removing on the way the
// stale sockets that dead instances left behind. A missing dir has none.
std::vector<std::string> running_guests(const std::string& dir);

// ---- The server side, in the running lkvm.

// The name is taken by a running guest, or by a file that is not a socket:
// a different failure from a directory where sockets cannot be made at all.
class GuestNameTaken : public Error {
public:
    using Error::Error;
};

// Listens on DIR/NAME.sock (mode 0600, DIR 0700) on the given loop and
// serves every client, any number at once: a greeting on connect, then one
// reply per request line, in order. The handler runs on the loop's thread;
// it returns the value of the "return" reply, or throws ControlError (or
// any lkvm::Error: GenericError) for an error reply; the guest goes on either
// way. "subscribe" is the server's own: from then on that client also gets
// every event. A bad request gets an error reply and the connection stays;
// a line over kMaxRequestBytes gets one and the connection is closed, and so
// is a client that leaves more than kMaxPendingBytes unread.
//
// Construct and destroy it on the loop's thread or while no thread runs the
// loop. The destructor removes the socket file; once it has run, the handler
// is never called again.
class ControlServer {
public:
    using Handler = std::function<Json(const ControlRequest&)>;
    // Room for a longest reply and the events behind it.
    static constexpr size_t kMaxPendingBytes = 2 * kMaxReplyBytes;

    // Throws Error when the name is taken by a live guest ("a guest named NAME
    // is already running (pid N); pick another --name"), or when the directory
    // or socket cannot be set up. A stale socket left by a dead lkvm is replaced.
    ControlServer(boost::asio::io_context& io, const std::string& dir, const std::string& name, Handler handler);
    ~ControlServer();
    ControlServer(const ControlServer&) = delete;
    ControlServer& operator=(const ControlServer&) = delete;

    const std::string& path() const;
    // Sends the event to every subscribed client: what the socket takes at
    // once goes now (so an event sent after the loop has stopped still goes
    // out), the rest when the loop runs.
    void send_event(std::string_view name, const Json& data,
                    std::chrono::system_clock::time_point when = std::chrono::system_clock::now());

private:
    struct Listener;
    struct Session;
    std::shared_ptr<Listener> listener_;  // shared with the pending accept and the sessions
};

}  // namespace lkvm
