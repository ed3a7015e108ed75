// A disk image: a raw file or a block device, opened once for the life of the
// VM with an open-file-description lock, so that a second lkvm cannot open
// the same image for writing (read-only users share it).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "base/fd.h"
#include "disk/snapshot.h"

namespace lkvm {

struct DiskImageOptions {
    std::string path;
    bool read_only = false;
    bool direct = false;  // O_DIRECT: bypass the host page cache
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
    bool direct() const { return direct_; }
    // Buffer and offset alignment O_DIRECT needs (1 without it).
    uint32_t alignment() const { return direct_ ? alignment_ : 1; }
    // Where the guest's writes go on a snapshot disk; nullptr otherwise.
    SnapshotOverlay* snapshot() const { return snapshot_.get(); }

private:
    DiskImage() = default;
    Fd fd_;
    std::string path_;
    uint64_t size_ = 0;
    bool read_only_ = false;
    bool direct_ = false;
    uint32_t alignment_ = kSectorSize;
    std::unique_ptr<SnapshotOverlay> snapshot_;  // after fd_, whose fd it reads
};

}  // namespace lkvm
