// The virtio-pci transport against a hostile driver (issue 14): status writes
// that would start a device a second time on the same rings, and the interrupt
// state that vCPU threads write while an I/O thread reads it.
#include <doctest/doctest.h>

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "disk/disk_image.h"
#include "tests/device/driver.h"
#include "virtio/blk.h"
#include "virtio/io_thread.h"
#include "virtio/scsi.h"

using namespace lkvm;
using namespace lkvm::test;

namespace {
constexpr uint64_t kAllFeatures = ~0ull;
constexpr uint8_t kAck = 1, kDriver = 2, kDriverOk = 4, kFeaturesOk = 8, kNeedsReset = 0x40;
constexpr uint8_t kRunning = kAck | kDriver | kFeaturesOk | kDriverOk;
constexpr uint64_t kDiskBytes = 1 << 20;

std::filesystem::path temp_dir()
{
    char tmpl[] = "/tmp/lkvm-transport.XXXXXX";
    return ::mkdtemp(tmpl);
}

std::string zero_image(const std::filesystem::path& dir, const char* name)
{
    const std::string path = (dir / name).string();
    std::ofstream(path, std::ios::binary) << std::string(kDiskBytes, '\0');
    return path;
}

// A second set of queues on the same rings runs every request again and
// writes the same used entries, so the used ring alone cannot tell: the
// device's own count of requests served (queue_stats) can. It may lag the first
// answer, so look a little later.
uint64_t served_later(const DiskDevice& device, unsigned q)
{
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return device.queue_stats(q).counters().requests;
}

// A blk device on one queue, served by the sync engine (test_blk.cc's rig is private to that file).
struct BlkRig {
    std::filesystem::path dir = temp_dir();
    GuestDriver driver;
    IoThread thread{IoThreadOptions{"transport-io", {}, 0, -1}};
    std::unique_ptr<VirtioBlk> blk;
    std::unique_ptr<VirtioPciDevice> transport;

    BlkRig()
    {
        blk = std::make_unique<VirtioBlk>(DiskImage::open({zero_image(dir, "disk.raw"), false}),
                                          BlkOptions{"transport-0", EngineKind::kSync, 0, 256}, driver.memory(),
                                          std::vector<IoThread*>{&thread});
        transport = std::make_unique<VirtioPciDevice>(*blk, driver.host_interface());
        REQUIRE(driver.probe(*transport, kAllFeatures, 1) != 0);
    }
    ~BlkRig()
    {
        transport.reset();
        blk.reset();
        std::filesystem::remove_all(dir);
    }

    static uint64_t header_gpa(unsigned i) { return GuestDriver::kDataArea + i * 0x10000ull; }
    // Reads of sector i: header, 512 bytes of data, status. Not kicked.
    void queue_read(unsigned i)
    {
        const uint32_t type = kBlkTIn;
        const uint64_t sector = i;
        std::memset(driver.host(header_gpa(i)), 0, 16);
        std::memcpy(driver.host(header_gpa(i)), &type, 4);
        std::memcpy(driver.host(header_gpa(i) + 8), &sector, 8);
        *driver.host(header_gpa(i) + 0x200) = 0xee;
        driver.add_chain(0, {{header_gpa(i), 16, false}, {header_gpa(i) + 0x1000, 512, true},
                             {header_gpa(i) + 0x200, 1, true}});
    }
    uint8_t status_of(unsigned i) { return *driver.host(header_gpa(i) + 0x200); }
};

// A SCSI controller with one LUN and one request queue (queue 2).
struct ScsiRig {
    std::filesystem::path dir = temp_dir();
    GuestDriver driver;
    IoThread control{IoThreadOptions{"transport-main", {}, 0, -1}};
    IoThread io{IoThreadOptions{"transport-io", {}, 0, -1}};
    std::unique_ptr<VirtioScsi> scsi;
    std::unique_ptr<VirtioPciDevice> transport;

    ScsiRig()
    {
        std::vector<ScsiLunSetup> luns;
        luns.push_back({0, DiskImage::open({zero_image(dir, "lun0.raw"), false}),
                        {"transport-lun0", 1, scsi::Discard::kUnmap}, EngineKind::kSync, 0});
        scsi = std::make_unique<VirtioScsi>(std::move(luns), 256, driver.memory(), std::vector<IoThread*>{&io},
                                            control.context());
        transport = std::make_unique<VirtioPciDevice>(*scsi, driver.host_interface());
        REQUIRE(driver.probe(*transport, kAllFeatures, 3) != 0);
    }
    ~ScsiRig()
    {
        transport.reset();
        scsi.reset();
        std::filesystem::remove_all(dir);
    }

    // ABORT TASK SET on LUN 0 (nothing to abort) on the control queue; waits for its answer.
    size_t task_management()
    {
        const uint64_t at = GuestDriver::kDataArea;
        uint8_t request[24] = {};
        const uint32_t subtype = virtio_scsi::kTmfAbortTaskSet;
        const uint8_t lun[8] = {1, 0, 0x40, 0, 0, 0, 0, 0};
        std::memcpy(request + 4, &subtype, 4);
        std::memcpy(request + 8, lun, 8);
        std::memcpy(driver.host(at), request, sizeof(request));
        driver.add_chain(0, {{at, sizeof(request), false}, {at + 64, 1, true}});
        driver.kick(0);
        return driver.wait_used(0, 1).size();
    }
    // READ(10) of LUN 0's first block through the request queue; waits for its answer.
    size_t read_block()
    {
        const uint64_t at = GuestDriver::kDataArea + 0x10000;
        uint8_t request[51] = {1, 0, 0x40, 0};  // LUN 0, tag 0
        const uint8_t cdb[10] = {0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0};
        std::memcpy(request + 19, cdb, sizeof(cdb));
        std::memcpy(driver.host(at), request, sizeof(request));
        std::memset(driver.host(at + 0x100), 0xee, 108);
        driver.add_chain(2, {{at, sizeof(request), false}, {at + 0x100, 108, true}, {at + 0x1000, 512, true}});
        driver.kick(2);
        return driver.wait_used(2, 1).size();
    }
    uint8_t scsi_status() { return *driver.host(GuestDriver::kDataArea + 0x10000 + 0x100 + 10); }
};
}  // namespace

// Clearing DRIVER_OK without a reset is a driver error (virtio 1.x 2.1.2: a
// driver never clears a status bit). The transport keeps the device as it
// was, running on the queues it started with, and says NEEDS_RESET with a
// configuration interrupt; setting DRIVER_OK again starts nothing.
TEST_CASE("transport: DRIVER_OK cleared and set again without a reset does not start blk twice")
{
    BlkRig rig;
    REQUIRE(rig.driver.status() == kRunning);
    rig.driver.write_status(kAck | kDriver | kFeaturesOk);
    CHECK(rig.driver.wait_interrupt(rig.driver.config_irq_fd(), 5000));
    CHECK(rig.driver.status() == (kRunning | kNeedsReset));
    rig.driver.write_status(kRunning);
    CHECK(rig.driver.status() == (kRunning | kNeedsReset));

    // Every request answered exactly once, by the one set of queues: each
    // kick wakes whichever queue watches the notify eventfd.
    constexpr unsigned kRequests = 16;
    for (unsigned i = 0; i < kRequests; ++i) {
        CAPTURE(i);
        rig.queue_read(i);
        rig.driver.kick(0);
        const auto used = rig.driver.wait_used(0, 1);
        CHECK(served_later(*rig.blk, 0) == i + 1);
        CHECK(rig.driver.used_idx(0) == i + 1);
        REQUIRE(used.size() == 1);
        CHECK(used[0].first == rig.driver.queue(0).next_desc - 3u);
        CHECK(rig.status_of(i) == kBlkSOk);
    }

    // A reset clears the error and the device comes up again.
    REQUIRE(rig.driver.reprobe(kAllFeatures, 1) != 0);
    CHECK(rig.driver.status() == kRunning);
    rig.queue_read(0);
    rig.driver.kick(0);
    CHECK(rig.driver.wait_used(0, 1).size() == 1);
    CHECK(served_later(*rig.blk, 0) == kRequests + 1);  // counted across resets
    CHECK(rig.status_of(0) == kBlkSOk);
}

TEST_CASE("transport: DRIVER_OK cleared and set again without a reset does not start scsi twice")
{
    ScsiRig rig;
    REQUIRE(rig.driver.status() == kRunning);
    // Twice: each time a second start would have added another control queue and request queue.
    for (int round = 0; round < 2; ++round) {
        rig.driver.write_status(kAck | kDriver | kFeaturesOk);
        rig.driver.write_status(kRunning);
    }
    CHECK(rig.driver.status() == (kRunning | kNeedsReset));
    CHECK(rig.task_management() == 1);
    CHECK(rig.read_block() == 1);
    CHECK(served_later(*rig.scsi, 0) == 1);
    CHECK(rig.driver.used_idx(0) == 1);
    CHECK(rig.driver.used_idx(2) == 1);
    CHECK(rig.scsi_status() == 0);  // GOOD

    REQUIRE(rig.driver.reprobe(kAllFeatures, 3) != 0);
    CHECK(rig.driver.status() == kRunning);
    CHECK(rig.task_management() == 1);
    CHECK(rig.read_block() == 1);
    CHECK(served_later(*rig.scsi, 0) == 2);
}

namespace {
// Enough of a device for the transport's interrupt state: one queue, never served.
struct IdleDevice : VirtioDevice {
    uint16_t device_id() const override { return 2; }
    uint64_t features() const override { return kVirtioFVersion1; }
    unsigned num_queues() const override { return 1; }
    uint16_t max_queue_size() const override { return 256; }
    void read_config(uint64_t, std::span<uint8_t> data) override { std::fill(data.begin(), data.end(), 0); }
    void activate(uint64_t, std::vector<QueueSetup>, std::function<void()>) override {}
    void reset() override {}
};

void write16(BusDevice& device, uint64_t offset, uint16_t value)
{
    device.write(offset, std::span(reinterpret_cast<const uint8_t*>(&value), 2));
}

void write32(BusDevice& device, uint64_t offset, uint32_t value)
{
    device.write(offset, std::span(reinterpret_cast<const uint8_t*>(&value), 4));
}
}  // namespace

// What lkvm's threads do at once: one vCPU writes the MSI-X capability through
// ports 0xcf8/0xcfc (under the host bridge's lock), another the MSI-X table
// and the config vector in BAR 0 (under the transport's), and an I/O thread
// reports a broken ring (under neither). Nothing here fails by itself; a
// ThreadSanitizer build of this binary shows whether the shared state is raced.
TEST_CASE("transport: MSI-X state written by vCPUs while an I/O thread raises the config interrupt")
{
    IdleDevice device;
    FakeHost host;
    PciHostBridge bridge(0xc0000000, 0x10000000, 0x6000, 0xa000);
    VirtioPciDevice transport(device, host);
    const unsigned slot = bridge.add_device(transport);
    unsigned msix_cap = bridge.config_read(slot, 0, 0x34, 1);
    while (msix_cap && bridge.config_read(slot, 0, msix_cap, 1) != 0x11)
        msix_cap = bridge.config_read(slot, 0, msix_cap + 1, 1);
    REQUIRE(msix_cap != 0);
    auto config_write16 = [&](unsigned offset, uint16_t value) {
        write32(bridge, 0, 0x80000000u | slot << 11 | (offset & 0xfc));
        write16(bridge, 4 + (offset & 3), value);
    };
    config_write16(0x04, 0x6);  // memory decoding and bus mastering
    // Vector 0 (the config vector) routed and unmasked in the table.
    write32(transport, VirtioPciDevice::kMsixTableOffset, 0xfee00000);
    write32(transport, VirtioPciDevice::kMsixTableOffset + 8, 0);
    write32(transport, VirtioPciDevice::kMsixTableOffset + 12, 0);

    constexpr int kRounds = 2000;
    std::atomic<bool> done{false};
    std::thread config_vcpu([&] {
        for (int i = 0; i < kRounds; ++i)
            config_write16(msix_cap + 2, i % 2 ? 0x8000 : 0xc000);  // enabled, with and without the function mask
    });
    std::thread bar_vcpu([&] {
        for (int i = 0; i < kRounds; ++i) {
            write16(transport, 0x10, i % 2 ? 0 : VirtioPciDevice::kNoVector);  // config_msix_vector
            write32(transport, VirtioPciDevice::kMsixTableOffset + 12, (i + 1) % 2);  // vector 0 masked or not
        }
    });
    std::thread io_thread([&] {
        while (!done.load())
            transport.device_broken();
    });
    config_vcpu.join();
    bar_vcpu.join();
    done = true;
    io_thread.join();

    // Where the writes ended: MSI-X on, vector 0 unmasked and the config vector; a broken ring now reaches it.
    const int irq = host.irq_fd_for(0);
    uint64_t drained;
    while (::read(irq, &drained, sizeof(drained)) > 0) {
    }
    config_write16(msix_cap + 2, 0x8000);
    transport.device_broken();
    pollfd p{irq, POLLIN, 0};
    CHECK(::poll(&p, 1, 5000) == 1);
}
