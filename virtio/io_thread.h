// An I/O thread: a named thread running one Boost.Asio io_context
// (concurrency hint 1: its handlers never run concurrently, so what it owns
// needs no locks), one I/O engine per engine kind that its queues use, and
// QEMU-style adaptive polling. Everything on the request path of the queues
// it serves runs here; other threads only post to it.
#pragma once

#include <sys/types.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "disk/io_engine.h"
#include "virtio/io_stats.h"
#include "virtio/io_thread_policy.h"

namespace lkvm {

// QEMU's iothread polling parameters, with its defaults.
struct PollParams {
    uint64_t max_ns = 32768;  // 0: never poll
    uint64_t grow = 0;        // 0: double
    uint64_t shrink = 0;      // 0: drop to 0 at once
};
constexpr uint64_t kPollStartNs = 4000;

// The clock polling and request latencies are measured with.
uint64_t monotonic_ns();

// The poll time after a wait of block_ns (time from the start of polling
// until work was found or the thread woke up) with poll time poll_ns: kept
// when polling would have caught it, shrunk when the wait was longer than
// polling may ever be, grown when polling a little longer would have.
uint64_t next_poll_ns(uint64_t poll_ns, uint64_t block_ns, const PollParams& params);

// Memory for the operations of a thread's waits (a queue's kick eventfd, an
// engine's eventfd), kept for the next wait: Asio's own per-thread cache
// keeps one block, so a round that re-armed several waits allocated. Used
// on its thread only, and by the io_context's destructor once that is gone.
class WaitMemory {
public:
    void* allocate(size_t bytes);
    void deallocate(void* block, size_t bytes);

private:
    struct Block {
        alignas(std::max_align_t) std::byte bytes[512];
    };
    std::vector<std::unique_ptr<Block>> blocks_;
    std::vector<void*> free_;
};

template <class T>
struct WaitAllocator {
    using value_type = T;
    WaitMemory* memory;
    explicit WaitAllocator(WaitMemory& m) : memory(&m) {}
    template <class U>
    WaitAllocator(const WaitAllocator<U>& other) : memory(other.memory) {}
    T* allocate(size_t n) { return static_cast<T*>(memory->allocate(n * sizeof(T))); }
    void deallocate(T* p, size_t n) { memory->deallocate(p, n * sizeof(T)); }
    template <class U>
    bool operator==(const WaitAllocator<U>& other) const { return memory == other.memory; }
};

// A wait's completion handler whose operation Asio allocates from WaitMemory
// (Asio asks a handler for its allocator_type).
template <class Handler>
struct WaitHandler {
    using allocator_type = WaitAllocator<void>;
    allocator_type get_allocator() const { return allocator; }
    void operator()(const boost::system::error_code& error) { handler(error); }
    Handler handler;
    allocator_type allocator;
};

using EngineFactory = std::function<std::unique_ptr<IoEngine>(EngineKind, size_t capacity)>;

struct IoThreadOptions {
    std::string name;
    PollParams poll;
    unsigned max_batch = 0;  // requests per engine submission at most; 0: all that are ready
    int cpu = -1;            // the host CPU to pin to; -1: wherever the scheduler likes
    IoThreadPolicy policy = IoThreadPolicy::kBatch;
    // Called on the thread, once, if its loop fails (an exception no handler
    // caught): what failed. The thread serves nothing but posted work after
    // that, so that resets and exit still complete.
    std::function<void(const std::string& what)> on_failure{};
    // Makes the thread's engines; empty: make_io_engine. A seam for tests.
    EngineFactory make_engine{};
};

// Something this thread serves that can be checked without blocking: a
// virtqueue's avail ring.
class PollSource {
public:
    virtual ~PollSource() = default;
    virtual bool ready() const = 0;            // work waiting; cheap, no system call
    virtual void run() = 0;                    // does it
    virtual void set_polling(bool active) = 0; // while polling, guest notifications are off
    virtual void round_end() {}                // asked for with interrupt_at_round_end()
};

// Where an engine's completions go: each request's cookie names its sink
// (the high 32 bits, given by add_sink) and a tag of the sink's own.
class CompletionSink {
public:
    virtual ~CompletionSink() = default;
    virtual void complete(uint32_t tag, int64_t result) = 0;
    virtual void completions_done() = 0;  // after a batch of complete() calls: signal the guest once
};

class IoThread {
public:
    explicit IoThread(IoThreadOptions options);
    ~IoThread();
    IoThread(const IoThread&) = delete;
    IoThread& operator=(const IoThread&) = delete;

    boost::asio::io_context& context() { return io_; }
    const std::string& name() const { return options_.name; }
    const IoThreadOptions& options() const { return options_; }
    bool is_current() const { return std::this_thread::get_id() == thread_.get_id(); }
    pid_t tid() const { return tid_.load(); }  // the kernel's thread id, once running
    const ThreadStats& stats() const { return stats_; }
    // Runs fn on this thread and returns when it has run (at once when already on it).
    void run_and_wait(const std::function<void()>& fn);
    // Runs fn on this thread soon. Other threads hand work to this one only
    // through these two: a thread busy polling looks for posted work without
    // a system call.
    void post(std::function<void()> fn);

    // The rest is for code running on this thread.
    // Handler for an async_wait on this thread's io_context: its operation
    // takes memory kept for it, not the heap.
    template <class Handler>
    WaitHandler<Handler> wait_handler(Handler handler)
    {
        return {std::move(handler), WaitAllocator<void>(wait_memory_)};
    }
    ThreadStats& mutable_stats() { return stats_; }
    // The time of the current loop round (read once per round, when first
    // asked for): request latencies are measured in rounds.
    uint64_t round_ns();
    void add_source(PollSource& source);
    void remove_source(PollSource& source);
    // Calls source.round_end() once the current loop round is over, as QEMU's
    // notify bottom half does: whatever a round completed reaches the guest
    // with one interrupt per queue, not one per engine wakeup.
    void interrupt_at_round_end(PollSource& source);
    uint32_t add_sink(CompletionSink& sink);
    void remove_sink(uint32_t id);
    static uint64_t cookie(uint32_t sink, uint32_t tag) { return uint64_t{sink} << 32 | tag; }
    // Queues a request for the engine of that kind; it goes to the kernel
    // with the others of this round, in batches of at most max_batch.
    void submit(EngineKind kind, const IoRequest& request);
    // The sink's discards and write-zeroes end soon with -ECANCELED, not
    // when their range is done: a queue that stops cancels them first.
    void cancel_allocations(uint32_t sink);
    // Runs this thread's I/O (and nothing else) until done() holds: for a
    // queue that must wait for its requests in flight before it goes.
    void drain_until(const std::function<bool()>& done);
    // Registers a file with the engine of that kind (io_uring fixed files).
    void use_file(EngineKind kind, int fd, bool in_use);
    // From any thread: sets up the engine of that kind now, so that a failure
    // (no aio contexts left, no memory for a ring) is an error where the
    // device is made (lkvm's start), not when the guest starts the device.
    // memory: host ranges (the guest's RAM) for the engine to register
    // (io_uring fixed buffers), once per engine; given for direct disks,
    // where it spares each request pinning its pages.
    void prepare_engine(EngineKind kind, std::span<const iovec> memory = {});

private:
    struct Engine {
        std::unique_ptr<IoEngine> engine;
        std::unique_ptr<boost::asio::posix::stream_descriptor> event;
        std::vector<IoRequest> pending;  // waiting for room in the engine
        bool waiting = false;
        bool memory_registered = false;
    };
    Engine& engine(EngineKind kind);
    void loop();
    void serve_rounds();
    void wait_completions(Engine& e);
    void reap(Engine& e);
    void flush();
    bool poll_once();
    void set_polling(bool active);
    void end_round();
    bool take_posted();

    IoThreadOptions options_;
    WaitMemory wait_memory_;  // before io_: its destructor frees operations into it
    boost::asio::io_context io_{1};
    boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
    std::array<std::optional<Engine>, 4> engines_;  // by EngineKind
    std::vector<PollSource*> sources_;
    std::vector<PollSource*> round_end_, ending_;
    std::vector<CompletionSink*> sinks_;             // by id; nullptr when free
    std::vector<uint32_t> touched_sinks_, spare_sinks_;
    std::vector<IoCompletion> completions_;
    uint64_t poll_ns_ = 0;
    uint64_t round_ns_ = 0;  // 0: not read yet this round
    bool polling_ = false;
    std::atomic<bool> posted_{false};
    ThreadStats stats_;
    std::atomic<pid_t> tid_{0};
    std::thread thread_;  // last: starts once everything above exists
};

}  // namespace lkvm
