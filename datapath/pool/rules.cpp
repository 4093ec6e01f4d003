#include "datapath/pool/rules.h"

namespace nbdcsi::datapath {

namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

}  // namespace

Status ValidateVolumeName(const std::string& name) { return ValidateObjectName("volume", name); }
Status ValidateSnapshotName(const std::string& name) {
  return ValidateObjectName("snapshot", name);
}

Status ValidateVolumeSize(uint64_t size) {
  if (size == 0) return Error(EINVAL, "size must be greater than 0");
  if (size % kVolumeSizeAlignment != 0) {
    return Error(EINVAL, "size {} is not a multiple of {} bytes", size, kVolumeSizeAlignment);
  }
  if (size > kMaxVolumeSize) {
    return Error(EINVAL, "size {} is larger than the maximum file size {}", size, kMaxVolumeSize);
  }
  return Status::Ok();
}

Status ValidateQos(const QosLimits& q, uint64_t size) {
  if (q.burst_ms > kMaxBurstMs) {
    return Error(EINVAL, "QoS burst_ms {} is above the maximum {} ms", q.burst_ms, kMaxBurstMs);
  }
  // Resolve saturates instead of wrapping, so an overflow would silently mean "as fast as a
  // 64-bit rate goes": almost certainly a typo, refused here rather than obeyed.
  const uint64_t gib = size / kGiB + (size % kGiB != 0);
  uint64_t product;
  if (__builtin_mul_overflow(q.iops_per_gib, gib, &product)) {
    return Error(EINVAL, "QoS iops_per_gib {} times {} GiB overflows", q.iops_per_gib, gib);
  }
  if (__builtin_mul_overflow(q.bps_per_gib, gib, &product)) {
    return Error(EINVAL, "QoS bps_per_gib {} times {} GiB overflows", q.bps_per_gib, gib);
  }
  return Status::Ok();
}

Status ValidateFenceEpoch(uint64_t epoch) {
  if (epoch == 0 || epoch > kMaxFenceEpoch)
    return Error(EINVAL, "epoch {} is out of range: epochs are 1..{}", epoch, kMaxFenceEpoch);
  return Status::Ok();
}

}  // namespace nbdcsi::datapath
