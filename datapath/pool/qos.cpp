#include "datapath/pool/qos.h"

#include <time.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/qos_fields.h"

namespace nbdcsi::datapath {

namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

uint64_t SaturatingMul(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::numeric_limits<uint64_t>::max();
  return r;
}

}  // namespace

// Per-GiB keys use the size rounded UP to whole GiB, with at least 1 GiB. Rounding up means a
// 1.5 GiB volume is not penalised below what a 1 GiB one gets, and the minimum keeps a tiny
// volume from resolving to 0, which would mean "unlimited".
EffectiveQos Resolve(const QosLimits& limits, uint64_t volume_size_bytes) {
  uint64_t gib = std::max<uint64_t>(1, volume_size_bytes / kGiB + (volume_size_bytes % kGiB != 0));
  EffectiveQos e;
  e.iops = limits.max_iops ? limits.max_iops : SaturatingMul(limits.iops_per_gib, gib);
  e.bps = limits.max_bps ? limits.max_bps : SaturatingMul(limits.bps_per_gib, gib);
  e.read_iops = limits.max_read_iops;
  e.write_iops = limits.max_write_iops;
  e.read_bps = limits.max_read_bps;
  e.write_bps = limits.max_write_bps;
  e.burst_ms = limits.burst_ms ? limits.burst_ms : QosLimits::kDefaultBurstMs;
  return e;
}

QosPatch QosPatch::All(const QosLimits& q) {
  QosPatch p;
#define NBDCSI_QOS_ALL(f, key, flag, kind, help) p.f = q.f;
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_ALL)
#undef NBDCSI_QOS_ALL
  return p;
}

QosLimits QosPatch::ApplyTo(QosLimits q) const {
#define NBDCSI_QOS_APPLY(f, key, flag, kind, help) q.f = f.value_or(q.f);
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_APPLY)
#undef NBDCSI_QOS_APPLY
  return q;
}

void TokenBucket::Configure(uint64_t rate_per_sec, uint32_t burst_ms, uint64_t now_ns) {
  bool was_limited = rate_ != 0;
  // Settle the old rate up to now first, so the change applies from this instant only.
  if (was_limited) Refill(now_ns);
  rate_ = rate_per_sec;
  if (rate_ == 0) {
    capacity_ = balance_ = 0;
    last_ns_ = now_ns;
    return;
  }
  // At least one unit of depth: an IOPS bucket needs one whole token to admit anything and a
  // bandwidth bucket one byte, whatever the rate and burst.
  capacity_ = std::max(1.0, static_cast<double>(rate_) * burst_ms / 1000.0);
  if (was_limited) {
    // Keep the balance (and any debt) so that a live change never hands out a fresh burst.
    balance_ = std::min(balance_, capacity_);
  } else {
    balance_ = capacity_;  // a new bucket starts full
    last_ns_ = now_ns;
  }
}

void TokenBucket::Refill(uint64_t now_ns) {
  // Callers read the clock before taking the Throttle lock, so `now` can be slightly behind
  // the last refill; never move time backwards.
  if (now_ns <= last_ns_) return;
  double add = static_cast<double>(rate_) * static_cast<double>(now_ns - last_ns_) / 1e9;
  balance_ = std::min(capacity_, balance_ + add);
  last_ns_ = now_ns;
}

uint64_t TokenBucket::WaitFor(double need, uint64_t now_ns) {
  if (rate_ == 0) return 0;
  Refill(now_ns);
  if (balance_ >= need) return 0;
  double ns = std::ceil((need - balance_) * 1e9 / static_cast<double>(rate_));
  if (ns < 1) return 1;
  if (ns > 1e18) return static_cast<uint64_t>(1e18);
  return static_cast<uint64_t>(ns);
}

void Throttle::SetLimits(const QosLimits& limits, uint64_t volume_size_bytes, uint64_t now_ns) {
  EffectiveQos e = Resolve(limits, volume_size_bytes);
  std::lock_guard lock(mu_);
  limits_ = limits;
  eff_ = e;
  iops_.Configure(e.iops, e.burst_ms, now_ns);
  read_iops_.Configure(e.read_iops, e.burst_ms, now_ns);
  write_iops_.Configure(e.write_iops, e.burst_ms, now_ns);
  bps_.Configure(e.bps, e.burst_ms, now_ns);
  read_bps_.Configure(e.read_bps, e.burst_ms, now_ns);
  write_bps_.Configure(e.write_bps, e.burst_ms, now_ns);
  unlimited_.store(!e.iops && !e.read_iops && !e.write_iops && !e.bps && !e.read_bps && !e.write_bps,
                   std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
}

QosLimits Throttle::limits() const {
  std::lock_guard lock(mu_);
  return limits_;
}

EffectiveQos Throttle::effective() const {
  std::lock_guard lock(mu_);
  return eff_;
}

uint64_t Throttle::Admit(Dir dir, uint64_t bytes, uint64_t now_ns) {
  if (dir == Dir::kOther) return 0;
  std::lock_guard lock(mu_);
  if (unlimited_.load(std::memory_order_relaxed)) return 0;
  TokenBucket& dir_iops = dir == Dir::kRead ? read_iops_ : write_iops_;
  TokenBucket& dir_bps = dir == Dir::kRead ? read_bps_ : write_bps_;
  // Ask every bucket before charging any, so a request that has to wait is not charged twice.
  uint64_t wait = 0;
  wait = std::max(wait, iops_.WaitFor(1.0, now_ns));
  wait = std::max(wait, dir_iops.WaitFor(1.0, now_ns));
  // Bandwidth: a positive balance (one byte) suffices; the request then goes into debt by its
  // size, which later requests pay off. A 4 MiB write against a 1 MiB bucket still runs.
  wait = std::max(wait, bps_.WaitFor(1.0, now_ns));
  wait = std::max(wait, dir_bps.WaitFor(1.0, now_ns));
  if (wait) return wait;
  if (iops_.limited()) iops_.Spend(1.0);
  if (dir_iops.limited()) dir_iops.Spend(1.0);
  double b = static_cast<double>(bytes);
  if (bps_.limited()) bps_.Spend(b);
  if (dir_bps.limited()) dir_bps.Spend(b);
  return 0;
}

uint64_t MonotonicNowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

}  // namespace nbdcsi::datapath
