// -d PATH,snapshot: the image is opened read-only and stays byte for byte as
// it was; what the guest writes goes to a temporary overlay file that has no
// name (O_TMPFILE, or unlinked at once), so it goes when lkvm does, even
// after kill -9. The overlay is copy-on-write in clusters: a cluster is read
// from the image until the guest first writes to it, and from the overlay
// after. The guest sees an ordinary writable disk.
//
// Concurrency. Every queue of the disk, on whatever I/O thread, shares one
// SnapshotOverlay. A cluster's "allocated" bit is set once its whole content
// is in the overlay and never cleared, so readers need no lock: a cluster not
// yet allocated reads from the image, which never changes (a write racing
// that read is still in flight, and either content is the guest's due).
// Writes into allocated clusters go to the overlay through the engine like
// any other I/O. Everything that allocates (a copy-up, a write, zeroes or a
// discard that reaches a cluster not yet allocated) runs on the engine's
// worker thread (disk/offload.h), which may block: it locks the clusters it
// changes, all at once, so two threads allocating the same cluster take
// turns and neither copies the image over what the other wrote.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "base/fd.h"
#include "disk/io_engine.h"

namespace lkvm {

// Which clusters of a disk are in the overlay, and which a worker is changing.
class ClusterMap {
public:
    // cluster_bytes: a power of two. The last cluster may be short.
    ClusterMap(uint64_t disk_bytes, uint32_t cluster_bytes);

    uint64_t disk_bytes() const { return disk_bytes_; }
    uint32_t cluster_bytes() const { return cluster_bytes_; }
    uint64_t clusters() const { return clusters_; }
    uint64_t cluster_of(uint64_t offset) const { return offset >> shift_; }
    uint64_t cluster_start(uint64_t cluster) const { return cluster << shift_; }
    uint64_t cluster_length(uint64_t cluster) const;

    bool allocated(uint64_t cluster) const { return state_[cluster].load(std::memory_order_acquire) & kAllocated; }
    // Every cluster that [offset, offset + length) touches is allocated.
    bool all_allocated(uint64_t offset, uint64_t length) const;
    uint64_t allocated_clusters() const { return allocated_count_.load(std::memory_order_relaxed); }

    // The maximal runs of [offset, offset + length) whose data is in one
    // place, in order: run(run_offset, run_length, in_overlay).
    template <class Run>
    void for_each_run(uint64_t offset, uint64_t length, Run&& run) const
    {
        uint64_t start = offset;
        const uint64_t end = offset + length;
        while (start < end) {
            const bool overlay = allocated(cluster_of(start));
            uint64_t stop = start;
            while (stop < end && allocated(cluster_of(stop)) == overlay)
                stop = cluster_start(cluster_of(stop) + 1);
            stop = std::min(stop, end);
            run(start, stop - start, overlay);
            start = stop;
        }
    }

    // For workers, which may block: locks clusters first..last, all at once
    // (so that no two workers can wait for each other), waiting while any of
    // them is locked.
    void lock(uint64_t first, uint64_t last);
    void unlock(uint64_t first, uint64_t last);
    // With the cluster locked, once its whole content is in the overlay.
    void set_allocated(uint64_t cluster);

private:
    static constexpr uint8_t kAllocated = 1, kLocked = 2;
    uint64_t disk_bytes_;
    uint32_t cluster_bytes_;
    unsigned shift_;
    uint64_t clusters_;
    std::unique_ptr<std::atomic<uint8_t>[]> state_;
    std::atomic<uint64_t> allocated_count_{0};
    std::mutex mutex_;  // for kLocked changes, and its waiters
    std::condition_variable unlocked_;
};

// The overlay of one snapshot disk, shared by every thread that serves it.
class SnapshotOverlay {
public:
    static constexpr uint32_t kClusterBytes = 64 << 10;

    // Where overlays go: $TMPDIR, else /var/tmp (as QEMU's -snapshot).
    static std::string default_dir();
    // Makes the overlay in dir for the image open on base_fd (size bytes;
    // alignment: what O_DIRECT needs of buffers, 1 without it). Throws
    // lkvm::Error with one line when dir cannot take it.
    SnapshotOverlay(int base_fd, uint64_t size, uint32_t alignment, const std::string& dir,
                    uint32_t cluster_bytes = kClusterBytes);

    int base_fd() const { return base_fd_; }
    int overlay_fd() const { return overlay_.get(); }
    const std::string& dir() const { return dir_; }
    const ClusterMap& map() const { return map_; }
    // How much of the disk the overlay holds.
    uint64_t overlay_bytes() const { return map_.allocated_clusters() * map_.cluster_bytes(); }

    // On a worker thread (they block). write: data to [offset, offset +
    // bytes), after copying up the partly written clusters not yet
    // allocated; returns the bytes written or -errno. zero: zeroes (or, with
    // deallocate, punches) the range in the overlay, clusters partly covered
    // copied up first; returns 0 or -errno. Either sets the clusters it
    // reached allocated only once their content is whole.
    int64_t write(uint64_t offset, std::span<const iovec> data, const std::atomic<bool>& cancel);
    int64_t zero(uint64_t offset, uint64_t length, bool deallocate, const std::atomic<bool>& cancel);

private:
    // Copies the clusters at either end of [offset, offset + length) that
    // it covers only partly, and that are not allocated, from the image.
    int64_t copy_up_ends(uint64_t offset, uint64_t length);
    // With the clusters of [offset, offset + length) locked and their partly
    // covered ends copied up, runs body(); marks the clusters allocated when
    // succeeded(result) says it went well.
    template <class Body, class Succeeded>
    int64_t allocate(uint64_t offset, uint64_t length, Body body, Succeeded succeeded);
    int64_t copy_up(uint64_t cluster);

    int base_fd_;
    uint32_t alignment_;
    std::string dir_;
    Fd overlay_;
    ClusterMap map_;
};

// Turns the requests of one queue for snapshot disks into requests on the
// image and the overlay, and answers each once all its parts are done. Lives
// on the queue's thread, like the queue. Storage for `requests` requests in
// flight, two parts each (a read across one edge between the image and the
// overlay) of up to kPartIovecs buffers, is made up front: the request path
// allocates only beyond that.
class SnapshotRequests {
public:
    // submit_part: hand a part to the engine of that kind; its cookie is the
    // part's tag, to be given back to complete(). finished: the request
    // (its cookie) is done, with the bytes it moved or -errno.
    using SubmitPart = std::function<void(EngineKind, const IoRequest&)>;
    using Finished = std::function<void(uint64_t cookie, int64_t result)>;
    static constexpr size_t kPartIovecs = 8;
    SnapshotRequests(SubmitPart submit_part, Finished finished, size_t requests);
    ~SnapshotRequests();
    SnapshotRequests(const SnapshotRequests&) = delete;
    SnapshotRequests& operator=(const SnapshotRequests&) = delete;

    // request: as for the engine (its fd is not used). A flush is answered
    // at once: nothing in a temporary overlay needs to last.
    void submit(SnapshotOverlay& overlay, EngineKind engine, const IoRequest& request);
    void complete(uint32_t part, int64_t result);
    size_t requests_in_flight() const { return requests_.size() - free_requests_.size(); }

private:
    struct Request {
        uint64_t cookie = 0;
        uint32_t parts_left = 0;
        int64_t moved = 0;
        int64_t error = 0;
    };
    struct Part;

    void add_part();
    uint32_t new_part(uint32_t request);
    void send(EngineKind engine, uint32_t part, IoRequest io);
    void part_done(uint32_t request, int64_t result);

    SubmitPart submit_part_;
    Finished finished_;
    std::vector<Request> requests_;
    std::vector<uint32_t> free_requests_;
    std::vector<std::unique_ptr<Part>> parts_;  // stable: a worker reads its part while it runs
    std::vector<uint32_t> free_parts_;
};

}  // namespace lkvm
