#include "virtio/blk.h"

#include <unistd.h>

#include <boost/asio/posix/stream_descriptor.hpp>

#include <algorithm>
#include <cstring>

#include "base/error.h"
#include "base/log.h"

namespace lkvm {

namespace {
constexpr uint64_t kBlkFSegMax = 1ull << 2, kBlkFRo = 1ull << 5, kBlkFBlkSize = 1ull << 6;
constexpr uint64_t kBlkFFlush = 1ull << 9, kBlkFMq = 1ull << 12;
constexpr uint64_t kMaxRequestBytes = 64ull << 20;

// Copies the first n bytes of iovs into dst; `rest` gets what follows them.
size_t take_front(const std::vector<iovec>& iovs, size_t n, uint8_t* dst, std::vector<iovec>& rest)
{
    size_t copied = 0;
    rest.clear();
    for (const auto& v : iovs) {
        const size_t take = std::min(n - copied, v.iov_len);
        std::memcpy(dst + copied, v.iov_base, take);
        copied += take;
        if (take < v.iov_len)
            rest.push_back({static_cast<uint8_t*>(v.iov_base) + take, v.iov_len - take});
    }
    return copied;
}

uint64_t total(const std::vector<iovec>& iovs)
{
    uint64_t n = 0;
    for (const auto& v : iovs)
        n += v.iov_len;
    return n;
}
}  // namespace

Result<BlkRequest, BlkFrameError> frame_blk_request(const Chain& chain)
{
    if (chain.writable_bytes == 0)
        return fail(BlkFrameError::kNoStatusByte);
    BlkRequest request;
    std::vector<iovec> writable = chain.writable;
    iovec& last = writable.back();
    request.status = static_cast<uint8_t*>(last.iov_base) + last.iov_len - 1;
    if (--last.iov_len == 0)
        writable.pop_back();
    if (chain.readable_bytes < 16)
        return request;
    request.header_complete = true;

    uint8_t header[16];
    std::vector<iovec> after_header;
    take_front(chain.readable, sizeof(header), header, after_header);
    std::memcpy(&request.type, header, 4);
    std::memcpy(&request.sector, header + 8, 8);
    request.data = request.type == kBlkTOut ? std::move(after_header) : std::move(writable);
    request.data_bytes = total(request.data);
    return request;
}

uint8_t check_blk_request(const BlkRequest& request, uint64_t capacity_sectors, bool read_only)
{
    if (request.type == kBlkTOut && read_only)
        return kBlkSIoErr;
    if (request.data_bytes % DiskImage::kSectorSize != 0)
        return kBlkSIoErr;
    const uint64_t sectors = request.data_bytes / DiskImage::kSectorSize;
    if (request.sector > capacity_sectors || sectors > capacity_sectors - request.sector)
        return kBlkSIoErr;
    return kBlkSOk;
}

// One virtqueue, served by one I/O thread: everything here runs on that thread.
class BlkQueue final : public PollSource, public CompletionSink, public std::enable_shared_from_this<BlkQueue> {
public:
    BlkQueue(VirtioBlk& device, IoThread& thread, const QueueSetup& setup, bool event_idx, QueueStats& stats)
        : device_(device),
          thread_(thread),
          ring_(device.memory_, setup.rings, event_idx, {device.options_.queue_size + 2u, kMaxRequestBytes}),
          notify_(thread.context(), ::dup(setup.notify_fd)),
          interrupt_(setup.interrupt),
          stats_(stats),
          slots_(setup.rings.size)
    {
        for (uint32_t i = 0; i < slots_.size(); ++i)
            free_slots_.push_back(static_cast<uint32_t>(slots_.size() - 1 - i));
    }

    void start(std::function<void()> broken)
    {
        broken_ = std::move(broken);
        sink_ = thread_.add_sink(*this);
        thread_.add_source(*this);
        thread_.use_file(device_.options_.engine, device_.image_.fd(), true);
        wait_notify();
        process();  // the driver may have kicked before DRIVER_OK
    }

    // Stops serving and waits for the requests in flight, whose buffers the
    // guest still owns; answers none of them.
    void stop()
    {
        stopping_ = true;
        notify_.close();
        thread_.remove_source(*this);
        thread_.drain_until([this] { return free_slots_.size() == slots_.size(); });
        thread_.remove_sink(sink_);
        thread_.use_file(device_.options_.engine, device_.image_.fd(), false);
    }

    IoThread& thread() { return thread_; }
    bool ready() const override { return !broken_ring_ && !free_slots_.empty() && ring_.has_available(); }
    void run() override { process(); }
    void set_polling(bool active) override
    {
        polling_ = active;
        if (!broken_ring_)
            ring_.set_notifications(!active);
    }
    void round_end() override;
    void complete(uint32_t tag, int64_t result) override;
    void completions_done() override;

private:
    struct InFlight {
        uint16_t head = 0;
        uint8_t* status = nullptr;
        uint32_t written_on_success = 0;
        uint64_t expected = 0;  // bytes the engine must move
        uint64_t started_ns = 0;
        std::vector<iovec> iov;
        std::unique_ptr<uint8_t, void (*)(void*)> bounce{nullptr, ::free};
        std::vector<iovec> guest;  // where a bounced read is copied back to
    };

    void wait_notify();
    void process();
    void start_request(Chain& chain);
    void finish(uint16_t head, uint8_t* status, uint8_t value, uint32_t written);
    void signal();
    void mark_broken(const char* why);

    VirtioBlk& device_;
    IoThread& thread_;
    SplitQueue ring_;
    boost::asio::posix::stream_descriptor notify_;
    Interrupt* interrupt_;
    QueueStats& stats_;
    std::function<void()> broken_;
    std::vector<InFlight> slots_;
    std::vector<uint32_t> free_slots_;
    uint32_t sink_ = 0;
    bool used_dirty_ = false;   // pushed used entries not yet considered for an interrupt
    bool signal_queued_ = false;  // round_end() will consider them
    bool throttled_ = false;    // stopped popping for lack of slots
    bool broken_ring_ = false;
    bool polling_ = false;      // the thread polls us: leave notifications off
    bool stopping_ = false;
};

namespace {
int current_tid()
{
    thread_local const int tid = ::gettid();
    return tid;
}

}  // namespace

void BlkQueue::wait_notify()
{
    notify_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                       [self = weak_from_this()](const boost::system::error_code& error) {
                           auto queue = self.lock();
                           if (error || !queue || queue->stopping_)
                               return;  // stopped since: the kick is for nobody
                           uint64_t kicks;
                           [[maybe_unused]] ssize_t n = ::read(queue->notify_.native_handle(), &kicks, sizeof(kicks));
                           queue->process();
                           if (!queue->broken_ring_)
                               queue->wait_notify();
                       });
}

void BlkQueue::process()
{
    stats_.served_by(current_tid());
    while (!broken_ring_ && !stopping_) {
        ring_.set_notifications(false);
        while (!free_slots_.empty()) {
            auto popped = ring_.pop();
            if (!popped)
                break;
            if (!popped->ok())
                return mark_broken(describe(popped->error()));
            start_request(popped->value());
            if (broken_ring_)
                return;
        }
        if (free_slots_.empty()) {
            throttled_ = true;  // completions will bring us back
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

void BlkQueue::start_request(Chain& chain)
{
    auto framed = frame_blk_request(chain);
    if (!framed)
        return mark_broken("request without a status byte");
    BlkRequest& request = *framed;
    if (!request.header_complete)
        return finish(chain.head, request.status, kBlkSIoErr, 1);
    const DiskImage& image = device_.image_;
    switch (request.type) {
    case kBlkTIn:
    case kBlkTOut:
    case kBlkTFlush: {
        if (request.type != kBlkTFlush) {
            const uint8_t status = check_blk_request(request, image.size() / DiskImage::kSectorSize, image.read_only());
            if (status != kBlkSOk)
                return finish(chain.head, request.status, status, 1);
        }
        const uint32_t id = free_slots_.back();
        free_slots_.pop_back();
        InFlight& slot = slots_[id];
        slot.head = chain.head;
        slot.status = request.status;
        slot.expected = request.data_bytes;
        slot.written_on_success = request.type == kBlkTIn ? static_cast<uint32_t>(request.data_bytes + 1) : 1;
        slot.iov = std::move(request.data);
        slot.started_ns = monotonic_ns();
        const IoOp op = request.type == kBlkTIn ? IoOp::kRead : request.type == kBlkTOut ? IoOp::kWrite : IoOp::kFlush;
        const uint32_t align = image.alignment();
        const bool misaligned = std::any_of(slot.iov.begin(), slot.iov.end(), [&](const iovec& v) {
            return reinterpret_cast<uintptr_t>(v.iov_base) % align || v.iov_len % align;
        });
        if (op != IoOp::kFlush && align > 1 && misaligned) {
            // O_DIRECT wants aligned buffers; the guest's are not: go through one that is.
            void* buffer = nullptr;
            if (::posix_memalign(&buffer, align, std::max<size_t>(slot.expected, align)) != 0) {
                slot = InFlight{};
                free_slots_.push_back(id);
                return finish(chain.head, request.status, kBlkSIoErr, 1);
            }
            slot.bounce.reset(static_cast<uint8_t*>(buffer));
            if (op == IoOp::kWrite) {
                std::vector<iovec> unused;
                take_front(slot.iov, slot.expected, slot.bounce.get(), unused);
            }
            slot.guest = std::move(slot.iov);
            slot.iov = {{slot.bounce.get(), static_cast<size_t>(slot.expected)}};
        }
        thread_.submit(device_.options_.engine,
                       {op, image.fd(), request.sector * DiskImage::kSectorSize, slot.iov.data(),
                        static_cast<int>(slot.iov.size()), IoThread::cookie(sink_, id), device_.options_.ioprio});
        return;
    }
    case kBlkTGetId: {
        uint8_t id[kBlkIdBytes] = {};
        const std::string& serial = device_.options_.serial;
        std::memcpy(id, serial.data(), std::min(serial.size(), kBlkIdBytes));
        size_t copied = 0;
        for (const auto& v : request.data) {
            const size_t n = std::min(v.iov_len, kBlkIdBytes - copied);
            std::memcpy(v.iov_base, id + copied, n);
            copied += n;
        }
        return finish(chain.head, request.status, kBlkSOk, static_cast<uint32_t>(copied + 1));
    }
    default:
        return finish(chain.head, request.status, kBlkSUnsupp, 1);
    }
}

void BlkQueue::finish(uint16_t head, uint8_t* status, uint8_t value, uint32_t written)
{
    if (status)
        *status = value;
    ring_.push_used(head, written);
    used_dirty_ = true;
}

void BlkQueue::complete(uint32_t tag, int64_t result)
{
    InFlight& slot = slots_.at(tag);
    if (!stopping_) {
        const bool ok = result >= 0 && static_cast<uint64_t>(result) == slot.expected;
        if (!ok)
            device_.report_io_error(result);
        if (ok && slot.bounce && !slot.guest.empty()) {
            size_t at = 0;
            for (const auto& g : slot.guest) {
                std::memcpy(g.iov_base, slot.bounce.get() + at, g.iov_len);
                at += g.iov_len;
            }
        }
        finish(slot.head, slot.status, ok ? kBlkSOk : kBlkSIoErr, ok ? slot.written_on_success : 1);
        const uint64_t latency = monotonic_ns() - slot.started_ns;
        stats_.completed(slot.expected, latency);
        thread_.mutable_stats().io.completed(slot.expected, latency);
    }
    slot = InFlight{};
    free_slots_.push_back(tag);
}

void BlkQueue::completions_done()
{
    if (stopping_)
        return;
    if (throttled_ && !free_slots_.empty()) {
        throttled_ = false;
        process();  // signals too
        return;
    }
    signal();
}

void BlkQueue::signal()
{
    if (used_dirty_ && !signal_queued_) {
        signal_queued_ = true;
        thread_.interrupt_at_round_end(*this);
    }
}

void BlkQueue::round_end()
{
    signal_queued_ = false;
    if (used_dirty_) {
        used_dirty_ = false;
        if (ring_.needs_interrupt())
            interrupt_->raise();
    }
}

void BlkQueue::mark_broken(const char* why)
{
    broken_ring_ = true;
    notify_.cancel();
    signal();  // what completed before still reaches the driver
    log_line("disk " + device_.image_.path() + ": the guest driver broke a queue (" + why + "); device needs a reset");
    if (broken_)
        broken_();
}

VirtioBlk::VirtioBlk(DiskImage image, BlkOptions options, const GuestMemory& memory, std::vector<IoThread*> queue_threads)
    : image_(std::move(image)), options_(std::move(options)), memory_(memory), queue_threads_(std::move(queue_threads))
{
    if (queue_threads_.empty())
        throw Error("a virtio-blk device needs at least one queue");
    for (size_t q = 0; q < queue_threads_.size(); ++q)
        stats_.push_back(std::make_unique<QueueStats>());
}

VirtioBlk::~VirtioBlk()
{
    reset();
    // What the guest wrote reaches the image before lkvm exits.
    if (!image_.read_only())
        ::fdatasync(image_.fd());
}

uint64_t VirtioBlk::features() const
{
    uint64_t f = kVirtioFVersion1 | kVirtioFRingIndirectDesc | kVirtioFRingEventIdx | kBlkFSegMax | kBlkFBlkSize |
                 kBlkFFlush;
    if (image_.read_only())
        f |= kBlkFRo;
    if (num_queues() > 1)
        f |= kBlkFMq;
    return f;
}

void VirtioBlk::read_config(uint64_t offset, std::span<uint8_t> data)
{
    uint8_t config[64] = {};
    const uint64_t capacity = image_.size() / DiskImage::kSectorSize;
    const uint32_t seg_max = options_.queue_size - 2u;
    const uint32_t blk_size = std::max<uint32_t>(DiskImage::kSectorSize, image_.alignment());
    const uint16_t queues = static_cast<uint16_t>(num_queues());
    std::memcpy(&config[0], &capacity, 8);
    std::memcpy(&config[12], &seg_max, 4);
    std::memcpy(&config[20], &blk_size, 4);
    std::memcpy(&config[34], &queues, 2);
    for (size_t i = 0; i < data.size(); ++i)
        data[i] = offset + i < sizeof(config) ? config[offset + i] : 0;
}

void VirtioBlk::activate(uint64_t features, std::vector<QueueSetup> setups, std::function<void()> broken)
{
    const bool event_idx = features & kVirtioFRingEventIdx;
    for (const auto& setup : setups) {
        if (setup.index >= queue_threads_.size() || setup.rings.size > options_.queue_size ||
            !rings_in_memory(memory_, setup.rings)) {
            broken();
            continue;
        }
        IoThread& thread = *queue_threads_[setup.index];
        std::shared_ptr<BlkQueue> queue;
        thread.run_and_wait([&] {
            queue = std::make_shared<BlkQueue>(*this, thread, setup, event_idx, *stats_[setup.index]);
            queue->start(broken);
        });
        queues_.push_back(std::move(queue));
    }
}

void VirtioBlk::reset()
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

void VirtioBlk::report_io_error(int64_t result)
{
    if (!reported_error_.exchange(true))
        log_line("disk " + image_.path() + ": I/O error (" +
                 (result < 0 ? std::string(std::strerror(static_cast<int>(-result))) : "short transfer") +
                 "); the guest gets IOERR, further errors are not reported");
}

}  // namespace lkvm
