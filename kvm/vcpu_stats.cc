#include "kvm/vcpu_stats.h"

#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "base/error.h"

namespace lkvm {

namespace {

// struct kvm_stats_desc without its flexible `name` array: in C++ the uapi
// header's flex-array wrapper adds an empty member that may move `name` (see
// kvm.cc). The name follows these 16 bytes, header.name_size of them.
struct DescriptorHead {
    uint32_t flags;
    int16_t exponent;
    uint16_t size;    // values of this stat, 64 bits each
    uint32_t offset;  // bytes from the start of the data block
    uint32_t bucket_size;
};
static_assert(sizeof(DescriptorHead) == 16);
static_assert(offsetof(DescriptorHead, bucket_size) == offsetof(kvm_stats_desc, bucket_size));

// Far above what any kernel has (a few hundred stats, 48-byte names): a
// header beyond these is garbage, not a reason to allocate gigabytes.
constexpr uint32_t kMaxNameSize = 4096;
constexpr uint32_t kMaxDescriptors = 1 << 16;

void read_whole(int fd, void* buffer, size_t size, uint64_t offset, const char* what)
{
    const ssize_t n = ::pread(fd, buffer, size, static_cast<off_t>(offset));
    if (n < 0)
        throw sys_error(std::string("KVM statistics: cannot read the ") + what);
    if (static_cast<size_t>(n) != size)
        throw Error(std::string("KVM statistics: the ") + what + " runs past the end of the file");
}

}  // namespace

KvmStatsFile::KvmStatsFile(Fd file) : file_(std::move(file))
{
    kvm_stats_header header{};
    read_whole(file_.get(), &header, sizeof(header), 0, "header");
    if (header.name_size == 0 || header.name_size > kMaxNameSize)
        throw Error("KVM statistics: a name size of " + std::to_string(header.name_size));
    if (header.num_desc > kMaxDescriptors)
        throw Error("KVM statistics: " + std::to_string(header.num_desc) + " descriptors");
    const uint64_t descriptor_size = sizeof(DescriptorHead) + uint64_t{header.name_size};
    const uint64_t descriptors_end = header.desc_offset + header.num_desc * descriptor_size;
    if (header.desc_offset < sizeof(header) || header.data_offset < descriptors_end)
        throw Error("KVM statistics: blocks that overlap (bad offsets)");

    std::vector<uint8_t> descriptors(header.num_desc * descriptor_size);
    read_whole(file_.get(), descriptors.data(), descriptors.size(), header.desc_offset, "descriptor block");
    uint64_t data_bytes = 0;
    for (uint32_t i = 0; i < header.num_desc; ++i) {
        const uint8_t* at = descriptors.data() + i * descriptor_size;
        DescriptorHead head;
        std::memcpy(&head, at, sizeof(head));
        const char* name = reinterpret_cast<const char*>(at + sizeof(head));
        const size_t name_length = ::strnlen(name, header.name_size);
        if (name_length == header.name_size)
            throw Error("KVM statistics: a name without its terminating NUL");
        if (head.size == 0 || head.offset % sizeof(uint64_t))
            throw Error("KVM statistics: stat " + std::string(name, name_length) + " has a bad size or offset");
        data_bytes = std::max(data_bytes, head.offset + uint64_t{head.size} * sizeof(uint64_t));
        stats_.push_back({std::string(name, name_length), head.offset / sizeof(uint64_t)});
    }
    data_offset_ = header.data_offset;
    data_words_ = data_bytes / sizeof(uint64_t);
    sample();  // a data block that is not all there is as malformed as a bad header
}

std::optional<size_t> KvmStatsFile::find(std::string_view name) const
{
    for (const auto& stat : stats_)
        if (stat.name == name)
            return stat.index;
    return std::nullopt;
}

std::vector<uint64_t> KvmStatsFile::sample() const
{
    std::vector<uint64_t> data(data_words_);
    read_whole(file_.get(), data.data(), data.size() * sizeof(uint64_t), data_offset_, "data block");
    return data;
}

VcpuStats::VcpuStats(KvmStatsFile file) : file_(std::move(file))
{
    for (size_t i = 0; i < kVcpuCounterNames.size(); ++i)
        where_[i] = file_.find(kVcpuCounterNames[i]);
}

std::optional<VcpuStats> VcpuStats::open(int vcpu_fd, std::string& why_not)
{
    Fd fd(::ioctl(vcpu_fd, KVM_GET_STATS_FD, 0));
    if (!fd.valid()) {
        why_not = std::string("KVM_GET_STATS_FD: ") + std::strerror(errno);
        return std::nullopt;
    }
    try {
        return VcpuStats(KvmStatsFile(std::move(fd)));
    } catch (const Error& e) {
        why_not = e.what();
        return std::nullopt;
    }
}

VcpuCounters VcpuStats::sample() const
{
    VcpuCounters counters{};
    std::vector<uint64_t> data;
    try {
        data = file_.sample();
    } catch (const Error&) {
        return counters;
    }
    for (size_t i = 0; i < where_.size(); ++i)
        if (where_[i])
            counters[i] = data[*where_[i]];
    return counters;
}

}  // namespace lkvm
