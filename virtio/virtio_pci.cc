#include "virtio/virtio_pci.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>

#include "base/error.h"

namespace lkvm {

namespace {
constexpr uint8_t kCapVendor = 0x09, kCapMsix = 0x11;
enum : uint8_t { kCfgCommon = 1, kCfgNotify = 2, kCfgIsr = 3, kCfgDevice = 4 };
constexpr uint8_t kStatusDriverOk = 4, kStatusFeaturesOk = 8;
constexpr uint8_t kStatusNeedsReset = 0x40;
constexpr unsigned kCommonSize = 0x40;
constexpr uint16_t kMsixEnable = 0x8000, kMsixFunctionMask = 0x4000;
constexpr unsigned kMaxVectors = (VirtioPciDevice::kMsixPbaOffset - VirtioPciDevice::kMsixTableOffset) / 16;

std::vector<uint8_t> virtio_cap(uint8_t type, uint64_t offset, uint32_t length, size_t extra = 0, uint8_t bar = 0)
{
    std::vector<uint8_t> body(14 + extra);
    body[0] = static_cast<uint8_t>(16 + extra);  // cap_len
    body[1] = type;
    body[2] = bar;
    const uint32_t off = static_cast<uint32_t>(offset);
    std::memcpy(&body[6], &off, 4);
    std::memcpy(&body[10], &length, 4);
    return body;
}

void write_fd(int fd)
{
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(fd, &one, sizeof(one));
}

Fd make_eventfd()
{
    Fd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!fd.valid())
        throw sys_error("eventfd for a virtio device");
    return fd;
}
}  // namespace

class VirtioPciDevice::VectorInterrupt : public Interrupt {
public:
    VectorInterrupt(VirtioPciDevice& transport, unsigned queue) : transport_(transport), queue_(queue) {}
    void raise() override
    {
        if (transport_.msix_on_.load(std::memory_order_relaxed))
            transport_.raise_vector(transport_.queue_vector_[queue_].load(std::memory_order_relaxed));
        else
            transport_.raise_intx(1);
    }

private:
    VirtioPciDevice& transport_;
    unsigned queue_;
};

VirtioPciDevice::VirtioPciDevice(VirtioDevice& device, VirtioPciHost& host, AddressSpace notify_space)
    : PciDevice(0x1af4, static_cast<uint16_t>(0x1040 + device.device_id()), 0x018000, 1, 0x1af4, 0x1100),
      device_(device),
      host_(host),
      notify_space_(notify_space),
      notify_multiplier_(notify_space == AddressSpace::kPort ? kPortNotifyMultiplier : kNotifyMultiplier),
      queues_(device.num_queues()),
      msix_(device.num_queues() + 1)
{
    if (msix_.size() > kMaxVectors)
        throw Error("a virtio device has at most " + std::to_string(kMaxVectors - 1) + " queues");
    const uint32_t notify_length = notify_multiplier_ * static_cast<uint32_t>(queues_.size());
    add_bar(0, kBarSize, BarKind::kMem64);
    if (notify_space_ == AddressSpace::kPort) {
        io_bar_size_ = std::max<uint64_t>(4, std::bit_ceil(uint64_t{notify_length}));
        if (io_bar_size_ > kMaxIoBarSize)
            throw Error("notify=pio: a device has at most " + std::to_string(kMaxIoBarSize / kPortNotifyMultiplier) +
                        " queues, this one " + std::to_string(queues_.size()));
        add_bar(kNotifyIoBar, io_bar_size_, BarKind::kIo);
    }
    add_capability(kCapVendor, virtio_cap(kCfgCommon, kCommonOffset, kCommonSize));
    add_capability(kCapVendor, virtio_cap(kCfgIsr, kIsrOffset, 1));
    add_capability(kCapVendor, virtio_cap(kCfgDevice, kDeviceOffset, 0x1000));
    // One notify capability only: a driver takes the first it finds, and a
    // second one's ioeventfds would be KVM I/O bus devices (a bounded number) for nothing.
    auto notify = notify_space_ == AddressSpace::kPort
                      ? virtio_cap(kCfgNotify, 0, notify_length, 4, kNotifyIoBar)
                      : virtio_cap(kCfgNotify, kNotifyOffset, notify_length, 4);
    std::memcpy(&notify[14], &notify_multiplier_, 4);
    add_capability(kCapVendor, notify);

    std::vector<uint8_t> msix(10);
    const uint16_t table_size = static_cast<uint16_t>(msix_.size() - 1);
    const uint32_t table = kMsixTableOffset, pba = kMsixPbaOffset;  // both in BAR 0
    std::memcpy(&msix[0], &table_size, 2);
    std::memcpy(&msix[2], &table, 4);
    std::memcpy(&msix[6], &pba, 4);
    msix_cap_ = add_capability(kCapMsix, msix);
    write_mask_[msix_cap_ + 3] = (kMsixEnable | kMsixFunctionMask) >> 8;

    vector_masked_ = std::make_unique<std::atomic<bool>[]>(msix_.size());
    vector_pending_ = std::make_unique<std::atomic<bool>[]>(msix_.size());
    queue_vector_ = std::make_unique<std::atomic<uint16_t>[]>(queues_.size());
    for (size_t v = 0; v < msix_.size(); ++v) {
        msix_[v].irq = make_eventfd();
        vector_masked_[v] = true;
    }
    for (unsigned q = 0; q < queues_.size(); ++q) {
        queues_[q].size = device.max_queue_size();
        queues_[q].notify = make_eventfd();
        queue_vector_[q] = kNoVector;
        interrupts_.push_back(std::make_unique<VectorInterrupt>(*this, q));
    }
}

VirtioPciDevice::~VirtioPciDevice()
{
    device_.reset();
}

void VirtioPciDevice::config_changed()
{
    // Configuration writes are serialized by the host bridge, so bar_ and
    // io_bar_ need no lock; and we must not hold mutex_ while a bus is
    // re-registered, since bus accesses take the bus lock first and mutex_ second.
    const bool memory_notify = notify_space_ == AddressSpace::kMemory;
    move_bar(AddressSpace::kMemory, *this, bar_, memory_enabled() ? bar_address(0) : 0, kBarSize, memory_notify);
    if (!memory_notify)
        move_bar(AddressSpace::kPort, notify_ports_, io_bar_, io_enabled() ? bar_address(kNotifyIoBar) : 0,
                 io_bar_size_, true);
    // MSI-X enable and function mask live in config space too, which only
    // the host bridge's lock guards (we run under it): BAR 0 writes read the
    // copies under mutex_ instead, the interrupt path msix_on_.
    const uint16_t control = static_cast<uint16_t>(config_read(msix_cap_ + 2, 2));
    std::lock_guard lock(mutex_);
    msix_enable_ = control & kMsixEnable;
    function_mask_ = control & kMsixFunctionMask;
    msix_on_.store(msix_enable_);
    for (unsigned v = 0; v < msix_.size(); ++v)
        update_vector(v);
}

void VirtioPciDevice::move_bar(AddressSpace space, BusDevice& device, BarMapping& now, uint64_t address,
                               uint64_t size, bool has_notify)
{
    if (address == now.address)
        return;
    if (now.mapped && has_notify)
        bind_notifies(space, now.address, false);
    // Only what we mapped is ours to unmap: a failed move left another device's range at that address.
    if (now.mapped)
        host_.map_bar(space, device, now.address, 0, size);
    now.address = address;
    now.mapped = address != 0 && host_.map_bar(space, device, 0, address, size);
    // The guest's own kicks would be stolen from whatever kept that range: no ioeventfds there.
    if (now.mapped && has_notify)
        bind_notifies(space, now.address, true);
}

void VirtioPciDevice::bind_notifies(AddressSpace space, uint64_t base, bool bind)
{
    const uint64_t notify = space == AddressSpace::kMemory ? base + kNotifyOffset : base;
    for (unsigned q = 0; q < queues_.size(); ++q)
        host_.bind_notify(space, notify + notify_multiplier_ * q, queues_[q].notify.get(), bind);
}

void VirtioPciDevice::notify_by_exit(uint64_t offset, size_t size)
{
    // Any size, as KVM's length-0 ioeventfd would take it; never past the structure.
    if (offset >= notify_multiplier_ * queues_.size() || size > notify_multiplier_ * queues_.size() - offset)
        return;
    write_fd(queues_[offset / notify_multiplier_].notify.get());
}

void VirtioPciDevice::NotifyPorts::read(uint64_t, std::span<uint8_t> data)
{
    // The notify structure is write-only; reads see zeroes, as in BAR 0.
    std::fill(data.begin(), data.end(), 0);
}

void VirtioPciDevice::NotifyPorts::write(uint64_t offset, std::span<const uint8_t> data)
{
    transport_.notify_by_exit(offset, data.size());
}

void VirtioPciDevice::update_vector(unsigned v)
{
    const bool masked = !msix_enable_ || function_mask_ || msix_[v].masked;
    vector_masked_[v].store(masked);
    if (!masked && vector_pending_[v].exchange(false))
        write_fd(msix_[v].irq.get());
}

void VirtioPciDevice::raise_vector(uint16_t vector)
{
    if (vector >= msix_.size())
        return;  // no vector: the driver asked for no interrupts (no INTx fallback yet)
    if (vector_masked_[vector].load()) {
        vector_pending_[vector].store(true);
        // Unmasked meanwhile? Then deliver what we just left pending.
        if (!vector_masked_[vector].load() && vector_pending_[vector].exchange(false))
            write_fd(msix_[vector].irq.get());
        return;
    }
    write_fd(msix_[vector].irq.get());
}

void VirtioPciDevice::use_intx(uint8_t gsi)
{
    intx_gsi_ = gsi;
    set_intx(gsi);
}

void VirtioPciDevice::raise_intx(uint8_t isr_bits)
{
    std::lock_guard lock(intx_mutex_);
    isr_.fetch_or(isr_bits);
    if (intx_gsi_ >= 0 && !intx_asserted_) {
        intx_asserted_ = true;
        host_.set_intx(static_cast<unsigned>(intx_gsi_), true);
    }
}

void VirtioPciDevice::device_broken()
{
    needs_reset_.store(true);
    if (msix_on_.load()) {
        isr_.fetch_or(2);  // configuration change
        raise_vector(config_vector_.load(std::memory_order_relaxed));
    } else {
        raise_intx(2);
    }
}

void VirtioPciDevice::read(uint64_t offset, std::span<uint8_t> data)
{
    std::fill(data.begin(), data.end(), 0);
    std::lock_guard lock(mutex_);
    if (offset < kCommonSize && data.size() <= 4 && offset + data.size() <= kCommonSize) {
        const uint32_t v = read_common(static_cast<unsigned>(offset), static_cast<unsigned>(data.size()));
        std::memcpy(data.data(), &v, data.size());
    } else if (offset == kIsrOffset && data.size() == 1) {
        // Reading the ISR acknowledges it and drops INTx.
        std::lock_guard intx(intx_mutex_);
        data[0] = isr_.exchange(0);
        if (intx_asserted_) {
            intx_asserted_ = false;
            host_.set_intx(static_cast<unsigned>(intx_gsi_), false);
        }
    } else if (offset >= kDeviceOffset && offset < kNotifyOffset) {
        device_.read_config(offset - kDeviceOffset, data);
    } else if (offset >= kMsixTableOffset && offset < kMsixPbaOffset + pba_bytes()) {
        msix_read(offset, data);
    }
}

void VirtioPciDevice::write(uint64_t offset, std::span<const uint8_t> data)
{
    if (notify_space_ == AddressSpace::kMemory && offset >= kNotifyOffset && offset < kMsixTableOffset) {
        notify_by_exit(offset - kNotifyOffset, data.size());
        return;
    }
    std::unique_lock lock(mutex_);
    if (offset < kCommonSize && data.size() <= 4 && offset + data.size() <= kCommonSize) {
        uint32_t v = 0;
        std::memcpy(&v, data.data(), data.size());
        write_common(static_cast<unsigned>(offset), static_cast<unsigned>(data.size()), v);
    } else if (offset >= kDeviceOffset && offset < kNotifyOffset) {
        device_.write_config(offset - kDeviceOffset, data);
    } else if (offset >= kMsixTableOffset && offset < kMsixPbaOffset) {
        msix_write(offset, data);
    }
}

uint32_t VirtioPciDevice::read_common(unsigned offset, unsigned size)
{
    const uint64_t features = device_.features();
    Queue* q = queue_select_ < queues_.size() ? &queues_[queue_select_] : nullptr;
    uint64_t v = 0;
    switch (offset) {
    case 0x00: v = device_feature_select_; break;
    case 0x04: v = device_feature_select_ < 2 ? static_cast<uint32_t>(features >> (32 * device_feature_select_)) : 0; break;
    case 0x08: v = driver_feature_select_; break;
    case 0x0c: v = driver_feature_select_ < 2 ? static_cast<uint32_t>(driver_features_ >> (32 * driver_feature_select_)) : 0; break;
    case 0x10: v = config_vector_.load(std::memory_order_relaxed); break;
    case 0x12: v = queues_.size(); break;
    case 0x14: v = status_ | (needs_reset_.load() ? kStatusNeedsReset : 0); break;
    case 0x15: v = config_generation_; break;
    case 0x16: v = queue_select_; break;
    case 0x18: v = q ? q->size : 0; break;
    case 0x1a: v = q ? queue_vector_[queue_select_].load() : kNoVector; break;
    case 0x1c: v = q ? q->enabled : 0; break;
    case 0x1e: v = q ? queue_select_ : 0; break;  // queue_notify_off
    case 0x20: v = q ? q->desc : 0; break;
    case 0x24: v = q ? q->desc >> 32 : 0; break;
    case 0x28: v = q ? q->driver : 0; break;
    case 0x2c: v = q ? q->driver >> 32 : 0; break;
    case 0x30: v = q ? q->device : 0; break;
    case 0x34: v = q ? q->device >> 32 : 0; break;
    default: break;
    }
    return static_cast<uint32_t>(v) & (size == 4 ? 0xffffffffu : (1u << (8 * size)) - 1);
}

void VirtioPciDevice::write_common(unsigned offset, unsigned, uint32_t v)
{
    Queue* q = queue_select_ < queues_.size() ? &queues_[queue_select_] : nullptr;
    // Queue registers are frozen while the device runs.
    const bool running = status_ & kStatusDriverOk;
    auto set_low = [](uint64_t& field, uint32_t value) { field = (field & ~0xffffffffull) | value; };
    auto set_high = [](uint64_t& field, uint32_t value) { field = (field & 0xffffffffull) | (uint64_t{value} << 32); };
    switch (offset) {
    case 0x00: device_feature_select_ = v; break;
    case 0x08: driver_feature_select_ = v; break;
    case 0x0c:
        if (!(status_ & kStatusFeaturesOk) && driver_feature_select_ < 2) {
            if (driver_feature_select_ == 0)
                set_low(driver_features_, v);
            else
                set_high(driver_features_, v);
        }
        break;
    case 0x10:
        config_vector_.store(v < msix_.size() ? static_cast<uint16_t>(v) : kNoVector, std::memory_order_relaxed);
        break;
    case 0x14: set_status(static_cast<uint8_t>(v)); break;
    case 0x16: queue_select_ = static_cast<uint16_t>(v); break;
    case 0x18:
        if (q && !running)
            q->size = static_cast<uint16_t>(v);
        break;
    case 0x1a:
        if (q)
            queue_vector_[queue_select_] = v < msix_.size() ? static_cast<uint16_t>(v) : kNoVector;
        break;
    case 0x1c:
        if (q && !running && v == 1)
            q->enabled = true;
        break;
    case 0x20: if (q && !running) set_low(q->desc, v); break;
    case 0x24: if (q && !running) set_high(q->desc, v); break;
    case 0x28: if (q && !running) set_low(q->driver, v); break;
    case 0x2c: if (q && !running) set_high(q->driver, v); break;
    case 0x30: if (q && !running) set_low(q->device, v); break;
    case 0x34: if (q && !running) set_high(q->device, v); break;
    default: break;
    }
}

void VirtioPciDevice::set_status(uint8_t status)
{
    if (status == 0) {
        reset();
        return;
    }
    // A driver clears status bits only by a reset (virtio 1.x 2.1.2). One that
    // cleared DRIVER_OK and set it again would start the device a second time
    // on the same rings: every request served twice, the SCSI control queue
    // replaced under its loop. Such a write changes nothing but NEEDS_RESET;
    // the device goes on with the queues it has.
    if (status_ & ~status) {
        device_broken();
        return;
    }
    if ((status & kStatusFeaturesOk) && !(status_ & kStatusFeaturesOk)) {
        // Only what we offered, and never without VERSION_1: otherwise FEATURES_OK does not stick.
        if ((driver_features_ & ~device_.features()) || !(driver_features_ & kVirtioFVersion1))
            status &= ~kStatusFeaturesOk;
    }
    // A device runs only once features were accepted (FEATURES_OK stuck).
    const bool start = (status & kStatusDriverOk) && !(status_ & kStatusDriverOk) && (status & kStatusFeaturesOk);
    status_ = status;
    if (start) {
        std::vector<QueueSetup> setups;
        for (unsigned i = 0; i < queues_.size(); ++i) {
            const Queue& q = queues_[i];
            if (q.enabled)
                setups.push_back({i, {q.size, q.desc, q.driver, q.device}, q.notify.get(), interrupts_[i].get()});
        }
        device_.activate(driver_features_, std::move(setups), [this] { device_broken(); });
    }
}

void VirtioPciDevice::reset()
{
    device_.reset();
    status_ = 0;
    driver_features_ = 0;
    device_feature_select_ = driver_feature_select_ = 0;
    queue_select_ = 0;
    config_vector_.store(kNoVector, std::memory_order_relaxed);
    needs_reset_.store(false);
    {
        std::lock_guard intx(intx_mutex_);
        isr_.store(0);
        if (intx_asserted_) {
            intx_asserted_ = false;
            host_.set_intx(static_cast<unsigned>(intx_gsi_), false);
        }
    }
    for (unsigned i = 0; i < queues_.size(); ++i) {
        Queue& q = queues_[i];
        q.size = device_.max_queue_size();
        q.enabled = false;
        q.desc = q.driver = q.device = 0;
        queue_vector_[i] = kNoVector;
        uint64_t drained;
        [[maybe_unused]] ssize_t n = ::read(q.notify.get(), &drained, sizeof(drained));
    }
    for (unsigned v = 0; v < msix_.size(); ++v)
        vector_pending_[v] = false;
}

void VirtioPciDevice::msix_read(uint64_t offset, std::span<uint8_t> data)
{
    if (offset >= kMsixPbaOffset) {
        // A bit per vector, all of them: past 64 vectors the PBA is more than one
        // qword. Only the bits that are set are written: read() zeroed data.
        const uint64_t at = offset - kMsixPbaOffset;
        for (size_t i = 0; i < data.size(); ++i)
            for (unsigned bit = 0; bit < 8; ++bit) {
                const uint64_t v = 8 * (at + i) + bit;
                if (v < msix_.size() && vector_pending_[v].load())
                    data[i] |= static_cast<uint8_t>(1u << bit);
            }
        return;
    }
    const uint64_t index = (offset - kMsixTableOffset) / 16, field = (offset - kMsixTableOffset) % 16;
    if (index >= msix_.size() || field + data.size() > 16)
        return;
    const auto entry = msix_[index].bytes();
    std::memcpy(data.data(), &entry[field], data.size());
}

void VirtioPciDevice::msix_write(uint64_t offset, std::span<const uint8_t> data)
{
    const uint64_t index = (offset - kMsixTableOffset) / 16, field = (offset - kMsixTableOffset) % 16;
    if (index >= msix_.size() || field + data.size() > 16)
        return;
    MsixEntry& e = msix_[index];
    auto entry = e.bytes();
    std::memcpy(&entry[field], data.data(), data.size());
    const uint64_t old_address = e.address;
    const uint32_t old_data = e.data;
    uint32_t control;
    std::memcpy(&e.address, &entry[0], 8);
    std::memcpy(&e.data, &entry[8], 4);
    std::memcpy(&control, &entry[12], 4);
    e.masked = control & 1;
    if (e.address != old_address || e.data != old_data || field >= 12)
        host_.route_msi(e.irq.get(), e.address != 0, e.address, e.data);
    update_vector(static_cast<unsigned>(index));
}

}  // namespace lkvm
