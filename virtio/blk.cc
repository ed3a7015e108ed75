#include "virtio/blk.h"

#include <poll.h>
#include <unistd.h>

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

struct VirtioBlk::Queue {
    Queue(const GuestMemory& memory, const QueueSetup& setup, bool event_idx, ChainLimits limits,
          boost::asio::io_context& io)
        : ring(memory, setup.rings, event_idx, limits), notify(io, ::dup(setup.notify_fd)), interrupt(setup.interrupt)
    {
    }
    SplitQueue ring;
    boost::asio::posix::stream_descriptor notify;
    Interrupt* interrupt;
    bool used_dirty = false;   // pushed used entries not yet considered for an interrupt
    bool throttled = false;    // stopped popping for lack of slots
    bool broken = false;
};

VirtioBlk::VirtioBlk(DiskImage image, BlkOptions options, const GuestMemory& memory, IoThread& thread)
    : image_(std::move(image)),
      options_(std::move(options)),
      memory_(memory),
      thread_(thread),
      engine_(make_io_engine(options_.engine, size_t{options_.num_queues} * options_.queue_size)),
      engine_event_(thread.context(), ::dup(engine_->event_fd())),
      slots_(engine_->capacity())
{
    for (uint32_t i = 0; i < slots_.size(); ++i)
        free_slots_.push_back(static_cast<uint32_t>(slots_.size() - 1 - i));
}

VirtioBlk::~VirtioBlk()
{
    reset();
    thread_.run_and_wait([this] { engine_event_.close(); });
    // Handlers that closing queued still read epoch_: let them run while we exist.
    thread_.run_and_wait([] {});
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
    if (options_.num_queues > 1)
        f |= kBlkFMq;
    return f;
}

void VirtioBlk::read_config(uint64_t offset, std::span<uint8_t> data)
{
    uint8_t config[64] = {};
    const uint64_t capacity = image_.size() / DiskImage::kSectorSize;
    const uint32_t seg_max = options_.queue_size - 2u;
    const uint32_t blk_size = std::max<uint32_t>(DiskImage::kSectorSize, image_.alignment());
    const uint16_t queues = static_cast<uint16_t>(options_.num_queues);
    std::memcpy(&config[0], &capacity, 8);
    std::memcpy(&config[12], &seg_max, 4);
    std::memcpy(&config[20], &blk_size, 4);
    std::memcpy(&config[34], &queues, 2);
    for (size_t i = 0; i < data.size(); ++i)
        data[i] = offset + i < sizeof(config) ? config[offset + i] : 0;
}

void VirtioBlk::activate(uint64_t features, std::vector<QueueSetup> setups, std::function<void()> broken)
{
    thread_.run_and_wait([&] {
        broken_ = std::move(broken);
        const ChainLimits limits{options_.queue_size + 2u, kMaxRequestBytes};
        const bool event_idx = features & kVirtioFRingEventIdx;
        for (const auto& setup : setups) {
            if (setup.rings.size > options_.queue_size || !rings_in_memory(memory_, setup.rings)) {
                broken_();
                continue;
            }
            queues_.push_back(std::make_unique<Queue>(memory_, setup, event_idx, limits, thread_.context()));
        }
        for (auto& queue : queues_) {
            wait_notify(*queue);
            process(*queue);  // the driver may have kicked before DRIVER_OK
        }
        wait_engine();
    });
}

void VirtioBlk::reset()
{
    thread_.run_and_wait([this] { drain(); });
}

void VirtioBlk::drain()
{
    ++epoch_;
    for (auto& queue : queues_)
        queue->notify.close();
    engine_event_.cancel();
    engine_waiting_ = false;
    // The requests in flight still own guest buffers: wait for each, answer none.
    while (engine_->in_flight() > 0) {
        pollfd p{engine_->event_fd(), POLLIN, 0};
        ::poll(&p, 1, 1000);
        completions_.clear();
        engine_->reap(completions_);
        for (const auto& c : completions_) {
            slots_[c.cookie] = InFlight{};
            free_slots_.push_back(static_cast<uint32_t>(c.cookie));
        }
    }
    pending_.clear();
    queues_.clear();
}

void VirtioBlk::wait_notify(Queue& queue)
{
    queue.notify.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                            [this, &queue, epoch = epoch_](const boost::system::error_code& error) {
                                if (error || epoch != epoch_)
                                    return;  // reset since: the queue is gone
                                uint64_t kicks;
                                [[maybe_unused]] ssize_t n = ::read(queue.notify.native_handle(), &kicks, sizeof(kicks));
                                process(queue);
                                if (epoch == epoch_)
                                    wait_notify(queue);
                            });
}

void VirtioBlk::wait_engine()
{
    if (engine_waiting_)
        return;
    engine_waiting_ = true;
    engine_event_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                             [this, epoch = epoch_](const boost::system::error_code& error) {
                                 if (error || epoch != epoch_)
                                     return;
                                 engine_waiting_ = false;
                                 on_completions();
                                 wait_engine();
                             });
}

void VirtioBlk::process(Queue& queue)
{
    while (!queue.broken) {
        queue.ring.set_notifications(false);
        while (!free_slots_.empty()) {
            auto popped = queue.ring.pop();
            if (!popped)
                break;
            if (!popped->ok())
                return mark_broken(queue, describe(popped->error()));
            start_request(queue, popped->value());
            if (queue.broken)
                return;
        }
        submit_pending();
        if (free_slots_.empty()) {
            queue.throttled = true;  // completions will bring us back
            break;
        }
        // Style of QEMU's aio-posix: re-enable, then look once more before sleeping.
        queue.ring.set_notifications(true);
        if (!queue.ring.has_available())
            break;
    }
    signal_queues();
}

void VirtioBlk::start_request(Queue& queue, Chain& chain)
{
    auto framed = frame_blk_request(chain);
    if (!framed)
        return mark_broken(queue, "request without a status byte");
    BlkRequest& request = *framed;
    if (!request.header_complete)
        return finish(queue, chain.head, request.status, kBlkSIoErr, 1);
    switch (request.type) {
    case kBlkTIn:
    case kBlkTOut:
    case kBlkTFlush: {
        if (request.type != kBlkTFlush) {
            const uint8_t status = check_blk_request(request, image_.size() / DiskImage::kSectorSize, image_.read_only());
            if (status != kBlkSOk)
                return finish(queue, chain.head, request.status, status, 1);
        }
        const uint32_t id = free_slots_.back();
        free_slots_.pop_back();
        InFlight& slot = slots_[id];
        slot.queue = &queue;
        slot.head = chain.head;
        slot.status = request.status;
        slot.expected = request.data_bytes;
        slot.written_on_success = request.type == kBlkTIn ? static_cast<uint32_t>(request.data_bytes + 1) : 1;
        slot.iov = std::move(request.data);
        const IoOp op = request.type == kBlkTIn ? IoOp::kRead : request.type == kBlkTOut ? IoOp::kWrite : IoOp::kFlush;
        const uint32_t align = image_.alignment();
        const bool misaligned = std::any_of(slot.iov.begin(), slot.iov.end(), [&](const iovec& v) {
            return reinterpret_cast<uintptr_t>(v.iov_base) % align || v.iov_len % align;
        });
        if (op != IoOp::kFlush && align > 1 && misaligned) {
            // O_DIRECT wants aligned buffers; the guest's are not: go through one that is.
            void* buffer = nullptr;
            if (::posix_memalign(&buffer, align, std::max<size_t>(slot.expected, align)) != 0) {
                slot = InFlight{};
                free_slots_.push_back(id);
                return finish(queue, chain.head, request.status, kBlkSIoErr, 1);
            }
            slot.bounce.reset(static_cast<uint8_t*>(buffer));
            if (op == IoOp::kWrite) {
                std::vector<iovec> unused;
                take_front(slot.iov, slot.expected, slot.bounce.get(), unused);
            }
            slot.guest = std::move(slot.iov);
            slot.iov = {{slot.bounce.get(), static_cast<size_t>(slot.expected)}};
        }
        pending_.push_back({op, image_.fd(), request.sector * DiskImage::kSectorSize, slot.iov.data(),
                            static_cast<int>(slot.iov.size()), id});
        return;
    }
    case kBlkTGetId: {
        uint8_t id[kBlkIdBytes] = {};
        std::memcpy(id, options_.serial.data(), std::min(options_.serial.size(), kBlkIdBytes));
        size_t copied = 0;
        for (const auto& v : request.data) {
            const size_t n = std::min(v.iov_len, kBlkIdBytes - copied);
            std::memcpy(v.iov_base, id + copied, n);
            copied += n;
        }
        return finish(queue, chain.head, request.status, kBlkSOk, static_cast<uint32_t>(copied + 1));
    }
    default:
        return finish(queue, chain.head, request.status, kBlkSUnsupp, 1);
    }
}

void VirtioBlk::finish(Queue& queue, uint16_t head, uint8_t* status, uint8_t value, uint32_t written)
{
    if (status)
        *status = value;
    queue.ring.push_used(head, written);
    queue.used_dirty = true;
}

void VirtioBlk::submit_pending()
{
    if (pending_.empty())
        return;
    engine_->submit(pending_);
    pending_.clear();
    wait_engine();
}

void VirtioBlk::on_completions()
{
    completions_.clear();
    engine_->reap(completions_);
    for (const auto& c : completions_) {
        InFlight& slot = slots_[c.cookie];
        const bool ok = c.result >= 0 && static_cast<uint64_t>(c.result) == slot.expected;
        if (!ok && !reported_error_.exchange(true))
            log_line("disk " + image_.path() + ": I/O error (" +
                     (c.result < 0 ? std::string(std::strerror(static_cast<int>(-c.result))) : "short transfer") +
                     "); the guest gets IOERR, further errors are not reported");
        if (ok && slot.bounce && !slot.guest.empty()) {
            size_t at = 0;
            for (const auto& g : slot.guest) {
                std::memcpy(g.iov_base, slot.bounce.get() + at, g.iov_len);
                at += g.iov_len;
            }
        }
        finish(*slot.queue, slot.head, slot.status, ok ? kBlkSOk : kBlkSIoErr, ok ? slot.written_on_success : 1);
        slot = InFlight{};
        free_slots_.push_back(static_cast<uint32_t>(c.cookie));
    }
    for (auto& queue : queues_) {
        if (queue->throttled && !free_slots_.empty()) {
            queue->throttled = false;
            process(*queue);
        }
    }
    signal_queues();
}

void VirtioBlk::signal_queues()
{
    for (auto& queue : queues_) {
        if (queue->used_dirty) {
            queue->used_dirty = false;
            if (queue->ring.needs_interrupt())
                queue->interrupt->raise();
        }
    }
}

void VirtioBlk::mark_broken(Queue& queue, const char* why)
{
    queue.broken = true;
    queue.notify.cancel();
    log_line("disk " + image_.path() + ": the guest driver broke a queue (" + why + "); device needs a reset");
    if (broken_)
        broken_();
}

}  // namespace lkvm
