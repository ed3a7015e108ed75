// The split-queue chain walker (SplitQueue::pop, walk_chain) over a guest
// memory whose every byte comes from the input: two adjacent RAM regions in
// separate heap blocks, so a buffer let across the boundary is an ASan report.
//
// Input: u16 queue size, u8 flags (bit 0 EVENT_IDX), u8 max segments (0: the
// default), u16 max bytes (0: the default), u16 desc, avail and used gpas,
// u8 op count, that many 5-byte ops (u8 op, u16 gpa, u16 value: see the
// switch below), and then
// the memory image, region A then B.
#include <vector>

#include "tests/fuzz/fuzz_input.h"
#include "virtio/virtqueue.h"

using namespace lkvm;

namespace {
constexpr uint64_t kRegionA = 0, kSizeA = 2048, kRegionB = kSizeA, kSizeB = 1024;

// The chain is made of whole, non-empty buffers inside one region each, and
// it keeps the limits it was walked with.
void check_chain(const Chain& chain, const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                 const ChainLimits& limits, uint16_t size)
{
    auto inside = [](const iovec& v, const std::vector<uint8_t>& region) {
        const auto* p = static_cast<const uint8_t*>(v.iov_base);
        return p >= region.data() && v.iov_len <= region.size() && p <= region.data() + region.size() - v.iov_len;
    };
    uint64_t bytes[2] = {0, 0};
    for (int w = 0; w < 2; ++w)
        for (const iovec& v : w ? chain.writable : chain.readable) {
            FUZZ_CHECK(v.iov_len > 0);
            FUZZ_CHECK(inside(v, a) || inside(v, b));
            bytes[w] += v.iov_len;
        }
    FUZZ_CHECK(bytes[0] == chain.readable_bytes && bytes[1] == chain.writable_bytes);
    FUZZ_CHECK(chain.readable.size() + chain.writable.size() <= limits.max_segments);
    FUZZ_CHECK(chain.readable_bytes + chain.writable_bytes <= limits.max_bytes);
    FUZZ_CHECK(chain.head < size);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    fuzz::Input in(data, size);
    RingLayout layout;
    layout.size = in.u16();
    const bool event_idx = in.u8() & 1;
    ChainLimits limits;
    if (const uint8_t segments = in.u8())
        limits.max_segments = segments;
    if (const uint16_t bytes = in.u16())
        limits.max_bytes = bytes;
    layout.desc = in.u16();
    layout.avail = in.u16();
    layout.used = in.u16();
    const auto ops = in.bytes(5 * size_t{in.u8()});

    std::vector<uint8_t> a(kSizeA), b(kSizeB);
    const auto image = in.rest();
    std::copy_n(image.begin(), std::min(image.size(), a.size()), a.begin());
    if (image.size() > a.size())
        std::copy_n(image.begin() + a.size(), std::min(image.size() - a.size(), b.size()), b.begin());
    const GuestMemory memory({{kRegionA, kSizeA, a.data()}, {kRegionB, kSizeB, b.data()}});
    if (!rings_in_memory(memory, layout))
        return 0;

    SplitQueue queue(memory, layout, event_idx, limits);
    Chain chain;
    chain.readable.reserve(limits.max_segments);
    chain.writable.reserve(limits.max_segments);
    const size_t capacity[2] = {chain.readable.capacity(), chain.writable.capacity()};
    auto pop = [&] {
        const auto popped = queue.pop(chain);
        if (!popped)
            return false;  // a broken ring: the device stops the queue here
        if (!popped.value())
            return false;
        check_chain(chain, a, b, limits, layout.size);
        // Storage reserved for max_segments is never outgrown (pop allocates nothing).
        FUZZ_CHECK(chain.readable.capacity() == capacity[0] && chain.writable.capacity() == capacity[1]);
        queue.push_used(chain.head, static_cast<uint32_t>(chain.writable_bytes));
        return true;
    };
    // The driver's side, meanwhile: it may rewrite anything, rings included.
    fuzz::Input op(ops.data(), ops.size());
    while (!op.empty()) {
        const uint8_t kind = op.u8();
        const uint16_t gpa = op.u16(), value = op.u16();
        switch (kind % 5) {
        case 0: pop(); break;
        case 1: memory.write_obj(gpa, value); break;
        case 2: queue.set_notifications(value & 1); break;
        case 3: queue.needs_interrupt(); break;
        case 4:  // any head, as a device walking a chain on its own would
            if (const auto walked = walk_chain(memory, layout, value, limits))
                check_chain(walked.value(), a, b, limits, layout.size);
            break;
        }
    }
    for (int i = 0; i < 2 * kMaxQueueSize && pop(); ++i) {
    }
    queue.needs_interrupt();
    return 0;
}
