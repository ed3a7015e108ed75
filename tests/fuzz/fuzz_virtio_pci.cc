// The virtio-pci transport as a state machine: a real VirtioPciDevice on a
// real PCI host bridge, driven by any sequence of BAR, configuration space
// and configuration port accesses, with interrupts and broken rings from the
// device side in between. The stand-in device and host check the contracts
// the transport keeps with them: activate() once per reset with features
// that were offered, ioeventfds bound only inside a BAR that is mapped and
// each bound once, a BAR unmapped only where it was mapped, INTx edges that
// alternate; and the MSI-X pending bits the driver reads.
//
// Input: u8 queue count (see below), u8 flags (bit 0 notify in port
// space, bit 1 INTx wired), then 12-byte operations: u8 op, u16 offset, u8
// size, u64 value (see the switch below).
#include <memory>
#include <optional>
#include <set>
#include <utility>

#include "base/error.h"
#include "hw/pci.h"
#include "tests/fuzz/fuzz_input.h"
#include "virtio/virtio_pci.h"

using namespace lkvm;

namespace {

constexpr uint64_t kOffered = kVirtioFVersion1 | kVirtioFRingIndirectDesc | kVirtioFRingEventIdx | 1;

class StandIn : public VirtioDevice {
public:
    explicit StandIn(unsigned queues) : queues_(queues) {}
    uint16_t device_id() const override { return 2; }
    uint64_t features() const override { return kOffered; }
    unsigned num_queues() const override { return queues_; }
    uint16_t max_queue_size() const override { return 256; }
    void read_config(uint64_t offset, std::span<uint8_t> data) override
    {
        FUZZ_CHECK(offset < 0x1000);
        std::fill(data.begin(), data.end(), 0x5a);
    }
    void write_config(uint64_t offset, std::span<const uint8_t>) override { FUZZ_CHECK(offset < 0x1000); }
    void activate(uint64_t features, std::vector<QueueSetup> queues, std::function<void()> broken) override
    {
        FUZZ_CHECK(!active_);
        FUZZ_CHECK((features & ~kOffered) == 0 && (features & kVirtioFVersion1));
        for (size_t i = 0; i < queues.size(); ++i) {
            FUZZ_CHECK(queues[i].index < queues_ && (i == 0 || queues[i].index > queues[i - 1].index));
            FUZZ_CHECK(queues[i].notify_fd >= 0 && queues[i].interrupt);
        }
        active_ = true;
        setups_ = std::move(queues);
        broken_ = std::move(broken);
    }
    void reset() override
    {
        active_ = false;
        setups_.clear();
        broken_ = nullptr;
    }
    // What a serving thread would do: interrupt a queue (returns which), or find its ring broken.
    std::optional<unsigned> raise(unsigned which)
    {
        if (setups_.empty())
            return std::nullopt;
        const QueueSetup& setup = setups_[which % setups_.size()];
        setup.interrupt->raise();
        return setup.index;
    }
    void break_ring()
    {
        if (broken_)
            broken_();
    }

private:
    unsigned queues_;
    bool active_ = false;
    std::vector<QueueSetup> setups_;
    std::function<void()> broken_;
};

class CheckingHost : public VirtioPciHost {
public:
    struct Mapping {
        uint64_t address = 0, size = 0;
        BusDevice* device = nullptr;
    };
    Mapping mapped[2];  // by AddressSpace
    bool refuse = false;  // another device holds any range we are moved to
    int intx_gsi = -1;

    void bind_notify(AddressSpace space, uint64_t address, int fd, bool bind) override
    {
        const Mapping& m = mapped[int(space)];
        FUZZ_CHECK(fd >= 0 && m.device && address >= m.address && address - m.address < m.size);
        FUZZ_CHECK(bind ? bound_.insert({space, address}).second : bound_.erase({space, address}) == 1);
    }
    void route_msi(int fd, bool, uint64_t, uint32_t) override { FUZZ_CHECK(fd >= 0); }
    void set_intx(unsigned gsi, bool asserted) override
    {
        FUZZ_CHECK(int(gsi) == intx_gsi && asserted != intx_);
        intx_ = asserted;
    }
    bool map_bar(AddressSpace space, BusDevice& device, uint64_t old_address, uint64_t new_address,
                 uint64_t size) override
    {
        Mapping& m = mapped[int(space)];
        if (old_address) {
            FUZZ_CHECK(m.device == &device && m.address == old_address && m.size == size);
            for (const auto& [s, address] : bound_)
                FUZZ_CHECK(s != space);  // the ioeventfds went first
            m = {};
        }
        if (!new_address || refuse)
            return false;
        FUZZ_CHECK(!m.device);
        m = {new_address, size, &device};
        return true;
    }

private:
    std::set<std::pair<AddressSpace, uint64_t>> bound_;
    bool intx_ = false;
};

// The MSI-X state as the driver sees it: capability, table and PBA.
class MsixView {
public:
    MsixView(VirtioPciDevice& transport, PciHostBridge& bridge, unsigned slot)
        : transport_(transport), bridge_(bridge), slot_(slot)
    {
        for (cap_ = config(0x34, 1); cap_ && config(cap_, 1) != 0x11; cap_ = config(cap_ + 1, 1)) {
        }
        FUZZ_CHECK(cap_);
        vectors_ = (config(cap_ + 2, 2) & 0x7ff) + 1;
    }
    unsigned vectors() const { return vectors_; }
    // Enabled, and neither the function nor the vector masked.
    bool delivers(unsigned v)
    {
        const uint32_t control = config(cap_ + 2, 2);
        return (control & 0x8000) && !(control & 0x4000) && !(bar32(0x4000 + 16 * v + 12) & 1);
    }
    bool enabled() { return config(cap_ + 2, 2) & 0x8000; }
    bool pending(unsigned v)
    {
        uint8_t byte = 0;
        transport_.read(VirtioPciDevice::kMsixPbaOffset + v / 8, {&byte, 1});
        return byte >> (v % 8) & 1;
    }
    // queue_msix_vector of queue q, queue_select left as it was.
    uint16_t queue_vector(uint16_t q)
    {
        const uint16_t selected = common16(0x16);
        set_common16(0x16, q);
        const uint16_t vector = common16(0x1a);
        set_common16(0x16, selected);
        return vector;
    }

private:
    uint32_t config(unsigned offset, unsigned size) { return bridge_.config_read(slot_, 0, offset, size); }
    uint32_t bar32(uint64_t offset)
    {
        uint32_t v = 0;
        transport_.read(offset, {reinterpret_cast<uint8_t*>(&v), 4});
        return v;
    }
    uint16_t common16(uint64_t offset)
    {
        uint16_t v = 0;
        transport_.read(offset, {reinterpret_cast<uint8_t*>(&v), 2});
        return v;
    }
    void set_common16(uint64_t offset, uint16_t v) { transport_.write(offset, {reinterpret_cast<uint8_t*>(&v), 2}); }

    VirtioPciDevice& transport_;
    PciHostBridge& bridge_;
    unsigned slot_;
    unsigned cap_ = 0, vectors_ = 0;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    fuzz::Input in(data, size);
    // Mostly a few queues (each costs eventfds, so time); with the top bit
    // set 2 to 256, past the 64 vectors one PBA qword holds and past what a
    // transport takes at all.
    const uint8_t queues = in.u8();
    StandIn device(queues & 0x80 ? 2u * (queues & 0x7f) + 2 : queues % 8 + 1u);
    const uint8_t flags = in.u8();
    CheckingHost host;
    PciHostBridge bridge(0xc0000000, 0x10000000, 0x6000, 0xa000);
    std::optional<VirtioPciDevice> made;
    try {
        made.emplace(device, host, flags & 1 ? AddressSpace::kPort : AddressSpace::kMemory);
    } catch (const Error&) {
        return 0;  // refused at start, with a message
    }
    VirtioPciDevice& transport = *made;
    const unsigned slot = bridge.add_device(transport);
    MsixView msix(transport, bridge, slot);
    FUZZ_CHECK(msix.vectors() == device.num_queues() + 1);
    if (flags & 2) {
        host.intx_gsi = pci_intx_gsi(slot);
        transport.use_intx(static_cast<uint8_t>(host.intx_gsi));
    }

    uint8_t buffer[8];
    while (!in.empty()) {
        const uint8_t op = in.u8();
        const uint16_t offset = in.u16();
        const unsigned bytes = 1u << (in.u8() % 4);  // 1, 2, 4 or 8, as KVM hands out
        const uint64_t value = in.u64();
        std::memcpy(buffer, &value, sizeof buffer);
        const std::span<uint8_t> access(buffer, bytes);
        // A bus passes on only accesses wholly inside the range.
        const uint64_t in_bar = offset % (VirtioPciDevice::kBarSize - bytes + 1);
        const CheckingHost::Mapping& ports = host.mapped[int(AddressSpace::kPort)];
        switch (op % 10) {
        case 0: transport.write(in_bar, access); break;
        case 1: transport.read(in_bar, access); break;
        // Configuration space through the bridge, at the sizes its data port passes on.
        case 2: bridge.config_write(slot, 0, offset % 256, std::min(bytes, 4u), static_cast<uint32_t>(value)); break;
        case 3: bridge.config_read(slot, 0, offset % 256, std::min(bytes, 4u)); break;
        // Or as a guest reaches it: CONFIG_ADDRESS and CONFIG_DATA.
        case 4: bridge.write(offset % PciHostBridge::kPortSpan, access); break;
        case 5: bridge.read(offset % PciHostBridge::kPortSpan, access); break;
        case 6:  // the notify port BAR, for a kick no ioeventfd took
            if (ports.device && bytes <= 4)  // ports: 1, 2 or 4 bytes
                ports.device->write(offset % (ports.size - bytes + 1), access);
            break;
        case 7:
            // A vector that cannot deliver keeps the interrupt pending, and the PBA shows it.
            if (const auto q = device.raise(offset)) {
                const uint16_t v = msix.queue_vector(static_cast<uint16_t>(*q));
                if (msix.enabled() && v < msix.vectors() && !msix.delivers(v))
                    FUZZ_CHECK(msix.pending(v));
            }
            break;
        case 8: device.break_ring(); break;
        case 9: host.refuse = value & 1; break;
        }
    }
    // Nothing stays pending on a vector that delivers: unmasking sent it.
    for (unsigned v = 0; v < msix.vectors(); ++v)
        if (msix.delivers(v))
            FUZZ_CHECK(!msix.pending(v));
    return 0;
}
