// virtio-scsi (virtio 1.x section 5.6): an emulated SCSI controller with one
// target whose logical units are SCSI disks (hw/scsi). Request queues are
// mapped to I/O threads exactly like virtio-blk's; the control queue (task
// management, asynchronous notification) runs on the control loop (lkvm's
// main loop) and reaches requests in flight on the I/O threads by posting to
// each owning thread and waiting for its answer, so the request path takes no
// lock. The event queue is never polled: this controller raises no events.
#pragma once

#include <boost/asio/io_context.hpp>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "disk/disk_image.h"
#include "hw/scsi/scsi_disk.h"
#include "virtio/device.h"
#include "virtio/io_stats.h"
#include "virtio/io_thread.h"
#include "virtio/request_queue.h"

namespace lkvm {

// virtio-scsi response codes and control request types.
namespace virtio_scsi {
constexpr uint8_t kOk = 0, kOverrun = 1, kAborted = 2, kBadTarget = 3, kFailure = 9;
constexpr uint8_t kFunctionComplete = 0, kFunctionSucceeded = 10, kFunctionRejected = 11, kIncorrectLun = 12;
constexpr uint32_t kTypeTmf = 0, kTypeAnQuery = 1, kTypeAnSubscribe = 2;
constexpr uint32_t kTmfAbortTask = 0, kTmfAbortTaskSet = 1, kTmfClearAca = 2, kTmfClearTaskSet = 3,
                   kTmfItNexusReset = 4, kTmfLogicalUnitReset = 5, kTmfQueryTask = 6, kTmfQueryTaskSet = 7;
constexpr size_t kCdbSize = 32, kSenseSize = 96;
constexpr size_t kCmdHeaderBytes = 19;    // lun[8], tag, task_attr, prio, crn; then the CDB
constexpr size_t kCmdResponseBytes = 12;  // sense_len, resid, status_qualifier, status, response; then sense
constexpr unsigned kMaxLun = 16383;       // flat addressing
}  // namespace virtio_scsi

// A LUN address as the driver writes it: 1, target, then the LUN in
// single-level flat or peripheral addressing. Nothing when it names no LUN of target 0.
struct ScsiAddress {
    uint8_t target = 0;
    uint16_t lun = 0;
};
std::optional<ScsiAddress> parse_scsi_lun(const uint8_t (&lun)[8]);

struct ScsiLunSetup {
    uint16_t lun = 0;
    DiskImage image;
    scsi::ScsiDiskOptions disk;
    EngineKind engine = EngineKind::kNative;
    uint16_t ioprio = 0;
    ThrottleGroup* throttle = nullptr;  // the limits the LUN keeps (shared, outlives the device); null: none
    IoErrorPolicy read_error = IoErrorPolicy::kReport, write_error = IoErrorPolicy::kReport;  // rerror=, werror=
    IoErrorStop* error_stop = nullptr;  // pauses the guest for stop and enospc (outlives the device)
};

class ScsiQueue;
class ScsiControlQueue;

class VirtioScsi : public DiskDevice {
public:
    // queue_threads[q] serves request queue q; control_loop is run by one
    // thread and outlives the device.
    VirtioScsi(std::vector<ScsiLunSetup> luns, uint16_t queue_size, const GuestMemory& memory,
               std::vector<IoThread*> queue_threads, boost::asio::io_context& control_loop);
    ~VirtioScsi() override;

    uint16_t device_id() const override { return 8; }
    uint64_t features() const override;
    unsigned num_queues() const override { return 2 + static_cast<unsigned>(queue_threads_.size()); }
    uint16_t max_queue_size() const override { return queue_size_; }
    void read_config(uint64_t offset, std::span<uint8_t> data) override;
    void write_config(uint64_t offset, std::span<const uint8_t> data) override;
    void activate(uint64_t features, std::vector<QueueSetup> queues, std::function<void()> broken) override;
    void reset() override;

    unsigned request_queues() const override { return static_cast<unsigned>(queue_threads_.size()); }
    const IoThread& queue_thread(unsigned q) const override { return *queue_threads_.at(q); }
    const QueueStats& queue_stats(unsigned q) const override { return *stats_.at(q); }
    std::string describe() const override;  // "a.raw lun 0, b.raw lun 1"
    void retry_failed() override;

private:
    friend class ScsiQueue;
    friend class ScsiControlQueue;
    struct Lun {
        explicit Lun(ScsiLunSetup setup);
        uint16_t id;
        DiskImage image;
        scsi::ScsiDisk disk;  // over image
        IoTarget target;
    };
    Lun* find_lun(uint16_t id) const;
    // Runs the task management function on every request queue and calls
    // done(requests found) on the control loop once all queues answered.
    void task_management(uint32_t subtype, uint16_t lun, uint64_t tag, std::function<void(uint32_t)> done);
    void report_io_error(const Lun& lun, int64_t result);

    std::vector<std::unique_ptr<Lun>> luns_;
    std::vector<uint16_t> lun_ids_;
    uint32_t max_sectors_ = UINT32_MAX;  // the smallest transfer limit of the units, in 512-byte sectors
    uint16_t queue_size_;
    const GuestMemory& memory_;
    std::vector<IoThread*> queue_threads_;
    boost::asio::io_context& control_loop_;
    std::vector<std::unique_ptr<QueueStats>> stats_;
    std::atomic<uint32_t> sense_size_{virtio_scsi::kSenseSize}, cdb_size_{virtio_scsi::kCdbSize};

    // activate() and reset() run on vCPU threads, control requests on the
    // control loop: this keeps them apart. The request path never takes it.
    // Shared with the control queue, which may outlive the device (scsi.cc).
    std::shared_ptr<std::mutex> control_mutex_ = std::make_shared<std::mutex>();
    RequestQueues queues_;
    std::shared_ptr<ScsiControlQueue> control_;
    std::atomic<bool> reported_error_{false};
};

}  // namespace lkvm
