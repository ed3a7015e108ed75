#include "kvm/host_kvm.h"

#include <filesystem>
#include <fstream>
#include <sstream>

namespace lkvm {

namespace {
// The "flags" line of any CPU names vmx (Intel) or svm (AMD).
bool cpu_flags_name_virtualization(const std::string& cpuinfo)
{
    std::ifstream file(cpuinfo);
    std::string line;
    while (std::getline(file, line)) {
        if (line.rfind("flags", 0) != 0)
            continue;
        std::istringstream words(line.substr(line.find(':') == std::string::npos ? line.size() : line.find(':') + 1));
        std::string flag;
        while (words >> flag)
            if (flag == "vmx" || flag == "svm")
                return true;
    }
    return false;
}

constexpr const char* kWhatToDo = "run lkvm through scripts/nested-run.sh, or on a host with VT-x/AMD-V";
}  // namespace

HostVirtualization probe_host_virtualization(const std::string& sys_module, const std::string& cpuinfo)
{
    std::error_code ec;
    return {std::filesystem::is_directory(std::filesystem::path(sys_module) / "kvm_pvm", ec),
            cpu_flags_name_virtualization(cpuinfo)};
}

std::string unusable_kvm_reason(const HostVirtualization& host)
{
    if (host.pvm)
        return std::string("this host's /dev/kvm is PVM (kvm_pvm), which boots only PVM guest kernels; ") + kWhatToDo +
               " (--force-kvm boots a PVM guest kernel here)";
    if (!host.hardware)
        return std::string("this host's CPU has no hardware virtualization (no vmx or svm in /proc/cpuinfo), so "
                           "its /dev/kvm cannot run a guest; ") +
               kWhatToDo + " (--force-kvm tries anyway)";
    return "";
}

}  // namespace lkvm
