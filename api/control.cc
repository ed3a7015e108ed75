#include "api/control.h"

#include "base/hex.h"

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
#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <type_traits>

#include "base/error.h"
#include "base/fd.h"
#include "base/log.h"

namespace lkvm {

namespace {

constexpr std::array<std::pair<ControlVerb, std::string_view>, 6> kVerbs{{
    {ControlVerb::kInfo, "info"},
    {ControlVerb::kStop, "stop"},
    {ControlVerb::kPause, "pause"},
    {ControlVerb::kResume, "resume"},
    {ControlVerb::kStat, "stat"},
    {ControlVerb::kThrottle, "throttle"},
}};
constexpr std::string_view kVerbList = " (verbs: info, stop, pause, resume, stat, throttle)";

bool is_control(char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }
bool has_control(std::string_view text) { return std::ranges::any_of(text, is_control); }
bool is_ascii_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }
// What percent-encoding leaves as it is: nothing that separates items (' '),
// records (';') or keys from values ('='), and no '%'.
bool stays_literal(char c) { return is_ascii_alnum(c) || std::string_view("-._~/:+,@").find(c) != std::string_view::npos; }

std::vector<std::string_view> split(std::string_view text, char separator)
{
    std::vector<std::string_view> items;
    for (;;) {
        const size_t at = text.find(separator);
        items.push_back(text.substr(0, at));
        if (at == std::string_view::npos)
            return items;
        text.remove_prefix(at + 1);
    }
}

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

std::string format_number(auto value)
{
    std::array<char, 64> buffer;
    const auto result = std::to_chars(buffer.data(), buffer.data() + buffer.size(), value);
    return std::string(buffer.data(), result.ptr);
}

// `text` as a whole integer of type T, nothing before or after it; none otherwise.
template <typename T>
std::optional<T> whole_number(std::string_view text)
{
    static_assert(std::is_integral_v<T>, "the payload carries integers only");
    T value{};
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (text.empty() || ec != std::errc() || end != text.data() + text.size())
        return std::nullopt;
    return value;
}

// Read access to one payload record, with errors that say what is wrong.
class RecordReader {
public:
    explicit RecordReader(const PayloadRecord& record) : record_(record) {}

    const std::string* find(std::string_view key) const
    {
        const auto it = std::ranges::find(record_, key, &PayloadRecord::value_type::first);
        return it == record_.end() ? nullptr : &it->second;
    }
    const std::string& text(std::string_view key) const
    {
        if (const std::string* value = find(key))
            return *value;
        throw Error("malformed reply from the guest: no " + std::string(key) + "=");
    }
    template <typename T>
    T number(std::string_view key) const
    {
        if (const auto number = whole_number<T>(text(key)))
            return *number;
        throw Error("malformed reply from the guest: " + std::string(key) + "= is not a number");
    }
    // For a field an older lkvm does not send: none when absent, an error when not a number.
    template <typename T>
    std::optional<T> number_if_present(std::string_view key) const
    {
        if (!find(key))
            return std::nullopt;
        return number<T>(key);
    }

private:
    const PayloadRecord& record_;
};

}  // namespace

std::string_view verb_name(ControlVerb verb)
{
    return std::ranges::find(kVerbs, verb, &decltype(kVerbs)::value_type::first)->second;
}

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

// ---- The protocol.

std::string format_request(const ControlRequest& request)
{
    const std::string argument = request.argument.empty() ? "" : " " + percent_encode(request.argument);
    return std::string(kControlVersion) + " " + std::string(verb_name(request.verb)) + argument + "\n";
}

Result<ControlRequest, std::string> parse_request(std::string_view line)
{
    if (line.size() + 1 > kMaxRequestBytes)
        return fail("request longer than " + std::to_string(kMaxRequestBytes) + " bytes");
    if (line.empty())
        return fail("empty request; send '" + std::string(kControlVersion) + " VERB'" + std::string(kVerbList));
    if (has_control(line))
        return fail(std::string("control characters in the request"));
    const auto words = split(line, ' ');
    if (words[0] != kControlVersion)
        return fail("unsupported protocol version, this lkvm speaks " + std::string(kControlVersion));
    if (std::ranges::any_of(words, &std::string_view::empty))
        return fail(std::string("malformed request: one space between words, none at the ends"));
    if (words.size() < 2)
        return fail("no verb after " + std::string(kControlVersion) + std::string(kVerbList));
    const auto known = std::ranges::find(kVerbs, words[1], &std::pair<ControlVerb, std::string_view>::second);
    if (known == kVerbs.end())
        return fail("unknown verb '" + std::string(words[1]) + "'" + std::string(kVerbList));
    const bool takes_argument = known->first == ControlVerb::kThrottle;
    if (words.size() > (takes_argument ? 3 : 2))
        return fail("unexpected '" + std::string(words[takes_argument ? 3 : 2]) + "' after the " +
                    (takes_argument ? "argument" : "verb"));
    if (!takes_argument)
        return ControlRequest{known->first, {}};
    if (words.size() < 3)
        return fail(std::string("throttle needs what to throttle and how: 'TARGET LIMITS', percent-encoded"));
    try {
        std::string argument = percent_decode(words[2]);
        if (argument.empty() || has_control(argument))
            return fail(std::string("throttle: an empty argument, or control characters in it"));
        return ControlRequest{known->first, std::move(argument)};
    } catch (const Error& e) {
        return fail(std::string(e.what()));
    }
}

std::string format_ok_reply(std::string_view payload)
{
    if (has_control(payload))
        throw Error("internal error: control characters in a reply payload");
    std::string reply = std::string(kControlVersion) + " ok";
    if (!payload.empty())
        reply.append(" ").append(payload);
    return reply + "\n";
}

std::string format_error_reply(std::string_view message)
{
    std::string text(message.substr(0, kMaxRequestBytes));  // a message, not a payload: short is plenty
    std::ranges::replace_if(text, is_control, ' ');
    return std::string(kControlVersion) + " error " + (text.empty() ? "error" : text) + "\n";
}

ControlReply parse_reply(std::string_view line)
{
    for (const auto& [ok, word] : {std::pair{true, " ok"}, std::pair{false, " error"}}) {
        const std::string head = std::string(kControlVersion) + word;
        if (line == head)
            return {ok, ""};
        if (line.starts_with(head + " "))
            return {ok, std::string(line.substr(head.size() + 1))};
    }
    if (line.starts_with("LKVM/") && !line.starts_with(std::string(kControlVersion) + " "))
        throw Error("the guest speaks another protocol version (" + std::string(split(line, ' ')[0]) +
                    "); use the lkvm that started it");
    throw Error("garbled reply from the guest");
}

std::string percent_encode(std::string_view text)
{
    static constexpr char kHex[] = "0123456789ABCDEF";
    std::string out;
    for (const char c : text) {
        if (stays_literal(c)) {
            out += c;
        } else {
            const auto byte = static_cast<unsigned char>(c);
            out += '%';
            out += kHex[byte >> 4];
            out += kHex[byte & 15];
        }
    }
    return out;
}

std::string percent_decode(std::string_view text)
{
    auto hex = hex_digit_value;
    std::string out;
    for (size_t i = 0; i < text.size(); ++i) {
        const char c = text[i];
        if (c == '%') {
            const int h = i + 2 < text.size() ? hex(text[i + 1]) : -1;
            const int l = i + 2 < text.size() ? hex(text[i + 2]) : -1;
            if (h < 0 || l < 0)
                throw Error("malformed reply from the guest: a '%' without two hex digits");
            out += static_cast<char>(h << 4 | l);
            i += 2;
        } else if (stays_literal(c)) {
            out += c;
        } else {
            throw Error("malformed reply from the guest: a value that is not percent-encoded");
        }
    }
    return out;
}

std::string format_records(const std::vector<PayloadRecord>& records)
{
    std::string out;
    for (size_t r = 0; r < records.size(); ++r) {
        if (r)
            out += ';';
        for (size_t i = 0; i < records[r].size(); ++i) {
            if (i)
                out += ' ';
            out += records[r][i].first + "=" + percent_encode(records[r][i].second);
        }
    }
    return out;
}

std::vector<PayloadRecord> parse_records(std::string_view payload)
{
    std::vector<PayloadRecord> records;
    if (payload.empty())
        return records;
    for (const std::string_view text : split(payload, ';')) {
        if (text.empty())
            throw Error("malformed reply from the guest: an empty record");
        PayloadRecord& record = records.emplace_back();
        for (const std::string_view item : split(text, ' ')) {
            const size_t equals = item.find('=');
            const std::string_view key = item.substr(0, equals);
            if (equals == std::string_view::npos || key.empty() ||
                !std::ranges::all_of(key, [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; }))
                throw Error("malformed reply from the guest: an item that is not key=value");
            record.emplace_back(std::string(key), percent_decode(item.substr(equals + 1)));
        }
    }
    return records;
}

std::string format_guest_info(const GuestInfo& info)
{
    PayloadRecord record{{"name", info.name},
                         {"state", info.state},
                         {"pid", format_number(info.pid)},
                         {"vcpus", format_number(info.vcpus)},
                         {"mem_mib", format_number(info.mem_mib)}};
    for (const auto& disk : info.disks)
        record.emplace_back("disk", disk);
    return format_records({record});
}

GuestInfo parse_guest_info(std::string_view payload)
{
    const auto records = parse_records(payload);
    if (records.empty())
        throw Error("malformed reply from the guest: no guest info");
    const RecordReader reader(records[0]);
    GuestInfo info{reader.text("name"), reader.text("state"), reader.number<int>("pid"),
                   reader.number<unsigned>("vcpus"), reader.number<uint64_t>("mem_mib"), {}};
    for (const auto& [key, value] : records[0])
        if (key == "disk")
            info.disks.push_back(value);
    return info;
}

namespace {

// A latency histogram as "BUCKET:COUNT,..." (non-empty buckets, ascending).
std::string format_latency(const LatencyBuckets& buckets)
{
    std::string out;
    for (const auto& [bucket, count] : buckets)
        out += (out.empty() ? "" : ",") + std::to_string(bucket) + ":" + std::to_string(count);
    return out;
}

LatencyBuckets parse_latency(std::string_view text)
{
    LatencyBuckets buckets;
    while (!text.empty()) {
        const size_t comma = std::min(text.find(','), text.size());
        const std::string_view item = text.substr(0, comma);
        const size_t colon = std::min(item.find(':'), item.size());
        const auto bucket = whole_number<uint16_t>(item.substr(0, colon));
        const auto count = whole_number<uint64_t>(item.substr(std::min(colon + 1, item.size())));
        if (colon == item.size() || !bucket || !count || *bucket >= LatencyHistogram::kBuckets || *count == 0 ||
            (!buckets.empty() && *bucket <= buckets.back().first) || comma + 1 == text.size())
            throw Error("malformed reply from the guest: latency= is not a list of BUCKET:COUNT");
        buckets.emplace_back(*bucket, *count);
        text.remove_prefix(std::min(comma + 1, text.size()));
    }
    return buckets;
}

}  // namespace

std::string format_stat_payload(const StatSnapshot& snapshot)
{
    std::vector<PayloadRecord> records{{{"time_ns", format_number(snapshot.time_ns)}}};
    if (!snapshot.state.empty())
        records[0].emplace_back("state", snapshot.state);
    for (const auto& t : snapshot.threads)
        records.push_back({{"thread", t.name},
                           {"tid", format_number(t.tid)},
                           {"cpu", format_number(t.cpu)},
                           {"requests", format_number(t.requests)},
                           {"bytes", format_number(t.bytes)},
                           {"batches", format_number(t.batches)},
                           {"wakeups", format_number(t.wakeups)},
                           {"poll_hits", format_number(t.poll_hits)},
                           {"poll_ns", format_number(t.poll_ns)}});
    for (const auto& q : snapshot.queues)
        records.push_back({{"disk", format_number(q.disk)},
                           {"queue", format_number(q.queue)},
                           {"thread", q.thread},
                           {"image", q.image},
                           {"cpu", format_number(q.cpu)},
                           {"requests", format_number(q.requests)},
                           {"bytes", format_number(q.bytes)},
                           {"in_flight", format_number(q.in_flight)},
                           {"latency", format_latency(q.latency)},
                           {"kicks", format_number(q.kicks)},
                           {"interrupts", format_number(q.interrupts)},
                           {"errors", format_number(q.errors)},
                           {"throttled_ns", format_number(q.throttled_ns)},
                           {"flushes", format_number(q.flushes)}});
    for (const auto& v : snapshot.vcpus) {
        PayloadRecord& record = records.emplace_back(PayloadRecord{{"vcpu", format_number(v.index)}});
        for (size_t i = 0; i < kVcpuCounterNames.size(); ++i)
            if (v.counters[i])  // a counter this kernel lacks is left out
                record.emplace_back(kVcpuCounterNames[i], format_number(*v.counters[i]));
    }
    return format_records(records);
}

StatSnapshot parse_stat_payload(std::string_view payload)
{
    const auto records = parse_records(payload);
    if (records.empty() || records[0].empty() || records[0][0].first != "time_ns")
        throw Error("malformed reply from the guest: statistics without time_ns= first");
    StatSnapshot snapshot;
    snapshot.time_ns = RecordReader(records[0]).number<uint64_t>("time_ns");
    for (const auto& [key, value] : records[0])
        if (key == "state")
            snapshot.state = value;
    for (size_t i = 1; i < records.size(); ++i) {
        const RecordReader r(records[i]);
        const std::string& kind = records[i][0].first;  // a record is named by its first key
        if (kind == "thread")
            snapshot.threads.push_back({r.text("thread"), r.number<int>("tid"), r.number<int>("cpu"),
                                        r.number<uint64_t>("requests"), r.number<uint64_t>("bytes"),
                                        r.number<uint64_t>("batches"), r.number<uint64_t>("wakeups"),
                                        r.number<uint64_t>("poll_hits"), r.number<uint64_t>("poll_ns"), {}});
        else if (kind == "disk")
            snapshot.queues.push_back({r.number<unsigned>("disk"), r.number<unsigned>("queue"), r.text("thread"),
                                       r.text("image"), r.number<int>("cpu"), r.number<uint64_t>("requests"),
                                       r.number<uint64_t>("bytes"), r.number<uint64_t>("in_flight"),
                                       parse_latency(r.text("latency")),
                                       r.number_if_present<uint64_t>("kicks").value_or(0),
                                       r.number_if_present<uint64_t>("interrupts").value_or(0),
                                       r.number_if_present<uint64_t>("errors").value_or(0),
                                       r.number_if_present<uint64_t>("throttled_ns").value_or(0),
                                       r.number_if_present<uint64_t>("flushes").value_or(0)});
        else if (kind == "vcpu") {
            StatSnapshot::Vcpu& vcpu = snapshot.vcpus.emplace_back();
            vcpu.index = r.number<unsigned>("vcpu");
            for (size_t c = 0; c < kVcpuCounterNames.size(); ++c)
                vcpu.counters[c] = r.number_if_present<uint64_t>(kVcpuCounterNames[c]);
        }
        // Other kinds come from a newer lkvm: skipped.
    }
    return snapshot;
}

// ---- The server.

using UnixSocket = boost::asio::local::stream_protocol::socket;

struct ControlServer::Listener : std::enable_shared_from_this<Listener> {
    Listener(boost::asio::io_context& io, Handler handler) : acceptor(io), handler(std::move(handler)) {}

    void accept_next();
    std::string answer(std::string_view line) const;

    boost::asio::local::stream_protocol::acceptor acceptor;
    Handler handler;  // emptied by ~ControlServer: nothing calls it after that
    std::vector<std::weak_ptr<Session>> sessions;
    bool stopped = false;
    std::string path;
    dev_t device = 0;  // the socket file's, so that ~ControlServer removes ours and no other
    ino_t inode = 0;
};

// One client connection: reads request lines, answers each in order.
struct ControlServer::Session : std::enable_shared_from_this<Session> {
    Session(UnixSocket connected, std::shared_ptr<Listener> owner)
        : socket(std::move(connected)), listener(std::move(owner))
    {
        // For send()'s write at once; asio's own operations work either way.
        boost::system::error_code ignored;
        socket.non_blocking(true, ignored);
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
        if (listener->stopped)
            return;
        if (error == boost::asio::error::not_found)  // 4096 bytes and no '\n'
            return send(format_error_reply("request longer than " + std::to_string(kMaxRequestBytes) + " bytes"),
                        true);
        if (error)
            return;  // the client hung up (or we were closed): the session ends here
        const std::string line = input.substr(0, length - 1);
        input.erase(0, length);
        send(listener->answer(line), false);
    }

    void send(std::string reply, bool then_close)
    {
        output = std::move(reply);
        // Written at once when the socket takes it, as it does for all but
        // huge replies: a `stop` whose handler ends the loop still gets its
        // reply out.
        boost::system::error_code error;
        const size_t written = socket.write_some(boost::asio::buffer(output), error);
        if (error && error != boost::asio::error::would_block)
            return;
        if (written == output.size())
            return sent(then_close);
        boost::asio::async_write(socket, boost::asio::buffer(output.data() + written, output.size() - written),
                                 [self = shared_from_this(), then_close](const boost::system::error_code& e, size_t) {
                                     if (!e && !self->listener->stopped)
                                         self->sent(then_close);
                                 });
    }

    void sent(bool then_close)
    {
        if (then_close) {
            boost::system::error_code ignored;
            socket.close(ignored);
            return;
        }
        read_request();
    }

    UnixSocket socket;
    std::shared_ptr<Listener> listener;
    std::string input, output;
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
            session->read_request();
        }
        self->accept_next();
    });
}

std::string ControlServer::Listener::answer(std::string_view line) const
{
    const auto request = parse_request(line);
    if (!request)
        return format_error_reply(request.error());
    try {
        std::string reply = format_ok_reply(handler(request.value()));
        if (reply.size() > kMaxReplyBytes)
            return format_error_reply("the reply would be longer than " + std::to_string(kMaxReplyBytes) + " bytes");
        return reply;
    } catch (const std::exception& e) {
        // lkvm::Error is the handler's way to refuse; anything else is a bug,
        // and neither ends the guest.
        return format_error_reply(e.what());
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
            session->socket.close(ignored);
    // Only the file we made: if someone removed it and another guest took the
    // name since, that guest's socket stays.
    struct stat st {};
    if (::lstat(listener_->path.c_str(), &st) == 0 && st.st_dev == listener_->device && st.st_ino == listener_->inode)
        ::unlink(listener_->path.c_str());
}

const std::string& ControlServer::path() const { return listener_->path; }

}  // namespace lkvm
