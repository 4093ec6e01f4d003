#include "common/cluster/lease.h"

#include <algorithm>

namespace nbdcsi::cluster {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

StatusOr<std::unique_ptr<Lease>> Lease::Grant(ClusterStore& store, int64_t ttl_seconds,
                                              LostCallback on_lost) {
  if (ttl_seconds < 1) return Error(EINVAL, "lease TTL must be at least 1 s, not {}", ttl_seconds);
  auto id = store.GrantLease(ttl_seconds);
  if (!id.ok()) return id.status();
  std::unique_ptr<Lease> lease(new Lease(store, *id, ttl_seconds, std::move(on_lost)));
  lease->thread_ = std::thread([l = lease.get()] { l->Run(); });
  return lease;
}

Lease::Lease(ClusterStore& store, LeaseId id, int64_t ttl_seconds, LostCallback on_lost)
    : store_(store), id_(id), ttl_seconds_(ttl_seconds), on_lost_(std::move(on_lost)) {}

Lease::~Lease() { (void)Release(); }

bool Lease::lost() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !lost_.ok();
}

Status Lease::lost_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return lost_;
}

uint64_t Lease::renewals() const {
  std::lock_guard<std::mutex> lock(mu_);
  return renewals_;
}

void Lease::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  // The loss callback may call Release(): the keepalive thread is on its way out then, and a
  // later Stop() from another thread (the destructor) joins it.
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void Lease::Abandon() { Stop(); }

Status Lease::Release() {
  Stop();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (released_) return Status::Ok();
    released_ = true;
    if (!lost_.ok()) return Status::Ok();
  }
  Status s = store_.RevokeLease(id_);
  if (s.code() == ENOENT) return Status::Ok();  // it expired meanwhile: gone either way
  return s;
}

void Lease::Run() {
  const auto ttl = std::chrono::seconds(ttl_seconds_);
  // A third of the TTL leaves two more attempts before the lease can run out.
  const auto interval = std::max<Clock::duration>(
      std::chrono::milliseconds(ttl_seconds_ * 1000 / 3), std::chrono::milliseconds(100));
  // After a failed keepalive, try again sooner: the next success must come before the TTL ends.
  const auto retry = std::min<Clock::duration>(interval, std::chrono::milliseconds(250));
  // The grant itself renewed the lease.
  auto last_renewal = Clock::now();
  auto next = last_renewal + interval;
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    if (cv_.wait_until(lock, next, [&] { return stopping_; })) return;
    lock.unlock();
    const auto sent = Clock::now();
    auto ttl_now = store_.KeepAliveLease(id_);
    lock.lock();
    if (stopping_) return;
    Status why;
    if (ttl_now.ok()) {
      // The server counts the TTL from when it handled the keepalive, which is no earlier than
      // when we sent it.
      last_renewal = sent;
      ++renewals_;
      next = Clock::now() + interval;
      continue;
    }
    if (ttl_now.status().code() == ENOENT) {
      why = Error(ENOENT, "lease {:x} expired: {}", id_, ttl_now.status().message());
    } else if (Clock::now() - last_renewal >= ttl) {
      why = Error(ETIMEDOUT, "lease {:x}: no keepalive succeeded for its TTL of {} s (last: {})",
                  id_, ttl_seconds_, ttl_now.status().message());
    } else {
      next = Clock::now() + retry;
      continue;
    }
    lost_ = why;
    lock.unlock();
    if (on_lost_) on_lost_(why);
    return;
  }
}

}  // namespace nbdcsi::cluster
