// Per-volume counters, updated from the I/O workers and read by the API and /metrics.
//
// The counters are sharded: each I/O worker writes its own shard (the worker's index), a block
// of cache lines no other thread writes, so an I/O costs a few uncontended relaxed adds and no
// cache line moves between cores. Readers (Snapshot) fold the shards. A shard is allocated the
// first time its worker records something for this volume, so a volume costs memory only for the
// workers that served it.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

namespace nbdcsi::datapath {

enum class OpKind : uint8_t { kRead, kWrite, kFlush, kTrim, kWriteZeroes, kBlockStatus, kCount };
inline constexpr int kOpKinds = static_cast<int>(OpKind::kCount);

// Latency histogram: bucket i counts requests whose latency was < 2^i microseconds
// (bucket 0: < 1 us). The last bucket collects everything slower.
inline constexpr int kLatencyBuckets = 24;

// The error codes an NBD reply can carry (the NBD protocol's values, which are Linux's errno
// numbers), counted per code; anything else lands in the last one, "other".
inline constexpr int kNbdErrnoKinds = 9;
inline constexpr std::array<uint32_t, kNbdErrnoKinds - 1> kNbdErrnoValues = {1,  5,  12, 22,
                                                                             28, 75, 95, 108};
inline constexpr std::array<const char*, kNbdErrnoKinds> kNbdErrnoNames = {
    "EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN", "other"};
int NbdErrnoIndex(uint32_t nbd_error);

// Shards: --workers is at most 64; a larger index shares a shard (still exact, only slower).
inline constexpr unsigned kStatShards = 64;

struct VolumeStatsSnapshot {
  std::array<uint64_t, kOpKinds> ops{};
  std::array<uint64_t, kOpKinds> errors{};
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t throttled_ns = 0;   // total time requests spent waiting for QoS tokens
  uint64_t throttled_ops = 0;  // requests that had to wait at least once
  std::array<uint64_t, kLatencyBuckets> read_latency_us{};
  std::array<uint64_t, kLatencyBuckets> write_latency_us{};
  uint64_t connections = 0;  // currently open NBD connections
  // Bytes of the successful requests of each kind: data read or written, the range trimmed or
  // zeroed; FLUSH and BLOCK_STATUS move none.
  std::array<uint64_t, kOpKinds> bytes{};
  // Every kind's latency histogram (read_latency_us and write_latency_us are two of them) and
  // the sum of its latencies.
  std::array<std::array<uint64_t, kLatencyBuckets>, kOpKinds> latency_us{};
  std::array<uint64_t, kOpKinds> latency_ns_sum{};
  // errors[k] split by the reply's error code (kNbdErrnoNames).
  std::array<std::array<uint64_t, kNbdErrnoKinds>, kOpKinds> errors_by_errno{};
  // Requests read from a connection whose reply is not yet queued or that are still on their
  // way out (taken slot to released slot).
  int64_t inflight = 0;
};

class VolumeStats {
 public:
  VolumeStats() = default;
  ~VolumeStats();
  VolumeStats(const VolumeStats&) = delete;
  VolumeStats& operator=(const VolumeStats&) = delete;

  // One finished request, into `shard` (the worker's index). nbd_error 0: success.
  void Record(unsigned shard, OpKind kind, uint64_t bytes, uint64_t latency_ns, uint32_t nbd_error);
  // Shard 0, an error counted as EIO (tools and tests).
  void RecordOp(OpKind kind, uint64_t bytes, uint64_t latency_ns, bool error) {
    Record(0, kind, bytes, latency_ns, error ? 5 : 0);
  }
  // Called once per request that waited, with its total wait, so throttled_ops counts requests
  // rather than retries.
  void RecordThrottle(unsigned shard, uint64_t waited_ns);
  void RecordThrottle(uint64_t waited_ns) { RecordThrottle(0, waited_ns); }
  void RequestStarted(unsigned shard) { At(shard).inflight.fetch_add(1, kRelaxed); }
  void RequestEnded(unsigned shard) { At(shard).inflight.fetch_sub(1, kRelaxed); }
  void ConnectionOpened() { connections_.fetch_add(1, std::memory_order_relaxed); }
  void ConnectionClosed() { connections_.fetch_sub(1, std::memory_order_relaxed); }
  uint64_t connections() const { return connections_.load(std::memory_order_relaxed); }
  VolumeStatsSnapshot Snapshot() const;

  static int LatencyBucket(uint64_t latency_ns);

 private:
  static constexpr auto kRelaxed = std::memory_order_relaxed;
  using Counter = std::atomic<uint64_t>;
  // Written by one worker (fetch_add keeps it exact if a caller shares a shard); its own cache
  // lines, so the workers never write the same line.
  struct alignas(64) Shard {
    std::array<Counter, kOpKinds> ops{}, errors{}, bytes{}, latency_ns_sum{};
    std::array<std::array<Counter, kLatencyBuckets>, kOpKinds> latency{};
    std::array<std::array<Counter, kNbdErrnoKinds>, kOpKinds> errors_by_errno{};
    Counter throttled_ns{0}, throttled_ops{0};
    std::atomic<int64_t> inflight{0};
  };
  Shard& At(unsigned shard);

  std::array<std::atomic<Shard*>, kStatShards> shards_{};
  Counter connections_{0};
};

}  // namespace nbdcsi::datapath
