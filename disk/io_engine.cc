#include "disk/io_engine.h"

#include <libaio.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "base/error.h"

namespace lkvm {

IoEngine::IoEngine(size_t capacity) : event_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), capacity_(capacity)
{
    if (!event_.valid())
        throw sys_error("eventfd for an I/O engine");
}

void IoEngine::signal()
{
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(event_.get(), &one, sizeof(one));
}

void IoEngine::clear_signal()
{
    uint64_t value;
    [[maybe_unused]] ssize_t n = ::read(event_.get(), &value, sizeof(value));
}

namespace {

// Base for the engines that finish requests inside submit(): completions wait
// in a list until reaped, announced through the eventfd.
class ImmediateEngine : public IoEngine {
public:
    explicit ImmediateEngine(size_t capacity) : IoEngine(capacity) {}
    size_t reap(std::vector<IoCompletion>& out) override
    {
        clear_signal();
        const size_t n = done_.size();
        out.insert(out.end(), done_.begin(), done_.end());
        done_.clear();
        in_flight_ -= n;
        return n;
    }

protected:
    void complete(uint64_t cookie, int64_t result)
    {
        done_.push_back({cookie, result});
    }
    void submitted(size_t n)
    {
        in_flight_ += n;
        if (n)
            signal();
    }
    std::vector<IoCompletion> done_;
};

// preadv/pwritev/fdatasync on the calling (I/O) thread.
class SyncEngine final : public ImmediateEngine {
public:
    explicit SyncEngine(size_t capacity) : ImmediateEngine(capacity) {}
    const char* name() const override { return "sync"; }
    void submit(std::span<const IoRequest> batch) override
    {
        for (const auto& r : batch)
            complete(r.cookie, perform(r));
        submitted(batch.size());
    }

private:
    static int64_t perform(const IoRequest& r)
    {
        if (r.op == IoOp::kFlush)
            return ::fdatasync(r.fd) < 0 ? -errno : 0;
        // A short transfer is continued until done, end of file, or an error.
        int64_t total = 0;
        std::vector<iovec> iov(r.iov, r.iov + r.iovcnt);
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
            complete(r.cookie, r.op == IoOp::kFlush ? 0 : bytes);
        }
        submitted(batch.size());
    }
};

// Linux AIO: one io_submit per batch, completions signalled on our eventfd.
class NativeEngine final : public IoEngine {
public:
    explicit NativeEngine(size_t capacity) : IoEngine(capacity), iocbs_(capacity), events_(capacity)
    {
        if (const int r = io_setup(static_cast<int>(capacity), &ctx_); r < 0)
            throw Error(std::string("io_setup for the native (libaio) engine: ") + std::strerror(-r) +
                        (r == -EAGAIN ? "; raise /proc/sys/fs/aio-max-nr or use aio=sync" : ""));
        pointers_.reserve(capacity);
    }
    ~NativeEngine() override
    {
        // Wait for what the kernel still holds: its buffers belong to the guest.
        while (in_flight_ > 0) {
            const int n = io_getevents(ctx_, 1, static_cast<long>(events_.size()), events_.data(), nullptr);
            if (n < 0 && n != -EINTR)
                break;
            if (n > 0)
                in_flight_ -= static_cast<size_t>(n);
        }
        io_destroy(ctx_);
    }
    const char* name() const override { return "native"; }

    void submit(std::span<const IoRequest> batch) override
    {
        // io_submit copies each iocb, so the array is ours again once it returns.
        pointers_.clear();
        if (batch.size() > iocbs_.size())
            iocbs_.resize(batch.size());
        for (size_t i = 0; i < batch.size(); ++i) {
            const IoRequest& r = batch[i];
            iocb& cb = iocbs_[i];
            switch (r.op) {
            case IoOp::kRead:
                io_prep_preadv(&cb, r.fd, r.iov, r.iovcnt, static_cast<long long>(r.offset));
                break;
            case IoOp::kWrite:
                io_prep_pwritev(&cb, r.fd, r.iov, r.iovcnt, static_cast<long long>(r.offset));
                break;
            case IoOp::kFlush:
                io_prep_fdsync(&cb, r.fd);
                break;
            }
            cb.data = reinterpret_cast<void*>(r.cookie);
            io_set_eventfd(&cb, event_.get());
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
            refused_.push_back({reinterpret_cast<uint64_t>(pointers_[done]->data), n == 0 ? -EAGAIN : n});
            ++done;
            ++in_flight_;
            signal();
        }
    }

    size_t reap(std::vector<IoCompletion>& out) override
    {
        clear_signal();
        size_t total = refused_.size();
        out.insert(out.end(), refused_.begin(), refused_.end());
        in_flight_ -= refused_.size();
        refused_.clear();
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
        return total;
    }

private:
    io_context_t ctx_ = nullptr;
    std::vector<iocb> iocbs_;
    std::vector<io_event> events_;
    std::vector<iocb*> pointers_;
    std::vector<IoCompletion> refused_;
};

}  // namespace

std::unique_ptr<IoEngine> make_io_engine(EngineKind kind, size_t capacity)
{
    switch (kind) {
    case EngineKind::kSync: return std::make_unique<SyncEngine>(capacity);
    case EngineKind::kNull: return std::make_unique<NullEngine>(capacity);
    case EngineKind::kNative: return std::make_unique<NativeEngine>(capacity);
    }
    throw Error("unknown I/O engine");
}

EngineKind parse_engine_kind(const std::string& name)
{
    if (name == "sync") return EngineKind::kSync;
    if (name == "native") return EngineKind::kNative;
    if (name == "null") return EngineKind::kNull;
    throw Error("aio=" + name + ": unknown I/O engine; use sync, native or null");
}

const char* engine_kind_name(EngineKind kind)
{
    switch (kind) {
    case EngineKind::kSync: return "sync";
    case EngineKind::kNative: return "native";
    case EngineKind::kNull: return "null";
    }
    return "?";
}

}  // namespace lkvm
