// Per-volume QoS: token buckets for IOPS and bandwidth, total / read / write, with burst.
//
// Limit names follow ceph-csi / Rook so the same words appear in StorageClasses:
// maxIops, maxReadIops, maxWriteIops, maxBps, maxReadBps, maxWriteBps, iopsPerGiB, bpsPerGiB.
// A value of 0 means "no limit". The effective total IOPS limit is maxIops if set, otherwise
// iopsPerGiB * size_in_GiB (same for bytes per second). Limits can change live: SetLimits
// keeps the bucket balances (clamped to the new capacity), so a change never grants a burst.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

namespace nbdcsi::datapath {

struct QosLimits {
  uint64_t max_iops = 0;
  uint64_t max_read_iops = 0;
  uint64_t max_write_iops = 0;
  uint64_t max_bps = 0;
  uint64_t max_read_bps = 0;
  uint64_t max_write_bps = 0;
  uint64_t iops_per_gib = 0;
  uint64_t bps_per_gib = 0;
  // Bucket depth in milliseconds of the rate: how much may be spent at once after idling.
  // 0 selects the default (kDefaultBurstMs).
  uint32_t burst_ms = 0;

  static constexpr uint32_t kDefaultBurstMs = 100;

  bool unlimited() const {
    return !max_iops && !max_read_iops && !max_write_iops && !max_bps && !max_read_bps &&
           !max_write_bps && !iops_per_gib && !bps_per_gib;
  }
  bool operator==(const QosLimits&) const = default;
};

// A change of some limits: each field that is set replaces that limit (0 removes it), the others
// are kept. All() sets every field, which replaces the whole set. The pool applies a patch to the
// limits it holds under the volume's guard, so two patches of one volume never lose each other.
struct QosPatch {
  std::optional<uint64_t> max_iops, max_read_iops, max_write_iops;
  std::optional<uint64_t> max_bps, max_read_bps, max_write_bps;
  std::optional<uint64_t> iops_per_gib, bps_per_gib;
  std::optional<uint32_t> burst_ms;

  static QosPatch All(const QosLimits& q);
  QosLimits ApplyTo(QosLimits q) const;
};

// Effective limits for a volume of a given size (per-GiB keys resolved against the size rounded
// up to whole GiB, at least 1 GiB, so a set per-GiB key never resolves to 0 = unlimited;
// products saturate at UINT64_MAX).
struct EffectiveQos {
  uint64_t iops = 0, read_iops = 0, write_iops = 0;
  uint64_t bps = 0, read_bps = 0, write_bps = 0;
  uint32_t burst_ms = QosLimits::kDefaultBurstMs;
};
EffectiveQos Resolve(const QosLimits& limits, uint64_t volume_size_bytes);

// A token bucket. Not thread-safe on its own; Throttle serialises access.
class TokenBucket {
 public:
  // rate == 0: unlimited.
  void Configure(uint64_t rate_per_sec, uint32_t burst_ms, uint64_t now_ns);
  bool limited() const { return rate_ != 0; }
  // Refill to now. Returns nanoseconds until the balance reaches `need` (0 if it already has).
  uint64_t WaitFor(double need, uint64_t now_ns);
  void Spend(double amount) { balance_ -= amount; }
  double balance() const { return balance_; }

 private:
  void Refill(uint64_t now_ns);
  uint64_t rate_ = 0;
  double capacity_ = 0;
  double balance_ = 0;
  uint64_t last_ns_ = 0;
};

// All six buckets of one volume. Thread-safe: connections of one volume may run on
// different worker threads.
class Throttle {
 public:
  enum class Dir { kRead, kWrite, kOther };

  // Applies new limits now. `now_ns` comes from a monotonic clock (injected for tests).
  void SetLimits(const QosLimits& limits, uint64_t volume_size_bytes, uint64_t now_ns);
  QosLimits limits() const;
  EffectiveQos effective() const;
  // Lock-free: asked for every request.
  bool unlimited() const { return unlimited_.load(std::memory_order_acquire); }
  // Changes with every SetLimits: a worker holding requests that wait for tokens re-asks at once
  // when the limits change (a raised or removed limit must not keep them waiting for the old one).
  uint64_t generation() const { return generation_.load(std::memory_order_acquire); }

  // Asks to run one request of `bytes` bytes. Returns 0 and charges the buckets when it may run
  // now; otherwise returns how many nanoseconds to wait before asking again, charging nothing.
  // An IOPS bucket needs one whole token; a bandwidth bucket needs a positive balance and may go
  // into debt by the request's size, so one large request is never starved by a small bucket.
  // Only READ and WRITE are charged (kOther is always admitted; FLUSH/TRIM move no data).
  uint64_t Admit(Dir dir, uint64_t bytes, uint64_t now_ns);

 private:
  mutable std::mutex mu_;
  QosLimits limits_;
  EffectiveQos eff_;
  std::atomic<bool> unlimited_{true};
  std::atomic<uint64_t> generation_{0};
  TokenBucket iops_, read_iops_, write_iops_, bps_, read_bps_, write_bps_;
};

uint64_t MonotonicNowNs();

}  // namespace nbdcsi::datapath
