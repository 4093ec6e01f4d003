// A lease kept alive on its own thread: what a target holds while it serves a volume, and what
// a node's liveness key hangs on.
//
// Keepalives go out every TTL/3. A keepalive answered "expired" means the lease is lost at once;
// keepalives that fail (backend unreachable) mean it is lost once the TTL has passed since the
// last renewal, because from then on the backend may have expired it and another node may have
// claimed. Loss is reported once, through the callback (on the keepalive thread) and lost();
// after a loss the holder must stop acting on anything attached to the lease. The callback may
// call Release() but must not destroy the Lease.
//
// A keepalive that hangs counts against the TTL only when it returns, so the store's per-call
// deadline (EtcdOptions::call_timeout) should be well under the TTL for a timely report.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "common/cluster/cluster_store.h"

namespace nbdcsi::cluster {

class Lease {
 public:
  using LostCallback = std::function<void(const Status& why)>;

  // Grants a lease of `ttl_seconds` (>= 1) through `store` and starts keeping it alive. `store`
  // must outlive the Lease.
  static StatusOr<std::unique_ptr<Lease>> Grant(ClusterStore& store, int64_t ttl_seconds,
                                                LostCallback on_lost = {});
  // Release().
  ~Lease();
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;

  LeaseId id() const { return id_; }
  int64_t ttl_seconds() const { return ttl_seconds_; }
  bool lost() const;
  // Why it was lost (OK while it is not).
  Status lost_reason() const;
  // How many keepalives succeeded (tests and metrics).
  uint64_t renewals() const;

  // Stops the keepalives and revokes the lease, dropping what is attached to it at once (the
  // unstage path). Idempotent; the result of the revoke (OK when it was lost already).
  Status Release();
  // Stops the keepalives without revoking: the lease runs out within its TTL (a holder that
  // wants its claims to outlive it briefly, and tests of expiry).
  void Abandon();

 private:
  Lease(ClusterStore& store, LeaseId id, int64_t ttl_seconds, LostCallback on_lost);
  void Run();
  void Stop();

  ClusterStore& store_;
  const LeaseId id_;
  const int64_t ttl_seconds_;
  LostCallback on_lost_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool released_ = false;
  Status lost_;
  uint64_t renewals_ = 0;
  std::thread thread_;
};

}  // namespace nbdcsi::cluster
