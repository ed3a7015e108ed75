// The control socket: the JSON protocol, socket paths, a real server on a
// temporary directory, and the client commands against it.
#include <doctest/doctest.h>

#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <thread>

#include "api/control.h"
#include "api/machine_control.h"
#include "api/protocol.h"
#include "base/error.h"
#include "base/fd.h"
#include "cli/command_line.h"
#include "cli/control_client.h"
#include "cli/stat_tables.h"
#include "tests/unit/test_util.h"

using namespace lkvm;
using lkvm::test::TempDir;

using lkvm::test::error_of;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// The error a line gets as a request: "CLASS: desc".
std::string request_error(std::string_view line)
{
    const auto request = parse_request(line);
    if (request)
        return "(no error)";
    return std::string(error_class_name(request.error().error_class)) + ": " + request.error().desc;
}

// A line of the protocol, parsed back (it must be one JSON object and end in '\n').
Json parsed_line(const std::string& line)
{
    REQUIRE(line.ends_with('\n'));
    REQUIRE(std::count(line.begin(), line.end(), '\n') == 1);
    return Json::parse(line);
}

mode_t mode_of(const std::string& path)
{
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    return st.st_mode & 07777;
}

// A socket file nobody listens on, as a killed lkvm leaves behind.
void make_stale_socket(const std::string& path)
{
    const Fd fd(::socket(AF_UNIX, SOCK_STREAM, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    path.copy(address.sun_path, sizeof(address.sun_path) - 1);
    REQUIRE(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
}


StatSnapshot sample_snapshot()
{
    StatSnapshot s;
    s.time_ns = 123456789012345;
    s.threads = {{"iothread0", 4242, 1, 2, 1000, 4096000, 300, 10, 30, 32768, {}},
                 {"disk1-io", 4243, -1, -1, 0, 0, 0, 0, 0, 0, {}}};
    // Bucket 90 holds 10240-11263 ns, 113 holds 73728-81919 ns, 327 is the last one.
    s.queues = {{0, 0, "iothread0", "/tmp/my disk;1=2%.raw", 1, 600, 2457600, 3, {{90, 590}, {113, 10}}, 300, 200, 2, 750'000'000, 5},
                {0, 1, "iothread0", "/tmp/my disk;1=2%.raw", 1, 400, 1638400, 0, {{0, 1}, {327, 399}}, 400, 400, 0},
                {1, 0, "disk1-io", "b.raw", -1, 0, 0, 0, {}, 0, 0, 0}};
    // vCPU 1's kernel lacks mmio_exits and insn_emulation.
    s.vcpus = {{0, {9000, 100, 2000, 500, 300, 50, 7, 1200, 2100}},
               {1, {1000, 10, std::nullopt, 50, 30, 5, 0, 120, std::nullopt}}};
    return s;
}

// A guest's side of the socket: a ControlServer on its own loop thread, as
// the machine runs it. Stops the loop before the server goes.
struct ServedGuest {
    boost::asio::io_context io{1};
    std::optional<ControlServer> server;
    std::thread loop;

    ServedGuest(const std::string& dir, const std::string& name, ControlServer::Handler handler)
    {
        server.emplace(io, dir, name, std::move(handler));
        loop = std::thread([this] { io.run(); });
    }
    ~ServedGuest() { stop(); }
    // Runs fn on the loop thread and waits for it: the server is the loop's.
    void on_loop(std::function<void()> fn)
    {
        std::promise<void> done;
        boost::asio::post(io, [&] {
            fn();
            done.set_value();
        });
        done.get_future().wait();
    }
    void stop()
    {
        if (loop.joinable()) {
            io.stop();
            loop.join();
        }
        server.reset();
    }
};

// What a test guest answers; remembers the last command and the thread it ran on.
struct FakeGuest {
    std::string name;
    std::atomic<MachineCommand::Kind> last{};
    std::atomic<int> commands{0};
    std::atomic<std::thread::id> thread{};
    std::atomic<uint64_t> stat_calls{0};
    std::string last_target{};
    ThrottleLimits last_limits{};

    Json operator()(const ControlRequest& request)
    {
        ++commands;
        const MachineCommand command = parse_machine_command(request);
        last = command.kind;
        thread = std::this_thread::get_id();
        switch (command.kind) {
        case MachineCommand::Kind::kInfo:
            return GuestInfo{name, "running", 4242, 2, 512, {"a.raw", "b c.raw"}};
        case MachineCommand::Kind::kPause:
            throw Error("the guest is paused already");
        case MachineCommand::Kind::kThrottle:
            last_target = command.target;
            last_limits = command.limits;
            return {{"group", command.target}};
        case MachineCommand::Kind::kStat: {
            // Each sample one second and 100 requests of 4 KiB after the last.
            const uint64_t n = stat_calls++;
            StatSnapshot s;
            s.time_ns = (n + 1) * 1'000'000'000;
            // Of each 100, 90 took 10.24-11.26 us (bucket 90), 10 took 73.7-81.9 us (bucket 113).
            s.threads = {{"iothread0", 77, 0, -1, 100 * n, 409600 * n, n, 3 * n, n, 500, {}}};
            s.queues = {{0, 0, "iothread0", "a.raw", 0, 100 * n, 409600 * n, 1,
                         n ? LatencyBuckets{{90, 90 * n}, {113, 10 * n}} : LatencyBuckets{}, 50 * n, 25 * n}};
            // 150 exits a second, of which 40 for I/O; no instruction emulation counter.
            s.vcpus = {{0, {150 * n, 40 * n, 0, 60 * n, 20 * n, 5 * n, 0, 30 * n, std::nullopt}}};
            return s;
        }
        default:
            return Json::object();
        }
    }
};

ControlServer::Handler handler_of(FakeGuest& guest)
{
    return [&guest](const ControlRequest& request) { return guest(request); };
}

std::string run_and_capture(const Command& command, const std::string& dir, int& status)
{
    std::FILE* out = std::tmpfile();
    REQUIRE(out);
    try {
        status = run_control_command(command, dir, out);
    } catch (...) {
        std::fclose(out);
        throw;
    }
    std::rewind(out);
    std::string text;
    for (int c; (c = std::fgetc(out)) != EOF;)
        text += static_cast<char>(c);
    std::fclose(out);
    return text;
}

// A raw client that speaks the protocol by hand, with a receive timeout.
struct RawClient {
    Fd fd;
    std::string received;

    explicit RawClient(const std::string& path) : fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0))
    {
        const timeval limit{5, 0};
        ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
        sockaddr_un address{};
        address.sun_family = AF_UNIX;
        path.copy(address.sun_path, sizeof(address.sun_path) - 1);
        REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
    }
    void send(std::string_view bytes) { REQUIRE(::send(fd.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) == ssize_t(bytes.size())); }
    // The next line, or "" at end of file.
    std::string line()
    {
        for (;;) {
            if (const size_t end = received.find('\n'); end != std::string::npos) {
                std::string line = received.substr(0, end);
                received.erase(0, end + 1);
                return line;
            }
            char buffer[65536];
            const ssize_t got = ::recv(fd.get(), buffer, sizeof(buffer), 0);
            // A server that closes with our bytes unread resets the connection.
            if (got == 0 || (got < 0 && errno == ECONNRESET))
                return "";
            REQUIRE(got > 0);
            received.append(buffer, size_t(got));
        }
    }
    Json json() { return Json::parse(line()); }
};

}  // namespace

TEST_CASE("control protocol: requests, with arguments and an id")
{
    const auto stat = parse_request(R"({"execute": "stat"})");
    REQUIRE(stat.ok());
    CHECK(stat->command == "stat");
    CHECK(stat->arguments == Json::object());
    CHECK_FALSE(stat->id);
    const auto throttle = parse_request(R"({"id": {"n": [1, 2]}, "execute": "throttle", "arguments": {"target": "0"}})");
    REQUIRE(throttle.ok());
    CHECK(throttle->arguments == Json{{"target", "0"}});
    CHECK(throttle->id == Json{{"n", {1, 2}}});
    CHECK(parse_request(R"({"execute": "info", "id": null})")->id == Json(nullptr));  // given, so echoed
    CHECK(parse_request(request_line("throttle", {{"target", 0}})).value().arguments["target"] == 0);
    CHECK(request_line("stat") == "{\"execute\":\"stat\"}\n");
}

TEST_CASE("control protocol: hostile and malformed requests each get an error of their own")
{
    CHECK(contains(request_error(""), "GenericError: JSON parse error"));
    CHECK(contains(request_error("{\"execute\": \"st"), "GenericError: JSON parse error"));      // truncated
    CHECK(contains(request_error("{\"execute\": \"stat\"} {}"), "GenericError: JSON parse error"));  // two texts
    CHECK(contains(request_error("HELLO there"), "GenericError: JSON parse error"));
    // A number no double holds: the fuzzer found it threw out_of_range, past the parse_error catch.
    CHECK(request_error("3e233332-2-332e") == "GenericError: JSON parse error: number overflow parsing '3e233332'");
    CHECK(contains(request_error("{\"execute\": \"stat\", \"id\": 1e400}"), "GenericError: JSON parse error: number overflow"));
    CHECK(contains(request_error("{\"execute\": \"\xff\xfe\"}"), "GenericError: JSON parse error"));  // not UTF-8
    CHECK(contains(request_error("{\"execute\": \"\xc0\xaf\"}"), "GenericError: JSON parse error"));  // overlong '/'
    CHECK(request_error("[\"execute\", \"stat\"]") == "GenericError: a request is a JSON object: {\"execute\": \"COMMAND\"}");
    CHECK(request_error("\"stat\"") == "GenericError: a request is a JSON object: {\"execute\": \"COMMAND\"}");
    CHECK(request_error("{}") == "GenericError: the request lacks member 'execute'");
    CHECK(request_error("{\"execute\": 5}") == "GenericError: member 'execute' must be a string");
    CHECK(request_error("{\"execute\": \"stat\", \"arguments\": []}") == "GenericError: member 'arguments' must be an object");
    CHECK(request_error("{\"execute\": \"stat\", \"argument\": {}}") ==
          "GenericError: member 'argument' is unexpected in a request (execute, arguments, id)");

    // Nesting: 8 levels of arrays and objects parse, 9 do not, and neither do 100000.
    const auto nested = [](int depth) { return std::string(depth, '[') + std::string(depth, ']'); };
    CHECK(parse_json(nested(8), kMaxJsonDepth).ok());
    CHECK(parse_json(nested(9), kMaxJsonDepth).error() == "JSON nested deeper than 8 levels");
    CHECK(parse_json(nested(100000), kMaxJsonDepth).error() == "JSON nested deeper than 8 levels");
    CHECK(request_error("{\"execute\": \"stat\", \"arguments\": {\"a\": " + nested(7) + "}}") ==
          "GenericError: JSON nested deeper than 8 levels");
    CHECK(parse_json("{\"a\": [[1]]}", 3).ok());  // a scalar is no level

    // The id of a request that failed after it was read is echoed.
    const auto failed = parse_request("{\"id\": 42, \"execute\": 5}");
    REQUIRE_FALSE(failed.ok());
    CHECK(failed.error().id == Json(42));
    CHECK(parsed_line(error_line(failed.error())) ==
          Json{{"error", {{"class", "GenericError"}, {"desc", "member 'execute' must be a string"}}}, {"id", 42}});
}

TEST_CASE("control protocol: every line is one JSON object, even from text that is not UTF-8")
{
    const Json greeting = parsed_line(greeting_line());
    CHECK(greeting["lkvm"]["version"] == kVersion);
    CHECK(greeting["lkvm"]["capabilities"] == Json::array({"events"}));
    CHECK(return_line(Json::object(), std::nullopt) == "{\"return\":{}}\n");
    CHECK(return_line({{"a", 1}}, Json("x")) == "{\"return\":{\"a\":1},\"id\":\"x\"}\n");
    CHECK(error_line({ControlErrorClass::kCommandNotFound, "no", std::nullopt}) ==
          "{\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"no\"}}\n");
    const Json event = parsed_line(event_line("paused", {{"reason", "x"}}, std::chrono::system_clock::time_point(
                                                                              std::chrono::microseconds(1'700'000'000'123'456))));
    CHECK(event == Json{{"event", "paused"},
                        {"timestamp", {{"seconds", 1'700'000'000}, {"microseconds", 123'456}}},
                        {"data", {{"reason", "x"}}}});

    // A disk path may hold any bytes; the line is still UTF-8 JSON, and dump() never throws.
    const std::string line = json_line({{"path", "/tmp/\xff" "a\xc3\xa9\n\x01"}});
    CHECK(line == "{\"path\":\"/tmp/\xef\xbf\xbd" "a\xc3\xa9\\n\\u0001\"}\n");
    CHECK(parsed_line(return_line(GuestInfo{"g", "running", 1, 1, 64, {"\xfe.raw"}}, std::nullopt))["return"]["disks"][0] ==
          "\xef\xbf\xbd.raw");
}

TEST_CASE("control protocol: what a client reads: greeting, return, error, event, or a garbled line")
{
    CHECK(parse_server_line(greeting_line().substr(0, greeting_line().size() - 1)).kind == ServerLine::Kind::kGreeting);
    const ServerLine value = parse_server_line("{\"return\": {\"a\": 1}, \"id\": 3}");
    CHECK(value.kind == ServerLine::Kind::kReturn);
    CHECK(value.body == Json{{"a", 1}});
    const ServerLine error = parse_server_line("{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such thing\"}}");
    CHECK(error.kind == ServerLine::Kind::kError);
    CHECK(error.error == "no such thing");
    CHECK(parse_server_line("{\"event\": \"paused\", \"data\": {}}").kind == ServerLine::Kind::kEvent);
    for (const std::string& bad : std::vector<std::string>{"", "hello", "LKVM/1 ok", "[]", "{}", "{\"error\": 5}", "{\"error\": {\"desc\": 5}}",
                                  "{\"lkvm\": 1}", std::string(20, '[')})
        CHECK_MESSAGE(contains(error_of([&] { parse_server_line(bad); }), "garbled"), bad);
}

TEST_CASE("control protocol: guest info round-trips; missing and broken members are refused")
{
    const GuestInfo info{"web-1.test", "paused", 31337, 4, 2048, {"/images/a b.raw", "c;d=e.raw"}};
    CHECK(guest_info_from_json(Json(info)) == info);
    const GuestInfo no_disks{"g", "running", 1, 1, 64, {}};
    CHECK(guest_info_from_json(Json(no_disks)) == no_disks);
    Json newer = no_disks;
    newer["future"] = {1, 2};  // members a newer lkvm may add are skipped
    CHECK(guest_info_from_json(newer) == no_disks);

    const auto problem = [&](auto change) {
        Json json = info;
        change(json);
        return error_of([&] { guest_info_from_json(json); });
    };
    CHECK(problem([](Json& j) { j.erase("pid"); }) == "malformed reply from the guest: no \"pid\"");
    CHECK(problem([](Json& j) { j["pid"] = "1"; }) == "malformed reply from the guest: \"pid\" is not an integer that fits");
    CHECK(problem([](Json& j) { j["pid"] = 1ULL << 40; }) == "malformed reply from the guest: \"pid\" is not an integer that fits");
    CHECK(problem([](Json& j) { j["vcpus"] = -1; }) == "malformed reply from the guest: \"vcpus\" is not an integer that fits");
    CHECK(problem([](Json& j) { j["mem_mib"] = 1.5; }) == "malformed reply from the guest: \"mem_mib\" is not an integer that fits");
    CHECK(problem([](Json& j) { j["name"] = nullptr; }) == "malformed reply from the guest: \"name\" is not a string");
    CHECK(problem([](Json& j) { j["disks"] = "a.raw"; }) == "malformed reply from the guest: \"disks\" is not an array");
    CHECK(problem([](Json& j) { j["disks"] = {1}; }) == "malformed reply from the guest: a disk is not a string");
    CHECK(problem([](Json& j) { j = Json::array(); }) == "malformed reply from the guest: the guest info is not a JSON object");
}

TEST_CASE("control protocol: stat snapshots round-trip; malformed ones are refused")
{
    StatSnapshot snapshot = sample_snapshot();
    snapshot.threads[0].latency = {{90, 3}, {100, 1}};
    CHECK(stat_from_json(Json(snapshot)) == snapshot);
    StatSnapshot paused = snapshot;
    paused.state = "paused (io-error: disk a.raw write error (No space left on device))";
    CHECK(stat_from_json(Json::parse(json_line(paused))) == paused);
    CHECK(format_stat_tables(paused, paused, {}).starts_with("guest paused (io-error: disk a.raw write error (No space left on device))\n"));
    // Counters the kernel lacks are left out, and read back as none.
    const Json vcpu1 = Json(snapshot)["vcpus"][1];
    CHECK_FALSE(vcpu1.contains("mmio_exits"));
    CHECK(vcpu1["exits"] == 1000);
    CHECK(Json(snapshot)["queues"][0]["latency"] == Json::parse("[[90, 590], [113, 10]]"));

    const auto problem = [&](auto change) {
        Json json = snapshot;
        change(json);
        return error_of([&] { stat_from_json(json); });
    };
    CHECK(problem([](Json& j) { j.erase("time_ns"); }) == "malformed reply from the guest: no \"time_ns\"");
    CHECK(problem([](Json& j) { j["queues"][0].erase("thread"); }) == "malformed reply from the guest: no \"thread\"");
    CHECK(problem([](Json& j) { j["threads"][0]["cpu"] = "1"; }) == "malformed reply from the guest: \"cpu\" is not an integer that fits");
    CHECK(problem([](Json& j) { j["queues"] = Json::object(); }) == "malformed reply from the guest: \"queues\" is not an array");
    CHECK(problem([](Json& j) { j["vcpus"][0]["exits"] = -1; }) == "malformed reply from the guest: \"exits\" is not an integer that fits");
    CHECK(problem([](Json& j) { j["state"] = 5; }) == "malformed reply from the guest: \"state\" is not a string");
    for (const std::string bad : {"5", "[5]", "[[5]]", "[[5, 1, 2]]", "[[5, 1], [5, 1]]", "[[7, 1], [5, 1]]", "[[5, 0]]",
                                  "[[328, 1]]", "[[70000, 1]]", "[[-1, 1]]", "[[5, \"x\"]]"})
        CHECK_MESSAGE(contains(problem([&](Json& j) { j["queues"][0]["latency"] = Json::parse(bad); }),
                               "\"latency\" is not"),
                      bad);
}

TEST_CASE("control: guest names become file names, so only safe ones are taken")
{
    for (const std::string& good : std::vector<std::string>{"g", "web-1", "a.b_c", "0", std::string(64, 'x')})
        CHECK_MESSAGE(guest_name_problem(good).empty(), good);
    CHECK(guest_name_problem("") == "a guest name cannot be empty");
    CHECK(guest_name_problem(std::string(65, 'x')) == "a guest name is at most 64 characters");
    CHECK(guest_name_problem(".hidden") == "a guest name cannot start with '.' or '-'");
    CHECK(guest_name_problem("-x") == "a guest name cannot start with '.' or '-'");
    for (const std::string bad : {"a/b", "..", "a b", "a;b", "é", "a\nb", "a*"})
        CHECK_MESSAGE(!guest_name_problem(bad).empty(), bad);
    CHECK(default_guest_name() == "guest-" + std::to_string(::getpid()));
}

TEST_CASE("control: the socket directory: XDG_RUNTIME_DIR when usable, else the home directory")
{
    TempDir tmp;
    const std::string runtime = tmp.path.string();
    CHECK(control_dir(runtime.c_str(), "/home/u") == runtime + "/lkvm/");
    CHECK(control_dir((runtime + "/").c_str(), "/home/u") == runtime + "/lkvm/");
    CHECK(control_dir(nullptr, "/home/u") == "/home/u/.lkvm/");
    CHECK(control_dir("", "/home/u/") == "/home/u/.lkvm/");
    CHECK(control_dir("run/user/1000", "/home/u") == "/home/u/.lkvm/");  // relative: not used
    CHECK(control_dir((runtime + "/missing").c_str(), "/home/u") == "/home/u/.lkvm/");
    const std::string file = tmp.file("not-a-dir", 1);
    CHECK(control_dir(file.c_str(), "/home/u") == "/home/u/.lkvm/");

    // No HOME: the passwd entry's home.
    const passwd* entry = ::getpwuid(::geteuid());
    if (entry && entry->pw_dir && entry->pw_dir[0] == '/')
        CHECK(control_dir(nullptr, nullptr) == std::string(entry->pw_dir) + (std::string(entry->pw_dir) == "/" ? ".lkvm/" : "/.lkvm/"));
    CHECK(contains(error_of([] { control_dir(nullptr, "relative/home"); }), "set XDG_RUNTIME_DIR or HOME"));
}

TEST_CASE("control: socket paths are DIR/NAME.sock, and too long or badly named ones are refused")
{
    CHECK(control_socket_path("/run/user/1000/lkvm/", "g") == "/run/user/1000/lkvm/g.sock");
    CHECK(control_socket_path("/run/user/1000/lkvm", "g") == "/run/user/1000/lkvm/g.sock");
    CHECK(control_socket_path("/d/", std::string(64, 'n')).size() == 3 + 64 + 5);
    const std::string long_dir = "/" + std::string(60, 'd') + "/";
    CHECK(contains(error_of([&] { control_socket_path(long_dir, std::string(50, 'n')); }),
                   "more than the 107 a unix socket takes; use a shorter --name, or set XDG_RUNTIME_DIR"));
    CHECK(control_socket_path(long_dir, std::string(40, 'n')).size() == 107);  // the longest that fits
    CHECK(contains(error_of([] { control_socket_path("/d/", "../x"); }), "'../x' is not a guest name"));
    CHECK(contains(error_of([] { control_socket_path("/d/", ""); }), "cannot be empty"));
}

TEST_CASE("control: the socket directory is made 0700, and an unsafe one is refused")
{
    TempDir tmp;
    const std::string dir = (tmp.path / "lkvm").string() + "/";
    ensure_control_dir(dir);
    CHECK(mode_of(tmp.path / "lkvm") == 0700);
    ensure_control_dir(dir);  // already there: fine

    const std::string file = tmp.file("plain", 1);
    CHECK(contains(error_of([&] { ensure_control_dir(file + "/"); }), "is not a directory; remove it"));
    std::filesystem::create_directory_symlink(tmp.path / "lkvm", tmp.path / "link");
    CHECK(contains(error_of([&] { ensure_control_dir((tmp.path / "link").string() + "/"); }), "is not a directory"));
    const auto open_dir = tmp.path / "open";
    std::filesystem::create_directory(open_dir);
    ::chmod(open_dir.c_str(), 0777);
    CHECK(contains(error_of([&] { ensure_control_dir(open_dir.string()); }), "is writable by others; chmod 700"));
    CHECK(contains(error_of([&] { ensure_control_dir((tmp.path / "no/such/dir").string()); }),
                   "cannot create the control socket directory"));
}

TEST_CASE("control commands: what a request asks the machine, its arguments checked")
{
    const auto command = [](const std::string& line) { return parse_machine_command(parse_request(line).value()); };
    const auto refusal = [&](const std::string& line) {
        try {
            command(line);
        } catch (const ControlError& e) {
            return std::string(error_class_name(e.error_class())) + ": " + e.what();
        } catch (const Error& e) {
            return std::string("GenericError: ") + e.what();
        }
        return std::string("(no error)");
    };
    CHECK(command(R"({"execute": "info"})").kind == MachineCommand::Kind::kInfo);
    CHECK(command(R"({"execute": "stop"})").kind == MachineCommand::Kind::kStop);
    const MachineCommand throttle =
        command(R"({"execute": "throttle", "arguments": {"target": "/tmp/a b.raw", "limits": {"iops": 500, "bps-wr": 100, "bps-wr-max": 900}}})");
    CHECK(throttle.kind == MachineCommand::Kind::kThrottle);
    CHECK(throttle.target == "/tmp/a b.raw");
    CHECK(throttle.limits[ThrottleBucket::kIopsTotal].avg == 500);
    CHECK(throttle.limits[ThrottleBucket::kBpsWrite].max == 900);
    CHECK(command(R"({"execute": "throttle", "arguments": {"target": 1, "limits": {}}})").target == "1");

    CHECK(refusal(R"({"execute": "fly"})") ==
          "CommandNotFound: the command fly has not been found (commands: info, stat, pause, resume, stop, throttle, subscribe)");
    CHECK(refusal(R"({"execute": "stat", "arguments": {"now": 1}})") == "GenericError: parameter 'now' is unexpected: stat takes no arguments");
    CHECK(contains(refusal(R"({"execute": "throttle"})"), "throttle needs 'target'"));
    CHECK(contains(refusal(R"({"execute": "throttle", "arguments": {"target": -1, "limits": {}}})"), "throttle needs 'target'"));
    CHECK(contains(refusal(R"({"execute": "throttle", "arguments": {"target": "0"}})"), "throttle needs 'limits'"));
    CHECK(contains(refusal(R"({"execute": "throttle", "arguments": {"target": "0", "limits": [1]}})"), "throttle needs 'limits'"));
    CHECK(refusal(R"({"execute": "throttle", "arguments": {"target": "0", "limits": {"iops": "5"}}})") ==
          "GenericError: throttle: limit 'iops' must be a whole number (0: none)");
    CHECK(refusal(R"({"execute": "throttle", "arguments": {"target": "0", "limits": {"iops": 1.5}}})") ==
          "GenericError: throttle: limit 'iops' must be a whole number (0: none)");
    CHECK(refusal(R"({"execute": "throttle", "arguments": {"target": "0", "limits": {"iops=1,bps": 5}}})") ==
          "GenericError: throttle: 'iops=1,bps' is not a limit");
    CHECK(contains(refusal(R"({"execute": "throttle", "arguments": {"target": "0", "limits": {"speed": 5}}})"),
                   "'speed=5' is not a limit"));
    CHECK(contains(refusal(R"({"execute": "throttle", "arguments": {"target": "0", "limits": {}, "x": 1}})"),
                   "parameter 'x' is unexpected"));

    CHECK(throttle_limits_json("iops=500,bps-wr=1048576") == Json{{"iops", 500}, {"bps-wr", 1048576}});
}

TEST_CASE("control commands: the machine's events as the protocol names them")
{
    using Kind = MachineEvent::Kind;
    CHECK(event_name({Kind::kPaused, ""}) == "paused");
    CHECK(event_data({Kind::kPaused, ""}) == Json::object());
    CHECK(event_data({Kind::kPaused, "io-error"}) == Json{{"reason", "io-error"}});
    CHECK(event_name({Kind::kResumed, ""}) == "resumed");
    CHECK(event_name({Kind::kIoError, "disk a.raw write error"}) == "io-error");
    CHECK(event_data({Kind::kIoError, "disk a.raw write error"}) == Json{{"reason", "disk a.raw write error"}});
    CHECK(event_name({Kind::kShutdown, "", 3}) == "shutdown");
    CHECK(event_data({Kind::kShutdown, "", 3}) == Json{{"exit_status", 3}});
}

TEST_CASE("control server: the socket is 0600, greets, answers on the loop thread, and goes with the server")
{
    TempDir tmp;
    const std::string dir = tmp.path.string() + "/lkvm/";
    FakeGuest guest{"g"};
    auto served = std::make_unique<ServedGuest>(dir, "g", handler_of(guest));
    const std::string path = served->server->path();
    CHECK(path == dir + "g.sock");
    CHECK(mode_of(path) == 0600);
    CHECK(mode_of(tmp.path / "lkvm") == 0700);

    auto client = ControlConnection::open(dir, "g");
    REQUIRE(client);
    CHECK(client->greeting()["version"] == kVersion);
    CHECK(guest_info_from_json(client->execute("info")).disks == std::vector<std::string>{"a.raw", "b c.raw"});
    CHECK(guest.thread.load() == served->loop.get_id());
    // Several requests on one connection, and an error reply keeps it open.
    CHECK(error_of([&] { client->execute("pause"); }) == "guest g: the guest is paused already");
    CHECK(client->execute("resume") == Json::object());
    CHECK(guest.last == MachineCommand::Kind::kResume);
    CHECK(client->execute("throttle", {{"target", "/tmp/a b.raw"}, {"limits", {{"iops", 5}}}}) == Json{{"group", "/tmp/a b.raw"}});
    CHECK(guest.last_target == "/tmp/a b.raw");
    CHECK(guest.last_limits[ThrottleBucket::kIopsTotal].avg == 5);

    served.reset();
    CHECK_FALSE(std::filesystem::exists(std::filesystem::symlink_status(path)));
    CHECK_FALSE(ControlConnection::open(dir, "g"));
}

TEST_CASE("control server: hostile and bogus requests get error replies; the connection and the guest go on")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));
    RawClient client(served.server->path());
    CHECK(client.json().contains("lkvm"));

    const auto error_class = [&](std::string_view request) {
        client.send(request);
        const Json reply = client.json();
        return reply.contains("error") ? reply["error"]["class"].get<std::string>() : reply.dump();
    };
    CHECK(error_class("{\"execute\": \"fly\", \"id\": 1}\n") == "CommandNotFound");
    CHECK(error_class("not json\n") == "GenericError");
    CHECK(error_class("{\"execute\": \"sta\n") == "GenericError");              // truncated
    CHECK(error_class("{\"execute\": \"\xff\"}\n") == "GenericError");          // not UTF-8
    CHECK(error_class(std::string(5000, '[') + "\n") == "GenericError");       // nested too deep
    CHECK(error_class("{\"execute\": [\"stat\"]}\n") == "GenericError");        // a wrong type
    CHECK(error_class("{\"execute\": \"info\", \"id\": -1e999}\n") == "GenericError");  // no double holds it
    CHECK(error_class("{\"execute\": \"throttle\", \"arguments\": {\"target\": 0, \"limits\": {\"iops\": \"x\"}}}\n") ==
          "GenericError");
    CHECK(error_class("\n") == "GenericError");
    CHECK(error_class(std::string("{\"execute\": \"stat\"\0}\n", 21)) == "GenericError");
    CHECK(guest.commands == 2);  // only the two well-formed ones reached the guest, fly and throttle
    // The id comes back, with the error as with the reply.
    client.send("{\"execute\": \"fly\", \"id\": [\"x\", 1]}\n{\"execute\": \"info\", \"id\": \"i\"}\n");
    CHECK(client.json()["id"] == Json::array({"x", 1}));
    const Json info = client.json();
    CHECK(info["id"] == "i");
    CHECK(info["return"]["name"] == "g");
}

TEST_CASE("control server: two clients at once, pipelined requests")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));

    auto first = ControlConnection::open(dir, "g", std::chrono::milliseconds(200));
    auto second = ControlConnection::open(dir, "g");
    REQUIRE(first);
    REQUIRE(second);
    // The first is half-way through a request while the second is served.
    CHECK_THROWS_AS(first->exchange("{\"execute\": \"in"), Error);  // no reply yet: times out
    CHECK(second->execute("info")["name"] == "g");
    CHECK(parse_server_line(first->exchange("fo\"}\n")).body["name"] == "g");

    // Two requests in one write: two replies, in order.
    CHECK(parse_server_line(second->exchange(request_line("info") + request_line("stat"))).body.contains("name"));
    CHECK(parse_server_line(second->exchange("")).body.contains("time_ns"));
}

TEST_CASE("control server: a line over the limit closes only that connection")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));

    RawClient flooder(served.server->path());
    auto bystander = ControlConnection::open(dir, "g");
    REQUIRE(bystander);
    flooder.line();  // the greeting
    flooder.send(std::string(kMaxRequestBytes + 100, ' '));
    CHECK(flooder.json() == Json{{"error", {{"class", "GenericError"}, {"desc", "request longer than 16384 bytes"}}}});
    CHECK(flooder.line().empty());  // closed
    CHECK(bystander->execute("info")["name"] == "g");
    // kMaxRequestBytes - 1 and '\n' is a line still: parsed, and answered.
    RawClient newcomer(served.server->path());
    newcomer.line();
    const std::string request = request_line("info");
    newcomer.send(std::string(kMaxRequestBytes - request.size(), ' ') + request);
    CHECK(newcomer.json()["return"]["name"] == "g");
}

TEST_CASE("control server: handler failures and oversized replies become error replies")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    ServedGuest served(dir, "g", [](const ControlRequest& request) -> Json {
        if (request.command == "stat")
            return std::string(kMaxReplyBytes, 'a');
        if (request.command == "info")
            throw std::runtime_error("a bug");
        throw ControlError(ControlErrorClass::kDeviceNotFound, "no disk 9");
    });
    auto client = ControlConnection::open(dir, "g");
    REQUIRE(client);
    CHECK(parse_server_line(client->exchange(request_line("stat"))).error == "the reply would be longer than 1048576 bytes");
    CHECK(parse_server_line(client->exchange(request_line("info"))).error == "a bug");
    const ServerLine device = parse_server_line(client->exchange(request_line("throttle")));
    CHECK(device.body == Json{{"class", "DeviceNotFound"}, {"desc", "no disk 9"}});
}

TEST_CASE("control server: events reach the subscribed clients only, also after the loop has stopped")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));
    RawClient subscriber(served.server->path()), bystander(served.server->path());
    subscriber.line();
    bystander.line();
    subscriber.send("{\"execute\": \"subscribe\", \"id\": 1}\n");
    CHECK(subscriber.json() == Json{{"return", Json::object()}, {"id", 1}});
    subscriber.send("{\"execute\": \"subscribe\", \"arguments\": {\"all\": true}}\n");
    CHECK(subscriber.json()["error"]["desc"] == "subscribe takes no arguments");

    served.on_loop([&] { served.server->send_event("paused", Json::object()); });
    const Json paused = subscriber.json();
    CHECK(paused["event"] == "paused");
    CHECK(paused["timestamp"]["seconds"] > 0);
    // The bystander gets its reply, and no event before it.
    bystander.send(request_line("info"));
    CHECK(bystander.json().contains("return"));

    // As lkvm ends: the loop has stopped, and the shutdown event still goes out.
    served.io.stop();
    served.loop.join();
    served.server->send_event("shutdown", {{"exit_status", 0}});
    CHECK(subscriber.json()["event"] == "shutdown");
    served.server.reset();
    CHECK(subscriber.line().empty());
}

TEST_CASE("control server: a subscriber that does not read is dropped, and the others are served")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));
    RawClient sleeper(served.server->path());
    int small = 4096;  // the kernel's buffers stay small, so the server's own queue is what fills
    ::setsockopt(sleeper.fd.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    sleeper.line();
    sleeper.send("{\"execute\": \"subscribe\"}\n");
    CHECK(sleeper.json().contains("return"));
    auto other = ControlConnection::open(dir, "g");
    REQUIRE(other);

    // Far more events than the server keeps for one client, sent while it reads none.
    set_log_level(LogLevel::kWarn);  // not the line that says it dropped one
    const Json data{{"reason", std::string(1000, 'x')}};
    const size_t events = 4 * ControlServer::kMaxPendingBytes / 1000;
    served.on_loop([&] {
        for (size_t i = 0; i < events; ++i)
            served.server->send_event("paused", data);
    });
    CHECK(other->execute("info")["name"] == "g");
    // What the sleeper gets is what fitted, then the end: it was dropped.
    size_t received = 0;
    for (std::string line; !(line = sleeper.line()).empty();)
        ++received;
    CHECK(received > 0);
    CHECK(received < events);
    set_log_level(LogLevel::kInfo);
    CHECK(other->execute("info")["name"] == "g");
}

TEST_CASE("control server: a stale socket is replaced, a live name is refused")
{
    TempDir tmp;
    const std::string dir = tmp.path.string() + "/";
    ensure_control_dir(dir);
    make_stale_socket(dir + "g.sock");
    CHECK_FALSE(ControlConnection::open(dir, "g"));  // refused: as good as absent

    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));
    auto client = ControlConnection::open(dir, "g");
    REQUIRE(client);
    CHECK(client->execute("info")["name"] == "g");

    boost::asio::io_context other;
    CHECK(error_of([&] { ControlServer(other, dir, "g", handler_of(guest)); }) ==
          "a guest named g is already running (pid " + std::to_string(::getpid()) + "); pick another --name");
    CHECK(client->execute("info")["name"] == "g");  // the first one is untouched

    tmp.file("h.sock", 1);
    CHECK(contains(error_of([&] { ControlServer(other, dir, "h", handler_of(guest)); }), "is in the way and is not a socket"));
    CHECK(contains(error_of([&] { ControlServer(other, dir, "../h", handler_of(guest)); }), "is not a guest name"));
}

TEST_CASE("control client: a socket that does not greet as lkvm is refused")
{
    TempDir tmp;
    const std::string dir = tmp.path.string() + "/";
    ensure_control_dir(dir);
    boost::asio::io_context io{1};
    boost::asio::local::stream_protocol::acceptor impostor(io, boost::asio::local::stream_protocol::endpoint(dir + "x.sock"));
    std::thread serve([&] {
        auto socket = impostor.accept();
        boost::asio::write(socket, boost::asio::buffer(std::string("LKVM/1 hello\n")));
    });
    CHECK(error_of([&] { ControlConnection::open(dir, "x"); }) == "garbled reply from the guest");
    serve.join();
}

TEST_CASE("control: running_guests lists the live ones and removes the stale ones")
{
    TempDir tmp;
    const std::string dir = tmp.path.string() + "/";
    CHECK(running_guests(dir + "missing/").empty());
    FakeGuest b{"b"}, a{"a"};
    ServedGuest served_b(dir, "b", handler_of(b));
    ServedGuest served_a(dir, "a", handler_of(a));
    make_stale_socket(dir + "dead.sock");
    tmp.file("notes.txt", 1);
    CHECK(running_guests(dir) == std::vector<std::string>{"a", "b"});
    CHECK_FALSE(std::filesystem::exists(std::filesystem::symlink_status(dir + "dead.sock")));
    CHECK(std::filesystem::exists(dir + "notes.txt"));
}

TEST_CASE("control client: list, stop, pause, resume and throttle against running guests")
{
    TempDir tmp;
    const std::string dir = tmp.path.string() + "/lkvm/";
    int status = -1;
    set_log_level(LogLevel::kWarn);  // not "no running guests" in the test output
    CHECK(run_and_capture(parse_command_line({"list"}), dir, status).empty());  // none, no directory even
    set_log_level(LogLevel::kInfo);
    CHECK(status == 0);
    CHECK(error_of([&] { run_and_capture(parse_command_line({"stop", "ghost"}), dir, status); }) ==
          "no running guest named ghost (see 'lkvm list')");

    FakeGuest one{"one"}, two{"two"};
    ServedGuest served_one(dir, "one", handler_of(one));
    ServedGuest served_two(dir, "two", handler_of(two));
    make_stale_socket(dir + "dead.sock");
    const std::string table = run_and_capture(parse_command_line({"list"}), dir, status);
    CHECK(status == 0);
    CHECK(table.starts_with("NAME      PID STATE   VCPUS     MEM  DISKS\n"));
    CHECK(contains(table, "one      4242 running     2    512M  a.raw,b c.raw\n"));
    CHECK(contains(table, "two "));
    CHECK_FALSE(contains(table, "dead"));
    CHECK_FALSE(std::filesystem::exists(std::filesystem::symlink_status(dir + "dead.sock")));
    CHECK(error_of([&] { run_and_capture(parse_command_line({"stop", "dead"}), dir, status); }) ==
          "no running guest named dead (see 'lkvm list')");

    CHECK(run_and_capture(parse_command_line({"resume", "one"}), dir, status).empty());
    CHECK(status == 0);
    CHECK(one.last == MachineCommand::Kind::kResume);
    CHECK(error_of([&] { run_and_capture(parse_command_line({"pause", "one"}), dir, status); }) ==
          "guest one: the guest is paused already");
    CHECK(run_and_capture(parse_command_line({"throttle", "one", "0", "iops=7,bps-rd=4096"}), dir, status) == "group=0\n");
    CHECK(one.last_limits[ThrottleBucket::kIopsTotal].avg == 7);
    CHECK(one.last_limits[ThrottleBucket::kBpsRead].avg == 4096);
    CHECK(run_and_capture(parse_command_line({"stop", "two"}), dir, status).empty());
    CHECK(two.last == MachineCommand::Kind::kStop);
    one.last = two.last = MachineCommand::Kind::kInfo;
    CHECK(run_and_capture(parse_command_line({"stop", "--all"}), dir, status).empty());
    CHECK(status == 0);
    CHECK(one.last == MachineCommand::Kind::kStop);
    CHECK(two.last == MachineCommand::Kind::kStop);
}

TEST_CASE("control client: replies come through events; stat --json takes two samples a second apart")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));
    // An event between request and reply is skipped by execute().
    auto connection = ControlConnection::open(dir, "g");
    REQUIRE(connection);
    CHECK(connection->execute("subscribe") == Json::object());
    served.on_loop([&] { served.server->send_event("paused", Json::object()); });
    CHECK(connection->execute("info")["name"] == "g");

    int status = -1;
    const std::string text = run_and_capture(parse_command_line({"stat", "g", "--json"}), dir, status);
    CHECK(status == 0);
    CHECK(guest.stat_calls == 2);
    CHECK(std::count(text.begin(), text.end(), '\n') == 1);
    const Json json = Json::parse(text);
    CHECK(json["interval_s"] == 1.0);
    CHECK(json["disks"] == Json::parse(R"([{"disk":0,"queue":0,"thread":"iothread0","cpu":0,"image":"a.raw",
        "requests":100,"bytes":409600,"iops":100.0,"mib_s":0.391,"in_flight":1,"p50_us":11.263,"p99_us":81.919,
        "kicks":50,"interrupts":25,"errors":0,"throttled_ns":0,"flushes":0,"requests_per_kick":2.0,
        "requests_per_interrupt":4.0}])"));
    CHECK(json["iothreads"][0]["tid"] == 77);
    CHECK(json["iothreads"][0]["poll_hit_rate"] == 0.25);
    CHECK(json["vcpus"] == Json::parse(R"([{"vcpu":0,"exits":150,"io_exits":40,"mmio_exits":0,"halt_exits":60,
        "irq_exits":20,"irq_window_exits":5,"signal_exits":0,"irq_injections":30,"insn_emulation":null,"exits_s":150.0}])"));
    CHECK(json["exits_per_request"] == 1.5);
}

TEST_CASE("control client: the stat tables show rates over the interval")
{
    StatSnapshot before = sample_snapshot();
    StatSnapshot after = before;
    after.time_ns += 2'000'000'000;  // two seconds later
    after.queues[0].requests += 1000;
    after.queues[0].bytes += 1000 * 4096;
    after.threads[0].requests += 1000;
    after.threads[0].poll_hits += 30;
    after.threads[0].wakeups += 10;
    after.queues[0].kicks += 500;
    after.queues[0].interrupts += 250;
    after.queues[0].throttled_ns += 500'000'000;  // held back a quarter of the time
    after.vcpus[0].counters = {9000 + 3000, 200, 3000, 700, 600, 100, 17, 1800, 3100};
    after.vcpus[1].counters = {1000 + 500, 20, std::nullopt, 100, 60, 15, 0, 180, std::nullopt};
    // Over the interval: 900 fast ones, 100 slow ones, so p99 is a slow one
    // (over all requests so far it would still be a fast one).
    after.queues[0].latency = {{90, 590 + 900}, {113, 10 + 100}};

    const std::string both = format_stat_tables(before, after, {});
    CHECK(contains(both, "disk queue thread        cpu      IOPS    MiB/s in-flight   p50-us   p99-us  kicks/s   "
                         "irqs/s req/kick  req/irq  errors  flushes   thr%  image\n"));
    CHECK(contains(both, "0        0 iothread0       1       500      2.0         3     11.3     81.9      250      "
                         "125     2.00     4.00       2        5   25.0  /tmp/my disk;1=2%.raw\n"));
    // No request completed in the interval: no percentiles, whatever came before; no kick: no ratio.
    CHECK(contains(both, "0        1 iothread0       1         0      0.0         0        -        -        0        "
                         "0        -        -       0        0    0.0  /tmp/my disk;1=2%.raw\n"));
    CHECK(contains(both, "1        0 disk1-io        -         0      0.0         0        -        -        0        "
                         "0        -        -       0        0    0.0  b.raw\n"));
    CHECK(contains(both, "vcpu     exits/s       io/s     mmio/s     halt/s      irq/s  irq-win/s   signal/s  "
                         "irq-inj/s     emul/s\n"));
    CHECK(contains(both, "0           1500         50        500        100        150         25          5        "
                         "300        500\n"));
    CHECK(contains(both, "1            250          5          -         25         15          5          0         "
                         "30          -\n"));
    CHECK(contains(both, "exits per disk request: 3.50\n"));  // 3500 exits for 1000 requests
    CHECK_FALSE(contains(format_stat_tables(before, after, {true, false}), "exits/s"));
    CHECK(format_stat_tables(before, after, {false, false, true}).starts_with("vcpu "));
    StatSnapshot without_counters = after;
    without_counters.vcpus.clear();
    CHECK(format_stat_tables(before, without_counters, {false, false, true}) ==
          "no vCPU exit counters: this guest's KVM has no binary statistics fd\n");
    CHECK_FALSE(contains(format_stat_tables(before, without_counters, {}), "vCPU"));
    const Json bare = Json::parse(format_stat_json(before, without_counters, {}, 0));
    CHECK(bare["vcpus"] == Json::array());
    CHECK(bare["exits_per_request"].is_null());
    CHECK(contains(both, "thread            tid  cpu      IOPS   poll-ns poll-hit%\n"));
    CHECK(contains(both, "iothread0        4242    1       500     32768      75.0\n"));
    CHECK(contains(both, "disk1-io         4243    -         0         0         -\n"));
    CHECK_FALSE(contains(format_stat_tables(before, after, {true, false}), "poll-ns"));
    CHECK_FALSE(contains(format_stat_tables(before, after, {false, true}), "in-flight"));

    // A queue the first sample lacks counts from the second on.
    before.queues.pop_back();
    CHECK(contains(format_stat_tables(before, after, {true, false}), "1        0 disk1-io        -         0"));

    // Counts that went down started over (a device reset): all of them are the interval's.
    StatSnapshot reset = after;
    reset.queues[0].latency = {{90, 5}};
    CHECK(contains(format_stat_tables(after, reset, {true, false}), "  11.3     11.3        0        0"));
    reset.queues[0].latency = {{113, 200}};  // more slow ones than before, but the fast ones are gone
    CHECK(contains(format_stat_tables(after, reset, {true, false}), "  81.9     81.9        0        0"));

    const std::string text = format_stat_json(before, after, {true, false}, 1700000000.5);
    CHECK(text.starts_with("{\"time\":1700000000.5,\"interval_s\":2.0,\"disks\":["));  // in this order, for people
    CHECK(std::count(text.begin(), text.end(), '\n') == 1);
    const Json json = Json::parse(text);
    const Json& first = json["disks"][0];
    CHECK(first["p50_us"] == 11.263);
    CHECK(first["p99_us"] == 81.919);
    CHECK(first["kicks"] == 800);
    CHECK(first["interrupts"] == 450);
    CHECK(first["errors"] == 2);
    CHECK(first["throttled_ns"] == 1250000000);
    CHECK(first["flushes"] == 5);
    CHECK(first["requests_per_kick"] == 2.0);
    CHECK(first["requests_per_interrupt"] == 4.0);
    CHECK(first["image"] == "/tmp/my disk;1=2%.raw");
    CHECK(first["requests"] == 1600);
    CHECK(first["bytes"] == 6553600);
    CHECK(first["iops"] == 500.0);
    const Json& idle = json["disks"][1];
    CHECK(idle["p50_us"].is_null());
    CHECK(idle["p99_us"].is_null());
    CHECK(idle["requests_per_kick"].is_null());
    CHECK(idle["requests_per_interrupt"].is_null());
    CHECK(json["disks"][2]["cpu"].is_null());
    CHECK_FALSE(json.contains("vcpus"));
    CHECK_FALSE(json.contains("iothreads"));
    const Json threads = Json::parse(format_stat_json(before, after, {false, true}, 0));
    CHECK_FALSE(threads.contains("disks"));
    CHECK(threads["iothreads"][0]["poll_hit_rate"] == 0.75);
    CHECK(threads["iothreads"][1]["poll_hit_rate"].is_null());

    // An image path that is not UTF-8 still makes a line of valid JSON.
    after.queues[0].image = "/tmp/\xff\xfe.raw";
    const Json odd = Json::parse(format_stat_json(before, after, {true, false}, 0));
    CHECK(odd["disks"][0]["image"] == "/tmp/\xef\xbf\xbd\xef\xbf\xbd.raw");
}

TEST_CASE("control client: the --stats table at exit")
{
    StatSnapshot snapshot = sample_snapshot();
    snapshot.threads[0].latency = {{90, 10}};
    const std::string table = format_io_stats(snapshot);
    CHECK(table.starts_with("thread        cpu   requests        MiB   batches   wakeups poll-hits  poll-us   p50-us   p99-us\n"));
    // The CPU --iothreads affinity= pinned it to ("-": none), not the one it last ran on.
    CHECK(contains(table, "\niothread0       2       1000        3.9       300        10        30     32.8     11.3     11.3\n"));
    CHECK(contains(table, "\ndisk1-io        -          0        0.0         0         0         0      0.0      0.0      0.0\n"));
    CHECK(contains(table, "\n0         0 iothread0           600        2.3     11.3     81.9        300        200     2.00     3.00        2        5        0.75  /tmp/my disk;1=2%.raw\n"));
    CHECK(contains(table, "\nexits per disk request: 10.00\n"));  // 10000 exits, 1000 requests
}

TEST_CASE("control client: the list table")
{
    const std::string table = format_guest_table({{"a-rather-long-name", "running", 1, 1, 64, {}},
                                                  {"b", "paused", 22, 8, 4096, {"x.raw", "y z.raw"}}});
    CHECK(table == "NAME                    PID STATE   VCPUS     MEM  DISKS\n"
                   "a-rather-long-name        1 running     1     64M  -\n"
                   "b                        22 paused      8   4096M  x.raw,y z.raw\n");
}
