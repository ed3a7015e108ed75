#include "disk/snapshot.h"

#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "base/error.h"
#include "disk/offload.h"

namespace lkvm {

namespace {

uint64_t iov_bytes(std::span<const iovec> iov)
{
    uint64_t n = 0;
    for (const iovec& v : iov)
        n += v.iov_len;
    return n;
}

// out = the bytes of iov from skip on, length of them (storage reused).
void slice(std::span<const iovec> iov, uint64_t skip, uint64_t length, std::vector<iovec>& out)
{
    out.clear();
    for (const iovec& v : iov) {
        if (length == 0)
            break;
        if (skip >= v.iov_len) {
            skip -= v.iov_len;
            continue;
        }
        const size_t take = static_cast<size_t>(std::min<uint64_t>(v.iov_len - skip, length));
        out.push_back({static_cast<uint8_t*>(v.iov_base) + skip, take});
        length -= take;
        skip = 0;
    }
}

// pwritev until all of iov is written (IOV_MAX at a time); bytes or -errno.
int64_t write_all(int fd, std::span<const iovec> iov, uint64_t offset)
{
    std::vector<iovec> left(iov.begin(), iov.end());
    size_t first = 0;
    int64_t total = 0;
    while (first < left.size()) {
        const int count = static_cast<int>(std::min<size_t>(left.size() - first, IOV_MAX));
        const ssize_t n = ::pwritev(fd, &left[first], count, static_cast<off_t>(offset + total));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;
        total += n;
        size_t done = static_cast<size_t>(n);
        while (first < left.size() && done >= left[first].iov_len)
            done -= left[first++].iov_len;
        if (first < left.size()) {
            left[first].iov_base = static_cast<uint8_t*>(left[first].iov_base) + done;
            left[first].iov_len -= done;
        }
    }
    return total;
}

}  // namespace

ClusterMap::ClusterMap(uint64_t disk_bytes, uint32_t cluster_bytes)
    : disk_bytes_(disk_bytes),
      cluster_bytes_(cluster_bytes),
      shift_(static_cast<unsigned>(std::countr_zero(cluster_bytes))),
      clusters_(cluster_bytes ? (disk_bytes + cluster_bytes - 1) / cluster_bytes : 0),
      state_(std::make_unique<std::atomic<uint8_t>[]>(clusters_))
{
    if (!std::has_single_bit(cluster_bytes))
        throw Error("snapshot cluster size " + std::to_string(cluster_bytes) + " is not a power of two");
}

uint64_t ClusterMap::cluster_length(uint64_t cluster) const
{
    return std::min<uint64_t>(cluster_bytes_, disk_bytes_ - cluster_start(cluster));
}

bool ClusterMap::all_allocated(uint64_t offset, uint64_t length) const
{
    if (length == 0)
        return true;
    for (uint64_t c = cluster_of(offset), last = cluster_of(offset + length - 1); c <= last; ++c)
        if (!allocated(c))
            return false;
    return true;
}

void ClusterMap::lock(uint64_t first, uint64_t last)
{
    std::unique_lock guard(mutex_);
    unlocked_.wait(guard, [&] {
        for (uint64_t c = first; c <= last; ++c)
            if (state_[c].load(std::memory_order_relaxed) & kLocked)
                return false;
        return true;
    });
    for (uint64_t c = first; c <= last; ++c)
        state_[c].fetch_or(kLocked, std::memory_order_relaxed);
}

void ClusterMap::unlock(uint64_t first, uint64_t last)
{
    {
        std::lock_guard guard(mutex_);
        for (uint64_t c = first; c <= last; ++c)
            state_[c].fetch_and(static_cast<uint8_t>(~kLocked), std::memory_order_relaxed);
    }
    unlocked_.notify_all();
}

void ClusterMap::set_allocated(uint64_t cluster)
{
    // Release: whoever sees the bit sees the overlay's content written before.
    if (!(state_[cluster].fetch_or(kAllocated, std::memory_order_release) & kAllocated))
        allocated_count_.fetch_add(1, std::memory_order_relaxed);
}

std::string SnapshotOverlay::default_dir()
{
    const char* dir = std::getenv("TMPDIR");
    return dir && *dir ? dir : "/var/tmp";
}

SnapshotOverlay::SnapshotOverlay(int base_fd, uint64_t size, uint32_t alignment, const std::string& dir,
                                 uint32_t cluster_bytes)
    : base_fd_(base_fd), alignment_(std::max<uint32_t>(alignment, 1)), dir_(dir), map_(size, cluster_bytes)
{
    const std::string what = "snapshot: cannot create the overlay in " + dir;
    const std::string hint = "; set TMPDIR to a writable directory";
    // Sparse: it takes room only where the guest writes.
    const auto sized = [&](int fd) {
        if (::ftruncate(fd, static_cast<off_t>(size)) < 0)
            throw Error(what + ": cannot make it " + std::to_string(size) + " bytes (" + std::strerror(errno) + ")" +
                        hint);
    };
    Fd fd(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
    if (fd.valid()) {
        sized(fd.get());
    } else if (errno == EOPNOTSUPP || errno == EISDIR) {
        // A file system without O_TMPFILE (9p, say): a named file, its name
        // gone as soon as it is sized (9p sizes by name).
        std::string name = dir + "/lkvm-snapshot.XXXXXX";
        fd.reset(::mkostemp(name.data(), O_CLOEXEC));
        if (fd.valid()) {
            try {
                sized(fd.get());
            } catch (...) {
                ::unlink(name.c_str());
                throw;
            }
            ::unlink(name.c_str());
        }
    }
    if (!fd.valid())
        throw Error(what + " (" + std::strerror(errno) + ")" + hint);
    overlay_ = std::move(fd);
}

int64_t SnapshotOverlay::copy_up(uint64_t cluster)
{
    const uint64_t start = map_.cluster_start(cluster);
    const size_t length = static_cast<size_t>(map_.cluster_length(cluster));
    // Aligned for an O_DIRECT image.
    const size_t align = std::max<size_t>(alignment_, 4096);
    void* raw = nullptr;
    if (::posix_memalign(&raw, align, (length + align - 1) / align * align) != 0)
        return -ENOMEM;
    std::unique_ptr<void, void (*)(void*)> buffer(raw, ::free);
    for (size_t done = 0; done < length;) {
        const ssize_t n = ::pread(base_fd_, static_cast<uint8_t*>(raw) + done, length - done,
                                  static_cast<off_t>(start + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += static_cast<size_t>(n);
    }
    const iovec whole{raw, length};
    const int64_t written = write_all(overlay_.get(), std::span(&whole, 1), start);
    return written < 0 ? written : 0;
}

int64_t SnapshotOverlay::copy_up_ends(uint64_t offset, uint64_t length)
{
    const uint64_t first = map_.cluster_of(offset), last = map_.cluster_of(offset + length - 1);
    const auto partly = [&](uint64_t c) {
        const uint64_t start = map_.cluster_start(c);
        return offset > start || offset + length < start + map_.cluster_length(c);
    };
    for (const uint64_t c : {first, last}) {
        if (!map_.allocated(c) && partly(c))
            if (const int64_t err = copy_up(c))
                return err;
        if (first == last)
            break;
    }
    return 0;
}

template <class Body, class Succeeded>
int64_t SnapshotOverlay::allocate(uint64_t offset, uint64_t length, Body body, Succeeded succeeded)
{
    if (offset > map_.disk_bytes() || length > map_.disk_bytes() - offset)
        return -EINVAL;
    if (length == 0)
        return 0;
    const uint64_t first = map_.cluster_of(offset), last = map_.cluster_of(offset + length - 1);
    map_.lock(first, last);
    int64_t result = copy_up_ends(offset, length);
    if (result == 0)
        result = body();
    if (succeeded(result))
        for (uint64_t c = first; c <= last; ++c)
            map_.set_allocated(c);
    map_.unlock(first, last);
    return result;
}

int64_t SnapshotOverlay::write(uint64_t offset, std::span<const iovec> data, const std::atomic<bool>&)
{
    const uint64_t length = iov_bytes(data);
    return allocate(offset, length, [&] { return write_all(overlay_.get(), data, offset); },
                    [&](int64_t result) { return result == static_cast<int64_t>(length); });
}

int64_t SnapshotOverlay::zero(uint64_t offset, uint64_t length, bool deallocate, const std::atomic<bool>& cancel)
{
    // A hole reads as zeroes too, and the cluster is then the overlay's:
    // what the image has there is never read again.
    return allocate(
        offset, length,
        [&] {
            IoRequest request{deallocate ? IoOp::kDiscard : IoOp::kWriteZeroes, overlay_.get(), offset};
            request.length = length;
            return perform_allocation(request, cancel);
        },
        [](int64_t result) { return result == 0; });
}

// A part of a request: a read or write on one of the two files through the
// engine, or (op kBlocking) an allocating write, zeroes or discard that the
// engine's worker runs through the overlay.
struct SnapshotRequests::Part final : BlockingJob {
    uint32_t request = 0;
    std::vector<iovec> iov;
    SnapshotOverlay* overlay = nullptr;
    IoOp op = IoOp::kRead;
    uint64_t offset = 0, length = 0;

    int64_t run(const std::atomic<bool>& cancel) override
    {
        if (op == IoOp::kWrite)
            return overlay->write(offset, iov, cancel);
        return overlay->zero(offset, length, op == IoOp::kDiscard, cancel);
    }
};

SnapshotRequests::SnapshotRequests(SubmitPart submit_part, Finished finished, size_t requests)
    : submit_part_(std::move(submit_part)), finished_(std::move(finished)), requests_(requests)
{
    free_requests_.reserve(requests);
    for (size_t i = requests; i-- > 0;)
        free_requests_.push_back(static_cast<uint32_t>(i));
    for (size_t i = 0; i < 2 * requests; ++i)
        add_part();
}

void SnapshotRequests::add_part()
{
    parts_.push_back(std::make_unique<Part>());
    parts_.back()->iov.reserve(kPartIovecs);
    free_parts_.reserve(parts_.size());  // complete() never allocates
    free_parts_.push_back(static_cast<uint32_t>(parts_.size() - 1));
}

SnapshotRequests::~SnapshotRequests() = default;

uint32_t SnapshotRequests::new_part(uint32_t request)
{
    if (free_parts_.empty())
        add_part();
    const uint32_t id = free_parts_.back();
    free_parts_.pop_back();
    parts_[id]->request = request;
    ++requests_[request].parts_left;
    return id;
}

void SnapshotRequests::send(EngineKind engine, uint32_t part, IoRequest io)
{
    io.cookie = part;
    submit_part_(engine, io);
}

void SnapshotRequests::submit(SnapshotOverlay& overlay, EngineKind engine, const IoRequest& r)
{
    if (r.op == IoOp::kFlush)
        return finished_(r.cookie, 0);
    const ClusterMap& map = overlay.map();
    const std::span<const iovec> data(r.iov, static_cast<size_t>(std::max(r.iovcnt, 0)));
    const bool moves_data = r.op == IoOp::kRead || r.op == IoOp::kWrite;
    const uint64_t length = moves_data ? iov_bytes(data) : r.length;
    if (r.op == IoOp::kBlocking || r.offset > map.disk_bytes() || length > map.disk_bytes() - r.offset)
        return finished_(r.cookie, -EINVAL);  // the devices check ranges first: a bug if it gets here

    if (free_requests_.empty()) {
        requests_.emplace_back();
        free_requests_.reserve(requests_.size());
        free_requests_.push_back(static_cast<uint32_t>(requests_.size() - 1));
    }
    const uint32_t id = free_requests_.back();
    free_requests_.pop_back();
    // One part more than sent, dropped at the end: the request cannot
    // finish while its parts are still being sent.
    requests_[id] = {r.cookie, 1, 0, 0};

    if (r.op == IoOp::kRead) {
        uint64_t skip = 0;
        map.for_each_run(r.offset, length, [&](uint64_t at, uint64_t bytes, bool in_overlay) {
            const uint32_t p = new_part(id);
            std::vector<iovec>& iov = parts_[p]->iov;
            slice(data, skip, bytes, iov);
            skip += bytes;
            send(engine, p,
                 {IoOp::kRead, in_overlay ? overlay.overlay_fd() : overlay.base_fd(), at, iov.data(),
                  static_cast<int>(iov.size()), 0, r.ioprio});
        });
    } else if (map.all_allocated(r.offset, length)) {
        // Only the overlay is touched: the engine does it like any other I/O.
        const uint32_t p = new_part(id);
        std::vector<iovec>& iov = parts_[p]->iov;
        iov.assign(data.begin(), data.end());
        IoRequest io{r.op, overlay.overlay_fd(), r.offset, iov.data(), static_cast<int>(iov.size()), 0, r.ioprio};
        io.length = r.length;
        send(engine, p, io);
    } else {
        const uint32_t p = new_part(id);
        Part& part = *parts_[p];
        part.iov.assign(data.begin(), data.end());
        part.overlay = &overlay;
        part.op = r.op;
        part.offset = r.offset;
        part.length = length;
        IoRequest io{IoOp::kBlocking, -1, r.offset};
        io.job = &part;
        send(engine, p, io);
    }
    part_done(id, 0);
}

void SnapshotRequests::complete(uint32_t part, int64_t result)
{
    if (part >= parts_.size())
        return;
    const uint32_t request = parts_[part]->request;
    free_parts_.push_back(part);
    part_done(request, result);
}

void SnapshotRequests::part_done(uint32_t id, int64_t result)
{
    Request& request = requests_[id];
    if (result < 0 && request.error == 0)
        request.error = result;
    else if (result > 0)
        request.moved += result;
    if (--request.parts_left > 0)
        return;
    const uint64_t cookie = request.cookie;
    const int64_t answer = request.error ? request.error : request.moved;
    free_requests_.push_back(id);
    finished_(cookie, answer);
}

}  // namespace lkvm
