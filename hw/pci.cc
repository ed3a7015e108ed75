#include "hw/pci.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <memory>
#include <optional>

#include "base/error.h"

namespace lkvm {

namespace {
constexpr unsigned kVendorId = 0x00, kDeviceId = 0x02, kCommand = 0x04, kStatus = 0x06;
constexpr unsigned kRevision = 0x08, kClassCode = 0x09, kHeaderType = 0x0e;
constexpr unsigned kBar0 = 0x10, kSubsystemVendor = 0x2c, kSubsystemId = 0x2e;
constexpr unsigned kCapabilitiesPointer = 0x34, kInterruptLine = 0x3c;
constexpr uint16_t kCommandIo = 0x1, kCommandMemory = 0x2, kCommandMaster = 0x4, kCommandIntxDisable = 0x400;
constexpr uint16_t kStatusCapabilities = 0x10;
constexpr uint32_t kBarMem64 = 0x4, kBarIo = 0x1;
constexpr uint64_t kPortSpace = 0x10000;

void put16(std::span<uint8_t> s, unsigned off, uint16_t v) { std::memcpy(&s[off], &v, 2); }
void put32(std::span<uint8_t> s, unsigned off, uint32_t v) { std::memcpy(&s[off], &v, 4); }
}  // namespace

PciDevice::PciDevice(uint16_t vendor, uint16_t device, uint32_t class_code, uint8_t revision,
                     uint16_t subsystem_vendor, uint16_t subsystem)
{
    put16(config_, kVendorId, vendor);
    put16(config_, kDeviceId, device);
    config_[kRevision] = revision;
    config_[kClassCode] = class_code & 0xff;
    config_[kClassCode + 1] = (class_code >> 8) & 0xff;
    config_[kClassCode + 2] = (class_code >> 16) & 0xff;
    config_[kHeaderType] = 0;
    put16(config_, kSubsystemVendor, subsystem_vendor);
    put16(config_, kSubsystemId, subsystem);
    put16(write_mask_, kCommand, kCommandIo | kCommandMemory | kCommandMaster | kCommandIntxDisable);
    write_mask_[kInterruptLine] = 0xff;
}

uint32_t PciDevice::config_read(unsigned offset, unsigned size) const
{
    uint32_t value = 0;
    if (offset + size <= kConfigSize)
        std::memcpy(&value, &config_[offset], size);
    return value;
}

void PciDevice::config_write(unsigned offset, unsigned size, uint32_t value)
{
    if (offset + size > kConfigSize)
        return;
    for (unsigned i = 0; i < size; ++i) {
        const uint8_t byte = (value >> (8 * i)) & 0xff;
        const uint8_t mask = write_mask_[offset + i];
        config_[offset + i] = (config_[offset + i] & ~mask) | (byte & mask);
    }
    config_changed();
}

uint64_t PciDevice::bar_address(unsigned index) const
{
    if (index >= kNumBars || bars_[index].size == 0)
        return 0;
    if (bars_[index].kind == BarKind::kIo)
        return config_read(kBar0 + 4 * index, 4) & ~uint64_t{0x3};
    uint64_t address = config_read(kBar0 + 4 * index, 4) & ~uint64_t{0xf};
    if (bars_[index].kind == BarKind::kMem64)
        address |= uint64_t{config_read(kBar0 + 4 * (index + 1), 4)} << 32;
    return address;
}

void PciDevice::set_intx(uint8_t gsi)
{
    config_[kInterruptLine] = gsi;
    config_[kInterruptLine + 1] = 1;  // interrupt pin: INTA#
}

bool PciDevice::memory_enabled() const
{
    return config_read(kCommand, 2) & kCommandMemory;
}

bool PciDevice::io_enabled() const
{
    return config_read(kCommand, 2) & kCommandIo;
}

void PciDevice::add_bar(unsigned index, uint64_t size, BarKind kind)
{
    const bool is64 = kind == BarKind::kMem64;
    if (index + (is64 ? 1 : 0) >= kNumBars || !std::has_single_bit(size))
        throw Error("bad PCI BAR layout");
    if (kind == BarKind::kIo) {
        if (size < 4 || size > kMaxIoBarSize)
            throw Error("bad PCI I/O BAR size");
        bars_[index] = {size, kind};
        put32(config_, kBar0 + 4 * index, kBarIo);
        put32(write_mask_, kBar0 + 4 * index, static_cast<uint32_t>(~(size - 1) & (kPortSpace - 1) & ~uint64_t{0x3}));
        return;
    }
    if (size < 16)
        throw Error("bad PCI BAR layout");
    bars_[index] = {size, kind};
    const uint64_t mask = ~(size - 1) & ~uint64_t{0xf};
    put32(config_, kBar0 + 4 * index, is64 ? kBarMem64 : 0);
    put32(write_mask_, kBar0 + 4 * index, static_cast<uint32_t>(mask));
    if (is64)
        put32(write_mask_, kBar0 + 4 * (index + 1), static_cast<uint32_t>(mask >> 32));
}

uint8_t PciDevice::add_capability(uint8_t id, std::span<const uint8_t> body)
{
    const unsigned offset = next_capability_;
    const unsigned length = (2 + body.size() + 3) & ~3u;
    if (offset + length > kConfigSize)
        throw Error("PCI capabilities do not fit in configuration space");
    config_[offset] = id;
    config_[offset + 1] = 0;
    std::copy(body.begin(), body.end(), config_.begin() + offset + 2);
    // Link it at the end of the list.
    if (config_[kCapabilitiesPointer] == 0) {
        config_[kCapabilitiesPointer] = offset;
    } else {
        unsigned at = config_[kCapabilitiesPointer];
        while (config_[at + 1] != 0)
            at = config_[at + 1];
        config_[at + 1] = offset;
    }
    put16(config_, kStatus, config_read(kStatus, 2) | kStatusCapabilities);
    next_capability_ = offset + length;
    return offset;
}

// 00:00.0, so that Linux's probe of configuration mechanism #1 finds a host bridge on bus 0.
class PciHostBridge::HostBridgeFunction : public PciDevice {
public:
    HostBridgeFunction() : PciDevice(0x8086, 0x29c0, 0x060000, 0, 0x1af4, 0x1100) {}
};

PciHostBridge::PciHostBridge(uint64_t mmio_base, uint64_t mmio_size, uint64_t io_base, uint64_t io_size)
    : mmio_next_(mmio_base), mmio_end_(mmio_base + mmio_size), io_next_(io_base), io_end_(io_base + io_size)
{
    if (io_base + io_size > kPortSpace || io_base + io_size < io_base)
        throw Error("PCI I/O window beyond the 64K port space");
    owned_.push_back(std::make_unique<HostBridgeFunction>());
    slots_[0] = owned_.back().get();
}

unsigned PciHostBridge::add_device(PciDevice& device)
{
    std::lock_guard lock(mutex_);
    auto free_slot = std::find(slots_.begin(), slots_.end(), nullptr);
    if (free_slot == slots_.end())
        throw Error("no free PCI slot: at most " + std::to_string(kMaxSlots - 1) + " devices");
    for (unsigned i = 0; i < PciDevice::kNumBars; ++i) {
        const auto& bar = device.bars_[i];
        if (bar.size == 0)
            continue;
        if (bar.kind == PciDevice::BarKind::kIo) {
            const uint64_t port = (io_next_ + bar.size - 1) & ~(bar.size - 1);
            if (port + bar.size > io_end_ || port < io_next_)
                throw Error("PCI I/O window is full");
            io_next_ = port + bar.size;
            put32(device.config_, kBar0 + 4 * i, static_cast<uint32_t>(port) | kBarIo);
            continue;
        }
        const uint64_t address = (mmio_next_ + bar.size - 1) & ~(bar.size - 1);
        if (address + bar.size > mmio_end_ || address < mmio_next_)
            throw Error("PCI MMIO window is full");
        mmio_next_ = address + bar.size;
        put32(device.config_, kBar0 + 4 * i,
              static_cast<uint32_t>(address) | (bar.kind == PciDevice::BarKind::kMem64 ? kBarMem64 : 0));
        if (bar.kind == PciDevice::BarKind::kMem64)
            put32(device.config_, kBar0 + 4 * (i + 1), static_cast<uint32_t>(address >> 32));
    }
    *free_slot = &device;
    return static_cast<unsigned>(free_slot - slots_.begin());
}

PciDevice* PciHostBridge::device_at(unsigned slot, unsigned function) const
{
    if (slot >= kMaxSlots || function != 0)
        return nullptr;
    return slots_[slot];
}

uint32_t PciHostBridge::config_read(unsigned slot, unsigned function, unsigned offset, unsigned size) const
{
    const PciDevice* device = device_at(slot, function);
    if (!device)
        return size == 4 ? 0xffffffff : (1u << (8 * size)) - 1;
    return device->config_read(offset, size);
}

void PciHostBridge::config_write(unsigned slot, unsigned function, unsigned offset, unsigned size, uint32_t value)
{
    if (PciDevice* device = device_at(slot, function))
        device->config_write(offset, size, value);
}

std::optional<unsigned> PciHostBridge::data_register(uint64_t offset, size_t size, unsigned& slot, unsigned& function) const
{
    // Only bus 0 exists; data port accesses must stay inside the 4-byte window.
    if (offset < 4 || offset + size > 8 || !(config_address_ & 0x80000000u) || ((config_address_ >> 16) & 0xff) != 0)
        return std::nullopt;
    slot = (config_address_ >> 11) & 0x1f;
    function = (config_address_ >> 8) & 0x7;
    return (config_address_ & 0xfc) + static_cast<unsigned>(offset - 4);
}

void PciHostBridge::read(uint64_t offset, std::span<uint8_t> data)
{
    std::lock_guard lock(mutex_);
    uint32_t value = 0xffffffff;
    unsigned slot = 0, function = 0;
    if (offset == 0 && data.size() == 4)
        value = config_address_;
    else if (auto reg = data_register(offset, data.size(), slot, function))
        value = config_read(slot, function, *reg, static_cast<unsigned>(data.size()));
    std::memcpy(data.data(), &value, std::min<size_t>(data.size(), 4));
}

void PciHostBridge::write(uint64_t offset, std::span<const uint8_t> data)
{
    std::lock_guard lock(mutex_);
    uint32_t value = 0;
    std::memcpy(&value, data.data(), std::min<size_t>(data.size(), 4));
    unsigned slot = 0, function = 0;
    if (offset == 0 && data.size() == 4)
        config_address_ = value & 0x80fffffc;
    else if (auto reg = data_register(offset, data.size(), slot, function))
        config_write(slot, function, *reg, static_cast<unsigned>(data.size()), value);
}

}  // namespace lkvm
