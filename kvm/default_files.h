// Where lkvm finds the guest kernel and initramfs it boots when -k or -i is
// not given. The two are built together (the initramfs carries the kernel's
// virtio modules), so they are looked for in one place: beside the binary in
// a build tree (build/lkvm, build/kernel/, build/guest/), else in the
// share/lkvm directory of the prefix the binary is installed under
// (PREFIX/bin/lkvm, PREFIX/share/lkvm/), whatever PREFIX and DESTDIR were.
#pragma once

#include <filesystem>
#include <functional>

namespace lkvm {

struct DefaultFile {
    const char* what;                 // for the error: "kernel"
    const char* option;               // what to pass instead: "-k BZIMAGE"
    std::filesystem::path in_build;   // relative to the binary's directory in a build tree
    std::filesystem::path installed;  // relative to PREFIX/share/lkvm
};

inline const DefaultFile kDefaultKernel{"kernel", "-k BZIMAGE", "kernel/vmlinuz", "vmlinuz"};
inline const DefaultFile kDefaultInitrd{"initramfs", "-i INITRD", "guest/initramfs.cpio.gz", "initramfs.cpio.gz"};

// The build tree's file when it exists, else the installed one; when neither
// exists, an Error naming both places and the option to pass. `exists` is
// apart for tests.
std::filesystem::path find_default_file(
    const DefaultFile& file, const std::filesystem::path& binary_dir,
    const std::function<bool(const std::filesystem::path&)>& exists = [](const std::filesystem::path& path) {
        std::error_code ec;
        return std::filesystem::exists(path, ec);
    });

}  // namespace lkvm
