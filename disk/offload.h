// Discard and write-zeroes, off the I/O thread. A guest may ask for a whole
// GiB in one request (SCSI WRITE SAME, UNMAP); fallocate() on a block device
// without a zeroing offload, or the zeroes we write ourselves where the file
// system has no mode for it (tmpfs has no ZERO_RANGE), then takes seconds.
// Done on the I/O thread, every queue it serves would wait that long. So an
// engine hands them to a worker thread of its own, as QEMU hands blocking
// calls to its thread pool, and reaps their results with its own.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stop_token>
#include <thread>
#include <vector>

#include "disk/io_engine.h"

namespace lkvm {

// Performs a discard or write-zeroes on the calling thread: the worker's job,
// and the whole of it for a caller that may block. Returns 0 or -errno. A
// discarded range must read back as zeroes (the SCSI disk advertises LBPRZ),
// so where the file cannot punch holes, zeroes are written instead. The
// hand-written zeroes stop, with -ECANCELED, between two 1 MiB writes once
// `cancel` is set. A kBlocking request runs its job.
int64_t perform_allocation(const IoRequest& r, const std::atomic<bool>& cancel);

class AllocationWorker {
public:
    // Completions are announced by a write to event_fd (the engine's eventfd).
    // At most `capacity` requests at a time (the engine's): room for them is
    // taken here, so that start() and reap() allocate nothing.
    AllocationWorker(int event_fd, size_t capacity);
    // Cancels the running request, drops those not started, and joins.
    ~AllocationWorker();
    AllocationWorker(const AllocationWorker&) = delete;
    AllocationWorker& operator=(const AllocationWorker&) = delete;

    // From the engine's thread. The request's fd must stay open until it completes.
    void start(const IoRequest& request);
    // Cheap: one atomic load. The engine's has_completions() asks it every poll.
    bool has_completions() const { return ready_.load(std::memory_order_acquire); }
    // Appends the finished ones to out; returns how many.
    size_t reap(std::vector<IoCompletion>& out);
    // Requests whose cookie `which` picks end soon with -ECANCELED: those not
    // started at once, the running one at its next chunk. For a queue that
    // stops (a device reset) and must not wait for a GiB of zeroes.
    void cancel(const std::function<bool(uint64_t cookie)>& which);

private:
    void run(std::stop_token stop);
    void finish(uint64_t cookie, int64_t result);  // with mutex_ held

    int event_fd_;
    std::mutex mutex_;
    std::condition_variable_any wake_;
    std::vector<IoRequest> queued_;   // oldest first
    std::vector<IoCompletion> done_;
    uint64_t running_cookie_ = 0;
    bool running_ = false;
    std::atomic<bool> cancel_running_{false};
    std::atomic<bool> ready_{false};  // done_ is not empty
    std::jthread thread_;             // last: starts once everything above exists
};

}  // namespace lkvm
