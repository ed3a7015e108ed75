// The host end of the guest's serial console: the terminal in raw mode while
// the guest runs (restored on every way out), the Ctrl-A x escape, a copy of
// the output in a log file (--console-log), and a watch on what the guest
// prints for the kernel's panic banner.
#pragma once

#include <termios.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/fd.h"

namespace lkvm {

// Opens (creating it, mode 0644) the --console-log file for appending.
// Throws lkvm::Error naming the file when it cannot.
Fd open_console_log(const std::string& path);

// Recognizes a kernel panic in console output, byte by byte. Pure: no I/O.
class PanicWatch {
public:
    enum class Event { kNone, kPanicStarted, kPanicEnded };
    Event feed(uint8_t byte);
    // "Kernel panic - not syncing: <reason>", once seen.
    const std::string& message() const { return message_; }
    bool panicked() const { return !message_.empty(); }

private:
    static constexpr size_t kMaxLine = 512;
    std::string line_;
    std::string message_;
};

// Splits host input into what goes to the guest and the Ctrl-A escapes meant
// for lkvm: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A. Pure: no I/O.
class EscapeFilter {
public:
    struct Result {
        std::string to_guest;
        bool quit = false;
    };
    Result feed(std::span<const uint8_t> input);

private:
    bool after_escape_ = false;
};

// Whether the guest has used its serial port: printed, or set up the UART as
// any booting kernel does, quiet or not. What --boot-timeout counts as
// progress; fed from every vCPU thread's port I/O.
class ConsoleActivity {
public:
    explicit ConsoleActivity(uint16_t uart_base) : uart_base_(uart_base) {}
    void port_io(uint16_t port)
    {
        if (port >= uart_base_ && port < uart_base_ + kUartPorts && !used())
            used_.store(true, std::memory_order_relaxed);
    }
    bool used() const { return used_.load(std::memory_order_relaxed); }

private:
    static constexpr unsigned kUartPorts = 8;
    uint16_t uart_base_;
    std::atomic<bool> used_{false};
};

// The --boot-timeout warning: the guest has not touched its serial console
// (printed, or set up the UART as a booting kernel does) for `seconds`;
// vcpu_states holds each vCPU's Vcpu::describe(), in index order.
std::string silent_console_warning(unsigned seconds, const std::vector<std::string>& vcpu_states);

class Console {
public:
    // Puts in_fd in raw mode when it is a terminal. Output also goes to
    // log_fd when it is >= 0; the caller keeps it open while the console lives.
    Console(int in_fd, int out_fd, int log_fd = -1);
    ~Console();
    Console(const Console&) = delete;
    Console& operator=(const Console&) = delete;

    // Guest output, from whichever vCPU thread drives the UART.
    // Returns what the panic watch saw in it.
    PanicWatch::Event output(uint8_t byte);
    std::optional<std::string> panic_message();

    // Puts the terminal back as it was; safe to call more than once.
    void restore();

private:
    int in_fd_, out_fd_, log_fd_;
    std::optional<termios> saved_termios_;
    int saved_flags_ = -1;
    std::mutex mutex_;
    PanicWatch panic_watch_;
};

}  // namespace lkvm
