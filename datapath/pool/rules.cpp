#include "datapath/pool/rules.h"

namespace nbdcsi::datapath {

namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

bool NameByteOk(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

Status ValidateName(const char* kind, const std::string& name) {
  if (name.empty()) return Error(EINVAL, "{} name must not be empty", kind);
  if (name.size() > kMaxVolumeNameLen) {
    return Error(EINVAL, "{} name is {} bytes, the limit is {}", kind, name.size(),
                 kMaxVolumeNameLen);
  }
  if (name.find('\0') != std::string::npos) return Error(EINVAL, "{} name contains NUL", kind);
  if (name.find('/') != std::string::npos) {
    return Error(EINVAL, "{} name must not contain '/'", kind);
  }
  if (name[0] == '.') return Error(EINVAL, "{} name \"{}\" must not start with '.'", kind, name);
  if (name[0] == '-') return Error(EINVAL, "{} name \"{}\" must not start with '-'", kind, name);
  for (unsigned char c : name) {
    if (NameByteOk(c)) continue;
    // A printable character is shown as itself; anything else (control bytes, UTF-8) by value,
    // so the message never carries a byte that would garble a terminal or a log line.
    if (c >= 0x21 && c < 0x7f) {
      return Error(EINVAL,
                   "{} name \"{}\" contains invalid character '{}' (allowed: A-Z a-z 0-9 . _ -)",
                   kind, name, static_cast<char>(c));
    }
    return Error(EINVAL, "{} name contains invalid byte 0x{:02x} (allowed: A-Z a-z 0-9 . _ -)",
                 kind, c);
  }
  return Status::Ok();
}

}  // namespace

Status ValidateVolumeName(const std::string& name) { return ValidateName("volume", name); }
Status ValidateSnapshotName(const std::string& name) { return ValidateName("snapshot", name); }

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
