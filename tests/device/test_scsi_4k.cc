// virtio-scsi over a real 4 KiB logical-block device opened `direct`: a loop
// device with 4096-byte sectors over a file. O_DIRECT there takes only whole,
// aligned 4096-byte units, so the disk must present 4096-byte logical blocks
// and every command must come to such units. Data is checked against the
// backing file. Skipped, with a message, where no loop device can be made.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/fd.h"
#include "disk/disk_image.h"
#include "tests/device/driver.h"
#include "virtio/io_thread.h"
#include "virtio/scsi.h"

using namespace lkvm;
using namespace lkvm::test;

namespace {

constexpr uint64_t kBlock = 4096;
constexpr uint64_t kDiskBytes = 8 << 20, kDiskBlocks = kDiskBytes / kBlock;
constexpr uint64_t kAllFeatures = ~0ull;

// What the backing file holds at byte i: it changes within a 4 KiB block, so
// an offset off by a multiple of 512 bytes shows.
uint8_t pattern(uint64_t i) { return static_cast<uint8_t>(i / kBlock + i % 251); }

std::vector<uint8_t> pattern_bytes(uint64_t offset, size_t length)
{
    std::vector<uint8_t> out(length);
    for (size_t i = 0; i < length; ++i)
        out[i] = pattern(offset + i);
    return out;
}

// A loop device with 4096-byte logical blocks over `backing`. path() is empty
// when this host cannot make one, and why() says why.
class Loop4k {
public:
    explicit Loop4k(const std::string& backing) { why_ = configure(backing); }
    ~Loop4k()
    {
        if (fd_.valid())
            ::ioctl(fd_.get(), LOOP_CLR_FD, 0);
    }
    Loop4k(const Loop4k&) = delete;
    Loop4k& operator=(const Loop4k&) = delete;

    const std::string& path() const { return path_; }
    const std::string& why() const { return why_; }

private:
    static std::string failed(const std::string& what) { return what + ": " + std::strerror(errno); }
    // Empty once the device is ours, else why not.
    std::string configure(const std::string& backing)
    {
        const Fd control(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
        if (!control.valid())
            return failed("/dev/loop-control");
        const Fd file(::open(backing.c_str(), O_RDWR | O_CLOEXEC));
        if (!file.valid())
            return failed(backing);
        // Another process may take the free device before we configure it: try the next one.
        for (int attempt = 0; attempt < 10; ++attempt) {
            const int n = ::ioctl(control.get(), LOOP_CTL_GET_FREE);
            if (n < 0)
                return failed("LOOP_CTL_GET_FREE");
            const std::string path = "/dev/loop" + std::to_string(n);
            Fd loop(::open(path.c_str(), O_RDWR | O_CLOEXEC));
            if (!loop.valid())
                return failed(path);
            loop_config config{};
            config.fd = static_cast<uint32_t>(file.get());
            config.block_size = kBlock;
            config.info.lo_flags = LO_FLAGS_AUTOCLEAR;  // detached at its last close, even if the test dies
            if (::ioctl(loop.get(), LOOP_CONFIGURE, &config) == 0) {
                fd_ = std::move(loop);
                path_ = path;
                return "";
            }
            if (errno != EBUSY)
                return failed("LOOP_CONFIGURE " + path);
        }
        return "every free loop device was taken before it could be configured";
    }

    Fd fd_;
    std::string path_, why_;
};

// A file of kDiskBytes of pattern(), and a 4 KiB loop device over it.
struct Backing {
    std::filesystem::path dir;
    std::string file;
    std::unique_ptr<Loop4k> loop;
    Backing()
    {
        char tmpl[] = "/tmp/lkvm-device.XXXXXX";
        dir = ::mkdtemp(tmpl);
        file = (dir / "4k.raw").string();
        const auto data = pattern_bytes(0, kDiskBytes);
        std::ofstream(file, std::ios::binary).write(reinterpret_cast<const char*>(data.data()), kDiskBytes);
        loop = std::make_unique<Loop4k>(file);
    }
    ~Backing()
    {
        loop.reset();
        std::filesystem::remove_all(dir);
    }
    std::vector<uint8_t> bytes(uint64_t offset, size_t length) const
    {
        std::vector<uint8_t> out(length);
        std::ifstream f(file, std::ios::binary);
        f.seekg(static_cast<std::streamoff>(offset));
        f.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(length));
        return out;
    }
};

std::vector<uint8_t> cdb10(uint8_t opcode, uint32_t lba, uint16_t blocks, uint8_t flags = 0)
{
    return {opcode, flags, uint8_t(lba >> 24), uint8_t(lba >> 16), uint8_t(lba >> 8), uint8_t(lba), 0,
            uint8_t(blocks >> 8), uint8_t(blocks), 0};
}

std::vector<uint8_t> cdb16(uint8_t opcode, uint64_t lba, uint32_t blocks, uint8_t flags = 0)
{
    std::vector<uint8_t> cdb(16, 0);
    cdb[0] = opcode;
    cdb[1] = flags;
    for (int i = 0; i < 8; ++i)
        cdb[2 + i] = uint8_t(lba >> (56 - 8 * i));
    for (int i = 0; i < 4; ++i)
        cdb[10 + i] = uint8_t(blocks >> (24 - 8 * i));
    return cdb;
}

uint64_t be(const uint8_t* p, size_t width)
{
    uint64_t v = 0;
    for (size_t i = 0; i < width; ++i)
        v = v << 8 | p[i];
    return v;
}

struct Reply {
    uint32_t residual = 0, used_len = 0;
    uint8_t status = 0xee, response = 0xee;
    std::vector<uint8_t> sense;
};

// One LUN (0) over `device`, one request queue on one I/O thread.
struct Rig {
    GuestDriver driver;
    IoThread control{IoThreadOptions{"main-loop", {}, 0, -1}};
    IoThread io{IoThreadOptions{"iothread0", {}, 0, -1}};
    std::unique_ptr<VirtioScsi> scsi;
    std::unique_ptr<VirtioPciDevice> transport;

    Rig(const std::string& device, bool direct, EngineKind engine = EngineKind::kIoUring,
        scsi::ScsiDiskOptions options = {"4k-serial", 1, scsi::Discard::kUnmap})
    {
        std::vector<ScsiLunSetup> luns;
        luns.push_back({0, DiskImage::open({device, false, direct ? CacheMode::kNone : CacheMode::kWriteback}), options, engine, 0});
        scsi = std::make_unique<VirtioScsi>(std::move(luns), 256, driver.memory(), std::vector<IoThread*>{&io},
                                            control.context());
        transport = std::make_unique<VirtioPciDevice>(*scsi, driver.host_interface(), AddressSpace::kMemory);
        transport->use_intx(17);
        driver.probe(*transport, kAllFeatures, 3);
    }
    ~Rig()
    {
        transport.reset();
        scsi.reset();
    }

    static constexpr uint64_t kRequest = GuestDriver::kDataArea, kResponse = kRequest + 0x100;
    static constexpr uint64_t kData = kRequest + 0x10000;  // 4 KiB aligned; up to 1 MiB of data
    uint8_t* data() { return driver.host(kData); }

    // One command on the request queue, its data in `buffers` (data-in or data-out).
    Reply command(const std::vector<uint8_t>& cdb, const std::vector<Buffer>& buffers = {})
    {
        uint8_t request[51] = {1, 0, 0x40, 0};  // LUN 0 as Linux addresses it
        std::memcpy(request + 19, cdb.data(), cdb.size());
        std::memcpy(driver.host(kRequest), request, sizeof(request));
        std::memset(driver.host(kResponse), 0xee, 108);
        const bool data_in = !buffers.empty() && buffers.front().writable;
        std::vector<Buffer> chain = {{kRequest, sizeof(request), false}};
        if (!data_in)
            chain.insert(chain.end(), buffers.begin(), buffers.end());
        chain.push_back({kResponse, 108, true});
        if (data_in)
            chain.insert(chain.end(), buffers.begin(), buffers.end());
        driver.add_chain(2, chain);
        driver.kick(2);
        const auto used = driver.wait_used(2, 1);
        REQUIRE(used.size() == 1);
        const uint8_t* r = driver.host(kResponse);
        Reply out;
        uint32_t sense_len = 0;
        std::memcpy(&sense_len, r, 4);
        std::memcpy(&out.residual, r + 4, 4);
        out.status = r[10];
        out.response = r[11];
        out.sense.assign(r + 12, r + 12 + std::min<uint32_t>(sense_len, 96));
        out.used_len = used[0].second;
        return out;
    }
    Reply read(const std::vector<uint8_t>& cdb, uint32_t bytes) { return command(cdb, {{kData, bytes, true}}); }
    Reply write(const std::vector<uint8_t>& cdb, uint32_t bytes) { return command(cdb, {{kData, bytes, false}}); }
};

bool good(const Reply& r) { return r.response == virtio_scsi::kOk && r.status == scsi::kStatusGood; }

}  // namespace

TEST_CASE("scsi device, 4 KiB logical-block host device with O_DIRECT: capacity, reads, writes, WRITE SAME, UNMAP")
{
    Backing backing;
    if (backing.loop->path().empty()) {
        MESSAGE("skipped, cannot make a loop device with 4096-byte sectors: " << backing.loop->why());
        return;
    }
    REQUIRE(DiskImage::open({backing.loop->path(), true, CacheMode::kNone}).alignment() == kBlock);

    for (EngineKind engine : {EngineKind::kSync, EngineKind::kNative, EngineKind::kIoUring}) {
        CAPTURE(std::string(engine_kind_name(engine)));
        Rig rig(backing.loop->path(), true, engine);

        // The disk has 4096-byte blocks, one per physical block; Linux's max_sectors stays in 512-byte sectors.
        Reply r = rig.read({0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 8);
        REQUIRE(good(r));
        CHECK(be(rig.data(), 4) == kDiskBlocks - 1);
        CHECK(be(rig.data() + 4, 4) == kBlock);
        r = rig.read({0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}, 32);
        REQUIRE(good(r));
        CHECK(be(rig.data(), 8) == kDiskBlocks - 1);
        CHECK(be(rig.data() + 8, 4) == kBlock);
        CHECK((rig.data()[13] & 0x0f) == 0);
        CHECK(rig.driver.device_config32(8) == (1u << 16) * kBlock / 512);

        // READ(10) of LBA 5 is bytes 5 * 4096 on; READ(16) of the last block.
        std::memset(rig.data(), 0, 2 * kBlock);
        r = rig.read(cdb10(0x28, 5, 2), 2 * kBlock);
        REQUIRE(good(r));
        CHECK(r.residual == 0);
        CHECK(std::vector<uint8_t>(rig.data(), rig.data() + 2 * kBlock) == pattern_bytes(5 * kBlock, 2 * kBlock));
        r = rig.read(cdb16(0x88, kDiskBlocks - 1, 1), kBlock);
        REQUIRE(good(r));
        CHECK(std::vector<uint8_t>(rig.data(), rig.data() + kBlock) ==
              pattern_bytes((kDiskBlocks - 1) * kBlock, kBlock));

        // WRITE(10) and WRITE(16) FUA land at LBA * 4096; the blocks around stay.
        const auto fill = static_cast<uint8_t>(0x30 + static_cast<int>(engine));
        std::memset(rig.data(), fill, 3 * kBlock);
        REQUIRE(good(rig.write(cdb10(0x2a, 9, 3), 3 * kBlock)));
        CHECK(backing.bytes(9 * kBlock, 3 * kBlock) == std::vector<uint8_t>(3 * kBlock, fill));
        REQUIRE(good(rig.write(cdb16(0x8a, 20, 1, 0x08), kBlock)));
        CHECK(backing.bytes(20 * kBlock, kBlock) == std::vector<uint8_t>(kBlock, fill));
        CHECK(backing.bytes(8 * kBlock, kBlock) == pattern_bytes(8 * kBlock, kBlock));
        CHECK(backing.bytes(12 * kBlock, kBlock) == pattern_bytes(12 * kBlock, kBlock));

        // Guest buffers that are not 4 KiB aligned (the transport bounces them): the same blocks.
        const uint64_t a = Rig::kData + 512, b = Rig::kData + 0x8000 + 8;
        r = rig.command(cdb10(0x28, 30, 1), {{a, 1536, true}, {b, 2560, true}});
        REQUIRE(good(r));
        std::vector<uint8_t> got(rig.driver.host(a), rig.driver.host(a) + 1536);
        got.insert(got.end(), rig.driver.host(b), rig.driver.host(b) + 2560);
        CHECK(got == pattern_bytes(30 * kBlock, kBlock));
        std::memset(rig.driver.host(a), 0x11, 1536);
        std::memset(rig.driver.host(b), 0x22, 2560);
        REQUIRE(good(rig.command(cdb10(0x2a, 31, 1), {{a, 1536, false}, {b, 2560, false}})));
        std::vector<uint8_t> expected(1536, 0x11);
        expected.resize(kBlock, 0x22);
        CHECK(backing.bytes(31 * kBlock, kBlock) == expected);

        // A buffer that does not hold the whole block: overrun, nothing moved.
        r = rig.read(cdb10(0x28, 0, 1), 512);
        CHECK(r.response == virtio_scsi::kOverrun);
        CHECK(r.used_len == 108);
        std::memset(rig.data(), 0x77, kBlock);
        CHECK(rig.write(cdb10(0x2a, 40, 1), kBlock - 512).response == virtio_scsi::kOverrun);
        CHECK(backing.bytes(40 * kBlock, kBlock) == pattern_bytes(40 * kBlock, kBlock));

        // WRITE SAME repeats the whole 4096-byte block; zeroes with UNMAP, and UNMAP, leave zeroes.
        for (uint64_t i = 0; i < kBlock; ++i)
            rig.data()[i] = static_cast<uint8_t>(i * 3 + 1);
        const std::vector<uint8_t> block(rig.data(), rig.data() + kBlock);
        REQUIRE(good(rig.write(cdb10(0x41, 100, 4), kBlock)));
        for (uint64_t lba = 100; lba < 104; ++lba)
            CHECK(backing.bytes(lba * kBlock, kBlock) == block);
        std::memset(rig.data(), 0, kBlock);
        REQUIRE(good(rig.write(cdb16(0x93, 200, 8, 0x08), kBlock)));
        CHECK(backing.bytes(200 * kBlock, 8 * kBlock) == std::vector<uint8_t>(8 * kBlock, 0));
        const uint8_t list[24] = {0, 22, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x2c, 0, 0, 0, 2};  // LBA 300, 2
        std::memcpy(rig.data(), list, sizeof(list));
        REQUIRE(good(rig.write({0x42, 0, 0, 0, 0, 0, 0, 0, sizeof(list), 0}, sizeof(list))));
        CHECK(backing.bytes(300 * kBlock, 2 * kBlock) == std::vector<uint8_t>(2 * kBlock, 0));
        CHECK(backing.bytes(99 * kBlock, kBlock) == pattern_bytes(99 * kBlock, kBlock));
        CHECK(backing.bytes(208 * kBlock, kBlock) == pattern_bytes(208 * kBlock, kBlock));
        CHECK(backing.bytes(302 * kBlock, kBlock) == pattern_bytes(302 * kBlock, kBlock));
    }
}

TEST_CASE("scsi device, 4 KiB logical-block host device: 512-byte blocks only where the host takes them")
{
    Backing backing;
    if (backing.loop->path().empty()) {
        MESSAGE("skipped, cannot make a loop device with 4096-byte sectors: " << backing.loop->why());
        return;
    }
    // O_DIRECT cannot serve 512-byte blocks there: asking for them is an error at start, not EINVAL on every request.
    scsi::ScsiDiskOptions sectors{"4k-serial", 1, scsi::Discard::kUnmap};
    sectors.block_size = 512;
    std::string error;
    try {
        Rig rig(backing.loop->path(), true, EngineKind::kIoUring, sectors);
    } catch (const Error& e) {
        error = e.what();
    }
    CHECK(error.find("logical block size 512") != std::string::npos);

    // Through the host page cache any 512-byte unit works, so the disk keeps 512-byte blocks.
    Rig rig(backing.loop->path(), false);
    REQUIRE(good(rig.read({0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 8)));
    CHECK(be(rig.data() + 4, 4) == 512);
    REQUIRE(good(rig.read(cdb10(0x28, 3, 1), 512)));
    CHECK(std::vector<uint8_t>(rig.data(), rig.data() + 512) == pattern_bytes(3 * 512, 512));
}
