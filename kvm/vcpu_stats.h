// KVM's own per-vCPU counters (exits by reason, interrupt injections), read
// through the binary statistics fd (KVM_GET_STATS_FD, Linux 5.14+): what a
// disk request costs the guest, counted by the kernel rather than guessed.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/fd.h"

namespace lkvm {

// A file laid out as KVM's binary statistics: header, descriptors, data.
// The header and descriptors are read once; each sample() is one pread of
// the data block.
class KvmStatsFile {
public:
    // Throws Error when the layout is malformed (a name_size of 0, blocks
    // that overlap or run past the end of the file, a name without its NUL).
    explicit KvmStatsFile(Fd file);

    // Where the first value of stat `name` sits in a sample(); none when the file has no such stat.
    std::optional<size_t> find(std::string_view name) const;
    // The data block now, as 64-bit values. Throws Error when it cannot be read whole.
    std::vector<uint64_t> sample() const;

private:
    struct Stat {
        std::string name;
        size_t index;  // in 64-bit words from the start of the data block
    };
    Fd file_;
    uint64_t data_offset_ = 0;
    size_t data_words_ = 0;
    std::vector<Stat> stats_;
};

// The counters lkvm shows, in KVM's own names (x86 vCPU statistics).
inline constexpr std::array<std::string_view, 9> kVcpuCounterNames{
    "exits",        "io_exits",     "mmio_exits",     "halt_exits",     "irq_exits",
    "irq_window_exits", "signal_exits", "irq_injections", "insn_emulation"};
// One value per name above: none where this kernel does not count that.
using VcpuCounters = std::array<std::optional<uint64_t>, kVcpuCounterNames.size()>;
inline constexpr size_t kVcpuExits = 0;  // "exits", the sum over every reason

class VcpuStats {
public:
    explicit VcpuStats(KvmStatsFile file);
    // The statistics of a vCPU; the error says why there are none (a kernel
    // without KVM_GET_STATS_FD, or a layout we cannot read).
    static std::optional<VcpuStats> open(int vcpu_fd, std::string& why_not);

    // Cumulative since the vCPU was created; all none when the read fails.
    VcpuCounters sample() const;

private:
    KvmStatsFile file_;
    std::array<std::optional<size_t>, kVcpuCounterNames.size()> where_;
};

}  // namespace lkvm
