// virtio-scsi through the test guest driver: the controller, its SCSI disks
// and the I/O threads that serve its request queues, with no KVM. Data is
// checked against the image files themselves.
#include <doctest/doctest.h>

#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cstdlib>
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "disk/disk_image.h"
#include "tests/device/alloc_counter.h"
#include "tests/device/driver.h"
#include "tests/device/faulty_engine.h"
#include "virtio/io_thread.h"
#include "virtio/scsi.h"

using namespace lkvm;
using namespace lkvm::test;

namespace {
constexpr uint64_t kAllFeatures = ~0ull;
constexpr uint8_t kNeedsReset = 0x40;
constexpr uint64_t kDiskBytes = 8 << 20, kReadOnlyBytes = 4 << 20;
constexpr unsigned kRequestQueues = 2;

struct Reply {
    uint32_t sense_len = 0, residual = 0;
    uint8_t status = 0xee, response = 0xee;
    std::vector<uint8_t> sense;
    uint32_t used_len = 0;
};

std::vector<uint8_t> cdb10(uint8_t opcode, uint32_t lba, uint16_t blocks, uint8_t flags = 0)
{
    return {opcode, flags, uint8_t(lba >> 24), uint8_t(lba >> 16), uint8_t(lba >> 8), uint8_t(lba), 0,
            uint8_t(blocks >> 8), uint8_t(blocks), 0};
}

std::vector<uint8_t> cdb16(uint8_t opcode, uint64_t lba, uint32_t blocks)
{
    std::vector<uint8_t> cdb(16, 0);
    cdb[0] = opcode;
    for (int i = 0; i < 8; ++i)
        cdb[2 + i] = uint8_t(lba >> (56 - 8 * i));
    for (int i = 0; i < 4; ++i)
        cdb[10 + i] = uint8_t(blocks >> (24 - 8 * i));
    return cdb;
}

// LUN addressing as Linux's virtio_scsi writes it.
std::array<uint8_t, 8> lun_bytes(unsigned lun, uint8_t target = 0)
{
    return {1, target, uint8_t(0x40 | lun >> 8), uint8_t(lun), 0, 0, 0, 0};
}

// Where LUN 0 lives and how big it is, and which threads serve the request queues.
struct ScsiRigLayout {
    uint64_t disk_bytes = kDiskBytes;  // the pattern covers kDiskBytes at most; the rest is a hole
    const char* dir = "/tmp";
    bool one_thread = false;  // both request queues on iothread0
    ThrottleGroup* throttle = nullptr;  // LUN 0's limits
    bool snapshot = false;    // LUN 0 is a snapshot of its image (overlay in the rig's directory)
    CacheMode cache = CacheMode::kWriteback;           // LUN 0's
    DetectZeroes detect_zeroes = DetectZeroes::kOff;  // LUN 0's
};

struct ScsiRig {
    std::filesystem::path dir;
    std::string disk_path, ro_path;
    GuestDriver driver;
    IoThread control{IoThreadOptions{"main-loop", {}, 0, -1}};
    IoThread io0, io1;
    std::unique_ptr<VirtioScsi> scsi;
    std::unique_ptr<VirtioPciDevice> transport;
    uint64_t features = 0;

    // LUN 0: kDiskBytes with a pattern; LUN 3: kReadOnlyBytes, read-only.
    explicit ScsiRig(EngineKind engine = EngineKind::kSync, bool direct = false,
                     AddressSpace notify = AddressSpace::kMemory, const FaultRule& fault = {},
                     const PollParams& poll = {}, const ScsiRigLayout& layout = {})
        : io0(thread_options("iothread0", fault, poll)), io1(thread_options("iothread1", fault, poll))
    {
        std::string tmpl = std::string(layout.dir) + "/lkvm-device.XXXXXX";
        dir = ::mkdtemp(tmpl.data());
        disk_path = (dir / "disk.raw").string();
        ro_path = (dir / "ro.raw").string();
        std::vector<uint8_t> data(std::min(layout.disk_bytes, kDiskBytes));
        for (uint64_t i = 0; i < data.size(); ++i)
            data[i] = static_cast<uint8_t>(i / 512 + i % 512);
        std::ofstream(disk_path, std::ios::binary).write(reinterpret_cast<char*>(data.data()), static_cast<long>(data.size()));
        std::filesystem::resize_file(disk_path, layout.disk_bytes);
        std::ofstream(ro_path, std::ios::binary) << std::string(kReadOnlyBytes, 'r');
        std::vector<ScsiLunSetup> luns;
        DiskImageOptions disk{disk_path, false, direct ? CacheMode::kNone : layout.cache};
        disk.snapshot = layout.snapshot;
        disk.snapshot_dir = dir.string();
        scsi::ScsiDiskOptions lun0{"disk-serial-0", 1, scsi::Discard::kUnmap};
        lun0.detect_zeroes = layout.detect_zeroes;
        luns.push_back({0, DiskImage::open(disk), lun0, engine, 0, layout.throttle});
        luns.push_back({3, DiskImage::open({ro_path, true}), {"ro-serial-3", 7200, scsi::Discard::kUnmap},
                        engine, 0});
        scsi = std::make_unique<VirtioScsi>(std::move(luns), 256, driver.memory(), std::vector<IoThread*>{&io0, layout.one_thread ? &io0 : &io1},
                                            control.context());
        transport = std::make_unique<VirtioPciDevice>(*scsi, driver.host_interface(), notify);
        transport->use_intx(17);
        features = driver.probe(*transport, kAllFeatures, 2 + kRequestQueues);
        REQUIRE(driver.notify_space() == notify);
    }
    // With a fault rule, the I/O threads' engines fail what it picks.
    static IoThreadOptions thread_options(const char* name, const FaultRule& fault, const PollParams& poll)
    {
        IoThreadOptions options{name, poll, 0, -1};
        if (fault)
            options.make_engine = faulty_engines(fault);
        return options;
    }
    ~ScsiRig()
    {
        transport.reset();
        scsi.reset();
        std::filesystem::remove_all(dir);
    }

    // Command i has its own spot: request, response, then data (4 KiB aligned).
    static uint64_t request_gpa(unsigned i) { return GuestDriver::kDataArea + i * 0x80000ull; }
    static uint64_t response_gpa(unsigned i) { return request_gpa(i) + 0x100; }
    static uint64_t data_gpa(unsigned i) { return request_gpa(i) + 0x1000; }

    // Puts command i on request queue q (not kicked); data_len bytes of data-in or data-out.
    uint16_t queue_command(unsigned i, unsigned q, unsigned lun, const std::vector<uint8_t>& cdb, uint32_t data_len,
                           bool data_in, uint64_t tag = 0, uint8_t target = 0)
    {
        uint8_t request[51] = {};
        const auto address = lun_bytes(lun, target);
        std::memcpy(request, address.data(), 8);
        std::memcpy(request + 8, &tag, 8);
        std::memcpy(request + 19, cdb.data(), std::min<size_t>(cdb.size(), 32));
        std::memcpy(driver.host(request_gpa(i)), request, sizeof(request));
        std::memset(driver.host(response_gpa(i)), 0xee, 108);
        std::vector<Buffer> chain = {{request_gpa(i), sizeof(request), false}};
        if (data_len && !data_in)
            chain.push_back({data_gpa(i), data_len, false});
        chain.push_back({response_gpa(i), 108, true});
        if (data_len && data_in)
            chain.push_back({data_gpa(i), data_len, true});
        return driver.add_chain(2 + q, chain);
    }
    Reply reply(unsigned i, uint32_t used_len = 0)
    {
        const uint8_t* r = driver.host(response_gpa(i));
        Reply out;
        std::memcpy(&out.sense_len, r, 4);
        std::memcpy(&out.residual, r + 4, 4);
        out.status = r[10];
        out.response = r[11];
        out.sense.assign(r + 12, r + 12 + std::min<uint32_t>(out.sense_len, 96));
        out.used_len = used_len;
        return out;
    }
    // One command on request queue q, kicked and waited for.
    Reply command(unsigned q, unsigned lun, const std::vector<uint8_t>& cdb, uint32_t data_len = 0,
                  bool data_in = true, uint8_t target = 0)
    {
        queue_command(0, q, lun, cdb, data_len, data_in, 0, target);
        driver.kick(2 + q);
        const auto used = driver.wait_used(2 + q, 1);
        REQUIRE(used.size() == 1);
        return reply(0, used[0].second);
    }
    std::vector<uint8_t> data(unsigned i, size_t len) { return {driver.host(data_gpa(i)), driver.host(data_gpa(i)) + len}; }

    // A task management function on the control queue; its response byte.
    uint8_t task_management(uint32_t subtype, unsigned lun, uint64_t tag = 0, uint8_t target = 0)
    {
        const uint64_t at = GuestDriver::kDataArea - 0x1000;
        uint8_t request[24] = {};
        std::memcpy(request + 4, &subtype, 4);
        const auto address = lun_bytes(lun, target);
        std::memcpy(request + 8, address.data(), 8);
        std::memcpy(request + 16, &tag, 8);
        std::memcpy(driver.host(at), request, sizeof(request));
        *driver.host(at + 64) = 0xee;
        driver.add_chain(0, {{at, sizeof(request), false}, {at + 64, 1, true}});
        driver.kick(0);
        const auto used = driver.wait_used(0, 1);
        REQUIRE(used.size() == 1);
        CHECK(used[0].second == 1);
        return *driver.host(at + 64);
    }

    std::vector<uint8_t> file_bytes(const std::string& path, uint64_t offset, size_t len)
    {
        std::vector<uint8_t> out(len);
        std::ifstream f(path, std::ios::binary);
        f.seekg(static_cast<long>(offset));
        f.read(reinterpret_cast<char*>(out.data()), static_cast<long>(len));
        return out;
    }
};

uint64_t be64(const uint8_t* p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i)
        v = v << 8 | p[i];
    return v;
}
}  // namespace

TEST_CASE("scsi device: configuration, INQUIRY, READ CAPACITY, REPORT LUNS and addressing")
{
    ScsiRig rig;
    CHECK((rig.features & kVirtioFVersion1) != 0);
    CHECK((rig.features & 0xf) == 0);  // no INOUT, HOTPLUG, CHANGE, T10_PI
    CHECK(rig.driver.device_config32(0) == kRequestQueues);
    CHECK(rig.driver.device_config32(4) == 254);     // seg_max
    CHECK(rig.driver.device_config32(8) == 1u << 16); // max_sectors
    CHECK(rig.driver.device_config32(16) == 16);     // event_info_size
    CHECK(rig.driver.device_config32(20) == 96);     // sense_size
    CHECK(rig.driver.device_config32(24) == 32);     // cdb_size
    CHECK(rig.driver.device_config32(28) == 0);      // max_channel, max_target
    CHECK(rig.driver.device_config32(32) == 16383);  // max_lun

    Reply inquiry = rig.command(0, 0, {0x12, 0, 0, 0, 96, 0}, 96);
    CHECK(inquiry.response == virtio_scsi::kOk);
    CHECK(inquiry.status == scsi::kStatusGood);
    CHECK(rig.data(0, 1)[0] == 0x00);  // a direct-access device, connected
    CHECK(inquiry.used_len == 108 + 96 - inquiry.residual);

    Reply capacity = rig.command(1, 0, {0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}, 32);
    CHECK(capacity.status == scsi::kStatusGood);
    CHECK(be64(rig.data(0, 8).data()) == kDiskBytes / 512 - 1);
    Reply ro_capacity = rig.command(0, 3, {0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}, 32);
    CHECK(be64(rig.data(0, 8).data()) == kReadOnlyBytes / 512 - 1);
    CHECK(ro_capacity.status == scsi::kStatusGood);

    // REPORT LUNS, asked of LUN 0: both units.
    Reply luns = rig.command(0, 0, {0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}, 256);
    CHECK(luns.status == scsi::kStatusGood);
    const auto list = rig.data(0, 24);
    CHECK(list[3] == 16);  // two 8-byte entries
    CHECK((list[8 + 1] | (list[8] & 0x3f) << 8) == 0);
    CHECK((list[16 + 1] | (list[16] & 0x3f) << 8) == 3);

    // A LUN with nothing behind it: INQUIRY says so, other commands are refused with LUN NOT SUPPORTED.
    rig.command(0, 5, {0x12, 0, 0, 0, 36, 0}, 36);
    CHECK(rig.data(0, 1)[0] == 0x7f);
    Reply missing = rig.command(0, 5, {0x00, 0, 0, 0, 0, 0});
    CHECK(missing.status == scsi::kStatusCheckCondition);
    REQUIRE(missing.sense.size() >= 14);
    CHECK(missing.sense[2] == 0x05);
    CHECK(missing.sense[12] == 0x25);

    // Another target, or not a LUN address at all: BAD_TARGET, no SCSI status.
    CHECK(rig.command(0, 0, {0x00, 0, 0, 0, 0, 0}, 0, true, 1).response == virtio_scsi::kBadTarget);
}

TEST_CASE("scsi device: writes and reads over request queues on two I/O threads, checked against the image")
{
    for (const AddressSpace notify : {AddressSpace::kMemory, AddressSpace::kPort})
    for (EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        CAPTURE(notify == AddressSpace::kPort ? "notify=pio" : "notify=mmio");
        ScsiRig rig(engine, false, notify);
        constexpr unsigned kPerQueue = 24, kBlocks = 8;
        // Writes: command i goes to queue i % 2, at LBA 16 * i.
        for (unsigned i = 0; i < 2 * kPerQueue; ++i) {
            std::memset(rig.driver.host(ScsiRig::data_gpa(i)), static_cast<int>(0x30 + i), kBlocks * 512);
            const auto cdb = i % 3 == 0 ? cdb16(0x8a, 16 * i, kBlocks) : cdb10(0x2a, 16 * i, kBlocks);
            rig.queue_command(i, i % 2, 0, cdb, kBlocks * 512, false, 1000 + i);
        }
        rig.driver.kick(2);
        rig.driver.kick(3);
        auto used0 = rig.driver.wait_used(2, kPerQueue);
        auto used1 = rig.driver.wait_used(3, kPerQueue);
        REQUIRE(used0.size() == kPerQueue);
        REQUIRE(used1.size() == kPerQueue);
        for (unsigned i = 0; i < 2 * kPerQueue; ++i) {
            const Reply r = rig.reply(i);
            CHECK(r.response == virtio_scsi::kOk);
            CHECK(r.status == scsi::kStatusGood);
            CHECK(r.residual == 0);
            CHECK(rig.file_bytes(rig.disk_path, 512ull * 16 * i, kBlocks * 512) ==
                  std::vector<uint8_t>(kBlocks * 512, static_cast<uint8_t>(0x30 + i)));
        }
        // Reads crosswise: what queue 0 wrote is read through queue 1 and the other way round.
        for (unsigned i = 0; i < 2 * kPerQueue; ++i) {
            std::memset(rig.driver.host(ScsiRig::data_gpa(i)), 0, kBlocks * 512);
            const auto cdb = i % 2 ? cdb16(0x88, 16 * i, kBlocks) : cdb10(0x28, 16 * i, kBlocks);
            rig.queue_command(i, (i + 1) % 2, 0, cdb, kBlocks * 512, true, 2000 + i);
        }
        rig.driver.kick(2);
        rig.driver.kick(3);
        used0 = rig.driver.wait_used(2, kPerQueue);
        used1 = rig.driver.wait_used(3, kPerQueue);
        REQUIRE(used0.size() == kPerQueue);
        REQUIRE(used1.size() == kPerQueue);
        for (const auto& [head, len] : used0)
            CHECK(len == 108 + kBlocks * 512);
        for (unsigned i = 0; i < 2 * kPerQueue; ++i) {
            CHECK(rig.reply(i).status == scsi::kStatusGood);
            CHECK(rig.data(i, kBlocks * 512) == std::vector<uint8_t>(kBlocks * 512, static_cast<uint8_t>(0x30 + i)));
        }
        // Each queue was served by its own thread, and only by it.
        for (unsigned q = 0; q < kRequestQueues; ++q) {
            const QueueStats& stats = rig.scsi->queue_stats(q);
            CHECK(stats.counters().requests == 2 * kPerQueue);
            CHECK(stats.server() == rig.scsi->queue_thread(q).tid());
            CHECK_FALSE(stats.moved());
        }
        CHECK(&rig.scsi->queue_thread(0) == &rig.io0);
        CHECK(&rig.scsi->queue_thread(1) == &rig.io1);
    }
}

TEST_CASE("scsi device: a read-only LUN refuses writes and UNMAP, and its image is untouched")
{
    ScsiRig rig;
    std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 'w', 4096);
    for (const auto& cdb : {cdb10(0x2a, 0, 8), cdb16(0x8a, 8, 8)}) {
        Reply r = rig.command(0, 3, cdb, 4096, false);
        CHECK(r.response == virtio_scsi::kOk);
        CHECK(r.status == scsi::kStatusCheckCondition);
        REQUIRE(r.sense.size() >= 14);
        CHECK(r.sense[2] == 0x07);   // DATA PROTECT
        CHECK(r.sense[12] == 0x27);  // WRITE PROTECTED
    }
    CHECK(rig.file_bytes(rig.ro_path, 0, 8192) == std::vector<uint8_t>(8192, 'r'));
    // Flushing a read-only unit is harmless.
    CHECK(rig.command(1, 3, cdb10(0x35, 0, 0)).status == scsi::kStatusGood);
}

TEST_CASE("scsi device: UNMAP and WRITE SAME leave zeroes in the image, other data stays")
{
    for (const bool direct : {false, true}) {
        CAPTURE(direct);
        ScsiRig rig(EngineKind::kIoUring, direct);
        // UNMAP blocks 64..127: an 8-byte header and one 16-byte descriptor.
        uint8_t list[24] = {0, 22, 0, 16};
        list[8 + 7] = 64;
        list[8 + 11] = 64;
        std::memcpy(rig.driver.host(ScsiRig::data_gpa(0)), list, sizeof(list));
        Reply unmap = rig.command(0, 0, {0x42, 0, 0, 0, 0, 0, 0, 0, sizeof(list), 0}, sizeof(list), false);
        CHECK(unmap.status == scsi::kStatusGood);
        CHECK(rig.file_bytes(rig.disk_path, 64 * 512, 64 * 512) == std::vector<uint8_t>(64 * 512, 0));
        // WRITE SAME(16) of a zero block with UNMAP over 256..511.
        std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0, 512);
        auto same = cdb16(0x93, 256, 256);
        same[1] = 0x08;  // UNMAP
        CHECK(rig.command(1, 0, same, 512, false).status == scsi::kStatusGood);
        CHECK(rig.file_bytes(rig.disk_path, 256 * 512, 256 * 512) == std::vector<uint8_t>(256 * 512, 0));
        // WRITE SAME(10) of a pattern block over 600..609.
        std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0x5a, 512);
        CHECK(rig.command(0, 0, cdb10(0x41, 600, 10), 512, false).status == scsi::kStatusGood);
        CHECK(rig.file_bytes(rig.disk_path, 600 * 512, 10 * 512) == std::vector<uint8_t>(10 * 512, 0x5a));
        // The blocks around are as they were.
        const auto before = rig.file_bytes(rig.disk_path, 63 * 512, 512);
        for (size_t i = 0; i < 512; ++i)
            CHECK(before[i] == static_cast<uint8_t>(63 + i));
        const auto after = rig.file_bytes(rig.disk_path, 610 * 512, 512);
        for (size_t i = 0; i < 512; ++i)
            CHECK(after[i] == static_cast<uint8_t>(610 + i));
    }
}

TEST_CASE("scsi device: a snapshot LUN reads back its writes, WRITE SAME and UNMAP on both queues; the image stays")
{
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        ScsiRigLayout layout;
        layout.snapshot = true;
        ScsiRig rig(engine, false, AddressSpace::kMemory, {}, {}, layout);
        const auto image = rig.file_bytes(rig.disk_path, 0, kDiskBytes);
        std::vector<uint8_t> model = image;
        // WRITE(10) of 40 blocks from block 100 (part of clusters 0 and 1) on queue 0.
        std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0x31, 40 * 512);
        CHECK(rig.command(0, 0, cdb10(0x2a, 100, 40), 40 * 512, false).status == scsi::kStatusGood);
        std::fill_n(model.begin() + 100 * 512, 40 * 512, 0x31);
        // WRITE SAME(10) of a pattern block over 600..609 on queue 1.
        std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0x5a, 512);
        CHECK(rig.command(1, 0, cdb10(0x41, 600, 10), 512, false).status == scsi::kStatusGood);
        std::fill_n(model.begin() + 600 * 512, 10 * 512, 0x5a);
        // UNMAP 64..127 and WRITE SAME(16) of zeroes with UNMAP over 256..511.
        uint8_t list[24] = {0, 22, 0, 16};
        list[8 + 7] = 64;
        list[8 + 11] = 64;
        std::memcpy(rig.driver.host(ScsiRig::data_gpa(0)), list, sizeof(list));
        CHECK(rig.command(0, 0, {0x42, 0, 0, 0, 0, 0, 0, 0, sizeof(list), 0}, sizeof(list), false).status ==
              scsi::kStatusGood);
        std::fill_n(model.begin() + 64 * 512, 64 * 512, 0);
        std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0, 512);
        auto same = cdb16(0x93, 256, 256);
        same[1] = 0x08;
        CHECK(rig.command(1, 0, same, 512, false).status == scsi::kStatusGood);
        std::fill_n(model.begin() + 256 * 512, 256 * 512, 0);
        CHECK(rig.command(0, 0, {0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0}).status == scsi::kStatusGood);  // SYNCHRONIZE CACHE
        // READ(10) the first 1 MiB back, 256 KiB at a time, from either queue.
        for (uint32_t block = 0; block < 2048; block += 512) {
            std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0xee, 512 * 512);
            CHECK(rig.command(block / 512 % 2, 0, cdb10(0x28, block, 512), 512 * 512).status == scsi::kStatusGood);
            CHECK(rig.data(0, 512 * 512) == std::vector<uint8_t>(model.begin() + block * 512l,
                                                                  model.begin() + (block + 512) * 512l));
        }
        CHECK(rig.file_bytes(rig.disk_path, 0, kDiskBytes) == image);
    }
}

TEST_CASE("scsi device: a throttled snapshot LUN: requests the group held back go through the overlay too")
{
    ThrottleLimits limits;
    limits[ThrottleBucket::kIopsTotal].avg = 100;  // 10 at once, then one per 10 ms
    ThrottleGroup group("0", limits);
    ScsiRigLayout layout;
    layout.snapshot = true;
    layout.throttle = &group;
    ScsiRig rig(EngineKind::kIoUring, false, AddressSpace::kMemory, {}, {}, layout);
    const auto image = rig.file_bytes(rig.disk_path, 0, kDiskBytes);
    constexpr unsigned kWrites = 24;
    for (unsigned i = 0; i < kWrites; ++i) {
        std::memset(rig.driver.host(ScsiRig::data_gpa(i)), static_cast<int>(0x80 + i), 512);
        rig.queue_command(i, 0, 0, cdb10(0x2a, 300 * i + 7, 1), 512, false);
    }
    rig.driver.kick(2);
    size_t answered = 0;
    while (answered < kWrites) {
        const auto used = rig.driver.wait_used(2, 1);
        REQUIRE_FALSE(used.empty());
        answered += used.size();
    }
    for (unsigned i = 0; i < kWrites; ++i) {
        CAPTURE(i);
        CHECK(rig.reply(i).status == scsi::kStatusGood);
    }
    CHECK(rig.scsi->queue_stats(0).throttled_ns() > 0);  // some were held
    for (unsigned i = 0; i < kWrites; ++i) {
        CAPTURE(i);
        REQUIRE(rig.command(0, 0, cdb10(0x28, 300 * i + 7, 1), 512).status == scsi::kStatusGood);
        CHECK(rig.data(0, 512) == std::vector<uint8_t>(512, static_cast<uint8_t>(0x80 + i)));
    }
    CHECK(rig.file_bytes(rig.disk_path, 0, kDiskBytes) == image);
}

namespace {
constexpr uint64_t kGiB = 1ull << 30;

bool on_tmpfs(const char* dir)
{
    struct statfs fs {};
    return ::statfs(dir, &fs) == 0 && fs.f_type == TMPFS_MAGIC;
}

// WRITE SAME(16) of a zero block, without UNMAP, over the GiB after the
// pattern: a write-zeroes, which tmpfs has no fallocate mode for, so lkvm
// writes the zeroes itself. Command 0 on request queue 0, not kicked.
void queue_gib_of_zeroes(ScsiRig& rig)
{
    std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0, 512);
    rig.queue_command(0, 0, 0, cdb16(0x93, kDiskBytes / 512, kGiB / 512), 512, false);
}
}  // namespace

TEST_CASE("scsi device: a GiB of WRITE SAME zeroes does not hold up reads on another queue of its thread")
{
    REQUIRE_MESSAGE(on_tmpfs("/dev/shm"), "the test needs /dev/shm on tmpfs (no ZERO_RANGE: zeroes written by hand)");
    for (const EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(engine_kind_name(engine));
        ScsiRig rig(engine, false, AddressSpace::kMemory, {}, {}, {kDiskBytes + kGiB, "/dev/shm", true});
        queue_gib_of_zeroes(rig);
        rig.driver.kick(2);
        // Reads on request queue 1, served by the same I/O thread, one at a
        // time, for as long as the zeroes are being written.
        std::vector<double> latency_us;
        while (rig.driver.used_idx(2) == 0) {
            const auto start = std::chrono::steady_clock::now();
            rig.queue_command(1, 1, 0, cdb10(0x28, static_cast<uint32_t>(latency_us.size() % 64), 1), 512, true);
            rig.driver.kick(3);
            const bool answered = rig.driver.wait_used(3, 1).size() == 1;
            latency_us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
            if (!answered || rig.reply(1).status != scsi::kStatusGood)
                FAIL("read " << latency_us.size() << " was not answered GOOD");
        }
        REQUIRE(rig.driver.wait_used(2, 1).size() == 1);
        CHECK(rig.reply(0).status == scsi::kStatusGood);
        // Done on the I/O thread, the zeroes held the reads back until they
        // were all written: a read or two at most slipped in before.
        CHECK(latency_us.size() >= 8);
        std::ranges::sort(latency_us);
        if (!latency_us.empty())
            MESSAGE(std::string(engine_kind_name(engine)) << ": " << latency_us.size() << " reads while a GiB was zeroed, p99 "
                                             << latency_us[latency_us.size() * 99 / 100] << " us, max "
                                             << latency_us.back() << " us");
        CHECK(rig.file_bytes(rig.disk_path, kDiskBytes + kGiB - 4096, 4096) == std::vector<uint8_t>(4096, 0));
        const auto before = rig.file_bytes(rig.disk_path, kDiskBytes - 512, 512);
        CHECK(before[0] == static_cast<uint8_t>((kDiskBytes - 512) / 512));
    }
}

TEST_CASE("scsi device: a reset does not wait for a GiB of zeroes: it cancels them, and the device starts over")
{
    REQUIRE(on_tmpfs("/dev/shm"));
    ScsiRig rig(EngineKind::kIoUring, false, AddressSpace::kMemory, {}, {}, {kDiskBytes + kGiB, "/dev/shm", true});
    queue_gib_of_zeroes(rig);
    rig.driver.kick(2);
    const QueueStats& queue = rig.scsi->queue_stats(0);
    for (int waited = 0; queue.in_flight() == 0 && waited < 5000; ++waited)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    REQUIRE(queue.in_flight() == 1);  // the zeroes are being written
    rig.driver.reprobe(kAllFeatures, 2 + kRequestQueues);  // returns once nothing is in flight
    CHECK(rig.driver.used_idx(2) == 0);  // and the WRITE SAME was never answered
    CHECK(rig.command(1, 0, cdb10(0x28, 0, 1), 512).status == scsi::kStatusGood);
    // The zeroes stopped at the next MiB: the GiB is not all allocated. (The
    // reset came microseconds after they started; writing a GiB takes a
    // tenth of a second on the fastest host, and a reset that waited for
    // them, as before, would find it all written.)
    struct stat st {};
    REQUIRE(::stat(rig.disk_path.c_str(), &st) == 0);
    const uint64_t allocated = static_cast<uint64_t>(st.st_blocks) * 512;
    MESSAGE("after the reset, " << allocated / (1 << 20) << " MiB of the image were allocated");
    CHECK(allocated < kDiskBytes + kGiB);
}

TEST_CASE("scsi device: data buffers that do not match the command: overrun, residuals")
{
    ScsiRig rig;
    // READ of 8 blocks into 2 blocks of buffer: OVERRUN, nothing transferred.
    Reply small = rig.command(0, 0, cdb10(0x28, 0, 8), 1024, true);
    CHECK(small.response == virtio_scsi::kOverrun);
    CHECK(small.used_len == 108);
    // READ of 2 blocks into 8 blocks of buffer: GOOD with a residual of 6 blocks.
    Reply big = rig.command(0, 0, cdb10(0x28, 1, 2), 4096, true);
    CHECK(big.status == scsi::kStatusGood);
    CHECK(big.residual == 6 * 512);
    CHECK(big.used_len == 108 + 1024);
    const auto data = rig.data(0, 1024);
    for (size_t i = 0; i < 1024; ++i)
        CHECK(data[i] == static_cast<uint8_t>(1 + i / 512 + i % 512));
    // A WRITE whose data sits in data-in buffers goes the wrong way: OVERRUN, the image untouched.
    std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 'x', 4096);
    CHECK(rig.command(1, 0, cdb10(0x2a, 0, 8), 4096, true).response == virtio_scsi::kOverrun);
    CHECK(rig.file_bytes(rig.disk_path, 0, 1)[0] == 0);
    // Past the end of the disk.
    Reply past = rig.command(1, 0, cdb16(0x88, kDiskBytes / 512 - 1, 2), 1024, true);
    CHECK(past.status == scsi::kStatusCheckCondition);
    CHECK(past.sense[12] == 0x21);  // LBA OUT OF RANGE
}

TEST_CASE("scsi device: a command without room for its response breaks the queue, not lkvm")
{
    ScsiRig rig;
    // 51 bytes of request and only 12 writable bytes: no room for the sense area.
    std::memset(rig.driver.host(ScsiRig::request_gpa(0)), 0, 51);
    rig.driver.add_chain(2, {{ScsiRig::request_gpa(0), 51, false}, {ScsiRig::response_gpa(0), 12, true}});
    rig.driver.kick(2);
    for (int i = 0; i < 200 && !(rig.driver.status() & kNeedsReset); ++i)
        ::usleep(10000);
    CHECK((rig.driver.status() & kNeedsReset) != 0);
    // A reset brings it back.
    rig.driver.reprobe(kAllFeatures, 2 + kRequestQueues);
    CHECK(rig.command(0, 0, {0x00, 0, 0, 0, 0, 0}).status == scsi::kStatusGood);
}

TEST_CASE("scsi device: task management reaches requests in flight on other I/O threads")
{
    // Large direct reads keep commands in flight on both threads while the
    // control loop runs ABORT TASK SET. Every command is answered once, GOOD
    // with its data or ABORTED, and the function completes only after the
    // commands it aborted were answered. Whether a given command is still in
    // flight when the function arrives is up to the host: try until one was.
    constexpr unsigned kCommands = 48, kBlocks = 512;  // 256 KiB each
    constexpr uint64_t kLastStart = kDiskBytes / 512 - kBlocks;
    unsigned aborted = 0;
    for (int attempt = 0; attempt < 20 && aborted == 0; ++attempt) {
        ScsiRig rig(EngineKind::kIoUring, true);
        std::vector<uint16_t> heads;
        for (unsigned i = 0; i < kCommands; ++i)
            heads.push_back(rig.queue_command(i, i % 2, 0, cdb10(0x28, (i * kBlocks) % kLastStart, kBlocks),
                                              kBlocks * 512, true, 100 + i));
        rig.driver.kick(2);
        rig.driver.kick(3);
        CHECK(rig.task_management(virtio_scsi::kTmfAbortTaskSet, 0) == virtio_scsi::kFunctionComplete);

        // What the driver has back at the moment the function completed.
        std::set<std::pair<unsigned, uint32_t>> answered;  // (queue, head)
        for (unsigned q = 0; q < kRequestQueues; ++q)
            for (const auto& [head, len] : rig.driver.wait_used(2 + q, 0, 0))
                answered.insert({q, head});
        // The others complete normally, with the right data. Replies are read
        // only once every command is answered: before, the device may still
        // be writing one (ThreadSanitizer saw this test read them early).
        for (unsigned q = 0; q < kRequestQueues; ++q) {
            const size_t have = std::count_if(answered.begin(), answered.end(), [&](const auto& a) { return a.first == q; });
            CHECK(have + rig.driver.wait_used(2 + q, kCommands / 2 - have).size() == kCommands / 2);
        }
        for (unsigned i = 0; i < kCommands; ++i) {
            const Reply r = rig.reply(i);
            CAPTURE(i);
            if (r.response == virtio_scsi::kAborted) {
                ++aborted;
                CHECK(answered.count({i % 2, heads[i]}) == 1);
                continue;
            }
            CHECK(r.response == virtio_scsi::kOk);
            CHECK(r.status == scsi::kStatusGood);
            const uint64_t lba = (i * kBlocks) % kLastStart;
            const auto data = rig.data(i, kBlocks * 512);
            for (size_t at = 0; at < data.size(); at += 4099)
                CHECK(data[at] == static_cast<uint8_t>(lba + at / 512 + at % 512));
        }
    }
    CHECK(aborted > 0);

    // ABORT TASK names one command by its tag: no other is touched.
    ScsiRig rig(EngineKind::kIoUring, true);
    for (unsigned i = 0; i < kCommands; ++i)
        rig.queue_command(i, i % 2, 0, cdb10(0x28, (i * kBlocks) % kLastStart, kBlocks), kBlocks * 512, true, 100 + i);
    rig.driver.kick(2);
    rig.driver.kick(3);
    CHECK(rig.task_management(virtio_scsi::kTmfAbortTask, 0, 100 + kCommands - 1) == virtio_scsi::kFunctionComplete);
    for (unsigned q = 0; q < kRequestQueues; ++q)
        CHECK(rig.driver.wait_used(2 + q, kCommands / 2).size() == kCommands / 2);
    for (unsigned i = 0; i + 1 < kCommands; ++i) {
        CAPTURE(i);
        CHECK(rig.reply(i).response == virtio_scsi::kOk);
        CHECK(rig.reply(i).status == scsi::kStatusGood);
    }
    const uint8_t last = rig.reply(kCommands - 1).response;
    CHECK((last == virtio_scsi::kOk || last == virtio_scsi::kAborted));
}

TEST_CASE("scsi device: other task management functions and asynchronous notification")
{
    ScsiRig rig;
    using namespace virtio_scsi;
    CHECK(rig.task_management(kTmfAbortTask, 0, 12345) == kFunctionComplete);  // no such task: nothing to do
    CHECK(rig.task_management(kTmfQueryTask, 0, 12345) == kFunctionComplete);
    CHECK(rig.task_management(kTmfQueryTaskSet, 3) == kFunctionComplete);

    // A logical unit reset: its next command, on either queue, reports it as a unit attention.
    const std::vector<uint8_t> tur{0x00, 0, 0, 0, 0, 0};
    CHECK(rig.task_management(kTmfLogicalUnitReset, 3) == kFunctionComplete);
    CHECK(rig.command(0, 0, tur).status == scsi::kStatusGood);  // another LUN: untouched
    Reply r = rig.command(1, 3, tur);
    CHECK(r.status == scsi::kStatusCheckCondition);
    REQUIRE(r.sense.size() >= 14);
    CHECK(r.sense[2] == 0x06);
    CHECK(r.sense[12] == 0x29);
    CHECK(r.sense[13] == 0x03);
    CHECK(rig.command(0, 3, tur).status == scsi::kStatusGood);
    // An I_T nexus reset: every LUN's next command.
    CHECK(rig.task_management(kTmfItNexusReset, 0) == kFunctionComplete);
    for (const unsigned lun : {0u, 3u}) {
        CAPTURE(lun);
        r = rig.command(lun % 2, lun, tur);
        CHECK(r.status == scsi::kStatusCheckCondition);
        REQUIRE(r.sense.size() >= 14);
        CHECK(r.sense[12] == 0x29);
        CHECK(r.sense[13] == 0x07);
    }
    CHECK(rig.task_management(kTmfClearAca, 0) == kFunctionRejected);
    CHECK(rig.task_management(99, 0) == kFunctionRejected);
    CHECK(rig.task_management(kTmfLogicalUnitReset, 7) == kIncorrectLun);
    CHECK(rig.task_management(kTmfAbortTaskSet, 0, 0, 2) == kBadTarget);

    // AN_QUERY: we offer no events.
    const uint64_t at = GuestDriver::kDataArea - 0x2000;
    uint8_t query[16] = {kTypeAnQuery, 0, 0, 0, 1, 0, 0x40, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff};
    std::memcpy(rig.driver.host(at), query, sizeof(query));
    std::memset(rig.driver.host(at + 64), 0xee, 5);
    rig.driver.add_chain(0, {{at, sizeof(query), false}, {at + 64, 5, true}});
    rig.driver.kick(0);
    REQUIRE(rig.driver.wait_used(0, 1).size() == 1);
    const uint8_t* answer = rig.driver.host(at + 64);
    CHECK(answer[0] == 0);
    CHECK(answer[3] == 0);
    CHECK(answer[4] == kOk);

    // Still serving commands.
    CHECK(rig.command(0, 0, {0x00, 0, 0, 0, 0, 0}).status == scsi::kStatusGood);
}

TEST_CASE("scsi device: a reset with commands in flight waits for them and answers none")
{
    ScsiRig rig(EngineKind::kIoUring, true);
    for (unsigned i = 0; i < 32; ++i)
        rig.queue_command(i, i % 2, 0, cdb10(0x28, i * 64, 64), 64 * 512, true);
    rig.driver.kick(2);
    rig.driver.kick(3);
    rig.driver.reprobe(kAllFeatures, 2 + kRequestQueues);
    CHECK(rig.command(1, 0, cdb10(0x28, 0, 1), 512).status == scsi::kStatusGood);
}

TEST_CASE("scsi device: in steady state the request path allocates nothing, whatever the engine, polling or sleeping")
{
    for (EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring, EngineKind::kNull}) {
        // As for blk: never sleeping in the window, or sleeping whenever idle.
        for (const uint64_t poll_ns : {1'000'000'000ull, 0ull}) {
            CAPTURE(std::string(engine_kind_name(engine)));
            CAPTURE(poll_ns);
            ScsiRig rig(engine, false, AddressSpace::kMemory, {}, PollParams{poll_ns, 0, 0});
            // READ(10) and WRITE(10) of 4 KiB, 64 in flight on request queue 0
            // (I/O thread io0); command i's descriptors are 3i..3i+2.
            uint64_t round = 0;
            auto queue = [&](unsigned i) {
                const bool write = (i + round++) % 3 == 0;
                const auto lba = static_cast<uint32_t>(8 * ((i * 37 + round) % (kDiskBytes / 4096)));
                rig.queue_command(i, 0, 0, cdb10(write ? 0x2a : 0x28, lba, 8), 4096, !write);
            };
            constexpr uint64_t kWarmUp = 4000, kCounted = 20000;
            REQUIRE(rig.driver.keep_in_flight(2, 64, 3, kWarmUp, queue) == kWarmUp);
            uint64_t counted = 0;
            {
                PostsMeanwhile posts(rig.io0);
                CHECK(allocations_on(rig.io0, [&] { counted = rig.driver.keep_in_flight(2, 64, 3, kCounted, queue); }) == 0);
            }
            CHECK(counted == kCounted);
            CHECK(rig.scsi->queue_stats(0).counters().requests == kWarmUp + kCounted);
        }
    }
}

TEST_CASE("scsi device: a disk that fails one command answers it CHECK CONDITION with the right sense, and goes on")
{
    // LUN 0's reads of LBA 8 fail with EIO, its writes of LBA 16 with ENOSPC, its reads of LBA 24 come back short.
    const FaultRule fault = eio_enospc_short_read(1024);
    for (EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        ScsiRig rig(engine, false, AddressSpace::kMemory, fault);
        const Reply read_error = rig.command(0, 0, cdb10(0x28, 8, 8), 4096);
        CHECK(read_error.status == scsi::kStatusCheckCondition);
        REQUIRE(read_error.sense.size() >= 14);
        CHECK(read_error.sense[2] == 0x03);   // MEDIUM ERROR
        CHECK(read_error.sense[12] == 0x11);  // UNRECOVERED READ ERROR
        const Reply full = rig.command(0, 0, cdb10(0x2a, 16, 8), 4096, false);
        CHECK(full.status == scsi::kStatusCheckCondition);
        REQUIRE(full.sense.size() >= 14);
        CHECK(full.sense[2] == 0x07);   // DATA PROTECT
        CHECK(full.sense[12] == 0x27);  // SPACE ALLOCATION FAILED WRITE PROTECT
        CHECK(full.sense[13] == 0x07);
        const Reply short_read = rig.command(0, 0, cdb10(0x28, 24, 8), 4096);
        CHECK(short_read.status == scsi::kStatusCheckCondition);
        REQUIRE(short_read.sense.size() >= 14);
        CHECK(short_read.sense[2] == 0x03);
        // Its neighbours, and the other queue, are served.
        CHECK(rig.command(0, 0, cdb10(0x28, 0, 8), 4096).status == scsi::kStatusGood);
        CHECK(rig.command(1, 0, cdb10(0x28, 32, 8), 4096).status == scsi::kStatusGood);
        CHECK(rig.scsi->queue_stats(0).errors() == 3);
        CHECK(rig.scsi->queue_stats(1).errors() == 0);
    }
}

TEST_CASE("scsi: a throttled LUN holds back its own requests only: another LUN on the same queue goes past them")
{
    ThrottleLimits limits;
    limits[ThrottleBucket::kIopsTotal].avg = 100;  // 10 at once, then one per 10 ms
    ThrottleGroup group("0", limits);
    ScsiRig rig(EngineKind::kSync, false, AddressSpace::kMemory, {}, {}, {.throttle = &group});
    std::vector<uint16_t> heads;
    for (unsigned i = 0; i < 28; ++i)
        heads.push_back(rig.queue_command(i, 0, i < 24 ? 0 : 3, cdb10(0x28, i, 1), 512, true));
    rig.driver.kick(2);
    std::vector<unsigned> order;  // command indices, as answered
    while (order.size() < 28) {
        const auto used = rig.driver.wait_used(2, 1);
        REQUIRE_FALSE(used.empty());
        for (const auto& [head, len] : used)
            order.push_back(static_cast<unsigned>(std::ranges::find(heads, head) - heads.begin()));
    }
    for (unsigned i = 0; i < 28; ++i) {
        CAPTURE(i);
        CHECK(rig.reply(i).status == 0);
    }
    // LUN 3's four were answered before LUN 0's last (first come first served
    // on the queue would answer them last of all).
    const auto last_lun0 = std::ranges::find(order, 23u);
    for (unsigned i = 24; i < 28; ++i)
        CHECK(std::ranges::find(order, i) < last_lun0);
    CHECK(rig.scsi->queue_stats(0).throttled_ns() > 0);
}

TEST_CASE("scsi device: WCE follows the cache mode and MODE SELECT; writes with it off are flushed, unsafe flushes nothing")
{
    // What reached the engines, by op; the rule runs on the I/O threads.
    struct Counts {
        std::atomic<unsigned> writes{0}, flushes{0};
    };
    auto counting = [](Counts& c) -> FaultRule {
        return [&c](const IoRequest& r) -> std::optional<int64_t> {
            if (r.op == IoOp::kWrite)
                ++c.writes;
            if (r.op == IoOp::kFlush)
                ++c.flushes;
            return std::nullopt;
        };
    };
    const std::vector<uint8_t> sense_caching = {0x1a, 0x08, 0x08, 0, 64, 0};  // MODE SENSE(6), DBD, caching page
    auto wce_of = [&](ScsiRig& rig) {
        CHECK(rig.command(0, 0, sense_caching, 64).status == scsi::kStatusGood);
        return (rig.data(0, 7)[4 + 2] & 0x04) != 0;
    };
    auto set_wce = [&](ScsiRig& rig, bool on) {
        uint8_t list[4 + 20] = {0, 0, 0, 0, 0x08, 0x12, static_cast<uint8_t>(on ? 0x04 : 0)};
        std::memcpy(rig.driver.host(ScsiRig::data_gpa(0)), list, sizeof(list));
        CHECK(rig.command(0, 0, {0x15, 0x10, 0, 0, sizeof(list), 0}, sizeof(list), false).status == scsi::kStatusGood);
    };
    struct Case {
        CacheMode cache;
        bool wce, flushes;
    };
    for (const Case c : {Case{CacheMode::kWriteback, true, true}, Case{CacheMode::kWritethrough, false, true},
                         Case{CacheMode::kUnsafe, true, false}}) {
        CAPTURE(cache_mode_name(c.cache));
        Counts counts;
        ScsiRigLayout layout;
        layout.cache = c.cache;
        ScsiRig rig(EngineKind::kIoUring, false, AddressSpace::kMemory, counting(counts), {}, layout);
        CHECK(wce_of(rig) == c.wce);
        CHECK(rig.command(1, 0, cdb10(0x35, 0, 0)).status == scsi::kStatusGood);  // SYNCHRONIZE CACHE
        CHECK(counts.flushes == (c.flushes ? 1u : 0u));
        set_wce(rig, false);
        CHECK_FALSE(wce_of(rig));
        std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0x77, 4096);
        CHECK(rig.command(1, 0, cdb10(0x2a, 32, 8), 4096, false).status == scsi::kStatusGood);
        CHECK(counts.writes == 1);
        // Off, a write is durable before GOOD: a flush after it but where O_DSYNC did it, or flushes go nowhere.
        CHECK(counts.flushes == (c.cache == CacheMode::kWriteback ? 2u : c.flushes ? 1u : 0u));
        CHECK(rig.file_bytes(rig.disk_path, 32 * 512, 4096) == std::vector<uint8_t>(4096, 0x77));
        set_wce(rig, true);
        CHECK(rig.command(0, 0, cdb16(0x8a, 64, 8), 4096, false).status == scsi::kStatusGood);
        CHECK(counts.writes == 2);
        CHECK(counts.flushes == (c.cache == CacheMode::kWriteback ? 2u : c.flushes ? 1u : 0u));
        uint64_t flushes = 0;
        for (unsigned q = 0; q < kRequestQueues; ++q)
            flushes += rig.scsi->queue_stats(q).flushes();
        CHECK(flushes == counts.flushes);
        // A logical unit reset brings the cache mode's default back.
        set_wce(rig, !c.wce);
        CHECK(rig.task_management(virtio_scsi::kTmfLogicalUnitReset, 0) == virtio_scsi::kFunctionComplete);
        CHECK(rig.command(0, 0, sense_caching, 64).status == scsi::kStatusCheckCondition);  // the unit attention
        CHECK(wce_of(rig) == c.wce);
    }
}

TEST_CASE("scsi device: detect-zeroes turns a WRITE(10/16) of zeroes into a write-zeroes, with unmap a hole")
{
    struct stat st {};
    for (const DetectZeroes detect : {DetectZeroes::kOff, DetectZeroes::kOn, DetectZeroes::kUnmap}) {
        CAPTURE(detect_zeroes_name(detect));
        ScsiRigLayout layout;
        layout.detect_zeroes = detect;
        ScsiRig rig(EngineKind::kIoUring, false, AddressSpace::kMemory, {}, {}, layout);
        REQUIRE(::stat(rig.disk_path.c_str(), &st) == 0);
        const uint64_t before = static_cast<uint64_t>(st.st_blocks) * 512;
        std::memset(rig.driver.host(ScsiRig::data_gpa(0)), 0, 1 << 20);
        CHECK(rig.command(0, 0, cdb10(0x2a, 2048, 1024), 1 << 19, false).status == scsi::kStatusGood);  // 512 KiB at 1 MiB
        CHECK(rig.command(1, 0, cdb16(0x8a, 3072, 1024), 1 << 19, false).status == scsi::kStatusGood);  // and after it
        CHECK(rig.file_bytes(rig.disk_path, 1 << 20, 1 << 20) == std::vector<uint8_t>(1 << 20, 0));
        REQUIRE(::stat(rig.disk_path.c_str(), &st) == 0);
        const uint64_t after = static_cast<uint64_t>(st.st_blocks) * 512;
        if (detect == DetectZeroes::kUnmap)
            CHECK(after + (1 << 20) <= before + (64 << 10));  // the MiB is a hole now (less file system metadata)
        else
            CHECK(after + (64 << 10) >= before);  // written, or zeroed in place: still allocated
        // The blocks around it keep the pattern: byte i of block b is (b + i) & 0xff.
        CHECK(rig.file_bytes(rig.disk_path, 2047 * 512 + 3, 1)[0] == static_cast<uint8_t>(2047 + 3));
        CHECK(rig.file_bytes(rig.disk_path, 4096 * 512 + 3, 1)[0] == static_cast<uint8_t>(4096 + 3));
        // A block that is not all zeroes is written as it is.
        rig.driver.host(ScsiRig::data_gpa(0))[511] = 0x42;
        CHECK(rig.command(0, 0, cdb10(0x2a, 2048, 1), 512, false).status == scsi::kStatusGood);
        CHECK(rig.file_bytes(rig.disk_path, 2048 * 512 + 511, 1)[0] == 0x42);
    }
}
