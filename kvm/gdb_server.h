// lkvm run --gdb [HOST:]PORT: one gdb at a time over TCP, on the main loop.
// While gdb is connected the guest is under its control (it stops on
// connect, as with qemu -s); when the connection ends, for whatever reason,
// our breakpoints come out and the guest runs on.
#pragma once

#include <boost/asio/ip/tcp.hpp>

#include <array>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "kvm/gdb_packet.h"
#include "kvm/gdb_stub.h"

namespace lkvm {

// The VM as the server drives it, beyond what the stub needs.
class GdbVm : public GdbTarget {
public:
    // Every vCPU out of the guest; returns once they all are.
    virtual void stop_and_wait() = 0;
    virtual bool debug_stopped() const = 0;
    // What made vCPUs stop since the last call.
    virtual std::vector<DebugExit> take_debug_exits() = 0;
};

class GdbServer {
public:
    // Listens at once; throws Error with the line to print when it cannot.
    GdbServer(boost::asio::io_context& io, const std::string& host, uint16_t port, GdbVm& vm);
    uint16_t port() const;
    // On the main loop, after vCPUs left the guest for the debugger.
    void vm_stopped();

private:
    void accept();
    void read();
    void on_input(GdbInput& input);
    void send(std::string payload);
    void write_next();
    // The connection ended: the guest runs on, undebugged.
    void detach();
    // Hands exits that came before gdb did, or after it left, to the stub
    // (which gives the guest its own int3s back).
    void vm_stopped_for_detached();

    GdbVm& vm_;
    boost::asio::ip::tcp::acceptor acceptor_;
    std::optional<boost::asio::ip::tcp::socket> socket_;
    std::optional<GdbStub> stub_;
    bool attached_ = false;
    GdbDecoder decoder_;
    std::vector<GdbInput> inputs_;
    std::array<uint8_t, 4096> buffer_{};
    std::deque<std::string> out_;  // framed, oldest first; out_.front() is being written
    bool writing_ = false;
    std::string last_packet_;      // for gdb's '-': sent again
};

}  // namespace lkvm
