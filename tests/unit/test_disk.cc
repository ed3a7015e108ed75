// Disk images (checks and locks) and the I/O engines.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "base/error.h"
#include "disk/disk_image.h"
#include "disk/io_engine.h"

using namespace lkvm;

namespace {
struct TempDir {
    std::filesystem::path path;
    TempDir()
    {
        char tmpl[] = "/tmp/lkvm-unit.XXXXXX";
        path = ::mkdtemp(tmpl);
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string file(const std::string& name, size_t size, char fill = 0)
    {
        const auto p = (path / name).string();
        std::ofstream(p, std::ios::binary) << std::string(size, fill);
        return p;
    }
};

std::string open_error(const DiskImageOptions& options)
{
    try {
        DiskImage::open(options);
    } catch (const Error& e) {
        return e.what();
    }
    return "(opened)";
}
}  // namespace

TEST_CASE("disk image: size, read-only and what cannot be a disk")
{
    TempDir dir;
    const auto ok = dir.file("ok.raw", 1 << 20);
    auto image = DiskImage::open({ok, false, false});
    CHECK(image.size() == 1 << 20);
    CHECK_FALSE(image.read_only());
    CHECK(image.alignment() == 1);

    CHECK(open_error({dir.path / "missing.raw", false, false}).find("No such file") != std::string::npos);
    CHECK(open_error({dir.path.string(), false, false}).find("is a directory") != std::string::npos);
    CHECK(open_error({dir.file("odd.raw", 1000), false, false}).find("not a multiple of 512") != std::string::npos);
    CHECK(open_error({dir.file("empty.raw", 0), false, false}).find("is empty") != std::string::npos);
}

TEST_CASE("disk image: a second writer is refused, readers share")
{
    TempDir dir;
    const auto path = dir.file("shared.raw", 4096, 'x');
    {
        auto writer = DiskImage::open({path, false, false});
        CHECK(open_error({path, false, false}).find("in use by another lkvm") != std::string::npos);
        CHECK(open_error({path, true, false}).find("in use by another lkvm") != std::string::npos);
    }
    {
        auto reader1 = DiskImage::open({path, true, false});
        auto reader2 = DiskImage::open({path, true, false});
        CHECK(reader2.read_only());
        CHECK(open_error({path, false, false}).find("add ',ro' to share it read-only") != std::string::npos);
    }
    auto again = DiskImage::open({path, false, false});  // locks go with the images
    std::ifstream in(path, std::ios::binary);
    CHECK(std::string(std::istreambuf_iterator<char>(in), {}) == std::string(4096, 'x'));  // untouched
}

TEST_CASE("io engines: write, flush and read back through each engine")
{
    TempDir dir;
    const auto path = dir.file("engine.raw", 1 << 20);
    for (EngineKind kind : {EngineKind::kSync, EngineKind::kNative}) {
        CAPTURE(engine_kind_name(kind));
        auto image = DiskImage::open({path, false, false});
        auto engine = make_io_engine(kind, 64);
        std::vector<std::vector<char>> out(8, std::vector<char>(4096)), in(8, std::vector<char>(4096));
        std::vector<iovec> out_iov(8), in_iov(8);
        std::vector<IoRequest> writes, reads;
        for (size_t i = 0; i < 8; ++i) {
            std::memset(out[i].data(), static_cast<int>('a' + i), 4096);
            out_iov[i] = {out[i].data(), 4096};
            in_iov[i] = {in[i].data(), 4096};
            writes.push_back({IoOp::kWrite, image.fd(), i * 8192, &out_iov[i], 1, i});
            reads.push_back({IoOp::kRead, image.fd(), i * 8192, &in_iov[i], 1, 100 + i});
        }
        auto run = [&](std::vector<IoRequest> batch) {
            engine->submit(batch);
            std::vector<IoCompletion> done;
            while (done.size() < batch.size()) {
                uint64_t ignored;
                pollfd p{engine->event_fd(), POLLIN, 0};
                ::poll(&p, 1, 5000);
                [[maybe_unused]] auto n = ::read(engine->event_fd(), &ignored, 8);
                engine->reap(done);
            }
            CHECK(engine->in_flight() == 0);
            return done;
        };
        for (const auto& c : run(writes))
            CHECK(c.result == 4096);
        const auto flushed = run({{IoOp::kFlush, image.fd(), 0, nullptr, 0, 42}});
        CHECK(flushed[0].cookie == 42);
        CHECK(flushed[0].result == 0);
        for (const auto& c : run(reads)) {
            CHECK(c.result == 4096);
            CHECK(in[c.cookie - 100] == out[c.cookie - 100]);
        }
    }
}

TEST_CASE("io engines: errors come back as -errno, the null engine moves no data")
{
    auto sync = make_io_engine(EngineKind::kSync, 4);
    char buf[512] = {1};
    iovec iov{buf, sizeof(buf)};
    const IoRequest bad{IoOp::kRead, -1, 0, &iov, 1, 7};
    sync->submit(std::span(&bad, 1));
    std::vector<IoCompletion> done;
    sync->reap(done);
    REQUIRE(done.size() == 1);
    CHECK(done[0].result == -EBADF);

    auto null = make_io_engine(EngineKind::kNull, 4);
    null->submit(std::span(&bad, 1));
    done.clear();
    null->reap(done);
    REQUIRE(done.size() == 1);
    CHECK(done[0].result == 512);
    CHECK(buf[0] == 1);
    CHECK_THROWS_AS(parse_engine_kind("fast"), Error);
    CHECK(parse_engine_kind("native") == EngineKind::kNative);
}
