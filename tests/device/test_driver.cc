// The test guest driver's own logic that the benchmarks lean on.
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "tests/device/driver.h"

using lkvm::test::HaltPolling;

TEST_CASE("driver halt polling: KVM's window grows from 10 us, doubles up to the maximum, and a long halt ends it")
{
    HaltPolling halt{200'000};
    halt.adjust(5'000);  // a short halt while not polling: start polling
    CHECK(halt.window_ns == 10'000);
    halt.adjust(8'000);  // within the window: polling worked, no change
    CHECK(halt.window_ns == 10'000);
    halt.adjust(50'000);
    CHECK(halt.window_ns == 20'000);
    for (int i = 0; i < 10; ++i)
        halt.adjust(150'000);
    CHECK(halt.window_ns == 160'000);
    halt.adjust(199'000);
    CHECK(halt.window_ns == 200'000);  // capped at the maximum
    halt.adjust(300'000);  // longer than the maximum: polling only wasted the CPU
    CHECK(halt.window_ns == 0);
    halt.adjust(300'000);  // and a long halt while not polling does not start it
    CHECK(halt.window_ns == 0);

    HaltPolling off{0};
    off.adjust(1'000);
    CHECK(off.window_ns == 0);
}

TEST_CASE("driver halt polling: the runnable tasks are the 4th field's numerator in /proc/loadavg")
{
    using lkvm::test::runnable_tasks;
    CHECK(runnable_tasks("0.20 0.18 0.12 3/120 4567\n") == 3);
    CHECK(runnable_tasks("12.00 9.50 7.25 41/2048 99") == 41);
    CHECK(runnable_tasks("0.20 0.18 0.12 /120 4567") == 0);
    CHECK(runnable_tasks("0.20 0.18 0.12 3") == 0);
    CHECK(runnable_tasks(std::string_view("0.20 0.18 0.12 3/120", 16)) == 0);  // cut after the count
    CHECK(runnable_tasks("0.20 0.18") == 0);
    CHECK(runnable_tasks("") == 0);
}

TEST_CASE("driver halt polling: with a busy thread more than the host has CPUs, polling gives way")
{
    // Every CPU busy and one more: some task waits for a CPU whatever the host.
    const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    std::atomic<bool> stop{false};
    std::vector<std::jthread> busy;
    for (long i = 0; i <= cpus; ++i)
        busy.emplace_back([&] {
            while (!stop.load(std::memory_order_relaxed))
                __builtin_ia32_pause();
        });
    bool seen = false;
    for (int i = 0; i < 2000 && !seen; ++i) {
        seen = lkvm::test::others_want_a_cpu();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    stop = true;
    CHECK(seen);
}

TEST_CASE("driver halt polling: a contended host is read again after the refresh, an idle one at every halt")
{
    HaltPolling halt{200'000};
    const auto t0 = std::chrono::steady_clock::now();
    halt.contention = true;  // as a read that found every CPU taken would leave it
    halt.contention_read = t0;
    CHECK(halt.contended(t0 + HaltPolling::kContentionRefresh / 2));  // kept, not read
    CHECK(halt.contention_read == t0);
    halt.contended(t0 + HaltPolling::kContentionRefresh);  // due: read again
    CHECK(halt.contention_read == t0 + HaltPolling::kContentionRefresh);
    halt.contention = false;  // no contention seen: the next halt reads at once
    halt.contended(t0 + HaltPolling::kContentionRefresh + std::chrono::microseconds(1));
    CHECK(halt.contention_read == t0 + HaltPolling::kContentionRefresh + std::chrono::microseconds(1));
}
