// Per-volume counters, updated lock-free from the I/O workers and read by the API.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

namespace nbdcsi::datapath {

enum class OpKind : uint8_t { kRead, kWrite, kFlush, kTrim, kWriteZeroes, kBlockStatus, kCount };

// Latency histogram: bucket i counts requests whose latency was < 2^i microseconds
// (bucket 0: < 1 us). The last bucket collects everything slower.
inline constexpr int kLatencyBuckets = 24;

struct VolumeStatsSnapshot {
  std::array<uint64_t, static_cast<int>(OpKind::kCount)> ops{};
  std::array<uint64_t, static_cast<int>(OpKind::kCount)> errors{};
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t throttled_ns = 0;   // total time requests spent waiting for QoS tokens
  uint64_t throttled_ops = 0;  // requests that had to wait at least once
  std::array<uint64_t, kLatencyBuckets> read_latency_us{};
  std::array<uint64_t, kLatencyBuckets> write_latency_us{};
  uint64_t connections = 0;    // currently open NBD connections
};

class VolumeStats {
 public:
  void RecordOp(OpKind kind, uint64_t bytes, uint64_t latency_ns, bool error);
  void RecordThrottle(uint64_t waited_ns);
  void ConnectionOpened() { connections_.fetch_add(1, std::memory_order_relaxed); }
  void ConnectionClosed() { connections_.fetch_sub(1, std::memory_order_relaxed); }
  uint64_t connections() const { return connections_.load(std::memory_order_relaxed); }
  VolumeStatsSnapshot Snapshot() const;

  static int LatencyBucket(uint64_t latency_ns);

 private:
  using Counter = std::atomic<uint64_t>;
  std::array<Counter, static_cast<int>(OpKind::kCount)> ops_{};
  std::array<Counter, static_cast<int>(OpKind::kCount)> errors_{};
  Counter bytes_read_{0}, bytes_written_{0}, throttled_ns_{0}, throttled_ops_{0};
  std::array<Counter, kLatencyBuckets> read_lat_{};
  std::array<Counter, kLatencyBuckets> write_lat_{};
  Counter connections_{0};
};

}  // namespace nbdcsi::datapath
