// Counts the heap allocations (operator new, every form) made by threads
// that asked to be watched: how the device tests prove that the request path
// allocates nothing in steady state.
#pragma once

#include <cstdint>

namespace lkvm::test {

// Starts or stops counting the calling thread's allocations.
void watch_allocations(bool on);
// Allocations counted so far, over every watched thread.
uint64_t watched_allocations();

}  // namespace lkvm::test
