// The control protocol's parsers: the request line a server reads from any
// client of its socket (parse_request), and the reply a client reads back
// (parse_reply, then the info and stat payloads). Bad input must come out as
// the parser's own error, never as another exception or a crash, and what
// parses must survive its formatter unchanged.
//
// Input: the line, without its '\n'.
#include <string_view>

#include "api/control.h"
#include "tests/fuzz/fuzz_input.h"

using namespace lkvm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    const std::string_view line(reinterpret_cast<const char*>(data), size);

    if (const auto request = parse_request(line))
        FUZZ_CHECK(parse_request(std::string_view(format_request(request.value())).substr(0, format_request(request.value()).size() - 1)).value() == request.value());
    else
        FUZZ_CHECK(format_error_reply(request.error()).ends_with("\n"));

    FUZZ_CHECK(percent_decode(percent_encode(line)) == line);
    try {
        const ControlReply reply = parse_reply(line);
        if (reply.ok) {
            try {
                const GuestInfo info = parse_guest_info(reply.text);
                FUZZ_CHECK(parse_guest_info(format_guest_info(info)) == info);
            } catch (const Error&) {
            }
            try {
                const StatSnapshot stats = parse_stat_payload(reply.text);
                FUZZ_CHECK(format_stat_payload(parse_stat_payload(format_stat_payload(stats))) ==
                           format_stat_payload(stats));
            } catch (const Error&) {
            }
        }
    } catch (const Error&) {
    }
    return 0;
}
