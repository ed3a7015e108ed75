// virtio-blk request framing and checks (frame_blk_request,
// check_blk_request, check_blk_range) on chains built from the input, each buffer a heap
// block of its own so that ASan sees any byte taken from outside them.
//
// Input: u64 capacity in sectors, u8 read-only (bit 0), u8 readable and u8
// writable buffer counts (each mod 8), then per buffer a u16 length (mod
// 4097) followed, for a readable buffer, by its bytes.
#include <memory>
#include <vector>

#include "tests/fuzz/fuzz_input.h"
#include "virtio/blk.h"

using namespace lkvm;

namespace {
bool inside(const iovec& v, const std::vector<std::unique_ptr<uint8_t[]>>& blocks, const std::vector<size_t>& sizes)
{
    const auto* p = static_cast<const uint8_t*>(v.iov_base);
    for (size_t i = 0; i < blocks.size(); ++i)
        if (p >= blocks[i].get() && v.iov_len <= sizes[i] && p <= blocks[i].get() + sizes[i] - v.iov_len)
            return true;
    return false;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    fuzz::Input in(data, size);
    const uint64_t capacity = in.u64();
    const bool read_only = in.u8() & 1;
    const unsigned readable = in.u8() % 8, writable = in.u8() % 8;

    // What walk_chain hands a device: readable buffers first, none empty.
    std::vector<std::unique_ptr<uint8_t[]>> blocks;
    std::vector<size_t> sizes;
    Chain chain;
    for (unsigned i = 0; i < readable + writable; ++i) {
        const size_t len = in.u16() % 4097;
        if (len == 0)
            continue;
        auto& block = blocks.emplace_back(std::make_unique<uint8_t[]>(len));
        sizes.push_back(len);
        const bool is_writable = i >= readable;
        if (!is_writable) {
            const auto bytes = in.bytes(len);
            std::copy(bytes.begin(), bytes.end(), block.get());
        }
        (is_writable ? chain.writable : chain.readable).push_back({block.get(), len});
        (is_writable ? chain.writable_bytes : chain.readable_bytes) += len;
    }
    const Chain original = chain;

    auto framed = frame_blk_request(chain);
    if (!framed) {
        FUZZ_CHECK(original.writable_bytes == 0);
        return 0;
    }
    const BlkRequest& request = *framed;
    const iovec& last = original.writable.back();
    FUZZ_CHECK(request.status == static_cast<uint8_t*>(last.iov_base) + last.iov_len - 1);
    *request.status = kBlkSOk;
    FUZZ_CHECK(request.header_complete == (original.readable_bytes >= 16));
    if (!request.header_complete)
        return 0;

    uint64_t data_bytes = 0;
    for (const iovec& v : request.data) {
        FUZZ_CHECK(inside(v, blocks, sizes));
        // Never the status byte: the device writes data and status apart.
        const auto* p = static_cast<const uint8_t*>(v.iov_base);
        FUZZ_CHECK(!(p <= request.status && request.status < p + v.iov_len));
        data_bytes += v.iov_len;
    }
    FUZZ_CHECK(data_bytes == request.data_bytes);
    const bool device_reads = request.type == kBlkTOut || request.type == kBlkTDiscard || request.type == kBlkTWriteZeroes;
    FUZZ_CHECK(request.data_bytes == (device_reads ? original.readable_bytes - 16 : original.writable_bytes - 1));
    std::vector<uint8_t> copy(request.data_bytes);
    FUZZ_CHECK(copy_from_iovecs(request.data, copy) == copy.size());

    if (check_blk_request(request, capacity, read_only) == kBlkSOk) {
        FUZZ_CHECK(!(read_only && request.type == kBlkTOut));
        FUZZ_CHECK(request.data_bytes % DiskImage::kSectorSize == 0);
        const uint64_t sectors = request.data_bytes / DiskImage::kSectorSize;
        FUZZ_CHECK(request.sector <= capacity && sectors <= capacity - request.sector);
    }
    BlkRange range;
    if (check_blk_range(request, capacity, read_only, range) == kBlkSOk) {
        FUZZ_CHECK(!read_only && request.data_bytes == 16);
        FUZZ_CHECK(range.sectors <= kBlkMaxAllocationSectors);
        FUZZ_CHECK(range.sector <= capacity && range.sectors <= capacity - range.sector);
        FUZZ_CHECK(range.flags == 0 || (range.flags == kBlkDwzUnmap && request.type != kBlkTDiscard));
    }
    return 0;
}
