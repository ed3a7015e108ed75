// The value of one hex digit (either case), or -1: what the control
// protocol's percent-decoding and gdb's remote protocol both parse.
#pragma once

namespace lkvm {

constexpr int hex_digit_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

}  // namespace lkvm
