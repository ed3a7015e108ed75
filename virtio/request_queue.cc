#include "virtio/request_queue.h"

#include <unistd.h>

#include <boost/asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>

#include "base/log.h"

namespace lkvm {

size_t copy_from_iovecs(std::span<const iovec> iovs, std::span<uint8_t> dst)
{
    size_t copied = 0;
    for (const auto& v : iovs) {
        if (copied == dst.size())
            break;  // first: an empty span's data() may be null, not even for memcpy of 0 bytes
        const size_t n = std::min(dst.size() - copied, v.iov_len);
        std::memcpy(dst.data() + copied, v.iov_base, n);
        copied += n;
    }
    return copied;
}

size_t copy_to_iovecs(std::span<const iovec> iovs, std::span<const uint8_t> src)
{
    size_t copied = 0;
    for (const auto& v : iovs) {
        if (copied == src.size())
            break;  // first: an empty span's data() may be null, not even for memcpy of 0 bytes
        const size_t n = std::min(src.size() - copied, v.iov_len);
        std::memcpy(v.iov_base, src.data() + copied, n);
        copied += n;
    }
    return copied;
}

void slice_iovecs(std::span<const iovec> iovs, uint64_t skip, uint64_t max_bytes, std::vector<iovec>& out)
{
    out.clear();
    for (const auto& v : iovs) {
        if (max_bytes == 0)
            break;
        if (skip >= v.iov_len) {
            skip -= v.iov_len;
            continue;
        }
        const size_t take = static_cast<size_t>(std::min<uint64_t>(v.iov_len - skip, max_bytes));
        out.push_back({static_cast<uint8_t*>(v.iov_base) + skip, take});
        max_bytes -= take;
        skip = 0;
    }
}

std::span<const iovec> skip_iovec_bytes(std::vector<iovec>& iovs, uint64_t skip)
{
    size_t first = 0;
    while (first < iovs.size() && skip >= iovs[first].iov_len)
        skip -= iovs[first++].iov_len;
    if (first < iovs.size()) {
        iovs[first].iov_base = static_cast<uint8_t*>(iovs[first].iov_base) + skip;
        iovs[first].iov_len -= skip;
    }
    return std::span(iovs).subspan(first);
}

uint64_t iovecs_bytes(std::span<const iovec> iovs)
{
    uint64_t n = 0;
    for (const auto& v : iovs)
        n += v.iov_len;
    return n;
}

void report_io_error_once(std::atomic<bool>& reported, const std::string& path, int64_t result,
                          const char* guest_gets)
{
    if (!reported.exchange(true))
        log_warn("disk " + path + ": I/O error (" +
                 (result < 0 ? std::string(std::strerror(static_cast<int>(-result))) : "short transfer") +
                 "); the guest gets " + guest_gets + ", further errors are not reported");
}

namespace {
int current_tid()
{
    thread_local const int tid = ::gettid();
    return tid;
}
}  // namespace

// The requests of one throttle group that this queue holds back, in the
// order the guest made them, and the timer that brings them back.
class RequestQueue::ThrottleGate final : public ThrottleGroup::Member {
public:
    ThrottleGate(RequestQueue& queue, ThrottleGroup& group) : queue_(queue), group_(group), timer_(queue.thread_.context()) {}

    ThrottleGroup& group() const { return group_; }
    bool holding() const { return !held_.empty(); }
    void hold(uint32_t slot)
    {
        held_.push_back(slot);
        dispatch();
    }

    // Submits what the group lets go, in order; arms the timer for the rest.
    void dispatch()
    {
        submit_admitted();
        queue_.count_throttled_time();
    }

    // The queue stops: out of the group's line, and what was held is the
    // guest's no more (a reset answers nothing).
    std::deque<uint32_t> stop()
    {
        group_.leave(*this);
        timer_.cancel();
        return std::exchange(held_, {});
    }

    void resume() override
    {
        queue_.thread_.post([queue = queue_.weak_from_this(), this] {
            if (const auto alive = queue.lock(); alive && !alive->stopping_)
                dispatch();
        });
    }

private:
    void submit_admitted()
    {
        while (!held_.empty()) {
            const Slot& slot = queue_.slots_[held_.front()];
            const auto verdict = group_.admit(*this, slot.request.op != IoOp::kRead, slot.bytes, held_.size() > 1);
            if (!verdict.go) {
                if (verdict.wait_ns)
                    wait(verdict.wait_ns);
                return;
            }
            held_.pop_front();
            --queue_.held_;
            queue_.dispatch(slot.target->engine, slot.target->snapshot, slot.request);
        }
    }

    void wait(uint64_t ns)
    {
        timer_.expires_after(std::chrono::nanoseconds(ns));
        timer_.async_wait(queue_.thread_.wait_handler([queue = queue_.weak_from_this(), this](const boost::system::error_code& error) {
            const auto alive = queue.lock();
            if (error || !alive || alive->stopping_)
                return;  // re-armed or cancelled since
            dispatch();
        }));
    }

    RequestQueue& queue_;
    ThrottleGroup& group_;
    boost::asio::steady_timer timer_;
    std::deque<uint32_t> held_;
};

RequestQueue::RequestQueue(IoThread& thread, const QueueSetup& setup, bool event_idx, QueueStats& stats,
                           RequestQueueConfig config)
    : thread_(thread),
      config_(std::move(config)),
      ring_(config_.memory, setup.rings, event_idx, config_.limits),
      notify_(thread.context(), ::dup(setup.notify_fd)),
      interrupt_(setup.interrupt),
      stats_(stats),
      slots_(config_.slots)
{
    for (uint32_t i = 0; i < slots_.size(); ++i)
        free_slots_.push_back(static_cast<uint32_t>(slots_.size() - 1 - i));
    // Every chain is walked into this one, whatever its size: no allocation per request.
    chain_.readable.reserve(config_.limits.max_segments);
    chain_.writable.reserve(config_.limits.max_segments);
    for (const auto& target : config_.targets)
        if (target.throttle && std::ranges::none_of(gates_, [&](const auto& g) { return &g->group() == target.throttle; }))
            gates_.push_back(std::make_unique<ThrottleGate>(*this, *target.throttle));
}

RequestQueue::~RequestQueue() = default;

void RequestQueue::start(std::function<void()> broken)
{
    broken_ = std::move(broken);
    for (const auto& target : config_.targets)
        thread_.use_file(target.engine, target.fd, true);
    sink_ = thread_.add_sink(*this);
    thread_.add_source(*this);
    registered_ = true;
    wait_notify();
    process();  // the driver may have kicked before DRIVER_OK
}

void RequestQueue::stop()
{
    stopping_ = true;
    notify_.close();
    count_throttled_time();
    // Held back by a throttle group, or waiting for a retry: not at the
    // engine, so nothing else would ever free them.
    for (auto& gate : gates_)
        for (const uint32_t id : gate->stop())
            drop(id);
    held_ = 0;
    for (const uint32_t id : std::exchange(failed_, {}))
        drop(id);
    if (registered_) {
        thread_.remove_source(*this);
        // A reset must not wait for a GiB of zeroes: what the guest asked
        // of a device it resets may be left half done.
        thread_.cancel_allocations(sink_);
        thread_.drain_until([this] { return free_slots_.size() == slots_.size(); });
        thread_.remove_sink(sink_);
        registered_ = false;
    }
    for (const auto& target : config_.targets)
        thread_.use_file(target.engine, target.fd, false);
}

bool RequestQueue::ready() const
{
    return !broken_ring_ && !free_slots_.empty() && ring_.has_available();
}

void RequestQueue::set_polling(bool active)
{
    polling_ = active;
    if (!broken_ring_)
        ring_.set_notifications(!active);
}

void RequestQueue::wait_notify()
{
    notify_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                       thread_.wait_handler([self = weak_from_this()](const boost::system::error_code& error) {
                           auto queue = self.lock();
                           if (error || !queue || queue->stopping_)
                               return;  // stopped since: the kick is for nobody
                           uint64_t kicks;
                           if (::read(queue->notify_.native_handle(), &kicks, sizeof(kicks)) == sizeof(kicks))
                               queue->stats_.kicked(kicks);
                           queue->process();
                           if (!queue->broken_ring_)
                               queue->wait_notify();
                       }));
}

void RequestQueue::process()
{
    stats_.served_by(current_tid());
    while (!broken_ring_ && !stopping_) {
        ring_.set_notifications(false);
        while (!free_slots_.empty()) {
            const auto popped = ring_.pop(chain_);
            if (!popped)
                return mark_broken(describe(popped.error()));
            if (!popped.value())
                break;
            handle(chain_);
            if (broken_ring_)
                return;
        }
        if (free_slots_.empty()) {
            out_of_slots_ = true;  // completions will bring us back
            break;
        }
        if (polling_)
            break;  // the thread looks at the ring again soon, no kick needed
        // Style of QEMU's aio-posix: re-enable, then look once more before sleeping.
        ring_.set_notifications(true);
        if (!ring_.has_available())
            break;
    }
    signal();
}

uint32_t RequestQueue::take_slot(uint16_t head)
{
    const uint32_t id = free_slots_.back();
    free_slots_.pop_back();
    Slot& slot = slots_[id];
    slot.head = head;
    slot.started_ns = thread_.round_ns();
    stats_.started();
    thread_.mutable_stats().io.started();
    return id;
}

void RequestQueue::submit(uint32_t id, const IoTarget& target, IoOp op, uint64_t offset, std::span<const iovec> data,
                          uint64_t length)
{
    Slot& slot = slots_[id];
    slot.bounced = false;
    slot.iov.assign(data.begin(), data.end());  // the slot's storage, kept from request to request
    const uint32_t align = target.alignment;
    const bool moves_data = op == IoOp::kRead || op == IoOp::kWrite;
    if (moves_data && align > 1 && std::ranges::any_of(slot.iov, [&](const iovec& v) {
            return reinterpret_cast<uintptr_t>(v.iov_base) % align || v.iov_len % align;
        })) {
        // O_DIRECT wants aligned buffers; the guest's are not: go through one
        // that is, the slot's own, kept for the next request that needs one.
        const uint64_t bytes = iovecs_bytes(slot.iov);
        if (!slot.bounce || slot.bounce_bytes < bytes || slot.bounce_align < align) {
            void* buffer = nullptr;
            if (::posix_memalign(&buffer, align, std::max<uint64_t>(bytes, align)) != 0)
                return io_done(id, -ENOMEM);
            slot.bounce.reset(static_cast<uint8_t*>(buffer));
            slot.bounce_bytes = bytes;
            slot.bounce_align = align;
        }
        if (op == IoOp::kWrite)
            copy_from_iovecs(slot.iov, {slot.bounce.get(), static_cast<size_t>(bytes)});
        std::swap(slot.guest, slot.iov);
        slot.iov.assign(1, {slot.bounce.get(), static_cast<size_t>(bytes)});
        slot.bounced = true;
    }
    IoRequest request{op,          target.fd, offset, slot.iov.data(), static_cast<int>(slot.iov.size()),
                      IoThread::cookie(sink_, id), target.ioprio};
    request.length = length;
    slot.request = request;
    slot.target = &target;
    slot.bytes = moves_data ? iovecs_bytes(slot.iov) : length;
    if (op == IoOp::kFlush)
        stats_.flushed();
    if (target.throttle && (held_ || target.throttle->active()) &&
        (op == IoOp::kRead || op == IoOp::kWrite || op == IoOp::kWriteZeroes)) {
        // As QEMU: reads, writes and write-zeroes count; flushes and discards do not.
        for (auto& gate : gates_)
            if (&gate->group() == target.throttle)
                return hold(*gate, id);
    }
    dispatch(target.engine, target.snapshot, request);
}

void RequestQueue::dispatch(EngineKind engine, SnapshotOverlay* snapshot, const IoRequest& request)
{
    if (snapshot)
        return snapshot_requests().submit(*snapshot, engine, request);
    thread_.submit(engine, request);
}

SnapshotRequests& RequestQueue::snapshot_requests()
{
    if (!snapshot_)
        snapshot_ = std::make_unique<SnapshotRequests>(
            [this](EngineKind engine, IoRequest part) {
                part.cookie = IoThread::cookie(sink_, kSnapshotPart | static_cast<uint32_t>(part.cookie));
                thread_.submit(engine, part);
            },
            [this](uint64_t slot, int64_t result) { complete(static_cast<uint32_t>(slot), result); },
            slots_.size());
    return *snapshot_;
}

void RequestQueue::hold(ThrottleGate& gate, uint32_t slot)
{
    if (held_++ == 0)
        held_since_ns_ = monotonic_ns();
    gate.hold(slot);
}

void RequestQueue::count_throttled_time()
{
    if (held_since_ns_ == 0)
        return;
    const uint64_t now = monotonic_ns();
    stats_.throttled(now - held_since_ns_);
    held_since_ns_ = held_ ? now : 0;
}

void RequestQueue::release(Slot& slot)
{
    // A small bounce buffer stays for the slot's next misaligned request; a
    // large one goes, or a guest could make every slot hold megabytes.
    constexpr uint64_t kKeptBounceBytes = 128 << 10;
    if (slot.bounce_bytes > kKeptBounceBytes) {
        slot.bounce.reset();
        slot.bounce_bytes = 0;
    }
}

void RequestQueue::complete(uint32_t tag, int64_t result)
{
    if (tag & kSnapshotPart)
        return snapshot_->complete(tag & ~kSnapshotPart, result);  // answers the slot when it is done
    Slot& slot = slots_.at(tag);
    if (stopping_)
        return drop(tag);
    if (result < 0 && apply_error_policy(tag, result))
        return;
    if (result > 0 && slot.bounced && !slot.guest.empty())
        copy_to_iovecs(slot.guest, {slot.bounce.get(), static_cast<size_t>(result)});
    io_done(tag, result);
}

void RequestQueue::drop(uint32_t id)
{
    release(slots_[id]);
    free_slots_.push_back(id);
    stats_.dropped();
    thread_.mutable_stats().io.dropped();
}

bool RequestQueue::apply_error_policy(uint32_t id, int64_t result)
{
    Slot& slot = slots_[id];
    const bool read = slot.request.op == IoOp::kRead;
    const IoTarget& target = *slot.target;
    const IoErrorPolicy policy = read ? target.read_error : target.write_error;
    const bool stop = target.error_stop &&
                      (policy == IoErrorPolicy::kStop || (policy == IoErrorPolicy::kEnospc && result == -ENOSPC));
    if (stop) {
        // Unanswered, its slot kept: the guest pauses before it could tell,
        // and at resume the request runs again as if nothing had happened.
        failed_.push_back(id);
        count_error();
        target.error_stop->stop_for_io_error(std::string("disk ") + target.image + " " + (read ? "read" : "write") + " error (" +
                                                  std::strerror(static_cast<int>(-result)) + ")");
        return true;
    }
    if (policy == IoErrorPolicy::kIgnore) {
        count_error();
        io_done(id, static_cast<int64_t>(slot.bytes));  // the guest is told it went well
        return true;
    }
    return false;
}

void RequestQueue::retry_failed()
{
    if (stopping_)
        return;
    for (const uint32_t id : std::exchange(failed_, {}))
        dispatch(slots_[id].target->engine, slots_[id].target->snapshot, slots_[id].request);
}

void RequestQueue::finish_slot(uint32_t id, uint32_t written, uint64_t bytes)
{
    Slot& slot = slots_[id];
    // Counted before the guest can see the answer: whoever saw it sees the statistics include it.
    const uint64_t latency = thread_.round_ns() - slot.started_ns;
    stats_.completed(bytes, latency);
    thread_.mutable_stats().io.completed(bytes, latency);
    finish(slot.head, written);
    release(slot);
    free_slots_.push_back(id);
}

void RequestQueue::finish(uint16_t head, uint32_t written)
{
    ring_.push_used(head, written);
    used_dirty_ = true;
}

void RequestQueue::completions_done()
{
    if (stopping_)
        return;
    if (out_of_slots_ && !free_slots_.empty()) {
        out_of_slots_ = false;
        process();  // signals too
        return;
    }
    signal();
}

void RequestQueue::signal()
{
    if (used_dirty_ && !signal_queued_) {
        signal_queued_ = true;
        thread_.interrupt_at_round_end(*this);
    }
}

void RequestQueue::round_end()
{
    signal_queued_ = false;
    if (used_dirty_) {
        used_dirty_ = false;
        if (ring_.needs_interrupt()) {
            stats_.interrupted();  // first: whoever took the interrupt sees it counted
            interrupt_->raise();
        }
    }
}

void RequestQueue::mark_broken(const char* why)
{
    broken_ring_ = true;
    notify_.cancel();
    signal();  // what completed before still reaches the driver
    log_warn(config_.what + ": the guest driver broke a queue (" + why + "); device needs a reset");
    if (broken_)
        broken_();
}

void RequestQueues::start(std::span<const QueueSetup> setups, std::span<IoThread* const> queue_threads,
                          const std::function<bool(const QueueSetup&)>& acceptable, const Make& make,
                          const std::function<void()>& broken)
{
    for (const auto& setup : setups) {
        if (setup.index >= queue_threads.size() || !acceptable(setup)) {
            broken();
            continue;
        }
        IoThread& thread = *queue_threads[setup.index];
        std::shared_ptr<RequestQueue> queue;
        std::string failed;
        thread.run_and_wait([&] {
            try {
                queue = make(thread, setup);
                queue->start(broken);
            } catch (const std::exception& e) {
                // The host failed us (no memory, no descriptors): the guest
                // sees a device that needs a reset, lkvm goes on.
                failed = e.what();
                if (queue)
                    queue->stop();
                queue.reset();  // here, on its thread
            }
        });
        if (!failed.empty()) {
            log_error("cannot start a disk queue: " + failed + "; the device needs a reset");
            broken();
            continue;
        }
        queues_.push_back(std::move(queue));
    }
}

void RequestQueues::retry_failed()
{
    for (const auto& queue : queues_)
        queue->thread().post([weak = std::weak_ptr(queue)] {
            if (const auto alive = weak.lock())
                alive->retry_failed();
        });
}

void RequestQueues::stop()
{
    for (auto& queue : queues_) {
        IoThread& thread = queue->thread();
        thread.run_and_wait([&] {
            queue->stop();
            queue.reset();  // on its thread, where its handlers run
        });
    }
    queues_.clear();
}

}  // namespace lkvm
