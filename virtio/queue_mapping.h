// Which I/O thread of a group serves each virtqueue: QEMU's
// iothread-vq-mapping semantics, as a pure function.
#pragma once

#include <vector>

namespace lkvm {

struct DiskQueues {
    unsigned num_queues = 1;
    std::vector<unsigned> threads;  // the disk's iothread= list; empty: the whole group
};

// For each disk, the group thread of each of its queues. A disk with its own
// list spreads its queues round robin over that list; the others spread over
// the whole group, each starting where the previous one stopped, so that
// single-queue disks spread too. Throws lkvm::Error for a thread index
// outside the group.
std::vector<std::vector<unsigned>> map_queues(unsigned group_size, const std::vector<DiskQueues>& disks);

}  // namespace lkvm
