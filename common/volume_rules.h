// Rules about volumes that more than one process applies: the controller rounds CSI capacity
// requests with them, the datapath's pool enforces them. One definition, so they cannot drift.
#pragma once

#include <cstdint>

namespace nbdcsi {

// Volume sizes are a multiple of this: it keeps every volume usable with O_DIRECT on 4Kn disks,
// matches the NBD block size the datapath advertises, and is the block size of every file system
// the node formats. The controller rounds requests up to it; the pool refuses anything else.
inline constexpr uint64_t kVolumeSizeAlignment = 4096;

}  // namespace nbdcsi
