#include "hw/platform.h"

#include <algorithm>

namespace lkvm {

namespace {
constexpr uint8_t kStatusOutputFull = 0x01;
constexpr uint8_t kStatusSystemFlag = 0x04;
constexpr uint8_t kCmdReadCommandByte = 0x20, kCmdWriteCommandByte = 0x60;
constexpr uint8_t kCmdAuxTest = 0xa9, kCmdSelfTest = 0xaa, kCmdKbdTest = 0xab;
constexpr uint8_t kCmdPulseReset = 0xfe;
}  // namespace

void I8042::read(uint64_t offset, std::span<uint8_t> data)
{
    std::lock_guard lock(mutex_);
    std::fill(data.begin(), data.end(), 0);
    if (data.empty())
        return;
    if (offset == kCommandPort - kDataPort) {
        data[0] = kStatusSystemFlag | (output_ ? kStatusOutputFull : 0);
    } else if (offset == 0) {
        data[0] = output_.value_or(0);
        output_.reset();
    }
}

void I8042::write(uint64_t offset, std::span<const uint8_t> data)
{
    if (data.empty())
        return;
    const uint8_t value = data[0];
    bool reset = false;
    {
        std::lock_guard lock(mutex_);
        if (offset == kCommandPort - kDataPort) {
            expect_command_byte_ = false;
            switch (value) {
            case kCmdReadCommandByte: output_ = command_byte_; break;
            case kCmdWriteCommandByte: expect_command_byte_ = true; break;
            case kCmdSelfTest: output_ = 0x55; break;
            case kCmdKbdTest: output_ = 0x00; break;
            case kCmdAuxTest: output_ = 0xff; break;  // no aux port
            case kCmdPulseReset: reset = true; break;
            default: break;
            }
        } else if (offset == 0 && expect_command_byte_) {
            command_byte_ = value;
            expect_command_byte_ = false;
        }
        // Bytes for the keyboard itself go nowhere: no keyboard is attached.
    }
    if (reset)
        sink_(GuestRequest::kReset);
}

void PowerControl::read(uint64_t, std::span<uint8_t> data)
{
    std::fill(data.begin(), data.end(), 0);
}

void PowerControl::write(uint64_t offset, std::span<const uint8_t> data)
{
    if (data.size() != 1)
        return;
    const uint8_t value = data[0];
    switch (kBase + offset) {
    case kSleepControl: {
        // SLP_EN (bit 5) with SLP_TYPx (bits 4:2) naming S5 is a power-off.
        const bool sleep_enable = value & 0x20;
        const unsigned sleep_type = (value >> 2) & 7;
        if (sleep_enable && sleep_type == kS5SleepType)
            sink_(GuestRequest::kPowerOff);
        break;
    }
    case kReset:
        if (value == kResetValue)
            sink_(GuestRequest::kReset);
        break;
    case kExitStatus:
        exit_(value);
        break;
    default:
        break;
    }
}

}  // namespace lkvm
