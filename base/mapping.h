// Owning mmap()ed region: unmapped exactly once.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <utility>

namespace lkvm {

class Mapping {
public:
    Mapping() = default;
    Mapping(void* addr, size_t size) : addr_(addr), size_(size) {}
    Mapping(Mapping&& o) noexcept : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    Mapping& operator=(Mapping&& o) noexcept
    {
        if (this != &o) {
            unmap();
            addr_ = std::exchange(o.addr_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping() { unmap(); }

    uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
    size_t size() const { return size_; }

private:
    void unmap()
    {
        if (addr_)
            ::munmap(addr_, size_);
    }
    void* addr_ = nullptr;
    size_t size_ = 0;
};

}  // namespace lkvm
