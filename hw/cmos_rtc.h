// The PC's CMOS real-time clock (a Motorola MC146818): index port 0x70, data
// port 0x71, 128 bytes of which the first 14 are the clock and its control
// registers and the rest battery-backed RAM. The clock is the host's (UTC,
// as Linux guests assume), plus the offset the guest sets by writing the time.
//
// Interrupts (IRQ 8: update-ended, alarm, periodic) are not raised; register C
// reports the update-ended flag to a guest that polls it.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>

#include "hw/bus.h"

namespace lkvm {

class CmosRtc : public BusDevice {
public:
    static constexpr uint16_t kIndexPort = 0x70;
    static constexpr uint16_t kDataPort = 0x71;
    static constexpr uint64_t kSpan = 2;

    // Register indexes and bits a guest (and the tests) name.
    static constexpr uint8_t kSeconds = 0x00, kSecondsAlarm = 0x01, kMinutes = 0x02, kMinutesAlarm = 0x03;
    static constexpr uint8_t kHours = 0x04, kHoursAlarm = 0x05, kDayOfWeek = 0x06, kDayOfMonth = 0x07;
    static constexpr uint8_t kMonth = 0x08, kYear = 0x09, kCentury = 0x32;
    static constexpr uint8_t kRegA = 0x0a, kRegB = 0x0b, kRegC = 0x0c, kRegD = 0x0d;
    static constexpr uint8_t kRegAUpdateInProgress = 0x80;
    static constexpr uint8_t kRegBSet = 0x80, kRegBUpdateIrqEnable = 0x10, kRegBBinary = 0x04, kRegB24Hour = 0x02;
    static constexpr uint8_t kRegCIrq = 0x80, kRegCUpdateEnded = 0x10;
    static constexpr uint8_t kRegDValidRam = 0x80;
    static constexpr uint8_t kHourPm = 0x80;

    // Seconds since the Unix epoch, UTC: the host's clock, a fake one in tests.
    using Clock = std::function<int64_t()>;
    static int64_t host_clock();

    explicit CmosRtc(Clock clock = host_clock);

    void read(uint64_t offset, std::span<uint8_t> data) override;
    void write(uint64_t offset, std::span<const uint8_t> data) override;

private:
    uint8_t read_register(uint8_t index);
    void write_register(uint8_t index, uint8_t value);
    // Writes the clock's current time into the time registers, in register B's format.
    void latch_time();
    // Takes the time registers as the guest's new time; false (clock unchanged) if one is out of range.
    bool commit_time();
    int64_t guest_now() const { return clock_() + offset_; }

    std::mutex mutex_;
    Clock clock_;
    int64_t offset_ = 0;            // guest time minus host time, seconds
    int64_t last_update_seen_;      // the guest second at the last read of register C
    uint8_t index_ = 0;
    std::array<uint8_t, 128> cmos_{};
};

}  // namespace lkvm
