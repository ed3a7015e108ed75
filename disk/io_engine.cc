#include "disk/io_engine.h"

#include <fcntl.h>
#include <poll.h>
#include <libaio.h>
#include <liburing.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cerrno>
#include <cstring>

#include "base/error.h"
#include "base/log.h"
#include "disk/ioprio.h"
#include "disk/offload.h"

namespace lkvm {

IoEngine::IoEngine(size_t capacity) : event_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), capacity_(capacity)
{
    if (!event_.valid())
        throw sys_error("eventfd for an I/O engine");
}

void IoEngine::clear_event()
{
    uint64_t value;
    [[maybe_unused]] ssize_t n = ::read(event_.get(), &value, sizeof(value));
}

IoEngine::~IoEngine() = default;

void IoEngine::start_allocation(const IoRequest& request)
{
    if (!allocations_)
        allocations_ = std::make_unique<AllocationWorker>(event_.get(), capacity_);
    allocations_->start(request);
    ++allocations_in_flight_;
    ++in_flight_;
}

size_t IoEngine::reap_allocations(std::vector<IoCompletion>& out)
{
    if (!allocations_ready())
        return 0;
    const size_t n = allocations_->reap(out);
    allocations_in_flight_ -= n;
    in_flight_ -= n;
    return n;
}

bool IoEngine::allocations_ready() const { return allocations_ && allocations_->has_completions(); }

void IoEngine::cancel_allocations(const std::function<bool(uint64_t)>& which)
{
    if (allocations_)
        allocations_->cancel(which);
}

bool IoEngine::wait_for_completions(int timeout_ms)
{
    // The eventfd may still count completions already reaped: a wakeup is a
    // hint to look, and the wait goes on until one is there or time is up.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!has_completions()) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        pollfd p{event_fd(), POLLIN, 0};
        if (left.count() < 0 || ::poll(&p, 1, static_cast<int>(left.count()) + 1) == 0)
            return has_completions();
        clear_event();
    }
    return true;
}

namespace {

// What goes to the engine's worker thread.
bool is_allocation(IoOp op) { return op == IoOp::kDiscard || op == IoOp::kWriteZeroes || op == IoOp::kBlocking; }

// Base for the engines that finish requests inside submit(): completions wait
// in a list until reaped (has_completions() tells; the eventfd stays quiet).
class ImmediateEngine : public IoEngine {
public:
    explicit ImmediateEngine(size_t capacity) : IoEngine(capacity) { done_.reserve(capacity); }
    bool has_completions() const override { return !done_.empty() || allocations_ready(); }
    size_t reap(std::vector<IoCompletion>& out) override
    {
        const size_t n = done_.size();
        out.insert(out.end(), done_.begin(), done_.end());
        done_.clear();
        in_flight_ -= n;
        return n + reap_allocations(out);
    }

protected:
    void complete(uint64_t cookie, int64_t result)
    {
        done_.push_back({cookie, result});
    }
    void submitted(size_t n) { in_flight_ += n; }
    std::vector<IoCompletion> done_;
};

// preadv/pwritev/fdatasync on the calling (I/O) thread.
class SyncEngine final : public ImmediateEngine {
public:
    explicit SyncEngine(size_t capacity) : ImmediateEngine(capacity) {}
    const char* name() const override { return "sync"; }
    void submit(std::span<const IoRequest> batch) override
    {
        for (const auto& r : batch) {
            if (is_allocation(r.op)) {
                start_allocation(r);
                continue;
            }
            if (const int err = apply_ioprio(r.ioprio))
                complete(r.cookie, -err);
            else
                complete(r.cookie, perform(r));
            submitted(1);
        }
    }

private:
    // The thread does the I/O itself, so the priority goes on the thread. A
    // request without one runs at whatever the thread has: nothing is restored,
    // which saves a system call per request when every request carries the same.
    int apply_ioprio(uint16_t ioprio)
    {
        if (ioprio == 0 || ioprio == thread_ioprio_)
            return 0;
        if (::syscall(SYS_ioprio_set, ioprio::kWhoProcess, 0, static_cast<int>(ioprio)) < 0)
            return errno;
        thread_ioprio_ = ioprio;
        return 0;
    }

    int64_t perform(const IoRequest& r)
    {
        if (r.op == IoOp::kFlush)
            return ::fdatasync(r.fd) < 0 ? -errno : 0;
        // A short transfer is continued until done, end of file, or an error,
        // on a copy of the iovecs (the caller's stay as they are) in storage
        // kept from request to request.
        int64_t total = 0;
        std::vector<iovec>& iov = iov_;
        iov.assign(r.iov, r.iov + r.iovcnt);
        size_t first = 0;
        while (first < iov.size()) {
            const ssize_t n = r.op == IoOp::kRead
                                  ? ::preadv(r.fd, &iov[first], static_cast<int>(iov.size() - first),
                                             static_cast<off_t>(r.offset + total))
                                  : ::pwritev(r.fd, &iov[first], static_cast<int>(iov.size() - first),
                                              static_cast<off_t>(r.offset + total));
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -errno;
            if (n == 0)
                break;
            total += n;
            size_t left = static_cast<size_t>(n);
            while (first < iov.size() && left >= iov[first].iov_len)
                left -= iov[first++].iov_len;
            if (first < iov.size()) {
                iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
                iov[first].iov_len -= left;
            }
        }
        return total;
    }

    uint16_t thread_ioprio_ = 0;
    std::vector<iovec> iov_;
};

// Completes every request at once without touching data: the cost of the
// dataplane itself.
class NullEngine final : public ImmediateEngine {
public:
    explicit NullEngine(size_t capacity) : ImmediateEngine(capacity) {}
    const char* name() const override { return "null"; }
    void submit(std::span<const IoRequest> batch) override
    {
        for (const auto& r : batch) {
            int64_t bytes = 0;
            for (int i = 0; i < r.iovcnt; ++i)
                bytes += static_cast<int64_t>(r.iov[i].iov_len);
            complete(r.cookie, r.op == IoOp::kRead || r.op == IoOp::kWrite ? bytes : 0);
        }
        submitted(batch.size());
    }
};

// From linux/aio_abi.h, which cannot be included next to libaio.h: both define struct iocb.
constexpr unsigned kIocbFlagIoprio = 1u << 1;

// The completion ring the kernel maps into our address space; io_context_t
// points at its header (fs/aio.c). Reading it spares a system call when polling.
struct AioRingHeader {
    unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
};
constexpr unsigned kAioRingMagic = 0xa10a10a1;

// Linux AIO: one io_submit per batch, completions signalled on our eventfd.
class NativeEngine final : public IoEngine {
public:
    explicit NativeEngine(size_t capacity) : IoEngine(capacity), iocbs_(capacity), events_(capacity)
    {
        if (const int r = io_setup(static_cast<int>(capacity), &ctx_); r < 0)
            throw Error(std::string("io_setup for the native (libaio) engine: ") + std::strerror(-r) +
                        (r == -EAGAIN ? "; raise /proc/sys/fs/aio-max-nr or use aio=sync" : ""));
        pointers_.reserve(capacity);
        immediate_.reserve(capacity);  // no allocation when many requests fail at once
    }
    ~NativeEngine() override
    {
        // Wait for what the kernel still holds: its buffers belong to the guest.
        for (size_t waiting = kernel_in_flight(immediate_.size()); waiting > 0;) {
            const int n = io_getevents(ctx_, 1, static_cast<long>(events_.size()), events_.data(), nullptr);
            if (n < 0 && n != -EINTR)
                break;
            if (n > 0)
                waiting -= std::min(waiting, static_cast<size_t>(n));
        }
        io_destroy(ctx_);
    }
    const char* name() const override { return "native"; }

    bool has_completions() const override
    {
        if (!immediate_.empty() || allocations_ready())
            return true;
        auto* ring = reinterpret_cast<AioRingHeader*>(ctx_);
        if (ring->magic != kAioRingMagic)
            return in_flight_ > 0;  // unknown layout: let the caller reap to find out
        // The kernel publishes an event before moving tail; acquire makes it visible.
        const unsigned tail = std::atomic_ref(ring->tail).load(std::memory_order_acquire);
        return std::atomic_ref(ring->head).load(std::memory_order_relaxed) != tail;
    }

    void submit(std::span<const IoRequest> batch) override
    {
        // io_submit copies each iocb, so the array is ours again once it returns.
        pointers_.clear();
        if (batch.size() > iocbs_.size())
            iocbs_.resize(batch.size());
        for (size_t i = 0; i < batch.size(); ++i) {
            const IoRequest& r = batch[i];
            if (is_allocation(r.op)) {
                start_allocation(r);
                continue;
            }
            iocb& cb = iocbs_[pointers_.size()];
            switch (r.op) {
            case IoOp::kRead:
                io_prep_preadv(&cb, r.fd, r.iov, r.iovcnt, static_cast<long long>(r.offset));
                break;
            case IoOp::kWrite:
                io_prep_pwritev(&cb, r.fd, r.iov, r.iovcnt, static_cast<long long>(r.offset));
                break;
            case IoOp::kFlush:
            default:
                io_prep_fdsync(&cb, r.fd);
                break;
            }
            cb.data = reinterpret_cast<void*>(r.cookie);
            io_set_eventfd(&cb, event_.get());
            if (r.ioprio) {
                cb.aio_reqprio = static_cast<short>(r.ioprio);
                cb.u.c.flags |= kIocbFlagIoprio;
            }
            pointers_.push_back(&cb);
        }
        size_t done = 0;
        while (done < pointers_.size()) {
            const int n = io_submit(ctx_, static_cast<long>(pointers_.size() - done), pointers_.data() + done);
            if (n > 0) {
                done += static_cast<size_t>(n);
                in_flight_ += static_cast<size_t>(n);
                continue;
            }
            if (n == -EINTR)
                continue;
            // The first remaining request was refused (e.g. fdsync on a
            // filesystem without it): complete it with the error, go on.
            immediate_.push_back({reinterpret_cast<uint64_t>(pointers_[done]->data), n == 0 ? -EAGAIN : n});
            ++done;
            ++in_flight_;
        }
    }

    size_t reap(std::vector<IoCompletion>& out) override
    {
        size_t total = immediate_.size();
        out.insert(out.end(), immediate_.begin(), immediate_.end());
        in_flight_ -= immediate_.size();
        immediate_.clear();
        timespec zero{};
        for (;;) {
            const int n = io_getevents(ctx_, 0, static_cast<long>(events_.size()), events_.data(), &zero);
            if (n <= 0)
                break;
            for (int i = 0; i < n; ++i)
                out.push_back({reinterpret_cast<uint64_t>(events_[i].data), static_cast<int64_t>(events_[i].res)});
            total += static_cast<size_t>(n);
            in_flight_ -= static_cast<size_t>(n);
            if (static_cast<size_t>(n) < events_.size())
                break;
        }
        return total + reap_allocations(out);
    }

private:
    io_context_t ctx_ = nullptr;
    std::vector<iocb> iocbs_;
    std::vector<io_event> events_;
    std::vector<iocb*> pointers_;
    std::vector<IoCompletion> immediate_;  // refused by io_submit
};

// Setup flags newer than some liburing headers; the values are the kernel's ABI.
#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)  // Linux 5.19
#endif
#ifndef IORING_SETUP_TASKRUN_FLAG
#define IORING_SETUP_TASKRUN_FLAG (1U << 9)  // Linux 5.19
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)  // Linux 6.0
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)  // Linux 6.1
#endif
#ifndef IORING_SQ_TASKRUN
#define IORING_SQ_TASKRUN (1U << 2)
#endif

// What the kernel offers, found once per process: whether io_uring works at
// all (kernels can lack it or forbid it: kernel.io_uring_disabled, seccomp),
// and which setup flags it takes. An unknown flag is refused with EINVAL, so
// each is tried on its own (with what it needs), on a one-entry ring: four
// io_uring_setup calls in all.
struct UringProbe {
    bool available = false;
    unsigned setup_flags = 0;
};

const UringProbe& uring_probe()
{
    static const UringProbe probe = [] {
        const auto takes = [](unsigned flags) {
            io_uring ring;
            io_uring_params params{};
            params.flags = flags;
            if (io_uring_queue_init_params(1, &ring, &params) < 0)
                return false;
            io_uring_queue_exit(&ring);
            return true;
        };
        UringProbe p;
        p.available = takes(0);
        if (!p.available)
            return p;
        if (takes(IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG))
            p.setup_flags |= IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
        if (takes(IORING_SETUP_SINGLE_ISSUER)) {
            p.setup_flags |= IORING_SETUP_SINGLE_ISSUER;
            if (takes(IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG))
                p.setup_flags |= IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
        }
        return p;
    }();
    return probe;
}

// The flags of `wanted` that this kernel takes, made consistent: task run
// modes always with TASKRUN_FLAG (has_completions() reads it), which alone is
// invalid; DEFER_TASKRUN only with SINGLE_ISSUER, as the kernel requires.
unsigned usable_setup_flags(unsigned wanted)
{
    unsigned flags = wanted & uring_probe().setup_flags;
    if (!(flags & IORING_SETUP_SINGLE_ISSUER))
        flags &= ~IORING_SETUP_DEFER_TASKRUN;
    if (flags & (IORING_SETUP_COOP_TASKRUN | IORING_SETUP_DEFER_TASKRUN))
        flags |= IORING_SETUP_TASKRUN_FLAG;
    else
        flags &= ~IORING_SETUP_TASKRUN_FLAG;
    return flags;
}

// What blkbench measured best here (see README: io_uring setup flags).
constexpr unsigned kDefaultUringSetup = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
constexpr bool kDefaultUringFixedBuffers = true;

// Owns one io_uring instance.
class Uring {
public:
    Uring(unsigned entries, unsigned setup_flags)
    {
        io_uring_params params{};
        params.flags = setup_flags;
        if (const int r = io_uring_queue_init_params(entries, &ring_, &params); r < 0)
            throw Error(std::string("io_uring_queue_init for the io_uring engine: ") + std::strerror(-r) +
                        "; use aio=native");
    }
    ~Uring() { io_uring_queue_exit(&ring_); }
    Uring(const Uring&) = delete;
    Uring& operator=(const Uring&) = delete;
    io_uring* get() { return &ring_; }
    const io_uring* get() const { return &ring_; }

private:
    io_uring ring_;
};

// Memory given to register_memory() is registered in pieces of 2 MiB (more
// where that would take more than the kernel's 16384 buffers), each when a
// request first uses it.
constexpr size_t kFixedPiece = size_t{2} << 20;
constexpr size_t kMaxFixedBuffers = 16384;

// io_uring: a batch goes to the kernel in one system call, completions are
// read straight from the shared ring and announced through our eventfd.
//
// Setup flags (those asked for and taken): COOP_TASKRUN leaves completions
// that need this thread (task work) until it enters the kernel anyway
// instead of interrupting it; DEFER_TASKRUN leaves them until it asks for
// them. With either, TASKRUN_FLAG marks the SQ ring while some wait, so
// has_completions() stays free of system calls and reap() asks only then.
// SINGLE_ISSUER: only the thread that made the ring may submit to it or
// register with it (others get EEXIST); an I/O thread's engine is made, used
// and given its files and memory there, and only destroyed elsewhere.
class UringEngine final : public IoEngine {
public:
    // The kernel sizes the completion ring at twice the submission ring, so
    // it cannot overflow while callers keep to capacity().
    UringEngine(size_t capacity, unsigned setup_flags, bool fixed_buffers)
        : IoEngine(capacity),
          ring_(static_cast<unsigned>(std::bit_ceil(std::max<size_t>(capacity, 1))), usable_setup_flags(setup_flags)),
          fixed_buffers_(fixed_buffers)
    {
        if (const int r = io_uring_register_eventfd(ring_.get(), event_.get()); r < 0)
            throw Error(std::string("io_uring_register_eventfd for the io_uring engine: ") + std::strerror(-r) +
                        "; use aio=native");
        // Empty slots for register_file() to fill. Without them (an older
        // kernel, a tight RLIMIT_NOFILE) requests simply name their fd.
        std::vector<int> empty(kFileSlots, -1);
        if (io_uring_register_files(ring_.get(), empty.data(), kFileSlots) == 0)
            slot_fd_ = std::move(empty);
        immediate_.reserve(capacity);  // no allocation when many requests fail at once
    }
    ~UringEngine() override
    {
        // Wait for what the kernel still holds: its buffers belong to the guest.
        size_t waiting = kernel_in_flight(immediate_.size());
        // Another thread than the ring's may get here: a single-issuer ring
        // then takes no submission, and what is still queued holds nothing.
        if (flush() < 0)
            waiting -= std::min<size_t>(waiting, io_uring_sq_ready(ring_.get()));
        while (waiting > 0) {
            io_uring_cqe* cqe = nullptr;
            const int r = io_uring_wait_cqe(ring_.get(), &cqe);
            // EEXIST: a DEFER_TASKRUN ring, off its thread, whose completions
            // only that thread may post. Closing the ring leaves the requests
            // to the kernel, which cancels or finishes them.
            if (r < 0 && r != -EINTR)
                break;
            waiting -= std::min(waiting, drain([](const io_uring_cqe&) {}));
        }
    }
    const char* name() const override { return "io_uring"; }

    void submit(std::span<const IoRequest> batch) override
    {
        for (const IoRequest& r : batch) {
            if (is_allocation(r.op)) {
                start_allocation(r);
                continue;
            }
            ++in_flight_;
            io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
            int err = 0;
            if (!sqe) {  // more than capacity() asked for: make room
                err = flush();
                sqe = io_uring_get_sqe(ring_.get());
            }
            if (sqe) {
                prepare(*sqe, r);
            } else {
                immediate_.push_back({r.cookie, err ? err : -EAGAIN});
            }
        }
        flush();
    }

    size_t reap(std::vector<IoCompletion>& out) override
    {
        flush();
        // Completions waiting as task work reach the ring when we enter the kernel.
        if (taskrun_pending())
            io_uring_get_events(ring_.get());
        size_t total = immediate_.size();
        out.insert(out.end(), immediate_.begin(), immediate_.end());
        in_flight_ -= immediate_.size();
        immediate_.clear();
        total += reap_allocations(out);
        return total + drain([&](const io_uring_cqe& c) { out.push_back({c.user_data, c.res}); });
    }

    void set_event_notification(bool on) override
    {
        if (on == notify_)
            return;
        notify_ = on;
        // Fails only where the kernel has no CQ ring flags (before 5.8): the
        // eventfd then simply stays on.
        io_uring_cq_eventfd_toggle(ring_.get(), on);
        // Dekker: the kernel stores a completion's CQ tail (or, with task run
        // flags, sets IORING_SQ_TASKRUN) and then reads the flag; we clear
        // the flag and then the caller reads the tail (and IORING_SQ_TASKRUN). Each
        // side needs a full barrier between its store and its load, or both
        // may read the old value and the completion goes unsignalled and
        // unseen while the caller sleeps. The kernel's side: 6.1 takes
        // completion_lock (a locked instruction) before io_eventfd_signal()
        // reads cq_flags. This is ours.
        if (on)
            std::atomic_thread_fence(std::memory_order_seq_cst);
    }

    bool has_completions() const override
    {
        // Requests a failed submission left queued count too: reap() retries
        // them. Task work may post nothing (a request a kernel worker did is
        // freed that way): reap() then finds nothing, and the flag is gone.
        return io_uring_cq_ready(ring_.get()) > 0 || !immediate_.empty() || io_uring_sq_ready(ring_.get()) > 0 ||
               taskrun_pending() || allocations_ready();
    }

    // The ring gets an open file description of its own for the file (with
    // the caller's O_DIRECT and O_DSYNC: the cache mode's guarantees): the
    // kernel drops a ring's files only some time after the ring is gone, and
    // the image's lock (held by the caller's description) must go the moment
    // the caller closes it, or the next lkvm finds the image "in use".
    void register_file(int fd) override
    {
        if (fd < 0 || slot_of(fd) >= 0)
            return;
        const auto free = std::ranges::find(slot_fd_, -1);
        if (free == slot_fd_.end())
            return;  // the table is full: the file works unregistered
        const auto slot = static_cast<unsigned>(free - slot_fd_.begin());
        const int flags = ::fcntl(fd, F_GETFL);
        Fd own(flags < 0 ? -1
                         : ::open(("/proc/self/fd/" + std::to_string(fd)).c_str(),
                                  (flags & (O_ACCMODE | O_DIRECT | O_DSYNC)) | O_CLOEXEC));
        int registered = own.get();
        if (!own.valid() || io_uring_register_files_update(ring_.get(), slot, &registered, 1) != 1)
            return;
        *free = fd;
        own_fds_[slot] = std::move(own);
        slot_direct_[slot] = (flags & O_DIRECT) != 0;
        if (static_cast<size_t>(fd) >= fd_slot_.size())
            fd_slot_.resize(static_cast<size_t>(fd) + 1, -1);
        fd_slot_[static_cast<size_t>(fd)] = static_cast<int>(slot);
    }

    void register_memory(std::span<const iovec> regions) override
    {
        // Nothing is pinned yet: registering all of the guest's RAM at once
        // would fault in and pin every page of it (2 GiB: seconds) before
        // the guest boots. A piece is registered when a request first lies
        // in it, so only memory the guest does I/O from is pinned, and a
        // system call is paid once per piece.
        if (!pieces_.empty())
            io_uring_unregister_buffers(ring_.get());
        fixed_.clear();
        pieces_.clear();
        if (!fixed_buffers_)
            return;
        size_t total = 0;
        for (const iovec& r : regions)
            total += r.iov_len;
        piece_ = kFixedPiece;
        while ((total + piece_ - 1) / piece_ + regions.size() > kMaxFixedBuffers)
            piece_ *= 2;
        std::vector<FixedRegion> fixed;
        size_t count = 0;
        for (const iovec& r : regions) {
            if (r.iov_len == 0)
                continue;
            fixed.push_back({reinterpret_cast<uintptr_t>(r.iov_base), r.iov_len, static_cast<unsigned>(count)});
            count += (r.iov_len + piece_ - 1) / piece_;
        }
        // A table of empty slots. Refused (an old kernel): no fixed buffers.
        if (count == 0 || io_uring_register_buffers_sparse(ring_.get(), static_cast<unsigned>(count)) < 0)
            return;
        fixed_ = std::move(fixed);
        pieces_.assign(count, kPieceEmpty);
    }

    void unregister_file(int fd) override
    {
        const int slot = slot_of(fd);
        if (slot < 0)
            return;
        // Requests still in flight hold their own reference to the file.
        const int none = -1;
        io_uring_register_files_update(ring_.get(), static_cast<unsigned>(slot), &none, 1);
        slot_fd_[static_cast<size_t>(slot)] = -1;
        own_fds_[static_cast<size_t>(slot)] = Fd();
        fd_slot_[static_cast<size_t>(fd)] = -1;
    }

private:
    static constexpr unsigned kFileSlots = 64;

    // Memory for fixed buffers: pieces first, first + 1, ... of piece_ bytes
    // from base on (the last one shorter).
    struct FixedRegion {
        uintptr_t base;
        size_t length;
        unsigned first;
    };
    enum PieceState : uint8_t { kPieceEmpty, kPieceRegistered };

    int slot_of(int fd) const
    {
        return fd >= 0 && static_cast<size_t>(fd) < fd_slot_.size() ? fd_slot_[static_cast<size_t>(fd)] : -1;
    }

    // The registered buffer that holds all of [address, address + length),
    // registered now if need be; -1 when there is none.
    int fixed_buffer(const void* address, size_t length)
    {
        const auto a = reinterpret_cast<uintptr_t>(address);
        for (const FixedRegion& f : fixed_) {
            const uintptr_t at = a - f.base;  // below base it wraps, and so is too large
            if (at >= f.length || length == 0 || length > f.length - at)
                continue;
            const size_t index = at / piece_;
            if ((at + length - 1) / piece_ != index)
                return -1;  // across two pieces
            const unsigned buffer = f.first + static_cast<unsigned>(index);
            if (pieces_[buffer] == kPieceRegistered)
                return static_cast<int>(buffer);
            iovec piece{reinterpret_cast<void*>(f.base + index * piece_), std::min(piece_, f.length - index * piece_)};
            if (io_uring_register_buffers_update_tag(ring_.get(), buffer, &piece, nullptr, 1) == 1) {
                pieces_[buffer] = kPieceRegistered;
                return static_cast<int>(buffer);
            }
            // RLIMIT_MEMLOCK (without CAP_IPC_LOCK), memory the kernel cannot
            // pin: requests go as before, and no more is tried.
            fixed_.clear();
            return -1;
        }
        return -1;
    }

    // Completions wait as task work until this thread enters the kernel (only
    // rings with TASKRUN_FLAG say so).
    bool taskrun_pending() const
    {
        return (IO_URING_READ_ONCE(*ring_.get()->sq.kflags) & IORING_SQ_TASKRUN) != 0;
    }

    void prepare(io_uring_sqe& sqe, const IoRequest& r)
    {
        const int slot = slot_of(r.fd);
        const int fd = slot >= 0 ? slot : r.fd;
        const auto iovcnt = static_cast<unsigned>(r.iovcnt);
        // A registered O_DIRECT file and one buffer within registered memory:
        // READ_FIXED/WRITE_FIXED (one contiguous buffer), which spare the
        // request pinning its pages. Requests with more buffers (a guest's
        // pages are seldom contiguous) go as vectors; so do those of page
        // cache files, which pin nothing, and whose copy a fixed buffer made
        // slower (blkbench: 1.15 -> 1.40 us of CPU per 4k read).
        const int buffer = !fixed_.empty() && slot >= 0 && slot_direct_[static_cast<size_t>(slot)] && r.iovcnt == 1
                               ? fixed_buffer(r.iov[0].iov_base, r.iov[0].iov_len)
                               : -1;
        switch (r.op) {
        case IoOp::kRead:
            if (buffer >= 0)
                io_uring_prep_read_fixed(&sqe, fd, r.iov[0].iov_base, static_cast<unsigned>(r.iov[0].iov_len), r.offset,
                                         buffer);
            else
                io_uring_prep_readv(&sqe, fd, r.iov, iovcnt, r.offset);
            break;
        case IoOp::kWrite:
            if (buffer >= 0)
                io_uring_prep_write_fixed(&sqe, fd, r.iov[0].iov_base, static_cast<unsigned>(r.iov[0].iov_len),
                                          r.offset, buffer);
            else
                io_uring_prep_writev(&sqe, fd, r.iov, iovcnt, r.offset);
            break;
        case IoOp::kFlush:
        default:  // allocations never get here
            io_uring_prep_fsync(&sqe, fd, IORING_FSYNC_DATASYNC);
            break;
        }
        if (slot >= 0)
            io_uring_sqe_set_flags(&sqe, IOSQE_FIXED_FILE);
        // The kernel refuses (-EINVAL) a priority on operations without one, fsync among them.
        if (r.op != IoOp::kFlush)
            sqe.ioprio = r.ioprio;
        io_uring_sqe_set_data64(&sqe, r.cookie);
    }

    // Hands the queued requests to the kernel; returns 0 or -errno. A request
    // the kernel rejects still completes, with its error, through the ring. A
    // failed call (no memory, a completion backlog) leaves the requests queued
    // for the next submit() or reap(): has_completions() says so.
    int flush()
    {
        while (io_uring_sq_ready(ring_.get()) > 0) {
            const int n = io_uring_submit(ring_.get());
            if (n == -EINTR)
                continue;
            if (n <= 0)
                return n < 0 ? n : -EAGAIN;
        }
        return 0;
    }

    // Consumes every completion in the ring, each passed to `take`; returns how many.
    template <class Take>
    size_t drain(Take&& take)
    {
        size_t total = 0;
        std::array<io_uring_cqe*, 32> cqes;
        for (;;) {
            const unsigned n = io_uring_peek_batch_cqe(ring_.get(), cqes.data(), cqes.size());
            for (unsigned i = 0; i < n; ++i)
                take(*cqes[i]);
            io_uring_cq_advance(ring_.get(), n);
            in_flight_ -= n;
            total += n;
            if (n < cqes.size())
                return total;
        }
    }

    Uring ring_;
    bool fixed_buffers_;  // register_memory() registers
    std::vector<FixedRegion> fixed_;  // memory for fixed buffers; empty: none
    std::vector<PieceState> pieces_;  // buffer index -> whether registered yet
    size_t piece_ = kFixedPiece;
    bool notify_ = true;  // the CQ eventfd is signalled
    std::vector<IoCompletion> immediate_;  // refused by the kernel
    std::vector<int> slot_fd_;  // registered file slot -> the caller's fd, -1 when free
    std::array<Fd, kFileSlots> own_fds_;  // slot -> the ring's own description of that file
    std::array<bool, kFileSlots> slot_direct_{};  // slot -> the file is O_DIRECT
    std::vector<int> fd_slot_;  // fd -> its slot, -1 when not registered
};

}  // namespace

unsigned uring_setup_flags_supported()
{
    return uring_probe().setup_flags;
}

unsigned default_uring_setup_flags()
{
    return kDefaultUringSetup;
}

bool default_uring_fixed_buffers()
{
    return kDefaultUringFixedBuffers;
}

std::unique_ptr<IoEngine> make_uring_engine(size_t capacity, unsigned setup_flags, bool fixed_buffers)
{
    return std::make_unique<UringEngine>(capacity, setup_flags, fixed_buffers);
}

std::unique_ptr<IoEngine> make_io_engine(EngineKind kind, size_t capacity)
{
    switch (kind) {
    case EngineKind::kSync: return std::make_unique<SyncEngine>(capacity);
    case EngineKind::kNull: return std::make_unique<NullEngine>(capacity);
    case EngineKind::kNative: return std::make_unique<NativeEngine>(capacity);
    case EngineKind::kIoUring:
        return std::make_unique<UringEngine>(capacity, kDefaultUringSetup, kDefaultUringFixedBuffers);
    }
    throw Error("unknown I/O engine");
}

EngineKind parse_engine_kind(const std::string& name)
{
    if (name == "sync") return EngineKind::kSync;
    if (name == "native") return EngineKind::kNative;
    if (name == "io_uring") return EngineKind::kIoUring;
    if (name == "null") return EngineKind::kNull;
    throw Error("aio=" + name + ": unknown I/O engine; use sync, native, io_uring or null");
}

const char* engine_kind_name(EngineKind kind)
{
    switch (kind) {
    case EngineKind::kSync: return "sync";
    case EngineKind::kNative: return "native";
    case EngineKind::kIoUring: return "io_uring";
    case EngineKind::kNull: return "null";
    }
    return "?";
}

EngineKind default_engine_kind()
{
    return uring_probe().available ? EngineKind::kIoUring : EngineKind::kNative;
}

}  // namespace lkvm
