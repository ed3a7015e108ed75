#include "tests/device/driver.h"

#include <fcntl.h>
#include <sys/resource.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <optional>

#include "base/fd.h"

namespace lkvm::test {

namespace {
constexpr uint8_t kAck = 1, kDriver = 2, kDriverOk = 4, kFeaturesOk = 8;
}

uint32_t GuestDriver::bar_read(uint64_t offset, unsigned size)
{
    uint32_t v = 0;
    device_->read(offset, std::span(reinterpret_cast<uint8_t*>(&v), size));
    return v;
}

void GuestDriver::bar_write(uint64_t offset, unsigned size, uint64_t value)
{
    device_->write(offset, std::span(reinterpret_cast<const uint8_t*>(&value), size));
}

void GuestDriver::find_capabilities()
{
    // Walk the capability list exactly as a driver would, from config space.
    unsigned at = bridge_.config_read(slot_, 0, 0x34, 1);
    while (at) {
        const unsigned id = bridge_.config_read(slot_, 0, at, 1);
        if (id == 0x09) {
            const unsigned type = bridge_.config_read(slot_, 0, at + 3, 1);
            const uint64_t offset = bridge_.config_read(slot_, 0, at + 8, 4);
            if (type == 1) common_ = offset;
            // The first notify capability wins, as in Linux's virtio_pci_find_capability().
            if (type == 2 && !notify_multiplier_) {
                notify_ = offset;
                notify_bar_ = bridge_.config_read(slot_, 0, at + 4, 1);
                notify_multiplier_ = bridge_.config_read(slot_, 0, at + 16, 4);
            }
            if (type == 3) isr_ = offset;
            if (type == 4) device_cfg_ = offset;
        } else if (id == 0x11) {
            msix_cap_ = static_cast<uint8_t>(at);
        }
        at = bridge_.config_read(slot_, 0, at + 1, 1);
    }
    if (!notify_multiplier_ || !msix_cap_ || notify_bar_ >= 6)
        throw std::runtime_error("virtio capabilities missing");
}

void GuestDriver::notify_write(uint64_t offset, unsigned size, uint64_t value)
{
    const auto bytes = std::span(reinterpret_cast<const uint8_t*>(&value), size);
    if (notify_space_ == AddressSpace::kPort) {
        if (!host_.io_device)
            throw std::runtime_error("the notify I/O BAR is not mapped");
        host_.io_device->write(notify_ + offset, bytes);
    } else {
        device_->write(notify_ + offset, bytes);
    }
}

void GuestDriver::kick_by_exit(unsigned q, unsigned size)
{
    common_write(0x16, 2, q);
    notify_write(common_read(0x1e, 2) * notify_multiplier_, size, q);
}

uint64_t GuestDriver::probe(VirtioPciDevice& device, uint64_t wanted, unsigned queues, uint16_t queue_size, bool msix)
{
    device_ = &device;
    msix_ = msix;
    slot_ = bridge_.add_device(device);
    if (bridge_.config_read(slot_, 0, 0, 2) != 0x1af4)
        throw std::runtime_error("not a virtio device");
    find_capabilities();
    bridge_.config_write(slot_, 0, 0x04, 2, 0x7);  // I/O and memory decoding, bus mastering: the BARs get mapped
    if (!host_.bar)
        throw std::runtime_error("BAR not mapped");

    // MSI-X: one vector per queue plus config (vector 0), data = vector number.
    const unsigned table = bridge_.config_read(slot_, 0, msix_cap_ + 4, 4) & ~7u;
    const unsigned vectors = (bridge_.config_read(slot_, 0, msix_cap_ + 2, 2) & 0x7ff) + 1;
    for (unsigned v = 0; v < vectors; ++v) {
        bar_write(table + 16 * v, 4, 0xfee00000);
        bar_write(table + 16 * v + 4, 4, 0);
        bar_write(table + 16 * v + 8, 4, v);
        bar_write(table + 16 * v + 12, 4, 0);  // unmask
    }
    if (msix)
        bridge_.config_write(slot_, 0, msix_cap_ + 2, 2, 0x8000);  // MSI-X enable
    return reprobe(wanted, queues, queue_size);
}

uint64_t GuestDriver::reprobe(uint64_t wanted, unsigned queues, uint16_t queue_size)
{
    // What the notify BAR is and where, from its own register (bit 0 set: I/O space); it may have moved.
    const uint32_t notify_bar = bridge_.config_read(slot_, 0, 0x10 + 4 * notify_bar_, 4);
    notify_space_ = notify_bar & 1 ? AddressSpace::kPort : AddressSpace::kMemory;
    notify_base_ = notify_bar & (notify_bar & 1 ? ~3u : ~15u);
    if (notify_space_ == AddressSpace::kMemory && (notify_bar & 0x4))
        notify_base_ |= uint64_t{bridge_.config_read(slot_, 0, 0x14 + 4 * notify_bar_, 4)} << 32;
    wanted_ = wanted;
    num_queues_ = queues;
    queue_size_ = queue_size;
    write_status(0);
    write_status(kAck);
    write_status(kAck | kDriver);
    const uint64_t offered = [&] {
        common_write(0x00, 4, 0);
        uint64_t f = common_read(0x04, 4);
        common_write(0x00, 4, 1);
        return f | (uint64_t{common_read(0x04, 4)} << 32);
    }();
    const uint64_t features = offered & wanted;
    event_idx_ = features & kVirtioFRingEventIdx;
    common_write(0x08, 4, 0);
    common_write(0x0c, 4, static_cast<uint32_t>(features));
    common_write(0x08, 4, 1);
    common_write(0x0c, 4, static_cast<uint32_t>(features >> 32));
    write_status(kAck | kDriver | kFeaturesOk);
    if (!(status() & kFeaturesOk))
        return 0;
    if (msix_) {
        common_write(0x10, 2, 0);  // config vector 0
        config_irq_fd_ = host_.irq_fd_for(0);
    }

    queues_.assign(queues, {});
    for (unsigned q = 0; q < queues; ++q) {
        DriverQueue& dq = queues_[q];
        const uint64_t base = kRingArea + q * 0x10000;
        dq.rings = {queue_size, base, base + 16ull * queue_size, (base + 16ull * queue_size + 6 + 2ull * queue_size + 4095) & ~4095ull};
        std::memset(host(base), 0, 0x10000);
        common_write(0x16, 2, q);
        common_write(0x18, 2, queue_size);
        if (msix_)
            common_write(0x1a, 2, q + 1);
        common_write(0x20, 4, dq.rings.desc);
        common_write(0x24, 4, dq.rings.desc >> 32);
        common_write(0x28, 4, dq.rings.avail);
        common_write(0x2c, 4, dq.rings.avail >> 32);
        common_write(0x30, 4, dq.rings.used);
        common_write(0x34, 4, dq.rings.used >> 32);
        const unsigned notify_off = common_read(0x1e, 2);
        dq.notify_fd = host_.notify.at({notify_space_, notify_base_ + notify_ + notify_off * notify_multiplier_});
        dq.irq_fd = msix_ ? host_.irq_fd_for(q + 1) : -1;
        common_write(0x1c, 2, 1);
    }
    write_status(kAck | kDriver | kFeaturesOk | kDriverOk);
    return features;
}

void GuestDriver::write_desc(unsigned q, uint16_t index, const VringDesc& desc)
{
    std::memcpy(host(queues_[q].rings.desc + 16ull * index), &desc, 16);
}

uint16_t GuestDriver::add_chain(unsigned q, const std::vector<Buffer>& buffers)
{
    DriverQueue& dq = queues_[q];
    const uint16_t head = add_chain_at(q, dq.next_desc, buffers);
    dq.next_desc = static_cast<uint16_t>((head + buffers.size()) % dq.rings.size);
    return head;
}

uint16_t GuestDriver::add_chain_at(unsigned q, uint16_t first, std::span<const Buffer> buffers)
{
    DriverQueue& dq = queues_[q];
    const uint16_t head = first;
    for (size_t i = 0; i < buffers.size(); ++i) {
        const uint16_t index = static_cast<uint16_t>((head + i) % dq.rings.size);
        const bool last = i + 1 == buffers.size();
        write_desc(q, index, {buffers[i].gpa, buffers[i].len,
                              static_cast<uint16_t>((buffers[i].writable ? kVringDescWrite : 0) | (last ? 0 : kVringDescNext)),
                              static_cast<uint16_t>((index + 1) % dq.rings.size)});
    }
    offer(q, head);
    return head;
}

uint64_t GuestDriver::keep_in_flight(unsigned q, unsigned depth, unsigned stride, uint64_t completions,
                                     const std::function<void(unsigned)>& queue)
{
    auto put = [&](unsigned i) {
        queues_[q].next_desc = static_cast<uint16_t>(stride * i);
        queue(i);
    };
    for (unsigned i = 0; i < depth; ++i)
        put(i);
    kick_if_needed(q);
    uint64_t submitted = depth, done = 0;
    while (done < submitted) {
        const auto used = wait_used(q, 1, 5000);
        if (used.empty())
            break;
        for (const auto& [head, len] : used) {
            ++done;
            if (submitted < completions) {
                put(head / stride);  // a new request in its place
                ++submitted;
            }
        }
        kick_if_needed(q);  // as Linux: only when the device asks to be kicked
    }
    return done;
}

void GuestDriver::offer(unsigned q, uint16_t head)
{
    DriverQueue& dq = queues_[q];
    std::memcpy(host(dq.rings.avail + 4 + 2ull * (dq.avail_idx % dq.rings.size)), &head, 2);
    set_avail_idx(q, static_cast<uint16_t>(dq.avail_idx + 1));
}

void GuestDriver::set_avail_idx(unsigned q, uint16_t idx)
{
    DriverQueue& dq = queues_[q];
    dq.avail_idx = idx;
    std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(host(dq.rings.avail + 2))).store(idx, std::memory_order_release);
}

void GuestDriver::kick(unsigned q)
{
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(queues_[q].notify_fd, &one, sizeof(one));
}

bool GuestDriver::kick_if_needed(unsigned q)
{
    DriverQueue& dq = queues_[q];
    // As Linux's virtqueue_kick_prepare(): the new avail idx must be visible
    // before the device's wish is read, or both sides may decide to wait.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    const uint16_t old = dq.notified_avail, now = dq.avail_idx;
    dq.notified_avail = now;
    bool needed;
    if (event_idx_) {
        const uint16_t avail_event = std::atomic_ref<uint16_t>(
            *reinterpret_cast<uint16_t*>(host(dq.rings.used + 4 + 8ull * dq.rings.size))).load(std::memory_order_relaxed);
        needed = static_cast<uint16_t>(now - avail_event - 1) < static_cast<uint16_t>(now - old);
    } else {
        const uint16_t flags = std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(host(dq.rings.used)))
                                   .load(std::memory_order_relaxed);
        needed = !(flags & kVringUsedNoNotify);
    }
    if (needed)
        kick(q);
    return needed;
}

uint16_t GuestDriver::used_idx(unsigned q)
{
    return std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(host(queues_[q].rings.used + 2))).load(std::memory_order_acquire);
}

bool GuestDriver::wait_interrupt(int fd, int timeout_ms)
{
    if (fd < 0) {
        // INTx: wait for the line, then acknowledge through the ISR as vp_interrupt() does.
        for (int waited = 0; !host_.intx.load(); ++waited) {
            if (waited >= timeout_ms)
                return false;
            ::usleep(1000);
        }
        return read_isr() != 0;
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1)
        return false;
    uint64_t count;
    [[maybe_unused]] ssize_t n = ::read(fd, &count, sizeof(count));
    return true;
}

void HaltPolling::adjust(uint64_t halted_ns)
{
    constexpr uint64_t kGrowStartNs = 10'000;  // KVM's halt_poll_ns_grow_start
    if (max_ns == 0 || halted_ns <= window_ns)
        return;
    if (window_ns && halted_ns > max_ns)
        window_ns = 0;  // halt_poll_ns_shrink = 0: a long halt ends polling
    else if (window_ns < max_ns && halted_ns < max_ns)
        window_ns = std::min(std::max(window_ns * 2, kGrowStartNs), max_ns);
}

std::vector<std::pair<uint32_t, uint32_t>> GuestDriver::wait_used(unsigned q, size_t at_least, int timeout_ms)
{
    HaltPolling never;
    std::vector<std::pair<uint32_t, uint32_t>> out;
    wait_used(q, at_least, timeout_ms, never, out);
    return out;
}

void GuestDriver::wait_used(unsigned q, size_t at_least, int timeout_ms, HaltPolling& halt,
                            std::vector<std::pair<uint32_t, uint32_t>>& out)
{
    DriverQueue& dq = queues_[q];
    out.clear();
    std::optional<std::chrono::steady_clock::time_point> halted;  // when this wait first found nothing
    for (;;) {
        const uint16_t idx = used_idx(q);
        while (dq.used_seen != idx) {
            uint32_t id, len;
            const uint64_t elem = dq.rings.used + 4 + 8ull * (dq.used_seen % dq.rings.size);
            std::memcpy(&id, host(elem), 4);
            std::memcpy(&len, host(elem + 4), 4);
            out.emplace_back(id, len);
            ++dq.used_seen;
        }
        if (out.size() >= at_least) {
            if (halted)
                halt.adjust(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - *halted).count());
            return;
        }
        // As Linux's virtqueue_enable_cb does with EVENT_IDX: interrupt me after what I have seen,
        // then look once more before sleeping.
        // Atomic, as the device reads it (a plain copy is a data race to TSan).
        std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(host(dq.rings.avail + 4 + 2ull * dq.rings.size)))
            .store(dq.used_seen, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (used_idx(q) != dq.used_seen)
            continue;
        if (!halted)
            halted = std::chrono::steady_clock::now();
        if (halt_poll(q, halt))
            continue;
        if (!wait_interrupt(dq.irq_fd, timeout_ms))
            return;  // timed out: the caller checks the count
    }
}

namespace {
long involuntary_switches()
{
    rusage usage{};
    ::getrusage(RUSAGE_THREAD, &usage);
    return usage.ru_nivcsw;
}
}  // namespace

unsigned runnable_tasks(std::string_view loadavg)
{
    size_t field = 0;  // where the 4th field starts
    for (int skipped = 0; skipped < 3; ++skipped) {
        const size_t space = loadavg.find(' ', field);
        if (space == std::string_view::npos)
            return 0;
        field = space + 1;
    }
    const char* const end = loadavg.data() + loadavg.size();
    unsigned runnable = 0;
    const auto [past, error] = std::from_chars(loadavg.data() + field, end, runnable);
    return error == std::errc() && past != end && *past == '/' ? runnable : 0;
}

bool others_want_a_cpu()
{
    // Opened once for every driver thread: pread at 0 formats it anew.
    static const Fd loadavg(::open("/proc/loadavg", O_RDONLY | O_CLOEXEC));
    static const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    char text[128];
    const ssize_t n = ::pread(loadavg.get(), text, sizeof(text), 0);
    return n > 0 && runnable_tasks({text, static_cast<size_t>(n)}) > static_cast<unsigned long>(cpus);
}

bool HaltPolling::contended(std::chrono::steady_clock::time_point now)
{
    if (contention && now - contention_read < kContentionRefresh)
        return true;
    contention = others_want_a_cpu();
    contention_read = now;
    return contention;
}

bool GuestDriver::halt_poll(unsigned q, HaltPolling& halt)
{
    if (halt.window_ns == 0)
        return false;
    auto now = std::chrono::steady_clock::now();
    if (halt.contended(now))
        return false;
    const long switches = involuntary_switches();
    const auto deadline = now + std::chrono::nanoseconds(halt.window_ns);
    do {
        for (int i = 0; i < 64; ++i) {
            if (used_idx(q) != queues_[q].used_seen)
                return true;
            __builtin_ia32_pause();
        }
        now = std::chrono::steady_clock::now();
    } while (now < deadline && involuntary_switches() == switches && !halt.contended(now));
    return false;
}

uint32_t GuestDriver::device_config32(unsigned offset) { return bar_read(device_cfg_ + offset, 4); }
uint64_t GuestDriver::device_config64(unsigned offset)
{
    return bar_read(device_cfg_ + offset, 4) | (uint64_t{bar_read(device_cfg_ + offset + 4, 4)} << 32);
}

}  // namespace lkvm::test
