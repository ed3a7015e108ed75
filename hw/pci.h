// PCI: a device's 256-byte configuration space (with per-byte write masks,
// so BAR sizing and read-only fields behave as the spec says), and the host
// bridge that reaches bus 0 through configuration mechanism #1 (ports
// 0xcf8/0xcfc) and hands out BAR addresses from its MMIO and I/O windows.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "hw/bus.h"

namespace lkvm {

class PciDevice {
public:
    static constexpr unsigned kConfigSize = 256;
    static constexpr unsigned kNumBars = 6;

    // kIo: an I/O space BAR. x86 ports are 16 bits, so its upper 16 address
    // bits are hardwired to zero (as PCI allows for devices below 64K) and no
    // guest can place it where no port reaches.
    enum class BarKind { kMem32, kMem64, kIo };
    static constexpr uint64_t kMaxIoBarSize = 256;  // PCI's limit for one I/O BAR

    virtual ~PciDevice() = default;

    uint32_t config_read(unsigned offset, unsigned size) const;
    void config_write(unsigned offset, unsigned size, uint32_t value);

    // Current guest address (or port, for an I/O BAR) of a BAR (0 when unassigned).
    uint64_t bar_address(unsigned index) const;
    bool memory_enabled() const;
    bool io_enabled() const;
    // INTA#, wired to `gsi` (also what the interrupt line register reports).
    void set_intx(uint8_t gsi);

protected:
    PciDevice(uint16_t vendor, uint16_t device, uint32_t class_code, uint8_t revision,
              uint16_t subsystem_vendor, uint16_t subsystem);

    // A BAR of size, a power of two: a memory BAR at least 16 bytes (a 64-bit
    // one takes index and index+1), an I/O BAR 4 to kMaxIoBarSize bytes.
    void add_bar(unsigned index, uint64_t size, BarKind kind);
    // Appends a capability (id, next pointer, then body) and returns its offset.
    uint8_t add_capability(uint8_t id, std::span<const uint8_t> body);
    // After every configuration write, with the new state in place: a device
    // maps its BARs again if they moved or decoding changed, or picks up
    // capability changes (MSI-X enable).
    virtual void config_changed() {}

    std::array<uint8_t, kConfigSize> config_{};
    std::array<uint8_t, kConfigSize> write_mask_{};

private:
    friend class PciHostBridge;
    struct Bar {
        uint64_t size = 0;
        BarKind kind = BarKind::kMem32;
    };
    std::array<Bar, kNumBars> bars_{};
    uint8_t next_capability_ = 0x40;
};

// How slots' INTA# reach the IOAPIC: level-triggered, active-high GSIs 16-23,
// as the MP table and the DSDT's _PRT both describe.
constexpr uint8_t kPciIntxFirstGsi = 16;
constexpr uint8_t pci_intx_gsi(unsigned slot) { return static_cast<uint8_t>(kPciIntxFirstGsi + slot % 8); }

class PciHostBridge : public BusDevice {
public:
    static constexpr uint16_t kConfigAddressPort = 0xcf8;
    static constexpr uint64_t kPortSpan = 8;
    static constexpr unsigned kMaxSlots = 32;

    // Memory BARs are placed in [mmio_base, mmio_base + mmio_size), I/O BARs
    // in [io_base, io_base + io_size) (ports, so at most up to 0x10000).
    PciHostBridge(uint64_t mmio_base, uint64_t mmio_size, uint64_t io_base, uint64_t io_size);

    // Puts the device in the next free slot and gives its BARs addresses. Returns the slot.
    unsigned add_device(PciDevice& device);

    void read(uint64_t offset, std::span<uint8_t> data) override;
    void write(uint64_t offset, std::span<const uint8_t> data) override;

    uint32_t config_read(unsigned slot, unsigned function, unsigned offset, unsigned size) const;
    void config_write(unsigned slot, unsigned function, unsigned offset, unsigned size, uint32_t value);

private:
    class HostBridgeFunction;
    PciDevice* device_at(unsigned slot, unsigned function) const;
    // The config register a data-port access at offset addresses, if CONFIG_ADDRESS enables one.
    std::optional<unsigned> data_register(uint64_t offset, size_t size, unsigned& slot, unsigned& function) const;

    mutable std::mutex mutex_;
    uint32_t config_address_ = 0;
    uint64_t mmio_next_, mmio_end_;
    uint64_t io_next_, io_end_;
    std::array<PciDevice*, kMaxSlots> slots_{};
    std::vector<std::unique_ptr<PciDevice>> owned_;
};

}  // namespace lkvm
