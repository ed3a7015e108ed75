// A disk image: a raw file or a block device, opened once for the life of the
// VM with an open-file-description lock, so that a second lkvm cannot open
// the same image for writing (read-only users share it).
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/fd.h"
#include "disk/snapshot.h"

namespace lkvm {

// QEMU's cache modes, with QEMU's meanings: how the image is opened, whether
// the guest is told of a write-back cache (which it may then switch off), and
// whether its flushes reach the image.
//   writeback     page cache; the guest sees a write-back cache (default)
//   none          O_DIRECT; the guest sees a write-back cache (the disk's own)
//   writethrough  page cache, O_DSYNC: each write is durable when it completes
//   directsync    O_DIRECT and O_DSYNC
//   unsafe        page cache, and flushes complete without touching the image
enum class CacheMode : uint8_t { kWriteback, kNone, kWritethrough, kDirectsync, kUnsafe };
const char* cache_mode_name(CacheMode mode);

// detect-zeroes=: a write whose data is all zeroes becomes a write-zeroes
// (kOn), or a discard where the disk may deallocate (kUnmap, as QEMU).
enum class DetectZeroes : uint8_t { kOff, kOn, kUnmap };
const char* detect_zeroes_name(DetectZeroes mode);

// Whether the first `bytes` of iovs are all zero bytes. Stops at the first
// that is not: cheap for ordinary data, whose first word is rarely zero.
bool iovecs_are_zero(std::span<const iovec> iovs, uint64_t bytes);

struct DiskImageOptions {
    std::string path;
    bool read_only = false;
    CacheMode cache = CacheMode::kWriteback;
    // Opened read-only and shared; the guest's writes go to a temporary
    // overlay (disk/snapshot.h) in snapshot_dir (empty: $TMPDIR or /var/tmp).
    bool snapshot = false;
    std::string snapshot_dir{};
};

class DiskImage {
public:
    static constexpr uint32_t kSectorSize = 512;

    // Throws lkvm::Error with one line naming the image and what to do.
    // Never modifies the file: it is opened, checked and locked only.
    static DiskImage open(const DiskImageOptions& options);

    int fd() const { return fd_.get(); }
    const std::string& path() const { return path_; }
    uint64_t size() const { return size_; }
    bool read_only() const { return read_only_; }
    CacheMode cache() const { return cache_; }
    // O_DIRECT: the host page cache is bypassed.
    bool direct() const { return cache_ == CacheMode::kNone || cache_ == CacheMode::kDirectsync; }
    // O_DSYNC: a write is durable when it completes, with no flush after it.
    bool writes_durable() const { return cache_ == CacheMode::kWritethrough || cache_ == CacheMode::kDirectsync; }
    // unsafe: a flush completes at once and reaches nothing.
    bool flushes_ignored() const { return cache_ == CacheMode::kUnsafe; }
    // What the guest is told at first: a write-back cache it must flush, or
    // one that writes through. It may switch it (virtio-blk's writeback
    // field, the SCSI caching page's WCE); with it off, each write completes
    // durable.
    bool write_cache_default() const { return !writes_durable(); }
    // Buffer and offset alignment O_DIRECT needs (1 without it).
    uint32_t alignment() const { return direct() ? alignment_ : 1; }
    // Where the guest's writes go on a snapshot disk; nullptr otherwise.
    SnapshotOverlay* snapshot() const { return snapshot_.get(); }

private:
    DiskImage() = default;
    Fd fd_;
    std::string path_;
    uint64_t size_ = 0;
    bool read_only_ = false;
    CacheMode cache_ = CacheMode::kWriteback;
    uint32_t alignment_ = kSectorSize;
    std::unique_ptr<SnapshotOverlay> snapshot_;  // after fd_, whose fd it reads
};

}  // namespace lkvm
