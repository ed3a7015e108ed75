// virtio-blk (virtio 1.x section 5.2): requests framed from the descriptors
// as the driver laid them out, checked, and executed by the device's I/O
// engine on the I/O thread that owns its queues. Never on a vCPU thread.
#pragma once

#include <boost/asio/posix/stream_descriptor.hpp>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "disk/disk_image.h"
#include "disk/io_engine.h"
#include "virtio/device.h"
#include "virtio/io_thread.h"

namespace lkvm {

constexpr uint32_t kBlkTIn = 0, kBlkTOut = 1, kBlkTFlush = 4, kBlkTGetId = 8;
constexpr uint8_t kBlkSOk = 0, kBlkSIoErr = 1, kBlkSUnsupp = 2;
constexpr size_t kBlkIdBytes = 20;

// A request as the chain frames it: the 16-byte header from the first
// readable bytes, the status byte as the last writable byte, the data between.
struct BlkRequest {
    uint32_t type = 0;
    uint64_t sector = 0;
    std::vector<iovec> data;
    uint64_t data_bytes = 0;
    uint8_t* status = nullptr;
    bool header_complete = false;  // fewer than 16 readable bytes: answered with IOERR
};

enum class BlkFrameError { kNoStatusByte };

// Without a status byte there is no way to answer: the device treats it as a broken ring.
Result<BlkRequest, BlkFrameError> frame_blk_request(const Chain& chain);

// The status an IN or OUT request gets before any I/O: OK when it may go ahead.
uint8_t check_blk_request(const BlkRequest& request, uint64_t capacity_sectors, bool read_only);

struct BlkOptions {
    std::string serial;
    EngineKind engine = EngineKind::kNative;
    unsigned num_queues = 1;
    uint16_t queue_size = 256;
};

class VirtioBlk : public VirtioDevice {
public:
    VirtioBlk(DiskImage image, BlkOptions options, const GuestMemory& memory, IoThread& thread);
    ~VirtioBlk() override;

    uint16_t device_id() const override { return 2; }
    uint64_t features() const override;
    unsigned num_queues() const override { return options_.num_queues; }
    uint16_t max_queue_size() const override { return options_.queue_size; }
    void read_config(uint64_t offset, std::span<uint8_t> data) override;
    void activate(uint64_t features, std::vector<QueueSetup> queues, std::function<void()> broken) override;
    void reset() override;

    const DiskImage& image() const { return image_; }

private:
    struct Queue;
    struct InFlight {
        Queue* queue = nullptr;
        uint16_t head = 0;
        uint8_t* status = nullptr;
        uint32_t written_on_success = 0;
        uint64_t expected = 0;  // bytes the engine must move
        std::vector<iovec> iov;
        std::unique_ptr<uint8_t, void (*)(void*)> bounce{nullptr, ::free};
        std::vector<iovec> guest;  // where a bounced read is copied back to
    };

    // All of these run on the I/O thread.
    void wait_notify(Queue& queue);
    void wait_engine();
    void process(Queue& queue);
    void start_request(Queue& queue, Chain& chain);
    void finish(Queue& queue, uint16_t head, uint8_t* status, uint8_t value, uint32_t written);
    void on_completions();
    void submit_pending();
    void signal_queues();
    void mark_broken(Queue& queue, const char* why);
    void drain();

    DiskImage image_;
    BlkOptions options_;
    const GuestMemory& memory_;
    IoThread& thread_;
    std::unique_ptr<IoEngine> engine_;
    boost::asio::posix::stream_descriptor engine_event_;
    std::vector<std::unique_ptr<Queue>> queues_;
    std::function<void()> broken_;
    std::vector<InFlight> slots_;
    std::vector<uint32_t> free_slots_;
    std::vector<IoRequest> pending_;
    std::vector<IoCompletion> completions_;
    bool engine_waiting_ = false;
    uint64_t epoch_ = 0;  // bumped on reset: handlers of an older epoch do nothing
    std::atomic<bool> reported_error_{false};
};

}  // namespace lkvm
