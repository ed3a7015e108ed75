// Small text helpers that both the command line and the configuration parsers use.
#pragma once

#include <string>
#include <vector>

namespace lkvm {

// Splits "A,B,C" into its items, empty ones included (for the caller to refuse).
inline std::vector<std::string> split(const std::string& text, char separator)
{
    std::vector<std::string> items;
    size_t start = 0;
    for (;;) {
        const size_t at = text.find(separator, start);
        items.push_back(text.substr(start, at == std::string::npos ? std::string::npos : at - start));
        if (at == std::string::npos)
            return items;
        start = at + 1;
    }
}

}  // namespace lkvm
