// What `lkvm list`, `lkvm stat` and `lkvm run --stats` print: tables (and
// JSON lines) made from the plain values a machine reports.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvm/stat_snapshot.h"

namespace lkvm {

// The --stats table: per I/O thread, per disk queue and, where there are
// vCPU counters, per vCPU; everything counted since the guest started.
std::string format_io_stats(const StatSnapshot& snapshot);

// How the tables head the vCPU counters, one per kVcpuCounterNames entry.
inline constexpr std::array<std::string_view, kVcpuCounterNames.size()> kVcpuCounterColumns{
    "exits", "io", "mmio", "halt", "irq", "irq-win", "signal", "irq-inj", "emul"};
// part / whole; none when whole is 0 (no requests, no kicks: no ratio).
std::optional<double> ratio(uint64_t part, uint64_t whole);
// Every vCPU's exits added up; none when there are no vCPU counters.
std::optional<uint64_t> total_exits(std::span<const StatSnapshot::Vcpu> vcpus);

// NAME PID STATE VCPUS MEM DISKS, a header and one row per guest.
std::string format_guest_table(const std::vector<GuestInfo>& guests);

// Rates over the interval between two samples of the same guest. All false: every table.
struct StatTables {
    bool disks = false, iothreads = false, vcpus = false;
};
std::string format_stat_tables(const StatSnapshot& before, const StatSnapshot& after, StatTables which);
// One JSON object on one line, '\n' included: cumulative counters and rates.
// Text that is not UTF-8 (an image's path) shows U+FFFD for each bad byte.
// wall_time_s: when the sample was taken (seconds since the epoch).
std::string format_stat_json(const StatSnapshot& before, const StatSnapshot& after, StatTables which,
                             double wall_time_s);

}  // namespace lkvm
