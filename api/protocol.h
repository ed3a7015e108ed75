// The control protocol, QMP-like JSON lines over the control socket. Pure
// functions: what the server (api/control) and the client (cli/) send and
// read, each line one JSON object ending in '\n'.
//
//   server, on connect   {"lkvm": {"version": "0.1.0", "capabilities": ["events"]}}
//   client               {"execute": "stat", "arguments": {...}, "id": ANY}   (arguments, id: optional)
//   server               {"return": {...}, "id": ANY}
//                     or {"error": {"class": "GenericError", "desc": "..."}, "id": ANY}
//   server, once subscribed
//                        {"event": "paused", "timestamp": {"seconds": S, "microseconds": US}, "data": {...}}
//
// Readers ignore members they do not know, so replies and events can grow.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "base/result.h"
#include "kvm/stat_snapshot.h"

namespace lkvm {

// Members keep the order they were written in, as QMP shows them.
using Json = nlohmann::ordered_json;

constexpr size_t kMaxRequestBytes = 16384;  // one request line, '\n' included
constexpr size_t kMaxReplyBytes = 1 << 20;  // one line a client reads, '\n' included
constexpr int kMaxJsonDepth = 8;            // of arrays and objects in a line the server reads

// QMP's error classes, those lkvm answers with.
enum class ControlErrorClass { kGenericError, kCommandNotFound, kDeviceNotFound };
std::string_view error_class_name(ControlErrorClass error_class);

// What a command refuses with, when GenericError (any lkvm::Error) is not the class.
class ControlError : public Error {
public:
    ControlError(ControlErrorClass error_class, const std::string& desc) : Error(desc), class_(error_class) {}
    ControlErrorClass error_class() const { return class_; }

private:
    ControlErrorClass class_;
};

struct ControlRequest {
    std::string command;                // "execute"
    Json arguments = Json::object();    // "arguments": always an object
    std::optional<Json> id;             // "id", echoed in the reply
};

// Why a line is no request, with the id to echo when the line had one.
struct ControlFailure {
    ControlErrorClass error_class = ControlErrorClass::kGenericError;
    std::string desc;
    std::optional<Json> id;
};

// A JSON text, refused (with why) when it is not valid JSON (UTF-8 included)
// or nests arrays and objects deeper than max_depth.
Result<Json, std::string> parse_json(std::string_view text, int max_depth);

// A request line, without its '\n'.
Result<ControlRequest, ControlFailure> parse_request(std::string_view line);

// Every line lkvm writes, '\n' included. Bytes that are not UTF-8 (a disk's
// path may hold any) become U+FFFD: dump() then never throws, and every line
// is valid JSON.
std::string json_line(const Json& value);
std::string greeting_line();
std::string request_line(std::string_view command, const Json& arguments = Json::object());
std::string return_line(const Json& value, const std::optional<Json>& id);
std::string error_line(const ControlFailure& failure);
std::string event_line(std::string_view name, const Json& data, std::chrono::system_clock::time_point when);

// A line from the server, as a client reads it.
struct ServerLine {
    enum class Kind { kGreeting, kReturn, kError, kEvent } kind;
    Json body;          // the greeting's "lkvm", the "return" value, the "error" or the whole event
    std::string error;  // kError: "CLASS: desc"
};
// Throws Error when the line is not one of the protocol's.
ServerLine parse_server_line(std::string_view line);

// What `info` and `stat` return. Reading throws Error ("malformed reply from
// the guest: ...") for a missing member or one of the wrong type.
void to_json(Json& json, const GuestInfo& info);
void from_json(const Json& json, GuestInfo& info);
void to_json(Json& json, const StatSnapshot& snapshot);
void from_json(const Json& json, StatSnapshot& snapshot);
GuestInfo guest_info_from_json(const Json& json);
StatSnapshot stat_from_json(const Json& json);

}  // namespace lkvm
