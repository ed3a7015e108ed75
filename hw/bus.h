// An address space (port I/O or MMIO) split into ranges, each owned by one
// device. vCPU threads dispatch concurrently; registration (PCI BAR moves)
// takes the lock exclusively. A device is called with the lock released: a
// configuration write that arrives through the port I/O bus (0xcf8/0xcfc)
// may move an I/O BAR, which re-registers on that same bus. Devices outlive
// their registrations (the machine owns both), so an access that found a
// range just before it moved still reaches a live device.
#pragma once

#include <cstdint>
#include <map>
#include <shared_mutex>
#include <span>
#include <string>

namespace lkvm {

// The two x86 address spaces a guest reaches devices in.
enum class AddressSpace { kMemory, kPort };

class BusDevice {
public:
    virtual ~BusDevice() = default;
    // offset is relative to the start of the range the device registered.
    virtual void read(uint64_t offset, std::span<uint8_t> data) = 0;
    virtual void write(uint64_t offset, std::span<const uint8_t> data) = 0;
};

class Bus {
public:
    explicit Bus(std::string name) : name_(std::move(name)) {}

    // Refuses (throws lkvm::Error) a range that is empty, wraps or overlaps another.
    void add(uint64_t base, uint64_t size, BusDevice& device);
    // Removes device's range starting at base; false if there is none. A range
    // there of another device stays: a guest can aim a BAR at any address, and
    // moving it on must not take down what it was placed over.
    bool remove(uint64_t base, const BusDevice& device);

    // An access no device claims whole reads as all ones and is otherwise
    // ignored, as on a real bus; these return whether a device took it.
    bool read(uint64_t addr, std::span<uint8_t> data) const;
    bool write(uint64_t addr, std::span<const uint8_t> data) const;

private:
    struct Range {
        uint64_t size;
        BusDevice* device;
    };
    // The device whose range holds all of [addr, addr + len), with its offset (takes the lock shared).
    std::pair<BusDevice*, uint64_t> find(uint64_t addr, uint64_t len) const;

    std::string name_;
    mutable std::shared_mutex mutex_;
    std::map<uint64_t, Range> ranges_;  // keyed by base
};

}  // namespace lkvm
