// The one way the datapath's io_uring loops (the engine's workers, the replica client) take an
// SQE: header-only, so each loop keeps it inlined on its hot path.
#pragma once

#include <liburing.h>

namespace nbdcsi::datapath::engine {

// An SQE of `ring`, never null. When the SQ is full, what is queued is handed to the kernel
// first; completions are never dropped (IORING_FEAT_NODROP, Linux 5.5+; the engine's workers
// refuse to start without it), so the submit always frees room.
inline io_uring_sqe* GetSqe(io_uring& ring) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  while (!sqe) {
    io_uring_submit(&ring);
    sqe = io_uring_get_sqe(&ring);
  }
  return sqe;
}

}  // namespace nbdcsi::datapath::engine
