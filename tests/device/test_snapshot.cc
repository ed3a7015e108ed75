// Snapshot disks (-d PATH,snapshot) through the test guest driver: a
// virtio-blk device over a read-only image and a temporary overlay, its
// queues on real I/O threads, for each engine. The image must not change by
// a byte, and the guest must read back what it wrote.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "disk/disk_image.h"
#include "tests/device/alloc_counter.h"
#include "tests/device/driver.h"
#include "virtio/blk.h"
#include "virtio/io_thread.h"

using namespace lkvm;
using namespace lkvm::test;

namespace {

constexpr uint64_t kCluster = SnapshotOverlay::kClusterBytes;
constexpr uint64_t kDiskBytes = 8 << 20;

uint8_t pattern(uint64_t i) { return static_cast<uint8_t>(i / 512 + i % 512); }

// A snapshot virtio-blk disk over a patterned image, its queues spread over
// the given threads (each queue on threads[q % size]).
struct SnapshotRig {
    std::filesystem::path dir, overlays;
    std::string path;
    GuestDriver driver;
    std::vector<std::unique_ptr<IoThread>> threads;
    std::unique_ptr<VirtioBlk> blk;
    std::unique_ptr<VirtioPciDevice> transport;
    std::vector<uint8_t> image;  // what the image holds, and must go on holding

    explicit SnapshotRig(EngineKind engine, unsigned queues = 1, unsigned thread_count = 1)
    {
        char tmpl[] = "/tmp/lkvm-device.XXXXXX";
        dir = ::mkdtemp(tmpl);
        overlays = dir / "overlays";
        std::filesystem::create_directory(overlays);
        path = (dir / "disk.raw").string();
        image.resize(kDiskBytes);
        for (uint64_t i = 0; i < kDiskBytes; ++i)
            image[i] = pattern(i);
        std::ofstream(path, std::ios::binary).write(reinterpret_cast<char*>(image.data()), static_cast<long>(image.size()));
        for (unsigned t = 0; t < thread_count; ++t)
            threads.push_back(std::make_unique<IoThread>(IoThreadOptions{"disk0-io" + std::to_string(t), {}, 0, -1}));
        std::vector<IoThread*> queue_threads;
        for (unsigned q = 0; q < queues; ++q)
            queue_threads.push_back(threads[q % thread_count].get());
        DiskImageOptions options{path};
        options.snapshot = true;
        options.snapshot_dir = overlays.string();
        blk = std::make_unique<VirtioBlk>(DiskImage::open(options), BlkOptions{"snap", engine, 0, 256, true},
                                          driver.memory(), queue_threads);
        transport = std::make_unique<VirtioPciDevice>(*blk, driver.host_interface(), AddressSpace::kMemory);
        transport->use_intx(17);
        driver.probe(*transport, ~0ull, queues, 256, true);
    }
    ~SnapshotRig()
    {
        destroy();
        std::filesystem::remove_all(dir);
    }
    void destroy()
    {
        transport.reset();
        blk.reset();
        threads.clear();
    }

    // Request i lives at its own spot: header, status, then up to 252 KiB of data.
    static uint64_t header_gpa(unsigned i) { return GuestDriver::kDataArea + i * 0x40000ull; }
    static uint64_t status_gpa(unsigned i) { return header_gpa(i) + 0x200; }
    static uint64_t data_gpa(unsigned i) { return header_gpa(i) + 0x1000; }
    uint8_t* data(unsigned i) { return driver.host(data_gpa(i)); }

    void queue_request(unsigned i, uint32_t type, uint64_t offset, uint32_t len, unsigned q = 0)
    {
        uint8_t header[16] = {};
        const uint64_t sector = offset / 512;
        std::memcpy(header, &type, 4);
        std::memcpy(header + 8, &sector, 8);
        std::memcpy(driver.host(header_gpa(i)), header, 16);
        *driver.host(status_gpa(i)) = 0xee;
        std::vector<Buffer> chain = {{header_gpa(i), 16, false}};
        if (len)
            chain.push_back({data_gpa(i), len, type == kBlkTIn});
        chain.push_back({status_gpa(i), 1, true});
        driver.add_chain(q, chain);
    }
    uint8_t status(unsigned i) { return *driver.host(status_gpa(i)); }
    uint8_t request(uint32_t type, uint64_t offset, uint32_t len)
    {
        queue_request(0, type, offset, len);
        driver.kick(0);
        REQUIRE(driver.wait_used(0, 1).size() == 1);
        return status(0);
    }
    uint8_t write(uint64_t offset, uint32_t len, uint8_t fill)
    {
        std::memset(data(0), fill, len);
        return request(kBlkTOut, offset, len);
    }
    // Reads [offset, offset + len) through the device into `model`'s view: what it read.
    std::vector<uint8_t> read(uint64_t offset, uint32_t len)
    {
        std::memset(data(0), 0xee, len);
        REQUIRE(request(kBlkTIn, offset, len) == kBlkSOk);
        return {data(0), data(0) + len};
    }
    uint8_t allocation(uint32_t type, uint64_t offset, uint64_t len, uint32_t flags = 0)
    {
        uint8_t range[16];
        const uint64_t sector = offset / 512;
        const auto sectors = static_cast<uint32_t>(len / 512);
        std::memcpy(range, &sector, 8);
        std::memcpy(range + 8, &sectors, 4);
        std::memcpy(range + 12, &flags, 4);
        std::memcpy(data(0), range, 16);
        return request(type, 0, 16);
    }
    bool image_unchanged()
    {
        std::vector<uint8_t> now(kDiskBytes);
        std::ifstream(path, std::ios::binary).read(reinterpret_cast<char*>(now.data()), static_cast<long>(now.size()));
        return now == image;
    }
    // The descriptors this process has open on files in the overlay directory.
    unsigned overlay_fds() const
    {
        unsigned n = 0;
        for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
            std::error_code error;
            const auto target = std::filesystem::read_symlink(entry.path(), error).string();
            if (!error && target.starts_with(overlays.string() + "/"))
                ++n;
        }
        return n;
    }
};

// The first byte where got differs from want (offset `base` for the message), or none.
std::string first_difference(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, uint64_t base)
{
    for (size_t i = 0; i < std::min(got.size(), want.size()); ++i)
        if (got[i] != want[i])
            return "byte " + std::to_string(base + i) + " is " + std::to_string(got[i]) + ", not " +
                   std::to_string(want[i]);
    return got.size() == want.size() ? "" : "lengths differ";
}

}  // namespace

TEST_CASE("snapshot blk: the guest sees a writable disk and reads back what it wrote; the image stays as it was")
{
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        SnapshotRig rig(engine);
        const uint64_t features = rig.blk->features();
        CHECK((features & (1ull << 5)) == 0);  // not VIRTIO_BLK_F_RO
        CHECK((features & (1ull << 13)) != 0);  // DISCARD
        CHECK((features & (1ull << 14)) != 0);  // WRITE_ZEROES
        std::vector<uint8_t> model = rig.image;  // what the guest should read
        auto apply = [&](uint64_t offset, uint64_t len, uint8_t fill) {
            std::fill_n(model.begin() + static_cast<long>(offset), len, fill);
        };

        // Part of one cluster (copied up first).
        CHECK(rig.write(kCluster + 4096, 4096, 0x11) == kBlkSOk);
        apply(kCluster + 4096, 4096, 0x11);
        // Across four clusters, the first and last partly.
        CHECK(rig.write(3 * kCluster - 512, 2 * kCluster + 4096, 0x22) == kBlkSOk);
        apply(3 * kCluster - 512, 2 * kCluster + 4096, 0x22);
        // Whole clusters, aligned.
        CHECK(rig.write(8 * kCluster, 2 * kCluster, 0x33) == kBlkSOk);
        apply(8 * kCluster, 2 * kCluster, 0x33);
        // Into a cluster already in the overlay.
        CHECK(rig.write(kCluster + 512, 1024, 0x44) == kBlkSOk);
        apply(kCluster + 512, 1024, 0x44);
        // WRITE_ZEROES in part of a cluster of the image; DISCARD over one
        // whole cluster and part of the next; WRITE_ZEROES with UNMAP.
        CHECK(rig.allocation(kBlkTWriteZeroes, 12 * kCluster + 8192, 4096) == kBlkSOk);
        apply(12 * kCluster + 8192, 4096, 0);
        CHECK(rig.allocation(kBlkTDiscard, 14 * kCluster, kCluster + 8192) == kBlkSOk);
        apply(14 * kCluster, kCluster + 8192, 0);
        CHECK(rig.allocation(kBlkTWriteZeroes, 17 * kCluster + 512, 2 * kCluster, kBlkDwzUnmap) == kBlkSOk);
        apply(17 * kCluster + 512, 2 * kCluster, 0);
        // WRITE_ZEROES into the overlay (cluster 8 is there).
        CHECK(rig.allocation(kBlkTWriteZeroes, 8 * kCluster + 4096, 512) == kBlkSOk);
        apply(8 * kCluster + 4096, 512, 0);
        CHECK(rig.request(kBlkTFlush, 0, 0) == kBlkSOk);

        // Reads spanning image and overlay runs, in 192 KiB pieces over the first 24 clusters.
        for (uint64_t offset = 0; offset < 24 * kCluster; offset += 3 * kCluster) {
            const auto got = rig.read(offset, 3 * kCluster);
            const std::vector<uint8_t> want(model.begin() + static_cast<long>(offset),
                                            model.begin() + static_cast<long>(offset + 3 * kCluster));
            CHECK_MESSAGE(got == want, first_difference(got, want, offset));
        }
        // Small reads inside one cluster, and one sector at each edge of a write.
        for (const uint64_t offset : {kCluster + 4096 - 512, kCluster + 8192, 3 * kCluster - 1024, 5 * kCluster + 3584}) {
            const auto got = rig.read(offset, 1024);
            CHECK(got == std::vector<uint8_t>(model.begin() + static_cast<long>(offset),
                                              model.begin() + static_cast<long>(offset + 1024)));
        }
        CHECK(rig.image_unchanged());
        CHECK(std::filesystem::is_empty(rig.overlays));  // the overlay has no name
        CHECK(rig.blk->image().snapshot()->overlay_bytes() > 0);
    }
}

TEST_CASE("snapshot blk: two queues on two threads copying up the same clusters lose no write")
{
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        SnapshotRig rig(engine, 2, 2);
        // Clusters 0-15: queue 0 writes the even 4 KiB blocks, queue 1 the odd
        // ones, 16 of each in flight on each queue, in the same order: every
        // cluster is copied up by both at about the same time. A copy-up
        // that landed over the other queue's finished write would bring back
        // the image's bytes there.
        constexpr unsigned kDepth = 16, kBlocksPerCluster = kCluster / 4096, kClusters = 16;
        constexpr unsigned kBlocks = kClusters * kBlocksPerCluster;
        std::vector<uint8_t> model = rig.image;
        for (unsigned round = 0; round < kBlocks / 2 / kDepth; ++round) {
            for (unsigned q = 0; q < 2; ++q)
                for (unsigned i = 0; i < kDepth; ++i) {
                    const unsigned block = 2 * (round * kDepth + i) + q;
                    const auto fill = static_cast<uint8_t>(block * 7 + 1);
                    const unsigned slot = q * kDepth + i;
                    std::memset(rig.data(slot), fill, 4096);
                    rig.queue_request(slot, kBlkTOut, block * 4096ull, 4096, q);
                    std::fill_n(model.begin() + block * 4096l, 4096, fill);
                }
            rig.driver.kick(0);
            rig.driver.kick(1);
            for (unsigned q = 0; q < 2; ++q)
                REQUIRE(rig.driver.wait_used(q, kDepth).size() == kDepth);
            for (unsigned slot = 0; slot < 2 * kDepth; ++slot)
                CHECK(rig.status(slot) == kBlkSOk);
        }
        for (uint64_t offset = 0; offset < kClusters * kCluster; offset += 3 * kCluster) {
            const uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(3 * kCluster, kClusters * kCluster - offset));
            const auto got = rig.read(offset, len);
            const std::vector<uint8_t> want(model.begin() + static_cast<long>(offset),
                                            model.begin() + static_cast<long>(offset + len));
            CHECK_MESSAGE(got == want, first_difference(got, want, offset));
        }
        CHECK(rig.blk->image().snapshot()->overlay_bytes() == kClusters * kCluster);
        CHECK(rig.image_unchanged());
    }
}

TEST_CASE("snapshot blk: the overlay is gone once the device is")
{
    SnapshotRig rig(EngineKind::kIoUring);
    CHECK(rig.write(0, 4096, 0x5a) == kBlkSOk);
    CHECK(std::filesystem::is_empty(rig.overlays));  // no name from the start
    CHECK(rig.overlay_fds() >= 1);                   // only an open descriptor keeps it
    rig.destroy();
    CHECK(rig.overlay_fds() == 0);  // the last one closed: the file system frees it
    CHECK(std::filesystem::is_empty(rig.overlays));
    CHECK(rig.image_unchanged());
}

TEST_CASE("snapshot blk: an overlay that cannot grow gives the guest IOERR, and the disk goes on")
{
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        SnapshotRig rig(engine);
        CHECK(rig.write(10 * kCluster, 4096, 0x55) == kBlkSOk);  // cluster 10 in the overlay before the limit
        // A file size limit stands in for a full file system: writes past it
        // fail (EFBIG) as they would with ENOSPC, in whichever thread.
        rlimit saved{};
        REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
        const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
        rlimit small = saved;
        small.rlim_cur = 4 * kCluster;
        REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
        const uint8_t past = rig.write(6 * kCluster + 512, 4096, 0x66);      // copy-up on the worker
        const uint8_t below = rig.write(kCluster, 4096, 0x77);               // room there
        const uint8_t past_again = rig.write(7 * kCluster, 2 * kCluster, 0x66);  // whole clusters
        const uint8_t in_overlay = rig.write(10 * kCluster + 8192, 4096, 0x66);  // the engine's own write
        ::setrlimit(RLIMIT_FSIZE, &saved);
        ::signal(SIGXFSZ, old_handler);
        CHECK(past == kBlkSIoErr);
        CHECK(below == kBlkSOk);
        CHECK(past_again == kBlkSIoErr);
        CHECK(in_overlay == kBlkSIoErr);
        // What failed reads as before (the image); what worked, as written.
        const auto failed = rig.read(6 * kCluster, kCluster);
        CHECK(failed == std::vector<uint8_t>(rig.image.begin() + 6 * kCluster, rig.image.begin() + 7 * kCluster));
        CHECK(rig.read(kCluster, 4096) == std::vector<uint8_t>(4096, 0x77));
        CHECK(rig.write(6 * kCluster + 512, 4096, 0x68) == kBlkSOk);  // with room again, it works
        CHECK(rig.read(6 * kCluster + 512, 4096) == std::vector<uint8_t>(4096, 0x68));
        CHECK(rig.image_unchanged());
    }
}

TEST_CASE("snapshot blk: in steady state reads and writes in the overlay allocate nothing on the I/O thread")
{
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        SnapshotRig rig(engine);
        uint64_t round = 0;
        // 4 KiB requests over the first 2 MiB; reads of 8 KiB that may span image and overlay.
        auto queue = [&](unsigned i) {
            const bool write = (i + round++) % 3 == 0;
            const uint64_t offset = 4096 * ((i * 37 + round) % 512);
            rig.queue_request(i, write ? kBlkTOut : kBlkTIn, offset, write ? 4096 : 8192);
        };
        constexpr uint64_t kWarmUp = 4000, kCounted = 8000;
        REQUIRE(rig.driver.keep_in_flight(0, 64, 3, kWarmUp, queue) == kWarmUp);
        uint64_t counted = 0;
        CHECK(allocations_on(*rig.threads[0], [&] { counted = rig.driver.keep_in_flight(0, 64, 3, kCounted, queue); }) ==
              0);
        CHECK(counted == kCounted);
        CHECK(rig.image_unchanged());
    }
}
