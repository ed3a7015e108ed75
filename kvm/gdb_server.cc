#include "kvm/gdb_server.h"

#include <boost/asio/write.hpp>

#include "base/error.h"
#include "base/log.h"

namespace lkvm {

using boost::asio::ip::tcp;

namespace {
tcp::endpoint endpoint_of(const std::string& host, uint16_t port)
{
    boost::system::error_code error;
    const auto address = boost::asio::ip::make_address(host, error);
    if (error)
        throw Error("--gdb: '" + host + "' is not an IP address; give --gdb [IP:]PORT, e.g. --gdb 1234 or --gdb 0.0.0.0:1234");
    return {address, port};
}
}  // namespace

GdbServer::GdbServer(boost::asio::io_context& io, const std::string& host, uint16_t port, GdbVm& vm)
    : vm_(vm), acceptor_(io)
{
    const tcp::endpoint endpoint = endpoint_of(host, port);
    boost::system::error_code error;
    acceptor_.open(endpoint.protocol(), error);
    if (!error)
        acceptor_.set_option(tcp::acceptor::reuse_address(true), error);
    if (!error)
        acceptor_.bind(endpoint, error);
    if (!error)
        acceptor_.listen(1, error);
    if (error)
        throw Error("--gdb: cannot listen on " + host + ":" + std::to_string(port) + ": " + error.message() +
                    "; choose another port");
    stub_.emplace(vm_);
    accept();
}

uint16_t GdbServer::port() const { return acceptor_.local_endpoint().port(); }

void GdbServer::accept()
{
    acceptor_.async_accept([this](const boost::system::error_code& error, tcp::socket socket) {
        if (error == boost::asio::error::operation_aborted)
            return;
        if (!error) {
            if (socket_) {
                socket.close();  // one gdb at a time
            } else {
                socket_.emplace(std::move(socket));
                socket_->set_option(tcp::no_delay(true));
                // gdb finds the guest stopped, as with qemu -s.
                vm_.stop_and_wait();
                vm_stopped_for_detached();
                stub_.emplace(vm_);
                attached_ = true;
                decoder_ = {};
                out_.clear();
                log_info("gdb connected from " + socket_->remote_endpoint().address().to_string() +
                         "; the guest is stopped until it continues");
                read();
            }
        }
        accept();
    });
}

void GdbServer::read()
{
    socket_->async_read_some(boost::asio::buffer(buffer_), [this](const boost::system::error_code& error, size_t n) {
        if (error) {
            if (error != boost::asio::error::operation_aborted) {
                log_info("gdb disconnected (" + error.message() + "); the guest runs on");
                detach();
                socket_.reset();
            }
            return;
        }
        inputs_.clear();
        decoder_.feed(std::span(buffer_.data(), n), inputs_);
        for (auto& input : inputs_)
            on_input(input);
        if (socket_)
            read();
    });
}

void GdbServer::on_input(GdbInput& input)
{
    switch (input.kind) {
    case GdbInput::Kind::kAck:
        return;
    case GdbInput::Kind::kNack:
        if (!last_packet_.empty())
            out_.push_back(last_packet_), write_next();
        return;
    case GdbInput::Kind::kBadPacket:
        out_.push_back("-");
        write_next();
        return;
    case GdbInput::Kind::kInterrupt:
        if (attached_ && stub_->running())
            vm_.interrupt();
        return;
    case GdbInput::Kind::kPacket:
        break;
    }
    out_.push_back("+");
    if (!attached_) {
        send("E16");  // after D: gdb only closes
        return;
    }
    log_debug("gdb: <- " + input.payload.substr(0, 80));
    const bool detaching = input.payload == "D";
    if (auto reply = stub_->handle(input.payload))
        send(std::move(*reply));
    else
        write_next();  // the '+'
    if (detaching) {
        attached_ = false;
        vm_.run_guest(GuestDebugSetup{}, -1);
    }
}

void GdbServer::send(std::string payload)
{
    log_debug("gdb: -> " + payload.substr(0, 80));
    last_packet_ = gdb_frame(payload);
    out_.push_back(last_packet_);
    write_next();
}

void GdbServer::write_next()
{
    // One write at a time; each completion starts the next.
    if (!socket_ || out_.empty() || writing_)
        return;
    writing_ = true;
    boost::asio::async_write(*socket_, boost::asio::buffer(out_.front()),
                             [this](const boost::system::error_code& error, size_t) {
                                 writing_ = false;
                                 if (error) {
                                     log_debug("gdb: write failed: " + error.message());
                                     return;  // the read side sees the connection go
                                 }
                                 out_.pop_front();
                                 write_next();
                             });
}

void GdbServer::vm_stopped()
{
    // A late notice: its stop was already dealt with, and the guest runs again.
    if (!vm_.debug_stopped())
        return;
    vm_.stop_and_wait();
    const auto exits = vm_.take_debug_exits();
    if (exits.empty())
        return;
    for (const auto& exit : exits)
        log_debug("gdb: vCPU " + std::to_string(exit.vcpu) + " stopped: exception " + std::to_string(exit.exception) +
                  " dr6 " + std::to_string(exit.dr6));
    if (auto reply = stub_->stopped(exits)) {
        if (attached_) {
            send(std::move(*reply));
            return;
        }
    }
    // Nothing for gdb (the guest's own int3s), or no gdb: the guest runs on.
    if (!attached_ || stub_->running())
        vm_.run_guest(attached_ ? stub_->debug_setup() : GuestDebugSetup{}, -1);
}

void GdbServer::vm_stopped_for_detached()
{
    // Exits still waiting from before (the guest's own int3s) go to it.
    const auto exits = vm_.take_debug_exits();
    if (!exits.empty())
        stub_->stopped(exits);
}

void GdbServer::detach()
{
    if (!attached_)
        return;
    attached_ = false;
    vm_.stop_and_wait();
    vm_stopped_for_detached();
    stub_->detach();
    vm_.run_guest(GuestDebugSetup{}, -1);
}

}  // namespace lkvm
