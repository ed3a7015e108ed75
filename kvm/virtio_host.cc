#include "kvm/virtio_host.h"

#include <sys/ioctl.h>

#include <cstring>
#include <memory>
#include <vector>

#include "base/error.h"
#include "base/log.h"

namespace lkvm {

namespace {
// struct kvm_irq_routing without the C++-unfriendly flexible array (see kvm.cc).
struct RoutingHeader {
    uint32_t nr;
    uint32_t flags;
};
constexpr unsigned long kSetGsiRouting = _IOW(KVMIO, 0x6a, RoutingHeader);
constexpr uint32_t kIoApicPins = 24, kPicIrqs = 16;
}  // namespace

KvmVirtioHost::KvmVirtioHost(const Vm& vm, Bus& mmio, Bus& pio)
    : vm_(vm),
      mmio_(mmio),
      pio_(pio),
      notify_len_(::ioctl(vm.fd(), KVM_CHECK_EXTENSION, KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0 ? 0 : 2)
{
    log_debug(notify_len_ == 0 ? "queue notify ioeventfds: length 0 (any write size; MMIO ones on KVM's fast MMIO bus)"
                               : "queue notify ioeventfds: length 2 (KVM lacks KVM_CAP_IOEVENTFD_ANY_LENGTH)");
}

void KvmVirtioHost::bind_notify(AddressSpace space, uint64_t address, int fd, bool bind)
{
    const bool port = space == AddressSpace::kPort;
    kvm_ioeventfd io{};
    io.addr = address;
    // Deassigning matches on len too: the same len as the assign.
    io.len = notify_len_;
    io.fd = fd;
    io.flags = (bind ? 0 : KVM_IOEVENTFD_FLAG_DEASSIGN) | (port ? KVM_IOEVENTFD_FLAG_PIO : 0);
    if (::ioctl(vm_.fd(), KVM_IOEVENTFD, &io) < 0 && bind)
        log_warn(std::string("KVM_IOEVENTFD: ") + std::strerror(errno) + "; notifications go through " +
                 (port ? "port I/O" : "MMIO") + " exits");
}

void KvmVirtioHost::route_msi(int fd, bool enabled, uint64_t address, uint32_t data)
{
    std::lock_guard lock(mutex_);
    auto it = msi_.find(fd);
    if (it == msi_.end()) {
        if (!enabled)
            return;
        it = msi_.emplace(fd, MsiRoute{next_gsi_++, address, data, true}).first;
        commit_routes();
        kvm_irqfd irqfd{};
        irqfd.fd = static_cast<uint32_t>(fd);
        irqfd.gsi = it->second.gsi;
        if (::ioctl(vm_.fd(), KVM_IRQFD, &irqfd) < 0)
            log_error(std::string("KVM_IRQFD: ") + std::strerror(errno));
        return;
    }
    it->second.address = address;
    it->second.data = data;
    it->second.enabled = enabled;
    commit_routes();
}

void KvmVirtioHost::commit_routes()
{
    std::vector<kvm_irq_routing_entry> entries;
    for (uint32_t pin = 0; pin < kIoApicPins; ++pin) {
        kvm_irq_routing_entry e{};
        e.gsi = pin;
        e.type = KVM_IRQ_ROUTING_IRQCHIP;
        e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
        e.u.irqchip.pin = pin;
        entries.push_back(e);
        if (pin < kPicIrqs && pin != 2) {
            e.u.irqchip.irqchip = pin < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE;
            e.u.irqchip.pin = pin % 8;
            entries.push_back(e);
        }
    }
    for (const auto& [fd, route] : msi_) {
        kvm_irq_routing_entry e{};
        e.gsi = route.gsi;
        e.type = KVM_IRQ_ROUTING_MSI;
        // A disabled route still needs an entry for its irqfd; it points nowhere useful
        // and the transport does not signal it while disabled.
        e.u.msi.address_lo = static_cast<uint32_t>(route.address);
        e.u.msi.address_hi = static_cast<uint32_t>(route.address >> 32);
        e.u.msi.data = route.data;
        entries.push_back(e);
    }
    const size_t bytes = sizeof(RoutingHeader) + entries.size() * sizeof(kvm_irq_routing_entry);
    auto buffer = std::make_unique<uint64_t[]>((bytes + 7) / 8);
    auto* header = reinterpret_cast<RoutingHeader*>(buffer.get());
    header->nr = static_cast<uint32_t>(entries.size());
    header->flags = 0;
    std::memcpy(reinterpret_cast<uint8_t*>(buffer.get()) + sizeof(RoutingHeader), entries.data(),
                entries.size() * sizeof(kvm_irq_routing_entry));
    if (::ioctl(vm_.fd(), kSetGsiRouting, buffer.get()) < 0)
        log_error(std::string("KVM_SET_GSI_ROUTING: ") + std::strerror(errno));
}

void KvmVirtioHost::set_intx(unsigned gsi, bool asserted)
{
    std::lock_guard lock(mutex_);
    unsigned& count = intx_asserted_[gsi];
    count = asserted ? count + 1 : (count ? count - 1 : 0);
    vm_.set_irq_line(gsi, count > 0);
}

bool KvmVirtioHost::map_bar(AddressSpace space, BusDevice& device, uint64_t old_address, uint64_t new_address,
                            uint64_t size)
{
    Bus& bus = space == AddressSpace::kPort ? pio_ : mmio_;
    if (old_address)
        bus.remove(old_address, device);
    if (!new_address)
        return false;
    try {
        bus.add(new_address, size, device);
        return true;
    } catch (const Error& e) {
        // The guest placed a BAR over something else: leave it unmapped, as hardware would decode nothing useful.
        log_warn(std::string("PCI BAR not mapped: ") + e.what());
        return false;
    }
}

}  // namespace lkvm
