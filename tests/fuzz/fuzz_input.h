// What the fuzz targets share: their input read front to back as plain
// little-endian fields (so that a seed is easy to write by hand, unlike
// FuzzedDataProvider's from-the-end integers), zeroes once it runs out; and
// a check that, unlike assert(), stays on whatever the build flags say.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>

namespace lkvm::fuzz {

class Input {
public:
    Input(const uint8_t* data, size_t size) : data_(data, size) {}

    bool empty() const { return at_ >= data_.size(); }
    size_t left() const { return data_.size() - at_; }

    template <typename T>
    T take()
    {
        T value{};
        const size_t n = std::min(sizeof(T), left());
        if (n)
            std::memcpy(&value, data_.data() + at_, n);
        at_ += n;
        return value;
    }
    uint8_t u8() { return take<uint8_t>(); }
    uint16_t u16() { return take<uint16_t>(); }
    uint32_t u32() { return take<uint32_t>(); }
    uint64_t u64() { return take<uint64_t>(); }
    // Up to n bytes, fewer at the end of the input.
    std::span<const uint8_t> bytes(size_t n)
    {
        n = std::min(n, left());
        const auto out = data_.subspan(at_, n);
        at_ += n;
        return out;
    }
    std::span<const uint8_t> rest() { return bytes(left()); }

private:
    std::span<const uint8_t> data_;
    size_t at_ = 0;
};

// A property the code under test promised and broke: a finding, like a crash.
#define FUZZ_CHECK(cond)                                                                            \
    do {                                                                                            \
        if (!(cond)) {                                                                              \
            std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
            std::abort();                                                                           \
        }                                                                                           \
    } while (0)

}  // namespace lkvm::fuzz
