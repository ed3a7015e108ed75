// The I/O thread model's pure parts: queue -> thread mapping, the poll-time
// adaptation, and the latency histogram behind the statistics.
#include <doctest/doctest.h>

#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <stdexcept>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "kvm/stat_snapshot.h"
#include "virtio/io_stats.h"
#include "virtio/io_thread.h"
#include "virtio/queue_mapping.h"
#include "virtio/request_queue.h"

using namespace lkvm;

TEST_CASE("mapping: queues round robin over the group, the start rotating from disk to disk")
{
    using Map = std::vector<std::vector<unsigned>>;
    CHECK(map_queues(2, {{4, {}}, {4, {}}}) == Map{{0, 1, 0, 1}, {0, 1, 0, 1}});
    CHECK(map_queues(4, {{2, {}}, {2, {}}, {1, {}}}) == Map{{0, 1}, {2, 3}, {0}});
    // Single-queue disks spread too.
    CHECK(map_queues(3, {{1, {}}, {1, {}}, {1, {}}, {1, {}}}) == Map{{0}, {1}, {2}, {0}});
    // Odd queue counts keep the load even: 3 + 3 over 2 threads.
    CHECK(map_queues(2, {{3, {}}, {3, {}}}) == Map{{0, 1, 0}, {1, 0, 1}});
    // More threads than queues: the group is still used in turn.
    CHECK(map_queues(4, {{1, {}}, {2, {}}}) == Map{{0}, {1, 2}});
}

TEST_CASE("mapping: iothread= lists, as QEMU's iothread-vq-mapping")
{
    using Map = std::vector<std::vector<unsigned>>;
    CHECK(map_queues(4, {{4, {2}}}) == Map{{2, 2, 2, 2}});
    CHECK(map_queues(4, {{4, {1, 3}}}) == Map{{1, 3, 1, 3}});
    CHECK(map_queues(4, {{2, {3, 2, 1}}}) == Map{{3, 2}});
    // A disk with its own list does not move the rotation of the others.
    CHECK(map_queues(2, {{1, {}}, {2, {1}}, {1, {}}}) == Map{{0}, {1, 1}, {1}});
    CHECK_THROWS_AS(map_queues(2, {{1, {5}}}), Error);
    CHECK_THROWS_AS(map_queues(0, {{1, {}}}), Error);
    try {
        map_queues(2, {{1, {}}, {1, {2}}});
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("disk 1: iothread=2") != std::string::npos);
    }
}

TEST_CASE("polling: the poll time adapts as QEMU's does")
{
    struct Case {
        uint64_t poll_ns, block_ns;
        PollParams params;
        uint64_t expected;
        const char* why;
    };
    const PollParams qemu{};  // max 32768, grow x2, shrink to 0
    const Case cases[] = {
        {0, 1000, qemu, kPollStartNs, "a short wait starts polling at 4 us"},
        {4000, 3000, qemu, 4000, "caught by polling: the sweet spot, no change"},
        {4000, 4000, qemu, 4000, "exactly caught"},
        {4000, 10000, qemu, 8000, "polling a little longer would have caught it: grow"},
        {16000, 20000, qemu, 32000, "grow"},
        {32000, 32500, qemu, 32768, "grow, capped at poll-max-ns"},
        {32768, 32768, qemu, 32768, "at the cap and caught"},
        {8000, 50000, qemu, 0, "longer than any poll we allow: shrink (to 0 by default)"},
        {0, 50000, qemu, 0, "long waits keep polling off"},
        {8000, 50000, {32768, 0, 2}, 4000, "poll-shrink=2 halves"},
        {4000, 10000, {32768, 4, 0}, 16000, "poll-grow=4"},
        {4000, 10000, {0, 0, 0}, 0, "poll-max-ns=0: never poll"},
        {0, 1000, {1000, 0, 0}, 1000, "the start is capped too"},
    };
    for (const auto& c : cases) {
        CAPTURE(c.why);
        CHECK(next_poll_ns(c.poll_ns, c.block_ns, c.params) == c.expected);
    }
}

TEST_CASE("latency histogram: buckets within 12.5 %, percentiles from them")
{
    for (uint64_t ns : {0ull, 1ull, 7ull, 8ull, 9ull, 15ull, 16ull, 1000ull, 123456ull, 999999999ull}) {
        const unsigned b = LatencyHistogram::bucket_of(ns);
        CAPTURE(ns);
        CHECK(LatencyHistogram::bucket_upper(b) >= ns);
        CHECK(static_cast<double>(LatencyHistogram::bucket_upper(b)) <= static_cast<double>(ns) * 1.125 + 1);
        if (b > 0)
            CHECK(LatencyHistogram::bucket_upper(b - 1) < ns);
    }
    CHECK(LatencyHistogram::bucket_of(~0ull) == LatencyHistogram::kBuckets - 1);

    LatencyHistogram h;
    CHECK(h.percentile(0.5) == 0);
    for (int i = 0; i < 98; ++i)
        h.record(10'000);
    h.record(1'000'000);
    h.record(2'000'000);
    CHECK(h.count() == 100);
    CHECK(h.percentile(0.5) >= 10'000);
    CHECK(h.percentile(0.5) < 11'300);
    CHECK(h.percentile(0.99) >= 1'000'000);
    CHECK(h.percentile(0.99) < 1'130'000);
    CHECK(h.percentile(1.0) >= 2'000'000);

    // What a reader keeps: the non-empty buckets, ascending, with the same percentiles.
    const LatencyBuckets buckets = h.nonzero_buckets();
    REQUIRE(buckets.size() == 3);
    CHECK(buckets[0] == std::pair<uint16_t, uint64_t>{LatencyHistogram::bucket_of(10'000), 98});
    CHECK(buckets[1].first < buckets[2].first);
    CHECK(buckets[2].second == 1);
    for (double p : {0.0, 0.5, 0.98, 0.99, 1.0})
        CHECK(LatencyHistogram::percentile(buckets, p) == h.percentile(p));
    CHECK(LatencyHistogram::percentile(LatencyBuckets{}, 0.5) == 0);
}

TEST_CASE("queue statistics: a request is in flight from its start until completed or dropped")
{
    QueueStats stats;
    CHECK(stats.in_flight() == 0);
    stats.started();
    stats.started();
    CHECK(stats.in_flight() == 2);
    stats.completed(4096, 1000);
    CHECK(stats.in_flight() == 1);
    CHECK(stats.counters().requests == 1);
    stats.dropped();  // its queue was reset: not a completed request
    CHECK(stats.in_flight() == 0);
    CHECK(stats.counters().requests == 1);
    CHECK(stats.counters().bytes == 4096);
}

namespace {
// A /proc/PID/task/TID/stat line as Linux writes it (52 fields), with `comm` and field 39 ("processor") given.
std::string proc_stat_line(const std::string& comm, const std::string& processor)
{
    std::string line = "4242 (" + comm + ") S 1 4242 4242 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 5 0 1234 "
                       "12345678 456 18446744073709551615 1 1 0 0 0 0 0 4096 17663 0 0 0 -1 ";
    line += processor;  // field 39
    line += " 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
    return line;
}
}  // namespace

TEST_CASE("/proc stat: the CPU a thread last ran on is field 39, counted after the command's last ')'")
{
    CHECK(parse_proc_stat_cpu(proc_stat_line("iothread0", "3")) == 3);
    CHECK(parse_proc_stat_cpu(proc_stat_line("disk0-io", "117")) == 117);
    // The command is the thread's name: spaces and parentheses in it move nothing.
    CHECK(parse_proc_stat_cpu(proc_stat_line("a) b (c) 1 2", "5")) == 5);
    CHECK(parse_proc_stat_cpu(proc_stat_line("", "0")) == 0);
    // Lines that do not have it.
    CHECK_FALSE(parse_proc_stat_cpu("").has_value());
    CHECK_FALSE(parse_proc_stat_cpu("4242 iothread0 S 1 2 3").has_value());
    CHECK_FALSE(parse_proc_stat_cpu("4242 (iothread0) S 1 2 3").has_value());
    CHECK_FALSE(parse_proc_stat_cpu(proc_stat_line("x", "-1")).has_value());
    CHECK_FALSE(parse_proc_stat_cpu(proc_stat_line("x", "3x")).has_value());
    CHECK_FALSE(parse_proc_stat_cpu(proc_stat_line("x", "99999999999")).has_value());
    // And this thread's own, read from /proc.
    CHECK(thread_last_cpu(::gettid()) >= 0);
    CHECK(thread_last_cpu(0) == -1);
}

TEST_CASE("I/O threads: run with the host scheduling policy they were given")
{
    for (auto [policy, native] : {std::pair{IoThreadPolicy::kBatch, SCHED_BATCH},
                                  std::pair{IoThreadPolicy::kOther, SCHED_OTHER},
                                  std::pair{IoThreadPolicy::kIdle, SCHED_IDLE}}) {
        // A variable of its own: CAPTURE is a lambda, and clang 14 (the
        // ASan+UBSan tier's compiler) cannot capture a structured binding.
        const std::string name = io_thread_policy_name(policy);
        CAPTURE(name);
        IoThread thread(IoThreadOptions{"policy-test", {}, 0, -1, policy});
        int seen = -1;
        thread.run_and_wait([&] { seen = ::sched_getscheduler(0); });
        CHECK(seen == native);
    }
    CHECK(IoThreadOptions{}.policy == IoThreadPolicy::kBatch);
}

TEST_CASE("statistics sample: each I/O thread with its kernel thread id and the CPU it last ran on")
{
    std::vector<std::unique_ptr<IoThread>> threads;
    threads.push_back(std::make_unique<IoThread>(IoThreadOptions{"iothread0", {}, 0, -1}));
    threads.push_back(std::make_unique<IoThread>(IoThreadOptions{"iothread1", {}, 0, -1}));
    for (const auto& t : threads)
        t->run_and_wait([] {});  // running, its tid known
    const uint64_t before = monotonic_ns();
    const StatSnapshot sample = sample_io_stats(threads, {});
    CHECK(sample.time_ns >= before);
    CHECK(sample.time_ns <= monotonic_ns());
    REQUIRE(sample.threads.size() == 2);
    for (size_t k = 0; k < 2; ++k) {
        const auto& t = sample.threads[k];
        CAPTURE(k);
        CHECK(t.name == "iothread" + std::to_string(k));
        CHECK(t.tid == threads[k]->tid());
        CHECK(t.tid != ::gettid());
        CHECK(t.cpu >= 0);
        CHECK(t.requests == 0);
        CHECK(t.bytes == 0);
    }
    CHECK(sample.queues.empty());
}

TEST_CASE("I/O threads: a failed loop is reported once, and run_and_wait still answers (resets and exit do not hang)")
{
    std::promise<std::string> failure;
    IoThreadOptions options{"failing-io", {}, 0, -1};
    options.on_failure = [&](const std::string& what) { failure.set_value(what); };
    IoThread thread(std::move(options));
    thread.post([] { throw std::runtime_error("a bug"); });
    auto reported = failure.get_future();
    REQUIRE(reported.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
    CHECK(reported.get() == "failing-io failed: a bug");
    // On a thread of its own, so that a hang fails the check instead of the test run.
    auto answered = std::make_shared<std::promise<bool>>();
    std::thread([&thread, answered] {
        bool ran = false;
        thread.run_and_wait([&] { ran = true; });
        answered->set_value(ran);
    }).detach();
    auto ran = answered->get_future();
    REQUIRE(ran.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
    CHECK(ran.get());
}

TEST_CASE("I/O threads: an engine that cannot be set up is an error where the device is made, not an abort")
{
    IoThreadOptions options{"no-aio", {}, 0, -1};
    options.make_engine = [](EngineKind, size_t) -> std::unique_ptr<IoEngine> {
        throw Error("io_setup for the native (libaio) engine: Resource temporarily unavailable");
    };
    IoThread thread(std::move(options));
    CHECK_THROWS_WITH_AS(thread.prepare_engine(EngineKind::kNative),
                         "io_setup for the native (libaio) engine: Resource temporarily unavailable", Error);
    bool alive = false;
    thread.run_and_wait([&] { alive = true; });  // the thread goes on
    CHECK(alive);
}

TEST_CASE("request queues: a queue the host cannot start leaves the device needing a reset, never an exception")
{
    IoThread thread(IoThreadOptions{"queues", {}, 0, -1});
    RequestQueues queues;
    const std::vector<QueueSetup> setups{QueueSetup{0, {}, -1, nullptr}};
    std::vector<IoThread*> threads{&thread};
    unsigned broken = 0;
    CHECK_NOTHROW(queues.start(
        setups, threads, [](const QueueSetup&) { return true; },
        [](IoThread&, const QueueSetup&) -> std::shared_ptr<RequestQueue> { throw std::runtime_error("EMFILE"); },
        [&] { ++broken; }));
    CHECK(broken == 1);
    CHECK(queues.all().empty());
    queues.stop();
}
