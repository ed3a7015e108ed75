// Snapshot disks (disk/snapshot.h): the cluster map, the overlay's copy-up,
// how requests are split between the image and the overlay, and the
// options that ask for a snapshot.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cli/command_line.h"
#include "disk/disk_image.h"
#include "disk/offload.h"
#include "disk/snapshot.h"
#include "tests/unit/test_util.h"

using namespace lkvm;
using lkvm::test::error_of;
using lkvm::test::TempDir;

namespace {

constexpr uint32_t kCluster = 64 << 10;

// An image whose byte i is (i / 512 + i % 512) & 0xff: every sector differs.
std::string patterned_image(TempDir& dir, const std::string& name, uint64_t size)
{
    std::vector<uint8_t> data(size);
    for (uint64_t i = 0; i < size; ++i)
        data[i] = static_cast<uint8_t>(i / 512 + i % 512);
    const std::string path = (dir.path / name).string();
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(data.data()), static_cast<long>(size));
    return path;
}

uint8_t pattern(uint64_t i) { return static_cast<uint8_t>(i / 512 + i % 512); }

std::vector<uint8_t> pread_bytes(int fd, uint64_t offset, size_t length)
{
    std::vector<uint8_t> out(length);
    REQUIRE(::pread(fd, out.data(), length, static_cast<off_t>(offset)) == static_cast<ssize_t>(length));
    return out;
}

using Run = std::tuple<uint64_t, uint64_t, bool>;

std::vector<Run> runs(const ClusterMap& map, uint64_t offset, uint64_t length)
{
    std::vector<Run> out;
    map.for_each_run(offset, length, [&](uint64_t at, uint64_t n, bool overlay) { out.emplace_back(at, n, overlay); });
    return out;
}

// Runs SnapshotRequests' parts on the calling thread, when asked: an engine
// as the tests drive it.
struct Executor {
    struct Sent {
        EngineKind engine;
        IoRequest io;
    };
    std::vector<Sent> sent;
    std::vector<std::pair<uint64_t, int64_t>> finished;
    SnapshotRequests requests{[this](EngineKind engine, const IoRequest& io) { sent.push_back({engine, io}); },
                              [this](uint64_t cookie, int64_t result) { finished.emplace_back(cookie, result); },
                              1};  // storage for one request: more make it grow

    // Performs every part sent so far (the last first: completions come in any order).
    void run_all()
    {
        std::atomic<bool> cancel{false};
        while (!sent.empty()) {
            const IoRequest io = sent.back().io;
            sent.pop_back();
            int64_t result = 0;
            switch (io.op) {
            case IoOp::kRead: result = ::preadv(io.fd, io.iov, io.iovcnt, static_cast<off_t>(io.offset)); break;
            case IoOp::kWrite: result = ::pwritev(io.fd, io.iov, io.iovcnt, static_cast<off_t>(io.offset)); break;
            default: result = perform_allocation(io, cancel); break;
            }
            if (result < 0 && io.op != IoOp::kDiscard && io.op != IoOp::kWriteZeroes && io.op != IoOp::kBlocking)
                result = -errno;
            requests.complete(static_cast<uint32_t>(io.cookie), result);
        }
    }
};

}  // namespace

TEST_CASE("snapshot cluster map: cluster arithmetic, a short last cluster")
{
    const ClusterMap map(3 * kCluster + 4096, kCluster);
    CHECK(map.clusters() == 4);
    CHECK(map.cluster_of(kCluster - 1) == 0);
    CHECK(map.cluster_of(kCluster) == 1);
    CHECK(map.cluster_length(0) == kCluster);
    CHECK(map.cluster_length(3) == 4096);
    CHECK(map.allocated_clusters() == 0);
    CHECK(error_of([] { ClusterMap(1 << 20, 3000); }).find("not a power of two") != std::string::npos);
}

TEST_CASE("snapshot cluster map: a range splits into runs of one place each, at cluster edges")
{
    ClusterMap map(8 * kCluster, kCluster);
    // Nothing allocated: one run from the image, however many clusters it spans.
    CHECK(runs(map, 512, 5 * kCluster) == std::vector<Run>{{512, 5 * kCluster, false}});
    map.set_allocated(2);
    map.set_allocated(3);
    map.set_allocated(5);
    CHECK(map.allocated_clusters() == 3);
    map.set_allocated(5);  // twice counts once
    CHECK(map.allocated_clusters() == 3);
    // From the middle of cluster 1 to the middle of cluster 6.
    const uint64_t start = kCluster + 4096, end = 6 * kCluster + 512;
    CHECK(runs(map, start, end - start) == std::vector<Run>{{start, kCluster - 4096, false},
                                                           {2 * kCluster, 2 * kCluster, true},
                                                           {4 * kCluster, kCluster, false},
                                                           {5 * kCluster, kCluster, true},
                                                           {6 * kCluster, 512, false}});
    // Inside one allocated cluster: one run.
    CHECK(runs(map, 2 * kCluster + 512, 1024) == std::vector<Run>{{2 * kCluster + 512, 1024, true}});
    CHECK(runs(map, 0, 0).empty());
    CHECK(map.all_allocated(2 * kCluster, 2 * kCluster));
    CHECK(map.all_allocated(2 * kCluster + 512, 2 * kCluster - 1024));
    CHECK_FALSE(map.all_allocated(2 * kCluster, 2 * kCluster + 1));
    CHECK_FALSE(map.all_allocated(kCluster - 512, 1024));
    CHECK(map.all_allocated(0, 0));
}

TEST_CASE("snapshot cluster map: workers locking overlapping ranges never hold one cluster at once")
{
    constexpr uint64_t kClusters = 16;
    ClusterMap map(kClusters * kCluster, kCluster);
    std::vector<std::atomic<int>> holders(kClusters);
    std::atomic<int> overlaps{0};
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937 random(t);
            for (int i = 0; i < 2000; ++i) {
                const uint64_t first = random() % kClusters;
                const uint64_t last = std::min(kClusters - 1, first + random() % 4);
                map.lock(first, last);
                for (uint64_t c = first; c <= last; ++c)
                    if (holders[c].fetch_add(1) != 0)
                        ++overlaps;
                std::this_thread::yield();
                for (uint64_t c = first; c <= last; ++c)
                    holders[c].fetch_sub(1);
                map.unlock(first, last);
            }
        });
    }
    for (auto& t : threads)
        t.join();
    CHECK(overlaps == 0);
}

TEST_CASE("snapshot overlay: nameless, sparse, copy-up of partly written clusters, the image untouched")
{
    TempDir dir;
    const uint64_t size = 4 * kCluster + 8192;  // a short last cluster
    const std::string path = patterned_image(dir, "base.raw", size);
    const auto overlays = dir.path / "overlays";
    std::filesystem::create_directory(overlays);
    Fd base(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    SnapshotOverlay overlay(base.get(), size, 1, overlays.string());
    CHECK(std::filesystem::is_empty(overlays));  // no name to leave behind
    struct stat st {};
    REQUIRE(::fstat(overlay.overlay_fd(), &st) == 0);
    CHECK(static_cast<uint64_t>(st.st_size) == size);
    CHECK(st.st_blocks == 0);
    std::atomic<bool> cancel{false};

    // 1 KiB in the middle of cluster 1: the cluster is copied up, then written.
    std::vector<uint8_t> data(1024, 0xab);
    iovec iov{data.data(), data.size()};
    const uint64_t at = kCluster + 8192;
    CHECK(overlay.write(at, std::span(&iov, 1), cancel) == 1024);
    CHECK(overlay.map().allocated(1));
    CHECK_FALSE(overlay.map().allocated(0));
    CHECK(overlay.overlay_bytes() == kCluster);
    const auto cluster = pread_bytes(overlay.overlay_fd(), kCluster, kCluster);
    for (uint64_t i = 0; i < kCluster; ++i) {
        const uint64_t offset = kCluster + i;
        const uint8_t want = offset >= at && offset < at + 1024 ? 0xab : pattern(offset);
        if (cluster[i] != want) {
            FAIL("byte " << offset << " of the overlay is " << int(cluster[i]) << ", not " << int(want));
            break;
        }
    }

    // Across clusters 2-4 (the short last one, whole): 2 partly, 3 and 4 whole.
    std::vector<uint8_t> big(size - (2 * kCluster + 512), 0x5c);
    iovec big_iov{big.data(), big.size()};
    CHECK(overlay.write(2 * kCluster + 512, std::span(&big_iov, 1), cancel) == static_cast<int64_t>(big.size()));
    CHECK(overlay.map().allocated_clusters() == 4);
    CHECK(pread_bytes(overlay.overlay_fd(), 2 * kCluster, 512) == pread_bytes(base.get(), 2 * kCluster, 512));
    CHECK(pread_bytes(overlay.overlay_fd(), size - 512, 512) == std::vector<uint8_t>(512, 0x5c));

    // Zeroes in part of cluster 0: copied up, the rest of it kept.
    CHECK(overlay.zero(4096, 4096, false, cancel) == 0);
    CHECK(overlay.map().allocated(0));
    CHECK(pread_bytes(overlay.overlay_fd(), 4096, 4096) == std::vector<uint8_t>(4096, 0));
    CHECK(pread_bytes(overlay.overlay_fd(), 0, 4096) == pread_bytes(base.get(), 0, 4096));
    // Out of the disk: refused, nothing touched.
    CHECK(overlay.write(size - 512, std::span(&iov, 1), cancel) == -EINVAL);
    CHECK(overlay.zero(size, 512, true, cancel) == -EINVAL);

    // The image is as it was.
    const auto image = pread_bytes(base.get(), 0, size);
    for (uint64_t i = 0; i < size; ++i)
        if (image[i] != pattern(i)) {
            FAIL("the image changed at byte " << i);
            break;
        }
}

TEST_CASE("snapshot overlay: a directory it cannot write is one line naming it and TMPDIR")
{
    TempDir dir;
    const std::string path = patterned_image(dir, "base.raw", kCluster);
    Fd base(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    const std::string missing = (dir.path / "no-such-dir").string();
    const std::string error = error_of([&] { SnapshotOverlay(base.get(), kCluster, 1, missing); });
    CHECK(error.find("cannot create the overlay in " + missing) != std::string::npos);
    CHECK(error.find("set TMPDIR") != std::string::npos);
    CHECK(error.find('\n') == std::string::npos);
}

TEST_CASE("snapshot overlay: $TMPDIR, else /var/tmp")
{
    const char* saved = std::getenv("TMPDIR");
    const std::string before = saved ? saved : "";
    ::setenv("TMPDIR", "/some/where", 1);
    CHECK(SnapshotOverlay::default_dir() == "/some/where");
    ::unsetenv("TMPDIR");
    CHECK(SnapshotOverlay::default_dir() == "/var/tmp");
    if (saved)
        ::setenv("TMPDIR", before.c_str(), 1);
}

TEST_CASE("snapshot requests: reads go to the image or the overlay by cluster, in parts; the answer sums them")
{
    TempDir dir;
    const uint64_t size = 8 * kCluster;
    const std::string path = patterned_image(dir, "base.raw", size);
    Fd base(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    SnapshotOverlay overlay(base.get(), size, 1, dir.path.string());
    std::atomic<bool> cancel{false};
    std::vector<uint8_t> ones(kCluster, 1);
    iovec one{ones.data(), ones.size()};
    REQUIRE(overlay.write(2 * kCluster, std::span(&one, 1), cancel) == kCluster);  // cluster 2 in the overlay

    Executor ex;
    // 3 clusters from the middle of cluster 1, into two iovecs split off the cluster edges.
    std::vector<uint8_t> buffer(3 * kCluster);
    const iovec iov[2] = {{buffer.data(), 1000}, {buffer.data() + 1000, buffer.size() - 1000}};
    const uint64_t start = kCluster + 4096;
    ex.requests.submit(overlay, EngineKind::kNative, {IoOp::kRead, -1, start, iov, 2, 77});
    REQUIRE(ex.sent.size() == 3);
    CHECK(ex.sent[0].engine == EngineKind::kNative);
    CHECK(ex.sent[0].io.fd == base.get());
    CHECK(ex.sent[0].io.offset == start);
    CHECK(ex.sent[1].io.fd == overlay.overlay_fd());
    CHECK(ex.sent[1].io.offset == 2 * kCluster);
    CHECK(ex.sent[2].io.fd == base.get());
    CHECK(ex.sent[2].io.offset == 3 * kCluster);
    CHECK(ex.requests.requests_in_flight() == 1);
    ex.run_all();
    REQUIRE(ex.finished.size() == 1);
    CHECK(ex.finished[0] == std::pair<uint64_t, int64_t>{77, 3 * kCluster});
    CHECK(ex.requests.requests_in_flight() == 0);
    for (uint64_t i = 0; i < buffer.size(); ++i) {
        const uint64_t offset = start + i;
        const uint8_t want = offset / kCluster == 2 ? 1 : pattern(offset);
        if (buffer[i] != want) {
            FAIL("byte " << offset << " read " << int(buffer[i]) << ", not " << int(want));
            break;
        }
    }
}

TEST_CASE("snapshot requests: writes to allocated clusters go to the overlay, others to the worker; flush is answered at once")
{
    TempDir dir;
    const uint64_t size = 4 * kCluster;
    const std::string path = patterned_image(dir, "base.raw", size);
    Fd base(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    SnapshotOverlay overlay(base.get(), size, 1, dir.path.string());
    Executor ex;
    std::vector<uint8_t> data(4096, 0x77);
    const iovec iov{data.data(), data.size()};

    ex.requests.submit(overlay, EngineKind::kSync, {IoOp::kWrite, -1, kCluster + 512, &iov, 1, 1});
    REQUIRE(ex.sent.size() == 1);
    CHECK(ex.sent[0].io.op == IoOp::kBlocking);  // cluster 1 is not in the overlay yet: copy-up
    CHECK(ex.sent[0].io.job != nullptr);
    ex.run_all();
    CHECK(ex.finished.back() == std::pair<uint64_t, int64_t>{1, 4096});
    CHECK(overlay.map().allocated(1));

    ex.requests.submit(overlay, EngineKind::kSync, {IoOp::kWrite, -1, kCluster + 8192, &iov, 1, 2});
    REQUIRE(ex.sent.size() == 1);
    CHECK(ex.sent[0].io.op == IoOp::kWrite);  // now it is: straight to the overlay
    CHECK(ex.sent[0].io.fd == overlay.overlay_fd());
    ex.run_all();
    CHECK(ex.finished.back() == std::pair<uint64_t, int64_t>{2, 4096});

    IoRequest zeroes{IoOp::kWriteZeroes, -1, kCluster, nullptr, 0, 3};
    zeroes.length = 4096;
    ex.requests.submit(overlay, EngineKind::kSync, zeroes);
    REQUIRE(ex.sent.size() == 1);
    CHECK(ex.sent[0].io.op == IoOp::kWriteZeroes);
    CHECK(ex.sent[0].io.fd == overlay.overlay_fd());
    CHECK(ex.sent[0].io.length == 4096);
    ex.run_all();
    CHECK(ex.finished.back() == std::pair<uint64_t, int64_t>{3, 0});

    IoRequest discard{IoOp::kDiscard, -1, 2 * kCluster, nullptr, 0, 4};
    discard.length = kCluster;
    ex.requests.submit(overlay, EngineKind::kSync, discard);
    REQUIRE(ex.sent.size() == 1);
    CHECK(ex.sent[0].io.op == IoOp::kBlocking);
    ex.run_all();
    CHECK(ex.finished.back() == std::pair<uint64_t, int64_t>{4, 0});
    CHECK(overlay.map().allocated(2));  // reads there see the hole's zeroes, not the image
    CHECK(pread_bytes(overlay.overlay_fd(), 2 * kCluster, 4096) == std::vector<uint8_t>(4096, 0));

    ex.requests.submit(overlay, EngineKind::kSync, {IoOp::kFlush, -1, 0, nullptr, 0, 5});
    CHECK(ex.sent.empty());
    CHECK(ex.finished.back() == std::pair<uint64_t, int64_t>{5, 0});

    // Past the end: refused without I/O (the devices check first; this is the backstop).
    ex.requests.submit(overlay, EngineKind::kSync, {IoOp::kRead, -1, size - 512, &iov, 1, 6});
    CHECK(ex.sent.empty());
    CHECK(ex.finished.back() == std::pair<uint64_t, int64_t>{6, -EINVAL});
    CHECK(ex.requests.requests_in_flight() == 0);
}

TEST_CASE("snapshot requests: a part that fails fails its request, with the first error")
{
    TempDir dir;
    const uint64_t size = 4 * kCluster;
    const std::string path = patterned_image(dir, "base.raw", size);
    Fd base(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    SnapshotOverlay overlay(base.get(), size, 1, dir.path.string());
    std::atomic<bool> cancel{false};
    std::vector<uint8_t> data(kCluster, 9);
    iovec whole{data.data(), data.size()};
    REQUIRE(overlay.write(kCluster, std::span(&whole, 1), cancel) == kCluster);

    Executor ex;
    std::vector<uint8_t> buffer(3 * kCluster);
    const iovec iov{buffer.data(), buffer.size()};
    ex.requests.submit(overlay, EngineKind::kSync, {IoOp::kRead, -1, 0, &iov, 1, 1});
    REQUIRE(ex.sent.size() == 3);
    ex.requests.complete(static_cast<uint32_t>(ex.sent[0].io.cookie), kCluster);
    ex.requests.complete(static_cast<uint32_t>(ex.sent[1].io.cookie), -EIO);
    CHECK(ex.finished.empty());  // one part is still out
    ex.requests.complete(static_cast<uint32_t>(ex.sent[2].io.cookie), -ENOSPC);
    REQUIRE(ex.finished.size() == 1);
    CHECK(ex.finished[0] == std::pair<uint64_t, int64_t>{1, -EIO});
    ex.requests.complete(12345, 0);  // a tag it never gave: ignored
    CHECK(ex.finished.size() == 1);
}

TEST_CASE("snapshot disk: opened read-only and shared, refused with ro, the overlay dir checked")
{
    TempDir dir;
    const std::string path = dir.file("disk.raw", 1 << 20, 'x');
    DiskImageOptions options{path};
    options.snapshot = true;
    options.snapshot_dir = dir.path.string();
    auto first = DiskImage::open(options);
    auto second = DiskImage::open(options);  // two snapshots of one image at once
    CHECK_FALSE(first.read_only());          // the guest sees a writable disk
    REQUIRE(first.snapshot() != nullptr);
    CHECK(first.snapshot()->base_fd() == first.fd());
    const char byte = 'y';
    CHECK(::pwrite(first.fd(), &byte, 1, 0) < 0);  // the image's fd cannot write
    CHECK(errno == EBADF);
    // A writer cannot have it meanwhile; read-only users can.
    CHECK(error_of([&] { DiskImage::open({path, false}); }).find("in use") != std::string::npos);
    CHECK_NOTHROW(DiskImage::open({path, true}));

    DiskImageOptions both = options;
    both.read_only = true;
    const std::string refused = error_of([&] { DiskImage::open(both); });
    CHECK(refused.find("snapshot and ro together") != std::string::npos);

    DiskImageOptions nowhere = options;
    nowhere.snapshot_dir = (dir.path / "missing").string();
    const std::string no_dir = error_of([&] { DiskImage::open(nowhere); });
    CHECK(no_dir.find("disk " + path + ": snapshot: cannot create the overlay in") != std::string::npos);
    CHECK(no_dir.find("TMPDIR") != std::string::npos);
}

TEST_CASE("snapshot option: -d PATH,snapshot, and with ro it is refused in one line naming both")
{
    CHECK(parse_disk_spec("a.raw,snapshot").snapshot);
    CHECK_FALSE(parse_disk_spec("a.raw").snapshot);
    CHECK(parse_disk_spec("a.raw,snapshot,direct,aio=sync,bus=scsi").snapshot);
    for (const char* spec : {"a.raw,ro,snapshot", "a.raw,snapshot,ro"}) {
        const std::string error = error_of([&] { parse_disk_spec(spec); });
        CHECK(error.find("snapshot and ro together") != std::string::npos);
        CHECK(error.find('\n') == std::string::npos);
    }
    CHECK(error_of([] { parse_disk_spec("a,snap"); }).find("ro, snapshot, direct") != std::string::npos);
    CHECK(run_usage().find("snapshot") != std::string::npos);
}
