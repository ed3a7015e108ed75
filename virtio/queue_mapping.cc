#include "virtio/queue_mapping.h"

#include <string>

#include "base/error.h"

namespace lkvm {

std::vector<std::vector<unsigned>> map_queues(unsigned group_size, const std::vector<DiskQueues>& disks)
{
    if (group_size == 0)
        throw Error("an I/O thread group needs at least one thread");
    std::vector<std::vector<unsigned>> map;
    unsigned next = 0;  // where the next disk without its own list starts
    for (size_t d = 0; d < disks.size(); ++d) {
        const DiskQueues& disk = disks[d];
        for (const unsigned k : disk.threads)
            if (k >= group_size)
                throw Error("disk " + std::to_string(d) + ": iothread=" + std::to_string(k) + " but --iothreads " +
                            std::to_string(group_size) + " has threads 0-" + std::to_string(group_size - 1));
        std::vector<unsigned> threads(disk.num_queues);
        for (unsigned q = 0; q < disk.num_queues; ++q) {
            if (!disk.threads.empty()) {
                threads[q] = disk.threads[q % disk.threads.size()];
                continue;
            }
            threads[q] = next;
            next = (next + 1) % group_size;
        }
        map.push_back(std::move(threads));
    }
    return map;
}

}  // namespace lkvm
