// A 16550A UART (the PC's COM1): what Linux's 8250 driver and its early
// console need — divisor latch, FIFOs, line/modem status, loopback, and the
// receive-data and transmitter-empty interrupts on a level-triggered line.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <span>

#include "hw/bus.h"

namespace lkvm {

class Serial8250 : public BusDevice {
public:
    static constexpr uint16_t kCom1Base = 0x3f8;
    static constexpr uint8_t kCom1Irq = 4;
    static constexpr size_t kRxCapacity = 64 * 1024;

    using IrqLine = std::function<void(bool high)>;
    using Output = std::function<void(uint8_t byte)>;

    Serial8250(IrqLine irq, Output output);

    void read(uint64_t offset, std::span<uint8_t> data) override;
    void write(uint64_t offset, std::span<const uint8_t> data) override;

    // Bytes typed on the host; what does not fit in the receive buffer is dropped.
    void receive(std::span<const uint8_t> bytes);

private:
    uint8_t read_reg(unsigned reg);
    void write_reg(unsigned reg, uint8_t value);
    void update_irq();
    uint8_t iir() const;

    std::mutex mutex_;
    IrqLine irq_;
    Output output_;
    std::deque<uint8_t> rx_;
    uint8_t ier_ = 0, lcr_ = 0, mcr_ = 0, scr_ = 0, fcr_ = 0;
    uint8_t dll_ = 0x0c, dlm_ = 0;  // 9600 baud
    bool thr_empty_irq_ = false;    // THRE interrupt pending until IIR read or THR written
    bool irq_high_ = false;
};

}  // namespace lkvm
