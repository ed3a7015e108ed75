#include "kvm/gdb_packet.h"

namespace lkvm {
namespace {
// The value of one hex digit (either case), or -1.
int hex_digit(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

// Undoes '}' escapes: the byte after '}' is XORed with 0x20. A packet that
// ends in a lone '}' is not well formed.
bool unescape(std::string& body)
{
    size_t out = 0;
    for (size_t i = 0; i < body.size(); ++i) {
        if (body[i] == '}') {
            if (++i == body.size())
                return false;
            body[out++] = static_cast<char>(body[i] ^ 0x20);
        } else {
            body[out++] = body[i];
        }
    }
    body.resize(out);
    return true;
}
}  // namespace

void GdbDecoder::feed(std::span<const uint8_t> bytes, std::vector<GdbInput>& out)
{
    for (const uint8_t c : bytes) {
        switch (state_) {
        case State::kIdle:
            if (c == '$') {
                body_.clear();
                sum_ = 0;
                too_long_ = false;
                state_ = State::kBody;
            } else if (c == 0x03) {
                out.push_back({GdbInput::Kind::kInterrupt, {}});
            } else if (c == '+') {
                out.push_back({GdbInput::Kind::kAck, {}});
            } else if (c == '-') {
                out.push_back({GdbInput::Kind::kNack, {}});
            }
            break;
        case State::kBody:
            if (c == '#') {
                state_ = State::kChecksumHigh;
            } else if (c == '$') {
                // A new packet before this one ended: gdb gave up on it.
                out.push_back({GdbInput::Kind::kBadPacket, {}});
                body_.clear();
                sum_ = 0;
                too_long_ = false;
            } else {
                sum_ = static_cast<uint8_t>(sum_ + c);
                if (body_.size() < kGdbMaxPacket)
                    body_.push_back(static_cast<char>(c));
                else
                    too_long_ = true;
            }
            break;
        case State::kChecksumHigh:
            checksum_high_ = hex_digit(c);
            state_ = State::kChecksumLow;
            break;
        case State::kChecksumLow: {
            state_ = State::kIdle;
            const int low = hex_digit(c);
            const bool sum_ok = checksum_high_ >= 0 && low >= 0 && (checksum_high_ << 4 | low) == sum_;
            if (!sum_ok || too_long_ || !unescape(body_))
                out.push_back({GdbInput::Kind::kBadPacket, {}});
            else
                out.push_back({GdbInput::Kind::kPacket, std::move(body_)});
            body_.clear();
            break;
        }
        }
    }
}

std::string gdb_frame(std::string_view payload)
{
    std::string framed = "$";
    uint8_t sum = 0;
    auto put = [&](char c) {
        framed.push_back(c);
        sum = static_cast<uint8_t>(sum + static_cast<uint8_t>(c));
    };
    for (const char c : payload) {
        if (c == '$' || c == '#' || c == '}' || c == '*') {
            put('}');
            put(static_cast<char>(c ^ 0x20));
        } else {
            put(c);
        }
    }
    static constexpr char kDigits[] = "0123456789abcdef";
    framed.push_back('#');
    framed.push_back(kDigits[sum >> 4]);
    framed.push_back(kDigits[sum & 15]);
    return framed;
}

std::string to_hex(std::span<const uint8_t> bytes)
{
    static constexpr char kDigits[] = "0123456789abcdef";
    std::string hex;
    hex.reserve(2 * bytes.size());
    for (const uint8_t b : bytes) {
        hex.push_back(kDigits[b >> 4]);
        hex.push_back(kDigits[b & 15]);
    }
    return hex;
}

bool from_hex(std::string_view hex, std::vector<uint8_t>& out)
{
    if (hex.size() % 2)
        return false;
    out.clear();
    out.reserve(hex.size() / 2);
    for (size_t i = 0; i < hex.size(); i += 2) {
        const int high = hex_digit(static_cast<uint8_t>(hex[i]));
        const int low = hex_digit(static_cast<uint8_t>(hex[i + 1]));
        if (high < 0 || low < 0)
            return false;
        out.push_back(static_cast<uint8_t>(high << 4 | low));
    }
    return true;
}

bool parse_hex_number(std::string_view hex, uint64_t& out)
{
    if (hex.empty() || hex.size() > 16)
        return false;
    out = 0;
    for (const char c : hex) {
        const int d = hex_digit(static_cast<uint8_t>(c));
        if (d < 0)
            return false;
        out = out << 4 | static_cast<uint64_t>(d);
    }
    return true;
}

}  // namespace lkvm
