// ReplicaSet: the fan-out at the heart of a replicated volume's target (issue 16).
//
// The target datapath serves the volume to the kernel through the engine (an ExportBackend,
// datapath/engine/backend.h); every request the engine admits comes here and goes to the
// replicas, each reached through a ReplicaChannel (a ReplicaClient connected at the target's
// epoch, so a replica that has seen a newer epoch refuses it).
//
// The rules (docs/design.md, "Node-independent volumes"):
//   - A write, TRIM, WRITE_ZEROES or FLUSH is acknowledged only when every replica that the
//     cluster state still lists as in sync has done it. A replica that fails one (a server
//     error, a lost connection, a timeout) stops getting requests at once and is dropped from
//     the in-sync set by Membership::SetInSync, and only after that succeeded is the request
//     acknowledged without it. Requests that were not sent to a replica because it was already
//     failing wait for the same confirmation.
//   - If that change of the cluster state fails (the target lost its claim: partitioned from
//     etcd, or a newer target exists), the set stops: every waiting and later request fails
//     with EIO, because another target may already serve the volume.
//   - A replica that answers EPERM has been fenced by a newer target (a newer epoch): the set
//     stops at once, drops nobody, and the request fails with EIO.
//   - The last in-sync replica is never dropped: when the requests that failed leave nobody in
//     sync, the set stops instead.
//   - When every replica a write went to failed, nothing is dropped and the write fails (with
//     the replicas' common errno, else EIO).
//   - Reads go to one in-sync replica (the preferred node first: the local one); a failed read
//     is retried on another in-sync replica and the failing one is dropped in the background.
//   - While a replica is out of sync, the ranges written without it are recorded durably in the
//     OutOfSyncLog (when there is one) before the write is acknowledged, so that a returning
//     replica copies only those.
//   - Reconciliation (after the previous target ended uncleanly, ReplicaSetOptions::
//     reconcile_from): the in-sync replicas may differ wherever that target had writes in flight
//     (applied by some replicas, never acknowledged). Until Reconcile() has made them identical,
//     every read goes to one replica, the source (when it leaves the in-sync set, the next reader
//     becomes the source: what it holds is what the others get). Reconcile() copies the whole
//     volume from the source to every in-sync replica, one region at a time, while the volume is
//     in use: writes to the region being copied wait (LockRange), so a copy never overwrites a
//     newer write, and the copy is written through the set like any write (acknowledged only
//     when every in-sync replica has it; a replica that fails it is dropped as usual).
//
// Threads: Submit from any thread; done callbacks run on a channel's I/O thread, on the
// membership thread, or inline in Submit. Membership::SetInSync runs on the set's own thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/cluster/cluster_store.h"
#include "common/status.h"
#include "datapath/engine/backend.h"
#include "datapath/replica/client.h"

namespace nbdcsi::replica {

// One replica of the volume as the set sees it: ReplicaClient in production (ClientChannel),
// fakes in unit tests. The contract of each call is ReplicaClient's: an error return and no
// callback, or OK and the callback exactly once.
class ReplicaChannel {
 public:
  virtual ~ReplicaChannel() = default;
  virtual Status Read(uint64_t offset, std::span<uint8_t> buf, Callback cb) = 0;
  virtual Status Write(uint64_t offset, std::span<const uint8_t> data, bool fua, Callback cb) = 0;
  virtual Status Flush(Callback cb) = 0;
  virtual Status Trim(uint64_t offset, uint32_t length, bool fua, Callback cb) = 0;
  virtual Status WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole,
                             Callback cb) = 0;
  // Everything in flight completes (ESHUTDOWN at the latest) before Close returns.
  virtual void Close() = 0;
  virtual ClientCounters counters() const = 0;
  // The replica's export grew to at least `size` (confirmed by the server): requests up to
  // `size` may go. ENOSPC when it is smaller. Channels that cannot tell: ENOTSUP.
  virtual Status Grow(uint64_t size) {
    return Error(ENOTSUP, "this replica channel cannot grow to {} bytes", size);
  }
};

// A ReplicaClient as a ReplicaChannel.
std::unique_ptr<ReplicaChannel> ClientChannel(std::unique_ptr<ReplicaClient> client);

// Where the target records the in-sync set: the cluster state, at the target's epoch.
class Membership {
 public:
  virtual ~Membership() = default;
  // Blocking; called on the set's membership thread only. An error means the target can no
  // longer show that it owns the volume, and the set stops.
  virtual Status SetInSync(const std::vector<std::string>& in_sync) = 0;
};

// ClusterStore::SetInSync as the node holding the claim at `epoch`. Unreachable-backend errors
// (EAGAIN, ETIMEDOUT) are retried with back-off for up to `retry_for`; anything else (ESTALE: the
// claim is gone) fails at once.
class ClusterMembership final : public Membership {
 public:
  ClusterMembership(cluster::ClusterStore& store, std::string volume, std::string node,
                    uint64_t epoch,
                    std::chrono::milliseconds retry_for = std::chrono::milliseconds(5000));
  Status SetInSync(const std::vector<std::string>& in_sync) override;

 private:
  cluster::ClusterStore& store_;
  std::string volume_, node_;
  uint64_t epoch_;
  std::chrono::milliseconds retry_for_;
};

// Durable record of the ranges a replica misses while it is out of sync (the resync's input).
class OutOfSyncLog {
 public:
  using Done = std::function<void(const Status&)>;
  virtual ~OutOfSyncLog() = default;
  // Records that [offset, offset + length) of the volume may be stale on `node`; `done` once the
  // record is durable: inline when it was already (the common case), else from any thread, and
  // never blocking the caller on a sync. The write missing from `node` is acknowledged only
  // after it; an error fails that write with EIO (a range the log does not hold cannot be
  // resynced from it).
  virtual void MarkOutOfSync(const std::string& node, uint64_t offset, uint64_t length,
                             Done done) = 0;
};

struct ReplicaSetOptions {
  std::string volume;
  uint64_t size = 0;
  // Reads go to this node's replica while it is in sync (the target's local one), else to the
  // first in-sync replica.
  std::string preferred_node;
  // Non-empty: the set starts reconciling, with the replica on this node (in sync) as the source
  // every read goes to until EndReconcile.
  std::string reconcile_from = {};
};

struct ReplicaMember {
  std::string node;
  // Null for a replica that is out of sync when the set is made (a later resync readmits it
  // with one).
  std::unique_ptr<ReplicaChannel> channel;
  bool in_sync = true;
};

enum class MemberState { kInSync, kFailing, kOut };
const char* MemberStateName(MemberState s);

struct MemberHealth {
  std::string node;
  MemberState state = MemberState::kInSync;
  std::string why;  // the first failure that took it out of sync
  ClientCounters counters;
};

struct ReplicaSetHealth {
  std::vector<MemberHealth> members;
  std::vector<std::string> in_sync;  // as last recorded in the cluster state
  bool degraded = false;             // fewer in sync than members
  bool stopped = false;
  std::string stop_reason;
  uint64_t acked_degraded = 0;  // writes acknowledged while some member missed them
  // Reconciling: the in-sync replicas may still differ; reads go to `reconcile_source` only.
  bool reconciling = false;
  std::string reconcile_source;
  uint64_t reconcile_done_bytes = 0;  // of the current Reconcile pass
  // A change failed after it may have reached some replica (or was in flight at a stop): the
  // replicas may differ there, so the end of this set is not clean.
  bool may_differ = false;
};

struct ReconcileOptions {
  uint32_t region_bytes = 1 << 20;  // copied under one LockRange
  // Called on Reconcile's thread after each region, with the bytes done so far.
  std::function<void(uint64_t)> on_progress;
};

class ReplicaSet final : public datapath::ExportBackend {
 public:
  static constexpr size_t kMaxMembers = 16;

  // `members`: every replica of the volume, distinct nodes; the in-sync ones connected (at least
  // one), the others out of sync (no channel until Readmit). `membership` and `log` (which may be
  // null) must outlive the set.
  static StatusOr<std::unique_ptr<ReplicaSet>> Create(ReplicaSetOptions options,
                                                      std::vector<ReplicaMember> members,
                                                      Membership& membership,
                                                      OutOfSyncLog* log = nullptr);
  // Close().
  ~ReplicaSet() override;

  const std::string& name() const override;
  uint64_t size() const override;
  void Submit(const datapath::BackendRequest& request, datapath::BackendDone done) override;

  // Later requests fail with EIO; those in flight finish as they would.
  void Stop(const std::string& reason);

  // For the last pass of a resync, and for a snapshot: holds every later write, trim,
  // write-zeroes and flush (they wait, in order; reads go on) and returns once those already
  // submitted are answered. Freezes nest (a resync's and a snapshot's may overlap): each Freeze
  // needs its own Thaw, and the last Thaw submits the held requests. The caller keeps the freeze
  // short: the kernel sees it as latency.
  void Freeze();
  // Freeze, but gives up at `drain_by` when changes are still in flight: the freeze is undone
  // (as by Thaw) and the result is ETIMEDOUT. EIO when the set is stopped or closed.
  Status FreezeUntil(std::chrono::steady_clock::time_point drain_by);
  void Thaw();
  // While frozen: a FLUSH to every in-sync replica, past the freeze, and waits for it (a
  // replica that fails it is dropped first, as for any flush). Makes what every in-sync replica
  // acknowledged durable there. EINVAL when not frozen; the flush's errno when it failed.
  Status FlushFrozen();
  // While frozen: the replica on `node`, out of sync and now current again (resynced), is
  // recorded in sync in the cluster state (Membership::SetInSync) and gets every later request
  // through `channel` (connected at the set's epoch). EINVAL when not frozen or the member is
  // not out of sync, ENOENT for a node not in the set; the membership error as it is.
  Status Readmit(const std::string& node, std::unique_ptr<ReplicaChannel> channel);
  // A replica added to the volume (its copy blank or stale): a member out of sync with no
  // channel, so that every later change it misses is recorded in the log, until a resync
  // readmits it. EEXIST when the node is a member already; ENOSPC when the set has used its
  // kMaxMembers slots (a removed member keeps its slot); EIO when stopped.
  Status AddMember(const std::string& node);
  // Takes the replica on `node` out of the set: `record` (the cluster state's change, which
  // runs while no in-sync change can interleave) first; on its success no later request goes
  // to it, none waits for it, and its channel is closed (what it had in flight ends with
  // ESHUTDOWN and resolves without it). EBUSY when it is the last member in sync (its data
  // would be lost), EAGAIN while reconciling, ENOENT for a node not in the set, EIO when
  // stopped; `record`'s error as it is (nothing changed).
  Status RemoveMember(const std::string& node, const std::function<Status()>& record);
  // Stop, close every channel (what is in flight fails with ESHUTDOWN), join the thread.
  void Close();

  // Holds every later write, trim and write-zeroes that overlaps [offset, offset + length)
  // (they wait, in order, and go on at UnlockRange; the rest goes on) and returns once those
  // already in flight there are answered. One range at a time (EBUSY otherwise), and only while
  // reconciling (EINVAL otherwise): in-flight ranges are tracked only then. EIO when stopped or
  // closed.
  Status LockRange(uint64_t offset, uint64_t length);
  void UnlockRange();
  // While reconciling: copies the volume, region by region, from the source to every in-sync
  // replica (a region the source reads as zeroes becomes WRITE_ZEROES), then FLUSHes them all.
  // Blocks; returns the first failure (a read, write or flush that failed everywhere, a stopped
  // set). On success the in-sync replicas are identical and EndReconcile may be called. `cancel`
  // (may be null) is checked between regions (ECANCELED).
  Status Reconcile(const ReconcileOptions& options, const std::atomic<bool>* cancel = nullptr);
  // Reads go back to every in-sync replica.
  void EndReconcile();

  // The volume grew (every copy already did): each in-sync replica's channel confirms its export
  // is at least `size` bytes (Grow), then size() is `size`, so the engine's connections (their
  // size is live) take requests up to it. All in sync only: EAGAIN while a replica is out of
  // sync or failing (its resync and log know the old size). A smaller size: OK, no change. EIO
  // when stopped; a channel's error naming its node (size() unchanged).
  Status Grow(uint64_t size);

  ReplicaSetHealth health() const;

  struct Impl;

 private:
  explicit ReplicaSet(std::unique_ptr<Impl> impl);
  // Submit, with `past_freeze` for FlushFrozen and `past_lock` for Reconcile's own copy.
  void Dispatch(const datapath::BackendRequest& request, datapath::BackendDone done,
                bool past_freeze, bool past_lock = false);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::replica
