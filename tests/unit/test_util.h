// What several unit test files share: a temporary directory for tests that
// need real files (removed with everything in it), and the message of the
// lkvm::Error a call throws.
#pragma once

#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "base/error.h"

namespace lkvm::test {

struct TempDir {
    std::filesystem::path path;
    TempDir()
    {
        char tmpl[] = "/tmp/lkvm-unit.XXXXXX";
        path = ::mkdtemp(tmpl);
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;

    // A file of `size` bytes of `fill`.
    std::string file(const std::string& name, size_t size, char fill = 0)
    {
        const auto p = (path / name).string();
        std::ofstream(p, std::ios::binary) << std::string(size, fill);
        return p;
    }
    // A sparse file of `size` bytes: as large as a test likes, no space taken.
    std::string sparse_file(const std::string& name, uint64_t size)
    {
        const auto p = path / name;
        std::ofstream(p, std::ios::binary).flush();
        std::filesystem::resize_file(p, size);
        return p.string();
    }
};

// The message of the lkvm::Error fn throws, or "(no error)".
std::string error_of(auto&& fn)
{
    try {
        fn();
    } catch (const Error& e) {
        return e.what();
    }
    return "(no error)";
}

}  // namespace lkvm::test
