#include "datapath/pool/stats.h"

#include <bit>

namespace nbdcsi::datapath {

int NbdErrnoIndex(uint32_t nbd_error) {
  for (int i = 0; i < kNbdErrnoKinds - 1; ++i) {
    if (kNbdErrnoValues[i] == nbd_error) return i;
  }
  return kNbdErrnoKinds - 1;
}

int VolumeStats::LatencyBucket(uint64_t latency_ns) {
  // Bucket i holds [2^(i-1), 2^i) us, bucket 0 holds < 1 us: that is the bit width of the
  // whole number of microseconds.
  uint64_t us = latency_ns / 1000;
  int b = static_cast<int>(std::bit_width(us));
  return b < kLatencyBuckets ? b : kLatencyBuckets - 1;
}

VolumeStats::~VolumeStats() {
  for (auto& s : shards_) delete s.load(std::memory_order_acquire);
}

VolumeStats::Shard& VolumeStats::At(unsigned shard) {
  std::atomic<Shard*>& slot = shards_[shard % kStatShards];
  Shard* s = slot.load(std::memory_order_acquire);
  if (s) return *s;
  // First request of this worker on this volume. Two threads sharing a shard index may race
  // here; the loser frees its copy and uses the winner's.
  auto* fresh = new Shard;
  if (slot.compare_exchange_strong(s, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;
  return *s;
}

void VolumeStats::Record(unsigned shard, OpKind kind, uint64_t bytes, uint64_t latency_ns,
                         uint32_t nbd_error) {
  auto k = static_cast<int>(kind);
  if (k < 0 || k >= kOpKinds) return;
  Shard& s = At(shard);
  s.ops[k].fetch_add(1, kRelaxed);
  if (nbd_error) {
    s.errors[k].fetch_add(1, kRelaxed);
    s.errors_by_errno[k][NbdErrnoIndex(nbd_error)].fetch_add(1, kRelaxed);
  } else if (kind != OpKind::kFlush && kind != OpKind::kBlockStatus) {
    // Failed requests moved no data we can vouch for.
    s.bytes[k].fetch_add(bytes, kRelaxed);
  }
  // Failed requests still took time, so they count in the latency histograms (a slow failing
  // disk must be visible there).
  s.latency[k][LatencyBucket(latency_ns)].fetch_add(1, kRelaxed);
  s.latency_ns_sum[k].fetch_add(latency_ns, kRelaxed);
}

void VolumeStats::RecordThrottle(unsigned shard, uint64_t waited_ns) {
  Shard& s = At(shard);
  s.throttled_ns.fetch_add(waited_ns, kRelaxed);
  s.throttled_ops.fetch_add(1, kRelaxed);
}

VolumeStatsSnapshot VolumeStats::Snapshot() const {
  // Each counter is read atomically; the snapshot as a whole is not a consistent cut, which
  // is fine for monitoring and avoids any lock on the I/O path.
  VolumeStatsSnapshot out;
  for (const auto& slot : shards_) {
    const Shard* s = slot.load(std::memory_order_acquire);
    if (!s) continue;
    for (int k = 0; k < kOpKinds; ++k) {
      out.ops[k] += s->ops[k].load(kRelaxed);
      out.errors[k] += s->errors[k].load(kRelaxed);
      out.bytes[k] += s->bytes[k].load(kRelaxed);
      out.latency_ns_sum[k] += s->latency_ns_sum[k].load(kRelaxed);
      for (int b = 0; b < kLatencyBuckets; ++b)
        out.latency_us[k][b] += s->latency[k][b].load(kRelaxed);
      for (int e = 0; e < kNbdErrnoKinds; ++e)
        out.errors_by_errno[k][e] += s->errors_by_errno[k][e].load(kRelaxed);
    }
    out.throttled_ns += s->throttled_ns.load(kRelaxed);
    out.throttled_ops += s->throttled_ops.load(kRelaxed);
    out.inflight += s->inflight.load(kRelaxed);
  }
  out.bytes_read = out.bytes[static_cast<int>(OpKind::kRead)];
  out.bytes_written = out.bytes[static_cast<int>(OpKind::kWrite)];
  out.read_latency_us = out.latency_us[static_cast<int>(OpKind::kRead)];
  out.write_latency_us = out.latency_us[static_cast<int>(OpKind::kWrite)];
  out.connections = connections_.load(kRelaxed);
  return out;
}

}  // namespace nbdcsi::datapath
