// Counts the heap allocations (operator new, every form) made by threads
// that asked to be watched: how the device tests prove that the request path
// allocates nothing in steady state.
#pragma once

#include <chrono>
#include <cstdint>
#include <stop_token>
#include <thread>
#include <functional>

#include "virtio/io_thread.h"

namespace lkvm::test {

// Starts or stops counting the calling thread's allocations.
void watch_allocations(bool on);
// Allocations counted so far, over every watched thread.
uint64_t watched_allocations();

// The allocations `thread` made while `work` ran (on the calling thread).
inline uint64_t allocations_on(IoThread& thread, const std::function<void()>& work)
{
    thread.run_and_wait([] { watch_allocations(true); });
    const uint64_t before = watched_allocations();
    work();
    const uint64_t made = watched_allocations() - before;
    thread.run_and_wait([] { watch_allocations(false); });
    return made;
}

// Another thread hands `thread` empty work every 200 us while this lives, as
// lkvm stat and resets do: the memory of those operations is freed on the
// I/O thread, into whatever cache its next allocation would come from.
class PostsMeanwhile {
public:
    explicit PostsMeanwhile(IoThread& thread)
        : poster_([&thread](std::stop_token stop) {
              while (!stop.stop_requested()) {
                  thread.post([] {});
                  std::this_thread::sleep_for(std::chrono::microseconds(200));
              }
          })
    {
    }

private:
    std::jthread poster_;
};

}  // namespace lkvm::test
