// The I/O statistics of a running guest as a table: per I/O thread, then per
// disk queue. Read live from the threads' counters; the --stats table at
// exit and, later, a control socket print the same.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "virtio/io_thread.h"
#include "virtio/request_queue.h"

namespace lkvm {

std::string format_io_stats(const std::vector<std::unique_ptr<IoThread>>& threads,
                            const std::vector<std::unique_ptr<DiskDevice>>& disks);

}  // namespace lkvm
