#include "kvm/cpuid.h"

#include <cstdint>

namespace lkvm {

std::vector<kvm_cpuid_entry2> cpuid_for_vcpu(std::vector<kvm_cpuid_entry2> entries, const CpuidOptions& options)
{
    constexpr uint32_t kEcxTscDeadline = 1u << 24, kEcxHypervisor = 1u << 31;
    constexpr uint32_t kEdxHtt = 1u << 28;
    for (auto& e : entries) {
        switch (e.function) {
        case 1:
            // EBX[31:24] initial APIC ID, EBX[23:16] logical processors in the package.
            e.ebx = (e.ebx & 0x0000ffff) | (options.index << 24) | ((options.count & 0xff) << 16);
            e.ecx |= kEcxHypervisor;
            if (options.tsc_deadline)
                e.ecx |= kEcxTscDeadline;
            if (options.count > 1)
                e.edx |= kEdxHtt;
            break;
        case 0xb:
        case 0x1f:
            // Extended topology: EDX is the x2APIC ID at every level.
            e.edx = options.index;
            break;
        default:
            break;
        }
    }
    return entries;
}

}  // namespace lkvm
