// The control socket: how `lkvm list|stop|pause|resume|stat` reach a running
// lkvm. Each guest listens on DIR/NAME.sock (DIR: control_dir()) and answers
// one line per request:
//
//   request  "LKVM/1 VERB[ ARGUMENT]\n"       VERB: info, stop, pause, resume, stat, throttle
//            (throttle's ARGUMENT: "TARGET LIMITS", percent-encoded: one word)
//   reply    "LKVM/1 ok PAYLOAD\n"  or  "LKVM/1 error MESSAGE\n"
//
// A PAYLOAD is records separated by ';', each "key=value key=value ...",
// every value percent-encoded, so paths with spaces, ';' or '=' survive:
//
//   info  "name=g state=running pid=42 vcpus=2 mem_mib=512 disk=a.raw disk=b%20c.raw"
//   stat  "time_ns=N;thread=iothread0 tid=.. cpu=..;disk=0 queue=0 thread=iothread0 ...;vcpu=0 exits=.. ..."
//
// Readers ignore keys and record kinds they do not know, so LKVM/1 can grow
// fields; anything else that changes bumps the version.
#pragma once

#include <boost/asio/io_context.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/error.h"
#include "base/result.h"
#include "kvm/stat_snapshot.h"

namespace lkvm {

constexpr std::string_view kControlVersion = "LKVM/1";
constexpr size_t kMaxRequestBytes = 4096;    // one request line, '\n' included
constexpr size_t kMaxReplyBytes = 1 << 20;   // one reply line, '\n' included
constexpr size_t kMaxGuestNameLength = 64;

enum class ControlVerb { kInfo, kStop, kPause, kResume, kStat, kThrottle };
std::string_view verb_name(ControlVerb verb);

struct ControlRequest {
    ControlVerb verb = ControlVerb::kInfo;
    std::string argument;  // decoded; throttle's only, which must have one
    bool operator==(const ControlRequest&) const = default;
};

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

// ---- The protocol, pure.

std::string format_request(const ControlRequest& request);  // with its '\n'
// `line` without its '\n'. The error is the message to send back.
Result<ControlRequest, std::string> parse_request(std::string_view line);

std::string format_ok_reply(std::string_view payload);     // throws for control characters in the payload
std::string format_error_reply(std::string_view message);  // control characters become spaces
struct ControlReply {
    bool ok = false;
    std::string text;  // the payload when ok, else the error message
};
// `line` without its '\n'; throws Error when it is not a reply.
ControlReply parse_reply(std::string_view line);

// Bytes outside [A-Za-z0-9] and "-._~/:+,@" become %XX.
std::string percent_encode(std::string_view text);
// Exactly what percent_encode makes (hex digits in either case); throws Error otherwise.
std::string percent_decode(std::string_view text);

using PayloadRecord = std::vector<std::pair<std::string, std::string>>;  // (key, decoded value), in order
std::string format_records(const std::vector<PayloadRecord>& records);
// Throws Error for an empty record, an item without '=', a bad key or a badly encoded value.
std::vector<PayloadRecord> parse_records(std::string_view payload);

std::string format_guest_info(const GuestInfo& info);
GuestInfo parse_guest_info(std::string_view payload);  // throws Error when malformed

// What `stat` answers: the counters since the guest started, as read at
// time_ns; a client takes two and divides the differences by the time between.
std::string format_stat_payload(const StatSnapshot& snapshot);
StatSnapshot parse_stat_payload(std::string_view payload);  // throws Error when malformed

// ---- The server side, in the running lkvm.

// The name is taken by a running guest, or by a file that is not a socket:
// a different failure from a directory where sockets cannot be made at all.
class GuestNameTaken : public Error {
public:
    using Error::Error;
};

// Listens on DIR/NAME.sock (mode 0600, DIR 0700) on the given loop and
// answers every client, any number at once, several requests per connection.
// The handler runs on the loop's thread; it returns the payload of an ok
// reply, or throws lkvm::Error for an error reply (the guest goes on either
// way). A bad request gets an error reply and the connection stays; a line
// over 4096 bytes gets an error reply and that connection is closed.
//
// Construct and destroy it on the loop's thread or while no thread runs the
// loop. The destructor removes the socket file; once it has run, the handler
// is never called again.
class ControlServer {
public:
    using Handler = std::function<std::string(const ControlRequest&)>;

    // Throws Error when the name is taken by a live guest ("a guest named NAME
    // is already running (pid N); pick another --name"), or when the directory
    // or socket cannot be set up. A stale socket left by a dead lkvm is replaced.
    ControlServer(boost::asio::io_context& io, const std::string& dir, const std::string& name, Handler handler);
    ~ControlServer();
    ControlServer(const ControlServer&) = delete;
    ControlServer& operator=(const ControlServer&) = delete;

    const std::string& path() const;

private:
    struct Listener;
    struct Session;
    std::shared_ptr<Listener> listener_;  // shared with the pending accept and the sessions
};

}  // namespace lkvm
