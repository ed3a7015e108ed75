// The small platform devices that end a guest's life: the i8042 controller's
// reset line, the ACPI hardware-reduced sleep and reset registers, and lkvm's
// own exit-status port that the guest init writes its command's status to.
// Each reports what the guest asked for through one callback.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <span>

#include "hw/bus.h"

namespace lkvm {

enum class GuestRequest { kReset, kPowerOff };

using GuestRequestSink = std::function<void(GuestRequest)>;

// Ports 0x60 (data) and 0x64 (status/command). Enough of an 8042 for Linux's
// reboot path (command 0xfe pulses the CPU reset line) and for its probe to
// find a controller with nothing attached, quickly.
class I8042 : public BusDevice {
public:
    static constexpr uint16_t kDataPort = 0x60;
    static constexpr uint16_t kCommandPort = 0x64;

    explicit I8042(GuestRequestSink sink) : sink_(std::move(sink)) {}
    void read(uint64_t offset, std::span<uint8_t> data) override;
    void write(uint64_t offset, std::span<const uint8_t> data) override;
    // The bus registers the device at 0x60 with size 5 so one device covers both ports.
    static constexpr uint64_t kSpan = 5;

private:
    std::mutex mutex_;
    GuestRequestSink sink_;
    std::optional<uint8_t> output_;   // byte waiting in the output buffer
    uint8_t command_byte_ = 0x30;     // both ports' clocks disabled, no interrupts
    bool expect_command_byte_ = false;
};

// Hardware-reduced ACPI registers (FADT SLEEP_CONTROL_REG, SLEEP_STATUS_REG,
// RESET_REG) and the exit-status port, one byte each from kBase.
class PowerControl : public BusDevice {
public:
    static constexpr uint16_t kBase = 0x600;
    static constexpr uint16_t kSleepControl = 0x600;
    static constexpr uint16_t kSleepStatus = 0x601;
    static constexpr uint16_t kReset = 0x602;
    static constexpr uint16_t kExitStatus = 0x603;
    static constexpr uint64_t kSpan = 4;
    static constexpr uint8_t kResetValue = 0x01;
    static constexpr uint8_t kS5SleepType = 5;  // the DSDT's \_S5 package says 5

    using ExitSink = std::function<void(uint8_t status)>;

    PowerControl(GuestRequestSink sink, ExitSink exit) : sink_(std::move(sink)), exit_(std::move(exit)) {}
    void read(uint64_t offset, std::span<uint8_t> data) override;
    void write(uint64_t offset, std::span<const uint8_t> data) override;

private:
    GuestRequestSink sink_;
    ExitSink exit_;
};

}  // namespace lkvm
