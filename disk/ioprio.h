// I/O priorities as the kernel encodes them (ioprio_set(2), an iocb's
// aio_reqprio, an io_uring SQE's ioprio): the class in the top three bits of a
// 16-bit value, the level in the low bits.
//
// Why not <linux/ioprio.h>: from linux-libc-dev 6.1.192 (Debian 12's security
// updates) it defines an inline function with a parameter named `class`, which
// no C++ compiler can parse. The values below are kernel ABI and never change;
// tests/unit/test_disk.cc pins them against the running kernel.
#pragma once

#include <cstdint>
#include <optional>

namespace lkvm::ioprio {

enum class Class : uint16_t { kNone = 0, kRealtime = 1, kBestEffort = 2, kIdle = 3 };

inline constexpr unsigned kClassShift = 13;
inline constexpr unsigned kLevels = 8;       // realtime and best-effort: 0 (highest) to 7
inline constexpr unsigned kDefaultLevel = 4;  // what the kernel gives best-effort work without one
inline constexpr int kWhoProcess = 1;         // ioprio_set(2)'s `which` for one thread

// A class with a level 0-7 (the idle class ignores its level), or nothing for
// what the kernel would refuse.
constexpr std::optional<uint16_t> value(Class klass, unsigned level)
{
    if (klass == Class::kNone || level >= kLevels)
        return std::nullopt;
    return static_cast<uint16_t>(static_cast<unsigned>(klass) << kClassShift | level);
}

}  // namespace lkvm::ioprio
