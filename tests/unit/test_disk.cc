// Disk images (checks and locks) and the I/O engines.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "disk/disk_image.h"
#include "disk/ioprio.h"
#include "tests/unit/test_util.h"
#include "disk/io_engine.h"

using namespace lkvm;

using lkvm::test::TempDir;

namespace {

std::string open_error(const DiskImageOptions& options)
{
    try {
        DiskImage::open(options);
    } catch (const Error& e) {
        return e.what();
    }
    return "(opened)";
}

// Submits the batch and waits, polling then sleeping on the eventfd as the
// I/O thread does, until all of it has completed.
std::vector<IoCompletion> run(IoEngine& engine, const std::vector<IoRequest>& batch)
{
    engine.submit(batch);
    std::vector<IoCompletion> done;
    while (done.size() < batch.size()) {
        if (!engine.wait_for_completions(5000))
            break;
        engine.reap(done);
    }
    CHECK(engine.in_flight() == 0);
    return done;
}

// Writes 8 requests of two iovecs each at once, then reads them back the same
// way into fresh buffers; checks every byte.
void write_and_read_back(IoEngine& engine, int fd, uint16_t ioprio = 0)
{
    constexpr size_t kRequests = 8, kHalf = 2048;
    std::vector<std::vector<char>> out(kRequests, std::vector<char>(2 * kHalf));
    std::vector<std::vector<char>> in(kRequests, std::vector<char>(2 * kHalf));
    std::vector<iovec> out_iov, in_iov;
    out_iov.reserve(2 * kRequests);
    in_iov.reserve(2 * kRequests);
    std::vector<IoRequest> writes, reads;
    for (size_t i = 0; i < kRequests; ++i) {
        for (size_t h = 0; h < 2; ++h) {
            std::memset(out[i].data() + h * kHalf, static_cast<int>('a' + 2 * i + h), kHalf);
            out_iov.push_back({out[i].data() + h * kHalf, kHalf});
            in_iov.push_back({in[i].data() + h * kHalf, kHalf});
        }
        writes.push_back({IoOp::kWrite, fd, i * 8192, &out_iov[2 * i], 2, i, ioprio});
        reads.push_back({IoOp::kRead, fd, i * 8192, &in_iov[2 * i], 2, 100 + i, ioprio});
    }
    const auto written = run(engine, writes);
    CHECK(written.size() == kRequests);
    for (const auto& c : written)
        CHECK(c.result == 2 * kHalf);
    const auto flushed = run(engine, {{IoOp::kFlush, fd, 0, nullptr, 0, 42, ioprio}});
    REQUIRE(flushed.size() == 1);
    CHECK(flushed[0].cookie == 42);
    CHECK(flushed[0].result == 0);
    const auto read = run(engine, reads);
    CHECK(read.size() == kRequests);
    for (const auto& c : read) {
        CHECK(c.result == 2 * kHalf);
        CHECK(in.at(c.cookie - 100) == out.at(c.cookie - 100));
    }
}

constexpr EngineKind kAllEngines[] = {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring, EngineKind::kNull};
constexpr EngineKind kDataEngines[] = {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring};
}  // namespace

TEST_CASE("disk image: size, read-only and what cannot be a disk")
{
    TempDir dir;
    const auto ok = dir.file("ok.raw", 1 << 20);
    auto image = DiskImage::open({ok, false});
    CHECK(image.size() == 1 << 20);
    CHECK_FALSE(image.read_only());
    CHECK(image.alignment() == 1);

    CHECK(open_error({dir.path / "missing.raw", false}).find("No such file") != std::string::npos);
    CHECK(open_error({dir.path.string(), false}).find("is a directory") != std::string::npos);
    CHECK(open_error({dir.file("odd.raw", 1000), false}).find("not a multiple of 512") != std::string::npos);
    CHECK(open_error({dir.file("empty.raw", 0), false}).find("is empty") != std::string::npos);
}

TEST_CASE("disk image: each cache mode opens the image as QEMU's does and says what the guest is told")
{
    TempDir dir;
    const auto path = dir.file("cache.raw", 1 << 20);
    struct Case {
        CacheMode cache;
        int flags;  // of O_DIRECT | O_DSYNC
        bool write_cache, durable, ignored;
    };
    for (const Case c : {Case{CacheMode::kWriteback, 0, true, false, false}, Case{CacheMode::kNone, O_DIRECT, true, false, false},
                         Case{CacheMode::kWritethrough, O_DSYNC, false, true, false},
                         Case{CacheMode::kDirectsync, O_DIRECT | O_DSYNC, false, true, false},
                         Case{CacheMode::kUnsafe, 0, true, false, true}}) {
        CAPTURE(cache_mode_name(c.cache));
        const auto image = DiskImage::open({path, false, c.cache});
        CHECK((::fcntl(image.fd(), F_GETFL) & (O_DIRECT | O_DSYNC)) == c.flags);
        CHECK(image.cache() == c.cache);
        CHECK(image.direct() == ((c.flags & O_DIRECT) != 0));
        CHECK(image.alignment() == (image.direct() ? 512u : 1u));
        CHECK(image.write_cache_default() == c.write_cache);
        CHECK(image.writes_durable() == c.durable);
        CHECK(image.flushes_ignored() == c.ignored);
        // io_uring opens a description of its own for a registered file: with the same flags.
        auto engine = make_uring_engine(8, default_uring_setup_flags(), true);
        engine->register_file(image.fd());
        unsigned descriptions = 0;
        for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
            std::error_code error;
            if (std::filesystem::read_symlink(entry.path(), error) != std::filesystem::path(path))
                continue;
            const int fd = std::stoi(entry.path().filename().string());
            CHECK((::fcntl(fd, F_GETFL) & (O_DIRECT | O_DSYNC)) == c.flags);
            ++descriptions;
        }
        CHECK(descriptions == 2);
    }
}

TEST_CASE("iovecs_are_zero: any alignment and split, stops at a non-zero byte anywhere")
{
    std::vector<uint8_t> buffer(4096 + 64, 0);
    for (const size_t start : {0, 1, 3, 7, 8, 13}) {
        for (const size_t length : {0, 1, 7, 8, 9, 15, 16, 17, 511, 512, 4096}) {
            CAPTURE(start);
            CAPTURE(length);
            iovec one{buffer.data() + start, length};
            CHECK(iovecs_are_zero({&one, 1}, length));
            for (size_t at = 0; at < length; at += std::max<size_t>(1, length / 7)) {
                buffer[start + at] = 0x80;
                CHECK_FALSE(iovecs_are_zero({&one, 1}, length));
                buffer[start + at] = 0;
            }
            if (length != 0) {
                buffer[start + length - 1] = 1;  // the last byte
                CHECK_FALSE(iovecs_are_zero({&one, 1}, length));
                CHECK(iovecs_are_zero({&one, 1}, length - 1));  // only `bytes` of them count
                buffer[start + length - 1] = 0;
            }
            buffer[start + length] = 1;  // just past: not looked at
            CHECK(iovecs_are_zero({&one, 1}, length));
            buffer[start + length] = 0;
        }
    }
    // Split over several buffers, a non-zero byte in the last one.
    iovec three[] = {{buffer.data() + 1, 5}, {buffer.data() + 100, 0}, {buffer.data() + 200, 1000}};
    CHECK(iovecs_are_zero(three, 1005));
    buffer[200 + 999] = 2;
    CHECK_FALSE(iovecs_are_zero(three, 1005));
    CHECK(iovecs_are_zero(three, 1004));
}

TEST_CASE("disk image: a second writer is refused, readers share")
{
    TempDir dir;
    const auto path = dir.file("shared.raw", 4096, 'x');
    {
        auto writer = DiskImage::open({path, false});
        CHECK(open_error({path, false}).find("in use by another lkvm") != std::string::npos);
        CHECK(open_error({path, true}).find("in use by another lkvm") != std::string::npos);
    }
    {
        auto reader1 = DiskImage::open({path, true});
        auto reader2 = DiskImage::open({path, true});
        CHECK(reader2.read_only());
        CHECK(open_error({path, false}).find("add ',ro' to share it read-only") != std::string::npos);
    }
    auto again = DiskImage::open({path, false});  // locks go with the images
    std::ifstream in(path, std::ios::binary);
    CHECK(std::string(std::istreambuf_iterator<char>(in), {}) == std::string(4096, 'x'));  // untouched
}

TEST_CASE("io engines: write, flush and read back through each engine")
{
    TempDir dir;
    const auto path = dir.file("engine.raw", 1 << 20);
    for (EngineKind kind : kDataEngines) {
        CAPTURE(std::string(engine_kind_name(kind)));
        auto image = DiskImage::open({path, false});
        auto engine = make_io_engine(kind, 64);
        CHECK(std::string(engine->name()) == engine_kind_name(kind));
        write_and_read_back(*engine, image.fd());
    }
}

TEST_CASE("io engines: has_completions tells whether reap would find something")
{
    TempDir dir;
    const auto path = dir.file("poll.raw", 4096, 'p');
    for (EngineKind kind : kAllEngines) {
        CAPTURE(std::string(engine_kind_name(kind)));
        auto image = DiskImage::open({path, false});
        auto engine = make_io_engine(kind, 8);
        CHECK_FALSE(engine->has_completions());
        char buf[512];
        iovec iov{buf, sizeof(buf)};
        const IoRequest read{IoOp::kRead, image.fd(), 0, &iov, 1, 5};
        engine->submit(std::span(&read, 1));
        REQUIRE(engine->wait_for_completions(5000));
        CHECK(engine->has_completions());
        std::vector<IoCompletion> done;
        CHECK(engine->reap(done) == 1);
        CHECK_FALSE(engine->has_completions());
        REQUIRE(done.size() == 1);
        CHECK(done[0].result == 512);
        CHECK(engine->in_flight() == 0);
    }
}

TEST_CASE("io engines: errors come back as -errno, the null engine moves no data")
{
    char buf[512] = {1};
    iovec iov{buf, sizeof(buf)};
    const IoRequest bad{IoOp::kRead, -1, 0, &iov, 1, 7};
    TempDir dir;
    const auto path = dir.file("errors.raw", 4096);
    for (EngineKind kind : kDataEngines) {
        CAPTURE(std::string(engine_kind_name(kind)));
        auto engine = make_io_engine(kind, 4);
        auto done = run(*engine, {bad});
        REQUIRE(done.size() == 1);
        CHECK(done[0].cookie == 7);
        CHECK(done[0].result == -EBADF);
        // The engine goes on working after a refusal, in the same batch too.
        auto image = DiskImage::open({path, false});
        done = run(*engine, {bad, {IoOp::kRead, image.fd(), 0, &iov, 1, 8}});
        REQUIRE(done.size() == 2);
        for (const auto& c : done)
            CHECK(c.result == (c.cookie == 7 ? -EBADF : 512));
    }

    auto null = make_io_engine(EngineKind::kNull, 4);
    buf[0] = 1;
    const auto done = run(*null, {bad});
    REQUIRE(done.size() == 1);
    CHECK(done[0].result == 512);
    CHECK(buf[0] == 1);
}

TEST_CASE("io engines: io_uring registered files")
{
    TempDir dir;
    const auto path = dir.file("registered.raw", 1 << 20);
    auto image = DiskImage::open({path, false});
    auto engine = make_io_engine(EngineKind::kIoUring, 16);
    engine->register_file(image.fd());
    engine->register_file(image.fd());  // twice is harmless
    write_and_read_back(*engine, image.fd());
    engine->unregister_file(image.fd());
    engine->unregister_file(image.fd());
    write_and_read_back(*engine, image.fd());

    // More files than the table holds: the rest work unregistered.
    std::vector<Fd> fds;
    for (int i = 0; i < 80; ++i) {
        fds.emplace_back(::dup(image.fd()));
        engine->register_file(fds.back().get());
    }
    char buf[512];
    iovec iov{buf, sizeof(buf)};
    std::vector<IoRequest> reads;
    for (size_t i = 0; i < fds.size(); i += 8)
        reads.push_back({IoOp::kRead, fds[i].get(), 0, &iov, 1, i});
    for (const auto& c : run(*engine, reads))
        CHECK(c.result == 512);
    for (const auto& fd : fds)
        engine->unregister_file(fd.get());

    // Engines without registration accept the calls and ignore them.
    auto sync = make_io_engine(EngineKind::kSync, 4);
    sync->register_file(image.fd());
    write_and_read_back(*sync, image.fd());
    sync->unregister_file(image.fd());
}

TEST_CASE("ioprio: our encoding is the kernel's")
{
    // The ABI (include/uapi/linux/ioprio.h): class in bits 13-15, classes 1-3, levels 0-7.
    static_assert(ioprio::kClassShift == 13 && ioprio::kLevels == 8 && ioprio::kWhoProcess == 1);
    static_assert(ioprio::value(ioprio::Class::kRealtime, 0) == (1 << 13));
    static_assert(ioprio::value(ioprio::Class::kBestEffort, 7) == ((2 << 13) | 7));
    static_assert(ioprio::value(ioprio::Class::kIdle, 0) == (3 << 13));
    static_assert(!ioprio::value(ioprio::Class::kNone, 0) && !ioprio::value(ioprio::Class::kBestEffort, 8));

    // And the running kernel reads back every value we build, on this thread.
    const long before = ::syscall(SYS_ioprio_get, ioprio::kWhoProcess, 0);
    REQUIRE(before >= 0);
    for (auto klass : {ioprio::Class::kRealtime, ioprio::Class::kBestEffort, ioprio::Class::kIdle}) {
        for (unsigned level = 0; level < ioprio::kLevels; ++level) {
            const uint16_t value = *ioprio::value(klass, level);
            CAPTURE(value);
            if (::syscall(SYS_ioprio_set, ioprio::kWhoProcess, 0, static_cast<int>(value)) < 0) {
                const int err = errno;
                // Only the realtime class needs a privilege (CAP_SYS_ADMIN or CAP_SYS_NICE).
                CHECK((klass == ioprio::Class::kRealtime && err == EPERM));
                continue;
            }
            CHECK(::syscall(SYS_ioprio_get, ioprio::kWhoProcess, 0) == value);
        }
    }
    // A fourth class is not one the kernel knows.
    const long refused = ::syscall(SYS_ioprio_set, ioprio::kWhoProcess, 0, 4 << ioprio::kClassShift);
    const int refused_errno = errno;
    CHECK(refused == -1);
    CHECK(refused_errno == EINVAL);
    ::syscall(SYS_ioprio_set, ioprio::kWhoProcess, 0, static_cast<int>(before));
}

TEST_CASE("io engines: requests with an I/O priority")
{
    TempDir dir;
    const auto path = dir.file("ioprio.raw", 1 << 20);
    constexpr auto kLowBestEffort = *ioprio::value(ioprio::Class::kBestEffort, 7);
    // The sync engine sets it on this thread: put the thread back afterwards.
    const long before = ::syscall(SYS_ioprio_get, ioprio::kWhoProcess, 0);
    REQUIRE(before >= 0);
    for (EngineKind kind : kAllEngines) {
        CAPTURE(std::string(engine_kind_name(kind)));
        auto image = DiskImage::open({path, false});
        auto engine = make_io_engine(kind, 32);
        if (kind == EngineKind::kNull) {
            char buf[512];
            iovec iov{buf, sizeof(buf)};
            const auto done = run(*engine, {{IoOp::kRead, image.fd(), 0, &iov, 1, 1, kLowBestEffort}});
            REQUIRE(done.size() == 1);
            CHECK(done[0].result == 512);
            continue;
        }
        write_and_read_back(*engine, image.fd(), kLowBestEffort);
        if (kind == EngineKind::kSync)
            CHECK(::syscall(SYS_ioprio_get, ioprio::kWhoProcess, 0) == kLowBestEffort);
    }
    ::syscall(SYS_ioprio_set, ioprio::kWhoProcess, 0, static_cast<int>(before));
}

TEST_CASE("io engines: names")
{
    CHECK(parse_engine_kind("sync") == EngineKind::kSync);
    CHECK(parse_engine_kind("native") == EngineKind::kNative);
    CHECK(parse_engine_kind("io_uring") == EngineKind::kIoUring);
    CHECK(parse_engine_kind("null") == EngineKind::kNull);
    for (EngineKind kind : kAllEngines)
        CHECK(parse_engine_kind(engine_kind_name(kind)) == kind);
    CHECK_THROWS_WITH_AS(parse_engine_kind("fast"), "aio=fast: unknown I/O engine; use sync, native, io_uring or null",
                         Error);
    const EngineKind fallback = default_engine_kind();
    CHECK((fallback == EngineKind::kIoUring || fallback == EngineKind::kNative));
    CHECK(default_engine_kind() == fallback);
    CHECK(make_io_engine(fallback, 4) != nullptr);
}

TEST_CASE("io_uring engine: a registered image does not keep its lock once the image is closed")
{
    TempDir dir;
    const auto path = dir.file("locked.raw", 1 << 20, 'x');
    auto engine = make_io_engine(EngineKind::kIoUring, 8);
    {
        DiskImage image = DiskImage::open({path, false});
        engine->register_file(image.fd());
        char buffer[512];
        iovec iov{buffer, sizeof(buffer)};
        const IoRequest read{IoOp::kRead, image.fd(), 0, &iov, 1, 7};
        engine->submit(std::span(&read, 1));
        std::vector<IoCompletion> done;
        while (done.empty()) {
            engine->wait_for_completions(1000);
            engine->reap(done);
        }
        CHECK(done[0].result == 512);
        CHECK(buffer[0] == 'x');
    }
    // The engine, its ring and the registration live on (as the kernel may keep
    // a ring's files a while after lkvm is gone); the image is closed: a second
    // user may lock it.
    CHECK_NOTHROW(DiskImage::open({path, false}));
}

TEST_CASE("io engines: discard deallocates and reads back zeroes, write-zeroes zeroes in place")
{
    TempDir dir;
    constexpr size_t kSize = 1 << 20, kRange = 256 << 10;
    for (const EngineKind kind : kDataEngines) {
        CAPTURE(std::string(engine_kind_name(kind)));
        const auto path = dir.file(std::string("alloc-") + engine_kind_name(kind) + ".raw", kSize, 'x');
        const auto image = DiskImage::open({path, false});
        ::fsync(image.fd());
        struct stat before {};
        ::fstat(image.fd(), &before);
        auto engine = make_io_engine(kind, 8);
        IoRequest discard{IoOp::kDiscard, image.fd(), 128 << 10, nullptr, 0, 1};
        discard.length = kRange;
        IoRequest zeroes{IoOp::kWriteZeroes, image.fd(), 512 << 10, nullptr, 0, 2};
        zeroes.length = kRange;
        const auto done = run(*engine, {discard, zeroes});
        REQUIRE(done.size() == 2);
        for (const auto& c : done)
            CHECK(c.result == 0);

        std::vector<char> back(kSize);
        REQUIRE(::pread(image.fd(), back.data(), kSize, 0) == static_cast<ssize_t>(kSize));
        for (size_t at = 0; at < kSize; at += 4096) {
            const bool zeroed = (at >= (128 << 10) && at < (128 << 10) + kRange) || (at >= (512 << 10) && at < (512 << 10) + kRange);
            CAPTURE(at);
            CHECK(back[at] == (zeroed ? 0 : 'x'));
            CHECK(back[at + 4095] == (zeroed ? 0 : 'x'));
        }
        struct stat after {};
        ::fstat(image.fd(), &after);
        CHECK(after.st_size == before.st_size);
        // ext4 and tmpfs punch holes: the discarded range no longer takes space.
        CHECK(after.st_blocks <= before.st_blocks - static_cast<blkcnt_t>(kRange / 512));
    }
}

namespace {
// Each round, as the I/O thread does: notification off, a request,
// notification on, then look, and sleep on the eventfd if nothing is there.
// A completion posted just as notification came back on must be seen by the
// look or signalled. Flushes complete from the kernel's workers on another
// CPU, cached reads within submit(); a varying spin moves where the
// completion lands. A lost one is a sleep that times out. With a task run
// mode has_completions() may also say yes for task work that posts nothing
// (a kernel worker's request being freed): reap() then finds nothing, and
// the wait goes on.
void expect_no_completion_lost(IoEngine& engine, int fd, uint64_t rounds)
{
    char buf[512];
    iovec iov{buf, sizeof(buf)};
    std::vector<IoCompletion> done;
    for (uint64_t round = 0; round < rounds; ++round) {
        CAPTURE(round);
        engine.set_event_notification(false);
        const IoRequest request = round % 4 == 3 ? IoRequest{IoOp::kRead, fd, 0, &iov, 1, round}
                                                 : IoRequest{IoOp::kFlush, fd, 0, nullptr, 0, round};
        engine.submit(std::span(&request, 1));
        for (volatile unsigned spin = 0; spin < (round * 7919) % 4096;)
            spin = spin + 1;
        engine.set_event_notification(true);
        done.clear();
        while (done.empty()) {
            // A readable eventfd may be left from an earlier round: a wakeup is a hint.
            while (!engine.has_completions()) {
                pollfd p{engine.event_fd(), POLLIN, 0};
                REQUIRE(::poll(&p, 1, 5000) == 1);
                engine.clear_event();
            }
            engine.reap(done);
        }
        REQUIRE(done.size() == 1);
        CHECK(done[0].cookie == round);
        CHECK(done[0].result == (round % 4 == 3 ? 512 : 0));
    }
    CHECK(engine.in_flight() == 0);
}
}  // namespace

TEST_CASE("io_uring engine: no completion is lost around turning the eventfd back on")
{
    TempDir dir;
    const auto path = dir.file("race.raw", 4096, 'r');
    auto image = DiskImage::open({path, false});
    auto engine = make_io_engine(EngineKind::kIoUring, 4);
    expect_no_completion_lost(*engine, image.fd(), 2000);
}

TEST_CASE("io_uring engine: while notification is off the eventfd stays quiet")
{
    TempDir dir;
    const auto path = dir.file("quiet.raw", 4096, 'q');
    auto image = DiskImage::open({path, false});
    auto engine = make_io_engine(EngineKind::kIoUring, 4);
    char buf[512];
    iovec iov{buf, sizeof(buf)};
    engine->set_event_notification(false);
    const IoRequest read{IoOp::kRead, image.fd(), 0, &iov, 1, 1};
    engine->submit(std::span(&read, 1));
    while (!engine->has_completions())
        ;  // polling, as the I/O thread does meanwhile
    pollfd p{engine->event_fd(), POLLIN, 0};
    CHECK(::poll(&p, 1, 0) == 0);  // no signal: no system call to drain it
    engine->set_event_notification(true);
    std::vector<IoCompletion> done;
    CHECK(engine->reap(done) == 1);
}

namespace {
// The io_uring setup flag sets worth testing: none, the default, and each
// task run mode with and without a single issuer (the engine adds
// TASKRUN_FLAG to a task run mode, and drops what the kernel does not take).
std::vector<unsigned> uring_setups()
{
    return {0,
            default_uring_setup_flags(),
            IORING_SETUP_SINGLE_ISSUER,
            IORING_SETUP_COOP_TASKRUN,
            IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN,
            IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN};
}

// An anonymous mapping, as guest RAM is.
struct AnonMemory {
    explicit AnonMemory(size_t size_) : size(size_)
    {
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        REQUIRE(p != MAP_FAILED);
        bytes = static_cast<char*>(p);
    }
    ~AnonMemory() { ::munmap(bytes, size); }
    AnonMemory(const AnonMemory&) = delete;
    AnonMemory& operator=(const AnonMemory&) = delete;
    char* bytes;
    size_t size;
};
}  // namespace

TEST_CASE("io_uring engine: the setup flag probe")
{
    const unsigned taken = uring_setup_flags_supported();
    CHECK(uring_setup_flags_supported() == taken);  // once per process
    // TASKRUN_FLAG comes with a task run mode; DEFER_TASKRUN needs SINGLE_ISSUER.
    CHECK(((taken & IORING_SETUP_TASKRUN_FLAG) != 0) ==
          ((taken & (IORING_SETUP_COOP_TASKRUN | IORING_SETUP_DEFER_TASKRUN)) != 0));
    if (taken & IORING_SETUP_DEFER_TASKRUN)
        CHECK((taken & IORING_SETUP_SINGLE_ISSUER) != 0);
    char text[16];
    std::snprintf(text, sizeof(text), "0x%x", taken);
    MESSAGE("this kernel takes io_uring setup flags ", text);
}

TEST_CASE("io_uring engine: each setup flag set moves data, buffered and direct")
{
    TempDir dir;
    const auto path = dir.file("setup.raw", 1 << 20);
    AnonMemory memory(64 << 10);  // aligned, for O_DIRECT
    for (const unsigned setup : uring_setups()) {
        CAPTURE(setup);
        auto engine = make_uring_engine(16, setup, false);
        {
            auto image = DiskImage::open({path, false});
            engine->register_file(image.fd());
            write_and_read_back(*engine, image.fd());
            engine->unregister_file(image.fd());
        }

        // Direct: completions come from the device's interrupt as task work
        // (which COOP_TASKRUN and DEFER_TASKRUN leave for us to ask for).
        auto direct = DiskImage::open({path, false, CacheMode::kNone});
        for (size_t i = 0; i < 16; ++i)
            std::memset(memory.bytes + i * 4096, static_cast<int>('A' + i + setup % 7), 4096);
        std::vector<iovec> iov(16);
        std::vector<IoRequest> writes, reads;
        for (size_t i = 0; i < 8; ++i) {
            iov[i] = {memory.bytes + i * 4096, 4096};
            iov[8 + i] = {memory.bytes + (8 + i) * 4096, 4096};
            writes.push_back({IoOp::kWrite, direct.fd(), i * 4096, &iov[i], 1, i});
            reads.push_back({IoOp::kRead, direct.fd(), i * 4096, &iov[8 + i], 1, 8 + i});
        }
        for (const auto& c : run(*engine, writes))
            CHECK(c.result == 4096);
        for (const auto& c : run(*engine, reads))
            CHECK(c.result == 4096);
        CHECK(std::memcmp(memory.bytes, memory.bytes + 8 * 4096, 8 * 4096) == 0);
    }
}

TEST_CASE("io_uring engine: no completion is lost around turning the eventfd back on, each setup flag set")
{
    // With a task run mode the kernel marks the SQ ring and leaves the
    // completion as task work, which the look must see as well.
    TempDir dir;
    const auto path = dir.file("race-setup.raw", 4096, 'r');
    auto image = DiskImage::open({path, false});
    for (const unsigned setup : uring_setups()) {
        CAPTURE(setup);
        auto engine = make_uring_engine(4, setup, false);
        expect_no_completion_lost(*engine, image.fd(), 500);
    }
}

TEST_CASE("io_uring engine: made and used on one thread, destroyed on another")
{
    // As an I/O thread's engines are. A single-issuer ring takes no
    // submission from the destroying thread; a DEFER_TASKRUN one does not
    // post completions to it either.
    TempDir dir;
    const auto path = dir.file("owner.raw", 1 << 16, 'o');
    auto image = DiskImage::open({path, false});
    for (const unsigned setup : uring_setups()) {
        CAPTURE(setup);
        std::unique_ptr<IoEngine> engine;
        char buf[4096] = {};
        const iovec iov{buf, sizeof(buf)};
        std::thread owner([&] {
            engine = make_uring_engine(4, setup, true);
            engine->register_file(image.fd());
            engine->register_memory(std::span(&iov, 1));
            CHECK(run(*engine, {{IoOp::kRead, image.fd(), 0, &iov, 1, 1}})[0].result == 4096);
        });
        owner.join();
        CHECK(buf[0] == 'o');
        engine.reset();
    }
}

TEST_CASE("io_uring engine: direct requests within registered memory use it, others go as before")
{
    TempDir dir;
    const auto path = dir.file("fixed.raw", 1 << 20, 'f');
    // Registered: the middle 256 KiB of a mapping of 512 KiB, so that
    // requests can reach past either end of it into memory that is mapped.
    AnonMemory memory(512 << 10);
    char* const area = memory.bytes + (128 << 10);
    constexpr size_t kArea = 256 << 10;
    const iovec registered{area, kArea};
    for (const bool direct : {false, true}) {
        for (const unsigned setup : {0u, default_uring_setup_flags()}) {
            CAPTURE(direct);
            CAPTURE(setup);
            auto image = DiskImage::open({path, false, direct ? CacheMode::kNone : CacheMode::kWriteback});
            auto engine = make_uring_engine(16, setup, true);
            engine->register_file(image.fd());
            engine->register_memory(std::span(&registered, 1));

            // Writes from the first half of it, reads back into the second.
            constexpr size_t kRequests = 8, kSize = 8192;
            std::vector<iovec> iov(2 * kRequests);
            std::vector<IoRequest> writes, reads;
            for (size_t i = 0; i < kRequests; ++i) {
                for (size_t b = 0; b < kSize; ++b)
                    area[i * kSize + b] = static_cast<char>(i * 31 + b * 7 + direct);
                iov[i] = {area + i * kSize, kSize};
                iov[kRequests + i] = {area + kArea / 2 + i * kSize, kSize};
                writes.push_back({IoOp::kWrite, image.fd(), i * kSize, &iov[i], 1, i});
                reads.push_back({IoOp::kRead, image.fd(), i * kSize, &iov[kRequests + i], 1, 100 + i});
            }
            for (const auto& c : run(*engine, writes))
                CHECK(c.result == static_cast<int64_t>(kSize));
            for (const auto& c : run(*engine, reads))
                CHECK(c.result == static_cast<int64_t>(kSize));
            CHECK(std::memcmp(area, area + kArea / 2, kRequests * kSize) == 0);

            // Partly outside it (before its start, past its end), wholly
            // outside it, and two buffers of which one is outside: readv, and
            // every byte arrives.
            char* const before = memory.bytes;
            std::memset(before, 0, memory.size);
            std::memset(area, 0, kArea);
            const iovec starts_before{area - 4096, 8192};
            const iovec ends_after{area + kArea - 4096, 8192};
            const iovec outside{before, 8192};
            const iovec two[] = {{area, 4096}, {area + kArea, 4096}};
            const auto done = run(*engine, {{IoOp::kRead, image.fd(), 0, &starts_before, 1, 1},
                                            {IoOp::kRead, image.fd(), 0, &ends_after, 1, 2},
                                            {IoOp::kRead, image.fd(), 0, &outside, 1, 3},
                                            {IoOp::kRead, image.fd(), 0, two, 2, 4}});
            REQUIRE(done.size() == 4);
            for (const auto& c : done)
                CHECK(c.result == 8192);
            std::vector<char> expected(8192);
            const Fd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
            REQUIRE(::pread(file.get(), expected.data(), expected.size(), 0) == 8192);
            CHECK(std::memcmp(starts_before.iov_base, expected.data(), 8192) == 0);
            CHECK(std::memcmp(ends_after.iov_base, expected.data(), 8192) == 0);
            CHECK(std::memcmp(outside.iov_base, expected.data(), 8192) == 0);
            CHECK(std::memcmp(two[0].iov_base, expected.data(), 4096) == 0);
            CHECK(std::memcmp(two[1].iov_base, expected.data() + 4096, 4096) == 0);
        }
    }

    // Proof of which path a request takes (and the caveat register_memory()
    // states): a fixed request uses the pages pinned when its piece was
    // registered (by the first request in it), so a page discarded since
    // still writes its old contents ('p'), where any other request writes
    // what we see now (zeroes).
    const Fd reader(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    const iovec pinned{area, 4096};
    auto written = [&](IoEngine& engine, int fd) {
        std::memset(area, 'p', 4096);
        CHECK(run(engine, {{IoOp::kWrite, fd, 0, &pinned, 1, 1}})[0].result == 4096);
        ::madvise(area, 4096, MADV_DONTNEED);
        REQUIRE(area[0] == 0);
        CHECK(run(engine, {{IoOp::kWrite, fd, 0, &pinned, 1, 2}})[0].result == 4096);
        char back[4096];
        REQUIRE(::pread(reader.get(), back, sizeof(back), 0) == 4096);
        CHECK(back[0] == back[4095]);
        return back[0];
    };
    {
        auto direct = DiskImage::open({path, false, CacheMode::kNone});
        auto engine = make_uring_engine(4, default_uring_setup_flags(), true);
        engine->register_memory(std::span(&registered, 1));
        CHECK(written(*engine, direct.fd()) == 0);  // a file not registered
        engine->register_file(direct.fd());
        CHECK(written(*engine, direct.fd()) == 'p');
        engine->register_memory({});  // registration undone
        CHECK(written(*engine, direct.fd()) == 0);
        auto off = make_uring_engine(4, default_uring_setup_flags(), false);
        off->register_file(direct.fd());
        off->register_memory(std::span(&registered, 1));
        CHECK(written(*off, direct.fd()) == 0);  // fixed buffers off
    }
    {
        // Through the page cache a fixed buffer pins nothing and copies slower.
        auto buffered = DiskImage::open({path, false});
        auto engine = make_uring_engine(4, default_uring_setup_flags(), true);
        engine->register_file(buffered.fd());
        engine->register_memory(std::span(&registered, 1));
        CHECK(written(*engine, buffered.fd()) == 0);
    }

    {
        // Memory of several pieces (2 MiB each, the last shorter): a request
        // in any one of them is fixed, one across two goes as before.
        AnonMemory big(5 << 20);
        const iovec whole{big.bytes, big.size};
        auto direct = DiskImage::open({path, false, CacheMode::kNone});
        auto engine = make_uring_engine(8, default_uring_setup_flags(), true);
        engine->register_file(direct.fd());
        engine->register_memory(std::span(&whole, 1));
        const iovec first{big.bytes + 4096, 4096}, across{big.bytes + (2 << 20) - 4096, 8192},
            last{big.bytes + big.size - 4096, 4096};
        std::memset(big.bytes, 0, big.size);
        const auto done = run(*engine, {{IoOp::kRead, direct.fd(), 0, &first, 1, 1},
                                        {IoOp::kRead, direct.fd(), 4096, &across, 1, 2},
                                        {IoOp::kRead, direct.fd(), 8192, &last, 1, 3}});
        REQUIRE(done.size() == 3);
        std::vector<char> expected(3 * 4096);
        REQUIRE(::pread(reader.get(), expected.data(), expected.size(), 0) == 3 * 4096);
        for (const auto& c : done) {
            CAPTURE(c.cookie);
            CHECK(c.result == (c.cookie == 2 ? 8192 : 4096));
        }
        CHECK(std::memcmp(first.iov_base, expected.data(), 4096) == 0);
        CHECK(std::memcmp(across.iov_base, expected.data() + 4096, 8192) == 0);
        CHECK(std::memcmp(last.iov_base, expected.data() + 8192, 4096) == 0);
        // The last piece is registered (its first request pinned its page).
        std::memset(last.iov_base, 'l', 4096);
        CHECK(run(*engine, {{IoOp::kWrite, direct.fd(), 0, &last, 1, 4}})[0].result == 4096);
        ::madvise(last.iov_base, 4096, MADV_DONTNEED);
        CHECK(run(*engine, {{IoOp::kWrite, direct.fd(), 0, &last, 1, 5}})[0].result == 4096);
        char back[4096];
        REQUIRE(::pread(reader.get(), back, sizeof(back), 0) == 4096);
        CHECK(back[0] == 'l');
    }

    // Engines without registration take the call and ignore it.
    auto sync = make_io_engine(EngineKind::kSync, 4);
    sync->register_memory(std::span(&registered, 1));
}
