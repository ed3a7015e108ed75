#include "hw/serial8250.h"

namespace lkvm {

namespace {
// Register offsets and bits (PC16550D data sheet).
enum : unsigned { kRbrThr = 0, kIer = 1, kIirFcr = 2, kLcr = 3, kMcr = 4, kLsr = 5, kMsr = 6, kScr = 7 };
constexpr uint8_t kIerRda = 0x01, kIerThre = 0x02;
constexpr uint8_t kIirNone = 0x01, kIirThre = 0x02, kIirRda = 0x04, kIirFifos = 0xc0;
constexpr uint8_t kFcrEnable = 0x01, kFcrClearRx = 0x02;
constexpr uint8_t kLcrDlab = 0x80;
constexpr uint8_t kMcrDtr = 0x01, kMcrRts = 0x02, kMcrOut1 = 0x04, kMcrOut2 = 0x08, kMcrLoop = 0x10;
constexpr uint8_t kLsrDr = 0x01, kLsrThre = 0x20, kLsrTemt = 0x40;
constexpr uint8_t kMsrCts = 0x10, kMsrDsr = 0x20, kMsrRi = 0x40, kMsrDcd = 0x80;
}  // namespace

Serial8250::Serial8250(IrqLine irq, Output output) : irq_(std::move(irq)), output_(std::move(output)) {}

void Serial8250::read(uint64_t offset, std::span<uint8_t> data)
{
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < data.size(); ++i)
        data[i] = read_reg(static_cast<unsigned>(offset + i));
    update_irq();
}

void Serial8250::write(uint64_t offset, std::span<const uint8_t> data)
{
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < data.size(); ++i)
        write_reg(static_cast<unsigned>(offset + i), data[i]);
    update_irq();
}

void Serial8250::receive(std::span<const uint8_t> bytes)
{
    std::lock_guard lock(mutex_);
    for (uint8_t b : bytes)
        if (rx_.size() < kRxCapacity)
            rx_.push_back(b);
    update_irq();
}

uint8_t Serial8250::iir() const
{
    const uint8_t fifos = (fcr_ & kFcrEnable) ? kIirFifos : 0;
    if ((ier_ & kIerRda) && !rx_.empty())
        return fifos | kIirRda;
    if ((ier_ & kIerThre) && thr_empty_irq_)
        return fifos | kIirThre;
    return fifos | kIirNone;
}

uint8_t Serial8250::read_reg(unsigned reg)
{
    const bool dlab = lcr_ & kLcrDlab;
    switch (reg) {
    case kRbrThr: {
        if (dlab)
            return dll_;
        if (rx_.empty())
            return 0;
        const uint8_t b = rx_.front();
        rx_.pop_front();
        return b;
    }
    case kIer:
        return dlab ? dlm_ : ier_;
    case kIirFcr: {
        const uint8_t value = iir();
        // Reading IIR while it reports THRE acknowledges that interrupt.
        if ((value & 0x0f) == kIirThre)
            thr_empty_irq_ = false;
        return value;
    }
    case kLcr:
        return lcr_;
    case kMcr:
        return mcr_;
    case kLsr:
        // We transmit at once, so the transmitter is always empty.
        return kLsrThre | kLsrTemt | (rx_.empty() ? 0 : kLsrDr);
    case kMsr:
        if (mcr_ & kMcrLoop) {
            // Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
            return ((mcr_ & kMcrRts) ? kMsrCts : 0) | ((mcr_ & kMcrDtr) ? kMsrDsr : 0) |
                   ((mcr_ & kMcrOut1) ? kMsrRi : 0) | ((mcr_ & kMcrOut2) ? kMsrDcd : 0);
        }
        return kMsrDcd | kMsrDsr | kMsrCts;
    case kScr:
        return scr_;
    }
    return 0xff;
}

void Serial8250::write_reg(unsigned reg, uint8_t value)
{
    const bool dlab = lcr_ & kLcrDlab;
    switch (reg) {
    case kRbrThr:
        if (dlab) {
            dll_ = value;
        } else {
            if (mcr_ & kMcrLoop) {
                if (rx_.size() < kRxCapacity)
                    rx_.push_back(value);
            } else {
                output_(value);
            }
            thr_empty_irq_ = true;
        }
        break;
    case kIer:
        if (dlab) {
            dlm_ = value;
        } else {
            // Enabling THRE while the transmitter is empty raises it at once.
            if ((value & kIerThre) && !(ier_ & kIerThre))
                thr_empty_irq_ = true;
            ier_ = value & 0x0f;
        }
        break;
    case kIirFcr:
        fcr_ = value & (kFcrEnable | 0xc0);
        if (value & kFcrClearRx)
            rx_.clear();
        break;
    case kLcr:
        lcr_ = value;
        break;
    case kMcr:
        mcr_ = value & 0x1f;
        break;
    case kScr:
        scr_ = value;
        break;
    default:  // LSR and MSR are read-only
        break;
    }
}

void Serial8250::update_irq()
{
    const bool high = (iir() & kIirNone) == 0;
    if (high != irq_high_) {
        irq_high_ = high;
        irq_(high);
    }
}

}  // namespace lkvm
