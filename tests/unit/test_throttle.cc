// Throttling: QEMU's leaky-bucket arithmetic, a group's turns, and the
// command line that sets them.
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "cli/command_line.h"
#include "disk/throttle.h"
#include "tests/unit/test_util.h"

using namespace lkvm;

namespace {
constexpr uint64_t kMs = 1'000'000;

ThrottleLimits limit(ThrottleBucket bucket, uint64_t avg, uint64_t max = 0, uint64_t burst_length = 1)
{
    ThrottleLimits limits;
    limits[bucket] = {avg, max, burst_length};
    return limits;
}
}  // namespace

TEST_CASE("throttle: without a burst rate a tenth of a second of the average goes at once, then one per interval")
{
    LeakyBuckets buckets(limit(ThrottleBucket::kIopsTotal, 100), 0);
    for (int i = 0; i < 10; ++i) {
        CHECK(buckets.wait_ns(false, 0) == 0);
        buckets.account(false, 4096);
    }
    CHECK(buckets.wait_ns(false, 0) == 0);  // level 10: not over the bucket of 10 yet
    buckets.account(false, 4096);
    CHECK(buckets.wait_ns(true, 0) == 10 * kMs);  // one over: 1/100 s
    CHECK(buckets.wait_ns(false, 4 * kMs) == 6 * kMs);  // it leaks meanwhile
    CHECK(buckets.wait_ns(false, 10 * kMs) == 0);
}

TEST_CASE("throttle: a direction's limit holds back only that direction, a total one both")
{
    LeakyBuckets buckets(limit(ThrottleBucket::kBpsWrite, 1 << 20), 0);  // 1 MiB/s of writes
    buckets.account(true, 1 << 20);
    CHECK(buckets.wait_ns(true, 0) > 0);
    CHECK(buckets.wait_ns(false, 0) == 0);
    buckets.account(false, 64 << 20);  // reads count nowhere here
    CHECK(buckets.wait_ns(false, 0) == 0);
    // 1 MiB over a bucket of 0.1 MiB at 1 MiB/s: 0.9 s.
    CHECK(buckets.wait_ns(true, 0) == 900 * kMs);
}

TEST_CASE("throttle: a burst rate lets burst_length seconds of it through, at most max per second")
{
    LeakyBuckets buckets(limit(ThrottleBucket::kIopsTotal, 100, 1000, 2), 0);
    // The burst bucket (a tenth of a second of max: 100) fills first.
    for (int i = 0; i < 101; ++i)
        buckets.account(false, 512);
    CHECK(buckets.wait_ns(false, 0) == 1 * kMs);  // one over at 1000/s
    // The main bucket holds max * burst_length = 2000 before the average rules.
    for (int i = 0; i < 1900; ++i)
        buckets.account(false, 512);
    CHECK(buckets.wait_ns(false, 0) == 10 * kMs);  // 2001: one over at 100/s
}

TEST_CASE("throttle: iops-size counts a large request as several operations; new limits empty the buckets")
{
    ThrottleLimits limits = limit(ThrottleBucket::kIopsTotal, 100);
    limits.iops_size = 4096;
    LeakyBuckets buckets(limits, 0);
    buckets.account(false, 64 << 10);  // 16 operations
    CHECK(buckets.wait_ns(false, 0) == 60 * kMs);
    buckets.account(false, 512);       // small ones still count one
    CHECK(buckets.wait_ns(false, 0) == 70 * kMs);
    buckets.set_limits(limits, 0);
    CHECK(buckets.wait_ns(false, 0) == 0);
    CHECK(LeakyBuckets().wait_ns(true, 0) == 0);  // no limits: never waits
}

TEST_CASE("throttle: limits QEMU refuses are refused, with the option named")
{
    auto problem = [](const ThrottleLimits& l) { return throttle_limits_problem(l).value_or(""); };
    ThrottleLimits both = limit(ThrottleBucket::kIopsTotal, 100);
    both[ThrottleBucket::kIopsRead].avg = 50;
    CHECK(problem(both) == "iops and iops-rd/iops-wr cannot be used together");
    CHECK(problem(limit(ThrottleBucket::kBpsRead, 0, 10)) == "bps-rd-max needs bps-rd=");
    CHECK(problem(limit(ThrottleBucket::kBpsTotal, 100, 10)) == "bps-max cannot be lower than bps=");
    CHECK(problem(limit(ThrottleBucket::kIopsWrite, 100, 0, 5)) == "iops-wr-max-length needs iops-wr-max");
    CHECK(problem(limit(ThrottleBucket::kIopsWrite, 100, 200, 0)) == "iops-wr-max-length must be at least 1");
    CHECK(problem(limit(ThrottleBucket::kBpsTotal, kThrottleValueMax + 1)).find("at most") != std::string::npos);
    ThrottleLimits size_only;
    size_only.iops_size = 4096;
    CHECK(problem(size_only).find("iops-size needs an iops limit") == 0);
    CHECK(problem(limit(ThrottleBucket::kIopsTotal, 100, 1000, 60)).empty());
}

namespace {
struct CountingMember : ThrottleGroup::Member {
    int resumed = 0;
    void resume() override { ++resumed; }
};
}  // namespace

TEST_CASE("throttle group: members that must wait take turns, and one that leaves hands its turn on")
{
    ThrottleGroup group("g", limit(ThrottleBucket::kIopsTotal, 100));
    CHECK(group.active());
    CountingMember a, b, c;
    for (int i = 0; i < 11; ++i)
        REQUIRE(group.admit(a, false, 512, true).go);  // the bucket of 10 is over-full
    const auto first = group.admit(a, false, 512, true);
    CHECK_FALSE(first.go);
    CHECK(first.wait_ns > 0);                          // a is first in line: it waits on its timer
    CHECK(group.admit(b, false, 512, true).wait_ns == 0);  // b and c: until their turn
    CHECK_FALSE(group.admit(c, true, 512, true).go);
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
    REQUIRE(group.admit(a, false, 512, true).go);      // a goes, and to the back of the line
    CHECK(b.resumed == 1);                             // b's turn
    CHECK_FALSE(group.admit(a, false, 512, true).go);  // not a's
    CHECK(group.admit(c, false, 512, true).wait_ns == 0);
    group.leave(b);                                    // b goes away on its turn: c's
    CHECK(c.resumed == 1);
    CHECK(a.resumed == 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
    REQUIRE(group.admit(c, false, 512, false).go);     // c's last: out of the line, a's turn
    CHECK(a.resumed == 1);
    group.set_limits({});                              // no limits: the line goes at once
    CHECK_FALSE(group.active());
    CHECK(a.resumed == 2);
    CHECK(group.admit(a, false, 512, false).go);
}

TEST_CASE("throttle options: -d takes QEMU's names, --throttle-group defines what disks share")
{
    const DiskSpec disk = parse_disk_spec("a.raw,iops=500,bps-wr=1048576,bps-wr-max=2097152,bps-wr-max-length=10,iops-size=8192");
    CHECK(disk.throttle[ThrottleBucket::kIopsTotal].avg == 500);
    CHECK(disk.throttle[ThrottleBucket::kBpsWrite] == BucketLimit{1 << 20, 2 << 20, 10});
    CHECK(disk.throttle.iops_size == 8192);
    const Command cmd = parse_command_line(
        {"run", "--throttle-group", "pve,iops=500", "-d", "a.raw,throttle-group=pve", "-d", "b.raw,throttle-group=pve"});
    REQUIRE(cmd.run.throttle_groups.size() == 1);
    CHECK(cmd.run.throttle_groups[0].name == "pve");
    CHECK(cmd.run.throttle_groups[0].limits[ThrottleBucket::kIopsTotal].avg == 500);
    CHECK(cmd.run.disks[1].throttle_group == "pve");
}

TEST_CASE("throttle options: bad values, undefined groups and conflicts get one line naming the option")
{
    auto refused = [](std::vector<std::string> args) { return test::error_of([&] { parse_command_line(args); }); };
    auto check_line = [](const std::string& error, const std::string& part) {
        CAPTURE(error);
        CHECK(error.find(part) != std::string::npos);
        CHECK(error.find('\n') == std::string::npos);
    };
    check_line(refused({"run", "-d", "a.raw,iops=fast"}), "-d a.raw,iops=fast: iops 'fast': not a number");
    check_line(refused({"run", "-d", "a.raw,iops=10,iops-rd=5"}), "iops and iops-rd/iops-wr cannot be used together");
    check_line(refused({"run", "-d", "a.raw,bps-max=10"}), "bps-max needs bps=");
    check_line(refused({"run", "-d", "a.raw,iops-max-length=0"}), "iops-max-length must be at least 1");
    check_line(refused({"run", "-d", "a.raw,iops-wr=-1"}), "not a number");
    check_line(refused({"run", "-d", "a.raw,throttle-group=nope"}),
               "-d a.raw,throttle-group=nope: no such group; define it with --throttle-group nope,iops=...");
    check_line(refused({"run", "--throttle-group", "g,iops=5", "-d", "a.raw,throttle-group=g,iops=10"}),
               "the disk also has limits of its own");
    check_line(refused({"run", "--throttle-group", "g,iops=5", "--throttle-group", "g,bps=5"}),
               "--throttle-group g is given twice");
    check_line(refused({"run", "--throttle-group", "g,speed=5"}), "--throttle-group g,speed=5: 'speed=5' is not a limit");
    check_line(refused({"run", "--throttle-group", "a b,iops=5"}), "name it with letters, digits, '-' or '_'");
    check_line(refused({"run", "--throttle-group", ",iops=5"}), "name it with letters");
    check_line(refused({"run", "-d", "a.raw,throttle-group="}), "name it with letters");
}

TEST_CASE("lkvm throttle NAME DISK|GROUP LIMITS: the limits are checked before the guest is asked")
{
    const Command cmd = parse_command_line({"throttle", "g", "0", "iops=500,bps-wr=1048576"});
    CHECK(cmd.kind == Command::Kind::kThrottle);
    CHECK(cmd.control.name == "g");
    CHECK(cmd.control.target == "0");
    CHECK(cmd.control.limits == "iops=500,bps-wr=1048576");
    CHECK(parse_throttle_limits("x", "iops=0") == ThrottleLimits{});  // 0: none
    auto refused = [](std::vector<std::string> args) { return test::error_of([&] { parse_command_line(args); }); };
    CHECK(refused({"throttle", "g"}).find("give a disk") != std::string::npos);
    CHECK(refused({"throttle", "g", "0"}).find("give a disk") != std::string::npos);
    CHECK(refused({"throttle", "g", "0", "iops=x"}).find("throttle 0 iops=x: iops 'x': not a number") != std::string::npos);
    CHECK(refused({"throttle", "g", "0", "speed=1"}).find("'speed=1' is not a limit") != std::string::npos);
    CHECK(refused({"throttle", "g", "0", "iops=1,iops-rd=1"}).find("cannot be used together") != std::string::npos);
    CHECK(refused({"throttle", "g", "0", "iops=1", "more"}).find("unexpected argument 'more'") != std::string::npos);
}
