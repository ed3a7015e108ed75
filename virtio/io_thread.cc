#include "virtio/io_thread.h"

#include <pthread.h>

#include <boost/asio/post.hpp>
#include <exception>
#include <future>

#include "base/log.h"

namespace lkvm {

IoThread::IoThread(std::string name)
    : name_(std::move(name)), work_(boost::asio::make_work_guard(io_)), thread_([this] {
          ::pthread_setname_np(::pthread_self(), name_.substr(0, 15).c_str());
          try {
              io_.run();
          } catch (const std::exception& e) {
              // A handler threw: nothing a guest does should get here; say so and stop this thread's work.
              log_line(name_ + ": " + e.what());
          }
      })
{
}

IoThread::~IoThread()
{
    work_.reset();
    io_.stop();
    if (thread_.joinable())
        thread_.join();
}

void IoThread::run_and_wait(const std::function<void()>& fn)
{
    if (is_current()) {
        fn();
        return;
    }
    std::promise<void> done;
    boost::asio::post(io_, [&] {
        try {
            fn();
            done.set_value();
        } catch (...) {
            done.set_exception(std::current_exception());
        }
    });
    done.get_future().get();
}

}  // namespace lkvm
