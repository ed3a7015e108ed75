// What a virtio device model offers its transport, and what the transport
// hands it per queue. The device never sees PCI or KVM: it gets rings, an
// eventfd the driver's notifications arrive on, and an interrupt to raise.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "virtio/virtqueue.h"

namespace lkvm {

constexpr uint64_t kVirtioFVersion1 = 1ull << 32;
constexpr uint64_t kVirtioFRingIndirectDesc = 1ull << 28;
constexpr uint64_t kVirtioFRingEventIdx = 1ull << 29;

// Raised by the thread that serves a queue; safe to call from any thread.
class Interrupt {
public:
    virtual ~Interrupt() = default;
    virtual void raise() = 0;
};

struct QueueSetup {
    unsigned index = 0;
    RingLayout rings;
    int notify_fd = -1;          // readable when the driver kicked this queue
    Interrupt* interrupt = nullptr;
};

class VirtioDevice {
public:
    virtual ~VirtioDevice() = default;
    virtual uint16_t device_id() const = 0;
    virtual uint64_t features() const = 0;  // offered, VERSION_1 included
    virtual unsigned num_queues() const = 0;
    virtual uint16_t max_queue_size() const = 0;
    virtual void read_config(uint64_t offset, std::span<uint8_t> data) = 0;
    virtual void write_config(uint64_t, std::span<const uint8_t>) {}

    // DRIVER_OK: serve these queues with the negotiated features. `broken` is
    // called (from the serving thread) when the driver broke a ring: the
    // transport then sets NEEDS_RESET.
    virtual void activate(uint64_t features, std::vector<QueueSetup> queues, std::function<void()> broken) = 0;
    // Stops serving, waits for every request in flight, forgets the queues.
    // Returns when the device is back to its initial state.
    virtual void reset() = 0;
};

}  // namespace lkvm
