// The split virtqueue (virtio 1.x section 2.7). Walking a descriptor chain is
// a pure function over GuestMemory: every index, length and address the guest
// wrote is checked, loops are bounded by the table they walk, and what comes
// out is host memory already validated. SplitQueue keeps a queue's ring
// positions for the one thread that serves it.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "base/result.h"
#include "hw/guest_memory.h"

namespace lkvm {

struct VringDesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
static_assert(sizeof(VringDesc) == 16);

constexpr uint16_t kVringDescNext = 1, kVringDescWrite = 2, kVringDescIndirect = 4;
constexpr uint16_t kVringUsedNoNotify = 1, kVringAvailNoInterrupt = 1;
constexpr uint16_t kMaxQueueSize = 32768;

enum class ChainError {
    kHeadOutOfRange,        // head index >= queue size
    kNextOutOfRange,        // a next index >= table size
    kLoop,                  // more descriptors than the table holds
    kNestedIndirect,        // an indirect descriptor inside an indirect table
    kIndirectWithNext,      // INDIRECT and NEXT together
    kBadIndirectTable,      // length not a non-zero multiple of 16, or outside memory
    kBufferOutsideMemory,   // a buffer not wholly in guest RAM
    kReadableAfterWritable, // device-readable after device-writable
    kTooLarge,              // more bytes or segments than the device accepts
    kRingOutsideMemory,     // the rings themselves
    kAvailIndexJump,        // the driver claims more new buffers than the ring holds
};
const char* describe(ChainError error);

struct ChainLimits {
    uint32_t max_segments = 1024;
    uint64_t max_bytes = 1ull << 32;
};

struct Chain {
    uint16_t head = 0;
    std::vector<iovec> readable;   // device reads these (host addresses, validated)
    std::vector<iovec> writable;   // device writes these
    uint64_t readable_bytes = 0;
    uint64_t writable_bytes = 0;
};

struct RingLayout {
    uint16_t size = 0;
    uint64_t desc = 0, avail = 0, used = 0;
};

// Checks that the descriptor table and both rings of `layout` lie in guest memory.
bool rings_in_memory(const GuestMemory& memory, const RingLayout& layout);

// Walks the chain starting at `head` of the descriptor table into `chain`,
// reusing its storage: with room for limits.max_segments reserved, walking
// allocates nothing. Returns the error that makes the chain unusable, if any.
std::optional<ChainError> walk_chain(const GuestMemory& memory, const RingLayout& layout, uint16_t head,
                                     const ChainLimits& limits, Chain& chain);
// The same into a new chain.
Result<Chain, ChainError> walk_chain(const GuestMemory& memory, const RingLayout& layout, uint16_t head,
                                     const ChainLimits& limits);

class SplitQueue {
public:
    // The layout must have passed rings_in_memory().
    SplitQueue(const GuestMemory& memory, const RingLayout& layout, bool event_idx, ChainLimits limits);

    // Walks the next chain the driver made available into `chain` (its
    // storage reused): true when there was one, false when the ring is empty,
    // or the error that makes this queue unusable.
    Result<bool, ChainError> pop(Chain& chain);
    bool has_available() const;
    // Returns a chain to the driver with `written` bytes written into it. The
    // driver sees it at the next publish_used() (or needs_interrupt()): one
    // store of used idx per batch, not one per chain.
    void push_used(uint16_t head, uint32_t written);
    void publish_used();
    // Publishes, then says whether the driver wants an interrupt for what was
    // pushed since the last call that said yes (VRING_AVAIL_F_NO_INTERRUPT or used_event).
    bool needs_interrupt();
    // Asks the driver to notify (or not) on new buffers. After enabling, the
    // caller must check has_available() again before it sleeps.
    void set_notifications(bool enabled);


private:
    uint16_t avail_idx() const;      // acquire
    uint16_t* avail_ring_entry(uint16_t i) const;
    void prefetch_ahead() const;

    const GuestMemory& memory_;
    RingLayout layout_;
    uint16_t index_mask_;            // size - 1: the size is a power of two
    bool event_idx_;
    ChainLimits limits_;
    const uint8_t* desc_;            // host views of the rings, validated at construction
    uint8_t* avail_;
    uint8_t* used_;
    mutable uint16_t shadow_avail_ = 0;  // the driver's avail idx when we last read it
    uint16_t last_avail_ = 0;
    uint16_t used_idx_ = 0;
    uint16_t published_used_ = 0;
    uint16_t signalled_used_ = 0;    // used idx when we last decided about an interrupt
    bool signalled_valid_ = false;
    bool notifications_ = true;
};

}  // namespace lkvm
