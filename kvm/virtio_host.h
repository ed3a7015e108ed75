// Binds virtio-pci devices to KVM: queue notify addresses become ioeventfds
// (a guest kick wakes the I/O thread without leaving the kernel), MSI-X
// vectors become irqfds on GSIs routed to the MSI message, and BAR moves
// follow on the MMIO bus.
#pragma once

#include <map>
#include <mutex>

#include "hw/bus.h"
#include "kvm/kvm.h"
#include "virtio/virtio_pci.h"

namespace lkvm {

class KvmVirtioHost : public VirtioPciHost {
public:
    KvmVirtioHost(const Vm& vm, Bus& mmio);

    void bind_notify(uint64_t gpa, int fd, bool bind) override;
    void route_msi(int fd, bool enabled, uint64_t address, uint32_t data) override;
    void map_bar(BusDevice& device, uint64_t old_gpa, uint64_t new_gpa, uint64_t size) override;
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
    std::mutex mutex_;
    std::map<int, MsiRoute> msi_;  // by irqfd
    uint32_t next_gsi_ = 24;       // 0-23 are the IOAPIC pins
    std::map<unsigned, unsigned> intx_asserted_;  // GSI -> devices asserting it (lines are shared)
};

}  // namespace lkvm
