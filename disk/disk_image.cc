#include "disk/disk_image.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "base/error.h"

namespace lkvm {

const char* cache_mode_name(CacheMode mode)
{
    switch (mode) {
    case CacheMode::kWriteback: return "writeback";
    case CacheMode::kNone: return "none";
    case CacheMode::kWritethrough: return "writethrough";
    case CacheMode::kDirectsync: return "directsync";
    case CacheMode::kUnsafe: return "unsafe";
    }
    return "?";
}

const char* detect_zeroes_name(DetectZeroes mode)
{
    switch (mode) {
    case DetectZeroes::kOff: return "off";
    case DetectZeroes::kOn: return "on";
    case DetectZeroes::kUnmap: return "unmap";
    }
    return "?";
}

bool iovecs_are_zero(std::span<const iovec> iovs, uint64_t bytes)
{
    for (const iovec& iov : iovs) {
        if (bytes == 0)
            break;
        const auto* p = static_cast<const uint8_t*>(iov.iov_base);
        const size_t n = std::min<uint64_t>(iov.iov_len, bytes);
        bytes -= n;
        // Byte by byte up to a word boundary, then words (memcmp of the
        // buffer against itself shifted by a word: the C library's
        // vectorised compare, which stops at the first difference).
        size_t i = 0;
        for (; i < n && reinterpret_cast<uintptr_t>(p + i) % sizeof(uint64_t) != 0; ++i)
            if (p[i] != 0)
                return false;
        const size_t words = (n - i) / sizeof(uint64_t);
        if (words != 0) {
            uint64_t first;
            std::memcpy(&first, p + i, sizeof(first));
            if (first != 0 || std::memcmp(p + i, p + i + sizeof(uint64_t), (words - 1) * sizeof(uint64_t)) != 0)
                return false;
            i += words * sizeof(uint64_t);
        }
        for (; i < n; ++i)
            if (p[i] != 0)
                return false;
    }
    return true;
}

DiskImage DiskImage::open(const DiskImageOptions& options)
{
    const std::string& path = options.path;
    const std::string what = "disk " + path;
    if (options.snapshot && options.read_only)
        throw Error(what + ": snapshot and ro together: a snapshot disk is writable (its writes are dropped at exit); "
                           "give one of them");
    // A snapshot never writes the image: it is shared like a read-only one.
    const bool image_read_only = options.read_only || options.snapshot;
    int flags = (image_read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
    if (options.cache == CacheMode::kNone || options.cache == CacheMode::kDirectsync)
        flags |= O_DIRECT;
    if (options.cache == CacheMode::kWritethrough || options.cache == CacheMode::kDirectsync)
        flags |= O_DSYNC;
    Fd fd(::open(path.c_str(), flags));
    if (!fd.valid()) {
        const int err = errno;
        if (err == EISDIR)
            throw Error(what + ": is a directory; give a raw image file or a block device");
        if (err == EINVAL && (flags & O_DIRECT))
            throw Error(what + ": this filesystem does not support O_DIRECT, which cache=" +
                        cache_mode_name(options.cache) + (options.cache == CacheMode::kNone ? " ('direct')" : "") +
                        " needs; use cache=" + (options.cache == CacheMode::kNone ? "writeback" : "writethrough") +
                        " or put the image on a file system that has it");
        if ((err == EACCES || err == EROFS) && !image_read_only)
            throw sys_error(what + " (add ',ro' to use it read-only)", err);
        throw sys_error(what, err);
    }

    struct stat st {};
    if (::fstat(fd.get(), &st) < 0)
        throw sys_error(what);
    uint64_t size = 0;
    if (S_ISREG(st.st_mode)) {
        size = static_cast<uint64_t>(st.st_size);
    } else if (S_ISBLK(st.st_mode)) {
        if (::ioctl(fd.get(), BLKGETSIZE64, &size) < 0)
            throw sys_error(what + ": BLKGETSIZE64");
    } else if (S_ISDIR(st.st_mode)) {
        throw Error(what + ": is a directory; give a raw image file or a block device");
    } else {
        throw Error(what + ": not a regular file or block device");
    }
    if (size == 0)
        throw Error(what + ": is empty; create it with e.g. 'truncate -s 1G " + path + "'");
    if (size % kSectorSize != 0)
        throw Error(what + ": size " + std::to_string(size) + " is not a multiple of 512 bytes");

    // An OFD lock belongs to this open file and goes when it is closed:
    // shared for read-only users, exclusive for a writer.
    struct flock lock {};
    lock.l_type = image_read_only ? F_RDLCK : F_WRLCK;
    lock.l_whence = SEEK_SET;
    if (::fcntl(fd.get(), F_OFD_SETLK, &lock) < 0) {
        if (errno == EAGAIN || errno == EACCES)
            throw Error(what + ": in use by another lkvm (or another program holding a lock on it); stop that one" +
                        std::string(image_read_only ? "" : " or add ',ro' to share it read-only"));
        throw sys_error(what + ": cannot lock it");
    }

    DiskImage image;
    image.fd_ = std::move(fd);
    image.path_ = path;
    image.size_ = size;
    image.read_only_ = options.read_only;
    image.cache_ = options.cache;
    if (S_ISBLK(st.st_mode)) {
        int logical = 0;
        if (::ioctl(image.fd_.get(), BLKSSZGET, &logical) == 0 && logical > 0)
            image.alignment_ = static_cast<uint32_t>(logical);
    }
    if (options.snapshot) {
        try {
            image.snapshot_ = std::make_unique<SnapshotOverlay>(
                image.fd_.get(), size, image.alignment(),
                options.snapshot_dir.empty() ? SnapshotOverlay::default_dir() : options.snapshot_dir);
        } catch (const Error& e) {
            throw Error(what + ": " + e.what());
        }
    }
    return image;
}

}  // namespace lkvm
