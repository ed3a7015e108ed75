// The test guest driver's own logic that the benchmarks lean on.
#include <doctest/doctest.h>

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
