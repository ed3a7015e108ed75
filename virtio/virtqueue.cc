#include "virtio/virtqueue.h"

#include <atomic>
#include <cstring>

namespace lkvm {

const char* describe(ChainError error)
{
    switch (error) {
    case ChainError::kHeadOutOfRange: return "descriptor head index out of range";
    case ChainError::kNextOutOfRange: return "descriptor next index out of range";
    case ChainError::kLoop: return "looped descriptor chain";
    case ChainError::kNestedIndirect: return "nested indirect descriptor";
    case ChainError::kIndirectWithNext: return "indirect descriptor with NEXT set";
    case ChainError::kBadIndirectTable: return "bad indirect table";
    case ChainError::kBufferOutsideMemory: return "buffer outside guest memory";
    case ChainError::kReadableAfterWritable: return "device-readable buffer after a writable one";
    case ChainError::kTooLarge: return "chain larger than the device accepts";
    case ChainError::kRingOutsideMemory: return "ring outside guest memory or misaligned";
    case ChainError::kAvailIndexJump: return "available index moved past the ring size";
    }
    return "?";
}

namespace {
uint64_t desc_bytes(uint16_t size) { return 16ull * size; }
uint64_t avail_bytes(uint16_t size) { return 6 + 2ull * size; }
uint64_t used_bytes(uint16_t size) { return 6 + 8ull * size; }

uint16_t load16(const uint8_t* p) { return std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(const_cast<uint8_t*>(p))).load(std::memory_order_relaxed); }
void store16(uint8_t* p, uint16_t v, std::memory_order order = std::memory_order_relaxed)
{
    std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(p)).store(v, order);
}
}  // namespace

bool rings_in_memory(const GuestMemory& memory, const RingLayout& l)
{
    // Alignment from the spec (2.7): also what makes the atomic index accesses valid.
    if (l.size == 0 || l.size > kMaxQueueSize || (l.size & (l.size - 1)) != 0)
        return false;
    if (l.desc % 16 || l.avail % 2 || l.used % 4)
        return false;
    return memory.span(l.desc, desc_bytes(l.size)) && memory.span(l.avail, avail_bytes(l.size)) &&
           memory.span(l.used, used_bytes(l.size));
}

std::optional<ChainError> walk_chain(const GuestMemory& memory, const RingLayout& layout, uint16_t head,
                                     const ChainLimits& limits, Chain& chain)
{
    chain.head = head;
    chain.readable.clear();
    chain.writable.clear();
    chain.readable_bytes = chain.writable_bytes = 0;
    if (head >= layout.size)
        return ChainError::kHeadOutOfRange;
    uint64_t table = layout.desc;
    uint32_t table_size = layout.size;
    bool in_indirect = false;
    uint32_t index = head;
    uint32_t walked = 0;  // descriptors visited in the current table
    for (;;) {
        if (++walked > table_size)
            return ChainError::kLoop;
        const auto read = memory.read_obj<VringDesc>(table + 16ull * index);
        if (!read)
            return in_indirect ? ChainError::kBadIndirectTable : ChainError::kRingOutsideMemory;
        const VringDesc desc = *read;

        if (desc.flags & kVringDescIndirect) {
            if (in_indirect)
                return ChainError::kNestedIndirect;
            if (desc.flags & kVringDescNext)
                return ChainError::kIndirectWithNext;
            if (desc.len == 0 || desc.len % 16 != 0 || desc.len / 16 > kMaxQueueSize || !memory.span(desc.addr, desc.len))
                return ChainError::kBadIndirectTable;
            table = desc.addr;
            table_size = desc.len / 16;
            in_indirect = true;
            index = 0;
            walked = 0;
            continue;
        }

        if (desc.len > 0) {
            auto span = memory.span(desc.addr, desc.len);
            if (!span)
                return ChainError::kBufferOutsideMemory;
            const bool writable = desc.flags & kVringDescWrite;
            if (!writable && !chain.writable.empty())
                return ChainError::kReadableAfterWritable;
            // Checked before the segment is kept, so that storage reserved for
            // max_segments is never outgrown.
            if (chain.readable.size() + chain.writable.size() >= limits.max_segments ||
                chain.readable_bytes + chain.writable_bytes + desc.len > limits.max_bytes)
                return ChainError::kTooLarge;
            (writable ? chain.writable : chain.readable).push_back({span->data(), desc.len});
            (writable ? chain.writable_bytes : chain.readable_bytes) += desc.len;
        }

        if (!(desc.flags & kVringDescNext))
            return std::nullopt;
        index = desc.next;
        if (index >= table_size)
            return ChainError::kNextOutOfRange;
    }
}

Result<Chain, ChainError> walk_chain(const GuestMemory& memory, const RingLayout& layout, uint16_t head,
                                     const ChainLimits& limits)
{
    Chain chain;
    if (const auto error = walk_chain(memory, layout, head, limits, chain))
        return fail(*error);
    return chain;
}

SplitQueue::SplitQueue(const GuestMemory& memory, const RingLayout& layout, bool event_idx, ChainLimits limits)
    : memory_(memory),
      layout_(layout),
      index_mask_(static_cast<uint16_t>(layout.size - 1)),
      event_idx_(event_idx),
      limits_(limits),
      desc_(memory.span(layout.desc, desc_bytes(layout.size))->data()),
      avail_(memory.span(layout.avail, avail_bytes(layout.size))->data()),
      used_(memory.span(layout.used, used_bytes(layout.size))->data())
{
}

uint16_t SplitQueue::avail_idx() const
{
    return std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(avail_ + 2)).load(std::memory_order_acquire);
}

uint16_t* SplitQueue::avail_ring_entry(uint16_t i) const
{
    return reinterpret_cast<uint16_t*>(avail_ + 4 + 2 * (i & index_mask_));
}

bool SplitQueue::has_available() const
{
    if (shadow_avail_ != last_avail_)
        return true;
    shadow_avail_ = avail_idx();
    return shadow_avail_ != last_avail_;
}

Result<bool, ChainError> SplitQueue::pop(Chain& chain)
{
    // The driver writes avail idx for every buffer it adds: the shadow reads
    // that cache line once per batch instead of once per chain.
    if (shadow_avail_ == last_avail_)
        shadow_avail_ = avail_idx();
    if (static_cast<uint16_t>(shadow_avail_ - last_avail_) > layout_.size)
        return fail(ChainError::kAvailIndexJump);
    if (shadow_avail_ == last_avail_)
        return false;
    const uint16_t head = load16(reinterpret_cast<uint8_t*>(avail_ring_entry(last_avail_)));
    ++last_avail_;
    if (shadow_avail_ != last_avail_)
        prefetch_ahead();
    if (event_idx_ && notifications_)
        store16(used_ + 4 + 8ull * layout_.size, last_avail_);  // avail_event: kick us for anything newer
    if (const auto error = walk_chain(memory_, layout_, head, limits_, chain))
        return fail(*error);
    return true;
}

// The driver wrote the next chains from another CPU: their descriptors and
// request headers are cache misses. Start them now, to overlap with walking
// this chain: the header of the next chain (its descriptor was started by the
// previous pop) and the descriptor of the one after. A prefetch never faults;
// indices and addresses are bounded only so that it stays in guest memory.
void SplitQueue::prefetch_ahead() const
{
    const uint16_t next = load16(reinterpret_cast<uint8_t*>(avail_ring_entry(last_avail_))) & index_mask_;
    uint64_t header = 0;
    std::memcpy(&header, desc_ + 16ull * next, 8);
    if (const auto bytes = memory_.span(header, 1))
        __builtin_prefetch(bytes->data());
    if (static_cast<uint16_t>(shadow_avail_ - last_avail_) > 1) {
        const uint16_t after = load16(reinterpret_cast<uint8_t*>(avail_ring_entry(last_avail_ + 1))) & index_mask_;
        __builtin_prefetch(desc_ + 16ull * after);
    }
}

void SplitQueue::push_used(uint16_t head, uint32_t written)
{
    uint8_t* elem = used_ + 4 + 8ull * (used_idx_ & index_mask_);
    const uint32_t id = head;
    std::memcpy(elem, &id, 4);
    std::memcpy(elem + 4, &written, 4);
    ++used_idx_;
}

void SplitQueue::publish_used()
{
    if (published_used_ != used_idx_) {
        published_used_ = used_idx_;
        store16(used_ + 2, used_idx_, std::memory_order_release);
    }
}

bool SplitQueue::needs_interrupt()
{
    publish_used();
    // Our used idx store must be visible before we read what the driver asked for.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    const uint16_t old = signalled_used_;
    const uint16_t now = used_idx_;
    const bool valid = signalled_valid_;
    signalled_used_ = now;
    signalled_valid_ = true;
    if (valid && old == now)
        return false;  // nothing new since we last decided
    if (!event_idx_)
        return !(load16(avail_) & kVringAvailNoInterrupt);
    const uint16_t used_event = load16(avail_ + 4 + 2ull * layout_.size);
    // vring_need_event(): did used idx pass used_event with this batch?
    return !valid || static_cast<uint16_t>(now - used_event - 1) < static_cast<uint16_t>(now - old);
}

void SplitQueue::set_notifications(bool enabled)
{
    // Off while off: avail_event stays where it was, behind the driver, so
    // that at most one kick in 64K buffers gets through while we poll.
    if (!enabled && !notifications_)
        return;
    notifications_ = enabled;
    if (event_idx_) {
        // Off: an avail_event the driver has already passed, so that no new
        // buffer crosses it (for the next 64K buffers, when one kick is harmless).
        store16(used_ + 4 + 8ull * layout_.size, enabled ? avail_idx() : static_cast<uint16_t>(last_avail_ - 1));
    } else {
        store16(used_, enabled ? 0 : kVringUsedNoNotify);
    }
    // The driver must see this before we look at the ring again.
    std::atomic_thread_fence(std::memory_order_seq_cst);
}

}  // namespace lkvm
