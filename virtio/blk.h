// virtio-blk (virtio 1.x section 5.2): requests framed from the descriptors
// as the driver laid them out, checked, and executed by the device's I/O
// engine on the I/O thread that owns its queues. Never on a vCPU thread.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "disk/disk_image.h"
#include "disk/io_engine.h"
#include "virtio/device.h"
#include "virtio/io_stats.h"
#include "virtio/io_thread.h"
#include "virtio/request_queue.h"

namespace lkvm {

constexpr uint32_t kBlkTIn = 0, kBlkTOut = 1, kBlkTFlush = 4, kBlkTGetId = 8, kBlkTDiscard = 11, kBlkTWriteZeroes = 13;
constexpr uint8_t kBlkSOk = 0, kBlkSIoErr = 1, kBlkSUnsupp = 2;
constexpr size_t kBlkIdBytes = 20;
// DISCARD and WRITE_ZEROES: at most this many sectors in one request, of one
// segment (as QEMU: Linux sends one range per request then, and there is no
// host call that takes several).
constexpr uint32_t kBlkMaxAllocationSectors = (1u << 30) / 512;
constexpr uint32_t kBlkDwzUnmap = 1;  // virtio_blk_discard_write_zeroes.flags

// A request as the chain frames it: the 16-byte header from the first
// readable bytes, the status byte as the last writable byte, the data between
// (the readable bytes after the header for OUT, DISCARD and WRITE_ZEROES).
struct BlkRequest {
    uint32_t type = 0;
    uint64_t sector = 0;
    std::span<const iovec> data;  // in the chain's own storage
    uint64_t data_bytes = 0;
    uint8_t* status = nullptr;
    bool header_complete = false;  // fewer than 16 readable bytes: answered with IOERR
};

enum class BlkFrameError { kNoStatusByte };

// Without a status byte there is no way to answer: the device treats it as a
// broken ring. Frames in place, allocating nothing: the chain's iovecs lose
// the status byte, and the header where the data is the readable part.
Result<BlkRequest, BlkFrameError> frame_blk_request(Chain& chain);

// The status an IN or OUT request gets before any I/O: OK when it may go ahead.
uint8_t check_blk_request(const BlkRequest& request, uint64_t capacity_sectors, bool read_only);

// The one range of a DISCARD or WRITE_ZEROES request.
struct BlkRange {
    uint64_t sector = 0;
    uint32_t sectors = 0;
    uint32_t flags = 0;
};
// Reads and checks it: OK, UNSUPP (more than one range, unknown flags,
// DISCARD with UNMAP) or IOERR (out of the disk, too long, read-only).
uint8_t check_blk_range(const BlkRequest& request, uint64_t capacity_sectors, bool read_only, BlkRange& range);

class BlkQueue;

struct BlkOptions {
    std::string serial{};
    EngineKind engine = EngineKind::kNative;
    uint16_t ioprio = 0;  // ioprio::value() on every request; 0: the thread's own
    uint16_t queue_size = 256;
    bool discard = true;  // discard=unmap: DISCARD punches holes; false (ignore): it does nothing
    ThrottleGroup* throttle = nullptr;  // the limits the disk keeps (shared, outlives the device); null: none
    IoErrorPolicy read_error = IoErrorPolicy::kReport, write_error = IoErrorPolicy::kReport;  // rerror=, werror=
    IoErrorStop* error_stop = nullptr;  // pauses the guest for stop and enospc (outlives the device)
    DetectZeroes detect_zeroes = DetectZeroes::kOff;
};

// The device model: configuration, features, and one BlkQueue per virtqueue
// on the I/O thread the queue is mapped to. Queues on different threads
// share nothing but the (read-only) disk description.
class VirtioBlk : public DiskDevice {
public:
    // queue_threads[q] serves virtqueue q; their number is the device's queue count.
    VirtioBlk(DiskImage image, BlkOptions options, const GuestMemory& memory, std::vector<IoThread*> queue_threads);
    ~VirtioBlk() override;

    uint16_t device_id() const override { return 2; }
    uint64_t features() const override;
    unsigned num_queues() const override { return static_cast<unsigned>(queue_threads_.size()); }
    uint16_t max_queue_size() const override { return options_.queue_size; }
    void read_config(uint64_t offset, std::span<uint8_t> data) override;
    // The driver's one writable field: writeback (VIRTIO_BLK_F_CONFIG_WCE).
    void write_config(uint64_t offset, std::span<const uint8_t> data) override;
    void activate(uint64_t features, std::vector<QueueSetup> queues, std::function<void()> broken) override;
    void reset() override;

    const DiskImage& image() const { return image_; }
    const BlkOptions& options() const { return options_; }
    // Whether the guest is told of a write-back cache: the cache mode's
    // default until the driver switches it (or negotiates no FLUSH).
    bool write_cache() const { return write_cache_.load(std::memory_order_relaxed); }
    unsigned request_queues() const override { return num_queues(); }
    const IoThread& queue_thread(unsigned q) const override { return *queue_threads_.at(q); }
    const QueueStats& queue_stats(unsigned q) const override { return *stats_.at(q); }
    std::string describe() const override { return image_.path(); }
    void retry_failed() override { queues_.retry_failed(); }

private:
    friend class BlkQueue;
    // With the write cache off, a write completes durable: O_DSYNC makes a
    // plain write so by itself; anything else that writes needs a flush
    // after it. unsafe flushes nothing.
    bool flush_after_write(bool plain_write) const
    {
        return !write_cache() && !image_.flushes_ignored() && !(plain_write && image_.writes_durable());
    }
    void report_io_error(int64_t result);

    DiskImage image_;
    BlkOptions options_;
    const GuestMemory& memory_;
    std::vector<IoThread*> queue_threads_;
    std::vector<std::unique_ptr<QueueStats>> stats_;  // per queue, kept across resets
    RequestQueues queues_;  // while DRIVER_OK
    IoTarget io_target_;  // how the queues reach the image: every request points at it
    std::atomic<bool> write_cache_;  // set by vCPU threads (config writes), read by the I/O threads
    std::atomic<bool> reported_error_{false};
};

}  // namespace lkvm
