// Thin RAII wrappers over the /dev/kvm ioctls: the system fd, a VM and a vCPU.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/mapping.h"

namespace lkvm {

// The calls Kvm::open makes on the host, apart so that tests can play hosts
// this one is not (no permission, another API version, missing capabilities).
class KvmHostCalls {
public:
    virtual ~KvmHostCalls() = default;
    // A new fd, or -errno.
    virtual int open(const std::string& path);
    // The ioctl's result, or -errno.
    virtual int ioctl(int fd, unsigned long request, unsigned long arg);
};

// The line for a KVM_CREATE_VM that failed with err.
std::string create_vm_error(int err);

class Kvm {
public:
    // Opens /dev/kvm and checks the API version and every capability lkvm relies on;
    // throws an Error whose line says what is missing and what to do.
    static Kvm open(const std::string& path = "/dev/kvm");
    static Kvm open(const std::string& path, KvmHostCalls& host);

    int fd() const { return fd_.get(); }
    int check_extension(long capability) const;
    unsigned max_vcpus() const;
    size_t vcpu_mmap_size() const;
    std::vector<kvm_cpuid_entry2> supported_cpuid() const;

private:
    explicit Kvm(Fd fd) : fd_(std::move(fd)) {}
    Fd fd_;
};

class Vm {
public:
    // A VM with the in-kernel IRQ chip (PIC, IOAPIC, local APICs) and PIT.
    explicit Vm(const Kvm& kvm);

    int fd() const { return fd_.get(); }
    void add_memory(uint32_t slot, uint64_t gpa, uint64_t size, void* host);
    void set_irq_line(uint32_t gsi, bool high) const;

private:
    Fd fd_;
};

class Vcpu {
public:
    Vcpu(const Kvm& kvm, const Vm& vm, unsigned index);

    unsigned index() const { return index_; }
    int fd() const { return fd_.get(); }
    kvm_run* run() const { return reinterpret_cast<kvm_run*>(run_.data()); }

    void set_cpuid(const std::vector<kvm_cpuid_entry2>& entries);
    // LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them.
    void init_local_apic();
    // Long mode with the identity map in place: where a 64-bit boot loader leaves the BSP.
    void enter_long_mode(uint64_t entry, uint64_t boot_params, uint64_t stack);
    // "RIP 0x... CS 0x.. (long mode)": where the vCPU is, for messages about faults and hangs.
    std::string describe() const;

private:
    unsigned index_;
    Fd fd_;
    Mapping run_;
};

}  // namespace lkvm
