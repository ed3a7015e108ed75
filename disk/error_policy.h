// What a failed disk request does: QEMU's werror= and rerror=.
#pragma once

namespace lkvm {

// report: the guest gets the error; ignore: the guest is told it went well;
// stop: the guest pauses and the request runs again at resume; enospc: stop
// for ENOSPC (the host's disk filled up and may be freed), report the rest.
enum class IoErrorPolicy { kReport, kIgnore, kStop, kEnospc };

}  // namespace lkvm
