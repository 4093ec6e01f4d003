// The pool's rules for names, sizes and QoS limits: the one place each is checked. Every entry
// point of the pool applies them before it touches anything, the metadata loader applies them to
// what it reads back, and the management API forwards requests without checking them again, so
// one rule gives one errno and one message wherever it is broken.
//
//   rule                                                         errno   the message says
//   name: empty, over kMaxVolumeNameLen bytes, has '/' or NUL,    EINVAL  "<kind> name ..." + why
//         starts with '.' or '-', a byte outside [A-Za-z0-9._-]
//   size: 0                                                      EINVAL  "greater than 0"
//   size: not a multiple of kVolumeSizeAlignment                 EINVAL  "multiple of 4096 bytes"
//   size: above kMaxVolumeSize (the largest file size, off_t)    EINVAL  "maximum file size"
//   QoS:  burst_ms above kMaxBurstMs                             EINVAL  "burst_ms"
//   QoS:  iops_per_gib or bps_per_gib x the size in whole GiB    EINVAL  "<n> GiB overflows"
//         does not fit 64 bits
//   fence epoch: 0 or above kMaxFenceEpoch                       EINVAL  "epoch ..."
//
// Too large a size is EINVAL, not EFBIG: no state of the pool makes such a request valid (it is a
// wrong argument, INVALID_ARGUMENT over gRPC), whereas EFBIG is what the file system says when it
// refuses a size the request itself could have. Capacity (ENOSPC) is a rule about the pool's
// state, not the request: see Pool::Create.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "common/status.h"
#include "common/volume_rules.h"
#include "datapath/pool/qos.h"

namespace nbdcsi::datapath {

using nbdcsi::kMaxVolumeNameLen;     // common/volume_rules.h
using nbdcsi::kVolumeSizeAlignment;  // common/volume_rules.h
// A data file cannot be larger than off_t reaches.
inline constexpr uint64_t kMaxVolumeSize = static_cast<uint64_t>(std::numeric_limits<off_t>::max());
// Fence epochs are 1..2^63-1 (they travel as decimal text in export names and as int64 in
// places that have no unsigned type; 0 means "never fenced").
inline constexpr uint64_t kMaxFenceEpoch = static_cast<uint64_t>(INT64_MAX);
// Upper bound for QosLimits::burst_ms: a minute of the rate is already a very deep bucket.
inline constexpr uint32_t kMaxBurstMs = 60000;

// Names: 1..128 bytes of [A-Za-z0-9._-], not starting with '.' or '-'. This rules out '/', "..",
// NUL and anything a shell or a file system would treat specially. The message says why.
Status ValidateVolumeName(const std::string& name);
// The same rules for snapshot names (a separate namespace); messages say "snapshot name".
Status ValidateSnapshotName(const std::string& name);

// A volume size. Messages start with "size" so callers can put the volume's name in front.
Status ValidateVolumeSize(uint64_t size);

// Limits the throttle can represent for a volume of `size` bytes (per-GiB keys resolve against
// the size rounded up to whole GiB, qos.h Resolve). Size 0 means "not known yet": only the rules
// that do not depend on the size are checked. Messages start with "QoS".
Status ValidateQos(const QosLimits& q, uint64_t size);

// An epoch a volume may be fenced to (Pool::FenceVolume). Messages start with "epoch".
Status ValidateFenceEpoch(uint64_t epoch);

}  // namespace nbdcsi::datapath
