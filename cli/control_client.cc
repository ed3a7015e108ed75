#include "cli/control_client.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <optional>
#include <thread>

#include "base/error.h"
#include "base/log.h"
#include "cli/stat_tables.h"

namespace lkvm {

namespace {

// ---- The commands.

ControlConnection connect_to(const std::string& dir, const std::string& name)
{
    auto connection = ControlConnection::open(dir, name);
    if (!connection)
        throw Error("no running guest named " + name + " (see 'lkvm list')");
    return std::move(*connection);
}

int list_guests(const std::string& dir, std::FILE* out)
{
    std::vector<GuestInfo> guests;
    bool failed = false;
    for (const auto& name : running_guests(dir)) {
        try {
            if (auto connection = ControlConnection::open(dir, name))
                guests.push_back(guest_info_from_json(connection->execute("info")));
        } catch (const Error& e) {
            log_error(e.what());
            failed = true;
        }
    }
    if (guests.empty() && !failed)
        log_info("no running guests");
    if (!guests.empty())
        std::fputs(format_guest_table(guests).c_str(), out);
    return failed ? exit_status::kError : exit_status::kOk;
}

int tell_every_guest(const std::string& dir, std::string_view command)
{
    const auto names = running_guests(dir);
    if (names.empty())
        log_info("no running guests");
    bool failed = false;
    for (const auto& name : names) {
        try {
            if (auto connection = ControlConnection::open(dir, name))  // none: it ended by itself meanwhile
                connection->execute(command);
        } catch (const Error& e) {
            log_error(e.what());
            failed = true;
        }
    }
    return failed ? exit_status::kError : exit_status::kOk;
}

int show_stats(const std::string& dir, const ControlCommand& command, std::FILE* out)
{
    ControlConnection connection = connect_to(dir, command.name);
    const StatTables which{command.disks, command.iothreads, command.vcpus};
    const bool watch = command.watch_s > 0;
    const bool redraw = watch && !command.json && ::isatty(::fileno(out));
    const std::chrono::duration<double> interval(watch ? command.watch_s : 1.0);
    StatSnapshot before = stat_from_json(connection.execute("stat"));
    for (bool first = true;; first = false) {
        std::this_thread::sleep_for(interval);
        StatSnapshot after = stat_from_json(connection.execute("stat"));
        std::string text;
        if (command.json) {
            const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
            text = format_stat_json(before, after, which, now);
        } else {
            text = (redraw ? "\033[H\033[2J" : first ? "" : "\n") + format_stat_tables(before, after, which);
        }
        std::fputs(text.c_str(), out);
        std::fflush(out);  // each sample as it comes, also into a pipe
        if (!watch)
            return exit_status::kOk;
        before = std::move(after);
    }
}

}  // namespace

// ---- ControlConnection.

std::optional<ControlConnection> ControlConnection::open(const std::string& dir, const std::string& name,
                                                         std::chrono::milliseconds timeout)
{
    const std::string path = control_socket_path(dir, name);
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid())
        throw sys_error("cannot create a unix socket");
    // A blocking socket with a timeout on every send and receive; a unix
    // connect() waits within the send timeout when the guest's backlog is full.
    const timeval limit{static_cast<time_t>(timeout.count() / 1000), static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit));
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    path.copy(address.sun_path, sizeof(address.sun_path) - 1);  // control_socket_path() checked that it fits
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
        if (errno == ENOENT || errno == ECONNREFUSED)
            return std::nullopt;
        if (errno == EAGAIN || errno == ETIMEDOUT)
            throw Error("guest " + name + " does not accept connections (waited " +
                        std::to_string(timeout.count()) + " ms)");
        throw sys_error("cannot connect to guest " + name + " at " + path);
    }
    ControlConnection connection(std::move(fd), name);
    ServerLine greeting = parse_server_line(connection.exchange(""));
    if (greeting.kind != ServerLine::Kind::kGreeting)
        throw Error("guest " + name + " did not greet as lkvm does: is " + path + " an lkvm control socket?");
    connection.greeting_ = std::move(greeting.body);
    return connection;
}

std::string ControlConnection::exchange(std::string_view request)
{
    while (!request.empty()) {
        const ssize_t sent = ::send(fd_.get(), request.data(), request.size(), MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && (errno == EPIPE || errno == ECONNRESET))
            throw Error("guest " + name_ + " hung up");
        if (sent < 0)
            throw sys_error("guest " + name_ + ": cannot send");
        request.remove_prefix(static_cast<size_t>(sent));
    }
    for (;;) {
        if (const size_t end = received_.find('\n'); end != std::string::npos) {
            std::string reply = received_.substr(0, end);
            received_.erase(0, end + 1);
            return reply;
        }
        if (received_.size() >= kMaxReplyBytes)
            throw Error("guest " + name_ + " sent a reply longer than " + std::to_string(kMaxReplyBytes) + " bytes");
        char buffer[65536];
        const ssize_t got = ::recv(fd_.get(), buffer, sizeof(buffer), 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got == 0 || (got < 0 && errno == ECONNRESET))
            throw Error("guest " + name_ + " hung up without answering");
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            throw Error("guest " + name_ + " did not answer in time");
        if (got < 0)
            throw sys_error("guest " + name_ + ": cannot receive");
        received_.append(buffer, static_cast<size_t>(got));
    }
}

Json ControlConnection::execute(std::string_view command, const Json& arguments)
{
    const std::string request = request_line(command, arguments);
    for (std::string_view unsent = request;; unsent = {}) {
        ServerLine line = parse_server_line(exchange(unsent));
        if (line.kind == ServerLine::Kind::kReturn)
            return std::move(line.body);
        if (line.kind == ServerLine::Kind::kError)
            throw Error("guest " + name_ + ": " + line.error);
        // An event: the reply is still to come.
    }
}

Json throttle_limits_json(const std::string& limits)
{
    Json object = Json::object();
    for (size_t start = 0; start < limits.size();) {
        const size_t end = std::min(limits.find(',', start), limits.size());
        const std::string item = limits.substr(start, end - start);
        const size_t equals = item.find('=');
        if (equals == std::string::npos)
            throw Error("throttle: '" + item + "' is not NAME=VALUE");
        object[item.substr(0, equals)] = parse_number("throttle " + item, item.substr(equals + 1));
        start = end + 1;
    }
    return object;
}

int run_control_command(const Command& command, const std::string& dir, std::FILE* out)
{
    const ControlCommand& control = command.control;
    switch (command.kind) {
    case Command::Kind::kList:
        return list_guests(dir, out);
    case Command::Kind::kStop:
        if (control.all)
            return tell_every_guest(dir, "stop");
        connect_to(dir, control.name).execute("stop");
        return exit_status::kOk;
    case Command::Kind::kPause:
        connect_to(dir, control.name).execute("pause");
        return exit_status::kOk;
    case Command::Kind::kResume:
        connect_to(dir, control.name).execute("resume");
        return exit_status::kOk;
    case Command::Kind::kStat:
        return show_stats(dir, control, out);
    case Command::Kind::kThrottle: {
        const Json reply = connect_to(dir, control.name)
                               .execute("throttle", {{"target", control.target}, {"limits", throttle_limits_json(control.limits)}});
        const auto group = reply.find("group");
        std::fprintf(out, "group=%s\n", group != reply.end() && group->is_string() ? group->get<std::string>().c_str() : "?");
        return exit_status::kOk;
    }
    default:
        throw Error("internal error: not a control command");
    }
}

int run_control_command(const Command& command) { return run_control_command(command, control_dir(), stdout); }

}  // namespace lkvm
