#include "virtio/blk.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "base/error.h"
#include "base/log.h"

namespace lkvm {

namespace {
constexpr uint64_t kBlkFSegMax = 1ull << 2, kBlkFRo = 1ull << 5, kBlkFBlkSize = 1ull << 6;
constexpr uint64_t kBlkFFlush = 1ull << 9, kBlkFConfigWce = 1ull << 11, kBlkFMq = 1ull << 12, kBlkFDiscard = 1ull << 13;
constexpr uint64_t kBlkFWriteZeroes = 1ull << 14;
constexpr uint64_t kMaxRequestBytes = 64ull << 20;
constexpr uint64_t kConfigWriteback = 32;  // virtio_blk_config.writeback: one byte
}  // namespace

Result<BlkRequest, BlkFrameError> frame_blk_request(Chain& chain)
{
    if (chain.writable_bytes == 0)
        return fail(BlkFrameError::kNoStatusByte);
    BlkRequest request;
    iovec& last = chain.writable.back();  // walk_chain keeps no empty buffers: the byte is there
    request.status = static_cast<uint8_t*>(last.iov_base) + last.iov_len - 1;
    if (--last.iov_len == 0)
        chain.writable.pop_back();
    --chain.writable_bytes;
    if (chain.readable_bytes < 16)
        return request;
    request.header_complete = true;

    uint8_t header[16];
    copy_from_iovecs(chain.readable, header);
    std::memcpy(&request.type, header, 4);
    std::memcpy(&request.sector, header + 8, 8);
    if (request.type == kBlkTOut || request.type == kBlkTDiscard || request.type == kBlkTWriteZeroes) {
        request.data = skip_iovec_bytes(chain.readable, sizeof(header));
        request.data_bytes = chain.readable_bytes - sizeof(header);
    } else {
        request.data = chain.writable;
        request.data_bytes = chain.writable_bytes;
    }
    return request;
}

uint8_t check_blk_request(const BlkRequest& request, uint64_t capacity_sectors, bool read_only)
{
    if (request.type == kBlkTOut && read_only)
        return kBlkSIoErr;
    if (request.data_bytes % DiskImage::kSectorSize != 0)
        return kBlkSIoErr;
    const uint64_t sectors = request.data_bytes / DiskImage::kSectorSize;
    if (request.sector > capacity_sectors || sectors > capacity_sectors - request.sector)
        return kBlkSIoErr;
    return kBlkSOk;
}

uint8_t check_blk_range(const BlkRequest& request, uint64_t capacity_sectors, bool read_only, BlkRange& range)
{
    uint8_t bytes[16];
    if (request.data_bytes != sizeof(bytes))
        return kBlkSUnsupp;  // max_discard_seg and max_write_zeroes_seg are 1
    copy_from_iovecs(request.data, bytes);
    std::memcpy(&range.sector, bytes, 8);
    std::memcpy(&range.sectors, bytes + 8, 4);
    std::memcpy(&range.flags, bytes + 12, 4);
    if ((range.flags & ~kBlkDwzUnmap) || (request.type == kBlkTDiscard && range.flags))
        return kBlkSUnsupp;
    if (read_only || range.sectors > kBlkMaxAllocationSectors || range.sector > capacity_sectors ||
        range.sectors > capacity_sectors - range.sector)
        return kBlkSIoErr;
    return kBlkSOk;
}

// Turns virtio-blk requests into I/O on the queue's thread.
class BlkQueue final : public RequestQueue {
public:
    BlkQueue(VirtioBlk& device, IoThread& thread, const QueueSetup& setup, bool event_idx, QueueStats& stats)
        : RequestQueue(thread, setup, event_idx, stats,
                       {device.memory_,
                        {device.options_.queue_size + 2u, kMaxRequestBytes},
                        {device.io_target_},
                        setup.rings.size,
                        "disk " + device.image_.path()}),
          device_(device),
          requests_(setup.rings.size)
    {
    }

private:
    struct Request {
        uint8_t* status = nullptr;
        uint32_t written_on_success = 0;
        uint64_t expected = 0;  // bytes the engine must move
        uint64_t bytes = 0;     // of data, for the statistics
        bool flush_after = false;  // the write cache is off: a flush before the answer
    };

    void handle(Chain& chain) override;
    void allocate(uint16_t head, const BlkRequest& request);
    void write_zeroes(uint16_t head, const BlkRequest& request);
    void io_done(uint32_t slot, int64_t result) override;
    void answer(uint16_t head, uint8_t* status, uint8_t value, uint32_t written)
    {
        *status = value;
        finish(head, written);
    }

    VirtioBlk& device_;
    std::vector<Request> requests_;  // by slot
};

void BlkQueue::handle(Chain& chain)
{
    auto framed = frame_blk_request(chain);
    if (!framed)
        return mark_broken("request without a status byte");
    BlkRequest& request = *framed;
    if (!request.header_complete)
        return answer(chain.head, request.status, kBlkSIoErr, 1);
    const DiskImage& image = device_.image_;
    switch (request.type) {
    case kBlkTIn:
    case kBlkTOut: {
        const uint8_t status = check_blk_request(request, image.size() / DiskImage::kSectorSize, image.read_only());
        if (status != kBlkSOk)
            return answer(chain.head, request.status, status, 1);
        const bool in = request.type == kBlkTIn;
        if (!in && device_.options_.detect_zeroes != DetectZeroes::kOff && request.data_bytes != 0 &&
            iovecs_are_zero(request.data, request.data_bytes))
            return write_zeroes(chain.head, request);
        const uint32_t slot = take_slot(chain.head);
        requests_[slot] = {request.status, in ? static_cast<uint32_t>(request.data_bytes + 1) : 1u, request.data_bytes,
                           request.data_bytes, !in && device_.flush_after_write(true)};
        return submit(slot, device_.io_target_, in ? IoOp::kRead : IoOp::kWrite,
                      request.sector * DiskImage::kSectorSize, request.data);
    }
    case kBlkTFlush: {
        // unsafe: the flush completes without reaching the image.
        if (image.flushes_ignored())
            return answer(chain.head, request.status, request.data_bytes == 0 ? kBlkSOk : kBlkSIoErr, 1);
        const uint32_t slot = take_slot(chain.head);
        requests_[slot] = {request.status, 1u, request.data_bytes};
        return submit(slot, device_.io_target_, IoOp::kFlush, request.sector * DiskImage::kSectorSize, request.data);
    }
    case kBlkTGetId: {
        uint8_t id[kBlkIdBytes] = {};
        const std::string& serial = device_.options_.serial;
        std::memcpy(id, serial.data(), std::min(serial.size(), kBlkIdBytes));
        const size_t copied = copy_to_iovecs(request.data, id);
        return answer(chain.head, request.status, kBlkSOk, static_cast<uint32_t>(copied + 1));
    }
    case kBlkTDiscard:
    case kBlkTWriteZeroes:
        return allocate(chain.head, request);
    default:
        return answer(chain.head, request.status, kBlkSUnsupp, 1);
    }
}

// DISCARD and WRITE_ZEROES: run off the I/O thread by the engine (they may
// take seconds), answered like any other request.
void BlkQueue::allocate(uint16_t head, const BlkRequest& request)
{
    const DiskImage& image = device_.image_;
    BlkRange range;
    const uint8_t status = check_blk_range(request, image.size() / DiskImage::kSectorSize, image.read_only(), range);
    if (status != kBlkSOk)
        return answer(head, request.status, status, 1);
    // A discard is a hint: with discard=ignore, or for no sectors, there is nothing to do.
    const bool unmap = device_.options_.discard;
    if (range.sectors == 0 || (request.type == kBlkTDiscard && !unmap))
        return answer(head, request.status, kBlkSOk, 1);
    // Deallocated ranges read back as zeroes (holes), so a write-zeroes the
    // driver lets unmap may punch one.
    const bool deallocate = request.type == kBlkTDiscard || (range.flags & kBlkDwzUnmap && unmap);
    const uint32_t slot = take_slot(head);
    requests_[slot] = {request.status, 1u, 0, 0, request.type == kBlkTWriteZeroes && device_.flush_after_write(false)};
    submit(slot, device_.io_target_, deallocate ? IoOp::kDiscard : IoOp::kWriteZeroes,
           range.sector * DiskImage::kSectorSize, {}, uint64_t{range.sectors} * DiskImage::kSectorSize);
}

// detect-zeroes: an OUT request of zeroes only (checked, in range) becomes a
// write-zeroes, or with unmap (and discard=unmap) a hole, off the I/O thread
// like WRITE_ZEROES; it still counts as the bytes the guest wrote.
void BlkQueue::write_zeroes(uint16_t head, const BlkRequest& request)
{
    const bool deallocate = device_.options_.detect_zeroes == DetectZeroes::kUnmap && device_.options_.discard;
    const uint32_t slot = take_slot(head);
    requests_[slot] = {request.status, 1u, 0, request.data_bytes, device_.flush_after_write(false)};
    submit(slot, device_.io_target_, deallocate ? IoOp::kDiscard : IoOp::kWriteZeroes,
           request.sector * DiskImage::kSectorSize, {}, request.data_bytes);
}

void BlkQueue::io_done(uint32_t slot, int64_t result)
{
    Request& request = requests_[slot];
    const bool ok = result >= 0 && static_cast<uint64_t>(result) == request.expected;
    if (ok && request.flush_after) {
        // The write cache is off: the write is answered once it is durable
        // (QEMU's write then flush), the flush as asynchronous as the write.
        request.flush_after = false;
        request.expected = 0;
        return submit(slot, device_.io_target_, IoOp::kFlush, 0, {});
    }
    if (!ok) {
        device_.report_io_error(result);
        count_error();
    }
    *request.status = ok ? kBlkSOk : kBlkSIoErr;
    finish_slot(slot, ok ? request.written_on_success : 1, request.bytes);
}

VirtioBlk::VirtioBlk(DiskImage image, BlkOptions options, const GuestMemory& memory, std::vector<IoThread*> queue_threads)
    : image_(std::move(image)),
      options_(std::move(options)),
      memory_(memory),
      queue_threads_(std::move(queue_threads)),
      io_target_{options_.engine,   image_.fd(),         image_.alignment(),   options_.ioprio,
                 options_.throttle, options_.read_error, options_.write_error, options_.error_stop,
                 image_.path().c_str(), image_.snapshot()},
      write_cache_(image_.write_cache_default())
{
    if (queue_threads_.empty())
        throw Error("a virtio-blk device needs at least one queue");
    for (size_t q = 0; q < queue_threads_.size(); ++q)
        stats_.push_back(std::make_unique<QueueStats>());
    const std::vector<iovec> fixed = image_.direct() ? memory_.host_ranges() : std::vector<iovec>();
    for (IoThread* thread : queue_threads_)
        thread->prepare_engine(options_.engine, fixed);
}

VirtioBlk::~VirtioBlk()
{
    reset();
    // What the guest wrote reaches the image before lkvm exits (unsafe: as QEMU, not even then).
    if (!image_.read_only() && !image_.flushes_ignored())
        ::fdatasync(image_.fd());
}

uint64_t VirtioBlk::features() const
{
    // CONFIG_WCE only with FLUSH (virtio 1.x 5.2.5.1): the guest sees the cache mode and may switch it.
    uint64_t f = kVirtioFVersion1 | kVirtioFRingIndirectDesc | kVirtioFRingEventIdx | kBlkFSegMax | kBlkFBlkSize |
                 kBlkFFlush | kBlkFConfigWce;
    if (image_.read_only())
        f |= kBlkFRo;
    else
        f |= kBlkFDiscard | kBlkFWriteZeroes;
    if (num_queues() > 1)
        f |= kBlkFMq;
    return f;
}

void VirtioBlk::read_config(uint64_t offset, std::span<uint8_t> data)
{
    uint8_t config[64] = {};
    const uint64_t capacity = image_.size() / DiskImage::kSectorSize;
    const uint32_t seg_max = options_.queue_size - 2u;
    const uint32_t blk_size = std::max<uint32_t>(DiskImage::kSectorSize, image_.alignment());
    const uint16_t queues = static_cast<uint16_t>(num_queues());
    std::memcpy(&config[0], &capacity, 8);
    std::memcpy(&config[12], &seg_max, 4);
    std::memcpy(&config[20], &blk_size, 4);
    config[kConfigWriteback] = write_cache() ? 1 : 0;
    std::memcpy(&config[34], &queues, 2);
    // DISCARD and WRITE_ZEROES: one range, aligned to what the host frees (4 KiB blocks).
    const uint32_t one_range = 1, alignment = std::max<uint32_t>(blk_size, 4096) / DiskImage::kSectorSize;
    std::memcpy(&config[36], &kBlkMaxAllocationSectors, 4);
    std::memcpy(&config[40], &one_range, 4);
    std::memcpy(&config[44], &alignment, 4);
    std::memcpy(&config[48], &kBlkMaxAllocationSectors, 4);
    std::memcpy(&config[52], &one_range, 4);
    config[56] = options_.discard ? 1 : 0;  // write_zeroes_may_unmap
    for (size_t i = 0; i < data.size(); ++i)
        data[i] = offset + i < sizeof(config) ? config[offset + i] : 0;
}

void VirtioBlk::write_config(uint64_t offset, std::span<const uint8_t> data)
{
    // One whole byte at writeback's offset, 0 (write through) or 1 (write
    // back); any other write to the configuration space changes nothing.
    if (offset == kConfigWriteback && data.size() == 1 && data[0] <= 1)
        write_cache_.store(data[0] == 1, std::memory_order_relaxed);
}

void VirtioBlk::activate(uint64_t features, std::vector<QueueSetup> setups, std::function<void()> broken)
{
    const bool event_idx = features & kVirtioFRingEventIdx;
    // A driver that cannot flush gets a write-through cache (virtio 1.x 5.2.6.2).
    if (!(features & kBlkFFlush))
        write_cache_.store(false, std::memory_order_relaxed);
    queues_.start(
        setups, queue_threads_,
        [&](const QueueSetup& setup) {
            return setup.rings.size <= options_.queue_size && rings_in_memory(memory_, setup.rings);
        },
        [&](IoThread& thread, const QueueSetup& setup) -> std::shared_ptr<RequestQueue> {
            return std::make_shared<BlkQueue>(*this, thread, setup, event_idx, *stats_[setup.index]);
        },
        broken);
}

void VirtioBlk::reset()
{
    queues_.stop();
    write_cache_.store(image_.write_cache_default(), std::memory_order_relaxed);
}

void VirtioBlk::report_io_error(int64_t result)
{
    report_io_error_once(reported_error_, image_.path(), result, "IOERR");
}

}  // namespace lkvm
