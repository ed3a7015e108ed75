#include "kvm/console.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include "base/error.h"

namespace lkvm {

Fd open_console_log(const std::string& path)
{
    Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    if (!fd.valid())
        throw sys_error("--console-log " + path);
    return fd;
}

namespace {
constexpr uint8_t kCtrlA = 0x01;
constexpr std::string_view kPanicStart = "Kernel panic - not syncing";
constexpr std::string_view kPanicEnd = "---[ end Kernel panic";
}  // namespace

PanicWatch::Event PanicWatch::feed(uint8_t byte)
{
    if (byte != '\n') {
        if (byte != '\r' && line_.size() < kMaxLine)
            line_.push_back(static_cast<char>(byte));
        return Event::kNone;
    }
    Event event = Event::kNone;
    if (auto at = line_.find(kPanicEnd); at != std::string::npos) {
        event = Event::kPanicEnded;
    } else if (auto at2 = line_.find(kPanicStart); at2 != std::string::npos && message_.empty()) {
        message_ = line_.substr(at2);
        event = Event::kPanicStarted;
    }
    line_.clear();
    return event;
}

EscapeFilter::Result EscapeFilter::feed(std::span<const uint8_t> input)
{
    Result result;
    for (uint8_t c : input) {
        if (after_escape_) {
            after_escape_ = false;
            if (c == 'x' || c == 'X') {
                result.quit = true;
                return result;
            }
            result.to_guest.push_back(static_cast<char>(kCtrlA));
            if (c == kCtrlA)
                continue;
        } else if (c == kCtrlA) {
            after_escape_ = true;
            continue;
        }
        result.to_guest.push_back(static_cast<char>(c));
    }
    return result;
}

Console::Console(int in_fd, int out_fd, int log_fd) : in_fd_(in_fd), out_fd_(out_fd), log_fd_(log_fd)
{
    termios t{};
    if (::isatty(in_fd_) && ::tcgetattr(in_fd_, &t) == 0) {
        saved_termios_ = t;
        // Keep output processing so lkvm's own lines still end properly; the
        // guest gets every key, Ctrl-C included.
        t.c_iflag &= ~(ICRNL | IXON | IXOFF);
        t.c_lflag &= ~(ICANON | ECHO | ISIG | IEXTEN);
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        ::tcsetattr(in_fd_, TCSANOW, &t);
    }
    saved_flags_ = ::fcntl(in_fd_, F_GETFL);
}

Console::~Console()
{
    restore();
}

void Console::restore()
{
    if (saved_termios_)
        ::tcsetattr(in_fd_, TCSANOW, &*saved_termios_);
    // The main loop reads input non-blocking; the shell after us must not inherit that.
    if (saved_flags_ >= 0)
        ::fcntl(in_fd_, F_SETFL, saved_flags_);
}

std::string silent_console_warning(unsigned seconds, const std::vector<std::string>& vcpu_states)
{
    std::string line = "the guest has not touched its console in " + std::to_string(seconds) +
                       " s (--boot-timeout): it may be the wrong kernel, or a KVM that cannot run it (PVM, "
                       "nested without VT-x/AMD-V); still running;";
    for (size_t i = 0; i < vcpu_states.size(); ++i)
        line += (i ? ", vCPU " : " vCPU ") + std::to_string(i) + " at " + vcpu_states[i];
    return line;
}

PanicWatch::Event Console::output(uint8_t byte)
{
    std::lock_guard lock(mutex_);
    for (;;) {
        if (::write(out_fd_, &byte, 1) >= 0)
            break;
        if (errno == EAGAIN) {
            // Someone else made our stdout non-blocking: wait for room rather than drop output.
            pollfd p{out_fd_, POLLOUT, 0};
            ::poll(&p, 1, 100);
        } else if (errno != EINTR) {
            break;  // stdout is gone; the guest keeps running
        }
    }
    // Best effort, like stdout: a failed write (a full disk) loses log bytes; the guest keeps running.
    if (log_fd_ >= 0)
        while (::write(log_fd_, &byte, 1) < 0 && errno == EINTR) {
        }
    return panic_watch_.feed(byte);
}

std::optional<std::string> Console::panic_message()
{
    std::lock_guard lock(mutex_);
    if (!panic_watch_.panicked())
        return std::nullopt;
    return panic_watch_.message();
}

}  // namespace lkvm
