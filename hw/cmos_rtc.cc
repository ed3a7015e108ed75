#include "hw/cmos_rtc.h"

#include <algorithm>
#include <chrono>

namespace lkvm {

namespace {
constexpr uint8_t kNmiMask = 0x80;  // bit 7 of the index port: ours has no NMI to mask
constexpr uint64_t kDataOffset = CmosRtc::kDataPort - CmosRtc::kIndexPort;
constexpr uint8_t kRegAReset = 0x26;  // 32.768 kHz time base, 1024 Hz periodic rate
constexpr int64_t kSecondsPerDay = 86400;
// The years the registers can name (century 00-99): guest_now() stays inside
// them, and so the calendar arithmetic never leaves its range.
constexpr int64_t kFirstSecond = -62167219200;  // 0000-01-01 00:00:00
constexpr int64_t kLastSecond = 253402300799;   // 9999-12-31 23:59:59

struct CivilTime {
    int year;
    unsigned month, day, hour, minute, second;
    unsigned weekday;  // 1 (Sunday) to 7, as the MC146818 counts
};

CivilTime civil_from_seconds(int64_t t)
{
    using namespace std::chrono;
    t = std::clamp(t, kFirstSecond, kLastSecond);
    int64_t day_number = t / kSecondsPerDay;
    int64_t second_of_day = t % kSecondsPerDay;
    if (second_of_day < 0) {
        second_of_day += kSecondsPerDay;
        --day_number;
    }
    const sys_days day{days{day_number}};
    const year_month_day date{day};
    return {int(date.year()), unsigned(date.month()), unsigned(date.day()), unsigned(second_of_day / 3600),
            unsigned(second_of_day / 60 % 60), unsigned(second_of_day % 60), weekday{day}.c_encoding() + 1};
}

bool binary_mode(uint8_t reg_b) { return reg_b & CmosRtc::kRegBBinary; }

// value is 0-99.
uint8_t encode(unsigned value, uint8_t reg_b)
{
    return binary_mode(reg_b) ? uint8_t(value) : uint8_t((value / 10) << 4 | value % 10);
}

// -1 for a BCD byte with a nibble above 9.
int decode(uint8_t value, uint8_t reg_b)
{
    if (binary_mode(reg_b))
        return value;
    const int high = value >> 4, low = value & 0x0f;
    return high > 9 || low > 9 ? -1 : high * 10 + low;
}

uint8_t encode_hour(unsigned hour, uint8_t reg_b)
{
    if (reg_b & CmosRtc::kRegB24Hour)
        return encode(hour, reg_b);
    const unsigned hour12 = hour % 12 == 0 ? 12 : hour % 12;
    return encode(hour12, reg_b) | (hour >= 12 ? CmosRtc::kHourPm : 0);
}

// 0-23, or -1 when value names no hour.
int decode_hour(uint8_t value, uint8_t reg_b)
{
    if (reg_b & CmosRtc::kRegB24Hour) {
        const int hour = decode(value, reg_b);
        return hour <= 23 ? hour : -1;
    }
    const int hour12 = decode(value & ~CmosRtc::kHourPm, reg_b);
    if (hour12 < 1 || hour12 > 12)
        return -1;
    return hour12 % 12 + (value & CmosRtc::kHourPm ? 12 : 0);
}

bool is_time_register(uint8_t index)
{
    switch (index) {
    case CmosRtc::kSeconds: case CmosRtc::kMinutes: case CmosRtc::kHours: case CmosRtc::kDayOfWeek:
    case CmosRtc::kDayOfMonth: case CmosRtc::kMonth: case CmosRtc::kYear: case CmosRtc::kCentury:
        return true;
    default:
        return false;
    }
}

uint8_t time_field(uint8_t index, const CivilTime& now, uint8_t reg_b)
{
    switch (index) {
    case CmosRtc::kSeconds: return encode(now.second, reg_b);
    case CmosRtc::kMinutes: return encode(now.minute, reg_b);
    case CmosRtc::kHours: return encode_hour(now.hour, reg_b);
    case CmosRtc::kDayOfWeek: return encode(now.weekday, reg_b);
    case CmosRtc::kDayOfMonth: return encode(now.day, reg_b);
    case CmosRtc::kMonth: return encode(now.month, reg_b);
    case CmosRtc::kYear: return encode(unsigned(now.year % 100), reg_b);
    case CmosRtc::kCentury: return encode(unsigned(now.year / 100), reg_b);
    default: return 0;
    }
}
}  // namespace

int64_t CmosRtc::host_clock()
{
    using namespace std::chrono;
    return floor<seconds>(system_clock::now()).time_since_epoch().count();
}

CmosRtc::CmosRtc(Clock clock) : clock_(std::move(clock)), last_update_seen_(clock_())
{
    cmos_[kRegA] = kRegAReset;
    cmos_[kRegB] = kRegB24Hour;  // BCD, 24-hour, no interrupts: what PC firmware leaves
}

void CmosRtc::read(uint64_t offset, std::span<uint8_t> data)
{
    std::lock_guard lock(mutex_);
    // A wider access is split into byte cycles, one port each, as the ISA bridge does.
    for (auto& byte : data)
        byte = offset++ == kDataOffset ? read_register(index_) : 0xff;  // the index port is write-only
}

void CmosRtc::write(uint64_t offset, std::span<const uint8_t> data)
{
    std::lock_guard lock(mutex_);
    for (const uint8_t byte : data) {
        if (offset == 0)
            index_ = byte & ~kNmiMask;
        else if (offset == kDataOffset)
            write_register(index_, byte);
        ++offset;
    }
}

uint8_t CmosRtc::read_register(uint8_t index)
{
    const uint8_t reg_b = cmos_[kRegB];
    if (is_time_register(index))
        return reg_b & kRegBSet ? cmos_[index] : time_field(index, civil_from_seconds(guest_now()), reg_b);
    switch (index) {
    case kRegA:
        return cmos_[kRegA] & ~kRegAUpdateInProgress;  // no update is ever half done
    case kRegC: {
        // An update cycle ends every second unless SET holds the clock; reading clears the flags.
        const int64_t now = clock_();
        const bool updated = !(reg_b & kRegBSet) && now != last_update_seen_;
        last_update_seen_ = now;
        if (!updated)
            return 0;
        return kRegCUpdateEnded | (reg_b & kRegBUpdateIrqEnable ? kRegCIrq : 0);
    }
    case kRegD:
        return kRegDValidRam;  // the battery is always good
    default:
        return cmos_[index];
    }
}

void CmosRtc::write_register(uint8_t index, uint8_t value)
{
    const uint8_t reg_b = cmos_[kRegB];
    if (is_time_register(index)) {
        if (reg_b & kRegBSet) {
            cmos_[index] = value;  // taken when SET is cleared
            return;
        }
        // A running clock takes one field at once, the others staying as they are.
        latch_time();
        cmos_[index] = value;
        commit_time();
        return;
    }
    switch (index) {
    case kRegA:
        cmos_[kRegA] = value & ~kRegAUpdateInProgress;
        break;
    case kRegB:
        if (value & kRegBSet)
            value &= ~kRegBUpdateIrqEnable;  // as the MC146818 does
        cmos_[kRegB] = value;
        if (!(reg_b & kRegBSet) && (value & kRegBSet))
            latch_time();  // the guest reads the frozen time, and fields it does not write keep it
        else if ((reg_b & kRegBSet) && !(value & kRegBSet))
            commit_time();
        break;
    case kRegC:
    case kRegD:
        break;  // read-only
    default:
        cmos_[index] = value;
        break;
    }
}

void CmosRtc::latch_time()
{
    const uint8_t reg_b = cmos_[kRegB];
    const CivilTime now = civil_from_seconds(guest_now());
    for (const uint8_t index : {kSeconds, kMinutes, kHours, kDayOfWeek, kDayOfMonth, kMonth, kYear, kCentury})
        cmos_[index] = time_field(index, now, reg_b);
}

bool CmosRtc::commit_time()
{
    using namespace std::chrono;
    const uint8_t reg_b = cmos_[kRegB];
    const int second = decode(cmos_[kSeconds], reg_b), minute = decode(cmos_[kMinutes], reg_b);
    const int hour = decode_hour(cmos_[kHours], reg_b);
    const int day = decode(cmos_[kDayOfMonth], reg_b), month = decode(cmos_[kMonth], reg_b);
    const int year = decode(cmos_[kYear], reg_b), century = decode(cmos_[kCentury], reg_b);
    // The day of the week is not checked: the clock works it out from the date.
    if (second < 0 || second > 59 || minute < 0 || minute > 59 || hour < 0 || day < 1 || day > 31 || month < 1 ||
        month > 12 || year < 0 || year > 99 || century < 0 || century > 99)
        return false;
    const year_month_day date{std::chrono::year{century * 100 + year}, std::chrono::month{unsigned(month)},
                              std::chrono::day{unsigned(day)}};
    if (!date.ok())
        return false;  // 31 April, 29 February of a common year
    const int64_t t = sys_days{date}.time_since_epoch().count() * kSecondsPerDay + hour * 3600 + minute * 60 + second;
    offset_ = t - clock_();
    return true;
}

}  // namespace lkvm
