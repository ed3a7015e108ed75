// The CPUID a vCPU reports: what KVM supports, with this vCPU's APIC ID, the
// topology of the VM and the hypervisor bit filled in.
#pragma once

#include <linux/kvm.h>

#include <vector>

namespace lkvm {

struct CpuidOptions {
    unsigned index = 0;       // this vCPU, also its APIC ID
    unsigned count = 1;       // vCPUs in the VM
    bool tsc_deadline = false;  // KVM_CAP_TSC_DEADLINE_TIMER
};

std::vector<kvm_cpuid_entry2> cpuid_for_vcpu(std::vector<kvm_cpuid_entry2> supported, const CpuidOptions& options);

}  // namespace lkvm
