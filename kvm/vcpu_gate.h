// What holds vCPU threads out of the guest for `lkvm pause`, lets them go on
// `lkvm resume`, and ends their loops on stop. The vCPU threads look at it
// between KVM_RUNs; whoever pauses or stops calls kick() to get them out of
// KVM_RUN soon (immediate_exit and a signal). No KVM here: unit-tested alone.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>

namespace lkvm {

class VcpuGate {
public:
    // kick: makes every vCPU thread return from KVM_RUN soon. Called with the
    // gate's lock held, so that it cannot interleave with park()'s on_release.
    explicit VcpuGate(std::function<void()> kick) : kick_(std::move(kick)) {}
    VcpuGate(const VcpuGate&) = delete;
    VcpuGate& operator=(const VcpuGate&) = delete;

    // Before starting them: how many vCPU threads will run their loop.
    void set_threads(unsigned count);

    // ---- On a vCPU thread, between KVM_RUNs.
    bool stopping() const { return stopping_.load(std::memory_order_acquire); }
    // Paused by lkvm pause (not by the debugger).
    bool paused() const { return paused_.load(std::memory_order_acquire); }
    // Whether vCPU `index` must stay out of the guest: paused, stopped by the
    // debugger, or another vCPU is the one the debugger lets run (a step).
    bool held(unsigned index) const
    {
        const int only = only_.load(std::memory_order_acquire);
        return paused() || debug_stopped_.load(std::memory_order_acquire) || (only >= 0 && only != static_cast<int>(index));
    }
    // Waits while held and not stopping. When let go to run again, calls
    // on_release under the lock: where the thread clears what kick() set, so
    // that a pause or stop coming right after sets it again and is not lost.
    void park(unsigned index, const std::function<void()>& on_release);
    // The thread has left its loop for good (stopped, or it ended the guest).
    void leave();

    // ---- On the controlling thread.
    // Returns once every thread still in its loop is parked. Idempotent.
    void pause();
    // Lets parked threads run again. Idempotent.
    void resume();
    // Ends every loop, parked or running; the caller then joins the threads.
    void stop();

    // ---- The debugger's stops: apart from pause(), so that `lkvm resume`
    // cannot run a guest that gdb holds, nor gdb one that lkvm pause holds.
    // From any thread (a vCPU thread too): every vCPU out of the guest soon.
    void debug_stop();
    bool debug_stopped() const { return debug_stopped_.load(std::memory_order_acquire); }
    // Returns once every vCPU still in its loop is parked.
    void wait_parked();
    // Lets the vCPUs run again after debug_stop(): all of them (only < 0),
    // or vCPU `only` alone, the others held until the next debug_stop().
    void debug_resume(int only);

private:
    std::function<void()> kick_;
    std::mutex mutex_;
    std::condition_variable changed_;
    // Changed under mutex_ (so waiters miss no change); atomics so that the
    // vCPU loop can look without the lock.
    std::atomic<bool> stopping_{false}, paused_{false}, debug_stopped_{false};
    std::atomic<int> only_{-1};
    unsigned in_loop_ = 0;  // vCPU threads not yet out of their loop
    unsigned parked_ = 0;   // of those, the ones waiting in park()
};

}  // namespace lkvm
