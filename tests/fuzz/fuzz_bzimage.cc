// The bzImage setup-header parser (parse_bzimage) on the input as a kernel
// image, and what lkvm does next with an image it accepted: the fit checks,
// the initrd placement, and loading it into a small guest memory. A bad
// image must be refused with lkvm::Error, and what is accepted must load
// where the layout says and nowhere else.
//
// Input: the kernel image.
#include <sys/mman.h>

#include <cstring>
#include <span>

#include "base/error.h"
#include "kvm/boot.h"
#include "kvm/layout.h"
#include "tests/fuzz/fuzz_input.h"

using namespace lkvm;

namespace {
constexpr uint64_t kRamSize = 8 << 20;  // enough for the layout below 1 MiB and a fuzzer-sized kernel

template <typename F>
bool refused(F&& f)
{
    try {
        f();
        return false;
    } catch (const Error&) {
        return true;
    }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    // Mapped once: 8 MiB to clear per input would be most of the time spent.
    static uint8_t* const ram = static_cast<uint8_t*>(
        ::mmap(nullptr, kRamSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    static const GuestMemory memory({{0, kRamSize, ram}});
    FUZZ_CHECK(ram != MAP_FAILED);

    const std::span<const uint8_t> file(data, size);
    BzImage image;
    if (refused([&] { image = parse_bzimage(file, "fuzz"); }))
        return 0;
    FUZZ_CHECK(size >= 1024 && image.setup.data() == data && image.kernel.data() == image.setup.data() + image.setup.size());
    FUZZ_CHECK(image.setup.size() + image.kernel.size() == size && !image.kernel.empty());
    FUZZ_CHECK(image.init_size >= image.kernel.size());

    const uint64_t initrd_size = 4096;
    uint64_t initrd = 0;
    if (!refused([&] { initrd = place_initrd(image, kRamSize, initrd_size); })) {
        FUZZ_CHECK(initrd % 4096 == 0 && initrd >= layout::kKernel + image.init_size);
        FUZZ_CHECK(initrd + initrd_size <= kRamSize && initrd + initrd_size - 1 <= image.initrd_addr_max);
    }
    const std::string cmdline = "console=ttyS0";
    if (refused([&] { load_linux(memory, image, cmdline, kRamSize, {initrd, initrd_size, 0}); }))
        return 0;
    FUZZ_CHECK(std::memcmp(ram + layout::kKernel, image.kernel.data(), image.kernel.size()) == 0);
    FUZZ_CHECK(std::memcmp(ram + layout::kCmdline, cmdline.c_str(), cmdline.size() + 1) == 0);
    return 0;
}
