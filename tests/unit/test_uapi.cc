// Every Linux uapi header lkvm includes, included here the way lkvm includes
// it, so that one C++ translation unit fails to build when a linux-libc-dev
// update brings a header C++ cannot parse (6.1.192's <linux/ioprio.h> did).
// tests/uapi/run.sh checks that this list covers every <linux/...> and
// <asm/...> include in the tree, and builds everything against the other
// Debian 12 linux-libc-dev versions.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>

#include <asm/bootparam.h>
#include <linux/kvm.h>
// The device tests' 4 KiB-sector loop device, and their check for tmpfs:
#include <linux/loop.h>
#include <linux/magic.h>

// The libraries whose headers pull in more of them.
#include <libaio.h>
#include <liburing.h>

#include <cstddef>

// Checked where it matters, at build time: a header that moved any of these
// fails the build, not a run.
TEST_CASE("uapi: the ABI lkvm relies on is what these headers say")
{
    static_assert(KVM_API_VERSION == 12);
    // The x86 boot protocol's zero page (Documentation/arch/x86/zero-page.rst).
    static_assert(sizeof(boot_params) == 4096);
    static_assert(offsetof(boot_params, hdr) == 0x1f1);
    static_assert(offsetof(boot_params, e820_table) == 0x2d0);
    static_assert(sizeof(boot_e820_entry) == 20);
    // _IOR(0x12, 114, size_t) and _IO(0x12, 104).
    static_assert(BLKGETSIZE64 == 0x80081272);
    static_assert(BLKSSZGET == 0x1268);
    // The submission entries lkvm fills in.
    static_assert(sizeof(io_uring_sqe) == 64 && sizeof(iocb) == 64);
    // LOOP_CONFIGURE (5.8) and the loop_config it takes.
    static_assert(LOOP_CONFIGURE == 0x4C0A && sizeof(loop_config) == 304);
}
