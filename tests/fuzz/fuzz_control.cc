// The control protocol's parsers: a request line as the server reads it from
// any client (parse_request, then the machine's command parser), and a line
// as a client reads it from the server (parse_server_line, then the info and
// stat replies). Bad input must come out as the parser's own error, never as
// another exception or a crash; every line lkvm would write back must be one
// valid JSON text, whatever bytes went in; and what parses must survive its
// formatter unchanged.
//
// Input: the line, without its '\n'.
#include <string_view>

#include "api/machine_control.h"
#include "api/protocol.h"
#include "tests/fuzz/fuzz_input.h"

using namespace lkvm;

namespace {

bool one_json_line(const std::string& line)
{
    return line.ends_with('\n') && line.find('\n') == line.size() - 1 && Json::accept(line);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    const std::string_view line(reinterpret_cast<const char*>(data), size);

    if (const auto request = parse_request(line)) {
        const auto again = parse_request(request_line(request->command, request->arguments));
        FUZZ_CHECK(again.ok() && again->command == request->command && again->arguments == request->arguments);
        FUZZ_CHECK(one_json_line(return_line(request->arguments, request->id)));
        try {
            parse_machine_command(request.value());
        } catch (const Error& e) {  // ControlError too
            FUZZ_CHECK(one_json_line(error_line({ControlErrorClass::kGenericError, e.what(), request->id})));
        }
    } else {
        FUZZ_CHECK(one_json_line(error_line(request.error())));
    }

    try {
        const ServerLine server = parse_server_line(line);
        if (server.kind == ServerLine::Kind::kReturn) {
            try {
                const GuestInfo info = guest_info_from_json(server.body);
                FUZZ_CHECK(guest_info_from_json(Json::parse(json_line(info))) == info);
            } catch (const Error&) {
            }
            try {
                const StatSnapshot stats = stat_from_json(server.body);
                FUZZ_CHECK(stat_from_json(Json::parse(json_line(stats))) == stats);
            } catch (const Error&) {
            }
        }
    } catch (const Error&) {
    }

    // Any bytes, as a disk's path may be, still make one line of valid JSON.
    FUZZ_CHECK(one_json_line(json_line(Json{{"image", std::string(line)}})));
    return 0;
}
