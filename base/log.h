// lkvm's own messages on stderr, each one line prefixed "lkvm: ", filtered
// by the level --loglevel (or --quiet) sets once at start-up.
#pragma once

#include <atomic>
#include <cstdio>
#include <string_view>

namespace lkvm {

enum class LogLevel { kError, kWarn, kInfo, kDebug };

namespace detail {
inline std::atomic<LogLevel> log_level{LogLevel::kInfo};
}  // namespace detail

inline void set_log_level(LogLevel level) { detail::log_level.store(level, std::memory_order_relaxed); }
inline bool log_enabled(LogLevel level) { return level <= detail::log_level.load(std::memory_order_relaxed); }

inline void log_at(LogLevel level, std::string_view msg)
{
    if (!log_enabled(level))
        return;
    std::fprintf(stderr, "lkvm: %.*s\n", static_cast<int>(msg.size()), msg.data());
    std::fflush(stderr);
}
inline void log_error(std::string_view msg) { log_at(LogLevel::kError, msg); }
inline void log_warn(std::string_view msg) { log_at(LogLevel::kWarn, msg); }
inline void log_info(std::string_view msg) { log_at(LogLevel::kInfo, msg); }
inline void log_debug(std::string_view msg) { log_at(LogLevel::kDebug, msg); }

}  // namespace lkvm
