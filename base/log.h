// lkvm's own messages on stderr, each one line prefixed "lkvm: ".
#pragma once

#include <cstdio>
#include <string_view>

namespace lkvm {

inline void log_line(std::string_view msg)
{
    std::fprintf(stderr, "lkvm: %.*s\n", static_cast<int>(msg.size()), msg.data());
    std::fflush(stderr);
}

}  // namespace lkvm
