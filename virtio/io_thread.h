// A named thread running one Boost.Asio io_context (concurrency hint 1: its
// handlers never run concurrently, so what it owns needs no locks). Started
// by its owner and joined when the owner lets it go.
#pragma once

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <functional>
#include <string>
#include <thread>

namespace lkvm {

class IoThread {
public:
    explicit IoThread(std::string name);
    ~IoThread();
    IoThread(const IoThread&) = delete;
    IoThread& operator=(const IoThread&) = delete;

    boost::asio::io_context& context() { return io_; }
    const std::string& name() const { return name_; }
    bool is_current() const { return std::this_thread::get_id() == thread_.get_id(); }
    // Runs fn on this thread and returns when it has run (at once when already on it).
    void run_and_wait(const std::function<void()>& fn);

private:
    std::string name_;
    boost::asio::io_context io_{1};
    boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
    std::thread thread_;
};

}  // namespace lkvm
