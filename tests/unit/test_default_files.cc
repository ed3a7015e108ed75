// Where lkvm finds its default kernel and initramfs: beside the binary in a
// build tree, else in PREFIX/share/lkvm once installed (any PREFIX, any DESTDIR).
#include <doctest/doctest.h>

#include <filesystem>
#include <set>
#include <string>

#include "kvm/default_files.h"
#include "tests/unit/test_util.h"

using namespace lkvm;
using lkvm::test::error_of;
namespace fs = std::filesystem;

namespace {
// A host whose only files are `files`.
auto only(std::set<fs::path> files)
{
    return [files = std::move(files)](const fs::path& path) { return files.contains(path); };
}
}  // namespace

TEST_CASE("default files: a build tree's own, beside the binary")
{
    const auto exists = only({"/src/lkvm/build/kernel/vmlinuz", "/src/lkvm/build/guest/initramfs.cpio.gz"});
    CHECK(find_default_file(kDefaultKernel, "/src/lkvm/build", exists) == "/src/lkvm/build/kernel/vmlinuz");
    CHECK(find_default_file(kDefaultInitrd, "/src/lkvm/build", exists) == "/src/lkvm/build/guest/initramfs.cpio.gz");
}

TEST_CASE("default files: installed, in share/lkvm of the binary's prefix")
{
    const auto exists = only({"/usr/local/share/lkvm/vmlinuz", "/usr/local/share/lkvm/initramfs.cpio.gz",
                              "/tmp/dest/opt/x/share/lkvm/vmlinuz"});
    CHECK(find_default_file(kDefaultKernel, "/usr/local/bin", exists) == "/usr/local/share/lkvm/vmlinuz");
    CHECK(find_default_file(kDefaultInitrd, "/usr/local/bin", exists) == "/usr/local/share/lkvm/initramfs.cpio.gz");
    // A packager's DESTDIR and another PREFIX: only where the binary is counts.
    CHECK(find_default_file(kDefaultKernel, "/tmp/dest/opt/x/bin", exists) == "/tmp/dest/opt/x/share/lkvm/vmlinuz");
}

TEST_CASE("default files: the build tree wins over an installed copy")
{
    const auto exists = only({"/a/build/kernel/vmlinuz", "/a/share/lkvm/vmlinuz"});
    CHECK(find_default_file(kDefaultKernel, "/a/build", exists) == "/a/build/kernel/vmlinuz");
}

TEST_CASE("default files: none found names both places and the option")
{
    const auto nothing = only({});
    CHECK(error_of([&] { find_default_file(kDefaultKernel, "/usr/bin", nothing); }) ==
          "no kernel given, and neither /usr/bin/kernel/vmlinuz (a build tree: run 'make') nor "
          "/usr/share/lkvm/vmlinuz (installed: 'make install') exists: pass -k BZIMAGE");
    const std::string initrd = error_of([&] { find_default_file(kDefaultInitrd, "/usr/bin", nothing); });
    CHECK(initrd.find("/usr/bin/guest/initramfs.cpio.gz") != std::string::npos);
    CHECK(initrd.find("/usr/share/lkvm/initramfs.cpio.gz") != std::string::npos);
    CHECK(initrd.ends_with("pass -i INITRD"));
}

TEST_CASE("default files: the real exists-check, on a temporary layout")
{
    lkvm::test::TempDir dir;
    const fs::path root = dir.path;
    fs::create_directories(root / "bin");
    fs::create_directories(root / "share/lkvm");
    CHECK_THROWS_AS(find_default_file(kDefaultKernel, root / "bin"), Error);
    dir.file("share/lkvm/vmlinuz", 6);
    CHECK(find_default_file(kDefaultKernel, root / "bin") == root / "share/lkvm/vmlinuz");
}
