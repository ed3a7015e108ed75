// The control socket: protocol, payloads, socket paths, a real server on a
// temporary directory, and the client commands against it.
#include <doctest/doctest.h>

#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "api/control.h"
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

std::string request_error(std::string_view line)
{
    const auto verb = parse_request(line);
    return verb ? std::string("(no error)") : verb.error();
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
    s.threads = {{"iothread0", 4242, 1, 1000, 4096000, 300, 10, 30, 32768, {}},
                 {"disk1-io", 4243, -1, 0, 0, 0, 0, 0, 0, {}}};
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
    void stop()
    {
        if (loop.joinable()) {
            io.stop();
            loop.join();
        }
        server.reset();
    }
};

// What a test guest answers; remembers the last verb and the thread it ran on.
struct FakeGuest {
    std::string name;
    std::atomic<int> last_verb{-1};
    std::atomic<std::thread::id> thread{};
    std::atomic<uint64_t> stat_calls{0};
    std::string last_argument{};

    std::string operator()(ControlVerb verb)
    {
        last_verb = static_cast<int>(verb);
        thread = std::this_thread::get_id();
        switch (verb) {
        case ControlVerb::kInfo:
            return format_guest_info({name, "running", 4242, 2, 512, {"a.raw", "b c.raw"}});
        case ControlVerb::kPause:
            throw Error("the guest is paused already");
        case ControlVerb::kStat: {
            // Each sample one second and 100 requests of 4 KiB after the last.
            const uint64_t n = stat_calls++;
            StatSnapshot s;
            s.time_ns = (n + 1) * 1'000'000'000;
            // Of each 100, 90 took 10.24-11.26 us (bucket 90), 10 took 73.7-81.9 us (bucket 113).
            s.threads = {{"iothread0", 77, 0, 100 * n, 409600 * n, n, 3 * n, n, 500, {}}};
            s.queues = {{0, 0, "iothread0", "a.raw", 0, 100 * n, 409600 * n, 1,
                         n ? LatencyBuckets{{90, 90 * n}, {113, 10 * n}} : LatencyBuckets{}, 50 * n, 25 * n}};
            // 150 exits a second, of which 40 for I/O; no instruction emulation counter.
            s.vcpus = {{0, {150 * n, 40 * n, 0, 60 * n, 20 * n, 5 * n, 0, 30 * n, std::nullopt}}};
            return format_stat_payload(s);
        }
        default:
            return "";
        }
    }
};

ControlServer::Handler handler_of(FakeGuest& guest)
{
    return [&guest](const ControlRequest& request) {
        guest.last_argument = request.argument;
        return guest(request.verb);
    };
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

}  // namespace

TEST_CASE("control: every verb's request parses back")
{
    for (const ControlRequest& request :
         {ControlRequest{ControlVerb::kInfo, {}}, ControlRequest{ControlVerb::kStop, {}},
          ControlRequest{ControlVerb::kPause, {}}, ControlRequest{ControlVerb::kResume, {}},
          ControlRequest{ControlVerb::kStat, {}}, ControlRequest{ControlVerb::kThrottle, "/tmp/my disk.raw iops=5"}}) {
        const std::string line = format_request(request);
        REQUIRE(line.back() == '\n');
        const auto parsed = parse_request(std::string_view(line).substr(0, line.size() - 1));
        REQUIRE(parsed.ok());
        CHECK(parsed.value() == request);
    }
    CHECK(format_request({ControlVerb::kStat, {}}) == "LKVM/1 stat\n");
    CHECK(format_request({ControlVerb::kThrottle, "0 iops=500"}) == "LKVM/1 throttle 0%20iops%3D500\n");
}

TEST_CASE("control: a malformed request gets the reason as its error")
{
    CHECK(contains(request_error(""), "empty request; send 'LKVM/1 VERB'"));
    const std::string version = "unsupported protocol version, this lkvm speaks LKVM/1";
    CHECK(request_error("LKVM/2 info") == version);
    CHECK(request_error("info") == version);
    CHECK(request_error("lkvm/1 info") == version);
    CHECK(request_error(" LKVM/1 info") == version);
    CHECK(request_error("LKVM/1") == "no verb after LKVM/1 (verbs: info, stop, pause, resume, stat, throttle)");
    CHECK(request_error("LKVM/1 fly") == "unknown verb 'fly' (verbs: info, stop, pause, resume, stat, throttle)");
    CHECK(request_error("LKVM/1 INFO") == "unknown verb 'INFO' (verbs: info, stop, pause, resume, stat, throttle)");
    CHECK(request_error("LKVM/1 info now") == "unexpected 'now' after the verb");
    CHECK(contains(request_error("LKVM/1 throttle"), "throttle needs what to throttle and how"));
    CHECK(request_error("LKVM/1 throttle 0%20iops=5 more") == "unexpected 'more' after the argument");
    CHECK(contains(request_error("LKVM/1 throttle 0%2"), "%"));
    CHECK(contains(request_error("LKVM/1 throttle %0A"), "control characters"));
    CHECK(contains(request_error("LKVM/1  info"), "malformed request: one space between words"));
    CHECK(contains(request_error("LKVM/1 info "), "malformed request"));
    CHECK(request_error("LKVM/1 info\r") == "control characters in the request");
    CHECK(request_error("LKVM/1\tinfo") == "control characters in the request");
    CHECK(request_error(std::string("LKVM/1 in\0fo", 12)) == "control characters in the request");
    CHECK(request_error("LKVM/1 info\x7f") == "control characters in the request");
    CHECK(request_error(std::string(4095, 'a')) == version);  // 4095 + '\n' still fits
    CHECK(request_error(std::string(4096, 'a')) == "request longer than 4096 bytes");
}

TEST_CASE("control: replies, ok and error, and what is not one")
{
    CHECK(format_ok_reply("a=1") == "LKVM/1 ok a=1\n");
    CHECK(format_ok_reply("") == "LKVM/1 ok\n");
    CHECK(contains(error_of([] { format_ok_reply("a=1\nLKVM/1 ok b=2"); }), "control characters"));
    CHECK(format_error_reply("bad\nthing\r") == "LKVM/1 error bad thing \n");
    CHECK(format_error_reply("") == "LKVM/1 error error\n");

    const auto ok = parse_reply("LKVM/1 ok a=1 b=2");
    CHECK(ok.ok);
    CHECK(ok.text == "a=1 b=2");
    CHECK(parse_reply("LKVM/1 ok").ok);
    CHECK(parse_reply("LKVM/1 ok").text.empty());
    const auto error = parse_reply("LKVM/1 error no such thing");
    CHECK_FALSE(error.ok);
    CHECK(error.text == "no such thing");
    CHECK(contains(error_of([] { parse_reply("LKVM/2 ok a=1"); }), "another protocol version (LKVM/2)"));
    CHECK(error_of([] { parse_reply("hello"); }) == "garbled reply from the guest");
    CHECK(error_of([] { parse_reply("LKVM/1 maybe"); }) == "garbled reply from the guest");
    CHECK(error_of([] { parse_reply(""); }) == "garbled reply from the guest");
}

TEST_CASE("control: percent-encoding both ways, and hostile input refused")
{
    CHECK(percent_encode("plain-name_1.raw") == "plain-name_1.raw");
    CHECK(percent_encode("/tmp/a b;c=d%e\n") == "/tmp/a%20b%3Bc%3Dd%25e%0A");
    CHECK(percent_encode(std::string("\0\xff", 2)) == "%00%FF");
    CHECK(percent_encode("") == "");
    CHECK(percent_decode("%4a%4A") == "JJ");
    CHECK(percent_decode("") == "");

    std::string every_byte;
    for (int b = 0; b < 256; ++b)
        every_byte += static_cast<char>(b);
    const std::string encoded = percent_encode(every_byte);
    CHECK(encoded.find_first_of(" ;=\n") == std::string::npos);
    CHECK(percent_decode(encoded) == every_byte);

    uint32_t seed = 12345;  // a fixed pseudo-random walk over short strings
    for (int n = 0; n < 500; ++n) {
        std::string text;
        for (int i = n % 17; i > 0; --i) {
            seed = seed * 1103515245 + 12345;
            text += static_cast<char>(seed >> 16);
        }
        REQUIRE(percent_decode(percent_encode(text)) == text);
    }

    for (const std::string bad : {"%", "%4", "%G0", "%0g", "a b", "a;b", "a=b", "a%", "\n", "\xc3\xa9", "100%"})
        CHECK_MESSAGE(contains(error_of([&] { percent_decode(bad); }), "malformed reply from the guest"), bad);
}

TEST_CASE("control: payload records round-trip; malformed ones are refused")
{
    const std::vector<PayloadRecord> records{{{"path", "/tmp/a b;c=d"}, {"empty", ""}, {"n", "1"}}, {{"x_2", "%"}}};
    const std::string payload = format_records(records);
    CHECK(payload == "path=/tmp/a%20b%3Bc%3Dd empty= n=1;x_2=%25");
    CHECK(parse_records(payload) == records);
    CHECK(parse_records("").empty());
    for (const std::string bad : {";", "a=1;", ";a=1", "a=1  b=2", "a=1 ", "=1", "A=1", "a-b=1", "a", "a=%zz", "a=b c",
                                  "a=b=c"})
        CHECK_MESSAGE(contains(error_of([&] { parse_records(bad); }), "malformed reply from the guest"), bad);
}

TEST_CASE("control: guest info round-trips; missing and broken fields are refused")
{
    const GuestInfo info{"web-1.test", "paused", 31337, 4, 2048, {"/images/a b.raw", "c;d=e.raw"}};
    CHECK(parse_guest_info(format_guest_info(info)) == info);
    const GuestInfo no_disks{"g", "running", 1, 1, 64, {}};
    CHECK(parse_guest_info(format_guest_info(no_disks)) == no_disks);
    // Keys a newer lkvm may add are skipped.
    CHECK(parse_guest_info("name=g state=running pid=1 vcpus=1 mem_mib=64 future=yes;more=1") == no_disks);

    CHECK(contains(error_of([] { parse_guest_info(""); }), "no guest info"));
    CHECK(contains(error_of([] { parse_guest_info("name=g state=running vcpus=1 mem_mib=64"); }), "no pid="));
    CHECK(contains(error_of([] { parse_guest_info("name=g state=running pid=x vcpus=1 mem_mib=64"); }),
                   "pid= is not a number"));
    CHECK(contains(error_of([] { parse_guest_info("name=g state=running pid=1 vcpus=-1 mem_mib=64"); }),
                   "vcpus= is not a number"));
    CHECK(contains(error_of([] { parse_guest_info("name=g state=running pid=1 vcpus=1 mem_mib=99999999999999999999"); }),
                   "mem_mib= is not a number"));
}

TEST_CASE("control: stat snapshots round-trip; malformed ones are refused")
{
    const StatSnapshot snapshot = sample_snapshot();
    const std::string payload = format_stat_payload(snapshot);
    CHECK(payload.starts_with("time_ns=123456789012345;thread=iothread0 tid=4242 cpu=1 requests=1000"));
    CHECK(payload.find('\n') == std::string::npos);
    CHECK(parse_stat_payload(payload) == snapshot);
    CHECK(parse_stat_payload("time_ns=5") == StatSnapshot{5, {}, {}, {}, {}});
    CHECK(parse_stat_payload("time_ns=5 state=paused%20%28io-error:%20x%29").state == "paused (io-error: x)");
    StatSnapshot paused = snapshot;
    paused.state = "paused (io-error: disk a.raw write error (No space left on device))";
    CHECK(parse_stat_payload(format_stat_payload(paused)) == paused);
    CHECK(format_stat_tables(paused, paused, {}).starts_with("guest paused (io-error: disk a.raw write error (No space left on device))\n"));
    CHECK(parse_stat_payload("time_ns=5;future=1 x=2").threads.empty());  // a newer lkvm's records are skipped

    CHECK(contains(error_of([] { parse_stat_payload(""); }), "without time_ns= first"));
    CHECK(contains(error_of([] { parse_stat_payload("thread=a;time_ns=1"); }), "without time_ns= first"));
    CHECK(contains(error_of([] { parse_stat_payload("time_ns=abc"); }), "time_ns= is not a number"));
    CHECK(contains(error_of([] { parse_stat_payload("time_ns=1;thread=a tid=1"); }), "no cpu="));
    CHECK(contains(error_of([] { parse_stat_payload("time_ns=1;disk=0 queue=0"); }), "no thread="));
    CHECK(contains(payload, "in_flight=3 latency=90:590,113:10 kicks=300 interrupts=200 errors=2 throttled_ns=750000000 flushes=5;"));
    CHECK(contains(payload, "in_flight=0 latency= kicks=0 interrupts=0 errors=0 throttled_ns=0 flushes=0;"));  // an empty histogram
    CHECK(payload.ends_with(";vcpu=0 exits=9000 io_exits=100 mmio_exits=2000 halt_exits=500 irq_exits=300 "
                            "irq_window_exits=50 signal_exits=7 irq_injections=1200 insn_emulation=2100;"
                            "vcpu=1 exits=1000 io_exits=10 halt_exits=50 irq_exits=30 irq_window_exits=5 "
                            "signal_exits=0 irq_injections=120"));  // counters the kernel lacks are left out
    const std::string good = "time_ns=1;disk=0 queue=0 thread=t image=i cpu=0 requests=1 bytes=1 in_flight=0 latency=";
    CHECK(parse_stat_payload(good + "5:1,7:2").queues.at(0).latency == LatencyBuckets{{5, 1}, {7, 2}});
    for (const std::string bad : {"5", "5:", ":1", "5:1,", ",5:1", "5:1,5:1", "7:1,5:1", "5:0", "328:1", "5:x",
                                  "5:1:2", "-1:1", "5:1,,7:1"})
        CHECK_MESSAGE(contains(error_of([&] { parse_stat_payload(good + bad); }), "latency= is not a list"), bad);
    CHECK(contains(error_of([&] { parse_stat_payload(good.substr(0, good.find(" latency="))); }), "no latency="));
    // An older lkvm sends neither kicks nor interrupts nor errors: zero, not an error; a bad one is.
    CHECK(parse_stat_payload(good).queues.at(0).kicks == 0);
    CHECK(parse_stat_payload(good).queues.at(0).errors == 0);
    CHECK(contains(error_of([&] { parse_stat_payload(good + " errors=x"); }), "errors= is not a number"));
    CHECK(parse_stat_payload(good).queues.at(0).flushes == 0);  // nor flushes
    CHECK(parse_stat_payload(good + " flushes=9").queues.at(0).flushes == 9);
    CHECK(contains(error_of([&] { parse_stat_payload(good + " flushes=-1"); }), "flushes= is not a number"));
    CHECK(parse_stat_payload(good + " kicks=3 interrupts=2").queues.at(0).interrupts == 2);
    CHECK(contains(error_of([&] { parse_stat_payload(good + " kicks=x"); }), "kicks= is not a number"));
    CHECK(contains(error_of([&] { parse_stat_payload("time_ns=1;vcpu=0 exits=-1"); }), "exits= is not a number"));
    CHECK(contains(error_of([&] { parse_stat_payload("time_ns=1;vcpu=x"); }), "vcpu= is not a number"));
    const StatSnapshot::Vcpu bare = parse_stat_payload("time_ns=1;vcpu=3 future_exits=1").vcpus.at(0);
    CHECK(bare.index == 3);
    CHECK(bare.counters == VcpuCounters{});
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

TEST_CASE("control server: the socket is 0600, answers on the loop thread, and goes with the server")
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
    CHECK(parse_guest_info(client->ask(ControlVerb::kInfo)).disks == std::vector<std::string>{"a.raw", "b c.raw"});
    CHECK(guest.thread.load() == served->loop.get_id());
    // Several requests on one connection, and an error reply keeps it open.
    CHECK(error_of([&] { client->ask(ControlVerb::kPause); }) == "guest g: the guest is paused already");
    CHECK(client->ask(ControlVerb::kResume).empty());
    CHECK(guest.last_verb == static_cast<int>(ControlVerb::kResume));
    CHECK(client->ask(ControlVerb::kThrottle, "/tmp/a b.raw iops=5").empty());
    CHECK(guest.last_argument == "/tmp/a b.raw iops=5");

    served.reset();
    CHECK_FALSE(std::filesystem::exists(std::filesystem::symlink_status(path)));
    CHECK_FALSE(ControlConnection::open(dir, "g"));
}

TEST_CASE("control server: two clients at once, pipelined requests, bogus requests answered")
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
    CHECK_THROWS_AS(first->exchange("LKVM/1 in"), Error);  // no reply yet: times out
    CHECK(parse_reply(second->exchange("LKVM/1 info\n")).ok);
    CHECK(parse_guest_info(parse_reply(first->exchange("fo\n")).text).name == "g");

    // Two requests in one write: two replies, in order.
    CHECK(second->exchange("LKVM/1 info\nLKVM/1 stat\n").starts_with("LKVM/1 ok name=g"));
    CHECK(second->exchange("").starts_with("LKVM/1 ok time_ns="));

    // A bogus request gets an error reply; the connection and the guest go on.
    CHECK(second->exchange("LKVM/1 fly\n") == "LKVM/1 error unknown verb 'fly' (verbs: info, stop, pause, resume, stat, throttle)");
    CHECK(second->exchange("LKVM/9 info\n") == "LKVM/1 error unsupported protocol version, this lkvm speaks LKVM/1");
    CHECK(second->exchange(std::string("LKVM/1 st\x01" "at\n")) == "LKVM/1 error control characters in the request");
    CHECK(second->exchange("\n").starts_with("LKVM/1 error empty request"));
    CHECK(parse_reply(second->exchange("LKVM/1 stat\n")).ok);
}

TEST_CASE("control server: a line over 4096 bytes closes only that connection")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));

    auto flooder = ControlConnection::open(dir, "g");
    auto bystander = ControlConnection::open(dir, "g");
    REQUIRE(flooder);
    REQUIRE(bystander);
    CHECK(flooder->exchange(std::string(5000, 'x')) == "LKVM/1 error request longer than 4096 bytes");
    CHECK(contains(error_of([&] { flooder->exchange(""); }), "hung up"));
    CHECK(parse_reply(bystander->exchange("LKVM/1 info\n")).ok);
    auto newcomer = ControlConnection::open(dir, "g");
    REQUIRE(newcomer);
    // 4095 bytes and '\n' is a line still: parsed, and answered.
    CHECK(newcomer->exchange(std::string(4095, 'x').replace(0, 12, "LKVM/1 info ") + "\n")
              .starts_with("LKVM/1 error unexpected 'xxxxxxxx"));
    CHECK(parse_reply(newcomer->exchange("LKVM/1 info\n")).ok);
}

TEST_CASE("control server: handler failures and oversized replies become error replies")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    ServedGuest served(dir, "g", [](const ControlRequest& request) -> std::string {
        if (request.verb == ControlVerb::kStat)
            return std::string(kMaxReplyBytes, 'a');
        if (request.verb == ControlVerb::kInfo)
            throw std::runtime_error("a bug");
        return "two\nlines";
    });
    auto client = ControlConnection::open(dir, "g");
    REQUIRE(client);
    CHECK(client->exchange("LKVM/1 stat\n") == "LKVM/1 error the reply would be longer than 1048576 bytes");
    CHECK(client->exchange("LKVM/1 info\n") == "LKVM/1 error a bug");
    CHECK(client->exchange("LKVM/1 stop\n") == "LKVM/1 error internal error: control characters in a reply payload");
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
    CHECK(parse_reply(client->exchange("LKVM/1 info\n")).ok);

    boost::asio::io_context other;
    CHECK(error_of([&] { ControlServer(other, dir, "g", handler_of(guest)); }) ==
          "a guest named g is already running (pid " + std::to_string(::getpid()) + "); pick another --name");
    CHECK(parse_reply(client->exchange("LKVM/1 info\n")).ok);  // the first one is untouched

    tmp.file("h.sock", 1);
    CHECK(contains(error_of([&] { ControlServer(other, dir, "h", handler_of(guest)); }), "is in the way and is not a socket"));
    CHECK(contains(error_of([&] { ControlServer(other, dir, "../h", handler_of(guest)); }), "is not a guest name"));
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

TEST_CASE("control client: list, stop, pause and resume against running guests")
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
    CHECK(one.last_verb == static_cast<int>(ControlVerb::kResume));
    CHECK(error_of([&] { run_and_capture(parse_command_line({"pause", "one"}), dir, status); }) ==
          "guest one: the guest is paused already");
    CHECK(run_and_capture(parse_command_line({"stop", "two"}), dir, status).empty());
    CHECK(two.last_verb == static_cast<int>(ControlVerb::kStop));
    one.last_verb = two.last_verb = -1;
    CHECK(run_and_capture(parse_command_line({"stop", "--all"}), dir, status).empty());
    CHECK(status == 0);
    CHECK(one.last_verb == static_cast<int>(ControlVerb::kStop));
    CHECK(two.last_verb == static_cast<int>(ControlVerb::kStop));
}

TEST_CASE("control client: stat --json takes two samples a second apart")
{
    TempDir tmp;
    const std::string dir = tmp.path.string();
    FakeGuest guest{"g"};
    ServedGuest served(dir, "g", handler_of(guest));
    int status = -1;
    const std::string json = run_and_capture(parse_command_line({"stat", "g", "--json"}), dir, status);
    CHECK(status == 0);
    CHECK(guest.stat_calls == 2);
    CHECK(std::count(json.begin(), json.end(), '\n') == 1);
    CHECK(contains(json, "\"interval_s\":1.000000,\"disks\":[{\"disk\":0,\"queue\":0,\"thread\":\"iothread0\",\"cpu\":0,"
                         "\"image\":\"a.raw\",\"requests\":100,\"bytes\":409600,\"iops\":100.0,\"mib_s\":0.391,"
                         "\"in_flight\":1,\"p50_us\":11.263,\"p99_us\":81.919,\"kicks\":50,\"interrupts\":25,"
                         "\"errors\":0,\"throttled_ns\":0,\"flushes\":0,\"requests_per_kick\":2.000,\"requests_per_interrupt\":4.000}]"));
    CHECK(contains(json, "\"iothreads\":[{\"name\":\"iothread0\",\"tid\":77,\"cpu\":0,\"requests\":100,"));
    CHECK(contains(json, "\"poll_hit_rate\":0.2500}],\"vcpus\":[{\"vcpu\":0,\"exits\":150,\"io_exits\":40,"
                         "\"mmio_exits\":0,\"halt_exits\":60,\"irq_exits\":20,\"irq_window_exits\":5,"
                         "\"signal_exits\":0,\"irq_injections\":30,\"insn_emulation\":null,\"exits_s\":150.0}],"
                         "\"exits_per_request\":1.5000}\n"));
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
    CHECK(contains(format_stat_json(before, without_counters, {}, 0), "\"vcpus\":[],\"exits_per_request\":null}"));
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

    const std::string json = format_stat_json(before, after, {true, false}, 1700000000.5);
    CHECK(json.starts_with("{\"time\":1700000000.500,\"interval_s\":2.000000,\"disks\":["));
    CHECK(contains(json, "\"p50_us\":11.263,\"p99_us\":81.919,\"kicks\":800,\"interrupts\":450,"
                         "\"errors\":2,\"throttled_ns\":1250000000,\"flushes\":5,\"requests_per_kick\":2.000,\"requests_per_interrupt\":4.000}"));
    CHECK(contains(json, "\"p50_us\":null,\"p99_us\":null,\"kicks\":400,\"interrupts\":400,"
                         "\"errors\":0,\"throttled_ns\":0,\"flushes\":0,\"requests_per_kick\":null,\"requests_per_interrupt\":null}"));
    CHECK_FALSE(contains(json, "vcpus"));
    CHECK(contains(json, "\"image\":\"/tmp/my disk;1=2%.raw\",\"requests\":1600,\"bytes\":6553600,\"iops\":500.0"));
    CHECK(contains(json, "\"cpu\":null"));
    CHECK_FALSE(contains(json, "iothreads"));
    const std::string threads = format_stat_json(before, after, {false, true}, 0);
    CHECK_FALSE(contains(threads, "\"disks\""));
    CHECK(contains(threads, "\"poll_hit_rate\":0.7500}"));
    CHECK(contains(threads, "\"poll_hit_rate\":null}"));
}

TEST_CASE("control client: JSON strings are escaped and always UTF-8")
{
    CHECK(json_string("plain") == "\"plain\"");
    CHECK(json_string("a\"b\\c") == "\"a\\\"b\\\\c\"");
    CHECK(json_string("l1\nl2\tx\x01\x7f") == "\"l1\\nl2\\tx\\u0001\\u007f\"");
    CHECK(json_string("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") == "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");
    CHECK(json_string("\xff") == "\"\\ufffd\"");
    CHECK(json_string("\xc0\xaf") == "\"\\ufffd\\ufffd\"");          // overlong '/'
    CHECK(json_string("\xed\xa0\x80") == "\"\\ufffd\\ufffd\\ufffd\"");  // a surrogate
    CHECK(json_string("a\xe2\x82") == "\"a\\ufffd\\ufffd\"");          // cut short
    CHECK(json_string(std::string("\0", 1)) == "\"\\u0000\"");
}

TEST_CASE("control client: the list table")
{
    const std::string table = format_guest_table({{"a-rather-long-name", "running", 1, 1, 64, {}},
                                                  {"b", "paused", 22, 8, 4096, {"x.raw", "y z.raw"}}});
    CHECK(table == "NAME                    PID STATE   VCPUS     MEM  DISKS\n"
                   "a-rather-long-name        1 running     1     64M  -\n"
                   "b                        22 paused      8   4096M  x.raw,y z.raw\n");
}
