// KVM's binary statistics layout, parsed from synthetic files (no KVM
// needed), and from a real vCPU where /dev/kvm lets us make one.
#include <doctest/doctest.h>

#include <linux/kvm.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/fd.h"
#include "kvm/kvm.h"
#include "kvm/vcpu_stats.h"
#include "tests/unit/test_util.h"

using namespace lkvm;
using lkvm::test::error_of;

namespace {

bool contains_text(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

struct BlobStat {
    std::string name;
    uint16_t size;
    uint32_t offset;  // bytes into the data block
};

// A statistics file as KVM lays one out: header, id string, descriptors, data.
struct Blob {
    kvm_stats_header header{};
    std::vector<uint8_t> bytes;

    Blob(const std::vector<BlobStat>& stats, const std::vector<uint64_t>& data, uint32_t name_size = 48)
    {
        constexpr uint32_t kId = 64;
        const uint32_t descriptor_size = 16 + name_size;
        header.name_size = name_size;
        header.num_desc = static_cast<uint32_t>(stats.size());
        header.id_offset = sizeof(header);
        header.desc_offset = sizeof(header) + kId;
        header.data_offset = header.desc_offset + header.num_desc * descriptor_size;
        bytes.resize(header.data_offset + data.size() * 8);
        std::memcpy(bytes.data() + header.id_offset, "kvm-1234/vcpu-0", 15);
        for (size_t i = 0; i < stats.size(); ++i) {
            uint8_t* at = bytes.data() + header.desc_offset + i * descriptor_size;
            std::memcpy(at + 6, &stats[i].size, 2);
            std::memcpy(at + 8, &stats[i].offset, 4);
            std::memcpy(at + 16, stats[i].name.data(), std::min<size_t>(stats[i].name.size(), name_size));
        }
        std::memcpy(bytes.data() + header.data_offset, data.data(), data.size() * 8);
    }

    // The blob in a memory file, header as it is now.
    Fd file() const
    {
        Fd fd(::memfd_create("kvm-stats", MFD_CLOEXEC));
        REQUIRE(fd.valid());
        std::vector<uint8_t> whole = bytes;
        // A blob cut shorter than a header keeps only what fits of it.
        std::memcpy(whole.data(), &header, std::min(sizeof(header), whole.size()));
        REQUIRE(::pwrite(fd.get(), whole.data(), whole.size(), 0) == static_cast<ssize_t>(whole.size()));
        return fd;
    }
};

Blob typical()
{
    // A histogram of 4 values between the counters, as halt_wait_hist is.
    return Blob({{"exits", 1, 0}, {"halt_wait_hist", 4, 8}, {"io_exits", 1, 40}, {"irq_injections", 1, 48}},
                {1000, 1, 2, 3, 4, 250, 77});
}

}  // namespace

TEST_CASE("vcpu stats: names and values come from the descriptors, not fixed offsets")
{
    const KvmStatsFile file(typical().file());
    const auto data = file.sample();
    REQUIRE(data.size() == 7);
    CHECK(data[*file.find("exits")] == 1000);
    CHECK(data[*file.find("halt_wait_hist")] == 1);
    CHECK(data[*file.find("io_exits")] == 250);
    CHECK(data[*file.find("irq_injections")] == 77);
    CHECK_FALSE(file.find("mmio_exits"));
    CHECK_FALSE(file.find("exit"));

    const VcpuCounters counters = VcpuStats(KvmStatsFile(typical().file())).sample();
    CHECK(counters[kVcpuExits] == 1000u);
    CHECK(counters[1] == 250u);   // io_exits
    CHECK_FALSE(counters[2]);     // mmio_exits: not in this file
    CHECK(counters[7] == 77u);    // irq_injections
}

TEST_CASE("vcpu stats: malformed files are refused, never read out of bounds")
{
    auto refused = [](const Blob& blob) { return error_of([&] { KvmStatsFile file(blob.file()); }); };
    CHECK(refused(typical()) == "(no error)");

    Blob blob = typical();
    blob.header.name_size = 0;
    CHECK(refused(blob) == "KVM statistics: a name size of 0");

    blob = typical();
    blob.header.num_desc += 1;  // the descriptors now reach into the data block
    CHECK(refused(blob) == "KVM statistics: blocks that overlap (bad offsets)");

    blob = typical();
    blob.header.desc_offset = 4;
    CHECK(refused(blob) == "KVM statistics: blocks that overlap (bad offsets)");

    blob = typical();
    blob.header.data_offset += 8;  // the last value would lie past the end
    CHECK(refused(blob) == "KVM statistics: the data block runs past the end of the file");

    blob = typical();
    blob.header.data_offset = 0xfffffff0u;
    CHECK(refused(blob) == "KVM statistics: the data block runs past the end of the file");

    blob = typical();
    blob.header.desc_offset = 0x7fff0000u;
    blob.header.data_offset = blob.header.desc_offset + 4 * (16 + 48);
    CHECK(refused(blob) == "KVM statistics: the descriptor block runs past the end of the file");

    blob = typical();
    blob.bytes.resize(10);  // not even a header
    CHECK(refused(blob) == "KVM statistics: the header runs past the end of the file");

    // A stat whose values lie past the data: offset or size too large.
    CHECK(refused(Blob({{"exits", 1, 8}}, {1})) == "KVM statistics: the data block runs past the end of the file");
    CHECK(refused(Blob({{"exits", 2, 0}}, {1})) == "KVM statistics: the data block runs past the end of the file");
    CHECK(contains_text(refused(Blob({{"exits", 0, 0}}, {1})), "bad size or offset"));
    CHECK(contains_text(refused(Blob({{"exits", 1, 4}}, {1, 2})), "bad size or offset"));
    // A name that fills its whole field has no NUL.
    CHECK(refused(Blob({{"exits_and_more", 1, 0}}, {1}, 8)) == "KVM statistics: a name without its terminating NUL");
}

TEST_CASE("vcpu stats: a real vCPU's counters, where /dev/kvm can make one")
{
    std::optional<Kvm> kvm;
    std::optional<Vm> vm;
    std::optional<Vcpu> vcpu;
    try {
        kvm.emplace(Kvm::open());
        vm.emplace(*kvm);
        vcpu.emplace(*kvm, *vm, 0);
    } catch (const Error& e) {
        MESSAGE("skipped, no usable /dev/kvm here: " << e.what());
        return;
    }
    std::string why_not;
    const auto stats = VcpuStats::open(vcpu->fd(), why_not);
    if (kvm->check_extension(KVM_CAP_BINARY_STATS_FD) <= 0) {
        MESSAGE("skipped, this kernel has no KVM_GET_STATS_FD: " << why_not);
        CHECK_FALSE(stats);
        return;
    }
    REQUIRE_MESSAGE(stats, why_not);
    const VcpuCounters counters = stats->sample();
    CHECK(counters[kVcpuExits].has_value());  // every architecture's KVM counts exits
}
