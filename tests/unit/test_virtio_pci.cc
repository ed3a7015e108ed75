// The virtio-pci transport on its own, with no guest driver: register-level
// behaviour the device tests' driver does not reach.
#include <doctest/doctest.h>

#include <cstdint>
#include <span>

#include "virtio/virtio_pci.h"

using namespace lkvm;

namespace {
struct Device : VirtioDevice {
    unsigned queues = 1;
    uint16_t device_id() const override { return 2; }
    uint64_t features() const override { return kVirtioFVersion1; }
    unsigned num_queues() const override { return queues; }
    uint16_t max_queue_size() const override { return 256; }
    void read_config(uint64_t, std::span<uint8_t>) override {}
    void activate(uint64_t, std::vector<QueueSetup>, std::function<void()>) override {}
    void reset() override {}
};

struct Host : VirtioPciHost {
    void bind_notify(AddressSpace, uint64_t, int, bool) override {}
    void route_msi(int, bool, uint64_t, uint32_t) override {}
    void set_intx(unsigned, bool) override {}
    bool map_bar(AddressSpace, BusDevice&, uint64_t, uint64_t new_address, uint64_t) override { return new_address; }
};

unsigned msix_capability(const VirtioPciDevice& t)
{
    unsigned at = t.config_read(0x34, 1);
    while (at && t.config_read(at, 1) != 0x11)
        at = t.config_read(at + 1, 1);
    return at;
}

uint8_t read8(VirtioPciDevice& t, uint64_t offset)
{
    uint8_t v = 0;
    t.read(offset, {&v, 1});
    return v;
}
}  // namespace

// Found by tests/fuzz/fuzz_virtio_pci.cc's PBA check: the PBA stopped after
// its first qword, so a device with more than 64 vectors (virtio-scsi with 64
// request queues has 67) never showed a pending interrupt on vector 64 or later.
TEST_CASE("virtio-pci: the PBA has a bit for every MSI-X vector, past the first 64")
{
    Device device;
    device.queues = 70;  // vectors 0-70
    Host host;
    VirtioPciDevice t(device, host);
    const unsigned cap = msix_capability(t);
    REQUIRE(cap != 0);
    CHECK((t.config_read(cap + 2, 2) & 0x7ff) + 1 == 71);
    t.config_write(cap + 2, 2, 0x8000);  // MSI-X enable; every table entry starts masked

    const uint16_t vector = 70;
    t.write(0x10, std::span(reinterpret_cast<const uint8_t*>(&vector), 2));  // config_msix_vector
    t.device_broken();  // a configuration interrupt on vector 70, masked: pending
    const uint64_t pba = VirtioPciDevice::kMsixPbaOffset;
    CHECK(read8(t, pba + 8) == 1 << (70 % 8));
    CHECK(read8(t, pba) == 0);
    uint8_t qword[8] = {};
    t.read(pba + 8, qword);
    CHECK(qword[0] == 1 << 6);

    // Unmasking entry 70 delivers it, and the bit clears.
    const uint32_t unmasked = 0;
    t.write(VirtioPciDevice::kMsixTableOffset + 16 * 70 + 12, std::span(reinterpret_cast<const uint8_t*>(&unmasked), 4));
    CHECK(read8(t, pba + 8) == 0);
    // Past the last vector's qword: nothing there.
    CHECK(read8(t, pba + 16) == 0);
}
