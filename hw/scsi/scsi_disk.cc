// The SCSI direct-access block device: SPC-4 and SBC-3 as far as Linux's sd,
// sg3-utils and the SCSI layer's scanning use them. Every handler checks the
// CDB first (ILLEGAL REQUEST), then whether the transfer fits the driver's
// buffers (overrun), then the medium (DATA PROTECT), and only then says what
// data or I/O steps the command comes to.
#include "hw/scsi/scsi_disk.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string_view>
#include <utility>

#include "base/error.h"

namespace lkvm::scsi {

namespace {

namespace op {
constexpr uint8_t kTestUnitReady = 0x00, kRequestSense = 0x03, kRead6 = 0x08, kWrite6 = 0x0a, kInquiry = 0x12,
                  kModeSelect6 = 0x15, kModeSense6 = 0x1a, kStartStopUnit = 0x1b, kReadCapacity10 = 0x25,
                  kRead10 = 0x28, kWrite10 = 0x2a, kVerify10 = 0x2f, kSynchronizeCache10 = 0x35,
                  kWriteSame10 = 0x41, kUnmap = 0x42, kModeSelect10 = 0x55, kModeSense10 = 0x5a, kRead16 = 0x88,
                  kWrite16 = 0x8a, kVerify16 = 0x8f, kSynchronizeCache16 = 0x91, kWriteSame16 = 0x93,
                  kServiceActionIn16 = 0x9e, kReportLuns = 0xa0, kRead12 = 0xa8, kWrite12 = 0xaa;
}  // namespace op

constexpr uint8_t kReadCapacity16ServiceAction = 0x10;
constexpr uint8_t kPeripheralDisk = 0x00;        // peripheral qualifier 0, direct-access block device
constexpr uint8_t kPeripheralNotPresent = 0x7f;  // qualifier 3 (no LU can be here), type 0x1f (unknown)

constexpr std::string_view kVendor = "LKVM    ";           // 8 bytes, space padded
constexpr std::string_view kProduct = "VIRTUAL DISK    ";   // 16
constexpr std::string_view kRevision = "0001";              // 4

constexpr uint8_t kModePageCaching = 0x08, kModePageControl = 0x0a, kModePageAll = 0x3f;
constexpr uint8_t kAllSubpages = 0xff;
constexpr uint8_t kWce = 0x04;          // caching page, byte 2
constexpr uint8_t kWriteProtect = 0x80, kDpoFua = 0x10;  // mode parameter header, device-specific byte

constexpr uint32_t kMinBlockSize = DiskImage::kSectorSize, kMaxBlockSize = 64 << 10;

// Block limits (VPD 0xB0), in bytes: each disk reports them in its own
// blocks. The optimal transfer length is a sizing hint: long enough that
// per-request costs stay small, short enough not to inflate the guest's
// readahead (Linux reads ahead up to twice the optimal size).
constexpr uint64_t kOptimalTransferBytes = 128 << 10;
constexpr uint64_t kMaxUnmapBytes = 1u << 30;  // per UNMAP
constexpr uint32_t kMaxUnmapDescriptors = 256;
constexpr uint64_t kUnmapGranularityBytes = 4096;  // host filesystems free whole 4 KiB blocks
constexpr uint64_t kMaxWriteSameBytes = 1u << 30;
// The transport gives every repeated block of a WRITE SAME its own iovec: at most IOV_MAX.
constexpr uint64_t kMaxWriteSameBlocksPerStep = 1024;

// The T10 vendor ID designator holds vendor and serial behind a one-byte length.
constexpr size_t kMaxSerialBytes = 255 - kVendor.size();

// Which way a command moves data: the other direction's buffers are an overrun.
enum class Direction { kNone, kIn, kOut };

// PC field of MODE SENSE.
enum class PageControl : uint8_t { kCurrent = 0, kChangeable = 1, kDefault = 2, kSaved = 3 };

// Big-endian fields of `bytes`; callers have checked the span holds them.
uint64_t get_be(std::span<const uint8_t> bytes, size_t at, size_t width)
{
    assert(at + width <= bytes.size());
    uint64_t value = 0;
    for (size_t i = 0; i < width; ++i)
        value = value << 8 | bytes[at + i];
    return value;
}

void put_be(std::span<uint8_t> bytes, size_t at, size_t width, uint64_t value)
{
    assert(at + width <= bytes.size());
    for (size_t i = width; i-- > 0; value >>= 8)
        bytes[at + i] = static_cast<uint8_t>(value);
}

void put_text(std::span<uint8_t> bytes, size_t at, std::string_view text)
{
    assert(at + text.size() <= bytes.size());
    std::memcpy(bytes.data() + at, text.data(), text.size());
}

// The CDB length SPC-4 gives the opcode's group; 0 for the reserved and vendor-specific groups.
size_t cdb_length(uint8_t opcode)
{
    switch (opcode >> 5) {
    case 0: return 6;
    case 1: case 2: return 10;
    case 4: return 16;
    case 5: return 12;
    default: return 0;
    }
}

// The checks every CDB of a known opcode passes: it is as long as its group
// says, and it does not ask for ACA, which we do not support (NormACA is 0 in INQUIRY).
std::optional<Sense> cdb_error(std::span<const uint8_t> cdb)
{
    const size_t length = cdb.empty() ? 0 : cdb_length(cdb[0]);
    if (length == 0 || cdb.size() < length)
        return sense::kInvalidFieldInCdb;
    constexpr uint8_t kNaca = 0x04;
    if (cdb[length - 1] & kNaca)
        return sense::kInvalidFieldInCdb;
    return std::nullopt;
}

Execution check_condition(const Sense& sense, uint64_t buffer_bytes)
{
    Execution e;
    e.status = kStatusCheckCondition;
    e.sense = sense;
    e.residual = buffer_bytes;
    return e;
}

// Data-in for the driver: no more than the allocation length asks for, nor
// than its buffers hold.
Execution returned_data(std::vector<uint8_t> data, uint64_t allocation_length, uint64_t data_in_bytes)
{
    data.resize(std::min<uint64_t>({data.size(), allocation_length, data_in_bytes}));
    Execution e;
    e.residual = data_in_bytes - data.size();
    e.data_in = std::move(data);
    return e;
}

std::vector<uint8_t> standard_inquiry(uint8_t peripheral)
{
    std::vector<uint8_t> data(36);
    data[0] = peripheral;
    data[2] = 0x06;                      // SPC-4
    data[3] = 0x10 | 0x02;               // HiSup (LUNs in hierarchical format), response data format 2
    data[4] = static_cast<uint8_t>(data.size() - 5);
    data[7] = 0x02;                      // CmdQue: commands run concurrently
    put_text(data, 8, kVendor);
    put_text(data, 16, kProduct);
    put_text(data, 32, kRevision);
    return data;
}

// INQUIRY, for a logical unit and an absent one alike: CmdDt is obsolete
// (SPC-4), and a page code means nothing without EVPD.
constexpr uint8_t kEvpd = 0x01, kCmdDt = 0x02;
bool inquiry_cdb_valid(std::span<const uint8_t> cdb)
{
    return !(cdb[1] & kCmdDt) && ((cdb[1] & kEvpd) || cdb[2] == 0);
}

// REQUEST SENSE: we only produce fixed-format sense data.
bool descriptor_sense_requested(std::span<const uint8_t> cdb) { return cdb[1] & 0x01; }

std::vector<uint8_t> sense_data(const Sense& sense)
{
    const auto fixed = fixed_sense(sense);
    return {fixed.begin(), fixed.end()};
}

uint64_t total_bytes(std::span<const iovec> iovs)
{
    uint64_t total = 0;
    for (const iovec& v : iovs)
        total += v.iov_len;
    return total;
}

// The first `bytes` of the data-out buffers, copied out (never reading past
// any iovec); the caller has checked that the buffers hold that many.
std::vector<uint8_t> gather(std::span<const iovec> iovs, size_t bytes)
{
    std::vector<uint8_t> out(bytes);
    size_t done = 0;
    for (const iovec& v : iovs) {
        const size_t n = std::min(v.iov_len, bytes - done);
        if (n == 0)
            break;
        std::memcpy(out.data() + done, v.iov_base, n);
        done += n;
    }
    return out;
}

// FNV-1a: a stable 64-bit digest of the serial for the EUI-64 designator.
uint64_t fnv1a(std::string_view text)
{
    uint64_t hash = 0xcbf29ce484222325ull;
    for (unsigned char c : text)
        hash = (hash ^ c) * 0x100000001b3ull;
    return hash;
}

std::vector<uint8_t> vpd_page(uint8_t code, size_t length)
{
    std::vector<uint8_t> page(4 + length);
    page[1] = code;
    put_be(page, 2, 2, length);
    return page;
}

}  // namespace

std::array<uint8_t, kFixedSenseBytes> fixed_sense(const Sense& sense)
{
    std::array<uint8_t, kFixedSenseBytes> data{};
    data[0] = 0x70;  // current error, fixed format
    data[2] = sense.key;
    data[7] = kFixedSenseBytes - 8;  // additional sense length
    data[12] = sense.asc;
    data[13] = sense.ascq;
    return data;
}

Sense io_error_sense(IoOp op, int64_t error)
{
    if (op == IoOp::kRead)
        return sense::kUnrecoveredReadError;
    // A buffered write's ENOSPC may only show up at the flush that writes it back.
    if (error == -ENOSPC)
        return sense::kSpaceAllocationFailed;
    return sense::kWriteError;
}

// One CDB on its way through a logical unit: its fields, the driver's
// buffers, and one handler per command.
struct ScsiDisk::Command {
    ScsiDisk& disk;
    std::span<const uint8_t> cdb;  // exactly the opcode's CDB length
    std::span<const iovec> data_out;
    uint64_t data_out_bytes;
    uint64_t data_in_bytes;

    using Handler = Execution (Command::*)();
    struct Entry {
        uint8_t opcode;
        Direction data;
        Handler run;
    };
    static const Entry* find(uint8_t opcode);

    Execution test_unit_ready() { return done(0); }
    Execution request_sense();
    Execution inquiry();
    Execution read_capacity_10();
    Execution service_action_in_16();
    Execution mode_sense();
    Execution mode_select();
    Execution start_stop_unit();
    Execution read_write();
    Execution synchronize_cache();
    Execution verify();
    Execution unmap();
    Execution write_same();

    // Results. The residual is whatever part of the driver's buffers (either
    // direction: the direction check leaves at most one) the command leaves unused.
    uint64_t buffer_bytes() const { return data_in_bytes + data_out_bytes; }
    Execution fail(const Sense& sense) const { return check_condition(sense, buffer_bytes()); }
    Execution overrun() const
    {
        Execution e;
        e.overrun = true;
        e.residual = buffer_bytes();
        return e;
    }
    Execution done(uint64_t used_bytes) const
    {
        Execution e;
        e.residual = buffer_bytes() - used_bytes;
        return e;
    }
    Execution reply(std::vector<uint8_t> data, uint64_t allocation_length) const
    {
        return returned_data(std::move(data), allocation_length, data_in_bytes);
    }

    uint64_t field(size_t at, size_t width) const { return get_be(cdb, at, width); }
    // The LBA and block count fields at the places SBC-3 gives them in each
    // CDB length. READ(6)/WRITE(6) count 0 as 256 blocks.
    std::pair<uint64_t, uint64_t> lba_and_blocks() const;
    uint32_t block_size() const { return disk.block_size_; }
    // A byte limit in this disk's blocks, at least one.
    uint64_t blocks_in(uint64_t bytes) const { return std::max<uint64_t>(1, bytes / block_size()); }
    bool in_range(uint64_t lba, uint64_t blocks) const
    {
        return lba <= disk.blocks() && blocks <= disk.blocks() - lba;
    }
    // A write is on stable storage before GOOD when the command asks (FUA)
    // or the write cache is off: O_DSYNC makes plain writes so by
    // themselves, anything else takes a flush after it. unsafe flushes nothing.
    void make_durable(Execution& e, bool fua) const
    {
        if ((!fua && disk.write_cache()) || disk.image_.flushes_ignored())
            return;
        if (disk.image_.writes_durable() && std::ranges::all_of(e.io, [](const IoStep& s) { return s.op == IoOp::kWrite; }))
            return;
        e.io.push_back({.op = IoOp::kFlush});
    }

    std::optional<std::vector<uint8_t>> vpd(uint8_t code) const;
    std::string_view serial() const;
    std::vector<uint8_t> caching_page(PageControl pc) const;
    static std::vector<uint8_t> control_page(PageControl pc);
    std::optional<Sense> apply_mode_parameters(std::span<const uint8_t> list, bool ten);
};

const ScsiDisk::Command::Entry* ScsiDisk::Command::find(uint8_t opcode)
{
    using C = Command;
    using enum Direction;
    static constexpr Entry kCommands[] = {
        {op::kTestUnitReady, kNone, &C::test_unit_ready},
        {op::kRequestSense, kIn, &C::request_sense},
        {op::kRead6, kIn, &C::read_write},
        {op::kWrite6, kOut, &C::read_write},
        {op::kInquiry, kIn, &C::inquiry},
        {op::kModeSelect6, kOut, &C::mode_select},
        {op::kModeSense6, kIn, &C::mode_sense},
        {op::kStartStopUnit, kNone, &C::start_stop_unit},
        {op::kReadCapacity10, kIn, &C::read_capacity_10},
        {op::kRead10, kIn, &C::read_write},
        {op::kWrite10, kOut, &C::read_write},
        {op::kVerify10, kNone, &C::verify},
        {op::kSynchronizeCache10, kNone, &C::synchronize_cache},
        {op::kWriteSame10, kOut, &C::write_same},
        {op::kUnmap, kOut, &C::unmap},
        {op::kModeSelect10, kOut, &C::mode_select},
        {op::kModeSense10, kIn, &C::mode_sense},
        {op::kRead16, kIn, &C::read_write},
        {op::kWrite16, kOut, &C::read_write},
        {op::kVerify16, kNone, &C::verify},
        {op::kSynchronizeCache16, kNone, &C::synchronize_cache},
        {op::kWriteSame16, kOut, &C::write_same},
        {op::kServiceActionIn16, kIn, &C::service_action_in_16},
        {op::kRead12, kIn, &C::read_write},
        {op::kWrite12, kOut, &C::read_write},
    };
    for (const Entry& entry : kCommands)
        if (entry.opcode == opcode)
            return &entry;
    return nullptr;
}

uint32_t ScsiDisk::block_size_for(const DiskImage& image)
{
    return std::max(kMinBlockSize, image.alignment());
}

ScsiDisk::ScsiDisk(const DiskImage& image, ScsiDiskOptions options)
    : image_(image),
      options_(std::move(options)),
      block_size_(options_.block_size ? options_.block_size : block_size_for(image)),
      write_cache_(image.write_cache_default())
{
    // Smaller than the alignment, every I/O of a block would fail with EINVAL.
    if (!std::has_single_bit(block_size_) || block_size_ < kMinBlockSize || block_size_ > kMaxBlockSize ||
        block_size_ % image.alignment() != 0)
        throw Error("disk " + image.path() + ": logical block size " + std::to_string(block_size_) +
                    " must be a power of two from 512 to 65536 bytes and a multiple of the image's O_DIRECT "
                    "alignment, " + std::to_string(image.alignment()));
    // No block at all: READ CAPACITY's "last LBA" would be blocks() - 1, wrapped around.
    if (blocks() == 0)
        throw Error("disk " + image.path() + ": " + std::to_string(image.size()) +
                    " bytes is less than one logical block of " + std::to_string(block_size_) +
                    " bytes; make the image larger");
}

void ScsiDisk::reset()
{
    write_cache_.store(image_.write_cache_default(), std::memory_order_relaxed);
    raise_unit_attention(sense::kLogicalUnitResetOccurred);
}

void ScsiDisk::raise_unit_attention(const Sense& sense)
{
    unit_attention_.store(uint32_t{sense.key} << 16 | uint32_t{sense.asc} << 8 | sense.ascq, std::memory_order_relaxed);
}

std::optional<Sense> ScsiDisk::take_unit_attention()
{
    // Every command looks: a plain load keeps the line every queue thread reads shared.
    if (unit_attention_.load(std::memory_order_relaxed) == 0)
        return std::nullopt;
    const uint32_t packed = unit_attention_.exchange(0, std::memory_order_relaxed);
    if (packed == 0)
        return std::nullopt;  // another queue's command took it
    return Sense{static_cast<uint8_t>(packed >> 16), static_cast<uint8_t>(packed >> 8), static_cast<uint8_t>(packed)};
}

Execution ScsiDisk::execute(std::span<const uint8_t> cdb, std::span<const iovec> data_out, uint64_t data_in_bytes)
{
    const uint64_t data_out_bytes = total_bytes(data_out);
    // SPC-4 5.14: a unit attention ends the next command, whatever it is,
    // unless it only asks about the unit (INQUIRY; REPORT LUNS, which never
    // reaches here) or for the condition itself (REQUEST SENSE).
    if (!cdb.empty() && cdb[0] != op::kInquiry && cdb[0] != op::kRequestSense)
        if (auto attention = take_unit_attention())
            return check_condition(*attention, data_in_bytes + data_out_bytes);
    const Command::Entry* entry = cdb.empty() ? nullptr : Command::find(cdb[0]);
    if (!entry)
        return check_condition(cdb.empty() ? sense::kInvalidFieldInCdb : sense::kInvalidOpcode,
                               data_in_bytes + data_out_bytes);
    if (auto error = cdb_error(cdb))
        return check_condition(*error, data_in_bytes + data_out_bytes);
    Command command{*this, cdb.first(cdb_length(cdb[0])), data_out, data_out_bytes, data_in_bytes};
    if ((entry->data == Direction::kIn && data_out_bytes != 0) ||
        (entry->data == Direction::kOut && data_in_bytes != 0))
        return command.overrun();
    return (command.*entry->run)();
}

std::pair<uint64_t, uint64_t> ScsiDisk::Command::lba_and_blocks() const
{
    switch (cdb.size()) {
    case 6: {
        const uint64_t blocks = cdb[4];
        return {field(1, 3) & 0x1fffff, blocks == 0 ? 256 : blocks};
    }
    case 10: return {field(2, 4), field(7, 2)};
    case 12: return {field(2, 4), field(6, 4)};
    default: return {field(2, 8), field(10, 4)};
    }
}

Execution ScsiDisk::Command::request_sense()
{
    if (descriptor_sense_requested(cdb))
        return fail(sense::kInvalidFieldInCdb);
    // Every error is reported with its command (autosense): only a unit
    // attention can be pending, and reporting it clears it.
    return reply(sense_data(disk.take_unit_attention().value_or(sense::kNoSense)), cdb[4]);
}

Execution ScsiDisk::Command::inquiry()
{
    if (!inquiry_cdb_valid(cdb))
        return fail(sense::kInvalidFieldInCdb);
    const uint64_t allocation_length = field(3, 2);
    if (!(cdb[1] & kEvpd))
        return reply(standard_inquiry(kPeripheralDisk), allocation_length);
    auto page = vpd(cdb[2]);
    if (!page)
        return fail(sense::kInvalidFieldInCdb);
    return reply(std::move(*page), allocation_length);
}

std::string_view ScsiDisk::Command::serial() const
{
    return std::string_view(disk.options_.serial).substr(0, kMaxSerialBytes);
}

std::optional<std::vector<uint8_t>> ScsiDisk::Command::vpd(uint8_t code) const
{
    const bool unmap = disk.options_.discard == Discard::kUnmap;
    switch (code) {
    case 0x00: {  // supported VPD pages
        static constexpr uint8_t kPages[] = {0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2};
        auto page = vpd_page(code, sizeof kPages);
        std::copy(std::begin(kPages), std::end(kPages), page.begin() + 4);
        return page;
    }
    case 0x80: {  // unit serial number
        auto page = vpd_page(code, serial().size());
        put_text(page, 4, serial());
        return page;
    }
    case 0x83: {  // device identification: two designators of the logical unit
        // An EUI-64 first: Linux makes the disk's wwid of the best designator,
        // and ranks EUI-64 above T10 vendor ID. We own no IEEE company ID, so
        // the digest of the serial is marked locally administered, not multicast.
        const size_t t10_length = kVendor.size() + serial().size();
        auto page = vpd_page(code, 4 + 8 + 4 + t10_length);
        page[4] = 0x01;  // binary
        page[5] = 0x02;  // associated with the logical unit; EUI-64
        page[7] = 8;
        put_be(page, 8, 8, fnv1a(serial()));
        page[8] = static_cast<uint8_t>((page[8] | 0x02) & ~0x01);
        page[16] = 0x02;  // ASCII
        page[17] = 0x01;  // associated with the logical unit; T10 vendor ID
        page[19] = static_cast<uint8_t>(t10_length);
        put_text(page, 20, kVendor);
        put_text(page, 20 + kVendor.size(), serial());
        return page;
    }
    case 0xb0: {  // block limits
        auto page = vpd_page(code, 0x3c);
        page[4] = 0x01;  // WSNZ: WRITE SAME must give a block count (we do not write "to the end")
        put_be(page, 8, 4, disk.options_.max_transfer_blocks);
        put_be(page, 12, 4, std::min<uint64_t>(blocks_in(kOptimalTransferBytes), disk.options_.max_transfer_blocks));
        if (unmap) {
            put_be(page, 20, 4, blocks_in(kMaxUnmapBytes));
            put_be(page, 24, 4, kMaxUnmapDescriptors);
            put_be(page, 28, 4, blocks_in(kUnmapGranularityBytes));
            page[32] = 0x80;  // UGAVALID: the granularity is aligned at LBA 0
        }
        put_be(page, 36, 8, blocks_in(kMaxWriteSameBytes));
        return page;
    }
    case 0xb1: {  // block device characteristics
        auto page = vpd_page(code, 0x3c);
        put_be(page, 4, 2, disk.options_.rotation_rate);
        return page;
    }
    case 0xb2: {  // logical block provisioning
        auto page = vpd_page(code, 4);
        if (unmap) {
            page[5] = 0x80 | 0x40 | 0x20 | 0x04;  // LBPU, LBPWS, LBPWS10, LBPRZ: unmapped blocks read zero
            page[6] = 0x02;                       // thin provisioned
        }
        return page;
    }
    default:
        return std::nullopt;
    }
}

Execution ScsiDisk::Command::read_capacity_10()
{
    // SBC-3: without PMI the LBA field must be zero.
    if (!(cdb[8] & 0x01) && field(2, 4) != 0)
        return fail(sense::kInvalidFieldInCdb);
    std::vector<uint8_t> data(8);
    put_be(data, 0, 4, std::min<uint64_t>(disk.blocks() - 1, 0xffffffff));  // all ones: ask READ CAPACITY(16)
    put_be(data, 4, 4, block_size());
    return reply(std::move(data), 8);  // no allocation length: the 8 bytes are the whole answer
}

Execution ScsiDisk::Command::service_action_in_16()
{
    if ((cdb[1] & 0x1f) != kReadCapacity16ServiceAction)
        return fail(sense::kInvalidFieldInCdb);
    if (!(cdb[14] & 0x01) && field(2, 8) != 0)
        return fail(sense::kInvalidFieldInCdb);
    std::vector<uint8_t> data(32);
    put_be(data, 0, 8, disk.blocks() - 1);
    put_be(data, 8, 4, block_size());
    // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0: the only physical
    // unit we know is the O_DIRECT alignment, and a logical block is never
    // smaller than it (the constructor sees to that).
    if (disk.options_.discard == Discard::kUnmap)
        data[14] = 0x80 | 0x40;  // LBPME, LBPRZ
    return reply(std::move(data), field(10, 4));
}

std::vector<uint8_t> ScsiDisk::Command::caching_page(PageControl pc) const
{
    std::vector<uint8_t> page(2 + 0x12);
    page[0] = kModePageCaching;  // PS 0: nothing is saved
    page[1] = 0x12;
    const bool wce = pc == PageControl::kCurrent      ? disk.write_cache()
                     : pc == PageControl::kChangeable ? true
                                                      : disk.image_.write_cache_default();
    page[2] = wce ? kWce : 0;
    return page;
}

std::vector<uint8_t> ScsiDisk::Command::control_page(PageControl pc)
{
    std::vector<uint8_t> page(2 + 0x0a);
    page[0] = kModePageControl;
    page[1] = 0x0a;
    if (pc != PageControl::kChangeable)
        page[3] = 0x10;  // queue algorithm modifier 1: commands may be reordered (they run on several queues)
    return page;
}

Execution ScsiDisk::Command::mode_sense()
{
    const bool ten = cdb[0] == op::kModeSense10;
    const bool block_descriptor = !(cdb[1] & 0x08);  // DBD
    const bool long_lba = ten && (cdb[1] & 0x10);   // LLBAA
    const auto pc = static_cast<PageControl>(cdb[2] >> 6);
    const uint8_t page_code = cdb[2] & 0x3f, subpage = cdb[3];
    const uint64_t allocation_length = ten ? field(7, 2) : cdb[4];

    if (pc == PageControl::kSaved)
        return fail(sense::kSavingParametersNotSupported);
    if (subpage != 0 && !(page_code == kModePageAll && subpage == kAllSubpages))
        return fail(sense::kInvalidFieldInCdb);
    std::vector<uint8_t> pages;
    if (page_code == kModePageCaching || page_code == kModePageAll) {
        const auto page = caching_page(pc);
        pages.insert(pages.end(), page.begin(), page.end());
    }
    if (page_code == kModePageControl || page_code == kModePageAll) {
        const auto page = control_page(pc);
        pages.insert(pages.end(), page.begin(), page.end());
    }
    if (pages.empty())
        return fail(sense::kInvalidFieldInCdb);

    // The block descriptor's fields cannot be changed: all zero as changeable values.
    std::vector<uint8_t> descriptor(block_descriptor ? (long_lba ? 16 : 8) : 0);
    if (block_descriptor && pc != PageControl::kChangeable) {
        if (long_lba) {
            put_be(descriptor, 0, 8, disk.blocks());
            put_be(descriptor, 12, 4, block_size());
        } else {
            put_be(descriptor, 0, 4, std::min<uint64_t>(disk.blocks(), 0xffffffff));
            put_be(descriptor, 5, 3, block_size());
        }
    }

    const uint8_t device_specific = (disk.image_.read_only() ? kWriteProtect : 0) | kDpoFua;
    std::vector<uint8_t> data(ten ? 8 : 4);
    if (ten) {
        data[3] = device_specific;
        data[4] = descriptor.size() == 16 ? 0x01 : 0;  // LONGLBA
        put_be(data, 6, 2, descriptor.size());
    } else {
        data[2] = device_specific;
        data[3] = static_cast<uint8_t>(descriptor.size());
    }
    data.insert(data.end(), descriptor.begin(), descriptor.end());
    data.insert(data.end(), pages.begin(), pages.end());
    // The mode data length counts the bytes after itself.
    if (ten)
        put_be(data, 0, 2, data.size() - 2);
    else
        data[0] = static_cast<uint8_t>(data.size() - 1);
    return reply(std::move(data), allocation_length);
}

Execution ScsiDisk::Command::mode_select()
{
    const bool ten = cdb[0] == op::kModeSelect10;
    constexpr uint8_t kPageFormat = 0x10, kSavePages = 0x01;
    // SPC-4: SP set on a logical unit that saves no pages is an invalid field in the CDB.
    if (!(cdb[1] & kPageFormat) || (cdb[1] & kSavePages))
        return fail(sense::kInvalidFieldInCdb);
    const uint64_t length = ten ? field(7, 2) : cdb[4];
    if (length > data_out_bytes)
        return overrun();
    if (length == 0)
        return done(0);
    if (auto error = apply_mode_parameters(gather(data_out, length), ten))
        return fail(*error);
    return done(length);
}

// Checks the whole mode parameter list, and only then applies it (a list
// that fails changes nothing).
std::optional<Sense> ScsiDisk::Command::apply_mode_parameters(std::span<const uint8_t> list, bool ten)
{
    const size_t header = ten ? 8 : 4;
    if (list.size() < header)
        return sense::kParameterListLengthError;
    const uint8_t medium_type = list[ten ? 2 : 1];
    const bool long_lba = ten && (list[4] & 0x01);
    const size_t descriptor_length = ten ? get_be(list, 6, 2) : list[3];
    if (medium_type != 0 || (descriptor_length != 0 && descriptor_length != (long_lba ? 16u : 8u)))
        return sense::kInvalidFieldInParameterList;
    if (list.size() < header + descriptor_length)
        return sense::kParameterListLengthError;
    if (descriptor_length != 0) {
        const auto descriptor = list.subspan(header, descriptor_length);
        const uint64_t blocks = long_lba ? get_be(descriptor, 0, 8) : get_be(descriptor, 0, 4);
        const uint64_t block_length = long_lba ? get_be(descriptor, 12, 4) : get_be(descriptor, 5, 3);
        const uint64_t our_blocks = long_lba ? disk.blocks() : std::min<uint64_t>(disk.blocks(), 0xffffffff);
        // Zero blocks leaves the capacity as it is (SBC-3); we cannot resize or reformat.
        if (block_length != block_size() || (blocks != 0 && blocks != our_blocks))
            return sense::kInvalidFieldInParameterList;
    }

    bool wce = disk.write_cache();
    for (size_t at = header + descriptor_length; at < list.size();) {
        if (list.size() - at < 2)
            return sense::kParameterListLengthError;
        const uint8_t code = list[at] & 0x3f;
        const bool subpage_format = list[at] & 0x40;  // the PS bit (0x80) is reserved in MODE SELECT: ignored
        const size_t page_length = 2 + size_t{list[at + 1]};
        if (list.size() - at < page_length)
            return sense::kParameterListLengthError;
        const auto page = list.subspan(at, page_length);
        at += page_length;
        if (subpage_format)
            return sense::kInvalidFieldInParameterList;
        if (code == kModePageCaching) {
            // Only WCE may change; every other field must say what MODE SENSE does.
            const auto current = caching_page(PageControl::kCurrent);
            if (page.size() != current.size() || (page[2] & ~kWce) != (current[2] & ~kWce) ||
                !std::equal(page.begin() + 3, page.end(), current.begin() + 3))
                return sense::kInvalidFieldInParameterList;
            wce = page[2] & kWce;
        } else if (code == kModePageControl) {
            const auto current = control_page(PageControl::kCurrent);
            if (!std::equal(page.begin() + 1, page.end(), current.begin() + 1, current.end()))
                return sense::kInvalidFieldInParameterList;
        } else {
            return sense::kInvalidFieldInParameterList;
        }
    }
    disk.write_cache_.store(wce, std::memory_order_relaxed);
    return std::nullopt;
}

Execution ScsiDisk::Command::start_stop_unit()
{
    // No power conditions; START and LOEJ change nothing on a medium that is always there.
    if (cdb[4] >> 4)
        return fail(sense::kInvalidFieldInCdb);
    return done(0);
}

Execution ScsiDisk::Command::read_write()
{
    const uint8_t opcode = cdb[0];
    const bool write = opcode == op::kWrite6 || opcode == op::kWrite10 || opcode == op::kWrite12 ||
                       opcode == op::kWrite16;
    const bool six = cdb.size() == 6;
    const auto [lba, blocks] = lba_and_blocks();
    // RDPROTECT/WRPROTECT: we keep no protection information.
    if (!six && (cdb[1] >> 5) != 0)
        return fail(sense::kInvalidFieldInCdb);
    const bool fua = !six && (cdb[1] & 0x08);
    if (blocks > disk.options_.max_transfer_blocks)
        return fail(sense::kInvalidFieldInCdb);
    if (!in_range(lba, blocks))
        return fail(sense::kLbaOutOfRange);
    const uint64_t bytes = blocks * block_size();
    if ((write ? data_out_bytes : data_in_bytes) < bytes)
        return overrun();
    if (write && disk.image_.read_only())
        return fail(sense::kWriteProtected);
    Execution e = done(bytes);
    if (blocks == 0)
        return e;
    IoOp io = write ? IoOp::kWrite : IoOp::kRead;
    // detect-zeroes: a write of zeroes only becomes a write-zeroes, or with
    // unmap (and discard=unmap) a hole, off the I/O thread.
    const DetectZeroes detect = disk.options_.detect_zeroes;
    if (write && detect != DetectZeroes::kOff && iovecs_are_zero(data_out, bytes))
        io = detect == DetectZeroes::kUnmap && disk.options_.discard == Discard::kUnmap ? IoOp::kDiscard
                                                                                      : IoOp::kWriteZeroes;
    e.io.push_back({.op = io, .offset = lba * block_size(), .bytes = bytes});
    if (write)
        make_durable(e, fua);
    return e;
}

Execution ScsiDisk::Command::synchronize_cache()
{
    // A block count of 0 means "to the last LBA"; we flush everything either way.
    const auto [lba, blocks] = lba_and_blocks();
    if (!in_range(lba, blocks))
        return fail(sense::kLbaOutOfRange);
    Execution e = done(0);
    if (!disk.image_.flushes_ignored())  // unsafe: GOOD at once, nothing reaches the image
        e.io.push_back({.op = IoOp::kFlush});
    return e;
}

Execution ScsiDisk::Command::verify()
{
    // VRPROTECT: no protection information. BYTCHK asks us to compare the
    // data-out buffer with the medium: that needs the blocks read back into
    // this object, which hands I/O to the transport and never sees its data.
    const uint8_t bytchk = (cdb[1] >> 1) & 0x03;
    if ((cdb[1] >> 5) != 0 || bytchk != 0)
        return fail(sense::kInvalidFieldInCdb);
    // Without BYTCHK there is nothing to check beyond the range: the image has no media errors to find.
    const auto [lba, blocks] = lba_and_blocks();
    if (!in_range(lba, blocks))
        return fail(sense::kLbaOutOfRange);
    return done(0);
}

Execution ScsiDisk::Command::unmap()
{
    if (cdb[1] & 0x01)  // ANCHOR: we have no anchored state
        return fail(sense::kInvalidFieldInCdb);
    const uint64_t length = field(7, 2);
    if (length > data_out_bytes)
        return overrun();
    if (disk.image_.read_only())
        return fail(sense::kWriteProtected);
    if (length == 0)  // SBC-3: no parameter data is not an error
        return done(0);
    if (length < 8)
        return fail(sense::kParameterListLengthError);
    const auto list = gather(data_out, length);
    const uint64_t data_length = get_be(list, 0, 2), descriptors_length = get_be(list, 2, 2);
    if (data_length + 2 > length || descriptors_length + 8 > data_length + 2)
        return fail(sense::kParameterListLengthError);
    // SBC-3: an incomplete last descriptor is ignored.
    const size_t descriptors = descriptors_length / 16;
    const bool unmap = disk.options_.discard == Discard::kUnmap;
    if (unmap && descriptors > kMaxUnmapDescriptors)
        return fail(sense::kInvalidFieldInParameterList);

    Execution e = done(length);
    uint64_t total_blocks = 0;
    for (size_t i = 0; i < descriptors; ++i) {
        const uint64_t lba = get_be(list, 8 + 16 * i, 8), blocks = get_be(list, 16 + 16 * i, 4);
        if (!in_range(lba, blocks))
            return fail(sense::kLbaOutOfRange);
        total_blocks += blocks;
        if (blocks != 0)
            e.io.push_back({.op = IoOp::kDiscard, .offset = lba * block_size(), .bytes = blocks * block_size()});
    }
    if (!unmap)  // discards are only a hint, and this image is not to be deallocated
        e.io.clear();
    else if (total_blocks > blocks_in(kMaxUnmapBytes))
        return fail(sense::kInvalidFieldInParameterList);
    return e;
}

Execution ScsiDisk::Command::write_same()
{
    constexpr uint8_t kUnmapBit = 0x08;
    // Anything but UNMAP: WRPROTECT (no protection information), ANCHOR,
    // PBDATA/LBDATA (we write the block as given) and NDOB.
    if (cdb[1] & ~kUnmapBit)
        return fail(sense::kInvalidFieldInCdb);
    const auto [lba, blocks] = lba_and_blocks();
    // SBC-3 lets 0 mean "to the last LBA"; we do not (VPD 0xB0 says so with WSNZ).
    if (blocks == 0 || blocks > blocks_in(kMaxWriteSameBytes))
        return fail(sense::kInvalidFieldInCdb);
    if (!in_range(lba, blocks))
        return fail(sense::kLbaOutOfRange);
    if (data_out_bytes < block_size())
        return overrun();
    if (disk.image_.read_only())
        return fail(sense::kWriteProtected);

    const auto block = gather(data_out, block_size());
    const bool zeroes = std::all_of(block.begin(), block.end(), [](uint8_t b) { return b == 0; });
    Execution e = done(block_size());
    const uint64_t offset = lba * block_size();
    if (zeroes) {
        // Deallocated blocks read back as zeroes (we advertise LBPRZ), so a
        // zero block may become a discard when the guest allows it.
        const bool deallocate = (cdb[1] & kUnmapBit) && disk.options_.discard == Discard::kUnmap;
        e.io.push_back({.op = deallocate ? IoOp::kDiscard : IoOp::kWriteZeroes,
                        .offset = offset,
                        .bytes = blocks * block_size()});
    } else {
        for (uint64_t done_blocks = 0; done_blocks < blocks; done_blocks += kMaxWriteSameBlocksPerStep) {
            const uint64_t step = std::min(blocks - done_blocks, kMaxWriteSameBlocksPerStep);
            e.io.push_back({.op = IoOp::kWrite,
                            .offset = offset + done_blocks * block_size(),
                            .bytes = step * block_size(),
                            .repeat_first_block = true});
        }
    }
    make_durable(e, /*fua=*/false);  // WRITE SAME has no FUA bit
    return e;
}

Execution report_luns(std::span<const uint8_t> cdb, std::span<const uint16_t> luns, uint64_t data_in_bytes)
{
    if (cdb.empty() || cdb[0] != op::kReportLuns)
        return check_condition(sense::kInvalidOpcode, data_in_bytes);
    if (auto error = cdb_error(cdb))
        return check_condition(*error, data_in_bytes);
    // SELECT REPORT: 0 and 2 all logical units, 1 the well-known ones (we have none).
    const uint8_t select = cdb[2];
    const uint64_t allocation_length = get_be(cdb, 6, 4);
    if (select > 2 || allocation_length < 16)  // SPC-4 refuses room for less than one LUN
        return check_condition(sense::kInvalidFieldInCdb, data_in_bytes);

    std::vector<uint8_t> data(8);
    if (select != 1) {
        for (const uint16_t lun : luns) {
            // Single level: peripheral device addressing below 256 (what Linux
            // builds for those), flat space addressing up to its 14 bits.
            if (lun > 0x3fff)
                continue;
            const uint8_t method = lun < 256 ? 0x00 : 0x40;
            const uint8_t entry[8] = {static_cast<uint8_t>(method | lun >> 8), static_cast<uint8_t>(lun)};
            data.insert(data.end(), std::begin(entry), std::end(entry));
        }
    }
    put_be(data, 0, 4, data.size() - 8);
    return returned_data(std::move(data), allocation_length, data_in_bytes);
}

Execution execute_without_lun(std::span<const uint8_t> cdb, uint64_t data_in_bytes)
{
    const uint8_t opcode = cdb.empty() ? 0xff : cdb[0];
    if (opcode != op::kInquiry && opcode != op::kRequestSense)
        return check_condition(sense::kLunNotSupported, data_in_bytes);
    if (auto error = cdb_error(cdb))
        return check_condition(*error, data_in_bytes);
    if (opcode == op::kInquiry) {
        if (!inquiry_cdb_valid(cdb) || (cdb[1] & kEvpd))  // no vital product data without a logical unit
            return check_condition(sense::kInvalidFieldInCdb, data_in_bytes);
        return returned_data(standard_inquiry(kPeripheralNotPresent), get_be(cdb, 3, 2), data_in_bytes);
    }
    if (descriptor_sense_requested(cdb))
        return check_condition(sense::kInvalidFieldInCdb, data_in_bytes);
    // SPC-4: REQUEST SENSE to a LUN with no logical unit reports it as data, with GOOD.
    return returned_data(sense_data(sense::kLunNotSupported), cdb[4], data_in_bytes);
}

}  // namespace lkvm::scsi
