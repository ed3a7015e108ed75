// The test guest driver: brings a virtio-pci device up through the PCI bus
// the way Linux's virtio_pci does (capabilities, features, queues, MSI-X),
// kicks the notify eventfd as KVM's ioeventfd would and waits on the MSI-X
// eventfd as KVM's irqfd would. The device and its I/O thread run for real;
// only KVM is missing.
#pragma once

#include <poll.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <atomic>
#include <chrono>
#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "base/mapping.h"
#include "hw/guest_memory.h"
#include "hw/pci.h"
#include "virtio/virtio_pci.h"
#include "virtio/virtqueue.h"

namespace lkvm::test {

class FakeHost : public VirtioPciHost {
public:
    std::map<std::pair<AddressSpace, uint64_t>, int> notify;  // gpa or port -> ioeventfd
    std::map<int, uint32_t> msi;         // irqfd -> MSI data (the driver uses the vector number)
    uint64_t bar = 0;                    // the memory BAR's gpa
    uint64_t io_bar = 0;                 // the I/O BAR's port, and who answers there
    BusDevice* io_device = nullptr;
    int irq_fd_for(uint32_t data) const
    {
        for (const auto& [fd, d] : msi)
            if (d == data)
                return fd;
        throw std::runtime_error("no irqfd routed for MSI data " + std::to_string(data));
    }
    void bind_notify(AddressSpace space, uint64_t address, int fd, bool bind) override
    {
        if (bind)
            notify[{space, address}] = fd;
        else
            notify.erase({space, address});
    }
    void route_msi(int fd, bool enabled, uint64_t, uint32_t data) override
    {
        if (enabled)
            msi[fd] = data;
    }
    bool map_bar(AddressSpace space, BusDevice& device, uint64_t, uint64_t new_address, uint64_t) override
    {
        if (space == AddressSpace::kMemory) {
            bar = new_address;
        } else {
            io_bar = new_address;
            io_device = new_address ? &device : nullptr;
        }
        return new_address != 0;
    }
    std::atomic<bool> intx{false};
    void set_intx(unsigned, bool asserted) override { intx = asserted; }
};

// One guest-side virtqueue with its own memory area.
struct DriverQueue {
    RingLayout rings;
    uint16_t next_desc = 0;
    uint16_t avail_idx = 0;
    uint16_t used_seen = 0;
    uint16_t notified_avail = 0;  // avail idx at the last kick decision
    int notify_fd = -1;
    int irq_fd = -1;
};

// The tasks runnable now, all CPUs together: the 4th field's numerator in
// /proc/loadavg ("0.20 0.18 0.12 3/120 4567"); 0 if it cannot tell.
unsigned runnable_tasks(std::string_view loadavg);
// Whether more tasks are runnable than the host has CPUs: a polling vCPU
// would take the CPU from one of them.
bool others_want_a_cpu();

// How a halted vCPU polls before it sleeps, as KVM does it (kvm_vcpu_halt
// in virt/kvm/kvm_main.c, with its defaults): a window per vCPU that grows
// (x2, from 10 us) after a halt shorter than the maximum and drops to 0
// after one longer, so that a vCPU whose interrupts come late stops
// spinning; and no polling while another task wants the CPU (KVM checks
// single_task_running() and need_resched(); here, more runnable tasks than
// CPUs, or being preempted, ends it).
struct HaltPolling {
    uint64_t max_ns = 0;     // KVM's halt_poll_ns; 0: never poll
    uint64_t window_ns = 0;  // this vCPU's current poll time
    // After a halt of halted_ns (polling and sleeping), as KVM adjusts the window.
    void adjust(uint64_t halted_ns);
    // others_want_a_cpu(), where a "yes" holds for kContentionRefresh.
    // KVM's single_task_running() is one load; /proc/loadavg is formatted
    // text, some µs to read, which a contended vCPU halting every few µs would
    // pay at each halt. A "no" is read again at every call, so that polling
    // stops as soon as another task waits, as KVM's does.
    bool contended(std::chrono::steady_clock::time_point now);

    static constexpr auto kContentionRefresh = std::chrono::milliseconds(1);
    std::chrono::steady_clock::time_point contention_read{};
    bool contention = false;
};

struct Buffer {
    uint64_t gpa;
    uint32_t len;
    bool writable;
};

class GuestDriver {
public:
    static constexpr uint64_t kRamSize = 64ull << 20;
    static constexpr uint64_t kRingArea = 0x100000;     // rings from 1 MiB
    static constexpr uint64_t kDataArea = 0x1000000;    // buffers from 16 MiB

    static constexpr uint64_t kIoBase = 0x6000, kIoSize = 0xa000;

    explicit GuestDriver(uint64_t mmio_base = 0xc0000000)
        : ram_(map_ram()), memory_({{0, kRamSize, ram_.data()}}), bridge_(mmio_base, 0x10000000, kIoBase, kIoSize) {}

    GuestMemory& memory() { return memory_; }
    uint8_t* host(uint64_t gpa) { return ram_.data() + gpa; }
    FakeHost& host_interface() { return host_; }

    // Plug the device in and probe it: returns the features negotiated.
    // Without MSI-X the driver falls back to INTx and the ISR, as Linux does with pci=nomsi.
    uint64_t probe(VirtioPciDevice& device, uint64_t wanted_features, unsigned queues, uint16_t queue_size = 256,
                   bool msix = true);
    uint8_t read_isr() { return static_cast<uint8_t>(bar_read(isr_, 1)); }
    // Rewrite status 0 and probe again with the same parameters.
    uint64_t reprobe(uint64_t wanted_features, unsigned queues, uint16_t queue_size = 256);

    uint8_t status() { return static_cast<uint8_t>(common_read(0x14, 1)); }
    void write_status(uint8_t s) { common_write(0x14, 1, s); }

    // Puts a chain of buffers on queue q; returns its head. Does not kick.
    uint16_t add_chain(unsigned q, const std::vector<Buffer>& buffers);
    // The same, in descriptors first..first+n-1 (callers that recycle fixed slots).
    uint16_t add_chain_at(unsigned q, uint16_t first, std::span<const Buffer> buffers);
    // Keeps `depth` requests in flight on queue q until `completions` came
    // back, then waits for the rest: queue(i) puts request i on the ring (not
    // kicked), its chain starting at descriptor stride * i; kicks only when
    // the device asks for them, as Linux does. Returns the
    // completions seen, fewer when the device stopped answering for 5 s.
    uint64_t keep_in_flight(unsigned q, unsigned depth, unsigned stride, uint64_t completions,
                            const std::function<void(unsigned)>& queue);
    // Writes a raw descriptor (for hostile tests) and offers `head` as is.
    void write_desc(unsigned q, uint16_t index, const VringDesc& desc);
    void offer(unsigned q, uint16_t head);
    void set_avail_idx(unsigned q, uint16_t idx);
    void kick(unsigned q);
    // Kicks only when the device asked for it (VRING_USED_F_NO_NOTIFY, or
    // avail_event with EVENT_IDX), as Linux does; returns whether it did.
    bool kick_if_needed(unsigned q);
    // A kick that no ioeventfd takes (KVM could not bind one, or an odd-sized
    // write): a write of `size` bytes to the queue's notify address reaches
    // the transport through an exit, in whichever BAR the capability named.
    void kick_by_exit(unsigned q, unsigned size = 2);
    // Writes at `offset` into the notify structure through an exit, in range or not (hostile tests).
    void notify_write(uint64_t offset, unsigned size, uint64_t value);
    // Where the notify capability pointed: a port (I/O BAR) or memory.
    AddressSpace notify_space() const { return notify_space_; }
    // Waits for queue q's interrupt (or any used entry) and returns the used entries seen since last time.
    std::vector<std::pair<uint32_t, uint32_t>> wait_used(unsigned q, size_t at_least, int timeout_ms = 10000);
    // The same into `out` (cleared first), watching the used ring as `halt`
    // says before sleeping on the interrupt, as a halted vCPU does.
    void wait_used(unsigned q, size_t at_least, int timeout_ms, HaltPolling& halt,
                   std::vector<std::pair<uint32_t, uint32_t>>& out);
    bool wait_interrupt(int fd, int timeout_ms);
    // Whether queue q's used ring moved within halt's window; false as soon
    // as this thread is preempted or another task waits for a CPU.
    bool halt_poll(unsigned q, HaltPolling& halt);
    uint16_t used_idx(unsigned q);
    DriverQueue& queue(unsigned q) { return queues_[q]; }
    int config_irq_fd() const { return config_irq_fd_; }
    uint32_t device_config32(unsigned offset);
    uint64_t device_config64(unsigned offset);
    uint8_t device_config8(unsigned offset) { return static_cast<uint8_t>(bar_read(device_cfg_ + offset, 1)); }
    // A driver's write of `size` bytes into the device-specific configuration (any offset: hostile tests too).
    void write_device_config(unsigned offset, unsigned size, uint64_t value) { bar_write(device_cfg_ + offset, size, value); }

private:
    uint32_t bar_read(uint64_t offset, unsigned size);
    void bar_write(uint64_t offset, unsigned size, uint64_t value);
    uint32_t common_read(unsigned offset, unsigned size) { return bar_read(common_ + offset, size); }
    void common_write(unsigned offset, unsigned size, uint64_t v) { bar_write(common_ + offset, size, v); }
    void find_capabilities();

    // Page-aligned anonymous memory, zeroed, as lkvm maps guest RAM: where a
    // guest buffer is aligned for O_DIRECT here, it is in lkvm too.
    static Mapping map_ram()
    {
        void* ram = ::mmap(nullptr, kRamSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (ram == MAP_FAILED)
            throw std::runtime_error("cannot map the test guest's RAM");
        return Mapping(ram, kRamSize);
    }
    Mapping ram_;
    GuestMemory memory_;
    PciHostBridge bridge_;
    FakeHost host_;
    VirtioPciDevice* device_ = nullptr;
    unsigned slot_ = 0;
    uint64_t common_ = 0, notify_ = 0, device_cfg_ = 0, isr_ = 0;
    unsigned notify_bar_ = 0;
    AddressSpace notify_space_ = AddressSpace::kMemory;
    uint64_t notify_base_ = 0;  // the notify BAR's address (gpa or port) as the guest reads it from config space
    bool msix_ = true;
    uint32_t notify_multiplier_ = 0;
    uint8_t msix_cap_ = 0;
    std::vector<DriverQueue> queues_;
    int config_irq_fd_ = -1;
    uint64_t wanted_ = 0;
    uint16_t queue_size_ = 0;
    bool event_idx_ = false;
    unsigned num_queues_ = 0;
};

}  // namespace lkvm::test
