#include "virtio/scsi.h"

#include <unistd.h>

#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <map>

#include "base/error.h"
#include "base/log.h"

namespace lkvm {

namespace {
constexpr uint64_t kMaxRequestBytes = 64ull << 20;
constexpr uint8_t kOpReportLuns = 0xa0;
// What a driver may set cdb_size and sense_size to; Linux keeps 32 and 96.
constexpr size_t kMaxCdbSize = 256, kMaxSenseSize = 256;

void put_le32(uint8_t* at, uint32_t v) { std::memcpy(at, &v, 4); }

// Which requests in flight a task management function is about.
struct TaskMatch {
    enum class Scope { kTask, kLun, kTarget } scope;
    uint16_t lun;
    uint64_t tag;
};
}  // namespace

std::optional<ScsiAddress> parse_scsi_lun(const uint8_t (&lun)[8])
{
    if (lun[0] != 1)
        return std::nullopt;
    // Byte 2's top bits say the addressing method: 00 peripheral (LUN < 256), 01 flat.
    const uint8_t method = lun[2] >> 6;
    if (method > 1 || (method == 0 && lun[2] != 0))
        return std::nullopt;
    for (int i = 4; i < 8; ++i)
        if (lun[i] != 0)
            return std::nullopt;  // a second level: we have a single-level LUN space
    return ScsiAddress{lun[1], static_cast<uint16_t>((lun[2] & 0x3f) << 8 | lun[3])};
}

// A request queue: SCSI commands from the driver, executed by the addressed
// logical unit, their I/O run on this queue's thread.
class ScsiQueue final : public RequestQueue {
public:
    ScsiQueue(VirtioScsi& device, IoThread& thread, const QueueSetup& setup, bool event_idx, QueueStats& stats,
              std::vector<IoTarget> targets)
        : RequestQueue(thread, setup, event_idx, stats,
                       {device.memory_, {device.queue_size_ + 2u, kMaxRequestBytes}, std::move(targets), setup.rings.size,
                        "scsi controller (" + device.describe() + ")"}),
          device_(device),
          cdb_size_(device.cdb_size_.load()),
          sense_size_(device.sense_size_.load()),
          commands_(setup.rings.size)
    {
    }

    // On this queue's thread: finds the matching commands in flight; when
    // `abort`, they are answered ABORTED as their I/O comes back and done()
    // waits for the last of them. done(found) runs on this thread.
    void task_management(const TaskMatch& match, bool abort, std::function<void(uint32_t)> done);

private:
    struct Command {
        bool busy = false;
        const VirtioScsi::Lun* lun = nullptr;
        uint64_t tag = 0;
        std::vector<iovec> response;  // the response header and sense area
        std::vector<iovec> data;      // data-in or data-out buffers
        scsi::IoSteps steps;
        size_t step = 0;
        uint64_t residual = 0;
        uint64_t data_in_bytes = 0;   // written into data-in on success
        uint64_t moved = 0;           // for the statistics
        std::vector<uint8_t> block;   // WRITE SAME's block, repeated
        bool aborted = false;
        std::vector<uint32_t> watchers;  // task management functions waiting for this one
        // Back to idle, keeping the vectors' storage for the next command.
        void clear()
        {
            busy = aborted = false;
            step = residual = data_in_bytes = moved = 0;
            response.clear();
            data.clear();
            steps.clear();
            block.clear();
            watchers.clear();
        }
    };
    struct Watch {
        uint32_t remaining, found;
        std::function<void(uint32_t)> done;
    };

    void handle(Chain& chain) override;
    void io_done(uint32_t slot, int64_t result) override;
    void start_step(uint32_t slot);
    void finish_command(uint32_t slot, uint8_t response, uint8_t status, const scsi::Sense& sense,
                        uint64_t residual, uint64_t data_in);
    void write_response(std::span<const iovec> to, uint8_t response, uint8_t status, const scsi::Sense& sense,
                        uint64_t residual);
    size_t response_bytes() const { return virtio_scsi::kCmdResponseBytes + sense_size_; }

    VirtioScsi& device_;
    const uint32_t cdb_size_, sense_size_;
    std::vector<Command> commands_;  // by slot
    // Scratch for the command being framed, swapped into its Command when it
    // goes to the engine: the request path reuses storage instead of allocating.
    std::vector<iovec> response_, data_in_, data_out_, step_iov_;
    std::map<uint32_t, Watch> watches_;
    uint32_t next_watch_ = 0;
};

void ScsiQueue::write_response(std::span<const iovec> to, uint8_t response, uint8_t status, const scsi::Sense& sense,
                               uint64_t residual)
{
    // The driver reads sense_len bytes of sense: without sense, the 12-byte header is all it needs.
    std::array<uint8_t, virtio_scsi::kCmdResponseBytes + scsi::kFixedSenseBytes> bytes{};
    size_t length = virtio_scsi::kCmdResponseBytes;
    if (status == scsi::kStatusCheckCondition) {
        const auto fixed = scsi::fixed_sense(sense);
        const size_t sense_len = std::min<size_t>(fixed.size(), sense_size_);
        std::memcpy(&bytes[virtio_scsi::kCmdResponseBytes], fixed.data(), sense_len);
        length += sense_len;
    }
    put_le32(&bytes[0], static_cast<uint32_t>(length - virtio_scsi::kCmdResponseBytes));
    put_le32(&bytes[4], static_cast<uint32_t>(std::min<uint64_t>(residual, UINT32_MAX)));
    bytes[10] = status;
    bytes[11] = response;
    copy_to_iovecs(to, std::span(bytes.data(), length));
}

void ScsiQueue::handle(Chain& chain)
{
    const size_t request_bytes = virtio_scsi::kCmdHeaderBytes + cdb_size_;
    if (chain.readable_bytes < request_bytes || chain.writable_bytes < response_bytes())
        return mark_broken("a command without room for its header or response");
    std::array<uint8_t, virtio_scsi::kCmdHeaderBytes + kMaxCdbSize> header;
    copy_from_iovecs(chain.readable, std::span(header.data(), request_bytes));
    uint8_t lun[8];
    std::memcpy(lun, header.data(), 8);
    uint64_t tag;
    std::memcpy(&tag, header.data() + 8, 8);
    const std::span<const uint8_t> cdb(header.data() + virtio_scsi::kCmdHeaderBytes, cdb_size_);
    slice_iovecs(chain.writable, 0, response_bytes(), response_);
    slice_iovecs(chain.readable, request_bytes, UINT64_MAX, data_out_);
    slice_iovecs(chain.writable, response_bytes(), UINT64_MAX, data_in_);
    const uint64_t out_bytes = chain.readable_bytes - request_bytes;
    const uint64_t in_bytes = chain.writable_bytes - response_bytes();

    const auto address = parse_scsi_lun(lun);
    if (!address || address->target != 0) {
        write_response(response_, virtio_scsi::kBadTarget, 0, {}, in_bytes + out_bytes);
        return finish(chain.head, static_cast<uint32_t>(response_bytes()));
    }
    VirtioScsi::Lun* unit = device_.find_lun(address->lun);
    scsi::Execution done = cdb[0] == kOpReportLuns ? scsi::report_luns(cdb, device_.lun_ids_, in_bytes)
                           : unit                  ? unit->disk.execute(cdb, data_out_, in_bytes)
                                                   : scsi::execute_without_lun(cdb, in_bytes);
    if (done.overrun) {
        write_response(response_, virtio_scsi::kOverrun, 0, {}, in_bytes + out_bytes);
        return finish(chain.head, static_cast<uint32_t>(response_bytes()));
    }
    if (done.status != scsi::kStatusGood || done.io.empty()) {
        const size_t returned = copy_to_iovecs(data_in_, done.data_in);
        write_response(response_, virtio_scsi::kOk, done.status, done.sense, done.residual);
        return finish(chain.head, static_cast<uint32_t>(response_bytes() + returned));
    }

    const uint32_t slot = take_slot(chain.head);
    Command& command = commands_[slot];
    const bool reads = done.io.front().op == IoOp::kRead;
    command.busy = true;
    command.lun = unit;
    command.tag = tag;
    std::swap(command.response, response_);
    std::swap(command.data, reads ? data_in_ : data_out_);
    std::swap(command.steps, done.io);
    command.residual = done.residual;
    start_step(slot);
}

void ScsiQueue::start_step(uint32_t slot)
{
    Command& command = commands_[slot];
    const scsi::IoStep& step = command.steps[command.step];
    step_iov_.clear();
    if (step.op == IoOp::kRead || step.op == IoOp::kWrite) {
        if (step.repeat_first_block) {
            if (command.block.empty()) {
                command.block.resize(command.lun->disk.block_size());
                copy_from_iovecs(command.data, command.block);
            }
            step_iov_.assign(step.bytes / command.block.size(), iovec{command.block.data(), command.block.size()});
        } else {
            slice_iovecs(command.data, 0, step.bytes, step_iov_);
        }
    }
    submit(slot, command.lun->target, step.op, step.offset, step_iov_, step.bytes);
}

void ScsiQueue::io_done(uint32_t slot, int64_t result)
{
    Command& command = commands_[slot];
    if (command.aborted)
        return finish_command(slot, virtio_scsi::kAborted, 0, {}, 0, 0);
    const scsi::IoStep& step = command.steps[command.step];
    const bool moves_data = step.op == IoOp::kRead || step.op == IoOp::kWrite;
    const bool ok = result >= 0 && (!moves_data || static_cast<uint64_t>(result) == step.bytes);
    if (!ok) {
        device_.report_io_error(*command.lun, result);
        count_error();
        return finish_command(slot, virtio_scsi::kOk, scsi::kStatusCheckCondition,
                              scsi::io_error_sense(step.op, result), iovecs_bytes(command.data), 0);
    }
    if (moves_data)
        command.moved += step.bytes;
    if (step.op == IoOp::kRead)
        command.data_in_bytes += step.bytes;
    if (++command.step < command.steps.size())
        return start_step(slot);
    finish_command(slot, virtio_scsi::kOk, scsi::kStatusGood, {}, command.residual, command.data_in_bytes);
}

void ScsiQueue::finish_command(uint32_t slot, uint8_t response, uint8_t status, const scsi::Sense& sense,
                               uint64_t residual, uint64_t data_in)
{
    Command& command = commands_[slot];
    write_response(command.response, response, status, sense, residual);
    const uint64_t moved = command.moved;
    std::vector<uint32_t> watchers;
    std::swap(watchers, command.watchers);
    command.clear();
    finish_slot(slot, static_cast<uint32_t>(response_bytes() + data_in), moved);
    // Only now, with the command back in the used ring, may a function waiting for it complete.
    for (const uint32_t id : watchers) {
        auto watch = watches_.find(id);
        if (watch != watches_.end() && --watch->second.remaining == 0) {
            auto done = std::move(watch->second.done);
            const uint32_t found = watch->second.found;
            watches_.erase(watch);
            done(found);
        }
    }
}

void ScsiQueue::task_management(const TaskMatch& match, bool abort, std::function<void(uint32_t)> done)
{
    const uint32_t id = next_watch_++;
    uint32_t found = 0;
    for (auto& command : commands_) {
        if (!command.busy)
            continue;
        const bool matches = match.scope == TaskMatch::Scope::kTarget ||
                             (command.lun->id == match.lun &&
                              (match.scope == TaskMatch::Scope::kLun || command.tag == match.tag));
        if (!matches)
            continue;
        ++found;
        if (abort) {
            command.aborted = true;
            command.watchers.push_back(id);
        }
    }
    if (!abort || found == 0)
        return done(found);
    watches_.emplace(id, Watch{found, found, std::move(done)});
}

// The control queue, on the control loop. Every touch of its ring happens
// with the device's control mutex held, so that reset() (on a vCPU thread)
// never races a request being answered. It holds that mutex (shared) and the
// loop itself, both of which outlive the device, and touches the device only
// with the mutex held and stopped_ still false: reset(), which the device's
// destructor runs, sets stopped_ under it, and a start, kick or task
// management answer posted earlier may still run after the device is gone.
class ScsiControlQueue : public std::enable_shared_from_this<ScsiControlQueue> {
public:
    ScsiControlQueue(VirtioScsi& device, const QueueSetup& setup, bool event_idx, std::function<void()> broken)
        : device_(device),
          ring_(device.memory_, setup.rings, event_idx, {64, 4096}),
          mutex_(device.control_mutex_),
          loop_(device.control_loop_),
          notify_fd_(::dup(setup.notify_fd)),
          interrupt_(setup.interrupt),
          broken_(std::move(broken))
    {
    }

    // On the control loop.
    void start()
    {
        std::lock_guard lock(*mutex_);
        if (stopped_)
            return;
        notify_.emplace(loop_, notify_fd_.release());
        wait_notify();
        process();
    }
    // With the control mutex held: answers nothing more.
    void stop_answering() { stopped_ = true; }
    // On the control loop (or when it no longer runs).
    void close() { notify_.reset(); }

private:
    void wait_notify()
    {
        notify_->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                            [self = weak_from_this()](const boost::system::error_code& error) {
                                auto queue = self.lock();
                                if (error || !queue)
                                    return;
                                uint64_t kicks;
                                [[maybe_unused]] ssize_t n = ::read(queue->notify_->native_handle(), &kicks, sizeof(kicks));
                                std::lock_guard lock(*queue->mutex_);
                                if (queue->stopped_)
                                    return;
                                queue->process();
                                queue->wait_notify();
                            });
    }

    void process()
    {
        if (stopped_ || broken_ring_)
            return;
        Chain chain;
        for (;;) {
            const auto popped = ring_.pop(chain);
            if (!popped) {
                broken_ring_ = true;
                log_warn("scsi controller (" + device_.describe() + "): the guest driver broke the control queue (" +
                         describe(popped.error()) + "); device needs a reset");
                broken_();
                return;
            }
            if (!popped.value())
                break;
            handle(chain);
        }
        signal();
    }

    void answer(uint16_t head, std::span<const iovec> writable, std::span<const uint8_t> bytes)
    {
        const size_t written = copy_to_iovecs(writable, bytes);
        ring_.push_used(head, static_cast<uint32_t>(written));
        dirty_ = true;
    }

    void signal()
    {
        if (dirty_ && ring_.needs_interrupt())
            interrupt_->raise();
        dirty_ = false;
    }

    void handle(Chain& chain)
    {
        uint8_t request[24] = {};
        copy_from_iovecs(chain.readable, request);
        uint32_t type;
        std::memcpy(&type, request, 4);
        if (chain.readable_bytes >= 24 && type == virtio_scsi::kTypeTmf && chain.writable_bytes >= 1)
            return task_management(chain, request);
        if (chain.readable_bytes >= 16 && (type == virtio_scsi::kTypeAnQuery || type == virtio_scsi::kTypeAnSubscribe) &&
            chain.writable_bytes >= 5) {
            // No events to offer: event_actual 0, OK.
            const uint8_t reply[5] = {0, 0, 0, 0, virtio_scsi::kOk};
            return answer(chain.head, chain.writable, reply);
        }
        const uint8_t failure[1] = {virtio_scsi::kFailure};
        answer(chain.head, chain.writable, failure);
    }

    void task_management(const Chain& chain, const uint8_t (&request)[24])
    {
        uint32_t subtype;
        std::memcpy(&subtype, request + 4, 4);
        uint8_t lun[8];
        std::memcpy(lun, request + 8, 8);
        uint64_t tag;
        std::memcpy(&tag, request + 16, 8);
        const uint16_t head = chain.head;
        auto reply = [&](uint8_t response) { answer(head, chain.writable, std::span(&response, 1)); };

        const auto address = parse_scsi_lun(lun);
        if (!address || address->target != 0)
            return reply(virtio_scsi::kBadTarget);
        using namespace virtio_scsi;
        const bool nexus = subtype == kTmfItNexusReset;
        if (!nexus && !device_.find_lun(address->lun))
            return reply(kIncorrectLun);
        switch (subtype) {
        case kTmfAbortTask:
        case kTmfAbortTaskSet:
        case kTmfClearTaskSet:
        case kTmfLogicalUnitReset:
        case kTmfItNexusReset:
        case kTmfQueryTask:
        case kTmfQueryTaskSet:
            break;
        default:
            return reply(kFunctionRejected);  // CLEAR ACA: we never enter ACA
        }
        // Answered once every request queue has: from the control loop, later.
        device_.task_management(
            subtype, address->lun, tag,
            [self = weak_from_this(), head, writable = chain.writable, subtype, lun = address->lun](uint32_t found) {
                auto queue = self.lock();
                if (!queue)
                    return;
                std::lock_guard lock(*queue->mutex_);
                if (queue->stopped_)
                    return;
                // Only now, with every command it aborted answered: one of
                // those must not take the unit attention the reset raises.
                if (subtype == kTmfLogicalUnitReset)
                    queue->device_.find_lun(lun)->disk.reset();
                if (subtype == kTmfItNexusReset)
                    for (const auto& each : queue->device_.luns_)
                        each->disk.nexus_lost();
                const bool query = subtype == kTmfQueryTask || subtype == kTmfQueryTaskSet;
                const uint8_t response = query && found ? kFunctionSucceeded : kFunctionComplete;
                queue->answer(head, writable, std::span(&response, 1));
                queue->signal();
            });
    }

    VirtioScsi& device_;
    SplitQueue ring_;
    std::shared_ptr<std::mutex> mutex_;  // the device's control mutex
    boost::asio::io_context& loop_;
    Fd notify_fd_;
    std::optional<boost::asio::posix::stream_descriptor> notify_;
    Interrupt* interrupt_;
    std::function<void()> broken_;
    bool stopped_ = false;
    bool broken_ring_ = false;
    bool dirty_ = false;
};

VirtioScsi::VirtioScsi(std::vector<ScsiLunSetup> luns, uint16_t queue_size, const GuestMemory& memory,
                       std::vector<IoThread*> queue_threads, boost::asio::io_context& control_loop)
    : queue_size_(queue_size), memory_(memory), queue_threads_(std::move(queue_threads)), control_loop_(control_loop)
{
    if (queue_threads_.empty())
        throw Error("a virtio-scsi controller needs at least one request queue");
    for (auto& setup : luns) {
        if (setup.lun > virtio_scsi::kMaxLun)
            throw Error("scsi lun " + std::to_string(setup.lun) + ": LUNs go from 0 to " +
                        std::to_string(virtio_scsi::kMaxLun));
        if (find_lun(setup.lun))
            throw Error("scsi lun " + std::to_string(setup.lun) + " is given twice on one controller");
        luns_.push_back(std::make_unique<Lun>(std::move(setup)));
        // Linux takes max_sectors in 512-byte sectors, whatever the units' block size.
        const uint64_t sectors = uint64_t{setup.disk.max_transfer_blocks} * luns_.back()->disk.block_size() /
                                 DiskImage::kSectorSize;
        max_sectors_ = static_cast<uint32_t>(std::min<uint64_t>(max_sectors_, sectors));
        lun_ids_.push_back(setup.lun);
    }
    std::ranges::sort(lun_ids_);
    for (size_t q = 0; q < queue_threads_.size(); ++q)
        stats_.push_back(std::make_unique<QueueStats>());
    const std::vector<iovec> ram = memory_.host_ranges();
    for (IoThread* thread : queue_threads_)
        for (const auto& lun : luns_)
            thread->prepare_engine(lun->target.engine, lun->image.direct() ? std::span<const iovec>(ram)
                                                                           : std::span<const iovec>());
}

VirtioScsi::Lun::Lun(ScsiLunSetup setup)
    : id(setup.lun),
      image(std::move(setup.image)),
      disk(image, setup.disk),
      target{setup.engine,   image.fd(),        image.alignment(),  setup.ioprio,
             setup.throttle, setup.read_error, setup.write_error, setup.error_stop, image.path().c_str(),
             image.snapshot()}
{
}

VirtioScsi::~VirtioScsi()
{
    reset();
    // What the guest wrote reaches the images before lkvm exits.
    for (const auto& lun : luns_)
        if (!lun->image.read_only())
            ::fdatasync(lun->image.fd());
}

VirtioScsi::Lun* VirtioScsi::find_lun(uint16_t id) const
{
    for (const auto& lun : luns_)
        if (lun->id == id)
            return lun.get();
    return nullptr;
}

std::string VirtioScsi::describe() const
{
    std::string text;
    for (const auto& lun : luns_)
        text += (text.empty() ? "" : ", ") + lun->image.path() + " lun " + std::to_string(lun->id);
    return text;
}

uint64_t VirtioScsi::features() const
{
    // No INOUT, HOTPLUG, CHANGE or T10_PI: one data direction per command, no events.
    return kVirtioFVersion1 | kVirtioFRingIndirectDesc | kVirtioFRingEventIdx;
}

void VirtioScsi::read_config(uint64_t offset, std::span<uint8_t> data)
{
    uint8_t config[36] = {};
    put_le32(&config[0], request_queues());
    put_le32(&config[4], queue_size_ - 2u);  // seg_max
    put_le32(&config[8], max_sectors_);
    put_le32(&config[12], queue_size_);      // cmd_per_lun
    put_le32(&config[16], 16);               // event_info_size
    put_le32(&config[20], sense_size_.load());
    put_le32(&config[24], cdb_size_.load());
    // max_channel 0, max_target 0 (one target), max_lun
    put_le32(&config[32], virtio_scsi::kMaxLun);
    for (size_t i = 0; i < data.size(); ++i)
        data[i] = offset + i < sizeof(config) ? config[offset + i] : 0;
}

void VirtioScsi::write_config(uint64_t offset, std::span<const uint8_t> data)
{
    // Only sense_size and cdb_size are the driver's to set, whole.
    if (data.size() != 4 || (offset != 20 && offset != 24))
        return;
    uint32_t value;
    std::memcpy(&value, data.data(), 4);
    if (offset == 20 && value <= kMaxSenseSize)
        sense_size_ = value;
    if (offset == 24 && value >= 16 && value <= kMaxCdbSize)
        cdb_size_ = value;
}

void VirtioScsi::activate(uint64_t features, std::vector<QueueSetup> setups, std::function<void()> broken)
{
    const bool event_idx = features & kVirtioFRingEventIdx;
    std::vector<IoTarget> targets;
    for (const auto& lun : luns_)
        targets.push_back(lun->target);
    std::vector<QueueSetup> request_setups;
    std::shared_ptr<ScsiControlQueue> control;
    for (auto& setup : setups) {
        const bool fits = setup.rings.size <= queue_size_ && rings_in_memory(memory_, setup.rings);
        if (setup.index == 0) {
            if (!fits)
                broken();
            else
                control = std::make_shared<ScsiControlQueue>(*this, setup, event_idx, broken);
        } else if (setup.index >= 2) {
            setup.index -= 2;
            request_setups.push_back(setup);
        }
        // The event queue (1) is left alone: we raise no events.
    }
    std::lock_guard lock(*control_mutex_);
    queues_.start(
        request_setups, queue_threads_,
        [&](const QueueSetup& setup) {
            return setup.rings.size <= queue_size_ && rings_in_memory(memory_, setup.rings);
        },
        [&](IoThread& thread, const QueueSetup& setup) -> std::shared_ptr<RequestQueue> {
            return std::make_shared<ScsiQueue>(*this, thread, setup, event_idx, *stats_[setup.index], targets);
        },
        broken);
    control_ = control;
    if (control)
        boost::asio::post(control_loop_, [control] { control->start(); });
}

void VirtioScsi::reset()
{
    std::shared_ptr<ScsiControlQueue> control;
    {
        std::lock_guard lock(*control_mutex_);
        control = std::move(control_);
        if (control)
            control->stop_answering();
        queues_.stop();
    }
    if (!control)
        return;
    // Its descriptor belongs to the control loop: closed there, or here once that loop has ended.
    if (control_loop_.stopped())
        control->close();
    else
        boost::asio::post(control_loop_, [control] { control->close(); });
}

void VirtioScsi::retry_failed()
{
    std::lock_guard lock(*control_mutex_);
    queues_.retry_failed();
}

void VirtioScsi::task_management(uint32_t subtype, uint16_t lun, uint64_t tag, std::function<void(uint32_t)> done)
{
    using namespace virtio_scsi;
    const TaskMatch match{subtype == kTmfAbortTask || subtype == kTmfQueryTask ? TaskMatch::Scope::kTask
                          : subtype == kTmfItNexusReset                        ? TaskMatch::Scope::kTarget
                                                                               : TaskMatch::Scope::kLun,
                          lun, tag};
    const bool abort = subtype != kTmfQueryTask && subtype != kTmfQueryTaskSet;
    const auto& queues = queues_.all();
    if (queues.empty())
        return done(0);
    // Counted on the control loop only.
    struct Tally {
        size_t waiting;
        uint32_t found = 0;
        std::function<void(uint32_t)> done;
    };
    auto tally = std::make_shared<Tally>(Tally{queues.size(), 0, std::move(done)});
    for (const auto& queue : queues) {
        std::weak_ptr<ScsiQueue> weak = std::static_pointer_cast<ScsiQueue>(queue);
        queue->thread().post([this, weak, match, abort, tally] {
            auto answer = [this, tally](uint32_t found) {
                boost::asio::post(control_loop_, [tally, found] {
                    tally->found += found;
                    if (--tally->waiting == 0)
                        tally->done(tally->found);
                });
            };
            if (auto scsi_queue = weak.lock())
                scsi_queue->task_management(match, abort, answer);
            else
                answer(0);
        });
    }
}

void VirtioScsi::report_io_error(const Lun& lun, int64_t result)
{
    report_io_error_once(reported_error_, lun.image.path(), result, "a CHECK CONDITION");
}
}  // namespace lkvm
