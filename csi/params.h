// StorageClass parameters (CreateVolume.parameters) and VolumeAttributesClass parameters
// (ControllerModifyVolume.mutable_parameters): the QoS keys. See the table in README.md.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace nbdcsi::csi {

// Each field is set only when its key was given. Values are per second; 0 = no limit.
struct QosParameters {
  std::optional<uint64_t> max_iops, max_read_iops, max_write_iops;
  std::optional<uint64_t> max_bps, max_read_bps, max_write_bps;  // bytes per second
  std::optional<uint64_t> iops_per_gib, bps_per_gib;
  std::optional<uint32_t> burst_ms;
  bool empty() const;
  bool operator==(const QosParameters&) const = default;
};

// The accepted keys in table order: maxIops maxReadIops maxWriteIops maxBps maxReadBps
// maxWriteBps iopsPerGiB bpsPerGiB burstMs.
const std::vector<std::string>& QosParameterKeys();

// Keys prefixed "csi.storage.k8s.io/" are skipped (the external-provisioner's own). IOPS keys and
// burstMs take a decimal integer; Bps keys take an integer or a Kubernetes quantity ("100Mi",
// "1G"). EINVAL: an unknown key ("unknown parameter \"maxIOPS\"; known: maxIops, ...") or a bad
// value ("parameter maxBps: bad value \"fast\": ...").
StatusOr<QosParameters> ParseQosParameters(const std::map<std::string, std::string>& params);

}  // namespace nbdcsi::csi
