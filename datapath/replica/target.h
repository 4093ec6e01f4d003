// Target: a datapath's hold on one replicated volume (issue 16): the claim in the cluster state,
// the connections to the volume's in-sync replicas at the claim's epoch, and the ReplicaSet the
// engine serves as "VOLUME@target".
//
// Open, in this order (each step is what makes the next one safe):
//   1. ClaimTarget: the epoch rises by one; EBUSY while another node's claim is alive.
//   2. Connect to every in-sync replica at the new epoch (their endpoints from the nodes'
//      registrations). Each replica fences older epochs when the connection opens, and waits for
//      their in-flight writes first, so nothing of a previous target lands afterwards.
//   3. Replicas that could not be reached are dropped from the in-sync set (SetInSync at the
//      epoch) before anything is served; if none was reached, the claim is released and Open
//      fails with EHOSTUNREACH.
// The claim lives on `lease`: the holder of the lease must Stop() the target when the lease is
// lost (another node may claim as soon as it expires).
//
// Unclean takeover: a claim that finds the volume dirty (the previous target did not release it
// cleanly, see cluster::VolumeState::dirty) may find its in-sync replicas different wherever
// that target had writes in flight. The new target serves at once, but reconciles first
// (ReplicaSet: reads from one source replica only, a background pass copies the whole volume
// from it to the others with writes to the region being copied held), and only then reads from
// every replica again, allows resyncs, and may release the volume clean. Replicas dropped at
// Open or during the reconciliation get a full resync, since what they hold beyond the source
// is unknown. A crash during the reconciliation leaves the volume dirty: the next target starts
// over. Close releases clean only when nothing was in flight (a freeze drained it), the flush of
// every in-sync replica succeeded, no change failed half-applied, and it was reconciled.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/cluster/cluster_store.h"
#include "common/status.h"
#include "datapath/replica/bitmap_log.h"
#include "datapath/replica/replica_set.h"
#include "datapath/replica/resync.h"
#include "datapath/replica/tls_client.h"

namespace nbdcsi::replica {

struct TargetOptions {
  std::string volume;
  std::string node;  // this node's id: the claimant, and the replica reads prefer
  cluster::LeaseId lease = 0;
  // Client side of the replicas' mutual TLS; server_node is set per replica (each replica must
  // prove it is the node the cluster state names).
  TlsClientFiles tls;
  int connections = 2;  // per replica
  std::chrono::milliseconds handshake_timeout{5000};
  std::chrono::milliseconds request_timeout{10000};
  // How long a membership change may retry an unreachable cluster store.
  std::chrono::milliseconds membership_retry{5000};
  // Where the out-of-sync bitmaps live (STATE_DIR/VOLUME/); empty: no log, and a returning
  // replica can only be resynced whole.
  std::string state_dir;
};

// A resync while it runs (inspect, metrics): the current pass and what is done so far.
struct ResyncStatus {
  std::string node;
  bool full = false;
  int pass = 0;                  // 1-based; the last one runs with writes held
  uint64_t pass_done_bytes = 0;  // of this pass: copied, skipped and zeroed
  uint64_t pass_total_bytes = 0;
  uint64_t copied_bytes = 0;                // all passes so far
  double percent = 0;                       // of this pass
  std::optional<std::chrono::seconds> eta;  // of this pass, at its speed so far
};

// What ResyncReplica did.
struct ResyncReport {
  std::string node;
  bool full = false;  // no bitmap of this epoch: the whole volume (holes by BLOCK_STATUS)
  int passes = 0;     // copy passes, the last one with writes held
  uint64_t copied_bytes = 0, skipped_bytes = 0, zeroed_bytes = 0;
  uint64_t dirty_bytes_at_start = 0;    // what the bitmap held when the resync began
  std::chrono::milliseconds frozen{0};  // how long writes were held for the last pass
  std::chrono::milliseconds took{0};
};

// A snapshot's freeze of a target (Target::FreezeForSnapshot).
struct SnapshotFreeze {
  uint64_t id = 0;  // for ThawSnapshot; unique in this process
  uint64_t epoch = 0;
  // The replicas in sync when writes stopped: each holds every acknowledged write, flushed.
  // While the target reconciles, only its source (the others may differ on unacknowledged data).
  std::vector<std::string> in_sync;
  std::chrono::milliseconds drained{0};   // how long the changes in flight took to finish
  std::chrono::milliseconds lifts_in{0};  // when the freeze lifts itself, from now
};

class Target {
 public:
  // The longest a snapshot may hold a volume's writes (FreezeForSnapshot's lift_after).
  static constexpr std::chrono::milliseconds kMaxSnapshotFreeze{60000};

  // See above. Errors: EBUSY (another target), ENOENT (no such volume in the cluster state),
  // EHOSTUNREACH (no in-sync replica reachable), ESTALE (the claim was lost while opening), and
  // the store's errors.
  static StatusOr<std::unique_ptr<Target>> Open(cluster::ClusterStore& store,
                                                const TargetOptions& options);
  // Close().
  ~Target();
  Target(const Target&) = delete;
  Target& operator=(const Target&) = delete;

  // What the engine serves (datapath::ExportBackend).
  std::shared_ptr<ReplicaSet> set() const { return set_; }
  uint64_t epoch() const { return epoch_; }
  const std::string& volume() const { return opts_.volume; }
  // Replicas dropped at Open because they could not be reached, with why.
  const std::vector<std::string>& unreachable() const { return unreachable_; }

  // The lease is gone or the node is shutting down: every later request fails with EIO.
  void Stop(const std::string& reason);

  // Brings the replica on `node` (out of sync, reachable again) back: copies what it missed
  // from an in-sync replica (the bitmap's regions; everything, skipping holes, without one) in
  // passes while the volume stays in use, then holds writes for a last short pass, records it
  // in sync in the cluster state and lets the writes go, now to it too. Blocks until done.
  // EINVAL when the replica is not out of sync; the copy's or the cluster's error otherwise
  // (the replica then stays out of sync, and the log keeps what it misses).
  StatusOr<ResyncReport> ResyncReplica(const std::string& node, ResyncOptions options = {});
  // A new replica on `node` (issue 16, volume move): its copy must exist in that node's pool,
  // blank or stale, at least the volume's size. Checks that the node is registered and its copy
  // answers at this epoch, marks the whole volume as missing there (its resync is a full copy,
  // holes skipped), records it in the cluster state as a replica OUT OF SYNC (SetReplicas as
  // this target), and makes it a member of the set, out of sync: every later write it misses is
  // logged. The copy itself is ResyncReplica's (ClusterAgent::AddReplica starts it in the
  // background). Returns the cluster state after. EEXIST when the node holds a replica already;
  // ENOENT when it is not registered; the connection's error when its copy does not answer
  // (nothing changed); ENOTSUP without a state directory; ESTALE when the claim is gone.
  StatusOr<cluster::VolumeState> AddReplica(const std::string& node);
  // Takes the replica on `node` out of the volume: removed from the cluster state's replica set
  // (SetReplicas as this target) while no in-sync change interleaves, then no request goes to it
  // and its connection closes (ReplicaSet::RemoveMember); its out-of-sync bitmap is forgotten.
  // Its pool copy stays for the caller to delete. EBUSY when it is the last in-sync replica or
  // a resync runs; ENOENT when it holds no replica; EAGAIN while reconciling.
  StatusOr<cluster::VolumeState> RemoveReplica(const std::string& node);
  // For a snapshot taken on one replica's pool: holds every later change (reads go on), waits
  // until those in flight are acknowledged by every in-sync replica, flushes every in-sync
  // replica, and returns the replicas whose copies are now complete and durable. The freeze lifts
  // itself `lift_after` after it began (1 ms to kMaxSnapshotFreeze, else EINVAL) unless
  // ThawSnapshot lifted it first, so that a caller that dies never wedges the volume. ETIMEDOUT
  // when the changes in flight did not finish within lift_after; EIO when the target is stopped
  // or the flush failed everywhere. Freezes nest with each other and with a resync's.
  StatusOr<SnapshotFreeze> FreezeForSnapshot(std::chrono::milliseconds lift_after);
  // Lifts freeze `id` (0: every snapshot freeze of this target). Idempotent: false when it was
  // not held any more (thawed before, or lifted by its deadline).
  bool ThawSnapshot(uint64_t id);
  // The volume was expanded (the controller grew every copy, then the catalogue entry): reads
  // the size in the cluster state and grows the set to it (ReplicaSet::Grow: each replica's
  // export confirmed at least that big), so the device can grow. Returns the size served after;
  // the same when the catalogue is not bigger. EAGAIN while a replica is out of sync (resync
  // first); EIO when stopped; the store's and the replicas' errors.
  StatusOr<uint64_t> Grow();
  // Bytes each out-of-sync replica is known to miss (its bitmap), for inspect.
  std::map<std::string, uint64_t> OutOfSyncBytes();
  // The resync running now, if any (any thread).
  std::optional<ResyncStatus> resync_status() const;
  // Closes the set (what is in flight fails with ESHUTDOWN) and releases the claim (unstage).
  // Idempotent; the release's result.
  Status Close();

 private:
  Target(cluster::ClusterStore& store, TargetOptions options, uint64_t epoch);
  // Open's steps after the claim and the connections: the out-of-sync bitmaps (replicas that
  // need a full resync marked whole), then the set served, reconciling after an unclean end.
  Status OpenLog(const cluster::VolumeState& state, const std::vector<std::string>& reached,
                 bool unclean);
  Status StartServing(const cluster::VolumeState& state, const std::vector<std::string>& reached,
                      bool unclean, std::vector<ReplicaMember> members);
  // ResyncReplica's steps: the in-sync replica to copy from, the bitmap of what `node` misses
  // (all of it, and `ro` set for a full copy, without one), one copy pass.
  StatusOr<std::string> ResyncSource(const std::string& node) const;
  StatusOr<RegionBitmap*> ResyncBitmap(const std::string& node, bool full, ResyncOptions* ro,
                                       ResyncReport* report);
  Status ResyncPass(BlockChannel& from, BlockChannel& to, const ResyncOptions& ro, RegionBitmap& bm,
                    ResyncReport* report);

  cluster::ClusterStore& store_;
  TargetOptions opts_;
  uint64_t epoch_;
  std::unique_ptr<ClusterMembership> membership_;
  std::unique_ptr<BitmapLog> log_;
  // Replicas out of sync since before this target: their resync copies everything.
  std::set<std::string> full_resync_;
  // The running resync: its status and its current pass's job (for live progress); also guards
  // full_resync_ and reconciled_.
  mutable std::mutex resync_mu_;
  // False from an unclean takeover until the reconciliation finished: no resync, no clean close.
  bool reconciled_ = true;
  std::atomic<bool> reconcile_cancel_{false};
  std::thread reconcile_thread_;
  void ReconcileLoop();
  std::optional<ResyncStatus> resync_;
  Resync* resync_job_ = nullptr;
  std::shared_ptr<ReplicaSet> set_;
  std::vector<std::string> unreachable_;
  bool closed_ = false;
  // Snapshot freezes held now, by id, and when each lifts itself: the watchdog thread (started by
  // the first freeze, joined by Close) lifts those nobody thawed in time.
  void FreezeWatchdog();
  std::mutex freeze_mu_;
  std::condition_variable freeze_cv_;
  std::map<uint64_t, std::chrono::steady_clock::time_point> freezes_;
  bool freeze_quit_ = false;
  std::thread freeze_thread_;
};

}  // namespace nbdcsi::replica
