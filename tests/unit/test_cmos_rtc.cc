// The CMOS RTC, through its two ports as a guest drives it, on a fake clock.
#include <doctest/doctest.h>

#include <array>
#include <cstdint>
#include <limits>
#include <vector>

#include "hw/cmos_rtc.h"

using namespace lkvm;

namespace {
constexpr int64_t kFriday20261204_130509 = 1796389509;  // Friday 2026-12-04 13:05:09 UTC
constexpr int64_t kSunday20010909_014640 = 1000000000;  // Sunday 2001-09-09 01:46:40 UTC

struct Rtc {
    int64_t now = kFriday20261204_130509;
    CmosRtc rtc{[this] { return now; }};

    void select(uint8_t index) { rtc.write(0, std::span(&index, 1)); }
    uint8_t get(uint8_t index)
    {
        select(index);
        uint8_t value = 0;
        rtc.read(1, std::span(&value, 1));
        return value;
    }
    void set(uint8_t index, uint8_t value)
    {
        select(index);
        rtc.write(1, std::span(&value, 1));
    }
    // Every time register, seconds first, century last.
    std::vector<uint8_t> time()
    {
        return {get(CmosRtc::kSeconds), get(CmosRtc::kMinutes), get(CmosRtc::kHours), get(CmosRtc::kDayOfWeek),
                get(CmosRtc::kDayOfMonth), get(CmosRtc::kMonth), get(CmosRtc::kYear), get(CmosRtc::kCentury)};
    }
    // What Linux's mc146818_set_time does: SET on, divider held in reset, the fields, then both restored.
    void linux_set_time(uint8_t sec, uint8_t min, uint8_t hour, uint8_t day, uint8_t month, uint8_t year)
    {
        const uint8_t b = get(CmosRtc::kRegB), a = get(CmosRtc::kRegA);
        set(CmosRtc::kRegB, b | CmosRtc::kRegBSet);
        set(CmosRtc::kRegA, a | 0x70);
        set(CmosRtc::kYear, year);
        set(CmosRtc::kMonth, month);
        set(CmosRtc::kDayOfMonth, day);
        set(CmosRtc::kHours, hour);
        set(CmosRtc::kMinutes, min);
        set(CmosRtc::kSeconds, sec);
        set(CmosRtc::kRegB, b);
        set(CmosRtc::kRegA, a);
    }
};
}  // namespace

TEST_CASE("cmos rtc: reset state is what firmware leaves: BCD, 24-hour, UIP clear, valid RAM and time")
{
    Rtc r;
    CHECK(r.get(CmosRtc::kRegA) == 0x26);
    CHECK(r.get(CmosRtc::kRegB) == 0x02);
    CHECK(r.get(CmosRtc::kRegC) == 0x00);
    CHECK(r.get(CmosRtc::kRegD) == 0x80);
}

TEST_CASE("cmos rtc: the host's UTC time in BCD, with day of week and century")
{
    Rtc r;
    CHECK(r.time() == std::vector<uint8_t>{0x09, 0x05, 0x13, 6, 0x04, 0x12, 0x26, 0x20});
    r.now = 946684799;  // Friday 1999-12-31 23:59:59
    CHECK(r.time() == std::vector<uint8_t>{0x59, 0x59, 0x23, 6, 0x31, 0x12, 0x99, 0x19});
    r.now += 1;  // Saturday 2000-01-01
    CHECK(r.time() == std::vector<uint8_t>{0x00, 0x00, 0x00, 7, 0x01, 0x01, 0x00, 0x20});
    r.now = 4102444800 + 2 * 86400;  // Sunday 2100-01-03
    CHECK(r.time() == std::vector<uint8_t>{0x00, 0x00, 0x00, 1, 0x03, 0x01, 0x00, 0x21});
    r.now = 1709200800;  // Thursday 2024-02-29 10:00:00
    CHECK(r.time() == std::vector<uint8_t>{0x00, 0x00, 0x10, 5, 0x29, 0x02, 0x24, 0x20});
}

TEST_CASE("cmos rtc: binary mode when register B's DM bit says so")
{
    Rtc r;
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBBinary);
    CHECK(r.time() == std::vector<uint8_t>{9, 5, 13, 6, 4, 12, 26, 20});
}

TEST_CASE("cmos rtc: 12-hour mode counts 12, 1..11 with the PM bit from noon")
{
    Rtc r;
    r.set(CmosRtc::kRegB, 0);  // BCD, 12-hour
    CHECK(r.get(CmosRtc::kHours) == (0x01 | CmosRtc::kHourPm));  // 13:05
    r.now = 1796344200;  // 00:30
    CHECK(r.get(CmosRtc::kHours) == 0x12);
    r.now = 1796385600;  // 12:00
    CHECK(r.get(CmosRtc::kHours) == (0x12 | CmosRtc::kHourPm));
    r.now = 1796385600 + 11 * 3600;  // 23:00
    CHECK(r.get(CmosRtc::kHours) == (0x11 | CmosRtc::kHourPm));
    r.set(CmosRtc::kRegB, CmosRtc::kRegBBinary);  // binary, 12-hour
    CHECK(r.get(CmosRtc::kHours) == (11 | CmosRtc::kHourPm));
}

TEST_CASE("cmos rtc: the clock advances with the host's")
{
    Rtc r;
    r.now += 61;
    CHECK(r.get(CmosRtc::kSeconds) == 0x10);
    CHECK(r.get(CmosRtc::kMinutes) == 0x06);
}

TEST_CASE("cmos rtc: a time the guest sets is kept as an offset, and the clock advances from it")
{
    Rtc r;
    r.linux_set_time(0x40, 0x46, 0x01, 0x09, 0x09, 0x01);  // 2001-09-09 01:46:40, the century register kept
    CHECK(r.time() == std::vector<uint8_t>{0x40, 0x46, 0x01, 1, 0x09, 0x09, 0x01, 0x20});
    r.now += 3600 + 5;
    CHECK(r.time() == std::vector<uint8_t>{0x45, 0x46, 0x02, 1, 0x09, 0x09, 0x01, 0x20});
    CHECK(r.get(CmosRtc::kRegA) == 0x26);  // the divider is running again

    SUBCASE("in binary mode too")
    {
        r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBBinary);
        r.linux_set_time(59, 59, 23, 31, 12, 99);  // 2099-12-31 23:59:59
        r.now += 1;
        CHECK(r.time() == std::vector<uint8_t>{0, 0, 0, 6, 1, 1, 0, 21});  // Friday 2100-01-01
    }
    SUBCASE("a 12-hour PM hour is 24-hour afternoon")
    {
        r.set(CmosRtc::kRegB, 0);
        r.linux_set_time(0x00, 0x00, 0x07 | CmosRtc::kHourPm, 0x04, 0x12, 0x26);
        r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour);
        CHECK(r.get(CmosRtc::kHours) == 0x19);
        r.set(CmosRtc::kRegB, 0);
        r.linux_set_time(0x00, 0x00, 0x12, 0x04, 0x12, 0x26);  // 12 AM
        r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour);
        CHECK(r.get(CmosRtc::kHours) == 0x00);
    }
    SUBCASE("the century register is taken too")
    {
        r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBSet);
        r.set(CmosRtc::kCentury, 0x21);
        r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour);
        CHECK(r.get(CmosRtc::kCentury) == 0x21);
        CHECK(r.get(CmosRtc::kYear) == 0x01);
        CHECK(r.get(CmosRtc::kDayOfWeek) == 6);  // 2101-09-09 is a Friday
    }
}

TEST_CASE("cmos rtc: SET freezes the time registers: reads return the frozen time and what was written")
{
    Rtc r;
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBSet);
    r.now += 100;
    CHECK(r.get(CmosRtc::kSeconds) == 0x09);
    CHECK(r.get(CmosRtc::kMinutes) == 0x05);
    r.set(CmosRtc::kMinutes, 0x30);
    r.set(CmosRtc::kDayOfWeek, 3);
    CHECK(r.get(CmosRtc::kMinutes) == 0x30);
    CHECK(r.get(CmosRtc::kDayOfWeek) == 3);
    r.now += 100;
    CHECK(r.get(CmosRtc::kSeconds) == 0x09);
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour);
    // 13:30:09 set 200 s after 13:05:09; the day of week is the date's, not what was written.
    CHECK(r.time() == std::vector<uint8_t>{0x09, 0x30, 0x13, 6, 0x04, 0x12, 0x26, 0x20});
    r.now += 2;
    CHECK(r.get(CmosRtc::kSeconds) == 0x11);
}

TEST_CASE("cmos rtc: SET clears the update interrupt enable, as the MC146818 does")
{
    Rtc r;
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBUpdateIrqEnable);
    CHECK(r.get(CmosRtc::kRegB) == (CmosRtc::kRegB24Hour | CmosRtc::kRegBUpdateIrqEnable));
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBUpdateIrqEnable | CmosRtc::kRegBSet);
    CHECK(r.get(CmosRtc::kRegB) == (CmosRtc::kRegB24Hour | CmosRtc::kRegBSet));
}

TEST_CASE("cmos rtc: a field written while the clock runs changes that field only")
{
    Rtc r;
    r.set(CmosRtc::kMinutes, 0x50);
    CHECK(r.time() == std::vector<uint8_t>{0x09, 0x50, 0x13, 6, 0x04, 0x12, 0x26, 0x20});
    r.now += 60;
    CHECK(r.get(CmosRtc::kMinutes) == 0x51);
}

TEST_CASE("cmos rtc: a time out of range leaves the clock as it was")
{
    const std::vector<uint8_t> running{0x09, 0x05, 0x13, 6, 0x04, 0x12, 0x26, 0x20};
    auto check_refused = [&](uint8_t reg_b, uint8_t index, uint8_t value) {
        CAPTURE(reg_b);
        CAPTURE(index);
        CAPTURE(value);
        Rtc r;
        r.set(CmosRtc::kRegB, reg_b | CmosRtc::kRegBSet);
        r.set(index, value);
        r.set(CmosRtc::kRegB, reg_b);
        r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour);
        CHECK(r.time() == running);
    };
    check_refused(CmosRtc::kRegB24Hour, CmosRtc::kSeconds, 0x60);
    check_refused(CmosRtc::kRegB24Hour, CmosRtc::kSeconds, 0x0a);  // not BCD
    check_refused(CmosRtc::kRegB24Hour, CmosRtc::kMinutes, 0xff);
    check_refused(CmosRtc::kRegB24Hour, CmosRtc::kHours, 0x24);
    check_refused(CmosRtc::kRegB24Hour, CmosRtc::kDayOfMonth, 0x00);
    check_refused(CmosRtc::kRegB24Hour, CmosRtc::kDayOfMonth, 0x32);
    check_refused(CmosRtc::kRegB24Hour, CmosRtc::kMonth, 0x13);
    check_refused(CmosRtc::kRegB24Hour, CmosRtc::kCentury, 0xa0);
    check_refused(CmosRtc::kRegB24Hour | CmosRtc::kRegBBinary, CmosRtc::kYear, 100);
    check_refused(CmosRtc::kRegB24Hour | CmosRtc::kRegBBinary, CmosRtc::kHours, 24);
    check_refused(0, CmosRtc::kHours, 0x13);  // 12-hour mode: 1-12
    check_refused(0, CmosRtc::kHours, 0x00 | CmosRtc::kHourPm);

    Rtc r;  // 30 February
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBSet);
    r.set(CmosRtc::kMonth, 0x02);
    r.set(CmosRtc::kDayOfMonth, 0x30);
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour);
    CHECK(r.time() == running);
}

TEST_CASE("cmos rtc: the other bytes are RAM, the alarm registers among them")
{
    Rtc r;
    const std::array<uint8_t, 3> alarms{CmosRtc::kSecondsAlarm, CmosRtc::kMinutesAlarm, CmosRtc::kHoursAlarm};
    for (uint8_t index : alarms)
        r.set(index, uint8_t(0xc0 + index));
    for (uint8_t index : alarms)
        CHECK(r.get(index) == 0xc0 + index);
    for (unsigned index = 0x0e; index < 128; ++index)
        if (index != CmosRtc::kCentury)
            r.set(uint8_t(index), uint8_t(index * 7 + 1));
    r.now += 1000;
    for (unsigned index = 0x0e; index < 128; ++index) {
        CAPTURE(index);
        if (index != CmosRtc::kCentury)
            CHECK(r.get(uint8_t(index)) == uint8_t(index * 7 + 1));
    }
}

TEST_CASE("cmos rtc: register C reports an ended update once per second and clears on read")
{
    Rtc r;
    CHECK(r.get(CmosRtc::kRegC) == 0);
    r.now += 1;
    CHECK(r.get(CmosRtc::kRegC) == CmosRtc::kRegCUpdateEnded);
    CHECK(r.get(CmosRtc::kRegC) == 0);
    r.set(CmosRtc::kRegC, 0xff);  // read-only
    CHECK(r.get(CmosRtc::kRegC) == 0);
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBUpdateIrqEnable);
    r.now += 5;
    CHECK(r.get(CmosRtc::kRegC) == (CmosRtc::kRegCIrq | CmosRtc::kRegCUpdateEnded));
    CHECK(r.get(CmosRtc::kRegC) == 0);
    r.set(CmosRtc::kRegB, CmosRtc::kRegB24Hour | CmosRtc::kRegBSet);  // no updates while SET holds the clock
    r.now += 5;
    CHECK(r.get(CmosRtc::kRegC) == 0);
}

TEST_CASE("cmos rtc: register D is read-only; register A keeps what is written but UIP")
{
    Rtc r;
    r.set(CmosRtc::kRegD, 0x00);
    CHECK(r.get(CmosRtc::kRegD) == CmosRtc::kRegDValidRam);
    r.set(CmosRtc::kRegA, 0xff);
    CHECK(r.get(CmosRtc::kRegA) == 0x7f);
    r.set(CmosRtc::kRegA, 0x26);
    CHECK(r.get(CmosRtc::kRegA) == 0x26);
}

TEST_CASE("cmos rtc: the index's bit 7 (NMI mask) is ignored")
{
    Rtc r;
    CHECK(r.get(0x80 | CmosRtc::kRegD) == CmosRtc::kRegDValidRam);
    CHECK(r.get(0x80 | CmosRtc::kSeconds) == 0x09);
    r.set(0xff, 0x5a);
    CHECK(r.get(0x7f) == 0x5a);
}

TEST_CASE("cmos rtc: wide and odd accesses go byte by byte; the index port reads as all ones")
{
    Rtc r;
    const std::array<uint8_t, 2> index_then_data{0x40, 0xa5};
    r.rtc.write(0, index_then_data);  // an outw to 0x70: index 0x40, then 0xa5 into it
    CHECK(r.get(0x40) == 0xa5);
    r.select(0x40);
    std::array<uint8_t, 2> both{};
    r.rtc.read(0, both);
    CHECK(both == std::array<uint8_t, 2>{0xff, 0xa5});
    std::array<uint8_t, 4> beyond{};
    r.rtc.read(1, beyond);  // the bus never sends this; the device still stays in its two ports
    CHECK(beyond == std::array<uint8_t, 4>{0xa5, 0xff, 0xff, 0xff});
    r.rtc.write(1, std::array<uint8_t, 3>{0x11, 0x22, 0x33});
    CHECK(r.get(0x40) == 0x11);
    r.rtc.read(0, std::span<uint8_t>());
    r.rtc.write(0, std::span<const uint8_t>());
    r.rtc.write(7, std::array<uint8_t, 1>{0x0d});
    CHECK(r.get(0x40) == 0x11);
}

TEST_CASE("cmos rtc: any value into any register, in any mode, on any clock, keeps every register readable")
{
    for (const int64_t start : {int64_t(0), int64_t(-1), kSunday20010909_014640, std::numeric_limits<int64_t>::min() / 2,
                                std::numeric_limits<int64_t>::max() / 2}) {
        Rtc r;
        r.now = start;
        for (unsigned reg_b = 0; reg_b < 256; reg_b += 0x11)
            for (unsigned index = 0; index < 128; ++index)
                for (unsigned value = 0; value < 256; value += 3) {
                    r.set(CmosRtc::kRegB, uint8_t(reg_b));
                    r.set(uint8_t(index), uint8_t(value));
                    r.set(CmosRtc::kRegB, uint8_t(reg_b & ~CmosRtc::kRegBSet));
                    (void)r.get(uint8_t(index));
                }
        for (unsigned index = 0; index < 128; ++index)
            (void)r.get(uint8_t(index));
        CHECK(r.get(CmosRtc::kRegD) == CmosRtc::kRegDValidRam);
    }
}
