// The SCSI target as virtio-scsi drives it: a LUN address (parse_scsi_lun),
// then REPORT LUNS, a logical unit's execute() or execute_without_lun(), on
// small temporary images; plus the task management resets between commands.
// Each result is checked against what the transport relies on: data and
// residual within the driver's buffers, and I/O only inside the medium, in
// whole blocks, never a write to a read-only unit; READ CAPACITY telling
// the medium as it is.
//
// Input, repeated: u8 op (mod 4: 0-1 a command, 2 LOGICAL UNIT RESET of LUN
// 0, 3 I_T NEXUS RESET), and for a command 8 LUN bytes, u8 CDB length (mod
// 33), the CDB, u32 data-in bytes (mod 1 MiB), u16 data-out bytes (mod
// 8193), u8 data-out buffer count (mod 4, plus 1), the data-out bytes.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/error.h"
#include "hw/scsi/scsi_disk.h"
#include "tests/fuzz/fuzz_input.h"
#include "virtio/scsi.h"

using namespace lkvm;
using namespace lkvm::scsi;

namespace {
// Not a whole number of 4 KiB blocks: LUN 256 must never reach the tail.
constexpr uint64_t kImageBytes = (1 << 20) + 512;

// Opened once and unlinked at once: the fds keep them, nothing is left behind.
DiskImage temp_image(bool read_only, uint64_t bytes = kImageBytes)
{
    char dir[] = "/tmp/lkvm-fuzz-scsi.XXXXXX";
    FUZZ_CHECK(::mkdtemp(dir));
    const std::string path = std::string(dir) + "/disk.img";
    const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0600);
    FUZZ_CHECK(fd >= 0 && ::ftruncate(fd, bytes) == 0);
    ::close(fd);
    DiskImage image = DiskImage::open({path, read_only});
    ::unlink(path.c_str());
    ::rmdir(dir);
    return image;
}

uint64_t be(const std::vector<uint8_t>& bytes, size_t at, size_t width)
{
    uint64_t value = 0;
    for (size_t i = 0; i < width; ++i)
        value = value << 8 | bytes[at + i];
    return value;
}

void check(std::span<const uint8_t> cdb, const Execution& e, const ScsiDisk* disk, const DiskImage* image, uint64_t in_bytes, uint64_t out_bytes)
{
    FUZZ_CHECK(!cdb.empty() || e.status != kStatusGood);
    FUZZ_CHECK(e.data_in.size() <= in_bytes);
    FUZZ_CHECK(e.residual <= in_bytes + out_bytes);
    if (e.overrun || e.status != kStatusGood)
        FUZZ_CHECK(e.io.empty() && e.data_in.empty() && !(e.overrun && e.status != kStatusGood));
    // READ CAPACITY: the last LBA the medium has, in the disk's block size.
    const bool rc10 = !cdb.empty() && cdb[0] == 0x25, rc16 = !cdb.empty() && cdb[0] == 0x9e;
    if (disk && (rc10 || rc16) && e.status == kStatusGood && e.data_in.size() >= (rc10 ? 8u : 12u)) {
        const uint64_t last = rc10 ? be(e.data_in, 0, 4) : be(e.data_in, 0, 8);
        FUZZ_CHECK(be(e.data_in, rc10 ? 4 : 8, 4) == disk->block_size());
        FUZZ_CHECK(rc10 && last == 0xffffffff ? disk->blocks() > last : last < disk->blocks() && last + 1 == disk->blocks());
    }
    for (const IoStep& step : e.io) {
        FUZZ_CHECK(disk && e.data_in.empty());
        if (step.op == IoOp::kFlush)
            continue;
        const uint64_t block = disk->block_size();
        FUZZ_CHECK(step.bytes > 0 && step.offset % block == 0 && step.bytes % block == 0);
        FUZZ_CHECK(step.offset <= disk->blocks() * block && step.bytes <= disk->blocks() * block - step.offset);
        FUZZ_CHECK(step.op == IoOp::kRead || !image->read_only());
        if (step.op == IoOp::kRead)
            FUZZ_CHECK(step.bytes <= in_bytes);
        if (step.op == IoOp::kWrite)
            FUZZ_CHECK(step.repeat_first_block ? out_bytes >= block : step.bytes <= out_bytes);
    }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    static const DiskImage rw = temp_image(false), ro = temp_image(true), tiny = temp_image(false, 1024);
    // LUN 0 and 1 as lkvm's defaults make them, 256 (flat addressing) with 4 KiB blocks and a small transfer limit.
    ScsiDisk lun0(rw, {.serial = "fuzz0"});
    ScsiDisk lun1(ro, {.serial = std::string(300, 's'), .rotation_rate = 1, .discard = Discard::kIgnore});
    ScsiDisk lun256(rw, {.max_transfer_blocks = 8, .block_size = 4096});
    // LUN 2: an image smaller than one of its blocks (a 4 KiB-sector host,
    // `direct`), if the disk takes it at all.
    std::optional<ScsiDisk> lun2;
    try {
        lun2.emplace(tiny, ScsiDiskOptions{.block_size = 4096});
    } catch (const Error&) {
    }
    const uint16_t luns[] = {0, 1, 2, 256};

    fuzz::Input in(data, size);
    while (!in.empty()) {
        const uint8_t op = in.u8() % 4;
        if (op == 2) {
            lun0.reset();
            continue;
        }
        if (op == 3) {
            lun0.nexus_lost();
            continue;
        }
        uint8_t lun[8];
        const auto lun_bytes = in.bytes(8);
        std::fill(std::copy(lun_bytes.begin(), lun_bytes.end(), lun), std::end(lun), 0);
        const auto cdb = in.bytes(in.u8() % 33);
        const uint64_t in_bytes = in.u32() % (1 << 20);
        const size_t out_bytes = in.u16() % 8193;
        const unsigned buffers = in.u8() % 4 + 1;
        // Data-out in separate heap blocks, as the guest's buffers are separate.
        std::vector<std::unique_ptr<uint8_t[]>> blocks;
        std::vector<iovec> data_out;
        for (unsigned i = 0; i < buffers && out_bytes; ++i) {
            const size_t len = i + 1 < buffers ? out_bytes / buffers : out_bytes - out_bytes / buffers * i;
            if (len == 0)
                continue;
            auto& block = blocks.emplace_back(std::make_unique<uint8_t[]>(len));
            const auto bytes = in.bytes(len);
            std::copy(bytes.begin(), bytes.end(), block.get());
            data_out.push_back({block.get(), len});
        }

        const auto address = parse_scsi_lun(lun);
        if (!address || address->target != 0)
            continue;  // BAD_TARGET, answered by the transport alone
        FUZZ_CHECK(address->lun <= virtio_scsi::kMaxLun);
        ScsiDisk* const by_lun[] = {&lun0, &lun1, lun2 ? &*lun2 : nullptr};
        ScsiDisk* disk = address->lun < 3 ? by_lun[address->lun] : address->lun == 256 ? &lun256 : nullptr;
        const DiskImage* image = address->lun == 1 ? &ro : address->lun == 2 ? &tiny : &rw;
        // The transport hands REPORT LUNS and absent units data-in only.
        if (!cdb.empty() && cdb[0] == 0xa0)
            check(cdb, report_luns(cdb, luns, in_bytes), nullptr, nullptr, in_bytes, 0);
        else if (disk)
            check(cdb, disk->execute(cdb, data_out, in_bytes), disk, image, in_bytes, out_bytes);
        else
            check(cdb, execute_without_lun(cdb, in_bytes), nullptr, nullptr, in_bytes, 0);
    }
    return 0;
}
