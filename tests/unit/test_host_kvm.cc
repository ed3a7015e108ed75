// The first minutes on a host: the kind of KVM it offers (PVM, no VT-x/AMD-V),
// the line for every way opening KVM fails (through KvmHostCalls, playing hosts
// this one is not), the --boot-timeout warning and its options.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "base/error.h"
#include "cli/command_line.h"
#include "kvm/console.h"
#include "kvm/host_kvm.h"
#include "kvm/kvm.h"
#include "tests/unit/test_util.h"

using namespace lkvm;
using lkvm::test::error_of;
using lkvm::test::TempDir;

namespace {
// A host: the errno its open gives (0: opens, as /dev/null), its API version
// (negative: -errno) and the capabilities it lacks.
class FakeHost : public KvmHostCalls {
public:
    int open_errno = 0;
    int api_version = KVM_API_VERSION;
    std::map<long, int> capabilities;  // absent: 1 (present)

    int open(const std::string&) override
    {
        if (open_errno)
            return -open_errno;
        return ::open("/dev/null", O_RDWR | O_CLOEXEC);
    }
    int ioctl(int, unsigned long request, unsigned long arg) override
    {
        if (request == KVM_GET_API_VERSION)
            return api_version;
        if (request == KVM_CHECK_EXTENSION) {
            const auto it = capabilities.find(static_cast<long>(arg));
            return it == capabilities.end() ? 1 : it->second;
        }
        return -ENOTTY;
    }
};

std::string open_error(FakeHost& host)
{
    return error_of([&] { Kvm::open("/dev/kvm", host); });
}

// A host's /sys/module and /proc/cpuinfo, made up.
struct FakeSysfs {
    TempDir dir;
    std::string modules() const { return (dir.path / "module").string(); }
    std::string cpuinfo() const { return (dir.path / "cpuinfo").string(); }
    FakeSysfs(bool pvm, const std::string& cpuinfo_text)
    {
        std::filesystem::create_directories(dir.path / "module" / "kvm");
        if (pvm)
            std::filesystem::create_directories(dir.path / "module" / "kvm_pvm");
        std::ofstream(cpuinfo()) << cpuinfo_text;
    }
};

const std::string kAmdCpu = "processor\t: 0\nflags\t\t: fpu vme de pse svm npt hypervisor\n\n"
                            "processor\t: 1\nflags\t\t: fpu vme de pse svm npt hypervisor\n";
const std::string kIntelCpu = "processor\t: 0\nflags\t\t: fpu vme vmx ept\nvmx flags\t: vnmi preemption_timer\n";
// A guest's CPU without nested virtualization: "vmx flags" names what the
// host has, the CPU's own flags do not.
const std::string kNoVirtCpu = "processor\t: 0\nflags\t\t: fpu vme de pse hypervisor vmxfoo\nvmx flags\t: vmx svm\n";
}  // namespace

TEST_CASE("host KVM: PVM and the lack of VT-x/AMD-V are read from /sys/module and the CPU flags")
{
    {
        FakeSysfs host(true, kAmdCpu);
        const auto v = probe_host_virtualization(host.modules(), host.cpuinfo());
        CHECK(v.pvm);
        CHECK(v.hardware);
    }
    {
        FakeSysfs host(false, kAmdCpu);
        const auto v = probe_host_virtualization(host.modules(), host.cpuinfo());
        CHECK_FALSE(v.pvm);
        CHECK(v.hardware);
    }
    {
        FakeSysfs host(false, kIntelCpu);
        CHECK(probe_host_virtualization(host.modules(), host.cpuinfo()).hardware);
    }
    {
        FakeSysfs host(true, kNoVirtCpu);
        const auto v = probe_host_virtualization(host.modules(), host.cpuinfo());
        CHECK(v.pvm);
        CHECK_FALSE(v.hardware);
    }
    // No cpuinfo at all: nothing says there is hardware virtualization.
    CHECK_FALSE(probe_host_virtualization("/nonexistent", "/nonexistent").hardware);
}

TEST_CASE("host KVM: PVM and a CPU without VT-x/AMD-V each get their line; real KVM none")
{
    CHECK(unusable_kvm_reason({.pvm = true, .hardware = false}) ==
          "this host's /dev/kvm is PVM (kvm_pvm), which boots only PVM guest kernels; run lkvm through "
          "scripts/nested-run.sh, or on a host with VT-x/AMD-V (--force-kvm boots a PVM guest kernel here)");
    // A PVM module loaded on a host with VT-x: /dev/kvm may still be PVM's.
    CHECK(unusable_kvm_reason({.pvm = true, .hardware = true}).starts_with("this host's /dev/kvm is PVM"));
    CHECK(unusable_kvm_reason({.pvm = false, .hardware = false}) ==
          "this host's CPU has no hardware virtualization (no vmx or svm in /proc/cpuinfo), so its /dev/kvm cannot "
          "run a guest; run lkvm through scripts/nested-run.sh, or on a host with VT-x/AMD-V (--force-kvm tries "
          "anyway)");
    CHECK(unusable_kvm_reason({.pvm = false, .hardware = true}).empty());
}

TEST_CASE("Kvm::open: every way it fails has its own line")
{
    FakeHost host;
    SUBCASE("missing")
    {
        for (const int err : {ENOENT, ENODEV, ENXIO}) {
            host.open_errno = err;
            CHECK(open_error(host) ==
                  "/dev/kvm does not exist: load KVM (modprobe kvm-intel or kvm-amd) with virtualization enabled in "
                  "the firmware, or run lkvm through scripts/nested-run.sh");
        }
    }
    SUBCASE("permission denied names the kvm group")
    {
        for (const int err : {EACCES, EPERM}) {
            host.open_errno = err;
            CHECK(open_error(host) ==
                  "/dev/kvm: permission denied: add yourself to the 'kvm' group (sudo usermod -aG kvm $USER, then "
                  "log in again) or run as root");
        }
    }
    SUBCASE("another error is named")
    {
        host.open_errno = EMFILE;
        CHECK(open_error(host) == "cannot open /dev/kvm: " + std::string(std::strerror(EMFILE)));
    }
    SUBCASE("API version mismatch")
    {
        host.api_version = 11;
        CHECK(open_error(host) ==
              "/dev/kvm speaks KVM API version 11, lkvm needs 12; run it on a Linux kernel with the standard KVM");
    }
    SUBCASE("not a KVM device")
    {
        host.api_version = -ENOTTY;
        CHECK(open_error(host) == "/dev/kvm is not a KVM device (KVM_GET_API_VERSION: " +
                                      std::string(std::strerror(ENOTTY)) + ")");
    }
    SUBCASE("missing capabilities are named")
    {
        host.capabilities[KVM_CAP_IRQFD] = 0;
        CHECK(open_error(host) == "this host's KVM lacks KVM_CAP_IRQFD, which lkvm needs; run it on a newer host kernel");
        host.capabilities[KVM_CAP_IOEVENTFD] = -EINVAL;
        CHECK(open_error(host) ==
              "this host's KVM lacks KVM_CAP_IOEVENTFD, KVM_CAP_IRQFD, which lkvm needs; run it on a newer host kernel");
    }
    SUBCASE("a KVM with everything opens")
    {
        CHECK(open_error(host) == "(no error)");
    }
}

TEST_CASE("Kvm::open: a real missing path and a file that is no KVM device")
{
    CHECK(error_of([] { Kvm::open("/nonexistent/kvm"); }).starts_with("/nonexistent/kvm does not exist: load KVM"));
    TempDir dir;
    const std::string file = dir.file("kvm", 4);
    CHECK(error_of([&] { Kvm::open(file); }).starts_with(file + " is not a KVM device (KVM_GET_API_VERSION: "));
}

TEST_CASE("KVM_CREATE_VM: busy VT-x, no memory, and anything else")
{
    CHECK(create_vm_error(EBUSY) ==
          "KVM_CREATE_VM: the CPU's virtualization is busy (EBUSY): another hypervisor (VirtualBox, VMware) holds "
          "VT-x/AMD-V; stop it and run lkvm again");
    CHECK(create_vm_error(ENOMEM) ==
          "KVM_CREATE_VM: the host kernel is out of memory (ENOMEM); free some memory and run lkvm again");
    CHECK(create_vm_error(EINVAL) == "KVM_CREATE_VM failed: " + std::string(std::strerror(EINVAL)) +
                                         "; see the host's dmesg for why KVM refused");
}

TEST_CASE("console: port I/O on the UART's 8 ports is progress for --boot-timeout, no other port is")
{
    ConsoleActivity activity(0x3f8);
    CHECK_FALSE(activity.used());
    for (const uint16_t port : {0x3f7, 0x400, 0x80, 0x2f8, 0x70, 0xcf8})
        activity.port_io(port);
    CHECK_FALSE(activity.used());
    for (const uint16_t port : {0x3f8, 0x3f9, 0x3fb, 0x3ff}) {
        ConsoleActivity uart(0x3f8);
        uart.port_io(port);
        CHECK(uart.used());
    }
}

TEST_CASE("console: the --boot-timeout warning names every vCPU's place")
{
    CHECK(silent_console_warning(30, {"RIP 0x1000 CS 0x10 (long mode)"}) ==
          "the guest has not touched its console in 30 s (--boot-timeout): it may be the wrong kernel, or a KVM that cannot "
          "run it (PVM, nested without VT-x/AMD-V); still running; vCPU 0 at RIP 0x1000 CS 0x10 (long mode)");
    CHECK(silent_console_warning(5, {"A", "B"}).ends_with("; vCPU 0 at A, vCPU 1 at B"));
}

TEST_CASE("cli: --boot-timeout and --force-kvm")
{
    const auto defaults = parse_command_line({"run"}).run;
    CHECK(defaults.boot_timeout_s == 30);
    CHECK_FALSE(defaults.force_kvm);
    CHECK(parse_command_line({"run", "--boot-timeout", "0"}).run.boot_timeout_s == 0);
    CHECK(parse_command_line({"run", "--boot-timeout=1000000"}).run.boot_timeout_s == 1000000);
    CHECK(parse_command_line({"run", "--force-kvm"}).run.force_kvm);
    auto msg = [](std::vector<std::string> args) { return error_of([&] { parse_command_line(args); }); };
    CHECK(msg({"run", "--boot-timeout", "1000001"}) ==
          "--boot-timeout 1000001: give 0 (off) to 1000000 seconds (see 'lkvm run --help')");
    CHECK(msg({"run", "--boot-timeout", "x"}) == "--boot-timeout 'x': not a number (see 'lkvm run --help')");
}
