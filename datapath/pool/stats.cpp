#include "datapath/pool/stats.h"

#include <bit>

namespace nbdcsi::datapath {

namespace {
constexpr auto kRelaxed = std::memory_order_relaxed;
}

int VolumeStats::LatencyBucket(uint64_t latency_ns) {
  // Bucket i holds [2^(i-1), 2^i) us, bucket 0 holds < 1 us: that is the bit width of the
  // whole number of microseconds.
  uint64_t us = latency_ns / 1000;
  int b = static_cast<int>(std::bit_width(us));
  return b < kLatencyBuckets ? b : kLatencyBuckets - 1;
}

void VolumeStats::RecordOp(OpKind kind, uint64_t bytes, uint64_t latency_ns, bool error) {
  auto k = static_cast<int>(kind);
  if (k < 0 || k >= static_cast<int>(OpKind::kCount)) return;
  ops_[k].fetch_add(1, kRelaxed);
  if (error) errors_[k].fetch_add(1, kRelaxed);
  // Failed requests moved no data we can vouch for, but they did take time, so they still
  // count in the latency histograms (a slow failing disk must be visible there).
  if (kind == OpKind::kRead) {
    if (!error) bytes_read_.fetch_add(bytes, kRelaxed);
    read_lat_[LatencyBucket(latency_ns)].fetch_add(1, kRelaxed);
  } else if (kind == OpKind::kWrite) {
    if (!error) bytes_written_.fetch_add(bytes, kRelaxed);
    write_lat_[LatencyBucket(latency_ns)].fetch_add(1, kRelaxed);
  }
}

// Called once per request that waited, with its total wait, so throttled_ops counts requests
// rather than retries.
void VolumeStats::RecordThrottle(uint64_t waited_ns) {
  throttled_ns_.fetch_add(waited_ns, kRelaxed);
  throttled_ops_.fetch_add(1, kRelaxed);
}

VolumeStatsSnapshot VolumeStats::Snapshot() const {
  // Each counter is read atomically; the snapshot as a whole is not a consistent cut, which
  // is fine for monitoring and avoids any lock on the I/O path.
  VolumeStatsSnapshot s;
  for (size_t i = 0; i < s.ops.size(); ++i) {
    s.ops[i] = ops_[i].load(kRelaxed);
    s.errors[i] = errors_[i].load(kRelaxed);
  }
  s.bytes_read = bytes_read_.load(kRelaxed);
  s.bytes_written = bytes_written_.load(kRelaxed);
  s.throttled_ns = throttled_ns_.load(kRelaxed);
  s.throttled_ops = throttled_ops_.load(kRelaxed);
  for (int i = 0; i < kLatencyBuckets; ++i) {
    s.read_latency_us[i] = read_lat_[i].load(kRelaxed);
    s.write_latency_us[i] = write_lat_[i].load(kRelaxed);
  }
  s.connections = connections_.load(kRelaxed);
  return s;
}

}  // namespace nbdcsi::datapath
