#include "api/control.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <filesystem>
#include <optional>

#include "base/error.h"
#include "base/fd.h"
#include "base/log.h"

namespace lkvm {

namespace {

bool is_ascii_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }
std::string without_trailing_slashes(std::string path)
{
    while (path.size() > 1 && path.back() == '/')
        path.pop_back();
    return path;
}

bool is_directory(const std::string& path)
{
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string passwd_home()
{
    std::vector<char> buffer(16384);
    passwd entry{};
    passwd* found = nullptr;
    if (::getpwuid_r(::geteuid(), &entry, buffer.data(), buffer.size(), &found) != 0 || !found || !found->pw_dir)
        return "";
    return found->pw_dir;
}

sockaddr_un unix_address(const std::string& path)
{
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    if (path.size() >= sizeof(address.sun_path))
        throw Error("control socket path " + path + " is " + std::to_string(path.size()) + " bytes, more than the " +
                    std::to_string(sizeof(address.sun_path) - 1) +
                    " a unix socket takes; use a shorter --name, or set XDG_RUNTIME_DIR to a shorter directory");
    path.copy(address.sun_path, path.size());
    return address;
}

// Who, if anyone, listens at a socket path.
struct SocketProbe {
    enum State { kAbsent, kNotSocket, kStale, kLive } state = kAbsent;
    pid_t pid = 0;  // the listener's, when live and known
};

SocketProbe probe_socket(const std::string& path)
{
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) {
        if (errno == ENOENT)
            return {SocketProbe::kAbsent};
        throw sys_error("cannot look at " + path);
    }
    if (!S_ISSOCK(st.st_mode))
        return {SocketProbe::kNotSocket};
    // Non-blocking, so a guest too busy to accept still counts as alive (EAGAIN).
    const Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid())
        throw sys_error("cannot create a unix socket");
    const sockaddr_un address = unix_address(path);
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0) {
        ucred peer{};
        socklen_t size = sizeof(peer);
        if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &peer, &size) != 0)
            peer.pid = 0;
        return {SocketProbe::kLive, peer.pid};
    }
    switch (errno) {
    case EAGAIN:
        return {SocketProbe::kLive};
    case ECONNREFUSED:
        return {SocketProbe::kStale};
    case ENOENT:
        return {SocketProbe::kAbsent};
    default:
        throw sys_error("cannot connect to " + path);
    }
}

// Holds the control directory's lock: probing a socket, removing it when
// stale and binding a new one are one step against every other lkvm, so a
// live socket is never taken for a stale one and removed.
class DirLock {
public:
    explicit DirLock(const std::string& dir) : fd_(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC))
    {
        if (!fd_.valid() || ::flock(fd_.get(), LOCK_EX) != 0)
            throw sys_error("cannot lock the control socket directory " + dir);
    }

private:
    Fd fd_;  // closing it releases the lock
};

// Binds and listens at path, mode 0600; the file goes again if listening fails.
Fd listen_at(const std::string& path)
{
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid())
        throw sys_error("cannot create the control socket");
    const sockaddr_un address = unix_address(path);
    if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0)
        throw sys_error("cannot create the control socket " + path);
    // fchmod() on a socket does not reach the file bind() made: chmod the path.
    // Before listen(), so nobody ever connects through wider permissions
    // (the 0700 directory already keeps others out; this is the second lock).
    if (::chmod(path.c_str(), 0600) != 0 || ::listen(fd.get(), SOMAXCONN) != 0) {
        const int err = errno;
        ::unlink(path.c_str());
        throw sys_error("cannot listen on the control socket " + path, err);
    }
    return fd;
}

}  // namespace

// ---- Guest names and paths.

std::string guest_name_problem(std::string_view name)
{
    if (name.empty())
        return "a guest name cannot be empty";
    if (name.size() > kMaxGuestNameLength)
        return "a guest name is at most " + std::to_string(kMaxGuestNameLength) + " characters";
    if (name[0] == '.' || name[0] == '-')
        return "a guest name cannot start with '.' or '-'";
    if (!std::ranges::all_of(name, [](char c) { return is_ascii_alnum(c) || c == '.' || c == '_' || c == '-'; }))
        return "use only letters, digits, '.', '_' and '-' in a guest name";
    return "";
}

std::string default_guest_name() { return "guest-" + std::to_string(::getpid()); }

std::string control_dir(const char* xdg_runtime_dir, const char* home)
{
    // The runtime directory is the user's own, 0700 and emptied at logout:
    // the place for sockets, when the session has one.
    if (xdg_runtime_dir && xdg_runtime_dir[0] == '/' && is_directory(xdg_runtime_dir))
        return without_trailing_slashes(xdg_runtime_dir) + (std::string_view(xdg_runtime_dir) == "/" ? "lkvm/" : "/lkvm/");
    const std::string home_dir = home && home[0] ? home : passwd_home();
    if (home_dir.empty() || home_dir[0] != '/')
        throw Error("no directory for the control sockets: set XDG_RUNTIME_DIR or HOME to an absolute path");
    return without_trailing_slashes(home_dir) + (home_dir == "/" ? ".lkvm/" : "/.lkvm/");
}

std::string control_dir() { return control_dir(std::getenv("XDG_RUNTIME_DIR"), std::getenv("HOME")); }

std::string control_socket_path(const std::string& dir, const std::string& name)
{
    if (const std::string problem = guest_name_problem(name); !problem.empty())
        throw Error("'" + name + "' is not a guest name: " + problem);
    std::string path = dir;
    if (path.empty() || path.back() != '/')
        path += '/';
    path += name + ".sock";
    unix_address(path);  // throws when too long
    return path;
}

void ensure_control_dir(const std::string& dir)
{
    const std::string path = without_trailing_slashes(dir);  // so that lstat() sees a symlink as one
    if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST)
        throw sys_error("cannot create the control socket directory " + path);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0)
        throw sys_error("cannot look at the control socket directory " + path);
    if (!S_ISDIR(st.st_mode))
        throw Error("the control socket directory " + path + " is not a directory; remove it");
    if (st.st_uid != ::geteuid())
        throw Error("the control socket directory " + path + " belongs to another user; remove it");
    if (st.st_mode & (S_IWGRP | S_IWOTH))
        throw Error("the control socket directory " + path + " is writable by others; chmod 700 " + path);
}

std::vector<std::string> running_guests(const std::string& dir)
{
    std::vector<std::string> names;
    if (!is_directory(dir))
        return names;
    const DirLock lock(dir);
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
        const std::string file = entry.path().filename().string();
        const std::string name = file.substr(0, file.size() - std::min<size_t>(file.size(), 5));
        if (!file.ends_with(".sock") || !guest_name_problem(name).empty())
            continue;
        const std::string path = entry.path().string();
        try {
            const SocketProbe probe = probe_socket(path);
            if (probe.state == SocketProbe::kLive)
                names.push_back(name);
            else if (probe.state == SocketProbe::kStale)
                ::unlink(path.c_str());
        } catch (const Error&) {
            // Not ours to judge (a path too long, no permission): neither listed nor removed.
        }
    }
    std::ranges::sort(names);
    return names;
}

// ---- The server.

using UnixSocket = boost::asio::local::stream_protocol::socket;

struct ControlServer::Listener : std::enable_shared_from_this<Listener> {
    Listener(boost::asio::io_context& io, Handler handler) : acceptor(io), handler(std::move(handler)) {}

    void accept_next();
    std::string answer(const ControlRequest& request) const;

    boost::asio::local::stream_protocol::acceptor acceptor;
    Handler handler;  // emptied by ~ControlServer: nothing calls it after that
    std::vector<std::weak_ptr<Session>> sessions;
    bool stopped = false;
    std::string path;
    dev_t device = 0;  // the socket file's, so that ~ControlServer removes ours and no other
    ino_t inode = 0;
};

// One client connection: reads request lines and queues a reply to each, in
// order, with the events it subscribed to in between.
struct ControlServer::Session : std::enable_shared_from_this<Session> {
    Session(UnixSocket connected, std::shared_ptr<Listener> owner)
        : socket(std::move(connected)), listener(std::move(owner))
    {
        // For send()'s write at once; asio's own operations work either way.
        boost::system::error_code ignored;
        socket.non_blocking(true, ignored);
    }

    void start()
    {
        send(greeting_line());
        read_request();
    }

    void read_request()
    {
        boost::asio::async_read_until(
            socket, boost::asio::dynamic_buffer(input, kMaxRequestBytes), '\n',
            [self = shared_from_this()](const boost::system::error_code& error, size_t length) {
                self->on_request(error, length);
            });
    }

    void on_request(const boost::system::error_code& error, size_t length)
    {
        if (listener->stopped || !socket.is_open())
            return;
        if (error == boost::asio::error::not_found) {  // kMaxRequestBytes and no '\n'
            send(error_line({ControlErrorClass::kGenericError,
                             "request longer than " + std::to_string(kMaxRequestBytes) + " bytes", std::nullopt}));
            close_when_sent = true;
            return flush();
        }
        if (error)
            return close();  // the client hung up (or we were closed): the session ends here
        const std::string line = input.substr(0, length - 1);
        input.erase(0, length);
        auto request = parse_request(line);
        if (!request)
            send(error_line(request.error()));
        else if (request->command == "subscribe")
            subscribe(*request);
        else
            send(listener->answer(*request));
        read_request();
    }

    void subscribe(const ControlRequest& request)
    {
        if (!request.arguments.empty())
            return send(error_line({ControlErrorClass::kGenericError, "subscribe takes no arguments", request.id}));
        subscribed = true;
        send(return_line(Json::object(), request.id));
    }

    // Queues a line and writes what the socket takes now; a client that
    // leaves too much unread is dropped, so nobody grows lkvm's memory.
    void send(const std::string& line)
    {
        if (!socket.is_open())
            return;
        if (pending.size() + line.size() > kMaxPendingBytes) {
            log_info("control socket " + listener->path + ": dropped a client that left " +
                     std::to_string(pending.size()) + " bytes unread");
            return close();
        }
        pending += line;
        flush();
    }

    void flush()
    {
        if (writing || !socket.is_open())
            return;
        // Written at once when the socket takes it, as it does for all but
        // huge replies: a `stop` whose handler ends the loop, and the
        // shutdown event after it, still get out.
        boost::system::error_code error;
        const size_t written = socket.write_some(boost::asio::buffer(pending), error);
        if (error && error != boost::asio::error::would_block)
            return close();
        pending.erase(0, written);
        if (pending.empty()) {
            if (close_when_sent)
                close();
            return;
        }
        writing = true;
        socket.async_wait(UnixSocket::wait_write, [self = shared_from_this()](const boost::system::error_code& e) {
            self->writing = false;
            if (!e && !self->listener->stopped)
                self->flush();
        });
    }

    void close()
    {
        boost::system::error_code ignored;
        socket.close(ignored);
        pending.clear();
    }

    UnixSocket socket;
    std::shared_ptr<Listener> listener;
    std::string input;
    std::string pending;  // queued output the socket has not taken yet
    bool writing = false;  // waiting for the socket to take more
    bool subscribed = false;
    bool close_when_sent = false;
};

void ControlServer::Listener::accept_next()
{
    acceptor.async_accept([self = shared_from_this()](const boost::system::error_code& error, UnixSocket socket) {
        if (self->stopped || error == boost::asio::error::operation_aborted)
            return;
        if (error) {
            log_warn("control socket " + self->path + ": " + error.message());
        } else {
            auto session = std::make_shared<Session>(std::move(socket), self);
            std::erase_if(self->sessions, [](const auto& weak) { return weak.expired(); });
            self->sessions.push_back(session);
            session->start();
        }
        self->accept_next();
    });
}

std::string ControlServer::Listener::answer(const ControlRequest& request) const
{
    try {
        std::string reply = return_line(handler(request), request.id);
        if (reply.size() > kMaxReplyBytes)
            return error_line({ControlErrorClass::kGenericError,
                               "the reply would be longer than " + std::to_string(kMaxReplyBytes) + " bytes", request.id});
        return reply;
    } catch (const ControlError& e) {
        return error_line({e.error_class(), e.what(), request.id});
    } catch (const std::exception& e) {
        // lkvm::Error is the handler's way to refuse; anything else is a bug,
        // and neither ends the guest.
        return error_line({ControlErrorClass::kGenericError, e.what(), request.id});
    }
}

ControlServer::ControlServer(boost::asio::io_context& io, const std::string& dir, const std::string& name,
                             Handler handler)
    : listener_(std::make_shared<Listener>(io, std::move(handler)))
{
    ensure_control_dir(dir);
    const std::string path = control_socket_path(dir, name);
    const DirLock lock(dir);
    const SocketProbe probe = probe_socket(path);
    if (probe.state == SocketProbe::kLive)
        throw GuestNameTaken("a guest named " + name + " is already running" +
                    (probe.pid ? " (pid " + std::to_string(probe.pid) + ")" : "") + "; pick another --name");
    if (probe.state == SocketProbe::kNotSocket)
        throw GuestNameTaken(path + " is in the way and is not a socket; remove it or pick another --name");
    if (probe.state == SocketProbe::kStale && ::unlink(path.c_str()) != 0 && errno != ENOENT)
        throw sys_error("cannot remove the stale control socket " + path);

    Fd fd = listen_at(path);
    struct stat st {};
    ::stat(path.c_str(), &st);
    boost::system::error_code error;
    listener_->acceptor.assign(boost::asio::local::stream_protocol(), fd.get(), error);
    if (error) {
        ::unlink(path.c_str());
        throw Error("cannot serve the control socket " + path + ": " + error.message());
    }
    fd.release();
    listener_->path = path;
    listener_->device = st.st_dev;
    listener_->inode = st.st_ino;
    listener_->accept_next();
}

ControlServer::~ControlServer()
{
    listener_->stopped = true;
    listener_->handler = nullptr;
    boost::system::error_code ignored;
    listener_->acceptor.close(ignored);
    for (const auto& weak : listener_->sessions)
        if (const auto session = weak.lock())
            session->close();
    // Only the file we made: if someone removed it and another guest took the
    // name since, that guest's socket stays.
    struct stat st {};
    if (::lstat(listener_->path.c_str(), &st) == 0 && st.st_dev == listener_->device && st.st_ino == listener_->inode)
        ::unlink(listener_->path.c_str());
}

const std::string& ControlServer::path() const { return listener_->path; }

void ControlServer::send_event(std::string_view name, const Json& data, std::chrono::system_clock::time_point when)
{
    const std::string line = event_line(name, data, when);
    for (const auto& weak : listener_->sessions)
        if (const auto session = weak.lock(); session && session->subscribed)
            session->send(line);
}

}  // namespace lkvm
