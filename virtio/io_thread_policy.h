// How an I/O thread is scheduled on the host: apart from io_thread.h so
// that the command line can name it without the thread's whole machinery.
#pragma once

namespace lkvm {

// The host scheduling policy of an I/O thread. kBatch (the default) keeps
// the thread's fair share of CPU but stops a wakeup from preempting the
// thread that is running: when I/O threads share CPUs with vCPUs, a kick no
// longer pulls the CPU away from the vCPU still queueing requests, so the
// thread finds a batch instead of one request per kick (DESIGN.md, "What a
// guest request costs"). kOther is the kernel's default (SCHED_OTHER);
// kIdle (SCHED_IDLE) runs only when nothing else wants the CPU.
enum class IoThreadPolicy { kBatch, kOther, kIdle };
constexpr const char* io_thread_policy_name(IoThreadPolicy policy)
{
    switch (policy) {
    case IoThreadPolicy::kBatch: return "batch";
    case IoThreadPolicy::kOther: return "other";
    case IoThreadPolicy::kIdle: return "idle";
    }
    return "?";
}

}  // namespace lkvm
