// What kind of KVM this host offers, asked before anything boots: a /dev/kvm
// that opens is not yet one that runs an ordinary guest kernel. PVM (the
// kvm_pvm module, as cloud sandboxes offer it) runs only PVM-enabled guest
// kernels, and an unmodified one spins without ever printing a line; without
// VT-x/AMD-V no KVM runs a guest at all.
#pragma once

#include <string>

namespace lkvm {

struct HostVirtualization {
    bool pvm = false;       // the kvm_pvm module is loaded
    bool hardware = false;  // the CPU flags name vmx or svm
};

// Reads the module directory and the CPU flags; the paths are apart for tests.
HostVirtualization probe_host_virtualization(const std::string& sys_module = "/sys/module",
                                             const std::string& cpuinfo = "/proc/cpuinfo");

// Empty when an ordinary guest can run; else the one line saying why not and
// what to do.
std::string unusable_kvm_reason(const HostVirtualization& host);

}  // namespace lkvm
