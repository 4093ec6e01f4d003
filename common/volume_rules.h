// Rules about volumes that more than one process applies: the controller rounds CSI capacity
// requests with them, the datapath's pool enforces them. One definition, so they cannot drift.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/status.h"

namespace nbdcsi {

// Volume sizes are a multiple of this: it keeps every volume usable with O_DIRECT on 4Kn disks,
// matches the NBD block size the datapath advertises, and is the block size of every file system
// the node formats. The controller rounds requests up to it; the pool refuses anything else.
inline constexpr uint64_t kVolumeSizeAlignment = 4096;

// Volume and snapshot names: what the pool names files after and etcd keys hold.
inline constexpr size_t kMaxVolumeNameLen = 128;

// EINVAL, "<kind> name ..." + why, unless `name` is 1 to kMaxVolumeNameLen bytes of
// [A-Za-z0-9._-] that does not start with '.' or '-' (so never '/', NUL, ".." or an option).
// A byte outside printable ASCII is shown by value, never raw in the message.
Status ValidateObjectName(std::string_view kind, std::string_view name);

}  // namespace nbdcsi
