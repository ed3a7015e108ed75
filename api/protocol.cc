#include "api/protocol.h"

#include <array>
#include <limits>
#include <utility>

#include "kvm/machine_config.h"

namespace lkvm {

namespace {

constexpr std::array<std::pair<ControlErrorClass, std::string_view>, 3> kErrorClasses{{
    {ControlErrorClass::kGenericError, "GenericError"},
    {ControlErrorClass::kCommandNotFound, "CommandNotFound"},
    {ControlErrorClass::kDeviceNotFound, "DeviceNotFound"},
}};

// nlohmann's messages start with "[json.exception.parse_error.101] ": the rest is for people.
std::string message_of(const Json::exception& e)
{
    const std::string_view what = e.what();
    const size_t end = what.find("] ");
    return std::string(end == std::string_view::npos ? what : what.substr(end + 2));
}

[[noreturn]] void malformed(const std::string& what) { throw Error("malformed reply from the guest: " + what); }

const Json& object_of(const Json& json, std::string_view what)
{
    if (!json.is_object())
        malformed(std::string(what) + " is not a JSON object");
    return json;
}

// A member of the type asked for, whole: an integer that does not fit T is refused, not cut.
template <typename T>
bool holds(const Json& value)
{
    if constexpr (std::is_same_v<T, std::string>) {
        return value.is_string();
    } else if constexpr (std::is_unsigned_v<T>) {
        return value.is_number_unsigned() && value.get<uint64_t>() <= std::numeric_limits<T>::max();
    } else {
        static_assert(std::is_signed_v<T> && std::is_integral_v<T>);
        if (value.is_number_unsigned())
            return value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
        return value.is_number_integer() && value.get<int64_t>() >= std::numeric_limits<T>::min() &&
               value.get<int64_t>() <= std::numeric_limits<T>::max();
    }
}

template <typename T>
T member(const Json& object, const std::string& key)
{
    const auto it = object.find(key);
    if (it == object.end())
        malformed("no \"" + key + "\"");
    if (!holds<T>(*it))
        malformed("\"" + key + "\" is not " + (std::is_same_v<T, std::string> ? "a string" : "an integer that fits"));
    return it->get<T>();
}

// For a member an older lkvm may not send.
template <typename T>
std::optional<T> optional_member(const Json& object, const std::string& key)
{
    if (!object.contains(key))
        return std::nullopt;
    return member<T>(object, key);
}

const Json& array_member(const Json& object, const std::string& key)
{
    const auto it = object.find(key);
    if (it == object.end() || !it->is_array())
        malformed("\"" + key + "\" is not an array");
    return *it;
}

// [[BUCKET, COUNT], ...]: non-empty buckets, ascending.
LatencyBuckets latency_from_json(const Json& json)
{
    LatencyBuckets buckets;
    if (!json.is_array())
        malformed("\"latency\" is not an array");
    for (const Json& pair : json) {
        if (!pair.is_array() || pair.size() != 2 || !holds<uint16_t>(pair[0]) || !holds<uint64_t>(pair[1]))
            malformed("\"latency\" is not a list of [BUCKET, COUNT]");
        const auto bucket = pair[0].get<uint16_t>();
        const auto count = pair[1].get<uint64_t>();
        if (bucket >= LatencyHistogram::kBuckets || count == 0 || (!buckets.empty() && bucket <= buckets.back().first))
            malformed("\"latency\" is not a list of [BUCKET, COUNT], ascending, none empty");
        buckets.emplace_back(bucket, count);
    }
    return buckets;
}

}  // namespace

std::string_view error_class_name(ControlErrorClass error_class)
{
    for (const auto& [known, name] : kErrorClasses)
        if (known == error_class)
            return name;
    return "GenericError";
}

Result<Json, std::string> parse_json(std::string_view text, int max_depth)
{
    // The callback sees each array and object as it opens, with the number
    // of those around it; refusing one drops it unbuilt, so a deep line
    // costs no memory before it is refused.
    bool too_deep = false;
    const Json::parser_callback_t within_depth = [&](int depth, Json::parse_event_t event, Json&) {
        if ((event == Json::parse_event_t::object_start || event == Json::parse_event_t::array_start) &&
            depth >= max_depth)
            too_deep = true;
        return !too_deep;
    };
    try {
        Json value = Json::parse(text, within_depth);
        if (too_deep)
            return fail("JSON nested deeper than " + std::to_string(max_depth) + " levels");
        return value;
    } catch (const Json::exception& e) {
        // Not only parse_error: a number too large for a double (1e400) is out_of_range.
        return fail("JSON parse error: " + message_of(e));
    }
}

Result<ControlRequest, ControlFailure> parse_request(std::string_view line)
{
    using enum ControlErrorClass;
    auto parsed = parse_json(line, kMaxJsonDepth);
    if (!parsed)
        return fail(ControlFailure{kGenericError, parsed.error(), std::nullopt});
    Json& json = parsed.value();
    if (!json.is_object())
        return fail(ControlFailure{kGenericError, "a request is a JSON object: {\"execute\": \"COMMAND\"}", std::nullopt});
    ControlRequest request;
    if (const auto id = json.find("id"); id != json.end())
        request.id = std::move(*id);
    const auto failure = [&](std::string desc) { return fail(ControlFailure{kGenericError, std::move(desc), request.id}); };
    for (const auto& [key, value] : json.items())
        if (key != "execute" && key != "arguments" && key != "id")
            return failure("member '" + key + "' is unexpected in a request (execute, arguments, id)");
    const auto execute = json.find("execute");
    if (execute == json.end())
        return failure("the request lacks member 'execute'");
    if (!execute->is_string())
        return failure("member 'execute' must be a string");
    request.command = execute->get<std::string>();
    if (const auto arguments = json.find("arguments"); arguments != json.end()) {
        if (!arguments->is_object())
            return failure("member 'arguments' must be an object");
        request.arguments = std::move(*arguments);
    }
    return request;
}

std::string json_line(const Json& value)
{
    return value.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

std::string greeting_line()
{
    return json_line({{"lkvm", {{"version", kVersion}, {"capabilities", Json::array({"events"})}}}});
}

std::string request_line(std::string_view command, const Json& arguments)
{
    Json request{{"execute", command}};
    if (!arguments.empty())
        request["arguments"] = arguments;
    return json_line(request);
}

std::string return_line(const Json& value, const std::optional<Json>& id)
{
    Json reply{{"return", value}};
    if (id)
        reply["id"] = *id;
    return json_line(reply);
}

std::string error_line(const ControlFailure& failure)
{
    Json reply{{"error", {{"class", error_class_name(failure.error_class)}, {"desc", failure.desc}}}};
    if (failure.id)
        reply["id"] = *failure.id;
    return json_line(reply);
}

std::string event_line(std::string_view name, const Json& data, std::chrono::system_clock::time_point when)
{
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(when.time_since_epoch()).count();
    return json_line({{"event", name},
                      {"timestamp", {{"seconds", us / 1'000'000}, {"microseconds", us % 1'000'000}}},
                      {"data", data}});
}

ServerLine parse_server_line(std::string_view line)
{
    auto parsed = parse_json(line, kMaxJsonDepth);
    if (!parsed || !parsed->is_object())
        throw Error("garbled reply from the guest");
    Json& json = parsed.value();
    if (const auto value = json.find("return"); value != json.end())
        return {ServerLine::Kind::kReturn, std::move(*value), ""};
    if (const auto error = json.find("error"); error != json.end()) {
        if (!error->is_object() || !error->value("desc", Json()).is_string())
            throw Error("garbled error reply from the guest");
        std::string desc = (*error)["desc"].get<std::string>();
        return {ServerLine::Kind::kError, std::move(*error), std::move(desc)};
    }
    if (json.contains("event"))
        return {ServerLine::Kind::kEvent, std::move(json), ""};
    if (const auto greeting = json.find("lkvm"); greeting != json.end() && greeting->is_object())
        return {ServerLine::Kind::kGreeting, std::move(*greeting), ""};
    throw Error("garbled reply from the guest");
}

// ---- What info and stat return.

void to_json(Json& json, const GuestInfo& info)
{
    json = {{"name", info.name}, {"state", info.state},     {"pid", info.pid},
            {"vcpus", info.vcpus}, {"mem_mib", info.mem_mib}, {"disks", info.disks}};
}

void from_json(const Json& json, GuestInfo& info)
{
    object_of(json, "the guest info");
    info.name = member<std::string>(json, "name");
    info.state = member<std::string>(json, "state");
    info.pid = member<int>(json, "pid");
    info.vcpus = member<unsigned>(json, "vcpus");
    info.mem_mib = member<uint64_t>(json, "mem_mib");
    info.disks.clear();
    for (const Json& disk : array_member(json, "disks")) {
        if (!disk.is_string())
            malformed("a disk is not a string");
        info.disks.push_back(disk.get<std::string>());
    }
}

void to_json(Json& json, const StatSnapshot& snapshot)
{
    json = {{"time_ns", snapshot.time_ns}, {"threads", Json::array()}, {"queues", Json::array()}, {"vcpus", Json::array()}};
    if (!snapshot.state.empty())
        json["state"] = snapshot.state;
    for (const auto& t : snapshot.threads)
        json["threads"].push_back({{"name", t.name},
                                   {"tid", t.tid},
                                   {"cpu", t.cpu},
                                   {"pinned_cpu", t.pinned_cpu},
                                   {"requests", t.requests},
                                   {"bytes", t.bytes},
                                   {"batches", t.batches},
                                   {"wakeups", t.wakeups},
                                   {"poll_hits", t.poll_hits},
                                   {"poll_ns", t.poll_ns},
                                   {"latency", t.latency}});
    for (const auto& q : snapshot.queues)
        json["queues"].push_back({{"disk", q.disk},
                                  {"queue", q.queue},
                                  {"thread", q.thread},
                                  {"image", q.image},
                                  {"cpu", q.cpu},
                                  {"requests", q.requests},
                                  {"bytes", q.bytes},
                                  {"in_flight", q.in_flight},
                                  {"latency", q.latency},
                                  {"kicks", q.kicks},
                                  {"interrupts", q.interrupts},
                                  {"errors", q.errors},
                                  {"throttled_ns", q.throttled_ns},
                                  {"flushes", q.flushes}});
    for (const auto& v : snapshot.vcpus) {
        Json vcpu{{"vcpu", v.index}};
        for (size_t i = 0; i < kVcpuCounterNames.size(); ++i)
            if (v.counters[i])  // a counter this kernel lacks is left out
                vcpu[std::string(kVcpuCounterNames[i])] = *v.counters[i];
        json["vcpus"].push_back(std::move(vcpu));
    }
}

void from_json(const Json& json, StatSnapshot& snapshot)
{
    object_of(json, "the statistics");
    snapshot = {};
    snapshot.time_ns = member<uint64_t>(json, "time_ns");
    snapshot.state = optional_member<std::string>(json, "state").value_or("");
    for (const Json& t : array_member(json, "threads")) {
        object_of(t, "a thread");
        snapshot.threads.push_back({member<std::string>(t, "name"), member<int>(t, "tid"), member<int>(t, "cpu"),
                                    optional_member<int>(t, "pinned_cpu").value_or(-1), member<uint64_t>(t, "requests"), member<uint64_t>(t, "bytes"),
                                    member<uint64_t>(t, "batches"), member<uint64_t>(t, "wakeups"),
                                    member<uint64_t>(t, "poll_hits"), member<uint64_t>(t, "poll_ns"),
                                    t.contains("latency") ? latency_from_json(t["latency"]) : LatencyBuckets{}});
    }
    for (const Json& q : array_member(json, "queues")) {
        object_of(q, "a queue");
        snapshot.queues.push_back({member<unsigned>(q, "disk"), member<unsigned>(q, "queue"),
                                   member<std::string>(q, "thread"), member<std::string>(q, "image"),
                                   member<int>(q, "cpu"), member<uint64_t>(q, "requests"), member<uint64_t>(q, "bytes"),
                                   member<uint64_t>(q, "in_flight"), latency_from_json(q.value("latency", Json())),
                                   member<uint64_t>(q, "kicks"), member<uint64_t>(q, "interrupts"),
                                   member<uint64_t>(q, "errors"), member<uint64_t>(q, "throttled_ns"),
                                   member<uint64_t>(q, "flushes")});
    }
    for (const Json& v : array_member(json, "vcpus")) {
        object_of(v, "a vCPU");
        StatSnapshot::Vcpu& vcpu = snapshot.vcpus.emplace_back();
        vcpu.index = member<unsigned>(v, "vcpu");
        for (size_t c = 0; c < kVcpuCounterNames.size(); ++c)
            vcpu.counters[c] = optional_member<uint64_t>(v, std::string(kVcpuCounterNames[c]));
    }
}

GuestInfo guest_info_from_json(const Json& json)
{
    GuestInfo info;
    from_json(json, info);
    return info;
}

StatSnapshot stat_from_json(const Json& json)
{
    StatSnapshot snapshot;
    from_json(json, snapshot);
    return snapshot;
}

}  // namespace lkvm
