// A SCSI direct-access block device (SBC-3 / SPC-4, the subset Linux's sd and
// sg3-utils use) over a DiskImage: what each CDB means, the checks it must
// pass, the data it returns and the sense it raises. It knows nothing of
// virtio, and it never performs disk I/O itself: it says which I/O steps the
// transport must run, so that the I/O stays on the thread and engine that
// serve the queue the command came in on.
#pragma once

#include <sys/uio.h>

#include <boost/container/small_vector.hpp>

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "disk/disk_image.h"
#include "disk/io_engine.h"

namespace lkvm::scsi {

// SAM-5 status codes.
constexpr uint8_t kStatusGood = 0x00, kStatusCheckCondition = 0x02;

// Sense key, additional sense code and qualifier.
struct Sense {
    uint8_t key = 0, asc = 0, ascq = 0;
    bool operator==(const Sense&) const = default;
};
namespace sense {
constexpr Sense kNoSense{0x00, 0x00, 0x00};
constexpr Sense kUnrecoveredReadError{0x03, 0x11, 0x00};
constexpr Sense kWriteError{0x03, 0x0c, 0x00};
constexpr Sense kParameterListLengthError{0x05, 0x1a, 0x00};
constexpr Sense kInvalidOpcode{0x05, 0x20, 0x00};
constexpr Sense kLbaOutOfRange{0x05, 0x21, 0x00};
constexpr Sense kInvalidFieldInCdb{0x05, 0x24, 0x00};
constexpr Sense kLunNotSupported{0x05, 0x25, 0x00};
constexpr Sense kInvalidFieldInParameterList{0x05, 0x26, 0x00};
constexpr Sense kSavingParametersNotSupported{0x05, 0x39, 0x00};
constexpr Sense kLogicalUnitResetOccurred{0x06, 0x29, 0x03};  // unit attentions
constexpr Sense kItNexusLossOccurred{0x06, 0x29, 0x07};
constexpr Sense kWriteProtected{0x07, 0x27, 0x00};
constexpr Sense kSpaceAllocationFailed{0x07, 0x27, 0x07};
}  // namespace sense

// Fixed-format sense data (SPC-4 4.5.3), current error, 18 bytes.
constexpr size_t kFixedSenseBytes = 18;
std::array<uint8_t, kFixedSenseBytes> fixed_sense(const Sense& sense);

// The sense a failed I/O step raises; `error` is the engine's -errno or a short count.
Sense io_error_sense(IoOp op, int64_t error);

enum class Discard { kUnmap, kIgnore };

struct ScsiDiskOptions {
    std::string serial;              // VPD 0x80, and the vendor-specific designator of 0x83
    uint16_t rotation_rate = 0;      // VPD 0xB1: 0 not reported, 1 non-rotating (SSD), else RPM
    Discard discard = Discard::kUnmap;
    uint32_t max_transfer_blocks = 1u << 16;  // VPD 0xB0 MAXIMUM TRANSFER LENGTH; more is refused
    // The logical block size; 0: ScsiDisk::block_size_for(image). Else a power
    // of two from 512 to 64 KiB that the image's O_DIRECT alignment divides.
    uint32_t block_size = 0;
    DetectZeroes detect_zeroes = DetectZeroes::kOff;  // for WRITE(6/10/12/16)
};

// One I/O the command needs. Steps run in order, each once the previous one
// succeeded; the first that fails ends the command with io_error_sense().
struct IoStep {
    IoOp op = IoOp::kRead;
    uint64_t offset = 0;  // bytes into the image
    uint64_t bytes = 0;   // kRead/kWrite: the command's data buffers, from their start
    // kWrite of WRITE SAME: the first block of the data-out buffer, repeated to fill `bytes`.
    bool repeat_first_block = false;
};

// A read or write with FUA is two steps: kept inline, so that the request
// path does not allocate for them.
using IoSteps = boost::container::small_vector<IoStep, 2>;

// What executing a CDB comes to.
struct Execution {
    uint8_t status = kStatusGood;
    Sense sense;                   // with kStatusCheckCondition
    // The data transfer the command asked for does not fit the driver's
    // buffers, or goes the other way (a transport failure, not a SCSI status:
    // virtio-scsi answers it with VIRTIO_SCSI_S_OVERRUN and no data).
    bool overrun = false;
    std::vector<uint8_t> data_in;  // returned data, already cut to allocation length and buffer size
    IoSteps io;                    // disk I/O to run; GOOD when all of it succeeds
    // Bytes of the driver's buffers the command does not use (data-in or data-out): the residual.
    uint64_t residual = 0;
};

// A logical unit. execute() is called from whichever I/O thread serves the
// queue a command arrived on, so everything it changes (the write cache
// setting) is atomic.
class ScsiDisk {
public:
    // Throws lkvm::Error for a block size the options cannot have.
    ScsiDisk(const DiskImage& image, ScsiDiskOptions options);

    // A logical block must hold whole units of O_DIRECT I/O, as a real 4Kn
    // disk's do: the image's alignment where that is more than 512 bytes (a
    // 4 KiB-sector host device opened `direct`), else 512.
    static uint32_t block_size_for(const DiskImage& image);

    // cdb: the command as the driver sent it (the transport may pass more
    // bytes than the opcode's CDB length). data_out: the data-out buffers
    // (parameter lists are read from them). data_in_bytes: the size of the
    // data-in buffers. REPORT LUNS is not handled here: see report_luns().
    Execution execute(std::span<const uint8_t> cdb, std::span<const iovec> data_out, uint64_t data_in_bytes);

    // LOGICAL UNIT RESET (SAM-5 6.3.4): mode parameters go back to their
    // defaults (none are saved), so the write cache is as the cache mode
    // says again (DiskImage::write_cache_default()), and the next
    // command learns of the reset through a unit attention.
    void reset();
    // I_T NEXUS RESET (SAM-5 6.3.5): only the unit attention.
    void nexus_lost() { raise_unit_attention(sense::kItNexusLossOccurred); }

    uint32_t block_size() const { return block_size_; }
    // Bytes past the last whole block (an image that is not a multiple of the block size) are not addressable.
    uint64_t blocks() const { return image_.size() / block_size_; }
    bool write_cache() const { return write_cache_.load(std::memory_order_relaxed); }

private:
    struct Command;  // one CDB being executed, and the handler of each opcode (scsi_disk.cc)
    void raise_unit_attention(const Sense& sense);
    std::optional<Sense> take_unit_attention();

    const DiskImage& image_;
    ScsiDiskOptions options_;
    uint32_t block_size_;
    // WCE: the cache mode's default; MODE SELECT may switch it. Off, a write
    // is durable before GOOD (O_DSYNC, or a flush after it).
    std::atomic<bool> write_cache_;
    // The pending unit attention (SAM-5 5.14) as key << 16 | asc << 8 | ascq; 0: none.
    // One initiator (the driver), so one condition; a newer one replaces it.
    std::atomic<uint32_t> unit_attention_{0};
};

// REPORT LUNS for any LUN of a target, existing or not; `luns` are the
// target's logical units (single-level, flat addressing).
Execution report_luns(std::span<const uint8_t> cdb, std::span<const uint16_t> luns, uint64_t data_in_bytes);

// Any other command to a LUN with no logical unit behind it: INQUIRY answers
// "not connected" (peripheral qualifier 3, type 0x1f), REQUEST SENSE reports
// LUN NOT SUPPORTED as data, everything else is refused with it.
Execution execute_without_lun(std::span<const uint8_t> cdb, uint64_t data_in_bytes);

}  // namespace lkvm::scsi
