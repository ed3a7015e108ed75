#include "kvm/default_files.h"

#include "base/error.h"

namespace lkvm {

std::filesystem::path find_default_file(const DefaultFile& file, const std::filesystem::path& binary_dir,
                                        const std::function<bool(const std::filesystem::path&)>& exists)
{
    const auto in_build = binary_dir / file.in_build;
    if (exists(in_build))
        return in_build;
    // Normalized, so that the error names /usr/local/share/lkvm, not /usr/local/bin/../share/lkvm.
    const auto installed = (binary_dir / ".." / "share" / "lkvm" / file.installed).lexically_normal();
    if (exists(installed))
        return installed;
    throw Error(std::string("no ") + file.what + " given, and neither " + in_build.string() +
                " (a build tree: run 'make') nor " + installed.string() +
                " (installed: 'make install') exists: pass " + file.option);
}

}  // namespace lkvm
