// Allocation map of a sparse file for NBD_CMD_BLOCK_STATUS (base:allocation).
#pragma once

#include <cstddef>
#include <cstdint>

#include "datapath/nbd/codec.h"

namespace nbdcsi::datapath {

// Describes [offset, offset + length) of `fd` with SEEK_DATA / SEEK_HOLE: holes are reported as
// NBD_STATE_HOLE | NBD_STATE_ZERO, data as 0. Never describes more than `length` bytes, stops after
// `max_extents` (the client asks again for the rest), and after one extent when `req_one`.
// Returns the number of extents written, or -errno.
int MapExtents(int fd, uint64_t offset, uint32_t length, nbd::Extent* out, size_t max_extents,
               bool req_one);

}  // namespace nbdcsi::datapath
