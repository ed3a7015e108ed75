// virtio-blk through the test guest driver: the whole device stack and its
// I/O thread, with no KVM. Data is checked against the image file itself.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/post.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>

#include "base/error.h"
#include "disk/disk_image.h"
#include "kvm/stat_snapshot.h"
#include "tests/device/alloc_counter.h"
#include "tests/device/driver.h"
#include "tests/device/faulty_engine.h"
#include "virtio/blk.h"
#include "virtio/io_thread.h"
#include "virtio/queue_mapping.h"

using namespace lkvm;
using namespace lkvm::test;

namespace {
constexpr uint64_t kAllFeatures = ~0ull;
constexpr uint8_t kNeedsReset = 0x40;

struct BlkRig {
    std::filesystem::path dir;
    std::string path;
    GuestDriver driver;
    IoThread thread;
    std::unique_ptr<VirtioBlk> blk;
    std::unique_ptr<VirtioPciDevice> transport;
    uint64_t features = 0;

    explicit BlkRig(EngineKind engine = EngineKind::kSync, bool read_only = false, uint64_t size = 8 << 20,
                    std::string serial = "lkvm-serial-0001", unsigned queues = 1, bool msix = true,
                    std::vector<IoThread*> queue_threads = {}, AddressSpace notify = AddressSpace::kMemory,
                    bool direct = false, FaultRule fault = {}, BlkOptions policy = {},
                    CacheMode cache = CacheMode::kWriteback, const std::string& parent = "/tmp")
        : thread(thread_options(std::move(fault)))
    {
        std::string tmpl = parent + "/lkvm-device.XXXXXX";
        dir = ::mkdtemp(tmpl.data());
        path = (dir / "disk.raw").string();
        std::ofstream(path, std::ios::binary) << std::string(size, '\0');
        // A recognizable pattern: byte i of sector s is (s + i) & 0xff.
        std::vector<uint8_t> data(size);
        for (uint64_t i = 0; i < size; ++i)
            data[i] = static_cast<uint8_t>(i / 512 + i % 512);
        std::ofstream(path, std::ios::binary).write(reinterpret_cast<char*>(data.data()), static_cast<long>(size));
        blk = std::make_unique<VirtioBlk>(DiskImage::open({path, read_only, direct ? CacheMode::kNone : cache}),
                                          with_serial_engine(policy, serial, engine), driver.memory(),
                                          queue_threads.empty() ? std::vector<IoThread*>(queues, &thread)
                                                                : queue_threads);
        transport = std::make_unique<VirtioPciDevice>(*blk, driver.host_interface(), notify);
        transport->use_intx(17);
        features = driver.probe(*transport, kAllFeatures, queues, 256, msix);
        REQUIRE(driver.notify_space() == notify);
    }
    // The options a test gives (discard, throttle, error policies), with the rig's serial and engine.
    static BlkOptions with_serial_engine(BlkOptions options, std::string serial, EngineKind engine)
    {
        options.serial = std::move(serial);
        options.engine = engine;
        return options;
    }
    // The rig's own I/O thread; with a fault rule, its engines fail what the rule picks.
    static IoThreadOptions thread_options(FaultRule fault)
    {
        IoThreadOptions options{"disk0-io", {}, 0, -1};
        if (fault)
            options.make_engine = faulty_engines(std::move(fault));
        return options;
    }
    ~BlkRig()
    {
        transport.reset();
        blk.reset();
        std::filesystem::remove_all(dir);
    }

    // Request i lives at its own spot: header, data (4 KiB aligned), status.
    static uint64_t header_gpa(unsigned i) { return GuestDriver::kDataArea + i * 0x40000ull; }
    static uint64_t data_gpa(unsigned i) { return header_gpa(i) + 0x1000; }
    static uint64_t status_gpa(unsigned i) { return header_gpa(i) + 0x200; }

    uint16_t queue_request(unsigned i, uint32_t type, uint64_t sector, uint32_t len, unsigned q = 0)
    {
        uint8_t header[16] = {};
        std::memcpy(header, &type, 4);
        std::memcpy(header + 8, &sector, 8);
        std::memcpy(driver.host(header_gpa(i)), header, 16);
        *driver.host(status_gpa(i)) = 0xee;
        std::vector<Buffer> chain = {{header_gpa(i), 16, false}};
        if (len)
            chain.push_back({data_gpa(i), len, type == kBlkTIn || type == kBlkTGetId});
        chain.push_back({status_gpa(i), 1, true});
        return driver.add_chain(q, chain);
    }
    // One request, kicked and waited for: its status byte.
    uint8_t request(uint32_t type, uint64_t sector, uint32_t len)
    {
        queue_request(0, type, sector, len);
        driver.kick(0);
        const auto used = driver.wait_used(0, 1);
        REQUIRE(used.size() == 1);
        return *driver.host(status_gpa(0));
    }
    std::vector<uint8_t> file_bytes(uint64_t offset, size_t len)
    {
        std::vector<uint8_t> out(len);
        std::ifstream f(path, std::ios::binary);
        f.seekg(static_cast<long>(offset));
        f.read(reinterpret_cast<char*>(out.data()), static_cast<long>(len));
        return out;
    }
};
}  // namespace

TEST_CASE("blk: features and configuration space")
{
    BlkRig rig;
    CHECK((rig.features & kVirtioFVersion1) != 0);
    CHECK((rig.features & (1ull << 9)) != 0);   // FLUSH
    CHECK((rig.features & (1ull << 5)) == 0);   // not RO
    CHECK(rig.driver.device_config64(0) == (8 << 20) / 512);
    CHECK(rig.driver.device_config32(12) == 254);  // seg_max
    CHECK(rig.driver.device_config32(20) == 512);  // blk_size
    CHECK((rig.features & (1ull << 13)) != 0);  // DISCARD
    CHECK((rig.features & (1ull << 14)) != 0);  // WRITE_ZEROES
    CHECK(rig.driver.device_config32(36) == (1u << 30) / 512);  // max_discard_sectors
    CHECK(rig.driver.device_config32(40) == 1);                 // max_discard_seg
    CHECK(rig.driver.device_config32(44) == 8);                 // discard_sector_alignment: 4 KiB
    CHECK(rig.driver.device_config32(48) == (1u << 30) / 512);  // max_write_zeroes_sectors
    CHECK(rig.driver.device_config32(52) == 1);                 // max_write_zeroes_seg
    CHECK((rig.driver.device_config32(56) & 0xff) == 1);        // write_zeroes_may_unmap
}

const char* notify_name(AddressSpace space) { return space == AddressSpace::kPort ? "notify=pio" : "notify=mmio"; }

TEST_CASE("blk: write then read back at QD64 through each engine")
{
    for (const AddressSpace notify : {AddressSpace::kMemory, AddressSpace::kPort})
    for (EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        CAPTURE(notify_name(notify));
        BlkRig rig(engine, false, 8 << 20, "lkvm-serial-0001", 1, true, {}, notify);
        constexpr unsigned kDepth = 64;
        for (unsigned i = 0; i < kDepth; ++i) {
            std::memset(rig.driver.host(BlkRig::data_gpa(i)), static_cast<int>(0x40 + i), 4096);
            rig.queue_request(i, kBlkTOut, 8ull * i * 3, 4096);
        }
        rig.driver.kick(0);
        CHECK(rig.driver.wait_used(0, kDepth).size() == kDepth);
        for (unsigned i = 0; i < kDepth; ++i) {
            CHECK(*rig.driver.host(BlkRig::status_gpa(i)) == kBlkSOk);
            CHECK(rig.file_bytes(512ull * 8 * i * 3, 4096) == std::vector<uint8_t>(4096, static_cast<uint8_t>(0x40 + i)));
            std::memset(rig.driver.host(BlkRig::data_gpa(i)), 0, 4096);
            rig.queue_request(i, kBlkTIn, 8ull * i * 3, 4096);
        }
        rig.driver.kick(0);
        const auto used = rig.driver.wait_used(0, kDepth);
        REQUIRE(used.size() == kDepth);
        for (const auto& [head, len] : used)
            CHECK(len == 4096 + 1);
        for (unsigned i = 0; i < kDepth; ++i) {
            CHECK(*rig.driver.host(BlkRig::status_gpa(i)) == kBlkSOk);
            CHECK(std::vector<uint8_t>(rig.driver.host(BlkRig::data_gpa(i)), rig.driver.host(BlkRig::data_gpa(i)) + 4096) ==
                  std::vector<uint8_t>(4096, static_cast<uint8_t>(0x40 + i)));
        }
    }
}

TEST_CASE("blk: reads see what the host put in the image")
{
    BlkRig rig(EngineKind::kNative);
    CHECK(rig.request(kBlkTIn, 100, 1024) == kBlkSOk);
    CHECK(std::vector<uint8_t>(rig.driver.host(BlkRig::data_gpa(0)), rig.driver.host(BlkRig::data_gpa(0)) + 1024) ==
          rig.file_bytes(100 * 512, 1024));
}

TEST_CASE("blk: a queue counts the kicks it read and the interrupts it raised")
{
    BlkRig rig(EngineKind::kNative);
    for (unsigned i = 0; i < 3; ++i)
        CHECK(rig.request(kBlkTIn, 8ull * i, 4096) == kBlkSOk);
    const QueueStats& stats = rig.blk->queue_stats(0);
    CHECK(stats.counters().requests == 3);
    // Each request was kicked and answered on its own; suppressed notifications may make fewer.
    CHECK(stats.kicks() >= 1);
    CHECK(stats.kicks() <= 3);
    CHECK(stats.interrupts() >= 1);
    CHECK(stats.interrupts() <= 3);
}

TEST_CASE("blk: FLUSH, GET_ID and unsupported types")
{
    BlkRig rig;
    CHECK(rig.request(kBlkTFlush, 0, 0) == kBlkSOk);
    CHECK(rig.request(kBlkTGetId, 0, 20) == kBlkSOk);
    CHECK(std::string(reinterpret_cast<char*>(rig.driver.host(BlkRig::data_gpa(0))), 16) == "lkvm-serial-0001");
    CHECK(rig.request(14 /* SECURE_ERASE: not offered */, 0, 16) == kBlkSUnsupp);
    CHECK(rig.request(0x1234, 0, 0) == kBlkSUnsupp);
}

namespace {
// A DISCARD or WRITE_ZEROES with these 16-byte ranges (sector, sectors, flags); its status.
uint8_t allocation_request(BlkRig& rig, uint32_t type, const std::vector<std::array<uint64_t, 3>>& ranges)
{
    uint8_t* data = rig.driver.host(BlkRig::data_gpa(0));
    for (size_t i = 0; i < ranges.size(); ++i) {
        const uint64_t sector = ranges[i][0];
        const auto sectors = static_cast<uint32_t>(ranges[i][1]), flags = static_cast<uint32_t>(ranges[i][2]);
        std::memcpy(data + 16 * i, &sector, 8);
        std::memcpy(data + 16 * i + 8, &sectors, 4);
        std::memcpy(data + 16 * i + 12, &flags, 4);
    }
    return rig.request(type, 0, static_cast<uint32_t>(16 * ranges.size()));
}

uint64_t allocated_bytes(const std::string& path)
{
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
}

bool all_zero(const std::vector<uint8_t>& bytes)
{
    return std::ranges::all_of(bytes, [](uint8_t b) { return b == 0; });
}
}  // namespace

TEST_CASE("blk: DISCARD punches a hole, WRITE_ZEROES zeroes (with UNMAP, a hole too), the data around stays")
{
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        BlkRig rig(engine);
        const uint64_t before = allocated_bytes(rig.path);
        CHECK(allocation_request(rig, kBlkTDiscard, {{2048, 2048, 0}}) == kBlkSOk);  // 1 MiB at 1 MiB
        CHECK(all_zero(rig.file_bytes(1 << 20, 1 << 20)));
        // Holes free the range, less what the file system may take for its own
        // metadata (ext4 splits an extent: a 4 KiB block).
        constexpr uint64_t kMetadata = 64 << 10;
        CHECK(allocated_bytes(rig.path) <= before - (1 << 20) + kMetadata);
        CHECK(allocation_request(rig, kBlkTWriteZeroes, {{8192, 8, 0}}) == kBlkSOk);  // 4 KiB at 4 MiB, kept allocated
        CHECK(all_zero(rig.file_bytes(4 << 20, 4096)));
        CHECK(allocation_request(rig, kBlkTWriteZeroes, {{10240, 2048, kBlkDwzUnmap}}) == kBlkSOk);  // 1 MiB at 5 MiB
        CHECK(all_zero(rig.file_bytes(5 << 20, 1 << 20)));
        CHECK(allocated_bytes(rig.path) <= before - (2 << 20) + kMetadata);  // the UNMAP punched it
        // The sectors next to each range are untouched: byte i of sector s is (s + i) & 0xff.
        for (const uint64_t sector : {2047ull, 4096ull, 8191ull, 8200ull, 10239ull, 12288ull}) {
            const auto bytes = rig.file_bytes(sector * 512, 512);
            CHECK(bytes[1] == static_cast<uint8_t>(sector + 1));
        }
        CHECK(rig.request(kBlkTIn, 2048, 4096) == kBlkSOk);  // and the guest reads the zeroes
        CHECK(all_zero({rig.driver.host(BlkRig::data_gpa(0)), rig.driver.host(BlkRig::data_gpa(0)) + 4096}));
    }
}

TEST_CASE("blk: DISCARD and WRITE_ZEROES out of the rules get UNSUPP or IOERR and change nothing")
{
    BlkRig rig;
    const auto image = rig.file_bytes(0, 8 << 20);
    constexpr uint64_t kSectors = (8 << 20) / 512;
    CHECK(allocation_request(rig, kBlkTDiscard, {{0, 8, 0}, {16, 8, 0}}) == kBlkSUnsupp);  // one range at most
    CHECK(allocation_request(rig, kBlkTDiscard, {}) == kBlkSUnsupp);                       // none
    CHECK(rig.request(kBlkTWriteZeroes, 0, 8) == kBlkSUnsupp);                              // half a range
    CHECK(allocation_request(rig, kBlkTDiscard, {{0, 8, kBlkDwzUnmap}}) == kBlkSUnsupp);  // UNMAP is for WRITE_ZEROES
    CHECK(allocation_request(rig, kBlkTWriteZeroes, {{0, 8, 2}}) == kBlkSUnsupp);         // unknown flag
    CHECK(allocation_request(rig, kBlkTDiscard, {{kSectors - 8, 9, 0}}) == kBlkSIoErr);   // past the end
    CHECK(allocation_request(rig, kBlkTWriteZeroes, {{~0ull - 3, 8, 0}}) == kBlkSIoErr);  // wraps around
    CHECK(allocation_request(rig, kBlkTWriteZeroes, {{0, kBlkMaxAllocationSectors + 1, 0}}) == kBlkSIoErr);
    CHECK(allocation_request(rig, kBlkTDiscard, {{kSectors, 0, 0}}) == kBlkSOk);  // nothing, at the end
    CHECK(rig.file_bytes(0, 8 << 20) == image);

    BlkRig read_only(EngineKind::kSync, true);
    CHECK((read_only.features & (3ull << 13)) == 0);  // neither offered
    CHECK(allocation_request(read_only, kBlkTWriteZeroes, {{0, 8, 0}}) == kBlkSIoErr);
    CHECK(allocation_request(read_only, kBlkTDiscard, {{0, 8, 0}}) == kBlkSIoErr);

    BlkRig ignoring(EngineKind::kSync, false, 8 << 20, "", 1, true, {}, AddressSpace::kMemory, false, {}, {.discard = false});
    CHECK((ignoring.driver.device_config32(56) & 0xff) == 0);  // write_zeroes_may_unmap
    const auto kept = ignoring.file_bytes(0, 1 << 20);
    CHECK(allocation_request(ignoring, kBlkTDiscard, {{0, 2048, 0}}) == kBlkSOk);  // a hint, not taken
    CHECK(ignoring.file_bytes(0, 1 << 20) == kept);
}

TEST_CASE("blk: a read-only disk offers RO and refuses writes, the image stays as it was")
{
    BlkRig rig(EngineKind::kSync, true);
    CHECK((rig.features & (1ull << 5)) != 0);
    const auto before = rig.file_bytes(0, 4096);
    std::memset(rig.driver.host(BlkRig::data_gpa(0)), 0x77, 4096);
    CHECK(rig.request(kBlkTOut, 0, 4096) == kBlkSIoErr);
    CHECK(rig.request(kBlkTIn, 0, 4096) == kBlkSOk);
    CHECK(rig.file_bytes(0, 4096) == before);
}

TEST_CASE("blk: requests past the end, partial sectors and short headers get IOERR")
{
    BlkRig rig;
    const uint64_t sectors = (8 << 20) / 512;
    CHECK(rig.request(kBlkTIn, sectors - 1, 512) == kBlkSOk);
    CHECK(rig.request(kBlkTIn, sectors - 1, 1024) == kBlkSIoErr);  // runs past the end
    CHECK(rig.request(kBlkTIn, sectors, 512) == kBlkSIoErr);
    CHECK(rig.request(kBlkTOut, ~0ull - 1, 4096) == kBlkSIoErr);   // sector + length overflows
    CHECK(rig.request(kBlkTIn, 0, 100) == kBlkSIoErr);             // not a whole sector
    // An 8-byte header: the device cannot know what was asked.
    rig.driver.add_chain(0, {{BlkRig::header_gpa(0), 8, false}, {BlkRig::status_gpa(0), 1, true}});
    rig.driver.kick(0);
    REQUIRE(rig.driver.wait_used(0, 1).size() == 1);
    CHECK(*rig.driver.host(BlkRig::status_gpa(0)) == kBlkSIoErr);
    CHECK((rig.driver.status() & kNeedsReset) == 0);
    CHECK(rig.request(kBlkTIn, 0, 512) == kBlkSOk);                // and the device goes on
}

TEST_CASE("blk: the header split across descriptors is framed from the descriptors")
{
    BlkRig rig;
    uint8_t header[16] = {};
    const uint32_t type = kBlkTIn;
    const uint64_t sector = 3;
    std::memcpy(header, &type, 4);
    std::memcpy(header + 8, &sector, 8);
    std::memcpy(rig.driver.host(BlkRig::header_gpa(0)), header, 16);
    rig.driver.add_chain(0, {{BlkRig::header_gpa(0), 4, false}, {BlkRig::header_gpa(0) + 4, 12, false},
                             {BlkRig::data_gpa(0), 512, true}, {BlkRig::status_gpa(0), 1, true}});
    rig.driver.kick(0);
    REQUIRE(rig.driver.wait_used(0, 1).size() == 1);
    CHECK(*rig.driver.host(BlkRig::status_gpa(0)) == kBlkSOk);
    CHECK(std::vector<uint8_t>(rig.driver.host(BlkRig::data_gpa(0)), rig.driver.host(BlkRig::data_gpa(0)) + 512) ==
          rig.file_bytes(3 * 512, 512));
}

namespace {
// A broken ring: the device says NEEDS_RESET (with a config interrupt) and
// keeps running; after a reset the same device works again.
void expect_needs_reset_then_recovery(BlkRig& rig)
{
    CHECK(rig.driver.wait_interrupt(rig.driver.config_irq_fd(), 5000));
    CHECK((rig.driver.status() & kNeedsReset) != 0);
    CHECK(rig.driver.reprobe(kAllFeatures, 1) != 0);
    CHECK((rig.driver.status() & kNeedsReset) == 0);
    CHECK(rig.request(kBlkTIn, 0, 512) == kBlkSOk);
}
}  // namespace

TEST_CASE("blk: hostile chains put the device in NEEDS_RESET, never crash it")
{
    BlkRig rig;
    SUBCASE("descriptor loop")
    {
        rig.driver.write_desc(0, 0, {BlkRig::header_gpa(0), 16, kVringDescNext, 1});
        rig.driver.write_desc(0, 1, {BlkRig::data_gpa(0), 512, kVringDescNext, 0});
        rig.driver.offer(0, 0);
    }
    SUBCASE("readable after writable")
    {
        rig.driver.write_desc(0, 0, {BlkRig::header_gpa(0), 16, kVringDescNext | kVringDescWrite, 1});
        rig.driver.write_desc(0, 1, {BlkRig::data_gpa(0), 512, 0, 0});
        rig.driver.offer(0, 0);
    }
    SUBCASE("buffer outside guest memory")
    {
        rig.driver.write_desc(0, 0, {BlkRig::header_gpa(0), 16, kVringDescNext, 1});
        rig.driver.write_desc(0, 1, {GuestDriver::kRamSize - 256, 4096, kVringDescWrite, 0});
        rig.driver.offer(0, 0);
    }
    SUBCASE("huge length")
    {
        rig.driver.write_desc(0, 0, {BlkRig::header_gpa(0), 16, kVringDescNext, 1});
        rig.driver.write_desc(0, 1, {BlkRig::data_gpa(0), 0xfffffff0, kVringDescWrite, 0});
        rig.driver.offer(0, 0);
    }
    SUBCASE("next index out of range")
    {
        rig.driver.write_desc(0, 0, {BlkRig::header_gpa(0), 16, kVringDescNext, 999});
        rig.driver.offer(0, 0);
    }
    SUBCASE("head index out of range")
    {
        rig.driver.offer(0, 4000);
    }
    SUBCASE("no status byte")
    {
        rig.driver.add_chain(0, {{BlkRig::header_gpa(0), 16, false}});
    }
    SUBCASE("avail index far ahead")
    {
        rig.driver.set_avail_idx(0, 5000);
    }
    SUBCASE("more segments than seg_max allows")
    {
        const uint64_t table = GuestDriver::kDataArea + 0x800000;
        constexpr uint16_t kEntries = 300;
        for (uint16_t i = 0; i < kEntries; ++i) {
            const bool last = i + 1 == kEntries;
            VringDesc d{i == 0 ? BlkRig::header_gpa(0) : BlkRig::data_gpa(0) + 512ull * i, i == 0 ? 16u : 512u,
                        static_cast<uint16_t>((i ? kVringDescWrite : 0) | (last ? 0 : kVringDescNext)),
                        static_cast<uint16_t>(i + 1)};
            std::memcpy(rig.driver.host(table + 16ull * i), &d, 16);
        }
        rig.driver.write_desc(0, 0, {table, 16u * kEntries, kVringDescIndirect, 0});
        rig.driver.offer(0, 0);
    }
    SUBCASE("nested indirect")
    {
        const uint64_t table = GuestDriver::kDataArea + 0x800000;
        VringDesc nested{table, 16, kVringDescIndirect, 0};
        std::memcpy(rig.driver.host(table), &nested, 16);
        rig.driver.write_desc(0, 0, {table, 16, kVringDescIndirect, 0});
        rig.driver.offer(0, 0);
    }
    rig.driver.kick(0);
    expect_needs_reset_then_recovery(rig);
}

TEST_CASE("blk: a driver that skips feature negotiation never gets FEATURES_OK, nor a running device")
{
    BlkRig rig;
    rig.driver.write_status(0);
    rig.driver.write_status(1 | 2);
    // A driver that skips feature negotiation never gets FEATURES_OK, and DRIVER_OK starts nothing.
    rig.driver.write_status(1 | 2 | 4);
    CHECK((rig.driver.status() & 8) == 0);
    rig.queue_request(0, kBlkTIn, 0, 512);
    rig.driver.kick(0);
    CHECK(rig.driver.wait_used(0, 1, 300).empty());
    CHECK(rig.driver.reprobe(kAllFeatures, 1) != 0);
    CHECK(rig.request(kBlkTIn, 0, 512) == kBlkSOk);
}

TEST_CASE("blk: reset under load drains what is in flight, then the device starts over")
{
    BlkRig rig(EngineKind::kNative);
    for (int round = 0; round < 3; ++round) {
        for (unsigned i = 0; i < 64; ++i)
            rig.queue_request(i, i % 2 ? kBlkTIn : kBlkTOut, 8ull * i, 4096);
        rig.driver.kick(0);
        rig.driver.write_status(0);  // returns only when nothing is in flight
        CHECK(rig.driver.status() == 0);
        CHECK(rig.driver.reprobe(kAllFeatures, 1) != 0);
        CHECK(rig.request(kBlkTIn, 0, 512) == kBlkSOk);
    }
}

TEST_CASE("blk: several queues are each served")
{
    for (const AddressSpace notify : {AddressSpace::kMemory, AddressSpace::kPort}) {
        CAPTURE(notify_name(notify));
        BlkRig rig(EngineKind::kSync, false, 8 << 20, "", 4, true, {}, notify);
        CHECK((rig.features & (1ull << 12)) != 0);  // MQ
        for (unsigned q = 0; q < 4; ++q) {
            rig.queue_request(q, kBlkTIn, q, 512, q);
            rig.driver.kick(q);
        }
        for (unsigned q = 0; q < 4; ++q) {
            CHECK(rig.driver.wait_used(q, 1).size() == 1);
            CHECK(*rig.driver.host(BlkRig::status_gpa(q)) == kBlkSOk);
        }
    }
}

TEST_CASE("blk: without ioeventfds a notify write still kicks its queue, in memory or port space")
{
    for (const AddressSpace notify : {AddressSpace::kMemory, AddressSpace::kPort}) {
        CAPTURE(notify_name(notify));
        BlkRig rig(EngineKind::kSync, false, 8 << 20, "", 4, true, {}, notify);
        for (unsigned q = 0; q < 4; ++q) {
            rig.queue_request(q, kBlkTIn, q, 512, q);
            rig.driver.kick_by_exit(q, q % 2 ? 1 : 2);  // a byte write too: KVM's ioeventfd may take only 2
        }
        for (unsigned q = 0; q < 4; ++q) {
            CHECK(rig.driver.wait_used(q, 1).size() == 1);
            CHECK(*rig.driver.host(BlkRig::status_gpa(q)) == kBlkSOk);
        }
    }
}

TEST_CASE("blk: notify in an I/O BAR: one 2-byte port per queue, moved with the BAR, hostile accesses ignored")
{
    constexpr unsigned kQueues = 3;
    BlkRig rig(EngineKind::kSync, false, 8 << 20, "", kQueues, true, {}, AddressSpace::kPort);
    auto& transport = *rig.transport;
    auto& host = rig.driver.host_interface();
    // BAR 2 is an I/O BAR of 8 bytes (3 queues x 2, rounded up), in the bridge's I/O window.
    const uint32_t bar2 = transport.config_read(0x18, 4);
    CHECK((bar2 & 1) == 1);
    CHECK(transport.bar_address(2) >= GuestDriver::kIoBase);
    CHECK(host.io_bar == transport.bar_address(2));
    for (unsigned q = 0; q < kQueues; ++q)
        CHECK(host.notify.count({AddressSpace::kPort, host.io_bar + 2 * q}) == 1);
    CHECK(host.notify.size() == kQueues);  // nothing left in memory space

    // With the device reset no I/O thread reads the notify eventfds, so what a write signals stays there to see.
    rig.driver.write_status(0);
    auto pending = [&](unsigned q) {
        pollfd p{rig.driver.queue(q).notify_fd, POLLIN, 0};
        return ::poll(&p, 1, 0) == 1;
    };
    // Hostile writes through the exit path: past the last port, straddling the end, far out, and BAR 0's
    // memory notify area that this device does not offer: none signals a queue, none crashes.
    host.io_device->write(2 * kQueues, std::vector<uint8_t>(2, 0));
    host.io_device->write(2 * kQueues - 1, std::vector<uint8_t>(4, 0));
    host.io_device->write(~uint64_t{0}, std::vector<uint8_t>(2, 0));
    transport.write(VirtioPciDevice::kNotifyOffset, std::vector<uint8_t>(2, 0));
    for (unsigned q = 0; q < kQueues; ++q)
        CHECK_FALSE(pending(q));
    std::vector<uint8_t> in(4, 0xaa);
    host.io_device->read(0, in);
    CHECK(in == std::vector<uint8_t>(4, 0));
    // A byte at the odd half of queue 1's port is queue 1's.
    host.io_device->write(3, std::vector<uint8_t>(1, 0));
    CHECK(pending(1));
    CHECK_FALSE(pending(0));
    CHECK_FALSE(pending(2));

    // Sizing reads back the size mask with the upper 16 bits hardwired to zero; the guest moves the BAR.
    transport.config_write(0x18, 4, 0xffffffff);
    CHECK(transport.config_read(0x18, 4) == 0xfff9u);
    transport.config_write(0x18, 4, 0x7000);
    CHECK(host.io_bar == 0x7000);
    CHECK(host.notify.count({AddressSpace::kPort, 0x7000 + 2}) == 1);
    CHECK(host.notify.size() == kQueues);
    // I/O decoding off: unmapped, no ioeventfds; on again: back.
    transport.config_write(0x04, 2, 0x6);
    CHECK(host.io_bar == 0);
    CHECK(host.notify.empty());
    transport.config_write(0x04, 2, 0x7);
    CHECK(host.io_bar == 0x7000);
    CHECK(host.notify.size() == kQueues);
    // The driver finds the port where it moved, and the queues work there.
    REQUIRE(rig.driver.reprobe(kAllFeatures, kQueues) != 0);
    rig.queue_request(0, kBlkTIn, 0, 512, 0);
    rig.driver.kick(0);
    CHECK(rig.driver.wait_used(0, 1).size() == 1);
    rig.queue_request(1, kBlkTIn, 1, 512, 2);
    rig.driver.kick_by_exit(2);
    CHECK(rig.driver.wait_used(2, 1).size() == 1);
}

TEST_CASE("blk: a driver without MSI-X gets INTx, acknowledged through the ISR")
{
    BlkRig rig(EngineKind::kSync, false, 8 << 20, "", 1, false);
    // Without EVENT_IDX every completion interrupts, so each one can be checked.
    REQUIRE(rig.driver.reprobe(kAllFeatures & ~kVirtioFRingEventIdx, 1) != 0);
    auto& host = rig.driver.host_interface();
    for (int i = 0; i < 20; ++i) {
        // Wait for the line here, not in wait_used(): that one acknowledges it itself.
        rig.queue_request(0, kBlkTIn, static_cast<uint64_t>(i), 512);
        rig.driver.kick(0);
        for (int waited = 0; !host.intx.load() && waited < 5000; ++waited)
            ::usleep(1000);
        REQUIRE(host.intx.load());
        CHECK(rig.driver.read_isr() == 1);
        CHECK_FALSE(host.intx.load());  // the ISR read dropped the line
        // The used entry was published before the interrupt.
        CHECK(rig.driver.wait_used(0, 1, 0).size() == 1);
        CHECK(*rig.driver.host(BlkRig::status_gpa(0)) == kBlkSOk);
    }
    // A broken ring: NEEDS_RESET announced by the configuration bit in the ISR.
    rig.driver.add_chain(0, {{BlkRig::header_gpa(0), 16, false}});
    rig.driver.kick(0);
    for (int waited = 0; !rig.driver.host_interface().intx.load() && waited < 5000; ++waited)
        ::usleep(1000);
    CHECK(rig.driver.read_isr() == 2);
    CHECK((rig.driver.status() & kNeedsReset) != 0);
}

namespace {
// Writes a distinct pattern through every queue at once (QD16 each), reads it
// back through every queue, and checks both against the image file.
void write_and_verify_all_queues(BlkRig& rig, unsigned queues, uint8_t seed)
{
    constexpr unsigned kDepth = 16;
    auto slot = [&](unsigned q, unsigned i) { return q * kDepth + i; };
    auto sector = [&](unsigned q, unsigned i) { return 8ull * (q * kDepth + i); };
    auto fill = [&](unsigned q, unsigned i) { return static_cast<uint8_t>(seed + q * kDepth + i); };
    for (uint32_t type : {kBlkTOut, kBlkTIn}) {
        for (unsigned q = 0; q < queues; ++q)
            for (unsigned i = 0; i < kDepth; ++i) {
                std::memset(rig.driver.host(BlkRig::data_gpa(slot(q, i))), type == kBlkTOut ? fill(q, i) : 0, 4096);
                rig.queue_request(slot(q, i), type, sector(q, i), 4096, q);
            }
        for (unsigned q = 0; q < queues; ++q)
            rig.driver.kick(q);
        for (unsigned q = 0; q < queues; ++q)
            CHECK(rig.driver.wait_used(q, kDepth).size() == kDepth);
        for (unsigned q = 0; q < queues; ++q)
            for (unsigned i = 0; i < kDepth; ++i) {
                CHECK(*rig.driver.host(BlkRig::status_gpa(slot(q, i))) == kBlkSOk);
                const uint8_t* data = rig.driver.host(BlkRig::data_gpa(slot(q, i)));
                CHECK(std::vector<uint8_t>(data, data + 4096) == std::vector<uint8_t>(4096, fill(q, i)));
                CHECK(rig.file_bytes(512 * sector(q, i), 4096) == std::vector<uint8_t>(4096, fill(q, i)));
            }
    }
}
}  // namespace

TEST_CASE("blk: two disks x 4 queues over a group of 2 I/O threads, each queue on its own thread only")
{
    for (const uint64_t poll_max_ns : {uint64_t{0}, uint64_t{32768}, uint64_t{1'000'000}}) {
        CAPTURE(poll_max_ns);
        std::vector<std::unique_ptr<IoThread>> group;
        for (unsigned k = 0; k < 2; ++k)
            group.push_back(std::make_unique<IoThread>(
                IoThreadOptions{"iothread" + std::to_string(k), {poll_max_ns, 0, 0}, 0, -1}));
        const auto map = map_queues(2, {{4, {}}, {4, {}}});
        std::vector<std::unique_ptr<BlkRig>> disks;
        for (unsigned d = 0; d < 2; ++d) {
            std::vector<IoThread*> threads;
            for (const unsigned k : map[d])
                threads.push_back(group[k].get());
            const EngineKind engine = d == 0 ? EngineKind::kNative : EngineKind::kIoUring;
            disks.push_back(std::make_unique<BlkRig>(engine, false, 8 << 20, "disk", 4, true, threads));
        }
        for (unsigned round = 0; round < 2; ++round)
            for (unsigned d = 0; d < 2; ++d)
                write_and_verify_all_queues(*disks[d], 4, static_cast<uint8_t>(0x10 * d + round));
        for (unsigned d = 0; d < 2; ++d) {
            for (unsigned q = 0; q < 4; ++q) {
                CAPTURE(d);
                CAPTURE(q);
                const QueueStats& stats = disks[d]->blk->queue_stats(q);
                CHECK(stats.server() == group[map[d][q]]->tid());
                CHECK_FALSE(stats.moved());
                CHECK(stats.counters().requests == 2 * 2 * 16);
                CHECK(&disks[d]->blk->queue_thread(q) == group[map[d][q]].get());
            }
        }
        // Each thread served its four queues' requests, none of the others'.
        for (unsigned k = 0; k < 2; ++k) {
            CHECK(group[k]->stats().io.counters().requests == 4 * 2 * 2 * 16);
            if (poll_max_ns == 0)
                CHECK(group[k]->stats().poll_hits.load() == 0);
        }
        disks.clear();  // the devices go before their threads
    }
}

namespace {
// Keeps an I/O thread in its event loop, running one posted handler after
// another, so that it never gets to submit to its engine: whatever a queue
// takes meanwhile stays in flight until release().
class EventLoopHold {
public:
    explicit EventLoopHold(IoThread& thread) : state_(std::make_shared<State>())
    {
        spin(thread, state_);
        for (int waited = 0; !state_->spinning && waited < 5000; ++waited)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        REQUIRE(state_->spinning);
    }
    ~EventLoopHold() { release(); }
    void release() { state_->held = false; }

private:
    struct State {
        std::atomic<bool> held{true}, spinning{false};
    };
    // Each handler posts the next: the loop always has one ready.
    static void spin(IoThread& thread, std::shared_ptr<State> state)
    {
        thread.post([&thread, state] {
            state->spinning = true;
            if (state->held)
                spin(thread, state);
        });
    }
    std::shared_ptr<State> state_;
};
}  // namespace

TEST_CASE("blk: a request counts as in flight on its queue and thread from its start until answered")
{
    BlkRig rig;
    const QueueStats& queue = rig.blk->queue_stats(0);
    const QueueStats& thread = rig.thread.stats().io;
    CHECK(rig.request(kBlkTIn, 0, 512) == kBlkSOk);
    CHECK(queue.in_flight() == 0);
    {
        EventLoopHold hold(rig.thread);
        rig.queue_request(0, kBlkTIn, 8, 4096);
        rig.driver.kick(0);
        for (int waited = 0; queue.in_flight() == 0 && waited < 5000; ++waited)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        CHECK(queue.in_flight() == 1);
        CHECK(thread.in_flight() == 1);
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        CHECK(rig.driver.used_idx(0) == 1);  // not answered while held
        CHECK(queue.counters().requests == 1);
    }
    REQUIRE(rig.driver.wait_used(0, 1).size() == 1);
    CHECK(*rig.driver.host(BlkRig::status_gpa(0)) == kBlkSOk);
    // Counted before the answer was published: the guest never sees a stale count.
    CHECK(queue.in_flight() == 0);
    CHECK(thread.in_flight() == 0);
    CHECK(queue.counters().requests == 2);
}

TEST_CASE("blk: a reset drops what is in flight from the count")
{
    BlkRig rig(EngineKind::kNative);
    for (int round = 0; round < 3; ++round) {
        for (unsigned i = 0; i < 64; ++i)
            rig.queue_request(i, i % 2 ? kBlkTIn : kBlkTOut, 8ull * i, 4096);
        rig.driver.kick(0);
        rig.driver.write_status(0);  // waits for what is in flight, answers none of it
        CHECK(rig.blk->queue_stats(0).in_flight() == 0);
        CHECK(rig.thread.stats().io.in_flight() == 0);
        CHECK(rig.driver.reprobe(kAllFeatures, 1) != 0);
    }
}

TEST_CASE("statistics sample: a row per disk queue, with its thread, image and that thread's CPU")
{
    char tmpl[] = "/tmp/lkvm-device.XXXXXX";
    const std::filesystem::path dir = ::mkdtemp(tmpl);
    const std::string path = (dir / "disk.raw").string();
    std::ofstream(path, std::ios::binary) << std::string(1 << 20, '\0');
    GuestDriver driver;
    std::vector<std::unique_ptr<IoThread>> threads;
    threads.push_back(std::make_unique<IoThread>(IoThreadOptions{"iothread0", {}, 0, -1}));
    threads.push_back(std::make_unique<IoThread>(IoThreadOptions{"iothread1", {}, 0, -1}));
    for (const auto& t : threads)
        t->run_and_wait([] {});
    {
        std::vector<std::unique_ptr<DiskDevice>> disks;
        disks.push_back(std::make_unique<VirtioBlk>(DiskImage::open({path, true}),
                                                    BlkOptions{"", EngineKind::kSync, 0, 256}, driver.memory(),
                                                    std::vector<IoThread*>{threads[1].get(), threads[0].get()}));
        const StatSnapshot sample = sample_io_stats(threads, disks);
        REQUIRE(sample.threads.size() == 2);
        REQUIRE(sample.queues.size() == 2);
        for (unsigned q = 0; q < 2; ++q) {
            CAPTURE(q);
            const auto& row = sample.queues[q];
            CHECK(row.disk == 0);
            CHECK(row.queue == q);
            CHECK(row.thread == (q == 0 ? "iothread1" : "iothread0"));
            CHECK(row.image == path);
            CHECK(row.cpu == sample.threads[q == 0 ? 1 : 0].cpu);
            CHECK(row.cpu >= 0);
            CHECK(row.requests == 0);
            CHECK(row.in_flight == 0);
        }
    }
    std::filesystem::remove_all(dir);
}

TEST_CASE("blk: in steady state the request path allocates nothing, whatever the engine, polling or sleeping")
{
    for (EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring, EngineKind::kNull}) {
        // Polling for up to a second, the thread never sleeps in the window
        // below; without polling it sleeps whenever it finds nothing, and
        // every wakeup re-arms the Asio waits of the queue and the engine.
        for (const uint64_t poll_ns : {1'000'000'000ull, 0ull}) {
            CAPTURE(std::string(engine_kind_name(engine)));
            CAPTURE(poll_ns);
            IoThread thread(IoThreadOptions{"disk0-io", {poll_ns, 0, 0}, 0, -1});
            BlkRig rig(engine, false, 8 << 20, "lkvm-serial-0001", 1, true, {&thread});
            // 4 KiB reads and writes, 64 in flight, each request at its own spot;
            // the descriptors of request i are 3i..3i+2.
            uint64_t round = 0;
            auto queue = [&](unsigned i) {
                const bool write = (i + round++) % 3 == 0;
                rig.queue_request(i, write ? kBlkTOut : kBlkTIn, 8ull * ((i * 37 + round) % 2000), 4096);
            };
            constexpr uint64_t kWarmUp = 4000, kCounted = 20000;
            REQUIRE(rig.driver.keep_in_flight(0, 64, 3, kWarmUp, queue) == kWarmUp);
            uint64_t counted = 0;
            {
                PostsMeanwhile posts(thread);
                CHECK(allocations_on(thread, [&] { counted = rig.driver.keep_in_flight(0, 64, 3, kCounted, queue); }) == 0);
            }
            CHECK(counted == kCounted);
            CHECK(rig.blk->queue_stats(0).counters().requests == kWarmUp + kCounted);
        }
    }
}

TEST_CASE("blk: kicks and completions that race the thread's switch from polling to sleep are never lost")
{
    // One request at a time with pauses of 0-60 us between them: kicks and
    // disk completions (O_DIRECT: they come from the disk, later) land while
    // the thread polls, while it turns notifications back on, and while it
    // sleeps. The driver kicks only when the device asks for kicks, as Linux
    // does. A lost kick or completion stalls the queue: wait_used gives up.
    for (EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        BlkRig rig(engine, false, 8 << 20, "lkvm-serial-0001", 1, true, {}, AddressSpace::kMemory, true);
        std::mt19937 rng(7);
        unsigned stalled = 0;
        for (unsigned i = 0; i < 3000 && stalled == 0; ++i) {
            rig.queue_request(0, i % 4 == 0 ? kBlkTOut : kBlkTIn, 8ull * (i % 1024), 4096);
            rig.driver.kick_if_needed(0);
            if (rig.driver.wait_used(0, 1, 5000).size() != 1)
                ++stalled;
            const auto pause = std::chrono::steady_clock::now() + std::chrono::microseconds(rng() % 60);
            while (std::chrono::steady_clock::now() < pause) {
            }
        }
        CHECK(stalled == 0);
        CHECK(rig.blk->queue_stats(0).counters().requests == 3000);
    }
}

TEST_CASE("blk: an engine that cannot be set up fails making the device (lkvm's start), not the guest's DRIVER_OK")
{
    char tmpl[] = "/tmp/lkvm-device.XXXXXX";
    const std::filesystem::path dir = ::mkdtemp(tmpl);
    const std::string path = (dir / "disk.raw").string();
    std::ofstream(path, std::ios::binary) << std::string(1 << 20, '\0');
    IoThreadOptions options{"disk0-io", {}, 0, -1};
    options.make_engine = [](EngineKind, size_t) -> std::unique_ptr<IoEngine> {
        throw Error("io_setup for the native (libaio) engine: Resource temporarily unavailable");
    };
    IoThread thread(std::move(options));
    GuestDriver driver;
    CHECK_THROWS_WITH_AS(VirtioBlk(DiskImage::open({path, false}), BlkOptions{"s", EngineKind::kNative, 0, 256},
                                   driver.memory(), {&thread}),
                         "io_setup for the native (libaio) engine: Resource temporarily unavailable", Error);
    std::filesystem::remove_all(dir);
}

TEST_CASE("blk: a disk that fails one request (EIO, ENOSPC, a short read) fails that request only, and goes on")
{
    // Reads of sector 8 fail with EIO, writes of 16 with ENOSPC, reads of 24
    // come back short. Every other request is served.
    const FaultRule fault = eio_enospc_short_read(2048);
    struct Case {
        uint32_t type;
        uint64_t sector;
        uint8_t status;
    };
    const Case cases[] = {{kBlkTIn, 0, kBlkSOk},      {kBlkTIn, 8, kBlkSIoErr},  {kBlkTOut, 16, kBlkSIoErr},
                          {kBlkTIn, 24, kBlkSIoErr}, {kBlkTOut, 32, kBlkSOk},    {kBlkTIn, 40, kBlkSOk}};
    for (EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        BlkRig rig(engine, false, 8 << 20, "lkvm-serial-0001", 1, true, {}, AddressSpace::kMemory, false, fault);
        const auto before = rig.file_bytes(0, 64 * 512);
        for (unsigned i = 0; i < std::size(cases); ++i) {
            std::memset(rig.driver.host(BlkRig::data_gpa(i)), 0x70 + static_cast<int>(i), 4096);
            rig.queue_request(i, cases[i].type, cases[i].sector, 4096);
        }
        rig.driver.kick(0);
        REQUIRE(rig.driver.wait_used(0, std::size(cases)).size() == std::size(cases));
        for (unsigned i = 0; i < std::size(cases); ++i) {
            CAPTURE(i);
            CHECK(*rig.driver.host(BlkRig::status_gpa(i)) == cases[i].status);
        }
        // The failed write left the image as it was; the good one reached it.
        CHECK(rig.file_bytes(16 * 512, 4096) == std::vector<uint8_t>(before.begin() + 16 * 512, before.begin() + 24 * 512));
        CHECK(rig.file_bytes(32 * 512, 4096) == std::vector<uint8_t>(4096, 0x74));
        // The disk goes on serving, and counts what failed.
        CHECK(rig.request(kBlkTIn, 48, 4096) == kBlkSOk);
        CHECK(rig.blk->queue_stats(0).errors() == 3);
    }
}

TEST_CASE("blk: a direct disk on io_uring (guest RAM as fixed buffers): data both ways, no allocation per request")
{
    // The device registers the guest's RAM with its threads' io_uring engines
    // for a direct disk; 4 KiB requests with one data buffer then go as
    // READ_FIXED/WRITE_FIXED, the rest (8 KiB in two buffers) as vectors.
    IoThread busy(IoThreadOptions{"disk0-io", {1'000'000'000, 0, 0}, 0, -1});
    BlkRig rig(EngineKind::kIoUring, false, 8 << 20, "lkvm-serial-0001", 1, true, {&busy}, AddressSpace::kMemory, true);
    constexpr unsigned kDepth = 32;
    auto data = [&](unsigned i) { return rig.driver.host(BlkRig::data_gpa(i)); };
    auto queue_split = [&](unsigned i, uint32_t type) {
        // Header, 4 KiB, another 4 KiB 64 KiB further on, status.
        std::memcpy(rig.driver.host(BlkRig::header_gpa(i)), &type, 4);
        const uint64_t sector = 8ull * (i * 5 + 1000);
        std::memcpy(rig.driver.host(BlkRig::header_gpa(i)) + 8, &sector, 8);
        const bool in = type == kBlkTIn;
        rig.driver.add_chain(0, {{BlkRig::header_gpa(i), 16, false},
                                 {BlkRig::data_gpa(i), 4096, in},
                                 {BlkRig::data_gpa(i) + 0x10000, 4096, in},
                                 {BlkRig::status_gpa(i), 1, true}});
    };
    for (unsigned i = 0; i < kDepth; ++i) {
        std::memset(data(i), static_cast<int>(0x40 + i), 4096);
        std::memset(data(i) + 0x10000, static_cast<int>(0x80 + i), 4096);
        if (i % 2)
            queue_split(i, kBlkTOut);
        else
            rig.queue_request(i, kBlkTOut, 8ull * i * 3, 4096);
    }
    rig.driver.kick(0);
    REQUIRE(rig.driver.wait_used(0, kDepth).size() == kDepth);
    for (unsigned i = 0; i < kDepth; ++i) {
        CHECK(*rig.driver.host(BlkRig::status_gpa(i)) == kBlkSOk);
        if (i % 2) {
            CHECK(rig.file_bytes(512ull * 8 * (i * 5 + 1000), 4096) == std::vector<uint8_t>(4096, static_cast<uint8_t>(0x40 + i)));
            CHECK(rig.file_bytes(512ull * 8 * (i * 5 + 1000) + 4096, 4096) ==
                  std::vector<uint8_t>(4096, static_cast<uint8_t>(0x80 + i)));
        } else {
            CHECK(rig.file_bytes(512ull * 8 * i * 3, 4096) == std::vector<uint8_t>(4096, static_cast<uint8_t>(0x40 + i)));
        }
        std::memset(data(i), 0, 4096);
        std::memset(data(i) + 0x10000, 0, 4096);
        if (i % 2)
            queue_split(i, kBlkTIn);
        else
            rig.queue_request(i, kBlkTIn, 8ull * i * 3, 4096);
    }
    rig.driver.kick(0);
    REQUIRE(rig.driver.wait_used(0, kDepth).size() == kDepth);
    for (unsigned i = 0; i < kDepth; ++i) {
        CHECK(*rig.driver.host(BlkRig::status_gpa(i)) == kBlkSOk);
        CHECK(std::vector<uint8_t>(data(i), data(i) + 4096) == std::vector<uint8_t>(4096, static_cast<uint8_t>(0x40 + i)));
        if (i % 2)
            CHECK(std::vector<uint8_t>(data(i) + 0x10000, data(i) + 0x11000) ==
                  std::vector<uint8_t>(4096, static_cast<uint8_t>(0x80 + i)));
    }

    // Steady state, as the allocation test above.
    uint64_t round = 0;
    auto queue = [&](unsigned i) {
        const bool write = (i + round++) % 3 == 0;
        rig.queue_request(i, write ? kBlkTOut : kBlkTIn, 8ull * ((i * 37 + round) % 2000), 4096);
    };
    REQUIRE(rig.driver.keep_in_flight(0, 64, 3, 2000, queue) == 2000);
    uint64_t counted = 0;
    CHECK(allocations_on(busy, [&] { counted = rig.driver.keep_in_flight(0, 64, 3, 10000, queue); }) == 0);
    CHECK(counted == 10000);
}

namespace {
ThrottleLimits iops_limit(uint64_t iops)
{
    ThrottleLimits limits;
    limits[ThrottleBucket::kIopsTotal].avg = iops;
    return limits;
}

// Queues `count` 4 KiB reads as requests first..first+count-1 and kicks.
void queue_reads(BlkRig& rig, unsigned first, unsigned count)
{
    for (unsigned i = first; i < first + count; ++i)
        rig.queue_request(i, kBlkTIn, 8ull * i, 4096);
    rig.driver.kick(0);
}
}  // namespace

TEST_CASE("blk: a throttled disk holds reads back to its rate, answers every one, and counts the time held")
{
    ThrottleGroup group("0", iops_limit(100));  // 10 at once, then one per 10 ms
    BlkRig rig(EngineKind::kSync, false, 8 << 20, "s", 1, true, {}, AddressSpace::kMemory, false, {}, {.throttle = &group});
    const auto start = std::chrono::steady_clock::now();
    queue_reads(rig, 0, 40);
    size_t answered = 0;
    while (answered < 40) {
        const auto used = rig.driver.wait_used(0, 1);
        REQUIRE_FALSE(used.empty());
        answered += used.size();
    }
    // A lower bound only: at most 10 + 100/s may have gone, however fast the host.
    CHECK(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(250));
    for (unsigned i = 0; i < 40; ++i)
        CHECK(*rig.driver.host(BlkRig::status_gpa(i)) == kBlkSOk);
    CHECK(rig.blk->queue_stats(0).throttled_ns() >= 200'000'000);
    // Flushes are never held.
    CHECK(rig.request(kBlkTFlush, 0, 0) == kBlkSOk);
}

TEST_CASE("blk: two disks in one throttle group take turns: the one that came later is not starved")
{
    ThrottleGroup group("shared", iops_limit(200));
    IoThread other({"disk1-io", {}, 0, -1});
    BlkRig first(EngineKind::kSync, false, 8 << 20, "a", 1, true, {}, AddressSpace::kMemory, false, {}, {.throttle = &group});
    BlkRig second(EngineKind::kSync, false, 8 << 20, "b", 1, true, {&other}, AddressSpace::kMemory, false, {},
                  {.throttle = &group});
    queue_reads(first, 0, 60);
    // The first disk's burst is gone and its other requests wait in line when the second's come.
    for (int waited = 0; first.blk->queue_stats(0).counters().requests < 20 && waited < 10000; ++waited)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    queue_reads(second, 0, 20);
    size_t answered_first = first.blk->queue_stats(0).counters().requests;
    size_t answered_second = 0;
    const size_t from = answered_first;
    // In turns, the second's 20 are done by the time the first has some 20 more;
    // first come first served would give it none until the first's 40 were done.
    while (answered_second < 20) {
        const auto used = second.driver.wait_used(0, 1);
        REQUIRE_FALSE(used.empty());
        answered_second += used.size();
    }
    answered_first = first.blk->queue_stats(0).counters().requests;
    CHECK(answered_first - from <= 30);
    size_t seen = 0;
    while (seen < 60) {
        const auto used = first.driver.wait_used(0, 1);
        REQUIRE_FALSE(used.empty());
        seen += used.size();
    }
    CHECK(first.blk->queue_stats(0).counters().requests == 60);
}

TEST_CASE("blk: new throttle limits apply to what is held at once; a reset drops held requests without waiting for them")
{
    ThrottleGroup group("0", iops_limit(1));  // the second read would wait a second, the twentieth 19
    BlkRig rig(EngineKind::kNative, false, 8 << 20, "s", 1, true, {}, AddressSpace::kMemory, false, {}, {.throttle = &group});
    queue_reads(rig, 0, 20);
    REQUIRE(rig.driver.wait_used(0, 1).size() == 1);
    group.set_limits({});
    size_t answered = 1;
    while (answered < 20) {
        const auto used = rig.driver.wait_used(0, 1, 5000);
        REQUIRE_FALSE(used.empty());
        answered += used.size();
    }
    group.set_limits(iops_limit(1));
    for (int round = 0; round < 3; ++round) {
        queue_reads(rig, 0, 20);
        for (int waited = 0; rig.blk->queue_stats(0).in_flight() < 19 && waited < 10000; ++waited)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        rig.driver.write_status(0);  // returns once nothing is in flight: held requests are dropped
        CHECK(rig.blk->queue_stats(0).in_flight() == 0);
        CHECK(rig.driver.reprobe(kAllFeatures, 1) != 0);
        group.set_limits(iops_limit(1));  // an empty bucket again for the next round
    }
}

namespace {
// Records what would have paused the guest, as lkvm's machine does.
struct RecordedStops : IoErrorStop {
    std::mutex mutex;
    std::vector<std::string> why;
    void stop_for_io_error(const std::string& reason) override
    {
        std::lock_guard lock(mutex);
        why.push_back(reason);
    }
    size_t wait_for(size_t n)
    {
        for (int waited = 0; waited < 10000; ++waited) {
            {
                std::lock_guard lock(mutex);
                if (why.size() >= n)
                    return why.size();
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        std::lock_guard lock(mutex);
        return why.size();
    }
};

// The first `count` requests of `op` fail with `error`, the rest run.
FaultRule first_fail(IoOp op, int count, int64_t error)
{
    auto left = std::make_shared<std::atomic<int>>(count);
    return [=](const IoRequest& r) -> std::optional<int64_t> {
        if (r.op == op && left->fetch_sub(1) > 0)
            return error;
        return std::nullopt;
    };
}
}  // namespace

TEST_CASE("blk: werror=/rerror=: stop holds a failed request for the guest's pause and retries it at resume")
{
    RecordedStops stops;
    auto rig_with = [&](FaultRule fault, IoErrorPolicy read_error, IoErrorPolicy write_error, bool stopper = true) {
        BlkOptions policy;
        policy.read_error = read_error;
        policy.write_error = write_error;
        policy.error_stop = stopper ? &stops : nullptr;
        return std::make_unique<BlkRig>(EngineKind::kSync, false, 8 << 20, "s", 1, true, std::vector<IoThread*>{},
                                        AddressSpace::kMemory, false, std::move(fault), policy);
    };
    SUBCASE("enospc: ENOSPC pauses, twice, then the retry writes the data")
    {
        auto rig = rig_with(first_fail(IoOp::kWrite, 2, -ENOSPC), IoErrorPolicy::kReport, IoErrorPolicy::kEnospc);
        std::memset(rig->driver.host(BlkRig::data_gpa(0)), 0x5c, 4096);
        rig->queue_request(0, kBlkTOut, 16, 4096);
        rig->driver.kick(0);
        REQUIRE(stops.wait_for(1) == 1);
        CHECK(stops.why[0].find("write error (No space left on device)") != std::string::npos);
        CHECK(rig->driver.wait_used(0, 1, 100).empty());  // unanswered while the guest is paused
        rig->blk->retry_failed();
        REQUIRE(stops.wait_for(2) == 2);                  // still full: paused again
        rig->blk->retry_failed();
        REQUIRE(rig->driver.wait_used(0, 1).size() == 1);
        CHECK(*rig->driver.host(BlkRig::status_gpa(0)) == kBlkSOk);
        CHECK(rig->file_bytes(16 * 512, 4096) == std::vector<uint8_t>(4096, 0x5c));
        CHECK(rig->blk->queue_stats(0).errors() == 2);
    }
    SUBCASE("enospc: any other error is reported")
    {
        auto rig = rig_with(first_fail(IoOp::kWrite, 1, -EIO), IoErrorPolicy::kReport, IoErrorPolicy::kEnospc);
        CHECK(rig->request(kBlkTOut, 16, 4096) == kBlkSIoErr);
        CHECK(stops.why.empty());
    }
    SUBCASE("rerror=stop: a failed read pauses, and reads the data at resume")
    {
        auto rig = rig_with(first_fail(IoOp::kRead, 1, -EIO), IoErrorPolicy::kStop, IoErrorPolicy::kReport);
        rig->queue_request(0, kBlkTIn, 1, 512);
        rig->driver.kick(0);
        REQUIRE(stops.wait_for(1) == 1);
        CHECK(stops.why[0].find("read error (Input/output error)") != std::string::npos);
        rig->blk->retry_failed();
        REQUIRE(rig->driver.wait_used(0, 1).size() == 1);
        CHECK(*rig->driver.host(BlkRig::status_gpa(0)) == kBlkSOk);
        CHECK(std::equal(rig->driver.host(BlkRig::data_gpa(0)), rig->driver.host(BlkRig::data_gpa(0)) + 512,
                         rig->file_bytes(512, 512).begin()));
    }
    SUBCASE("ignore: the guest is told it went well; the error is still counted")
    {
        auto rig = rig_with(first_fail(IoOp::kWrite, 1, -ENOSPC), IoErrorPolicy::kReport, IoErrorPolicy::kIgnore);
        const auto before = rig->file_bytes(16 * 512, 4096);
        CHECK(rig->request(kBlkTOut, 16, 4096) == kBlkSOk);
        CHECK(rig->file_bytes(16 * 512, 4096) == before);
        CHECK(rig->blk->queue_stats(0).errors() == 1);
    }
    SUBCASE("stop with nobody to pause the guest reports the error instead")
    {
        auto rig = rig_with(first_fail(IoOp::kWrite, 1, -ENOSPC), IoErrorPolicy::kStop, IoErrorPolicy::kStop, false);
        CHECK(rig->request(kBlkTOut, 16, 4096) == kBlkSIoErr);
    }
    SUBCASE("a reset drops a request waiting for its retry, without waiting for it")
    {
        auto rig = rig_with(first_fail(IoOp::kWrite, 1, -ENOSPC), IoErrorPolicy::kReport, IoErrorPolicy::kStop);
        rig->queue_request(0, kBlkTOut, 16, 4096);
        rig->driver.kick(0);
        REQUIRE(stops.wait_for(1) == 1);
        rig->driver.write_status(0);
        CHECK(rig->blk->queue_stats(0).in_flight() == 0);
        rig->blk->retry_failed();  // nothing left to retry: harmless
        CHECK(rig->driver.reprobe(kAllFeatures, 1) != 0);
        CHECK(rig->request(kBlkTIn, 0, 512) == kBlkSOk);
    }
}

namespace {
constexpr uint64_t kConfigWce = 1ull << 11;
constexpr unsigned kWritebackOffset = 32;

// What reached the engine, in order: each request's op and offset. The rule
// runs on the I/O thread; the test reads it after the answers came.
struct EngineLog {
    std::mutex mutex;
    std::vector<std::pair<IoOp, uint64_t>> ops;
    std::optional<int64_t> fail_flushes;  // flushes complete with this instead

    FaultRule rule()
    {
        return [this](const IoRequest& r) -> std::optional<int64_t> {
            std::lock_guard lock(mutex);
            ops.emplace_back(r.op, r.offset);
            return r.op == IoOp::kFlush ? fail_flushes : std::nullopt;
        };
    }
    std::vector<IoOp> take()
    {
        std::lock_guard lock(mutex);
        std::vector<IoOp> out;
        for (const auto& op : ops)
            out.push_back(op.first);
        ops.clear();
        return out;
    }
};

BlkRig cache_rig(CacheMode cache, EngineLog& log, EngineKind engine = EngineKind::kSync,
                 DetectZeroes detect = DetectZeroes::kOff, bool discard = true)
{
    return BlkRig(engine, false, 8 << 20, "lkvm-serial-0001", 1, true, {}, AddressSpace::kMemory, false, log.rule(),
                  {.discard = discard, .detect_zeroes = detect}, cache);
}
}  // namespace

TEST_CASE("blk: CONFIG_WCE: writeback shows the cache mode, a driver's write switches it, malformed writes change nothing")
{
    for (const CacheMode cache : {CacheMode::kWriteback, CacheMode::kNone, CacheMode::kWritethrough,
                                  CacheMode::kDirectsync, CacheMode::kUnsafe}) {
        CAPTURE(cache_mode_name(cache));
        EngineLog log;
        BlkRig rig = cache_rig(cache, log);
        const uint8_t initial = cache == CacheMode::kWritethrough || cache == CacheMode::kDirectsync ? 0 : 1;
        CHECK((rig.features & kConfigWce) != 0);
        CHECK((rig.features & (1ull << 9)) != 0);  // offered with FLUSH, as virtio 1.x 5.2.5.1 wants
        CHECK(rig.driver.device_config8(kWritebackOffset) == initial);
        CHECK(rig.blk->write_cache() == (initial == 1));
        // Linux's cache_type "write through", then "write back": a one-byte write, read back.
        rig.driver.write_device_config(kWritebackOffset, 1, 0);
        CHECK(rig.driver.device_config8(kWritebackOffset) == 0);
        CHECK_FALSE(rig.blk->write_cache());
        rig.driver.write_device_config(kWritebackOffset, 1, 1);
        CHECK(rig.driver.device_config8(kWritebackOffset) == 1);
        CHECK(rig.blk->write_cache());

        // Malformed: other sizes, offsets, values, fields that are not the driver's, past the end.
        const uint64_t capacity = rig.driver.device_config64(0);
        const std::array<std::array<uint64_t, 3>, 10> bad = {{{kWritebackOffset, 2, 0}, {kWritebackOffset, 4, 0},
                                                              {kWritebackOffset, 8, 0}, {kWritebackOffset, 1, 2},
                                                              {kWritebackOffset, 1, 0xff}, {kWritebackOffset - 1, 2, 0},
                                                              {kWritebackOffset + 1, 1, 0}, {0, 8, 0}, {12, 4, 0},
                                                              {0xfff, 1, 0}}};
        for (const auto& write : bad) {
            // Named copies, not a structured binding: clang's CAPTURE lambda cannot take one.
            const uint64_t offset = write[0], size = write[1], value = write[2];
            CAPTURE(offset);
            CAPTURE(size);
            rig.driver.write_device_config(static_cast<unsigned>(offset), static_cast<unsigned>(size), value);
            CHECK(rig.driver.device_config8(kWritebackOffset) == 1);
            CHECK(rig.driver.device_config64(0) == capacity);
            CHECK(rig.driver.device_config32(12) == 254);
        }
        CHECK((rig.driver.status() & 0x04) != 0);  // still DRIVER_OK: nothing a config write does breaks the device
        CHECK(rig.request(kBlkTOut, 0, 4096) == kBlkSOk);

        // A reset brings the cache mode's default back; a driver without FLUSH gets write through.
        rig.driver.write_device_config(kWritebackOffset, 1, initial ? 0 : 1);
        rig.driver.reprobe(kAllFeatures, 1);
        CHECK(rig.driver.device_config8(kWritebackOffset) == initial);
        rig.driver.reprobe(kAllFeatures & ~(1ull << 9) & ~kConfigWce, 1);
        CHECK_FALSE(rig.blk->write_cache());
    }
}

TEST_CASE("blk: with the write cache off a write is answered after a flush; unsafe's FLUSH reaches nothing")
{
    using enum IoOp;
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        EngineLog log;
        BlkRig rig = cache_rig(CacheMode::kWriteback, log, engine);
        std::memset(rig.driver.host(BlkRig::data_gpa(0)), 'w', 4096);
        CHECK(rig.request(kBlkTOut, 8, 4096) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kWrite});  // write back: the guest flushes when it wants
        CHECK(rig.request(kBlkTFlush, 0, 0) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kFlush});
        CHECK(rig.blk->queue_stats(0).flushes() == 1);

        rig.driver.write_device_config(kWritebackOffset, 1, 0);  // the guest turns the cache off
        CHECK(rig.request(kBlkTOut, 16, 4096) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kWrite, kFlush});  // the flush after the write, before the answer
        CHECK(rig.blk->queue_stats(0).flushes() == 2);
        CHECK(rig.file_bytes(16 * 512, 4096) == std::vector<uint8_t>(4096, 'w'));
        CHECK(rig.request(kBlkTIn, 16, 4096) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kRead});  // reads are not flushed
        CHECK(allocation_request(rig, kBlkTWriteZeroes, {{64, 8, 0}}) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kWriteZeroes, kFlush});
        CHECK(allocation_request(rig, kBlkTDiscard, {{64, 8, 0}}) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kDiscard});  // a discard is a hint: nothing to make durable
        // A write whose flush fails was not made durable: the guest gets IOERR.
        log.fail_flushes = -EIO;
        CHECK(rig.request(kBlkTOut, 24, 4096) == kBlkSIoErr);
        CHECK(log.take() == std::vector<IoOp>{kWrite, kFlush});
        CHECK(rig.blk->queue_stats(0).errors() == 1);
        log.fail_flushes.reset();
        rig.driver.write_device_config(kWritebackOffset, 1, 1);  // back on: writes alone again
        CHECK(rig.request(kBlkTOut, 32, 4096) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kWrite});
    }
    {
        // writethrough: the cache is off from the start, and O_DSYNC writes need no flush of their own.
        EngineLog log;
        BlkRig rig = cache_rig(CacheMode::kWritethrough, log);
        CHECK(rig.request(kBlkTOut, 8, 4096) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kWrite});
        CHECK(allocation_request(rig, kBlkTWriteZeroes, {{64, 8, 0}}) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kWriteZeroes, kFlush});  // fallocate is no O_DSYNC write
        CHECK(rig.request(kBlkTFlush, 0, 0) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kFlush});
    }
    {
        // unsafe: FLUSH completes OK and nothing reaches the engine, write cache on or off.
        EngineLog log;
        BlkRig rig = cache_rig(CacheMode::kUnsafe, log);
        CHECK(rig.request(kBlkTFlush, 0, 0) == kBlkSOk);
        CHECK(log.take().empty());
        rig.driver.write_device_config(kWritebackOffset, 1, 0);
        CHECK(rig.request(kBlkTOut, 8, 4096) == kBlkSOk);
        CHECK(allocation_request(rig, kBlkTWriteZeroes, {{64, 8, 0}}) == kBlkSOk);
        CHECK(rig.request(kBlkTFlush, 0, 0) == kBlkSOk);
        CHECK(log.take() == std::vector<IoOp>{kWrite, kWriteZeroes});
        CHECK(rig.blk->queue_stats(0).flushes() == 0);
    }
}

TEST_CASE("blk: detect-zeroes turns a write of zeroes into a write-zeroes (unmap: a hole); other writes stay writes")
{
    using enum IoOp;
    constexpr uint64_t kMiB = 1 << 20, kSlack = 64 << 10;  // a file system's own metadata
    struct Case {
        DetectZeroes detect;
        bool discard;
        IoOp zero_op;
        bool frees;
    };
    for (const Case c : {Case{DetectZeroes::kOff, true, kWrite, false}, Case{DetectZeroes::kOn, true, kWriteZeroes, false},
                         Case{DetectZeroes::kUnmap, true, kDiscard, true},
                         Case{DetectZeroes::kUnmap, false, kWriteZeroes, false}}) {
        for (const EngineKind engine : {EngineKind::kSync, EngineKind::kIoUring}) {
            CAPTURE(detect_zeroes_name(c.detect));
            CAPTURE(c.discard);
            CAPTURE(std::string(engine_kind_name(engine)));
            EngineLog log;
            BlkRig rig = cache_rig(CacheMode::kWriteback, log, engine, c.detect, c.discard);
            uint8_t* data = rig.driver.host(BlkRig::data_gpa(0));
            const uint64_t before = allocated_bytes(rig.path);
            std::memset(data, 0, kMiB);
            CHECK(rig.request(kBlkTOut, 2048, kMiB) == kBlkSOk);  // 1 MiB of zeroes at 1 MiB
            CHECK(log.take() == std::vector<IoOp>{c.zero_op});
            CHECK(all_zero(rig.file_bytes(kMiB, kMiB)));
            if (c.frees)
                CHECK(allocated_bytes(rig.path) <= before - kMiB + kSlack);
            else
                CHECK(allocated_bytes(rig.path) + kSlack >= before);
            CHECK(rig.blk->queue_stats(0).counters().bytes == kMiB);  // what the guest wrote
            // One non-zero byte, first or last, and it is a write like any other.
            for (const size_t at : {size_t{0}, size_t{kMiB - 1}}) {
                data[at] = 0x5a;
                CHECK(rig.request(kBlkTOut, 2048, kMiB) == kBlkSOk);
                CHECK(log.take() == std::vector<IoOp>{kWrite});
                CHECK(rig.file_bytes(kMiB + at, 1)[0] == 0x5a);
                data[at] = 0;
            }
            // The sectors around the range keep the pattern: byte i of sector s is (s + i) & 0xff.
            CHECK(rig.file_bytes(2047 * 512 + 1, 1)[0] == static_cast<uint8_t>(2047 + 1));
            CHECK(rig.file_bytes(4096 * 512 + 1, 1)[0] == static_cast<uint8_t>(4096 + 1));
            // With the write cache off the write-zeroes is made durable too.
            rig.driver.write_device_config(kWritebackOffset, 1, 0);
            CHECK(rig.request(kBlkTOut, 2048, kMiB) == kBlkSOk);
            CHECK(log.take() == std::vector<IoOp>{c.zero_op, kFlush});
            // A read-only check or an out-of-range zero write fails as any write would.
            CHECK(rig.request(kBlkTOut, (8 << 20) / 512 - 1, 4096) == kBlkSIoErr);
            CHECK(log.take().empty());
        }
    }
}

TEST_CASE("blk: write-then-flush (write cache off) and detect-zeroes allocate nothing on the request path either")
{
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        IoThread thread(IoThreadOptions{"disk0-io", {0, 0, 0}, 0, -1});
        // On tmpfs, where a flush costs nothing: thousands of them take no time.
        BlkRig rig(engine, false, 8 << 20, "lkvm-serial-0001", 1, true, {&thread}, AddressSpace::kMemory, false, {},
                   {.detect_zeroes = DetectZeroes::kOn}, CacheMode::kWriteback, "/dev/shm");
        rig.driver.write_device_config(kWritebackOffset, 1, 0);  // every write is followed by a flush
        // 4 KiB writes, 16 in flight: every other one all zeroes (a write-zeroes, on the engine's worker).
        for (unsigned i = 0; i < 16; ++i)
            std::memset(rig.driver.host(BlkRig::data_gpa(i)), i % 2 ? 0 : 0x33, 4096);
        uint64_t round = 0;
        auto queue = [&](unsigned i) { rig.queue_request(i, kBlkTOut, 8ull * ((i * 37 + round++) % 2000), 4096); };
        constexpr uint64_t kWarmUp = 20000, kCounted = 8000;
        REQUIRE(rig.driver.keep_in_flight(0, 16, 3, kWarmUp, queue) == kWarmUp);
        uint64_t counted = 0;
        {
            PostsMeanwhile posts(thread);
            CHECK(allocations_on(thread, [&] { counted = rig.driver.keep_in_flight(0, 16, 3, kCounted, queue); }) == 0);
        }
        CHECK(counted == kCounted);
        CHECK(rig.blk->queue_stats(0).flushes() == kWarmUp + kCounted);
    }
}
