// gdb's remote serial protocol on the wire: "$payload#cs" packets, '+'/'-'
// acknowledgements, and the 0x03 byte that stands for Ctrl-C. No meaning
// here, only framing: unit-tested and fuzzed alone (tests/fuzz/fuzz_gdb.cc).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lkvm {

// The largest packet we take, as told to gdb in qSupported (PacketSize).
constexpr size_t kGdbMaxPacket = 16384;

struct GdbInput {
    enum class Kind {
        kPacket,       // payload: the packet, '}' escapes undone
        kBadPacket,    // a wrong checksum, or longer than kGdbMaxPacket: answer '-'
        kInterrupt,    // Ctrl-C
        kAck,
        kNack,
    };
    Kind kind;
    std::string payload;
};

// Splits what gdb sends into packets, acks and interrupts; bytes between
// packets that are none of those are skipped, as gdb's own stubs do.
class GdbDecoder {
public:
    void feed(std::span<const uint8_t> bytes, std::vector<GdbInput>& out);

private:
    enum class State { kIdle, kBody, kChecksumHigh, kChecksumLow };
    State state_ = State::kIdle;
    std::string body_;
    uint8_t sum_ = 0;
    int checksum_high_ = 0;
    bool too_long_ = false;
};

// "$payload#cs", with '$', '#', '}' and '*' escaped.
std::string gdb_frame(std::string_view payload);

// Hex as the protocol writes it: two lowercase digits per byte.
std::string to_hex(std::span<const uint8_t> bytes);
// Decodes an even number of hex digits; false on anything else.
bool from_hex(std::string_view hex, std::vector<uint8_t>& out);
// A hex number (up to 64 bits, no sign); false when empty, too long or not hex.
bool parse_hex_number(std::string_view hex, uint64_t& out);

}  // namespace lkvm
