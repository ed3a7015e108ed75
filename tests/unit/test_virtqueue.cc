// Descriptor-chain walking and the split ring, every malformed case included.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "virtio/virtqueue.h"

using namespace lkvm;

namespace {
// A guest with 1 MiB of RAM and a 16-entry queue at fixed addresses.
struct Ring {
    static constexpr uint64_t kDesc = 0x1000, kAvail = 0x2000, kUsed = 0x3000, kData = 0x10000;
    std::vector<uint8_t> ram = std::vector<uint8_t>(1 << 20);
    GuestMemory mem{{{0, ram.size(), ram.data()}}};
    RingLayout layout{16, kDesc, kAvail, kUsed};

    void desc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next = 0, uint64_t table = kDesc)
    {
        VringDesc d{addr, len, flags, next};
        std::memcpy(&ram[table + 16 * i], &d, 16);
    }
    void offer(uint16_t head)
    {
        uint16_t idx;
        std::memcpy(&idx, &ram[kAvail + 2], 2);
        std::memcpy(&ram[kAvail + 4 + 2 * (idx % 16)], &head, 2);
        ++idx;
        std::memcpy(&ram[kAvail + 2], &idx, 2);
    }
    Result<Chain, ChainError> walk(uint16_t head, ChainLimits limits = {})
    {
        return walk_chain(mem, layout, head, limits);
    }
    uint16_t used_idx() const
    {
        uint16_t v;
        std::memcpy(&v, &ram[kUsed + 2], 2);
        return v;
    }
};
}  // namespace

TEST_CASE("virtqueue: a readable-then-writable chain becomes validated host iovecs")
{
    Ring r;
    r.desc(0, Ring::kData, 16, kVringDescNext, 1);
    r.desc(1, Ring::kData + 0x1000, 4096, kVringDescNext | kVringDescWrite, 2);
    r.desc(2, Ring::kData + 0x3000, 1, kVringDescWrite);
    auto chain = r.walk(0);
    REQUIRE(chain.ok());
    CHECK(chain->readable.size() == 1);
    CHECK(chain->writable.size() == 2);
    CHECK(chain->readable_bytes == 16);
    CHECK(chain->writable_bytes == 4097);
    CHECK(chain->readable[0].iov_base == &r.ram[Ring::kData]);
    CHECK(chain->writable[1].iov_base == &r.ram[Ring::kData + 0x3000]);
}

TEST_CASE("virtqueue: indirect tables are followed once")
{
    Ring r;
    const uint64_t table = 0x4000;
    r.desc(0, table, 3 * 16, kVringDescIndirect);
    r.desc(0, Ring::kData, 16, kVringDescNext, 1, table);
    r.desc(1, Ring::kData + 0x100, 512, kVringDescNext | kVringDescWrite, 2, table);
    r.desc(2, Ring::kData + 0x400, 1, kVringDescWrite, 0, table);
    auto chain = r.walk(0);
    REQUIRE(chain.ok());
    CHECK(chain->readable_bytes == 16);
    CHECK(chain->writable_bytes == 513);
}

TEST_CASE("virtqueue: every malformed chain is refused with its own error")
{
    Ring r;
    SUBCASE("head out of range") { CHECK(r.walk(16).error() == ChainError::kHeadOutOfRange); }
    SUBCASE("next out of range")
    {
        r.desc(0, Ring::kData, 16, kVringDescNext, 16);
        CHECK(r.walk(0).error() == ChainError::kNextOutOfRange);
    }
    SUBCASE("a loop")
    {
        r.desc(0, Ring::kData, 16, kVringDescNext, 1);
        r.desc(1, Ring::kData, 16, kVringDescNext, 0);
        CHECK(r.walk(0).error() == ChainError::kLoop);
    }
    SUBCASE("a self loop")
    {
        r.desc(3, Ring::kData, 16, kVringDescNext, 3);
        CHECK(r.walk(3).error() == ChainError::kLoop);
    }
    SUBCASE("a loop inside an indirect table")
    {
        r.desc(0, 0x4000, 2 * 16, kVringDescIndirect);
        r.desc(0, Ring::kData, 16, kVringDescNext, 1, 0x4000);
        r.desc(1, Ring::kData, 16, kVringDescNext, 0, 0x4000);
        CHECK(r.walk(0).error() == ChainError::kLoop);
    }
    SUBCASE("nested indirect")
    {
        r.desc(0, 0x4000, 16, kVringDescIndirect);
        r.desc(0, 0x5000, 16, kVringDescIndirect, 0, 0x4000);
        CHECK(r.walk(0).error() == ChainError::kNestedIndirect);
    }
    SUBCASE("indirect with next")
    {
        r.desc(0, 0x4000, 16, kVringDescIndirect | kVringDescNext, 1);
        CHECK(r.walk(0).error() == ChainError::kIndirectWithNext);
    }
    SUBCASE("indirect length not a multiple of 16")
    {
        r.desc(0, 0x4000, 24, kVringDescIndirect);
        CHECK(r.walk(0).error() == ChainError::kBadIndirectTable);
    }
    SUBCASE("empty indirect table")
    {
        r.desc(0, 0x4000, 0, kVringDescIndirect);
        CHECK(r.walk(0).error() == ChainError::kBadIndirectTable);
    }
    SUBCASE("indirect table outside memory")
    {
        r.desc(0, (1 << 20) - 16, 32, kVringDescIndirect);
        CHECK(r.walk(0).error() == ChainError::kBadIndirectTable);
    }
    SUBCASE("next index past an indirect table")
    {
        r.desc(0, 0x4000, 16, kVringDescIndirect);
        r.desc(0, Ring::kData, 16, kVringDescNext, 1, 0x4000);
        CHECK(r.walk(0).error() == ChainError::kNextOutOfRange);
    }
    SUBCASE("buffer past the end of memory")
    {
        r.desc(0, (1 << 20) - 8, 16, 0);
        CHECK(r.walk(0).error() == ChainError::kBufferOutsideMemory);
    }
    SUBCASE("buffer address that wraps")
    {
        r.desc(0, ~0ull - 4, 16, 0);
        CHECK(r.walk(0).error() == ChainError::kBufferOutsideMemory);
    }
    SUBCASE("huge length")
    {
        r.desc(0, Ring::kData, 0xffffffff, kVringDescWrite);
        CHECK(r.walk(0).error() == ChainError::kBufferOutsideMemory);
    }
    SUBCASE("readable after writable")
    {
        r.desc(0, Ring::kData, 16, kVringDescNext | kVringDescWrite, 1);
        r.desc(1, Ring::kData, 16, 0);
        CHECK(r.walk(0).error() == ChainError::kReadableAfterWritable);
    }
    SUBCASE("too many segments or bytes for the device")
    {
        r.desc(0, Ring::kData, 16, kVringDescNext, 1);
        r.desc(1, Ring::kData, 16, kVringDescNext, 2);
        r.desc(2, Ring::kData, 16, 0);
        CHECK(r.walk(0, {2, 1 << 20}).error() == ChainError::kTooLarge);
        CHECK(r.walk(0, {16, 40}).error() == ChainError::kTooLarge);
        CHECK(r.walk(0, {3, 48}).ok());
    }
}

TEST_CASE("virtqueue: ring placement is checked for bounds and alignment")
{
    Ring r;
    CHECK(rings_in_memory(r.mem, r.layout));
    CHECK_FALSE(rings_in_memory(r.mem, {16, 0x1008, Ring::kAvail, Ring::kUsed}));      // desc not 16-aligned
    CHECK_FALSE(rings_in_memory(r.mem, {16, Ring::kDesc, 0x2001, Ring::kUsed}));       // avail not 2-aligned
    CHECK_FALSE(rings_in_memory(r.mem, {16, Ring::kDesc, Ring::kAvail, 0x3002}));      // used not 4-aligned
    CHECK_FALSE(rings_in_memory(r.mem, {16, Ring::kDesc, Ring::kAvail, (1 << 20) - 64}));
    CHECK_FALSE(rings_in_memory(r.mem, {15, Ring::kDesc, Ring::kAvail, Ring::kUsed}));  // not a power of two
    CHECK_FALSE(rings_in_memory(r.mem, {0, Ring::kDesc, Ring::kAvail, Ring::kUsed}));
}

TEST_CASE("split queue: pop, push used, and a driver that jumps the avail index")
{
    Ring r;
    SplitQueue q(r.mem, r.layout, false, {});
    Chain chain;
    const auto empty = q.pop(chain);
    REQUIRE(empty.ok());
    CHECK_FALSE(empty.value());
    r.desc(5, Ring::kData, 512, kVringDescWrite);
    r.offer(5);
    CHECK(q.has_available());
    const auto popped = q.pop(chain);
    REQUIRE(popped.ok());
    REQUIRE(popped.value());
    CHECK(chain.head == 5);
    q.push_used(5, 512);
    CHECK(r.used_idx() == 0);  // pushed, not yet published
    q.publish_used();
    CHECK(r.used_idx() == 1);
    uint32_t id, len;
    std::memcpy(&id, &r.ram[Ring::kUsed + 4], 4);
    std::memcpy(&len, &r.ram[Ring::kUsed + 8], 4);
    CHECK(id == 5);
    CHECK(len == 512);
    CHECK(q.needs_interrupt());
    CHECK_FALSE(q.needs_interrupt());  // nothing new since

    const uint16_t jump = 1 + 17;      // 17 new entries in a 16-entry ring
    std::memcpy(&r.ram[Ring::kAvail + 2], &jump, 2);
    const auto broken = q.pop(chain);
    REQUIRE_FALSE(broken.ok());
    CHECK(broken.error() == ChainError::kAvailIndexJump);
}

TEST_CASE("split queue: interrupts follow NO_INTERRUPT, or used_event with EVENT_IDX")
{
    Ring r;
    r.desc(0, Ring::kData, 8, kVringDescWrite);
    SUBCASE("flags")
    {
        SplitQueue q(r.mem, r.layout, false, {});
        const uint16_t no_interrupt = kVringAvailNoInterrupt;
        std::memcpy(&r.ram[Ring::kAvail], &no_interrupt, 2);
        q.push_used(0, 8);
        CHECK_FALSE(q.needs_interrupt());
        q.set_notifications(false);
        uint16_t used_flags;
        std::memcpy(&used_flags, &r.ram[Ring::kUsed], 2);
        CHECK(used_flags == kVringUsedNoNotify);
    }
    SUBCASE("event idx")
    {
        SplitQueue q(r.mem, r.layout, true, {});
        const uint16_t used_event = 2;  // interrupt when used idx passes 2
        std::memcpy(&r.ram[Ring::kAvail + 4 + 2 * 16], &used_event, 2);
        q.push_used(0, 8);
        CHECK(q.needs_interrupt());     // the first decision always signals
        q.push_used(0, 8);              // used idx 2: not past 2 yet
        CHECK_FALSE(q.needs_interrupt());
        q.push_used(0, 8);              // used idx 3 passes used_event 2
        CHECK(q.needs_interrupt());
        r.offer(0);
        Chain chain;
        REQUIRE(q.pop(chain).value());
        uint16_t avail_event;
        std::memcpy(&avail_event, &r.ram[Ring::kUsed + 4 + 8 * 16], 2);
        CHECK(avail_event == 1);
        // Off (an I/O thread polling): avail_event behind what the driver has
        // passed, and pops leave it there, so no new buffer crosses it.
        q.set_notifications(false);
        std::memcpy(&avail_event, &r.ram[Ring::kUsed + 4 + 8 * 16], 2);
        CHECK(avail_event == 0);
        r.offer(0);
        REQUIRE(q.pop(chain).value());
        std::memcpy(&avail_event, &r.ram[Ring::kUsed + 4 + 8 * 16], 2);
        CHECK(avail_event == 0);
        q.set_notifications(true);
        std::memcpy(&avail_event, &r.ram[Ring::kUsed + 4 + 8 * 16], 2);
        CHECK(avail_event == 2);
    }
}

#include "virtio/blk.h"

TEST_CASE("blk framing: header, data and status come from the descriptors, not assumptions")
{
    uint8_t header[16] = {};
    const uint32_t type = kBlkTOut;
    const uint64_t sector = 7;
    std::memcpy(header, &type, 4);
    std::memcpy(header + 8, &sector, 8);
    uint8_t data[1024] = {}, tail[3] = {};
    Chain chain;
    // Header split 10 + 6, with the first data bytes in the same buffer as the header's end.
    std::vector<uint8_t> second(6 + 512);
    std::memcpy(second.data(), header + 10, 6);
    chain.readable = {{header, 10}, {second.data(), second.size()}, {data, 512}};
    chain.readable_bytes = 10 + second.size() + 512;
    chain.writable = {{tail, 3}};  // the status is the last writable byte
    chain.writable_bytes = 3;
    auto framed = frame_blk_request(chain);
    REQUIRE(framed.ok());
    CHECK(framed->header_complete);
    CHECK(framed->type == kBlkTOut);
    CHECK(framed->sector == 7);
    CHECK(framed->data_bytes == 1024);
    CHECK(framed->data[0].iov_base == second.data() + 6);
    CHECK(framed->status == &tail[2]);
    CHECK(check_blk_request(*framed, 1000, false) == kBlkSOk);
    CHECK(check_blk_request(*framed, 1000, true) == kBlkSIoErr);   // read-only
    CHECK(check_blk_request(*framed, 8, false) == kBlkSIoErr);     // sectors 7-8 of 8
    chain.writable.clear();
    chain.writable_bytes = 0;
    CHECK(frame_blk_request(chain).error() == BlkFrameError::kNoStatusByte);
}
