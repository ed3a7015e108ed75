// The modern virtio-pci transport (virtio 1.x section 4.1), VERSION_1 only:
// common, notify, ISR and device configuration structures plus the MSI-X
// table and PBA, all in one 64-bit memory BAR. Each queue's notify address
// and each MSI-X vector are bound to eventfds by the VMM through
// VirtioPciHost; the device model behind sees only those eventfds.
#pragma once

#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "base/fd.h"
#include "hw/bus.h"
#include "hw/pci.h"
#include "virtio/device.h"

namespace lkvm {

// What the transport needs from the VMM (KVM in lkvm, a fake guest in tests).
class VirtioPciHost {
public:
    virtual ~VirtioPciHost() = default;
    // Bind (or unbind) `fd` so that a 16-bit write to gpa makes it readable.
    virtual void bind_notify(uint64_t gpa, int fd, bool bind) = 0;
    // Route writes to `fd` to the guest as this MSI message (or stop routing).
    virtual void route_msi(int fd, bool enabled, uint64_t address, uint32_t data) = 0;
    // Assert or deassert the INTx line at this GSI (for drivers without MSI-X).
    virtual void set_intx(unsigned gsi, bool asserted) = 0;
    // Where the BAR moved: the bus registration follows it.
    virtual void map_bar(BusDevice& device, uint64_t old_gpa, uint64_t new_gpa, uint64_t size) = 0;
};

class VirtioPciDevice : public PciDevice, public BusDevice {
public:
    static constexpr uint64_t kBarSize = 0x8000;
    static constexpr uint64_t kCommonOffset = 0x0000, kIsrOffset = 0x1000, kDeviceOffset = 0x2000;
    static constexpr uint64_t kNotifyOffset = 0x3000, kMsixTableOffset = 0x4000, kMsixPbaOffset = 0x5000;
    static constexpr uint32_t kNotifyMultiplier = 4;
    static constexpr uint16_t kNoVector = 0xffff;

    VirtioPciDevice(VirtioDevice& device, VirtioPciHost& host);
    ~VirtioPciDevice() override;

    // BAR0 accesses, offsets relative to the BAR.
    void read(uint64_t offset, std::span<uint8_t> data) override;
    void write(uint64_t offset, std::span<const uint8_t> data) override;

    uint8_t status() const { return status_; }
    // INTx fallback: the GSI this slot's INTA# is wired to.
    void use_intx(uint8_t gsi);
    // The driver broke a ring: NEEDS_RESET, and a configuration interrupt.
    void device_broken();

protected:
    void config_changed() override;

private:
    class VectorInterrupt;
    struct Queue {
        uint16_t size = 0;
        bool enabled = false;
        uint64_t desc = 0, driver = 0, device = 0;
        Fd notify;  // the ioeventfd
    };
    struct MsixEntry {
        uint64_t address = 0;
        uint32_t data = 0;
        bool masked = true;
        Fd irq;     // the irqfd
        // The entry as the table lays it out: address, data, vector control.
        std::array<uint8_t, 16> bytes() const
        {
            std::array<uint8_t, 16> b{};
            const uint32_t control = masked ? 1 : 0;
            std::memcpy(&b[0], &address, 8);
            std::memcpy(&b[8], &data, 4);
            std::memcpy(&b[12], &control, 4);
            return b;
        }
    };

    uint32_t read_common(unsigned offset, unsigned size);
    void write_common(unsigned offset, unsigned size, uint32_t value);
    void set_status(uint8_t status);
    void reset();
    void msix_write(uint64_t offset, std::span<const uint8_t> data);
    void msix_read(uint64_t offset, std::span<uint8_t> data);
    void update_vector(unsigned vector);
    bool msix_enabled() const;
    bool function_masked() const;
    void bind_notifies(uint64_t bar, bool bind);
    void raise_vector(uint16_t vector);
    void raise_intx(uint8_t isr_bits);

    VirtioDevice& device_;
    VirtioPciHost& host_;
    std::mutex mutex_;  // vCPU threads; the I/O path touches only the atomics below
    uint8_t msix_cap_ = 0;
    uint64_t bar_ = 0;  // where BAR0 is mapped now (0: not mapped)
    uint32_t device_feature_select_ = 0, driver_feature_select_ = 0;
    uint64_t driver_features_ = 0;
    uint8_t status_ = 0;
    uint8_t config_generation_ = 0;
    uint16_t queue_select_ = 0;
    uint16_t config_vector_ = kNoVector;
    std::vector<Queue> queues_;
    std::vector<MsixEntry> msix_;
    std::unique_ptr<std::atomic<bool>[]> vector_masked_;
    std::unique_ptr<std::atomic<bool>[]> vector_pending_;
    std::unique_ptr<std::atomic<uint16_t>[]> queue_vector_;  // read by the serving thread
    std::vector<std::unique_ptr<VectorInterrupt>> interrupts_;  // one per queue
    std::atomic<uint8_t> isr_{0};
    std::atomic<bool> msix_on_{false};
    // INTx: the ISR and the line change together, or a read could clear the
    // ISR between a raise's set and assert and leave the line stuck.
    std::mutex intx_mutex_;
    int intx_gsi_ = -1;
    bool intx_asserted_ = false;
    std::atomic<bool> needs_reset_{false};
};

}  // namespace lkvm
