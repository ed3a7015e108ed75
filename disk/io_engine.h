// The asynchronous I/O engine interface every backend implements the same
// way: submit a batch of requests, each with a cookie; poll for completions
// or sleep on one eventfd; reap them. One engine instance belongs to one I/O
// thread and is not shared.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/fd.h"

namespace lkvm {

// kDiscard deallocates the range (it reads back as zeroes); kWriteZeroes
// zeroes it and keeps it allocated. Neither uses iov. kBlocking runs a job
// that may block (a snapshot's copy-up) on the engine's worker thread, as
// discard and write-zeroes do; its result is the job's.
enum class IoOp : uint8_t { kRead, kWrite, kFlush, kDiscard, kWriteZeroes, kBlocking };

// What a kBlocking request runs, on a thread of the engine's own.
class BlockingJob {
public:
    // Returns what the request completes with: bytes, or -errno. May stop
    // early, with -ECANCELED, once cancel is set.
    virtual int64_t run(const std::atomic<bool>& cancel) = 0;

protected:
    ~BlockingJob() = default;
};

struct IoRequest {
    IoOp op = IoOp::kRead;
    int fd = -1;
    uint64_t offset = 0;
    const iovec* iov = nullptr;  // must stay valid until the request completes
    int iovcnt = 0;
    uint64_t cookie = 0;
    uint16_t ioprio = 0;  // ioprio::value(class, level); 0: the thread's own
    uint64_t length = 0;  // kDiscard and kWriteZeroes: bytes from offset
    BlockingJob* job = nullptr;  // kBlocking: must stay valid until the request completes
};

struct IoCompletion {
    uint64_t cookie;
    int64_t result;  // bytes transferred, or -errno
};

enum class EngineKind { kSync, kNative, kIoUring, kNull };

class AllocationWorker;

class IoEngine {
public:
    virtual ~IoEngine();
    virtual const char* name() const = 0;
    // Requests in flight at most; submit() takes no more than capacity() - in_flight().
    size_t capacity() const { return capacity_; }
    size_t in_flight() const { return in_flight_; }
    // Queues the batch with the kernel (or performs it, for sync and null). Requests
    // the backend refuses at once complete with their error like any other.
    virtual void submit(std::span<const IoRequest> batch) = 0;
    // Appends every completion that is ready to `out` without blocking; returns how many.
    virtual size_t reap(std::vector<IoCompletion>& out) = 0;
    // Whether reap() would find something: cheap enough to busy-poll (no
    // system call where the backend shares its completion ring with us).
    virtual bool has_completions() const = 0;

    // Sleeping until completions come. event_fd() becomes readable when the
    // kernel completes a request, but completions that submit() made itself
    // (sync, null, refused requests) are not signalled: a caller checks
    // has_completions() before it sleeps on the fd, and drains the fd with
    // clear_event() once per wakeup (reap() does not read it, so completions
    // found by polling cost no system call).
    virtual int event_fd() const { return event_.get(); }
    virtual void clear_event();
    // has_completions(), or else sleeps on event_fd() for up to timeout_ms.
    bool wait_for_completions(int timeout_ms);
    // Off while the caller busy-polls has_completions(): backends that can
    // (io_uring) stop signalling event_fd(). Turned back on before the caller
    // sleeps, after which it must check has_completions() once more.
    virtual void set_event_notification(bool) {}

    // Files the thread will use often: backends that can (io_uring) register
    // them so that each request skips the file table lookup. Optional.
    virtual void register_file(int) {}
    virtual void unregister_file(int) {}

    // Discards and write-zeroes whose cookie `which` picks end soon, with
    // -ECANCELED, rather than when their range is done: for a queue that
    // stops and waits for what it has in flight.
    void cancel_allocations(const std::function<bool(uint64_t cookie)>& which);

    // Memory (host ranges: the guest's RAM) that requests will move data to
    // and from: backends that can (io_uring) register it, so that a request
    // to a registered O_DIRECT file whose data lies in one registered piece
    // skips pinning its pages each time. Each piece is pinned, and so
    // committed, from the first request in it while the engine lives, and
    // requests use the pages pinned then: the ranges must not be unmapped or
    // discarded (MADV_DONTNEED) meanwhile. A second call replaces the first.
    // Optional; where registration fails (RLIMIT_MEMLOCK) requests simply go
    // as before. Call it on the thread that uses the engine.
    virtual void register_memory(std::span<const iovec>) {}

protected:
    explicit IoEngine(size_t capacity);
    // Discard and write-zeroes run on a worker thread of the engine's
    // (disk/offload.h), started with the first; they count in in_flight_
    // until reaped, and are announced on event_.
    void start_allocation(const IoRequest& request);
    size_t reap_allocations(std::vector<IoCompletion>& out);
    bool allocations_ready() const;
    // What the kernel holds: what an engine waits for before it goes.
    size_t kernel_in_flight(size_t done_but_not_reaped) const
    {
        return in_flight_ - done_but_not_reaped - allocations_in_flight_;
    }

    Fd event_;
    size_t capacity_;
    size_t in_flight_ = 0;

private:
    size_t allocations_in_flight_ = 0;
    std::unique_ptr<AllocationWorker> allocations_;  // after event_, which it signals
};

// Throws lkvm::Error when the backend cannot be set up (e.g. no io_setup slots).
std::unique_ptr<IoEngine> make_io_engine(EngineKind kind, size_t capacity);

// io_uring's IORING_SETUP_* flags: those this kernel takes (probed once per
// process, flag by flag), and those engines ask for by default (where taken).
unsigned uring_setup_flags_supported();
unsigned default_uring_setup_flags();
// Whether io_uring engines register memory given to register_memory() by default.
bool default_uring_fixed_buffers();
// An io_uring engine with these setup flags (less what the kernel does not
// take) and fixed buffers on or off: for tests and benchmarks.
std::unique_ptr<IoEngine> make_uring_engine(size_t capacity, unsigned setup_flags, bool fixed_buffers);

EngineKind parse_engine_kind(const std::string& name);  // throws lkvm::Error
const char* engine_kind_name(EngineKind kind);
// io_uring where this kernel offers it (and allows it), else native.
EngineKind default_engine_kind();

}  // namespace lkvm
