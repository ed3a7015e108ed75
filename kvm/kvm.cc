#include "kvm/kvm.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>

#include "base/error.h"
#include "kvm/layout.h"

namespace lkvm {

namespace {
struct Capability {
    long id;
    const char* name;
};
constexpr Capability kRequired[] = {
    {KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"},
    {KVM_CAP_HLT, "KVM_CAP_HLT"},
    {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"},
    {KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"},
    {KVM_CAP_SET_IDENTITY_MAP_ADDR, "KVM_CAP_SET_IDENTITY_MAP_ADDR"},
    {KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"},
    {KVM_CAP_PIT2, "KVM_CAP_PIT2"},
    {KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING"},
    {KVM_CAP_IRQ_INJECT_STATUS, "KVM_CAP_IRQ_INJECT_STATUS"},
    {KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD"},
    {KVM_CAP_IRQFD, "KVM_CAP_IRQFD"},
    {KVM_CAP_SIGNAL_MSI, "KVM_CAP_SIGNAL_MSI"},
    {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"},
};

// struct kvm_cpuid2 as the kernel lays it out. In C++ the uapi header's
// flexible-array wrapper adds an empty member, which moves `entries` and
// changes the size encoded in the ioctl numbers, so we spell both out.
struct CpuidHeader {
    uint32_t nent;
    uint32_t padding;
};
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, CpuidHeader);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, CpuidHeader);
constexpr size_t kMaxCpuidEntries = 256;
struct CpuidBuffer {
    CpuidHeader header;
    kvm_cpuid_entry2 entries[kMaxCpuidEntries];
};

int checked_ioctl(int fd, unsigned long request, unsigned long arg, const char* what)
{
    const int r = ::ioctl(fd, request, arg);
    if (r < 0)
        throw sys_error(what);
    return r;
}

int checked_ioctl(int fd, unsigned long request, const void* arg, const char* what)
{
    return checked_ioctl(fd, request, reinterpret_cast<unsigned long>(arg), what);
}
}  // namespace

int KvmHostCalls::open(const std::string& path)
{
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int KvmHostCalls::ioctl(int fd, unsigned long request, unsigned long arg)
{
    const int r = ::ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

std::string create_vm_error(int err)
{
    if (err == EBUSY)
        return "KVM_CREATE_VM: the CPU's virtualization is busy (EBUSY): another hypervisor (VirtualBox, VMware) "
               "holds VT-x/AMD-V; stop it and run lkvm again";
    if (err == ENOMEM)
        return "KVM_CREATE_VM: the host kernel is out of memory (ENOMEM); free some memory and run lkvm again";
    return "KVM_CREATE_VM failed: " + std::string(std::strerror(err)) + "; see the host's dmesg for why KVM refused";
}

Kvm Kvm::open(const std::string& path)
{
    KvmHostCalls host;
    return open(path, host);
}

Kvm Kvm::open(const std::string& path, KvmHostCalls& host)
{
    const int opened = host.open(path);
    if (opened < 0) {
        const int err = -opened;
        if (err == ENOENT || err == ENXIO || err == ENODEV)
            throw Error(path + " does not exist: load KVM (modprobe kvm-intel or kvm-amd) with virtualization "
                        "enabled in the firmware, or run lkvm through scripts/nested-run.sh");
        if (err == EACCES || err == EPERM)
            throw Error(path + ": permission denied: add yourself to the 'kvm' group (sudo usermod -aG kvm $USER, "
                        "then log in again) or run as root");
        throw sys_error("cannot open " + path, err);
    }
    Fd fd(opened);
    const int version = host.ioctl(fd.get(), KVM_GET_API_VERSION, 0);
    if (version < 0)
        throw Error(path + " is not a KVM device (KVM_GET_API_VERSION: " + std::strerror(-version) + ")");
    if (version != KVM_API_VERSION)
        throw Error(path + " speaks KVM API version " + std::to_string(version) + ", lkvm needs " +
                    std::to_string(KVM_API_VERSION) + "; run it on a Linux kernel with the standard KVM");
    std::string missing;
    for (const auto& cap : kRequired)
        if (host.ioctl(fd.get(), KVM_CHECK_EXTENSION, static_cast<unsigned long>(cap.id)) <= 0)
            missing += missing.empty() ? cap.name : std::string(", ") + cap.name;
    if (!missing.empty())
        throw Error("this host's KVM lacks " + missing + ", which lkvm needs; run it on a newer host kernel");
    return Kvm(std::move(fd));
}

int Kvm::check_extension(long capability) const
{
    return ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, capability);
}

unsigned Kvm::max_vcpus() const
{
    int n = check_extension(KVM_CAP_MAX_VCPUS);
    if (n <= 0)
        n = check_extension(KVM_CAP_NR_VCPUS);
    return n > 0 ? static_cast<unsigned>(n) : 4;  // the API's documented floor
}

size_t Kvm::vcpu_mmap_size() const
{
    return static_cast<size_t>(checked_ioctl(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0ul, "KVM_GET_VCPU_MMAP_SIZE"));
}

std::vector<kvm_cpuid_entry2> Kvm::supported_cpuid() const
{
    auto buffer = std::make_unique<CpuidBuffer>();
    buffer->header.nent = kMaxCpuidEntries;
    checked_ioctl(fd_.get(), kGetSupportedCpuid, buffer.get(), "KVM_GET_SUPPORTED_CPUID");
    return {buffer->entries, buffer->entries + std::min<size_t>(buffer->header.nent, kMaxCpuidEntries)};
}

Vm::Vm(const Kvm& kvm)
{
    const int vm = ::ioctl(kvm.fd(), KVM_CREATE_VM, 0ul);
    if (vm < 0)
        throw Error(create_vm_error(errno));
    fd_.reset(vm);
    checked_ioctl(fd_.get(), KVM_SET_TSS_ADDR, static_cast<unsigned long>(layout::kTss), "KVM_SET_TSS_ADDR");
    const uint64_t identity = layout::kIdentityMapPage;
    checked_ioctl(fd_.get(), KVM_SET_IDENTITY_MAP_ADDR, &identity, "KVM_SET_IDENTITY_MAP_ADDR");
    checked_ioctl(fd_.get(), KVM_CREATE_IRQCHIP, 0ul, "KVM_CREATE_IRQCHIP");
    kvm_pit_config pit{};
    checked_ioctl(fd_.get(), KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");
}

void Vm::add_memory(uint32_t slot, uint64_t gpa, uint64_t size, void* host)
{
    kvm_userspace_memory_region region{};
    region.slot = slot;
    region.guest_phys_addr = gpa;
    region.memory_size = size;
    region.userspace_addr = reinterpret_cast<uint64_t>(host);
    checked_ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
}

void Vm::set_irq_line(uint32_t gsi, bool high) const
{
    kvm_irq_level level{};
    level.irq = gsi;
    level.level = high ? 1 : 0;
    // A failure here means the VM is going away; the caller cannot do better than carry on.
    ::ioctl(fd_.get(), KVM_IRQ_LINE, &level);
}

Vcpu::Vcpu(const Kvm& kvm, const Vm& vm, unsigned index) : index_(index)
{
    fd_.reset(checked_ioctl(vm.fd(), KVM_CREATE_VCPU, static_cast<unsigned long>(index), "KVM_CREATE_VCPU"));
    const size_t size = kvm.vcpu_mmap_size();
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
    if (p == MAP_FAILED)
        throw sys_error("mmap of the vCPU run area");
    run_ = Mapping(p, size);
}

void Vcpu::set_cpuid(const std::vector<kvm_cpuid_entry2>& entries)
{
    if (entries.size() > kMaxCpuidEntries)
        throw Error("KVM reported more CPUID entries than lkvm can pass back");
    auto buffer = std::make_unique<CpuidBuffer>();
    buffer->header.nent = static_cast<uint32_t>(entries.size());
    std::copy(entries.begin(), entries.end(), buffer->entries);
    checked_ioctl(fd_.get(), kSetCpuid2, buffer.get(), "KVM_SET_CPUID2");
}

void Vcpu::init_local_apic()
{
    constexpr unsigned kLvtLint0 = 0x350, kLvtLint1 = 0x360;
    constexpr uint32_t kDeliveryExtInt = 0x7 << 8, kDeliveryNmi = 0x4 << 8, kDeliveryMask = 0x7 << 8;
    kvm_lapic_state lapic{};
    checked_ioctl(fd_.get(), KVM_GET_LAPIC, &lapic, "KVM_GET_LAPIC");
    auto set_delivery = [&](unsigned reg, uint32_t mode) {
        uint32_t v;
        std::memcpy(&v, &lapic.regs[reg], 4);
        v = (v & ~kDeliveryMask) | mode;
        std::memcpy(&lapic.regs[reg], &v, 4);
    };
    set_delivery(kLvtLint0, kDeliveryExtInt);
    set_delivery(kLvtLint1, kDeliveryNmi);
    checked_ioctl(fd_.get(), KVM_SET_LAPIC, &lapic, "KVM_SET_LAPIC");
}

void Vcpu::enter_long_mode(uint64_t entry, uint64_t boot_params, uint64_t stack)
{
    kvm_sregs sregs{};
    checked_ioctl(fd_.get(), KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
    kvm_segment code{};
    code.base = 0;
    code.limit = 0xffffffff;
    code.selector = 0x10;
    code.type = 0xb;  // execute/read, accessed
    code.present = 1;
    code.s = 1;
    code.l = 1;
    code.g = 1;
    kvm_segment data = code;
    data.selector = 0x18;
    data.type = 0x3;  // read/write, accessed
    data.l = 0;
    data.db = 1;
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.gdt.base = layout::kGdt;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    constexpr uint64_t kCr0Pe = 1, kCr0Et = 1 << 4, kCr0Pg = 1ull << 31, kCr4Pae = 1 << 5;
    constexpr uint64_t kEferLme = 1 << 8, kEferLma = 1 << 10;
    sregs.cr0 = kCr0Pe | kCr0Et | kCr0Pg;
    sregs.cr3 = layout::kPml4;
    sregs.cr4 = kCr4Pae;
    sregs.efer = kEferLme | kEferLma;
    checked_ioctl(fd_.get(), KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");

    kvm_regs regs{};
    regs.rflags = 0x2;
    regs.rip = entry;
    regs.rsi = boot_params;
    regs.rsp = stack;
    checked_ioctl(fd_.get(), KVM_SET_REGS, &regs, "KVM_SET_REGS");

    kvm_fpu fpu{};
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    checked_ioctl(fd_.get(), KVM_SET_FPU, &fpu, "KVM_SET_FPU");
}

std::string Vcpu::describe() const
{
    kvm_regs regs{};
    kvm_sregs sregs{};
    if (::ioctl(fd_.get(), KVM_GET_REGS, &regs) < 0 || ::ioctl(fd_.get(), KVM_GET_SREGS, &sregs) < 0)
        return "state unavailable";
    const char* mode = !(sregs.cr0 & 1) ? "real mode" : (sregs.efer & (1 << 10)) ? "long mode" : "protected mode";
    char line[128];
    std::snprintf(line, sizeof(line), "RIP %#llx CS %#x (%s)", static_cast<unsigned long long>(regs.rip),
                  sregs.cs.selector, mode);
    return line;
}

}  // namespace lkvm
