// Binds virtio-pci devices to KVM: queue notify addresses (MMIO or ports)
// become ioeventfds (a guest kick wakes the I/O thread without leaving the
// kernel), MSI-X vectors become irqfds on GSIs routed to the MSI message, and
// BAR moves follow on the MMIO or port I/O bus.
#pragma once

#include <map>
#include <mutex>

#include "hw/bus.h"
#include "kvm/kvm.h"
#include "virtio/virtio_pci.h"

namespace lkvm {

class KvmVirtioHost : public VirtioPciHost {
public:
    KvmVirtioHost(const Vm& vm, Bus& mmio, Bus& pio);

    void bind_notify(AddressSpace space, uint64_t address, int fd, bool bind) override;
    void route_msi(int fd, bool enabled, uint64_t address, uint32_t data) override;
    bool map_bar(AddressSpace space, BusDevice& device, uint64_t old_address, uint64_t new_address,
                 uint64_t size) override;
    void set_intx(unsigned gsi, bool asserted) override;

private:
    struct MsiRoute {
        uint32_t gsi;
        uint64_t address;
        uint32_t data;
        bool enabled;
    };
    void commit_routes();  // KVM_SET_GSI_ROUTING with the legacy routes and every MSI route

    const Vm& vm_;
    Bus& mmio_;
    Bus& pio_;
    // KVM_IOEVENTFD's len: 0 (any write size) where KVM has it, which puts an
    // MMIO notify on the fast MMIO bus (VMX then skips decoding the
    // instruction); else 2, the size of the driver's notify write.
    const uint32_t notify_len_;
    std::mutex mutex_;
    std::map<int, MsiRoute> msi_;  // by irqfd
    uint32_t next_gsi_ = 24;       // 0-23 are the IOAPIC pins
    std::map<unsigned, unsigned> intx_asserted_;  // GSI -> devices asserting it (lines are shared)
};

}  // namespace lkvm
