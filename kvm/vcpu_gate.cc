#include "kvm/vcpu_gate.h"

namespace lkvm {

void VcpuGate::set_threads(unsigned count)
{
    std::lock_guard lock(mutex_);
    in_loop_ = count;
}

void VcpuGate::park(unsigned index, const std::function<void()>& on_release)
{
    std::unique_lock lock(mutex_);
    ++parked_;
    changed_.notify_all();
    changed_.wait(lock, [this, index] { return !held(index) || stopping_; });
    --parked_;
    if (!stopping_)
        on_release();
}

void VcpuGate::leave()
{
    std::lock_guard lock(mutex_);
    --in_loop_;
    changed_.notify_all();  // pause() no longer waits for this one
}

void VcpuGate::pause()
{
    std::unique_lock lock(mutex_);
    if (paused_ || stopping_)
        return;
    paused_.store(true, std::memory_order_release);
    kick_();
    changed_.wait(lock, [this] { return parked_ == in_loop_; });
}

void VcpuGate::resume()
{
    std::lock_guard lock(mutex_);
    paused_.store(false, std::memory_order_release);
    changed_.notify_all();
}

void VcpuGate::debug_stop()
{
    std::lock_guard lock(mutex_);
    only_.store(-1, std::memory_order_release);
    if (debug_stopped_.exchange(true, std::memory_order_acq_rel) || stopping_)
        return;
    kick_();
}

void VcpuGate::wait_parked()
{
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [this] { return parked_ == in_loop_ || stopping_; });
}

void VcpuGate::debug_resume(int only)
{
    std::lock_guard lock(mutex_);
    only_.store(only, std::memory_order_release);
    debug_stopped_.store(false, std::memory_order_release);
    changed_.notify_all();
}

void VcpuGate::stop()
{
    std::lock_guard lock(mutex_);
    stopping_.store(true, std::memory_order_release);
    kick_();
    changed_.notify_all();  // parked threads leave too
}

}  // namespace lkvm
