// One request virtqueue of a disk device (virtio-blk, virtio-scsi), served by
// one I/O thread. What differs between the devices is how a descriptor chain
// becomes disk I/O and how its completion is answered; everything else is
// here: guest notifications and polling, a bounded pool of request slots,
// submission to the thread's engine (through an aligned bounce buffer when
// O_DIRECT needs one), one interrupt per loop round, draining on reset, and
// the broken-ring path. Everything runs on the queue's thread.
#pragma once

#include <sys/uio.h>

#include <boost/asio/posix/stream_descriptor.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "disk/error_policy.h"
#include "disk/io_engine.h"
#include "disk/snapshot.h"
#include "disk/throttle.h"
#include "virtio/device.h"
#include "virtio/io_stats.h"
#include "virtio/io_thread.h"

namespace lkvm {

// Copies up to dst.size() bytes from the front of iovs; returns how many.
size_t copy_from_iovecs(std::span<const iovec> iovs, std::span<uint8_t> dst);
// Copies src to the front of iovs, as much as fits; returns how many bytes.
size_t copy_to_iovecs(std::span<const iovec> iovs, std::span<const uint8_t> src);
// Sets `out` to the bytes of iovs from `skip` on, `max_bytes` of them at
// most. Reuses out's storage: the request path allocates nothing here.
void slice_iovecs(std::span<const iovec> iovs, uint64_t skip, uint64_t max_bytes, std::vector<iovec>& out);
uint64_t iovecs_bytes(std::span<const iovec> iovs);
// Drops the first `skip` bytes of iovs in place (whole iovecs, and the front
// of the one it ends in); returns what is left, a view into iovs.
std::span<const iovec> skip_iovec_bytes(std::vector<iovec>& iovs, uint64_t skip);

// Says once per device (`reported` is its flag) that a disk I/O failed with
// `result` (-errno or a short count) and what the guest got instead.
void report_io_error_once(std::atomic<bool>& reported, const std::string& path, int64_t result,
                          const char* guest_gets);

// Pauses the guest for a disk's error (werror=stop, ...). Called on an I/O
// thread; the guest must be paused before it could see the request answered.
class IoErrorStop {
public:
    virtual ~IoErrorStop() = default;
    virtual void stop_for_io_error(const std::string& why) = 0;
};

// A disk image as the queue's I/O reaches it.
struct IoTarget {
    EngineKind engine;
    int fd;
    uint32_t alignment;  // buffer and length alignment the image needs (O_DIRECT), else 1
    uint16_t ioprio;     // on every request; 0: the thread's own
    ThrottleGroup* throttle = nullptr;  // the limits its reads and writes keep; null: none ever
    IoErrorPolicy read_error = IoErrorPolicy::kReport;
    IoErrorPolicy write_error = IoErrorPolicy::kReport;  // writes, flushes, discards, write-zeroes
    IoErrorStop* error_stop = nullptr;  // who pauses the guest; null: stop and enospc report
    const char* image = "";             // its path, for the reason the guest paused (the device keeps it)
    SnapshotOverlay* snapshot = nullptr;  // -d ...,snapshot: requests go through disk/snapshot.h
};

struct RequestQueueConfig {
    const GuestMemory& memory;
    ChainLimits limits;
    std::vector<IoTarget> targets;  // every image this queue's requests may reach
    uint32_t slots;                 // requests in flight at most
    std::string what;               // "disk PATH", for the one line a broken ring gets
};

class RequestQueue : public PollSource, public CompletionSink, public std::enable_shared_from_this<RequestQueue> {
public:
    RequestQueue(IoThread& thread, const QueueSetup& setup, bool event_idx, QueueStats& stats,
                 RequestQueueConfig config);
    ~RequestQueue() override;

    void start(std::function<void()> broken);
    // Stops serving and waits for the requests in flight, whose buffers the
    // guest still owns; answers none of them.
    void stop();
    IoThread& thread() { return thread_; }

    bool ready() const override;
    void run() override { process(); }
    void set_polling(bool active) override;
    void round_end() override;
    void complete(uint32_t tag, int64_t result) override;
    void completions_done() override;
    // After a pause for an I/O error: submits the requests that failed again.
    void retry_failed();

protected:
    // A chain the driver made available. Answer it now with finish(), or take
    // a slot (there is always one free here), submit its I/O, and answer from
    // io_done().
    virtual void handle(Chain& chain) = 0;
    // An I/O of slot `slot` completed (result: bytes or -errno), bounce
    // buffers already copied back. Submit the next one or finish_slot().
    virtual void io_done(uint32_t slot, int64_t result) = 0;

    // The request at `head` takes a free slot; it counts as in flight until finish_slot().
    uint32_t take_slot(uint16_t head);
    // Runs op on the image for slot; reads and writes move `data` (copied:
    // the memory it points to must stay valid until io_done()). `length` is
    // for discard and write-zeroes. `target` is the device's own, which
    // outlives its queues: the slot keeps a pointer to it.
    void submit(uint32_t slot, const IoTarget& target, IoOp op, uint64_t offset, std::span<const iovec> data,
                uint64_t length = 0);
    // Returns the slot's chain to the driver with `written` bytes written and
    // counts `bytes` of I/O, with the slot's latency, in the statistics.
    void finish_slot(uint32_t slot, uint32_t written, uint64_t bytes);
    // Returns a chain that needed no slot.
    void finish(uint16_t head, uint32_t written);
    void mark_broken(const char* why);
    // A request the disk failed: counted for the statistics (lkvm stat's errors).
    void count_error() { stats_.failed(); }
    bool stopping() const { return stopping_; }

private:
    struct Slot {
        uint16_t head = 0;
        uint64_t started_ns = 0;
        std::vector<iovec> iov;    // what the engine moves
        bool bounced = false;      // iov is the bounce buffer
        std::unique_ptr<uint8_t, void (*)(void*)> bounce{nullptr, ::free};
        uint64_t bounce_bytes = 0;
        uint32_t bounce_align = 0;
        std::vector<iovec> guest;  // where a bounced read is copied back to
        // What went to the engine: for a throttle group that holds it back,
        // and for a retry after an I/O error paused the guest.
        IoRequest request{};
        const IoTarget* target = nullptr;
        uint64_t bytes = 0;        // what it moves (for the throttle; success for werror=ignore)
    };

    // Tags of a snapshot disk's parts of requests (SnapshotRequests' own), beside the slots' tags.
    static constexpr uint32_t kSnapshotPart = 1u << 31;
    SnapshotRequests& snapshot_requests();
    // To the engine, or through the snapshot overlay when the target has one.
    void dispatch(EngineKind engine, SnapshotOverlay* snapshot, const IoRequest& request);
    class ThrottleGate;

    void release(Slot& slot);
    // A request the guest will never get an answer for (a reset): its slot is free again.
    void drop(uint32_t id);
    // Whether the error policy answered a failed request (ignore, stop) rather than io_done().
    bool apply_error_policy(uint32_t id, int64_t result);
    void hold(ThrottleGate& gate, uint32_t slot);
    void count_throttled_time();
    void wait_notify();
    void process();
    void signal();

    IoThread& thread_;
    RequestQueueConfig config_;
    SplitQueue ring_;
    boost::asio::posix::stream_descriptor notify_;
    Interrupt* interrupt_;
    QueueStats& stats_;
    std::function<void()> broken_;
    std::vector<Slot> slots_;
    std::vector<uint32_t> free_slots_;
    std::unique_ptr<SnapshotRequests> snapshot_;  // made by the first request to a snapshot disk
    Chain chain_;  // the one being handled
    std::vector<std::unique_ptr<ThrottleGate>> gates_;  // one per throttle group of the targets
    uint32_t held_ = 0;            // requests the gates hold back
    uint64_t held_since_ns_ = 0;   // throttled time counted up to here
    std::vector<uint32_t> failed_; // slots whose error paused the guest, to retry at resume
    uint32_t sink_ = 0;
    bool used_dirty_ = false;     // pushed used entries not yet considered for an interrupt
    bool signal_queued_ = false;  // round_end() will consider them
    bool out_of_slots_ = false;   // stopped popping for lack of slots
    bool broken_ring_ = false;
    bool polling_ = false;        // the thread polls us: leave notifications off
    bool stopping_ = false;
    bool registered_ = false;     // a source and sink of the thread
};

// A virtio device whose request queues run on I/O threads: what the
// statistics table (and anything else watching a running guest) reads.
class DiskDevice : public VirtioDevice {
public:
    virtual unsigned request_queues() const = 0;
    virtual const IoThread& queue_thread(unsigned q) const = 0;
    virtual const QueueStats& queue_stats(unsigned q) const = 0;
    virtual std::string describe() const = 0;  // its image(s)
    // After the guest paused for an I/O error: the queues submit again what failed.
    // Only while the guest's vCPUs are paused (nothing resets the device meanwhile).
    virtual void retry_failed() = 0;
};

// The queues of one device, each created, stopped and destroyed on its own thread.
class RequestQueues {
public:
    using Make = std::function<std::shared_ptr<RequestQueue>(IoThread&, const QueueSetup&)>;
    // Starts a queue for each setup on queue_threads[setup.index]; a setup
    // with an index or rings the device cannot take calls broken().
    void start(std::span<const QueueSetup> setups, std::span<IoThread* const> queue_threads,
               const std::function<bool(const QueueSetup&)>& acceptable, const Make& make,
               const std::function<void()>& broken);
    void stop();
    // Posts RequestQueue::retry_failed() to each queue's thread.
    void retry_failed();
    // Each is touched only on its own thread.
    const std::vector<std::shared_ptr<RequestQueue>>& all() const { return queues_; }

private:
    std::vector<std::shared_ptr<RequestQueue>> queues_;
};

}  // namespace lkvm
