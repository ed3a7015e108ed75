// The modern virtio-pci transport (virtio 1.x section 4.1), VERSION_1 only:
// common, notify, ISR and device configuration structures plus the MSI-X
// table and PBA in one 64-bit memory BAR, or (notify in port space) the
// notify structure alone in an I/O BAR. Each queue's notify address and each
// MSI-X vector are bound to eventfds by the VMM through VirtioPciHost; the
// device model behind sees only those eventfds.
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
    // Bind (or unbind) `fd` so that a 16-bit write to this address (a port, in
    // kPort) makes it readable.
    virtual void bind_notify(AddressSpace space, uint64_t address, int fd, bool bind) = 0;
    // Route writes to `fd` to the guest as this MSI message (or stop routing).
    virtual void route_msi(int fd, bool enabled, uint64_t address, uint32_t data) = 0;
    // Assert or deassert the INTx line at this GSI (for drivers without MSI-X).
    virtual void set_intx(unsigned gsi, bool asserted) = 0;
    // Where the BAR moved: the bus registration follows it (0: unmapped).
    // Returns whether the new range is mapped (a guest may place a BAR over
    // another device's range, which then keeps it).
    virtual bool map_bar(AddressSpace space, BusDevice& device, uint64_t old_address, uint64_t new_address,
                         uint64_t size) = 0;
};

class VirtioPciDevice : public PciDevice, public BusDevice {
public:
    static constexpr uint64_t kBarSize = 0x8000;
    static constexpr uint64_t kCommonOffset = 0x0000, kIsrOffset = 0x1000, kDeviceOffset = 0x2000;
    static constexpr uint64_t kNotifyOffset = 0x3000, kMsixTableOffset = 0x4000, kMsixPbaOffset = 0x5000;
    static constexpr uint32_t kNotifyMultiplier = 4;
    // Notify in port space: BAR 2 holds one 2-byte port per queue (what the
    // driver writes, the queue index, is 16 bits) and nothing else.
    static constexpr unsigned kNotifyIoBar = 2;
    static constexpr uint32_t kPortNotifyMultiplier = 2;
    static constexpr uint16_t kNoVector = 0xffff;

    // notify: where the queue notify registers are, in BAR 0 (kMemory) or in
    // the I/O BAR (kPort).
    VirtioPciDevice(VirtioDevice& device, VirtioPciHost& host, AddressSpace notify = AddressSpace::kMemory);
    ~VirtioPciDevice() override;

    // BAR0 accesses, offsets relative to the BAR.
    void read(uint64_t offset, std::span<uint8_t> data) override;
    void write(uint64_t offset, std::span<const uint8_t> data) override;

    uint8_t status() const { return status_; }
    AddressSpace notify_space() const { return notify_space_; }
    // INTx fallback: the GSI this slot's INTA# is wired to.
    void use_intx(uint8_t gsi);
    // The driver broke a ring (or the status protocol): NEEDS_RESET, and a
    // configuration interrupt. Any thread.
    void device_broken();

protected:
    void config_changed() override;

private:
    class VectorInterrupt;
    // The I/O BAR's accesses (notify in port space): only writes that no
    // ioeventfd took (KVM could not bind one, or an odd size) get here.
    class NotifyPorts : public BusDevice {
    public:
        explicit NotifyPorts(VirtioPciDevice& transport) : transport_(transport) {}
        void read(uint64_t offset, std::span<uint8_t> data) override;
        void write(uint64_t offset, std::span<const uint8_t> data) override;

    private:
        VirtioPciDevice& transport_;
    };
    // Where a BAR is now (0: nowhere), and whether its range is on the bus.
    struct BarMapping {
        uint64_t address = 0;
        bool mapped = false;
    };
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
    // Whole qwords, one bit per vector (PCI 3.0 6.8.2.10).
    uint64_t pba_bytes() const { return 8 * ((msix_.size() + 63) / 64); }
    void update_vector(unsigned vector);
    // Moves a BAR's bus registration and, if it holds the notify structure, the ioeventfds with it.
    void move_bar(AddressSpace space, BusDevice& device, BarMapping& now, uint64_t address, uint64_t size,
                  bool has_notify);
    void bind_notifies(AddressSpace space, uint64_t base, bool bind);
    // A notify write at this offset into the notify structure that no ioeventfd took.
    void notify_by_exit(uint64_t offset, size_t size);
    void raise_vector(uint16_t vector);
    void raise_intx(uint8_t isr_bits);

    VirtioDevice& device_;
    VirtioPciHost& host_;
    std::mutex mutex_;  // vCPU threads; the I/O path touches only the atomics below
    const AddressSpace notify_space_;
    const uint32_t notify_multiplier_;
    uint64_t io_bar_size_ = 0;  // kPort only
    NotifyPorts notify_ports_{*this};
    uint8_t msix_cap_ = 0;
    BarMapping bar_;     // BAR 0
    BarMapping io_bar_;  // the notify I/O BAR
    uint32_t device_feature_select_ = 0, driver_feature_select_ = 0;
    uint64_t driver_features_ = 0;
    uint8_t status_ = 0;
    uint8_t config_generation_ = 0;
    uint16_t queue_select_ = 0;
    // Written by vCPUs under mutex_, read by the serving thread in
    // device_broken() without it: atomic, and relaxed is enough, since it only
    // names the vector to signal and orders nothing else.
    std::atomic<uint16_t> config_vector_{kNoVector};
    std::vector<Queue> queues_;
    std::vector<MsixEntry> msix_;
    std::unique_ptr<std::atomic<bool>[]> vector_masked_;
    std::unique_ptr<std::atomic<bool>[]> vector_pending_;
    std::unique_ptr<std::atomic<uint16_t>[]> queue_vector_;  // read by the serving thread
    std::vector<std::unique_ptr<VectorInterrupt>> interrupts_;  // one per queue
    std::atomic<uint8_t> isr_{0};
    // The MSI-X capability's enable and function mask bits as config_changed()
    // last saw them, under mutex_; msix_on_ mirrors the enable bit for the
    // interrupt path, which takes no lock.
    bool msix_enable_ = false, function_mask_ = false;
    std::atomic<bool> msix_on_{false};
    // INTx: the ISR and the line change together, or a read could clear the
    // ISR between a raise's set and assert and leave the line stuck.
    std::mutex intx_mutex_;
    int intx_gsi_ = -1;
    bool intx_asserted_ = false;
    std::atomic<bool> needs_reset_{false};
};

}  // namespace lkvm
