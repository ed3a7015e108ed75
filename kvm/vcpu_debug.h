// A vCPU as the gdb stub sees it: its registers in gdb's terms, its paging
// state, and KVM_SET_GUEST_DEBUG. Called only while the vCPU is out of
// KVM_RUN (parked), from the main loop.
#pragma once

#include <linux/kvm.h>

#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "kvm/gdb_server.h"
#include "kvm/gdb_stub.h"
#include "kvm/page_walk.h"
#include "kvm/vcpu_gate.h"

namespace lkvm {

class Kvm;
class Vcpu;

bool read_vcpu_registers(int vcpu_fd, X86Registers& out);
// Writes what gdb may change: general registers, rip, eflags, the x87/SSE
// state, fs/gs base and the control registers (segment selectors are not
// reloaded: a selector alone, without its descriptor, would mean nothing).
bool write_vcpu_registers(int vcpu_fd, const X86Registers& in);
bool read_paging_state(int vcpu_fd, PagingState& out);
// debug as KVM_SET_GUEST_DEBUG takes it; step: this vCPU runs one instruction,
// with interrupts held off when KVM can (KVM_GUESTDBG_BLOCKIRQ), so that a
// step goes to the next instruction and not into an interrupt handler.
bool set_guest_debug(int vcpu_fd, const GuestDebugSetup& debug, bool step, bool block_irq);
// Whether KVM can hold interrupts off during a single step.
bool kvm_can_block_irq_in_step(const Kvm& kvm);
// Gives the guest the #BP it took at its own int3 (the exit stopped it short).
bool reinject_breakpoint(int vcpu_fd);

// The VM under gdb: its vCPUs (held through the gate), their registers and
// memory, and the debug exits they report.
class VmDebugger final : public GdbVm {
public:
    // vm_stopped: posts GdbServer::vm_stopped to the main loop; end: ends the guest.
    VmDebugger(const Kvm& kvm, const std::vector<std::unique_ptr<Vcpu>>& vcpus, VcpuGate& gate,
               const GuestMemory& memory, std::function<void()> vm_stopped, std::function<void()> end);

    // On the vCPU's thread, after KVM_EXIT_DEBUG: every vCPU stops.
    void on_debug_exit(unsigned vcpu, const kvm_debug_exit_arch& arch);

    unsigned vcpu_count() const override { return static_cast<unsigned>(vcpus_.size()); }
    bool get_registers(unsigned vcpu, X86Registers& out) override;
    bool set_registers(unsigned vcpu, const X86Registers& in) override;
    size_t read_virtual(unsigned vcpu, uint64_t gva, std::span<uint8_t> out) override;
    size_t write_virtual(unsigned vcpu, uint64_t gva, std::span<const uint8_t> in) override;
    void run_guest(const GuestDebugSetup& debug, int step_vcpu) override;
    void reinject_breakpoint(unsigned vcpu) override;
    void interrupt() override;
    void end_guest() override { end_(); }
    void stop_and_wait() override;
    bool debug_stopped() const override { return gate_.debug_stopped(); }
    std::vector<DebugExit> take_debug_exits() override;

private:
    // Guest virtual range [gva, gva + len) a page at a time: fn(host span) per piece.
    size_t each_page(unsigned vcpu, uint64_t gva, size_t len, const std::function<void(std::span<uint8_t>, size_t)>& fn);
    void add_exit(const DebugExit& exit);

    const std::vector<std::unique_ptr<Vcpu>>& vcpus_;
    VcpuGate& gate_;
    const GuestMemory& memory_;
    std::function<void()> vm_stopped_;
    std::function<void()> end_;
    bool block_irq_in_step_;
    std::mutex mutex_;
    std::vector<DebugExit> exits_;  // under mutex_: vCPU threads add, the main loop takes
};

}  // namespace lkvm
