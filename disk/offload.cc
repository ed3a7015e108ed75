#include "disk/offload.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace lkvm {

namespace {

int64_t fallocate_range(int fd, int mode, uint64_t offset, uint64_t length)
{
    while (::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) < 0)
        if (errno != EINTR)
            return -errno;
    return 0;
}

int64_t write_zeroes_by_hand(int fd, uint64_t offset, uint64_t length, const std::atomic<bool>& cancel)
{
    // Aligned, so that it works on O_DIRECT files too.
    constexpr size_t kChunk = 1 << 20;
    void* raw = nullptr;
    if (::posix_memalign(&raw, 4096, kChunk) != 0)
        return -ENOMEM;
    std::unique_ptr<void, void (*)(void*)> zeroes(raw, ::free);
    std::memset(raw, 0, kChunk);
    for (uint64_t done = 0; done < length;) {
        if (cancel.load(std::memory_order_relaxed))
            return -ECANCELED;
        const ssize_t n = ::pwrite(fd, raw, std::min<uint64_t>(kChunk, length - done), static_cast<off_t>(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += static_cast<uint64_t>(n);
    }
    return 0;
}

}  // namespace

int64_t perform_allocation(const IoRequest& r, const std::atomic<bool>& cancel)
{
    if (r.op == IoOp::kBlocking)
        return r.job ? r.job->run(cancel) : -EINVAL;
    // Files: punch a hole, or zero the range. Block devices take the same
    // calls (blkdev_fallocate): a punch there is BLKZEROOUT allowed to unmap,
    // not BLKDISCARD, whose blocks may read back as anything, while both our
    // devices promise zeroes after a discard (SCSI's LBPRZ, virtio-blk's
    // write_zeroes_may_unmap). Without either mode the zeroes are written.
    const int mode = r.op == IoOp::kDiscard ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                                            : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    const int64_t result = fallocate_range(r.fd, mode, r.offset, r.length);
    if (result != -EOPNOTSUPP)
        return result;
    return write_zeroes_by_hand(r.fd, r.offset, r.length, cancel);
}

AllocationWorker::AllocationWorker(int event_fd, size_t capacity)
    : event_fd_(event_fd), thread_([this](std::stop_token stop) { run(stop); })
{
    std::lock_guard lock(mutex_);
    queued_.reserve(capacity);
    done_.reserve(capacity);
}

AllocationWorker::~AllocationWorker()
{
    {
        std::lock_guard lock(mutex_);
        queued_.clear();
        cancel_running_ = true;
    }
    thread_.request_stop();  // and ~jthread joins
}

void AllocationWorker::start(const IoRequest& request)
{
    {
        std::lock_guard lock(mutex_);
        queued_.push_back(request);
    }
    wake_.notify_one();
}

size_t AllocationWorker::reap(std::vector<IoCompletion>& out)
{
    std::lock_guard lock(mutex_);
    const size_t n = done_.size();
    out.insert(out.end(), done_.begin(), done_.end());
    done_.clear();
    ready_.store(false, std::memory_order_relaxed);
    return n;
}

void AllocationWorker::cancel(const std::function<bool(uint64_t)>& which)
{
    std::lock_guard lock(mutex_);
    std::erase_if(queued_, [&](const IoRequest& r) {
        if (!which(r.cookie))
            return false;
        finish(r.cookie, -ECANCELED);
        return true;
    });
    if (running_ && which(running_cookie_))
        cancel_running_ = true;
}

void AllocationWorker::finish(uint64_t cookie, int64_t result)
{
    done_.push_back({cookie, result});
    ready_.store(true, std::memory_order_release);
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(event_fd_, &one, sizeof(one));
}

void AllocationWorker::run(std::stop_token stop)
{
    std::unique_lock lock(mutex_);
    while (wake_.wait(lock, stop, [this] { return !queued_.empty(); }) && !stop.stop_requested()) {
        const IoRequest request = queued_.front();
        queued_.erase(queued_.begin());
        running_ = true;
        running_cookie_ = request.cookie;
        cancel_running_ = false;
        lock.unlock();
        const int64_t result = perform_allocation(request, cancel_running_);
        lock.lock();
        running_ = false;
        finish(request.cookie, result);
    }
}

}  // namespace lkvm
