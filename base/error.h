// Errors that end lkvm before or while it runs. Every one carries the single
// line the user sees: what is wrong and, where we know it, what to do.
#pragma once

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace lkvm {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// "what: strerror(errno)" for a failed system call.
inline Error sys_error(const std::string& what, int err = errno)
{
    return Error(what + ": " + std::strerror(err));
}

}  // namespace lkvm
