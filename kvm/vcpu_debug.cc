#include "kvm/vcpu_debug.h"

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstring>

#include "kvm/kvm.h"

#include <algorithm>
#include <utility>

namespace lkvm {
namespace {
// gdb's general register order (rax rbx rcx rdx rsi rdi rbp rsp r8..r15) in kvm_regs.
std::array<__u64*, 16> general_registers(kvm_regs& r)
{
    return {&r.rax, &r.rbx, &r.rcx, &r.rdx, &r.rsi, &r.rdi, &r.rbp, &r.rsp,
            &r.r8,  &r.r9,  &r.r10, &r.r11, &r.r12, &r.r13, &r.r14, &r.r15};
}

// FXSAVE keeps an abridged tag (a bit per register: in use); gdb shows the
// full x87 tag word (two bits per register: 11 empty, 00 valid).
uint32_t full_tag(uint8_t abridged)
{
    uint32_t tag = 0;
    for (int i = 0; i < 8; ++i)
        tag |= (abridged & (1 << i) ? 0u : 3u) << (2 * i);
    return tag;
}
// What a vCPU's registers come in: KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_FPU.
struct VcpuState {
    kvm_regs regs{};
    kvm_sregs sregs{};
    kvm_fpu fpu{};
};
bool get_state(int fd, VcpuState& s)
{
    return ::ioctl(fd, KVM_GET_REGS, &s.regs) == 0 && ::ioctl(fd, KVM_GET_SREGS, &s.sregs) == 0 &&
           ::ioctl(fd, KVM_GET_FPU, &s.fpu) == 0;
}

uint8_t abridged_tag(uint32_t full)
{
    uint8_t tag = 0;
    for (int i = 0; i < 8; ++i)
        if (((full >> (2 * i)) & 3) != 3)
            tag |= static_cast<uint8_t>(1 << i);
    return tag;
}
}  // namespace

bool read_vcpu_registers(int fd, X86Registers& out)
{
    VcpuState state;
    if (!get_state(fd, state))
        return false;
    auto& [regs, sregs, fpu] = state;
    const auto gprs = general_registers(regs);
    for (size_t i = 0; i < gprs.size(); ++i)
        out.gpr[i] = *gprs[i];
    out.rip = regs.rip;
    out.eflags = static_cast<uint32_t>(regs.rflags);
    out.segment = {sregs.cs.selector, sregs.ss.selector, sregs.ds.selector,
                   sregs.es.selector, sregs.fs.selector, sregs.gs.selector};
    for (size_t i = 0; i < out.st.size(); ++i)
        std::memcpy(out.st[i].data(), fpu.fpr[i], out.st[i].size());
    out.fctrl = fpu.fcw;
    out.fstat = fpu.fsw;
    out.ftag = full_tag(fpu.ftwx);
    out.fiseg = static_cast<uint32_t>(fpu.last_ip >> 32);
    out.fioff = static_cast<uint32_t>(fpu.last_ip);
    out.foseg = static_cast<uint32_t>(fpu.last_dp >> 32);
    out.fooff = static_cast<uint32_t>(fpu.last_dp);
    out.fop = fpu.last_opcode;
    for (size_t i = 0; i < out.xmm.size(); ++i)
        std::memcpy(out.xmm[i].data(), fpu.xmm[i], out.xmm[i].size());
    out.mxcsr = fpu.mxcsr;
    out.fs_base = sregs.fs.base;
    out.gs_base = sregs.gs.base;
    out.cr0 = sregs.cr0;
    out.cr2 = sregs.cr2;
    out.cr3 = sregs.cr3;
    out.cr4 = sregs.cr4;
    out.cr8 = sregs.cr8;
    out.efer = sregs.efer;
    return true;
}

bool write_vcpu_registers(int fd, const X86Registers& in)
{
    VcpuState state;
    if (!get_state(fd, state))
        return false;
    auto& [regs, sregs, fpu] = state;
    const auto gprs = general_registers(regs);
    for (size_t i = 0; i < gprs.size(); ++i)
        *gprs[i] = in.gpr[i];
    regs.rip = in.rip;
    regs.rflags = (regs.rflags & ~0xffffffffull) | in.eflags;
    for (size_t i = 0; i < in.st.size(); ++i)
        std::memcpy(fpu.fpr[i], in.st[i].data(), in.st[i].size());
    fpu.fcw = static_cast<uint16_t>(in.fctrl);
    fpu.fsw = static_cast<uint16_t>(in.fstat);
    fpu.ftwx = abridged_tag(in.ftag);
    fpu.last_opcode = static_cast<uint16_t>(in.fop);
    for (size_t i = 0; i < in.xmm.size(); ++i)
        std::memcpy(fpu.xmm[i], in.xmm[i].data(), in.xmm[i].size());
    fpu.mxcsr = in.mxcsr;
    const bool sregs_changed = sregs.fs.base != in.fs_base || sregs.gs.base != in.gs_base || sregs.cr0 != in.cr0 ||
                               sregs.cr2 != in.cr2 || sregs.cr3 != in.cr3 || sregs.cr4 != in.cr4 ||
                               sregs.cr8 != in.cr8 || sregs.efer != in.efer;
    sregs.fs.base = in.fs_base;
    sregs.gs.base = in.gs_base;
    sregs.cr0 = in.cr0;
    sregs.cr2 = in.cr2;
    sregs.cr3 = in.cr3;
    sregs.cr4 = in.cr4;
    sregs.cr8 = in.cr8;
    sregs.efer = in.efer;
    return ::ioctl(fd, KVM_SET_REGS, &regs) == 0 && ::ioctl(fd, KVM_SET_FPU, &fpu) == 0 &&
           (!sregs_changed || ::ioctl(fd, KVM_SET_SREGS, &sregs) == 0);
}

bool read_paging_state(int fd, PagingState& out)
{
    kvm_sregs sregs{};
    if (::ioctl(fd, KVM_GET_SREGS, &sregs) < 0)
        return false;
    out = {sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer};
    return true;
}

bool kvm_can_block_irq_in_step(const Kvm& kvm)
{
#if defined(KVM_CAP_SET_GUEST_DEBUG2) && defined(KVM_GUESTDBG_BLOCKIRQ)
    // KVM_CAP_SET_GUEST_DEBUG2 is the mask of the control flags KVM takes.
    return kvm.check_extension(KVM_CAP_SET_GUEST_DEBUG2) & KVM_GUESTDBG_BLOCKIRQ;
#else
    (void)kvm;
    return false;
#endif
}

bool set_guest_debug(int fd, const GuestDebugSetup& debug, bool step, bool block_irq)
{
    kvm_guest_debug guest_debug{};
    if (debug.software_breakpoints)
        guest_debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
    if (debug.hardware_breakpoints) {
        guest_debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        for (size_t i = 0; i < debug.dr.size(); ++i)
            guest_debug.arch.debugreg[i] = debug.dr[i];
        guest_debug.arch.debugreg[7] = debug.dr7;
    }
    if (step) {
        guest_debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
#ifdef KVM_GUESTDBG_BLOCKIRQ
        if (block_irq)
            guest_debug.control |= KVM_GUESTDBG_BLOCKIRQ;
#endif
    }
    (void)block_irq;
    return ::ioctl(fd, KVM_SET_GUEST_DEBUG, &guest_debug) == 0;
}

bool reinject_breakpoint(int fd)
{
    // As a #BP the guest took itself: KVM knows the int3's length from the exit.
    kvm_vcpu_events events{};
    if (::ioctl(fd, KVM_GET_VCPU_EVENTS, &events) < 0)
        return false;
    events.exception.injected = 1;
    events.exception.nr = 3;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    events.flags &= ~static_cast<uint32_t>(KVM_VCPUEVENT_VALID_SIPI_VECTOR);
    return ::ioctl(fd, KVM_SET_VCPU_EVENTS, &events) == 0;
}

}  // namespace lkvm

namespace lkvm {

VmDebugger::VmDebugger(const Kvm& kvm, const std::vector<std::unique_ptr<Vcpu>>& vcpus, VcpuGate& gate,
                       const GuestMemory& memory, std::function<void()> vm_stopped, std::function<void()> end)
    : vcpus_(vcpus),
      gate_(gate),
      memory_(memory),
      vm_stopped_(std::move(vm_stopped)),
      end_(std::move(end)),
      block_irq_in_step_(kvm_can_block_irq_in_step(kvm))
{
}

void VmDebugger::add_exit(const DebugExit& exit)
{
    gate_.debug_stop();
    {
        std::lock_guard lock(mutex_);
        exits_.push_back(exit);
    }
    vm_stopped_();
}

void VmDebugger::on_debug_exit(unsigned vcpu, const kvm_debug_exit_arch& arch)
{
    add_exit({vcpu, DebugExit::Kind::kException, arch.exception, arch.pc, arch.dr6});
}

void VmDebugger::interrupt()
{
    add_exit({0, DebugExit::Kind::kStopped, 0, 0, 0});
}

std::vector<DebugExit> VmDebugger::take_debug_exits()
{
    std::lock_guard lock(mutex_);
    return std::exchange(exits_, {});
}

void VmDebugger::stop_and_wait()
{
    gate_.debug_stop();
    gate_.wait_parked();
}

bool VmDebugger::get_registers(unsigned vcpu, X86Registers& out)
{
    return vcpu < vcpus_.size() && read_vcpu_registers(vcpus_[vcpu]->fd(), out);
}

bool VmDebugger::set_registers(unsigned vcpu, const X86Registers& in)
{
    return vcpu < vcpus_.size() && write_vcpu_registers(vcpus_[vcpu]->fd(), in);
}

size_t VmDebugger::each_page(unsigned vcpu, uint64_t gva, size_t len,
                             const std::function<void(std::span<uint8_t>, size_t)>& fn)
{
    PagingState paging;
    if (vcpu >= vcpus_.size() || !read_paging_state(vcpus_[vcpu]->fd(), paging))
        return 0;
    size_t done = 0;
    while (done < len) {
        const auto translation = translate(memory_, paging, gva + done);
        if (!translation)
            break;
        const size_t piece = static_cast<size_t>(std::min<uint64_t>(translation->page_bytes, len - done));
        const auto host = memory_.span(translation->gpa, piece);
        if (!host)
            break;  // not RAM (a device's MMIO, or nothing): never touched from here
        fn(*host, done);
        done += piece;
    }
    return done;
}

size_t VmDebugger::read_virtual(unsigned vcpu, uint64_t gva, std::span<uint8_t> out)
{
    return each_page(vcpu, gva, out.size(),
                     [&](std::span<uint8_t> host, size_t at) { std::memcpy(out.data() + at, host.data(), host.size()); });
}

size_t VmDebugger::write_virtual(unsigned vcpu, uint64_t gva, std::span<const uint8_t> in)
{
    return each_page(vcpu, gva, in.size(),
                     [&](std::span<uint8_t> host, size_t at) { std::memcpy(host.data(), in.data() + at, host.size()); });
}

void VmDebugger::run_guest(const GuestDebugSetup& debug, int step_vcpu)
{
    stop_and_wait();  // KVM_SET_GUEST_DEBUG on a vCPU outside KVM_RUN only
    for (size_t i = 0; i < vcpus_.size(); ++i)
        set_guest_debug(vcpus_[i]->fd(), debug, static_cast<int>(i) == step_vcpu, block_irq_in_step_);
    gate_.debug_resume(step_vcpu);
}

void VmDebugger::reinject_breakpoint(unsigned vcpu)
{
    if (vcpu < vcpus_.size())
        lkvm::reinject_breakpoint(vcpus_[vcpu]->fd());
}

}  // namespace lkvm
