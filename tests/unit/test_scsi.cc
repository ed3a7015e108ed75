// The SCSI disk target: every CDB it knows, the data and sense it answers
// with, and the I/O steps it hands the transport. Bytes are checked exactly.
#include <doctest/doctest.h>

#include <sys/uio.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <ostream>
#include <string>
#include <vector>

#include "disk/disk_image.h"
#include "tests/unit/test_util.h"
#include "hw/scsi/scsi_disk.h"

namespace lkvm::scsi {
// How doctest compares and prints these (static: other test files may have their own).
static std::ostream& operator<<(std::ostream& os, const Sense& s)
{
    return os << "sense " << int{s.key} << "/" << std::hex << int{s.asc} << "/" << int{s.ascq} << std::dec;
}
static bool operator==(const IoStep& a, const IoStep& b)
{
    return a.op == b.op && a.offset == b.offset && a.bytes == b.bytes && a.repeat_first_block == b.repeat_first_block;
}
static std::ostream& operator<<(std::ostream& os, const IoStep& s)
{
    return os << "step op " << int(s.op) << " offset " << s.offset << " bytes " << s.bytes
              << (s.repeat_first_block ? " repeat" : "");
}
}  // namespace lkvm::scsi

using namespace lkvm;
using namespace lkvm::scsi;
using Bytes = std::vector<uint8_t>;

using lkvm::test::TempDir;

namespace {

constexpr uint64_t kDiskBlocks = 2048;  // 1 MiB
constexpr uint64_t kBlock = 512;


ScsiDiskOptions test_options()
{
    ScsiDiskOptions o;
    o.serial = "SN123";
    o.rotation_rate = 1;
    o.discard = Discard::kUnmap;
    o.max_transfer_blocks = 1024;
    return o;
}

struct TestDisk {
    TempDir dir;
    DiskImage image;
    ScsiDisk scsi;
    explicit TestDisk(ScsiDiskOptions options = test_options(), bool read_only = false,
                      uint64_t bytes = kDiskBlocks * kBlock, CacheMode cache = CacheMode::kWriteback)
        : image(DiskImage::open({dir.sparse_file("disk.img", bytes), read_only, cache})), scsi(image, std::move(options))
    {
    }
    // A command with data-in buffers of `data_in` bytes.
    Execution in(const Bytes& cdb, uint64_t data_in = 4096) { return scsi.execute(cdb, {}, data_in); }
    // A command with its data-out buffer(s).
    Execution out(const Bytes& cdb, const std::vector<Bytes>& buffers, uint64_t data_in = 0)
    {
        std::vector<iovec> iov;
        for (const Bytes& b : buffers)
            iov.push_back({const_cast<uint8_t*>(b.data()), b.size()});
        return scsi.execute(cdb, iov, data_in);
    }
    Execution out(const Bytes& cdb, const Bytes& buffer, uint64_t data_in = 0)
    {
        return out(cdb, std::vector<Bytes>{buffer}, data_in);
    }
};

// A CDB of the opcode's length with big-endian fields set.
struct Cdb {
    Bytes bytes;
    Cdb(uint8_t opcode, size_t length) : bytes(length) { bytes[0] = opcode; }
    Cdb& set(size_t at, size_t width, uint64_t value)
    {
        for (size_t i = width; i-- > 0; value >>= 8)
            bytes.at(at + i) = static_cast<uint8_t>(value);
        return *this;
    }
    operator Bytes() const { return bytes; }
};

Bytes rw10(uint8_t opcode, uint32_t lba, uint16_t blocks, uint8_t flags = 0)
{
    return Cdb(opcode, 10).set(1, 1, flags).set(2, 4, lba).set(7, 2, blocks);
}
Bytes rw16(uint8_t opcode, uint64_t lba, uint32_t blocks, uint8_t flags = 0)
{
    return Cdb(opcode, 16).set(1, 1, flags).set(2, 8, lba).set(10, 4, blocks);
}
Bytes inquiry(bool evpd, uint8_t page, uint16_t allocation_length = 255)
{
    return Cdb(0x12, 6).set(1, 1, evpd ? 1 : 0).set(2, 1, page).set(3, 2, allocation_length);
}
Bytes mode_sense6(uint8_t page, uint8_t pc = 0, uint8_t alloc = 255, uint8_t byte1 = 0, uint8_t subpage = 0)
{
    return Cdb(0x1a, 6).set(1, 1, byte1).set(2, 1, pc << 6 | page).set(3, 1, subpage).set(4, 1, alloc);
}
Bytes mode_sense10(uint8_t page, uint8_t pc = 0, uint16_t alloc = 1024, uint8_t byte1 = 0, uint8_t subpage = 0)
{
    return Cdb(0x5a, 10).set(1, 1, byte1).set(2, 1, pc << 6 | page).set(3, 1, subpage).set(7, 2, alloc);
}
Bytes mode_select6(size_t length, uint8_t byte1 = 0x10) { return Cdb(0x15, 6).set(1, 1, byte1).set(4, 1, length); }
Bytes mode_select10(size_t length, uint8_t byte1 = 0x10) { return Cdb(0x55, 10).set(1, 1, byte1).set(7, 2, length); }

// MODE SELECT(6) parameter list: header, optional block descriptor, pages.
Bytes mode_list6(const Bytes& descriptor, const Bytes& pages)
{
    Bytes list{0, 0, 0, static_cast<uint8_t>(descriptor.size())};
    list.insert(list.end(), descriptor.begin(), descriptor.end());
    list.insert(list.end(), pages.begin(), pages.end());
    return list;
}
Bytes caching_page(bool wce)
{
    Bytes page(20);
    page[0] = 0x08;
    page[1] = 0x12;
    page[2] = wce ? 0x04 : 0;
    return page;
}
Bytes control_page()
{
    Bytes page(12);
    page[0] = 0x0a;
    page[1] = 0x0a;
    page[3] = 0x10;
    return page;
}

// UNMAP parameter list with consistent header lengths.
Bytes unmap_list(const std::vector<std::pair<uint64_t, uint32_t>>& ranges)
{
    Cdb list(0, 8 + 16 * ranges.size());
    list.set(0, 2, 6 + 16 * ranges.size()).set(2, 2, 16 * ranges.size());
    for (size_t i = 0; i < ranges.size(); ++i)
        list.set(8 + 16 * i, 8, ranges[i].first).set(16 + 16 * i, 4, ranges[i].second);
    return list;
}
Bytes unmap_cdb(size_t length, uint8_t byte1 = 0) { return Cdb(0x42, 10).set(1, 1, byte1).set(7, 2, length); }

uint64_t be(const Bytes& b, size_t at, size_t width)
{
    uint64_t v = 0;
    for (size_t i = 0; i < width; ++i)
        v = v << 8 | b.at(at + i);
    return v;
}
std::string text(const Bytes& b, size_t at, size_t length)
{
    return std::string(b.begin() + static_cast<ptrdiff_t>(at), b.begin() + static_cast<ptrdiff_t>(at + length));
}

}  // namespace

// A refusal: CHECK CONDITION with this sense, no data, no I/O.
#define CHECK_REFUSED(execution, expected_sense)                  \
    do {                                                          \
        const Execution& refused_ = (execution);                  \
        CHECK(refused_.status == kStatusCheckCondition);          \
        CHECK(refused_.sense == (expected_sense));                \
        CHECK_FALSE(refused_.overrun);                            \
        CHECK(refused_.data_in.empty());                          \
        CHECK(refused_.io.empty());                               \
    } while (0)

#define CHECK_GOOD(execution)                                     \
    do {                                                          \
        const Execution& good_ = (execution);                     \
        CHECK(good_.status == kStatusGood);                       \
        CHECK(good_.sense == sense::kNoSense);                    \
        CHECK_FALSE(good_.overrun);                               \
    } while (0)

#define CHECK_OVERRUN(execution)                                  \
    do {                                                          \
        const Execution& overrun_ = (execution);                  \
        CHECK(overrun_.overrun);                                  \
        CHECK(overrun_.status == kStatusGood);                    \
        CHECK(overrun_.data_in.empty());                          \
        CHECK(overrun_.io.empty());                               \
    } while (0)

TEST_CASE("scsi fixed sense data and the sense of failed I/O")
{
    const auto s = fixed_sense(sense::kSpaceAllocationFailed);
    const std::array<uint8_t, 18> expected{0x70, 0, 0x07, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x27, 0x07, 0, 0, 0, 0};
    CHECK(s == expected);

    CHECK(io_error_sense(IoOp::kRead, -EIO) == sense::kUnrecoveredReadError);
    CHECK(io_error_sense(IoOp::kRead, 100) == sense::kUnrecoveredReadError);  // short read
    CHECK(io_error_sense(IoOp::kWrite, -ENOSPC) == sense::kSpaceAllocationFailed);
    CHECK(io_error_sense(IoOp::kWrite, -EIO) == sense::kWriteError);
    CHECK(io_error_sense(IoOp::kWrite, 512) == sense::kWriteError);  // short write
    CHECK(io_error_sense(IoOp::kFlush, -EIO) == sense::kWriteError);
    CHECK(io_error_sense(IoOp::kDiscard, -EOPNOTSUPP) == sense::kWriteError);
    CHECK(io_error_sense(IoOp::kWriteZeroes, -EIO) == sense::kWriteError);
    CHECK(io_error_sense(IoOp::kWriteZeroes, -ENOSPC) == sense::kSpaceAllocationFailed);
}

TEST_CASE("scsi malformed CDBs: unknown opcodes, short CDBs, NACA")
{
    TestDisk d;
    CHECK_REFUSED(d.in({0x04, 0, 0, 0, 0, 0}), sense::kInvalidOpcode);  // FORMAT UNIT
    CHECK_REFUSED(d.in(Bytes(16, 0x7f)), sense::kInvalidOpcode);     // reserved group 3
    CHECK_REFUSED(d.in(Bytes(16, 0xc0)), sense::kInvalidOpcode);     // vendor specific
    CHECK_REFUSED(d.in(Cdb(0xa0, 12)), sense::kInvalidOpcode);       // REPORT LUNS is the transport's
    CHECK_REFUSED(d.in({0x04}), sense::kInvalidOpcode);              // unknown wins over short
    CHECK_REFUSED(d.in({}), sense::kInvalidFieldInCdb);

    // Shorter than the group's length: 6, 10, 12, 16.
    CHECK_REFUSED(d.in({0x00, 0, 0, 0, 0}), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.in({0x28, 0, 0, 0, 0, 0, 0, 0, 1}), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.in(Bytes(11, 0xa8)), sense::kInvalidFieldInCdb);
    Bytes read16 = rw16(0x88, 0, 1);
    read16.pop_back();
    CHECK_REFUSED(d.in(read16), sense::kInvalidFieldInCdb);

    // NACA in the control byte (the opcode's last byte), for each length.
    CHECK_REFUSED(d.in({0x00, 0, 0, 0, 0, 0x04}), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.in(Cdb(0x28, 10).set(7, 2, 1).set(9, 1, 0x04)), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.in(Cdb(0xa8, 12).set(6, 4, 1).set(11, 1, 0x04)), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.in(Cdb(0x88, 16).set(10, 4, 1).set(15, 1, 0x04)), sense::kInvalidFieldInCdb);
    // LINK (obsolete) and vendor bits of the control byte are ignored.
    CHECK_GOOD(d.in({0x00, 0, 0, 0, 0, 0xc1}));

    // The transport may pass the whole CDB field (32 bytes for virtio-scsi):
    // bytes past the opcode's length are not looked at.
    Bytes tur32{0x00, 0, 0, 0, 0, 0};
    tur32.resize(32, 0xff);
    const auto e = d.in(tur32, 0);
    CHECK_GOOD(e);
    CHECK(e.residual == 0);

    // A refusal leaves all of the driver's buffers unused.
    CHECK(d.in({0x04, 0, 0, 0, 0, 0}, 4096).residual == 4096);
}

TEST_CASE("scsi TEST UNIT READY, START STOP UNIT and REQUEST SENSE")
{
    TestDisk d;
    auto e = d.in({0x00, 0, 0, 0, 0, 0}, 0);
    CHECK_GOOD(e);
    CHECK(e.io.empty());
    CHECK(e.data_in.empty());
    // No data moves: the buffers, whichever way, are residual.
    CHECK(d.in({0x00, 0, 0, 0, 0, 0}, 512).residual == 512);

    CHECK_GOOD(d.in({0x1b, 0, 0, 0, 0x01, 0}, 0));  // START
    CHECK_GOOD(d.in({0x1b, 0, 0, 0, 0x00, 0}, 0));  // STOP
    CHECK_GOOD(d.in({0x1b, 0x01, 0, 0, 0x03, 0}, 0));  // IMMED, LOEJ|START on a fixed medium
    CHECK_REFUSED(d.in({0x1b, 0, 0, 0, 0x30, 0}, 0), sense::kInvalidFieldInCdb);  // power condition STANDBY

    e = d.in({0x03, 0, 0, 0, 252, 0}, 100);
    CHECK_GOOD(e);
    const Bytes no_sense{0x70, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    CHECK(e.data_in == no_sense);
    CHECK(e.residual == 100 - 18);
    e = d.in({0x03, 0, 0, 0, 8, 0}, 100);  // allocation length cuts it
    CHECK(e.data_in == Bytes(no_sense.begin(), no_sense.begin() + 8));
    CHECK(e.residual == 92);
    e = d.in({0x03, 0, 0, 0, 252, 0}, 4);  // so do the buffers
    CHECK(e.data_in.size() == 4);
    CHECK(e.residual == 0);
    CHECK_REFUSED(d.in({0x03, 0x01, 0, 0, 252, 0}), sense::kInvalidFieldInCdb);  // DESC
}

TEST_CASE("scsi unit attention after a logical unit reset or an I_T nexus loss")
{
    TestDisk d;
    const Bytes tur{0x00, 0, 0, 0, 0, 0}, request_sense{0x03, 0, 0, 0, 252, 0};
    const Bytes block(kBlock, 7);
    CHECK_GOOD(d.in(tur, 0));

    // The next command, whatever it is, ends with the unit attention; the one after runs.
    d.scsi.reset();
    auto e = d.out(rw10(0x2a, 0, 1), block);
    CHECK_REFUSED(e, sense::kLogicalUnitResetOccurred);
    CHECK(e.residual == kBlock);
    CHECK(d.out(rw10(0x2a, 0, 1), block).io.size() == 1);

    // INQUIRY runs and leaves it pending; even an unknown opcode reports it before its own error.
    d.scsi.reset();
    CHECK_GOOD(d.in(inquiry(false, 0)));
    CHECK_GOOD(d.in(inquiry(true, 0x80)));
    CHECK_REFUSED(d.in({0xc0, 0, 0, 0, 0, 0}), sense::kLogicalUnitResetOccurred);
    CHECK_REFUSED(d.in({0xc0, 0, 0, 0, 0, 0}), sense::kInvalidOpcode);

    // REQUEST SENSE returns it as data (GOOD) and clears it.
    d.scsi.reset();
    e = d.in(request_sense, 100);
    CHECK_GOOD(e);
    const Bytes reset_sense{0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0x03, 0, 0, 0, 0};
    CHECK(e.data_in == reset_sense);
    CHECK_GOOD(d.in(tur, 0));
    e = d.in(request_sense, 100);
    CHECK(e.data_in.at(2) == 0);  // nothing pending any more

    // An I_T nexus loss has its own code, and a newer condition replaces an older one.
    d.scsi.nexus_lost();
    CHECK_REFUSED(d.in(tur, 0), sense::kItNexusLossOccurred);
    d.scsi.nexus_lost();
    d.scsi.reset();
    CHECK_REFUSED(d.in(tur, 0), sense::kLogicalUnitResetOccurred);
    CHECK_GOOD(d.in(tur, 0));

    // A reset does not touch a read-only disk's refusals, only reports itself first.
    TestDisk ro(test_options(), true);
    ro.scsi.reset();
    CHECK_REFUSED(ro.out(rw10(0x2a, 0, 1), block), sense::kLogicalUnitResetOccurred);
    CHECK_REFUSED(ro.out(rw10(0x2a, 0, 1), block), sense::kWriteProtected);
}

TEST_CASE("scsi INQUIRY standard data")
{
    TestDisk d;
    auto e = d.in(inquiry(false, 0, 96), 4096);
    CHECK_GOOD(e);
    REQUIRE(e.data_in.size() == 36);
    const Bytes& q = e.data_in;
    CHECK(q[0] == 0x00);  // connected direct-access block device
    CHECK(q[1] == 0x00);  // not removable
    CHECK(q[2] == 0x06);  // SPC-4
    CHECK(q[3] == 0x12);  // HiSup, response data format 2, no NormACA
    CHECK(q[4] == 31);
    CHECK(q[5] == 0);
    CHECK(q[6] == 0);
    CHECK(q[7] == 0x02);  // CmdQue
    CHECK(text(q, 8, 8) == "LKVM    ");
    CHECK(text(q, 16, 16) == "VIRTUAL DISK    ");
    CHECK(text(q, 32, 4) == "0001");
    CHECK(e.residual == 4096 - 36);
    CHECK(e.io.empty());

    e = d.in(inquiry(false, 0, 5), 4096);  // allocation length
    CHECK(e.data_in == Bytes(q.begin(), q.begin() + 5));
    CHECK(e.residual == 4091);
    e = d.in(inquiry(false, 0, 255), 20);  // buffer size
    CHECK(e.data_in == Bytes(q.begin(), q.begin() + 20));
    CHECK(e.residual == 0);
    e = d.in(inquiry(false, 0, 0), 64);  // allocation length 0: nothing, and no error
    CHECK_GOOD(e);
    CHECK(e.data_in.empty());
    CHECK(e.residual == 64);

    CHECK_REFUSED(d.in(inquiry(false, 0x80)), sense::kInvalidFieldInCdb);  // page code without EVPD
    CHECK_REFUSED(d.in(Cdb(0x12, 6).set(1, 1, 0x02).set(3, 2, 255)), sense::kInvalidFieldInCdb);  // CmdDt
    CHECK_REFUSED(d.in(Cdb(0x12, 6).set(1, 1, 0x03).set(3, 2, 255)), sense::kInvalidFieldInCdb);
    // Data-in command with data-out buffers: goes the wrong way.
    const auto wrong_way = d.out(inquiry(false, 0), Bytes(36));
    CHECK_OVERRUN(wrong_way);
    CHECK(wrong_way.residual == 36);
}

TEST_CASE("scsi INQUIRY VPD pages")
{
    TestDisk d;
    auto e = d.in(inquiry(true, 0x00));
    CHECK_GOOD(e);
    CHECK(e.data_in == Bytes{0, 0x00, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2});

    e = d.in(inquiry(true, 0x80));
    CHECK(e.data_in == Bytes{0, 0x80, 0, 5, 'S', 'N', '1', '2', '3'});

    e = d.in(inquiry(true, 0x83));
    const Bytes device_id{
        0, 0x83, 0, 29,
        0x01, 0x02, 0, 8,  // binary, LU, EUI-64: FNV-1a("SN123") = a45cb6b36d097c1c, locally administered
        0xa6, 0x5c, 0xb6, 0xb3, 0x6d, 0x09, 0x7c, 0x1c,
        0x02, 0x01, 0, 13,  // ASCII, LU, T10 vendor ID
        'L', 'K', 'V', 'M', ' ', ' ', ' ', ' ', 'S', 'N', '1', '2', '3'};
    CHECK(e.data_in == device_id);
    {
        // Derived from the serial alone: the same serial, the same identity.
        TestDisk same;
        CHECK(same.in(inquiry(true, 0x83)).data_in == device_id);
        ScsiDiskOptions other = test_options();
        other.serial = "SN124";
        TestDisk different(other);
        const auto id = different.in(inquiry(true, 0x83)).data_in;
        REQUIRE(id.size() == device_id.size());
        CHECK(Bytes(id.begin() + 8, id.begin() + 16) != Bytes(device_id.begin() + 8, device_id.begin() + 16));
    }

    e = d.in(inquiry(true, 0xb0));
    REQUIRE(e.data_in.size() == 64);
    const Bytes& limits = e.data_in;
    CHECK(be(limits, 0, 4) == 0x00b0003c);
    CHECK(limits[4] == 0x01);                 // WSNZ
    CHECK(limits[5] == 0);                    // no COMPARE AND WRITE
    CHECK(be(limits, 6, 2) == 0);             // optimal transfer length granularity
    CHECK(be(limits, 8, 4) == 1024);          // maximum transfer length = options
    CHECK(be(limits, 12, 4) == 256);          // optimal transfer length
    CHECK(be(limits, 16, 4) == 0);            // maximum prefetch
    CHECK(be(limits, 20, 4) == 2097152);      // maximum unmap LBA count: 1 GiB
    CHECK(be(limits, 24, 4) == 256);          // maximum unmap block descriptors
    CHECK(be(limits, 28, 4) == 8);            // optimal unmap granularity: 4 KiB
    CHECK(be(limits, 32, 4) == 0x80000000u);  // UGAVALID, alignment 0
    CHECK(be(limits, 36, 8) == 2097152);      // maximum write same length
    CHECK(Bytes(limits.begin() + 44, limits.end()) == Bytes(20));

    e = d.in(inquiry(true, 0xb1));
    REQUIRE(e.data_in.size() == 64);
    CHECK(be(e.data_in, 0, 4) == 0x00b1003c);
    CHECK(be(e.data_in, 4, 2) == 1);  // non-rotating
    CHECK(Bytes(e.data_in.begin() + 6, e.data_in.end()) == Bytes(58));

    e = d.in(inquiry(true, 0xb2));
    CHECK(e.data_in == Bytes{0, 0xb2, 0, 4, 0, 0xe4, 0x02, 0});  // LBPU LBPWS LBPWS10 LBPRZ, thin

    CHECK_REFUSED(d.in(inquiry(true, 0x81)), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.in(inquiry(true, 0xb3)), sense::kInvalidFieldInCdb);

    e = d.in(inquiry(true, 0x83, 6), 4096);  // allocation length holds for VPD pages too
    CHECK(e.data_in == Bytes(device_id.begin(), device_id.begin() + 6));
    CHECK(e.residual == 4090);

    SUBCASE("discard ignored, small transfers, rotating, no serial")
    {
        ScsiDiskOptions o = test_options();
        o.discard = Discard::kIgnore;
        o.max_transfer_blocks = 64;
        o.rotation_rate = 7200;
        o.serial = "";
        TestDisk plain(o);
        const auto b0 = plain.in(inquiry(true, 0xb0)).data_in;
        REQUIRE(b0.size() == 64);
        CHECK(be(b0, 8, 4) == 64);
        CHECK(be(b0, 12, 4) == 64);  // never above the maximum
        CHECK(be(b0, 20, 16) == 0);  // no unmap limits: UNMAP not offered
        CHECK(be(b0, 36, 8) == 2097152);
        CHECK(be(plain.in(inquiry(true, 0xb1)).data_in, 4, 2) == 7200);
        CHECK(plain.in(inquiry(true, 0xb2)).data_in == Bytes{0, 0xb2, 0, 4, 0, 0, 0, 0});
        CHECK(plain.in(inquiry(true, 0x80)).data_in == Bytes{0, 0x80, 0, 0});
        const auto id = plain.in(inquiry(true, 0x83)).data_in;
        REQUIRE(id.size() == 4 + 12 + 12);
        CHECK(be(id, 8, 8) == ((0xcbf29ce484222325ull | (0x02ull << 56)) & ~(0x01ull << 56)));
        CHECK(text(id, 20, 8) == "LKVM    ");
    }
    SUBCASE("a long serial is cut to what the T10 designator holds")
    {
        ScsiDiskOptions o = test_options();
        o.serial = std::string(300, 'x');
        TestDisk longer(o);
        CHECK(be(longer.in(inquiry(true, 0x80, 1024)).data_in, 2, 2) == 247);
        const auto id = longer.in(inquiry(true, 0x83, 1024)).data_in;
        REQUIRE(id.size() == 4 + 12 + 4 + 255);
        CHECK(id[19] == 255);
    }
}

TEST_CASE("scsi READ CAPACITY 10 and 16")
{
    TestDisk d;
    auto e = d.in(Cdb(0x25, 10), 4096);
    CHECK_GOOD(e);
    CHECK(e.data_in == Bytes{0, 0, 0x07, 0xff, 0, 0, 0x02, 0x00});
    CHECK(e.residual == 4088);
    CHECK(d.in(Cdb(0x25, 10), 4).data_in == Bytes{0, 0, 0x07, 0xff});
    CHECK_REFUSED(d.in(Cdb(0x25, 10).set(2, 4, 5)), sense::kInvalidFieldInCdb);  // LBA without PMI
    CHECK_GOOD(d.in(Cdb(0x25, 10).set(2, 4, 5).set(8, 1, 1)));

    const Bytes rc16 = Cdb(0x9e, 16).set(1, 1, 0x10).set(10, 4, 32);
    e = d.in(rc16, 4096);
    CHECK_GOOD(e);
    Bytes expected(32);
    expected[6] = 0x07;
    expected[7] = 0xff;
    expected[10] = 0x02;
    expected[14] = 0xc0;  // LBPME, LBPRZ
    CHECK(e.data_in == expected);
    CHECK(e.residual == 4096 - 32);
    e = d.in(Cdb(0x9e, 16).set(1, 1, 0x10).set(10, 4, 12), 4096);
    CHECK(e.data_in == Bytes(expected.begin(), expected.begin() + 12));
    CHECK_REFUSED(d.in(Cdb(0x9e, 16).set(1, 1, 0x11).set(10, 4, 32)), sense::kInvalidFieldInCdb);  // other SA
    CHECK_REFUSED(d.in(Cdb(0x9e, 16).set(1, 1, 0x10).set(2, 8, 1).set(10, 4, 32)), sense::kInvalidFieldInCdb);

    ScsiDiskOptions o = test_options();
    o.discard = Discard::kIgnore;
    TestDisk plain(o);
    CHECK(plain.in(rc16).data_in[14] == 0);

    // Last LBA past 32 bits: READ CAPACITY(10) says all ones, (16) the real one.
    TestDisk huge(test_options(), false, (1ull << 32) * kBlock + 4 * kBlock);
    CHECK(huge.in(Cdb(0x25, 10)).data_in == Bytes{0xff, 0xff, 0xff, 0xff, 0, 0, 0x02, 0x00});
    CHECK(be(huge.in(rc16).data_in, 0, 8) == (1ull << 32) + 3);
    // ... and MODE SENSE's short block descriptor too.
    const auto mode = huge.in(mode_sense6(0x08));
    CHECK(be(mode.data_in, 4, 4) == 0xffffffff);
}


TEST_CASE("scsi READ and WRITE 6/10/12/16: steps, residuals, FUA")
{
    TestDisk d;
    const Bytes data(8 * kBlock, 0x5a);

    auto e = d.in(rw10(0x28, 10, 8), 8 * kBlock);  // READ(10)
    CHECK_GOOD(e);
    CHECK(e.data_in.empty());
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, 10 * kBlock, 8 * kBlock});
    CHECK(e.residual == 0);

    // READ(6): a 21-bit LBA (the top 3 bits of byte 1 are not part of it).
    e = d.in(Cdb(0x08, 6).set(1, 3, 0xe00005).set(4, 1, 3), 4096);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, 5 * kBlock, 3 * kBlock});
    CHECK(e.residual == 4096 - 3 * kBlock);
    // ... and a transfer length of 0 is 256 blocks.
    e = d.in(Cdb(0x08, 6).set(3, 1, 7), 256 * kBlock);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, 7 * kBlock, 256 * kBlock});

    e = d.in(Cdb(0xa8, 12).set(2, 4, 100).set(6, 4, 2), 2 * kBlock);  // READ(12)
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, 100 * kBlock, 2 * kBlock});
    e = d.in(rw16(0x88, kDiskBlocks - 1, 1), kBlock);  // READ(16), the last block
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, (kDiskBlocks - 1) * kBlock, kBlock});

    // Writes: with the write cache on, no flush unless FUA.
    e = d.out(rw10(0x2a, 3, 8), data);
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, 3 * kBlock, 8 * kBlock});
    CHECK(e.residual == 0);
    e = d.out(Cdb(0x0a, 6).set(1, 3, 9).set(4, 1, 2), data);  // WRITE(6)
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, 9 * kBlock, 2 * kBlock});
    CHECK(e.residual == 6 * kBlock);  // the data-out left over
    e = d.out(Cdb(0xaa, 12).set(1, 1, 0x08).set(2, 4, 4).set(6, 4, 1), data);  // WRITE(12) FUA
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, 4 * kBlock, kBlock});
    CHECK(e.io[1] == IoStep{IoOp::kFlush, 0, 0});
    e = d.out(rw16(0x8a, 1000, 4, 0x08), data);  // WRITE(16) FUA
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, 1000 * kBlock, 4 * kBlock});
    CHECK(e.io[1].op == IoOp::kFlush);
    e = d.out(rw10(0x2a, 3, 1, 0x08), data);  // WRITE(10) FUA
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[1].op == IoOp::kFlush);
    // FUA on a read changes nothing: the image is coherent.
    CHECK(d.in(rw10(0x28, 3, 1, 0x08), kBlock).io.size() == 1);
    // DPO is accepted and ignored.
    CHECK(d.in(rw10(0x28, 3, 1, 0x10), kBlock).io.size() == 1);

    // Transfer length 0 (not for the 6-byte ones): GOOD, no I/O.
    e = d.in(rw10(0x28, 5, 0), 4096);
    CHECK_GOOD(e);
    CHECK(e.io.empty());
    CHECK(e.residual == 4096);
    e = d.out(rw16(0x8a, 5, 0), Bytes(0));
    CHECK_GOOD(e);
    CHECK(e.io.empty());
    CHECK_GOOD(d.in(rw10(0x28, kDiskBlocks, 0), 0));  // at the end, nothing moved
}

TEST_CASE("scsi READ and WRITE refusals: range, limits, protection, buffers")
{
    TestDisk d;
    const Bytes data(64 * kBlock);

    CHECK_REFUSED(d.in(rw10(0x28, kDiskBlocks - 1, 2), 2 * kBlock), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.in(rw10(0x28, kDiskBlocks, 1), kBlock), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.in(rw16(0x88, ~0ull, 2), 2 * kBlock), sense::kLbaOutOfRange);  // LBA + length wraps
    CHECK_REFUSED(d.in(rw16(0x88, kDiskBlocks + 1, 0), 0), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.out(rw10(0x2a, kDiskBlocks - 4, 8), data), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.in(Cdb(0x08, 6).set(1, 3, kDiskBlocks - 10), 256 * kBlock), sense::kLbaOutOfRange);

    // RDPROTECT / WRPROTECT: no protection information.
    CHECK_REFUSED(d.in(rw10(0x28, 0, 1, 0x20), kBlock), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.out(rw16(0x8a, 0, 1, 0xe0), data), sense::kInvalidFieldInCdb);

    // Over the maximum transfer length.
    CHECK_REFUSED(d.in(rw10(0x28, 0, 1025), 1025 * kBlock), sense::kInvalidFieldInCdb);
    CHECK_GOOD(d.in(rw10(0x28, 0, 1024), 1024 * kBlock));
    {
        ScsiDiskOptions o = test_options();
        o.max_transfer_blocks = 128;
        TestDisk small(o);
        CHECK_REFUSED(small.in(Cdb(0x08, 6), 256 * kBlock), sense::kInvalidFieldInCdb);  // 0 = 256 blocks
        CHECK_REFUSED(small.in(rw10(0x28, 0, 129), 129 * kBlock), sense::kInvalidFieldInCdb);
        CHECK_GOOD(small.in(rw10(0x28, 0, 128), 128 * kBlock));
    }

    // Buffers too small, or the wrong way: overrun, with nothing done.
    auto e = d.in(rw10(0x28, 0, 8), 8 * kBlock - 1);
    CHECK_OVERRUN(e);
    CHECK(e.residual == 8 * kBlock - 1);
    CHECK_OVERRUN(d.out(rw10(0x28, 0, 1), Bytes(kBlock), kBlock));          // READ with data-out
    CHECK_OVERRUN(d.out(rw10(0x2a, 0, 8), Bytes(8 * kBlock - 512)));       // WRITE, too little data
    CHECK_OVERRUN(d.out(rw10(0x2a, 0, 1), data, kBlock));                  // WRITE with data-in
    CHECK_OVERRUN(d.in(rw10(0x2a, 0, 1), kBlock));                          // WRITE without data-out
    CHECK_OVERRUN(d.in(rw10(0x2a, 0, 0), kBlock));                          // no data, but buffers the wrong way
    // ILLEGAL REQUEST comes before the buffers are looked at.
    CHECK_REFUSED(d.in(rw10(0x28, kDiskBlocks, 1), 0), sense::kLbaOutOfRange);

    TestDisk ro(test_options(), true);
    CHECK_REFUSED(ro.out(rw10(0x2a, 0, 1), data), sense::kWriteProtected);
    CHECK_REFUSED(ro.out(Cdb(0x0a, 6).set(4, 1, 1), data), sense::kWriteProtected);
    CHECK_REFUSED(ro.out(rw16(0x8a, 0, 0), Bytes(0)), sense::kWriteProtected);
    CHECK_REFUSED(ro.out(Cdb(0xaa, 12).set(6, 4, 1), data), sense::kWriteProtected);
    CHECK(ro.in(rw10(0x28, 0, 1), kBlock).io.size() == 1);  // reads are fine
}

TEST_CASE("scsi SYNCHRONIZE CACHE and VERIFY")
{
    TestDisk d;
    auto e = d.in(Cdb(0x35, 10), 0);
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kFlush, 0, 0});
    e = d.in(Cdb(0x35, 10).set(1, 1, 0x02).set(2, 4, 100).set(7, 2, 10), 0);  // IMMED, a range
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0].op == IoOp::kFlush);
    e = d.in(Cdb(0x91, 16).set(2, 8, kDiskBlocks - 1).set(10, 4, 1), 0);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0].op == IoOp::kFlush);
    CHECK_REFUSED(d.in(Cdb(0x35, 10).set(2, 4, kDiskBlocks - 1).set(7, 2, 2), 0), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.in(Cdb(0x91, 16).set(2, 8, kDiskBlocks + 1), 0), sense::kLbaOutOfRange);
    TestDisk ro(test_options(), true);
    CHECK(ro.in(Cdb(0x35, 10), 0).io.size() == 1);

    e = d.in(Cdb(0x2f, 10).set(2, 4, 10).set(7, 2, 100), 0);  // VERIFY(10), BYTCHK 0
    CHECK_GOOD(e);
    CHECK(e.io.empty());
    CHECK_GOOD(d.in(Cdb(0x8f, 16).set(2, 8, 0).set(10, 4, kDiskBlocks), 0));
    CHECK_REFUSED(d.in(Cdb(0x2f, 10).set(2, 4, kDiskBlocks - 1).set(7, 2, 2), 0), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.in(Cdb(0x8f, 16).set(2, 8, ~0ull).set(10, 4, 2), 0), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.in(Cdb(0x2f, 10).set(1, 1, 0x02).set(7, 2, 1), 0), sense::kInvalidFieldInCdb);  // BYTCHK 1
    CHECK_REFUSED(d.in(Cdb(0x8f, 16).set(1, 1, 0x06).set(10, 4, 1), 0), sense::kInvalidFieldInCdb);  // BYTCHK 3
    CHECK_REFUSED(d.in(Cdb(0x2f, 10).set(1, 1, 0x20).set(7, 2, 1), 0), sense::kInvalidFieldInCdb);  // VRPROTECT
}

TEST_CASE("scsi MODE SENSE 6 and 10")
{
    TestDisk d;
    // MODE SENSE(6), caching page, with a block descriptor.
    auto e = d.in(mode_sense6(0x08), 4096);
    CHECK_GOOD(e);
    Bytes expected{3 + 8 + 20, 0, 0x10, 8,              // header: DPOFUA, 8-byte descriptor
                   0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00,  // 2048 blocks of 512 bytes
                   0x08, 0x12, 0x04};                   // caching page: WCE
    expected.resize(4 + 8 + 20);
    CHECK(e.data_in == expected);
    CHECK(e.residual == 4096 - expected.size());

    // DBD: no block descriptor.
    e = d.in(mode_sense6(0x08, 0, 255, 0x08));
    expected = {3 + 20, 0, 0x10, 0, 0x08, 0x12, 0x04};
    expected.resize(4 + 20);
    CHECK(e.data_in == expected);

    // Control page.
    e = d.in(mode_sense6(0x0a, 0, 255, 0x08));
    CHECK(e.data_in == Bytes{3 + 12, 0, 0x10, 0, 0x0a, 0x0a, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0});

    // All pages: caching then control.
    e = d.in(mode_sense6(0x3f, 0, 255, 0x08));
    Bytes all{3 + 20 + 12, 0, 0x10, 0};
    const Bytes caching_on = caching_page(true), control = control_page();
    all.insert(all.end(), caching_on.begin(), caching_on.end());
    all.insert(all.end(), control.begin(), control.end());
    CHECK(e.data_in == all);
    CHECK(d.in(mode_sense6(0x3f, 0, 255, 0x08, 0xff)).data_in == all);  // all subpages too: there are none

    // Changeable values: WCE only; the block descriptor's fields cannot change.
    e = d.in(mode_sense6(0x3f, 1));
    expected = {3 + 8 + 20 + 12, 0, 0x10, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x12, 0x04};
    expected.resize(4 + 8 + 20);
    expected.insert(expected.end(), {0x0a, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
    CHECK(e.data_in == expected);
    // Default values: write cache on, the control page as is.
    e = d.in(mode_sense6(0x3f, 2, 255, 0x08));
    CHECK(e.data_in == all);
    // Saved values: we save nothing.
    CHECK_REFUSED(d.in(mode_sense6(0x08, 3)), sense::kSavingParametersNotSupported);

    CHECK_REFUSED(d.in(mode_sense6(0x01)), sense::kInvalidFieldInCdb);  // read-write error recovery: not ours
    CHECK_REFUSED(d.in(mode_sense6(0x1c)), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.in(mode_sense6(0x08, 0, 255, 0, 0x01)), sense::kInvalidFieldInCdb);  // subpage
    CHECK_REFUSED(d.in(mode_sense6(0x08, 0, 255, 0, 0xff)), sense::kInvalidFieldInCdb);  // only with 0x3f
    CHECK_REFUSED(d.in(mode_sense6(0x3f, 0, 255, 0, 0x01)), sense::kInvalidFieldInCdb);

    // Allocation length and buffer size.
    e = d.in(mode_sense6(0x08, 0, 4), 4096);
    CHECK(e.data_in == Bytes{3 + 8 + 20, 0, 0x10, 8});
    CHECK(e.residual == 4092);
    e = d.in(mode_sense6(0x08), 6);
    CHECK(e.data_in.size() == 6);
    CHECK(e.residual == 0);

    // MODE SENSE(10): 8-byte header; LLBAA gives a 16-byte descriptor.
    e = d.in(mode_sense10(0x08));
    expected = {0, 6 + 8 + 20, 0, 0x10, 0, 0, 0, 8, 0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00, 0x08, 0x12, 0x04};
    expected.resize(8 + 8 + 20);
    CHECK(e.data_in == expected);
    e = d.in(mode_sense10(0x08, 0, 1024, 0x10));
    expected = {0, 6 + 16 + 20, 0, 0x10, 0x01, 0, 0, 16,  // LONGLBA
                0, 0, 0, 0, 0, 0, 0x08, 0x00, 0, 0, 0, 0, 0, 0, 0x02, 0x00, 0x08, 0x12, 0x04};
    expected.resize(8 + 16 + 20);
    CHECK(e.data_in == expected);
    e = d.in(mode_sense10(0x0a, 0, 1024, 0x18));  // LLBAA with DBD: no descriptor
    CHECK(e.data_in == Bytes{0, 6 + 12, 0, 0x10, 0, 0, 0, 0, 0x0a, 0x0a, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0});
    e = d.in(mode_sense10(0x3f, 0, 10));
    CHECK(e.data_in.size() == 10);
    CHECK(be(e.data_in, 0, 2) == 6 + 8 + 20 + 12);  // the full length, whatever is returned
    CHECK_REFUSED(d.in(mode_sense10(0x08, 3)), sense::kSavingParametersNotSupported);
    CHECK_REFUSED(d.in(mode_sense10(0x00)), sense::kInvalidFieldInCdb);

    // Read-only: WP in the header.
    TestDisk ro(test_options(), true);
    CHECK(ro.in(mode_sense6(0x08)).data_in[2] == 0x90);
    CHECK(ro.in(mode_sense10(0x08)).data_in[3] == 0x90);
}

TEST_CASE("scsi MODE SELECT: the write cache, and a write gaining a flush")
{
    TestDisk d;
    const Bytes block(kBlock, 1);
    CHECK(d.scsi.write_cache());

    // Turn the write cache off, as Linux's sd does for cache_type "write through".
    const Bytes off = mode_list6({}, caching_page(false));
    auto e = d.out(mode_select6(off.size()), off);
    CHECK_GOOD(e);
    CHECK(e.io.empty());
    CHECK(e.residual == 0);
    CHECK_FALSE(d.scsi.write_cache());
    CHECK(d.in(mode_sense6(0x08, 0, 255, 0x08)).data_in[4 + 2] == 0);
    CHECK(d.in(mode_sense6(0x08, 2, 255, 0x08)).data_in[4 + 2] == 0x04);  // the default is still on
    CHECK(d.in(mode_sense6(0x08, 1, 255, 0x08)).data_in[4 + 2] == 0x04);
    {
        // A logical unit reset brings the default back.
        TestDisk other;
        CHECK(other.out(mode_select6(off.size()), off).status == kStatusGood);
        CHECK_FALSE(other.scsi.write_cache());
        other.scsi.reset();
        CHECK(other.scsi.write_cache());
        CHECK_REFUSED(other.in(mode_sense6(0x08, 0, 255, 0x08)), sense::kLogicalUnitResetOccurred);
        const Execution sensed = other.in(mode_sense6(0x08, 0, 255, 0x08));
        REQUIRE(sensed.data_in.size() > 4 + 2);
        CHECK(sensed.data_in[4 + 2] == 0x04);
    }

    // Now every write is followed by a flush.
    e = d.out(rw10(0x2a, 0, 1), block);
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, 0, kBlock});
    CHECK(e.io[1] == IoStep{IoOp::kFlush, 0, 0});
    e = d.out(rw10(0x2a, 0, 1, 0x08), block);  // FUA too: one flush
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[1].op == IoOp::kFlush);
    CHECK(d.in(rw10(0x28, 0, 1), kBlock).io.size() == 1);  // reads are not flushed

    // Back on, with MODE SELECT(10), a block descriptor and the control page.
    Bytes on{0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00};
    const Bytes caching = caching_page(true), control = control_page();
    on.insert(on.end(), caching.begin(), caching.end());
    on.insert(on.end(), control.begin(), control.end());
    e = d.out(mode_select10(on.size()), on);
    CHECK_GOOD(e);
    CHECK(d.scsi.write_cache());
    e = d.out(rw10(0x2a, 0, 1), block);
    CHECK(e.io.size() == 1);

    // The parameter list may be shorter than the buffers: the rest is residual.
    Bytes padded = off;
    padded.resize(100);
    e = d.out(mode_select6(off.size()), padded);
    CHECK_GOOD(e);
    CHECK(e.residual == 100 - off.size());
    CHECK_FALSE(d.scsi.write_cache());

    // A list gathered from several iovecs.
    const Bytes on6 = mode_list6({}, caching_page(true));
    e = d.out(mode_select6(on6.size()),
              std::vector<Bytes>{Bytes(on6.begin(), on6.begin() + 3), Bytes(on6.begin() + 3, on6.begin() + 7),
                                 Bytes(on6.begin() + 7, on6.end())});
    CHECK_GOOD(e);
    CHECK(d.scsi.write_cache());

    // The PS bit is reserved in MODE SELECT: Linux clears it, others may not.
    Bytes with_ps = mode_list6({}, caching_page(false));
    with_ps[4] |= 0x80;
    CHECK_GOOD(d.out(mode_select6(with_ps.size()), with_ps));
    CHECK_FALSE(d.scsi.write_cache());

    // A read-only disk can still change its cache setting.
    TestDisk ro(test_options(), true);
    CHECK_GOOD(ro.out(mode_select6(off.size()), off));
    CHECK_FALSE(ro.scsi.write_cache());
}

TEST_CASE("scsi cache modes: the WCE the guest sees first, the flushes writes get, unsafe's flushes go nowhere")
{
    const Bytes block(kBlock, 1);
    const Bytes off = mode_list6({}, caching_page(false)), on = mode_list6({}, caching_page(true));
    struct Case {
        CacheMode cache;
        bool wce;             // as QEMU: write back but for writethrough and directsync
        bool write_flushed;   // with WCE off, a plain WRITE is followed by a flush
        bool sync_flushes;    // SYNCHRONIZE CACHE reaches the image
    };
    for (const Case c : {Case{CacheMode::kWriteback, true, true, true}, Case{CacheMode::kWritethrough, false, false, true},
                         Case{CacheMode::kUnsafe, true, false, false}}) {
        CAPTURE(cache_mode_name(c.cache));
        TestDisk d(test_options(), false, kDiskBlocks * kBlock, c.cache);
        CHECK(d.scsi.write_cache() == c.wce);
        CHECK(d.in(mode_sense6(0x08, 0, 255, 0x08)).data_in.at(4 + 2) == (c.wce ? 0x04 : 0));  // current
        CHECK(d.in(mode_sense6(0x08, 2, 255, 0x08)).data_in.at(4 + 2) == (c.wce ? 0x04 : 0));  // default
        CHECK(d.in(mode_sense6(0x08, 1, 255, 0x08)).data_in.at(4 + 2) == 0x04);                // changeable
        CHECK(d.in(Cdb(0x35, 10), 0).io.size() == (c.sync_flushes ? 1u : 0u));
        CHECK_GOOD(d.in(Cdb(0x91, 16), 0));
        // Write cache on: a write alone; FUA adds a flush (O_DSYNC makes it durable already; unsafe flushes nothing).
        CHECK_GOOD(d.out(mode_select6(on.size()), on));
        CHECK(d.out(rw10(0x2a, 0, 1), block).io.size() == 1);
        CHECK(d.out(rw10(0x2a, 0, 1, 0x08), block).io.size() == (c.write_flushed ? 2u : 1u));
        // Write cache off: a write is durable before GOOD.
        CHECK_GOOD(d.out(mode_select6(off.size()), off));
        auto e = d.out(rw16(0x8a, 1, 1), block);
        CHECK(e.io.size() == (c.write_flushed ? 2u : 1u));
        CHECK(e.io.back().op == (c.write_flushed ? IoOp::kFlush : IoOp::kWrite));
        // WRITE SAME of zeroes is no O_DSYNC write: it takes the flush unless flushes are ignored.
        e = d.out(Cdb(0x41, 10).set(2, 4, 0).set(7, 2, 8), Bytes(kBlock, 0));
        CHECK(e.io.size() == (c.sync_flushes ? 2u : 1u));
        // A reset brings the cache mode's default back.
        d.scsi.reset();
        CHECK(d.scsi.write_cache() == c.wce);
    }
}

TEST_CASE("scsi detect-zeroes: a WRITE of zeroes only becomes a write-zeroes, or a discard with unmap")
{
    const Bytes zeroes(2 * kBlock, 0);
    Bytes almost = zeroes;
    almost.back() = 1;  // the last byte of the last block
    struct Case {
        DetectZeroes detect;
        Discard discard;
        IoOp zero_op;
    };
    for (const Case c : {Case{DetectZeroes::kOff, Discard::kUnmap, IoOp::kWrite},
                         Case{DetectZeroes::kOn, Discard::kUnmap, IoOp::kWriteZeroes},
                         Case{DetectZeroes::kUnmap, Discard::kUnmap, IoOp::kDiscard},
                         Case{DetectZeroes::kUnmap, Discard::kIgnore, IoOp::kWriteZeroes}}) {
        CAPTURE(detect_zeroes_name(c.detect));
        ScsiDiskOptions options = test_options();
        options.detect_zeroes = c.detect;
        options.discard = c.discard;
        TestDisk d(options);
        for (const Bytes& cdb : {rw10(0x2a, 4, 2), rw16(0x8a, 4, 2), Cdb(0x0a, 6).set(1, 3, 4).set(4, 1, 2).bytes,
                                 Cdb(0xaa, 12).set(2, 4, 4).set(6, 4, 2).bytes}) {
            auto e = d.out(cdb, zeroes);
            CHECK_GOOD(e);
            REQUIRE(e.io.size() == 1);
            CHECK(e.io[0] == IoStep{c.zero_op, 4 * kBlock, 2 * kBlock});
            // One non-zero byte anywhere, or zeroes split over buffers: as they are.
            e = d.out(cdb, almost);
            REQUIRE(e.io.size() == 1);
            CHECK(e.io[0] == IoStep{IoOp::kWrite, 4 * kBlock, 2 * kBlock});
            e = d.out(cdb, std::vector<Bytes>{Bytes(3, 0), Bytes(2 * kBlock - 3, 0)});
            REQUIRE(e.io.size() == 1);
            CHECK(e.io[0].op == c.zero_op);
        }
        // Reads of course stay reads; with the write cache off the zero write is flushed.
        CHECK(d.in(rw10(0x28, 4, 2), 2 * kBlock).io.at(0).op == IoOp::kRead);
        const Bytes off = mode_list6({}, caching_page(false));
        CHECK_GOOD(d.out(mode_select6(off.size()), off));
        auto e = d.out(rw10(0x2a, 4, 2), zeroes);
        REQUIRE(e.io.size() == 2);
        CHECK(e.io[0].op == c.zero_op);
        CHECK(e.io[1].op == IoOp::kFlush);
    }
}

TEST_CASE("scsi MODE SELECT refusals")
{
    TestDisk d;
    const Bytes off = mode_list6({}, caching_page(false));
    auto refused = [&](const Bytes& cdb, const Bytes& list, const Sense& s) {
        CHECK_REFUSED(d.out(cdb, list), s);
        CHECK(d.scsi.write_cache());  // nothing applied
    };

    refused(mode_select6(off.size(), 0x00), off, sense::kInvalidFieldInCdb);  // PF 0
    refused(mode_select6(off.size(), 0x11), off, sense::kInvalidFieldInCdb);  // SP 1: nothing can be saved
    refused(mode_select10(off.size() + 4, 0x01), off, sense::kInvalidFieldInCdb);

    CHECK_OVERRUN(d.out(mode_select6(off.size() + 1), off));  // the list is longer than the buffers
    CHECK_OVERRUN(d.out(mode_select6(off.size()), std::vector<Bytes>{off}, 16));  // data-in buffers
    auto e = d.out(mode_select6(0), Bytes{});  // nothing to select: not an error
    CHECK_GOOD(e);
    CHECK(d.scsi.write_cache());

    // Truncations: header, descriptor, page header, page.
    refused(mode_select6(3), off, sense::kParameterListLengthError);
    refused(mode_select10(7), Bytes(8), sense::kParameterListLengthError);
    const Bytes with_descriptor = mode_list6({0, 0, 0, 0, 0, 0, 2, 0}, caching_page(false));
    refused(mode_select6(10), with_descriptor, sense::kParameterListLengthError);
    refused(mode_select6(5), off, sense::kParameterListLengthError);
    refused(mode_select6(off.size() - 1), off, sense::kParameterListLengthError);

    // Header and block descriptor contents.
    Bytes medium = off;
    medium[1] = 0x01;  // medium type
    refused(mode_select6(medium.size()), medium, sense::kInvalidFieldInParameterList);
    Bytes odd_descriptor_length = mode_list6(Bytes(4), caching_page(false));
    refused(mode_select6(odd_descriptor_length.size()), odd_descriptor_length, sense::kInvalidFieldInParameterList);
    const Bytes block_4k = mode_list6({0, 0, 0, 0, 0, 0, 0x10, 0}, caching_page(false));
    refused(mode_select6(block_4k.size()), block_4k, sense::kInvalidFieldInParameterList);
    const Bytes resize = mode_list6({0, 0, 0x10, 0, 0, 0, 2, 0}, caching_page(false));
    refused(mode_select6(resize.size()), resize, sense::kInvalidFieldInParameterList);
    // The current block count, or zero ("keep it"), with 512-byte blocks, is fine.
    const Bytes same = mode_list6({0, 0, 0x08, 0, 0, 0, 2, 0}, caching_page(true));
    CHECK_GOOD(d.out(mode_select6(same.size()), same));
    CHECK_GOOD(d.out(mode_select6(with_descriptor.size()), with_descriptor));
    CHECK_FALSE(d.scsi.write_cache());
    const Bytes on = mode_list6({}, caching_page(true));
    CHECK_GOOD(d.out(mode_select6(on.size()), on));
    REQUIRE(d.scsi.write_cache());

    // Caching page: any bit but WCE must stay as it is.
    Bytes rcd = mode_list6({}, caching_page(false));
    rcd[4 + 2] |= 0x01;  // RCD: read cache off
    refused(mode_select6(rcd.size()), rcd, sense::kInvalidFieldInParameterList);
    Bytes segments = mode_list6({}, caching_page(false));
    segments[4 + 13] = 4;
    refused(mode_select6(segments.size()), segments, sense::kInvalidFieldInParameterList);
    Bytes short_page = mode_list6({}, Bytes{0x08, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
    refused(mode_select6(short_page.size()), short_page, sense::kInvalidFieldInParameterList);
    Bytes subpage_format = mode_list6({}, caching_page(false));
    subpage_format[4] |= 0x40;
    refused(mode_select6(subpage_format.size()), subpage_format, sense::kInvalidFieldInParameterList);

    // Control page: accepted unchanged only.
    const Bytes control = mode_list6({}, control_page());
    CHECK_GOOD(d.out(mode_select6(control.size()), control));
    Bytes d_sense = control;
    d_sense[4 + 2] = 0x04;  // D_SENSE: we only do fixed format
    refused(mode_select6(d_sense.size()), d_sense, sense::kInvalidFieldInParameterList);

    // Other pages.
    refused(mode_select6(8), mode_list6({}, {0x01, 0x02, 0, 0}), sense::kInvalidFieldInParameterList);

    // A good caching page followed by a bad page: nothing is applied.
    Bytes half_bad = mode_list6({}, caching_page(false));
    half_bad.insert(half_bad.end(), {0x1c, 0x02, 0, 0});
    refused(mode_select6(half_bad.size()), half_bad, sense::kInvalidFieldInParameterList);
}

TEST_CASE("scsi UNMAP")
{
    TestDisk d;
    const Bytes one = unmap_list({{16, 8}});
    auto e = d.out(unmap_cdb(one.size()), one);
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kDiscard, 16 * kBlock, 8 * kBlock});
    CHECK(e.residual == 0);

    // Several descriptors, an empty one skipped; buffer larger than the list.
    Bytes three = unmap_list({{0, 1}, {100, 0}, {kDiskBlocks - 4, 4}});
    const size_t length = three.size();
    three.resize(length + 40);
    e = d.out(unmap_cdb(length), std::vector<Bytes>{Bytes(three.begin(), three.begin() + 20),
                                                      Bytes(three.begin() + 20, three.end())});
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0] == IoStep{IoOp::kDiscard, 0, kBlock});
    CHECK(e.io[1] == IoStep{IoOp::kDiscard, (kDiskBlocks - 4) * kBlock, 4 * kBlock});
    CHECK(e.residual == 40);

    // An incomplete trailing descriptor is ignored (SBC-3).
    Cdb partial(0, 8 + 16 + 8);
    partial.set(0, 2, 6 + 24).set(2, 2, 24).set(8, 8, 5).set(16, 4, 1).set(24, 8, 9);
    e = d.out(unmap_cdb(partial.bytes.size()), partial.bytes);
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kDiscard, 5 * kBlock, kBlock});

    // No parameter data, or no descriptors: nothing to do.
    e = d.out(unmap_cdb(0), Bytes{});
    CHECK_GOOD(e);
    CHECK(e.io.empty());
    e = d.out(unmap_cdb(8), unmap_list({}));
    CHECK_GOOD(e);
    CHECK(e.io.empty());

    CHECK_REFUSED(d.out(unmap_cdb(one.size(), 0x01), one), sense::kInvalidFieldInCdb);  // ANCHOR
    CHECK_REFUSED(d.out(unmap_cdb(7), one), sense::kParameterListLengthError);
    CHECK_REFUSED(d.out(unmap_cdb(1), one), sense::kParameterListLengthError);
    Bytes bad = one;
    bad[1] = 40;  // UNMAP DATA LENGTH past the list
    CHECK_REFUSED(d.out(unmap_cdb(bad.size()), bad), sense::kParameterListLengthError);
    bad = one;
    bad[3] = 32;  // descriptors past the data length
    CHECK_REFUSED(d.out(unmap_cdb(bad.size()), bad), sense::kParameterListLengthError);
    CHECK_REFUSED(d.out(unmap_cdb(one.size() - 1), one), sense::kParameterListLengthError);  // cut list

    const Bytes past_end = unmap_list({{0, 1}, {kDiskBlocks - 1, 2}});
    CHECK_REFUSED(d.out(unmap_cdb(past_end.size()), past_end), sense::kLbaOutOfRange);
    const Bytes wraps = unmap_list({{~0ull, 2}});
    CHECK_REFUSED(d.out(unmap_cdb(wraps.size()), wraps), sense::kLbaOutOfRange);

    CHECK_OVERRUN(d.out(unmap_cdb(one.size() + 1), one));
    CHECK_OVERRUN(d.out(unmap_cdb(one.size()), std::vector<Bytes>{one}, 8));

    TestDisk ro(test_options(), true);
    CHECK_REFUSED(ro.out(unmap_cdb(one.size()), one), sense::kWriteProtected);

    ScsiDiskOptions ignore = test_options();
    ignore.discard = Discard::kIgnore;
    TestDisk plain(ignore);
    e = plain.out(unmap_cdb(one.size()), one);
    CHECK_GOOD(e);
    CHECK(e.io.empty());
    // ... still checked.
    CHECK_REFUSED(plain.out(unmap_cdb(past_end.size()), past_end), sense::kLbaOutOfRange);
}

TEST_CASE("scsi UNMAP limits of VPD 0xB0")
{
    // A disk large enough to unmap more than 1 GiB in one go.
    TestDisk big(test_options(), false, 4ull << 30);
    const uint64_t max_blocks = 2097152;
    const Bytes at_limit = unmap_list({{0, static_cast<uint32_t>(max_blocks)}});
    CHECK_GOOD(big.out(unmap_cdb(at_limit.size()), at_limit));
    const Bytes over = unmap_list({{0, static_cast<uint32_t>(max_blocks + 1)}});
    CHECK_REFUSED(big.out(unmap_cdb(over.size()), over), sense::kInvalidFieldInParameterList);
    const Bytes over_in_total = unmap_list({{0, static_cast<uint32_t>(max_blocks)}, {max_blocks, 1}});
    CHECK_REFUSED(big.out(unmap_cdb(over_in_total.size()), over_in_total), sense::kInvalidFieldInParameterList);

    std::vector<std::pair<uint64_t, uint32_t>> ranges;
    for (uint64_t i = 0; i < 257; ++i)
        ranges.push_back({i * 8, 1});
    const Bytes too_many = unmap_list(ranges);
    CHECK_REFUSED(big.out(unmap_cdb(too_many.size()), too_many), sense::kInvalidFieldInParameterList);
    ranges.pop_back();
    const Bytes most = unmap_list(ranges);
    const auto e = big.out(unmap_cdb(most.size()), most);
    CHECK_GOOD(e);
    CHECK(e.io.size() == 256);
}

TEST_CASE("scsi WRITE SAME 10 and 16")
{
    TestDisk d;
    const Bytes zero(kBlock, 0);
    Bytes pattern(kBlock, 0);
    pattern[511] = 0xaa;
    auto ws10 = [](uint32_t lba, uint16_t blocks, uint8_t flags = 0) {
        return Bytes(Cdb(0x41, 10).set(1, 1, flags).set(2, 4, lba).set(7, 2, blocks));
    };
    auto ws16 = [](uint64_t lba, uint32_t blocks, uint8_t flags = 0) {
        return Bytes(Cdb(0x93, 16).set(1, 1, flags).set(2, 8, lba).set(10, 4, blocks));
    };

    // Zeroes with UNMAP: deallocate (reads back zero).
    auto e = d.out(ws16(8, 100, 0x08), zero);
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kDiscard, 8 * kBlock, 100 * kBlock});
    CHECK(e.residual == 0);
    // Zeroes without UNMAP: write zeroes.
    e = d.out(ws10(8, 100), zero);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kWriteZeroes, 8 * kBlock, 100 * kBlock});

    // A pattern: writes of the repeated block, 1024 blocks at most each.
    e = d.out(ws16(1, 2047), pattern);  // to the last block
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, kBlock, 1024 * kBlock, true});
    CHECK(e.io[1] == IoStep{IoOp::kWrite, 1025 * kBlock, 1023 * kBlock, true});
    e = d.out(ws10(3, 2, 0x08), pattern);  // UNMAP, but the data is not zero
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, 3 * kBlock, 2 * kBlock, true});
    // Only the first block is the data; more data-out is residual.
    Bytes two_blocks = pattern;
    two_blocks.resize(2 * kBlock, 0x11);
    e = d.out(ws10(3, 2), two_blocks);
    CHECK(e.residual == kBlock);
    // The block gathered across iovecs: its last byte decides that it is not zero.
    e = d.out(ws10(0, 1, 0x08), std::vector<Bytes>{Bytes(500, 0), Bytes(11, 0), Bytes{0xaa}});
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0].op == IoOp::kWrite);

    // Discard ignored: zeroes are written.
    ScsiDiskOptions ignore = test_options();
    ignore.discard = Discard::kIgnore;
    TestDisk plain(ignore);
    e = plain.out(ws16(8, 4, 0x08), zero);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kWriteZeroes, 8 * kBlock, 4 * kBlock});

    // Refusals.
    CHECK_REFUSED(d.out(ws10(0, 0), zero), sense::kInvalidFieldInCdb);  // "to the end": not supported
    CHECK_REFUSED(d.out(ws16(0, 0, 0x08), zero), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(d.out(ws10(0, 1, 0x10), zero), sense::kInvalidFieldInCdb);  // ANCHOR
    CHECK_REFUSED(d.out(ws10(0, 1, 0x04), zero), sense::kInvalidFieldInCdb);  // PBDATA
    CHECK_REFUSED(d.out(ws10(0, 1, 0x02), zero), sense::kInvalidFieldInCdb);  // LBDATA
    CHECK_REFUSED(d.out(ws16(0, 1, 0x01), zero), sense::kInvalidFieldInCdb);  // NDOB
    CHECK_REFUSED(d.out(ws16(0, 1, 0x20), zero), sense::kInvalidFieldInCdb);  // WRPROTECT
    CHECK_REFUSED(d.out(ws16(kDiskBlocks - 1, 2), zero), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.out(ws16(~0ull, 2), zero), sense::kLbaOutOfRange);
    CHECK_OVERRUN(d.out(ws10(0, 1), Bytes(kBlock - 1)));
    CHECK_OVERRUN(d.out(ws10(0, 1), std::vector<Bytes>{zero}, kBlock));
    TestDisk ro(test_options(), true);
    CHECK_REFUSED(ro.out(ws10(0, 1), zero), sense::kWriteProtected);
    CHECK_REFUSED(ro.out(ws16(0, 1, 0x08), zero), sense::kWriteProtected);

    {
        TestDisk big(test_options(), false, 4ull << 30);
        CHECK_REFUSED(big.out(ws16(0, 2097152 + 1, 0x08), zero), sense::kInvalidFieldInCdb);  // over the maximum
        e = big.out(ws16(0, 2097152), pattern);
        CHECK_GOOD(e);
        CHECK(e.io.size() == 2048);
    }

    // With the write cache off, a flush follows.
    const Bytes off = mode_list6({}, caching_page(false));
    REQUIRE(d.out(mode_select6(off.size()), off).status == kStatusGood);
    e = d.out(ws16(8, 4, 0x08), zero);
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0].op == IoOp::kDiscard);
    CHECK(e.io[1] == IoStep{IoOp::kFlush, 0, 0});
    e = d.out(ws10(0, 1025), pattern);
    REQUIRE(e.io.size() == 3);
    CHECK(e.io[2].op == IoOp::kFlush);
}

// A 4Kn disk: what a LUN over a 4 KiB-sector host device opened `direct`
// looks like (DiskImage::alignment() 4096), here set through the options
// since the test host has no such device. Every LBA and length is in 4096-byte blocks.
namespace {
constexpr uint64_t kBlock4k = 4096;
constexpr uint64_t kDiskBlocks4k = kDiskBlocks * kBlock / kBlock4k;  // 256: the same 1 MiB

ScsiDiskOptions options_4k()
{
    ScsiDiskOptions o = test_options();
    o.block_size = kBlock4k;
    return o;
}
}  // namespace

TEST_CASE("scsi 4096-byte logical blocks: capacity, limits and mode pages")
{
    TestDisk d(options_4k());
    CHECK(d.scsi.block_size() == kBlock4k);
    CHECK(d.scsi.blocks() == kDiskBlocks4k);

    auto e = d.in(Cdb(0x25, 10), 8);
    CHECK_GOOD(e);
    CHECK(e.data_in == Bytes{0, 0, 0, 0xff, 0, 0, 0x10, 0x00});  // last LBA 255, 4096-byte blocks

    e = d.in(Cdb(0x9e, 16).set(1, 1, 0x10).set(10, 4, 32), 32);
    CHECK_GOOD(e);
    Bytes expected(32);
    expected[7] = 0xff;
    expected[10] = 0x10;
    expected[14] = 0xc0;  // LBPME, LBPRZ; one logical block per physical block (byte 13 is 0)
    CHECK(e.data_in == expected);

    // Block limits: the maximum transfer length is the options' blocks; the
    // byte limits (128 KiB optimal, 1 GiB unmap and write same, 4 KiB unmap granularity) in 4096-byte blocks.
    e = d.in(inquiry(true, 0xb0));
    REQUIRE(e.data_in.size() == 64);
    CHECK(be(e.data_in, 8, 4) == 1024);
    CHECK(be(e.data_in, 12, 4) == 32);
    CHECK(be(e.data_in, 20, 4) == 262144);
    CHECK(be(e.data_in, 28, 4) == 1);
    CHECK(be(e.data_in, 32, 4) == 0x80000000u);
    CHECK(be(e.data_in, 36, 8) == 262144);

    // Block descriptors, short and long.
    e = d.in(mode_sense6(0x08));
    REQUIRE(e.data_in.size() >= 12);
    CHECK(Bytes(e.data_in.begin() + 4, e.data_in.begin() + 12) == Bytes{0, 0, 0x01, 0x00, 0, 0, 0x10, 0x00});
    e = d.in(mode_sense10(0x08, 0, 1024, 0x10));  // LLBAA
    REQUIRE(e.data_in.size() >= 24);
    CHECK(e.data_in[4] == 0x01);  // LONGLBA
    CHECK(be(e.data_in, 8, 8) == kDiskBlocks4k);
    CHECK(be(e.data_in, 20, 4) == kBlock4k);

    // MODE SELECT takes a block descriptor only with our block length.
    const Bytes caching = caching_page(false);
    const Bytes ours = mode_list6({0, 0, 0x01, 0x00, 0, 0, 0x10, 0x00}, caching);
    CHECK_GOOD(d.out(mode_select6(ours.size()), ours));
    CHECK_FALSE(d.scsi.write_cache());
    const Bytes sectors = mode_list6({0, 0, 0, 0, 0, 0, 0x02, 0x00}, caching_page(true));  // 0 blocks: any capacity
    CHECK_REFUSED(d.out(mode_select6(sectors.size()), sectors), sense::kInvalidFieldInParameterList);
    CHECK_FALSE(d.scsi.write_cache());
}

TEST_CASE("scsi 4096-byte logical blocks: reads, writes and their buffers")
{
    TestDisk d(options_4k());
    const Bytes data(4 * kBlock4k, 0x5a);

    auto e = d.in(rw10(0x28, 10, 2), 2 * kBlock4k);  // READ(10) of LBA 10: bytes 40960..
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, 10 * kBlock4k, 2 * kBlock4k});
    CHECK(e.residual == 0);
    e = d.in(Cdb(0x08, 6).set(1, 3, 5).set(4, 1, 1), kBlock4k);  // READ(6)
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, 5 * kBlock4k, kBlock4k});
    e = d.in(Cdb(0xa8, 12).set(2, 4, 100).set(6, 4, 3), 3 * kBlock4k);  // READ(12)
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, 100 * kBlock4k, 3 * kBlock4k});
    e = d.in(rw16(0x88, kDiskBlocks4k - 1, 1), kBlock4k);  // READ(16), the last block
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, (kDiskBlocks4k - 1) * kBlock4k, kBlock4k});

    e = d.out(rw10(0x2a, 3, 4), data);  // WRITE(10)
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, 3 * kBlock4k, 4 * kBlock4k});
    e = d.out(rw16(0x8a, 7, 1, 0x08), data);  // WRITE(16) FUA
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, 7 * kBlock4k, kBlock4k});
    CHECK(e.io[1] == IoStep{IoOp::kFlush, 0, 0});
    CHECK(e.residual == 3 * kBlock4k);

    // Buffers that do not hold the whole blocks asked for: overrun, nothing done.
    CHECK_OVERRUN(d.in(rw10(0x28, 0, 1), 512));                       // a 512-byte read
    CHECK_OVERRUN(d.in(rw10(0x28, 0, 2), 2 * kBlock4k - 512));
    CHECK_OVERRUN(d.out(rw10(0x2a, 0, 1), Bytes(kBlock4k - 512)));    // a 512-byte short write
    CHECK_OVERRUN(d.out(rw10(0x2a, 0, 2), Bytes(kBlock4k + 512)));
    // Buffers larger than the blocks: the part past them is residual, and no more is moved.
    e = d.in(rw10(0x28, 0, 1), kBlock4k + 512);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kRead, 0, kBlock4k});
    CHECK(e.residual == 512);

    // Range and transfer limits count 4096-byte blocks.
    CHECK_REFUSED(d.in(rw10(0x28, kDiskBlocks4k - 1, 2), 2 * kBlock4k), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.in(rw10(0x28, kDiskBlocks4k, 1), kBlock4k), sense::kLbaOutOfRange);
    CHECK_REFUSED(d.in(rw10(0x28, 1000, 1), kBlock4k), sense::kLbaOutOfRange);  // an LBA a 512-byte disk has
    CHECK_GOOD(d.in(rw10(0x28, kDiskBlocks4k, 0), 0));
    TestDisk big(options_4k(), false, 8 << 20);
    CHECK_GOOD(big.in(rw10(0x28, 0, 1024), 1024 * kBlock4k));
    CHECK_REFUSED(big.in(rw10(0x28, 0, 1025), 1025 * kBlock4k), sense::kInvalidFieldInCdb);

    // SYNCHRONIZE CACHE and VERIFY ranges.
    CHECK(d.in(Cdb(0x91, 16).set(2, 8, kDiskBlocks4k - 1).set(10, 4, 1), 0).io.size() == 1);
    CHECK_REFUSED(d.in(Cdb(0x35, 10).set(2, 4, kDiskBlocks4k - 1).set(7, 2, 2), 0), sense::kLbaOutOfRange);
    CHECK_GOOD(d.in(Cdb(0x8f, 16).set(10, 4, kDiskBlocks4k), 0));
    CHECK_REFUSED(d.in(Cdb(0x2f, 10).set(7, 2, kDiskBlocks4k + 1), 0), sense::kLbaOutOfRange);
}

TEST_CASE("scsi 4096-byte logical blocks: WRITE SAME and UNMAP")
{
    TestDisk d(options_4k(), false, 8 << 20);  // 2048 blocks
    const Bytes zero(kBlock4k, 0);
    Bytes pattern(kBlock4k, 0);
    pattern[kBlock4k - 1] = 0xaa;  // past the first 512 bytes: the whole block is the data
    auto ws16 = [](uint64_t lba, uint32_t blocks, uint8_t flags = 0) {
        return Bytes(Cdb(0x93, 16).set(1, 1, flags).set(2, 8, lba).set(10, 4, blocks));
    };

    auto e = d.out(ws16(8, 100, 0x08), zero);
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kDiscard, 8 * kBlock4k, 100 * kBlock4k});
    e = d.out(Cdb(0x41, 10).set(2, 4, 8).set(7, 2, 3), zero);  // WRITE SAME(10), no UNMAP
    REQUIRE(e.io.size() == 1);
    CHECK(e.io[0] == IoStep{IoOp::kWriteZeroes, 8 * kBlock4k, 3 * kBlock4k});
    e = d.out(ws16(1, 2047, 0x08), pattern);  // 1024 repeated blocks at most per step
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0] == IoStep{IoOp::kWrite, kBlock4k, 1024 * kBlock4k, true});
    CHECK(e.io[1] == IoStep{IoOp::kWrite, 1025 * kBlock4k, 1023 * kBlock4k, true});
    CHECK(e.residual == 0);
    Bytes block_and_more = pattern;
    block_and_more.resize(kBlock4k + 512);
    CHECK(d.out(ws16(0, 1), block_and_more).residual == 512);
    // Less than a whole block of data.
    CHECK_OVERRUN(d.out(ws16(0, 1), Bytes(512, 0)));
    CHECK_OVERRUN(d.out(ws16(0, 1), Bytes(kBlock4k - 1, 0)));
    CHECK_REFUSED(d.out(ws16(2047, 2), zero), sense::kLbaOutOfRange);
    {
        TestDisk huge(options_4k(), false, 4ull << 30);
        CHECK_REFUSED(huge.out(ws16(0, 262144 + 1, 0x08), zero), sense::kInvalidFieldInCdb);  // 1 GiB
        CHECK_GOOD(huge.out(ws16(0, 262144, 0x08), zero));
    }

    const Bytes list = unmap_list({{1, 2}, {100, 0}, {2040, 8}});
    e = d.out(unmap_cdb(list.size()), list);
    CHECK_GOOD(e);
    REQUIRE(e.io.size() == 2);
    CHECK(e.io[0] == IoStep{IoOp::kDiscard, kBlock4k, 2 * kBlock4k});
    CHECK(e.io[1] == IoStep{IoOp::kDiscard, 2040 * kBlock4k, 8 * kBlock4k});
    const Bytes past_end = unmap_list({{2047, 2}});
    CHECK_REFUSED(d.out(unmap_cdb(past_end.size()), past_end), sense::kLbaOutOfRange);
    TestDisk huge(options_4k(), false, 4ull << 30);
    const Bytes at_limit = unmap_list({{0, 262144}});
    CHECK_GOOD(huge.out(unmap_cdb(at_limit.size()), at_limit));
    const Bytes over = unmap_list({{0, 262144}, {262144, 1}});
    CHECK_REFUSED(huge.out(unmap_cdb(over.size()), over), sense::kInvalidFieldInParameterList);
}

TEST_CASE("scsi logical block size: from the image, or a valid one from the options")
{
    TempDir dir;
    const auto path = dir.sparse_file("disk.img", 1 << 20);
    // Buffered, or O_DIRECT with 512-byte alignment (a regular file): 512, as always.
    for (const bool direct : {false, true}) {
        const DiskImage image = DiskImage::open({path, false, direct ? CacheMode::kNone : CacheMode::kWriteback});
        CHECK(ScsiDisk::block_size_for(image) == 512);
        CHECK(ScsiDisk(image, test_options()).block_size() == 512);
    }
    const DiskImage image = DiskImage::open({path, false});
    for (const uint32_t size : {512u, 1024u, 4096u, 65536u}) {
        ScsiDiskOptions o = test_options();
        o.block_size = size;
        CHECK(ScsiDisk(image, o).block_size() == size);
    }
    for (const uint32_t size : {256u, 520u, 3072u, 131072u}) {
        CAPTURE(size);
        ScsiDiskOptions o = test_options();
        o.block_size = size;
        CHECK(lkvm::test::error_of([&] { [[maybe_unused]] ScsiDisk disk(image, o); }).find("logical block size") !=
              std::string::npos);
    }
}

// Found by tests/fuzz/fuzz_scsi.cc: a 1 KiB image with 4 KiB blocks (a small
// file opened `direct` on a 4 KiB-sector host) had no block, and READ
// CAPACITY(10) answered 0xffffffff ("ask READ CAPACITY(16)"), which then gave
// 2^64 - 1 as the last LBA.
TEST_CASE("scsi a disk smaller than one logical block is refused")
{
    TempDir dir;
    const DiskImage image = DiskImage::open({dir.sparse_file("tiny.img", 1024), false});
    ScsiDiskOptions o = test_options();
    o.block_size = 4096;
    CHECK(lkvm::test::error_of([&] { [[maybe_unused]] ScsiDisk disk(image, o); }).find("less than one logical block") !=
          std::string::npos);
    o.block_size = 1024;  // exactly one block: LBA 0 is the last
    ScsiDisk disk(image, o);
    CHECK(disk.execute(std::vector<uint8_t>{0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0}, {}, 8).data_in ==
          Bytes{0, 0, 0, 0, 0, 0, 0x04, 0x00});
}

TEST_CASE("scsi REPORT LUNS")
{
    const uint16_t luns[] = {0, 1, 255, 256, 0x3fff, 0x4000};
    auto cdb = [](uint8_t select, uint32_t allocation_length) {
        return Bytes(Cdb(0xa0, 12).set(2, 1, select).set(6, 4, allocation_length));
    };
    auto e = report_luns(cdb(0, 4096), luns, 4096);
    CHECK_GOOD(e);
    const Bytes expected{0, 0, 0, 40, 0, 0, 0, 0,
                         0x00, 0x00, 0, 0, 0, 0, 0, 0,   // peripheral device addressing
                         0x00, 0x01, 0, 0, 0, 0, 0, 0,
                         0x00, 0xff, 0, 0, 0, 0, 0, 0,
                         0x41, 0x00, 0, 0, 0, 0, 0, 0,   // flat space addressing
                         0x7f, 0xff, 0, 0, 0, 0, 0, 0};  // 0x4000 cannot be addressed: left out
    CHECK(e.data_in == expected);
    CHECK(e.residual == 4096 - expected.size());
    CHECK(report_luns(cdb(2, 4096), luns, 4096).data_in == expected);
    CHECK(report_luns(cdb(1, 4096), luns, 4096).data_in == Bytes(8));  // no well-known LUNs

    e = report_luns(cdb(0, 16), luns, 4096);  // allocation length: the list length stays whole
    CHECK(e.data_in == Bytes(expected.begin(), expected.begin() + 16));
    CHECK(e.residual == 4080);
    e = report_luns(cdb(0, 4096), luns, 20);
    CHECK(e.data_in == Bytes(expected.begin(), expected.begin() + 20));
    CHECK(e.residual == 0);

    CHECK_REFUSED(report_luns(cdb(0, 15), luns, 4096), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(report_luns(cdb(3, 4096), luns, 4096), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(report_luns(cdb(0x10, 4096), luns, 4096), sense::kInvalidFieldInCdb);
    Bytes naca = cdb(0, 4096);
    naca[11] = 0x04;
    CHECK_REFUSED(report_luns(naca, luns, 4096), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(report_luns(Bytes(11, 0xa0), luns, 4096), sense::kInvalidFieldInCdb);
    CHECK(report_luns(cdb(0, 15), luns, 4096).residual == 4096);
}

TEST_CASE("scsi a LUN with no logical unit behind it")
{
    auto e = execute_without_lun(inquiry(false, 0, 96), 4096);
    CHECK_GOOD(e);
    REQUIRE(e.data_in.size() == 36);
    CHECK(e.data_in[0] == 0x7f);
    CHECK(e.data_in[2] == 0x06);
    CHECK(text(e.data_in, 8, 8) == "LKVM    ");
    CHECK(e.residual == 4096 - 36);
    CHECK(execute_without_lun(inquiry(false, 0, 1), 4096).data_in == Bytes{0x7f});
    CHECK_REFUSED(execute_without_lun(inquiry(true, 0x00), 4096), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(execute_without_lun(inquiry(false, 0x80), 4096), sense::kInvalidFieldInCdb);
    CHECK_REFUSED(execute_without_lun(Bytes{0x12, 0, 0, 0, 36}, 4096), sense::kInvalidFieldInCdb);  // short

    e = execute_without_lun(Bytes{0x03, 0, 0, 0, 252, 0}, 4096);
    CHECK_GOOD(e);
    const Bytes lun_not_supported{0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x25, 0, 0, 0, 0, 0};
    CHECK(e.data_in == lun_not_supported);
    CHECK(e.residual == 4096 - 18);
    CHECK(execute_without_lun(Bytes{0x03, 0, 0, 0, 252, 0}, 13).data_in ==
          Bytes(lun_not_supported.begin(), lun_not_supported.begin() + 13));

    CHECK_REFUSED(execute_without_lun(Bytes{0x00, 0, 0, 0, 0, 0}, 0), sense::kLunNotSupported);
    CHECK_REFUSED(execute_without_lun(rw10(0x28, 0, 1), 512), sense::kLunNotSupported);
    CHECK_REFUSED(execute_without_lun(Bytes{0x04, 0, 0, 0, 0, 0}, 0), sense::kLunNotSupported);
    CHECK_REFUSED(execute_without_lun(Bytes{}, 0), sense::kLunNotSupported);
    CHECK(execute_without_lun(rw10(0x28, 0, 1), 512).residual == 512);
}
