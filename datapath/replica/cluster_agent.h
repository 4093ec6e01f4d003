// ClusterAgent: a datapath's part in the cluster (issue 16). It holds the node's lease in the
// cluster state (etcd), registers the node with the NBD endpoint where other nodes' targets
// reach its replicas, and opens and closes the targets of replicated volumes on this node: each
// a Target (claim, connections at the epoch, ReplicaSet) served by the engine as VOLUME@target.
//
// Every claim hangs on the node's lease. When the lease is lost (etcd unreachable for a TTL, or
// expired), another node may claim any of these volumes: every target here stops at once (its
// requests fail with EIO) and stays registered until it is closed, so a client sees errors, not
// a vanished export. The agent then joins again with a new lease, for new targets.
//
// Joining (lease + registration) never holds the daemon up: Start tries once, and when etcd is
// not reachable a thread keeps trying (with back-off) while the datapath serves its local
// volumes; until it has joined, OpenTarget fails with ENOLINK saying why.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <set>
#include <optional>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <thread>
#include <string>
#include <vector>

#include "common/cluster/cluster_store.h"
#include "common/cluster/lease.h"
#include "common/etcd/etcd_client.h"
#include "common/status.h"
#include "datapath/engine/backend.h"
#include "datapath/replica/open_targets.h"
#include "datapath/replica/target.h"

namespace nbdcsi::replica {

// Where targets are served: the engine's backend exports (NbdFrontend in the daemon).
class ExportHost {
 public:
  virtual ~ExportHost() = default;
  virtual Status AddBackendExport(std::shared_ptr<datapath::ExportBackend> backend) = 0;
  // Returns once no connection uses the backend any more.
  virtual Status RemoveBackendExport(const std::string& name) = 0;
};

struct ClusterAgentOptions {
  std::string node_id;
  // tcp://HOST:PORT of this node's NBD listener, registered for the other nodes' targets.
  std::string nbd_endpoint;
  int64_t lease_ttl_seconds = 10;
  // Client side of the replica connections (this node's certificate, in the client role).
  TlsClientFiles replica_tls;
  int connections = 2;
  std::chrono::milliseconds handshake_timeout{5000};
  std::chrono::milliseconds request_timeout{10000};
  // The targets' out-of-sync bitmaps (DIR/VOLUME/NODE.eEPOCH.bitmap); empty: none kept.
  std::string state_dir;
  // How often the targets here look for out-of-sync replicas whose node is alive again and
  // resync them (0: only when asked, ResyncReplica or StartResync), and at what rate (bytes/s,
  // 0: unlimited).
  std::chrono::milliseconds resync_interval{10000};
  uint64_t resync_rate_bytes_per_second = 0;
};

struct TargetInfo {
  std::string volume;
  std::string export_name;  // VOLUME@target
  uint64_t epoch = 0;
  uint64_t size = 0;
  ReplicaSetHealth health;
  std::vector<std::string> unreachable;  // replicas dropped at open
  std::map<std::string, uint64_t> out_of_sync_bytes;  // per out-of-sync replica, its bitmap
  std::optional<ResyncStatus> resync;                 // while a resync runs
  // Replicas whose resync asked for with StartResync is queued or running.
  std::set<std::string> resync_pending;
  // Per replica, why its last resync (asked for or automatic) failed; cleared when one succeeds.
  std::map<std::string, std::string> resync_errors;
};

class ClusterAgent {
 public:
  // Joins the cluster (see above) and starts the automatic resync. EINVAL for bad options only.
  // `store` and `host` must outlive the agent.
  static StatusOr<std::unique_ptr<ClusterAgent>> Start(cluster::ClusterStore& store,
                                                       ExportHost& host,
                                                       ClusterAgentOptions options);
  // Stop().
  ~ClusterAgent();
  ClusterAgent(const ClusterAgent&) = delete;
  ClusterAgent& operator=(const ClusterAgent&) = delete;

  // Opens the volume's target here and serves it as VOLUME@target; already open here: its
  // state. Errors as Target::Open; ESTALE/ENOLINK when the node's lease is lost. The target is
  // recorded in state_dir (open_targets.h) until CloseTarget is asked for it (Stop keeps the
  // record): Start, once joined, reopens what was open before, at a new epoch.
  StatusOr<TargetInfo> OpenTarget(const std::string& volume);
  // Stops serving VOLUME@target (its connections end once their requests are answered), closes
  // the replica connections and releases the claim. ENOENT when it is not open here.
  Status CloseTarget(const std::string& volume);
  StatusOr<TargetInfo> GetTarget(const std::string& volume);
  // Target::ResyncReplica on the target of `volume` open here (ENOENT otherwise). Blocks until
  // the copy is done; opens and closes of other targets wait meanwhile.
  StatusOr<ResyncReport> ResyncReplica(const std::string& volume, const std::string& node,
                                       uint64_t rate_bytes_per_second);
  // The same in the background, on the resync thread (after the automatic round running now,
  // if any), and returns at once: ENOENT when no target of `volume` is open here or it has no
  // replica on `node`, EINVAL when that replica is not out of sync, ESHUTDOWN when stopping.
  // Asked again while queued or running: OK, the same job. Its progress and end show in
  // GetTarget (resync, resync_pending, resync_errors, the replica's state).
  Status StartResync(const std::string& volume, const std::string& node,
                     uint64_t rate_bytes_per_second);
  // Target::AddReplica on the target of `volume` open here (ENOENT otherwise), then its full
  // copy in the background as StartResync (at `rate_bytes_per_second`, 0: unlimited): the
  // replica joins the in-sync set when it is done; GetTarget follows it. Returns the target then.
  StatusOr<TargetInfo> AddReplica(const std::string& volume, const std::string& node,
                                  uint64_t rate_bytes_per_second);
  // Target::RemoveReplica on the target of `volume` open here (ENOENT otherwise); waits for a
  // resync running here to end first. Returns the target after.
  StatusOr<TargetInfo> RemoveReplica(const std::string& volume, const std::string& node);
  std::vector<TargetInfo> ListTargets();
  // Target::FreezeForSnapshot / ThawSnapshot on the target of `volume` open here. Freeze: ENOENT
  // when none is open here. Thaw is idempotent: false when nothing was held (no target here, or
  // the freeze was thawed or lifted itself already).
  StatusOr<SnapshotFreeze> FreezeTarget(const std::string& volume,
                                        std::chrono::milliseconds lift_after);
  bool ThawTarget(const std::string& volume, uint64_t freeze_id);
  // Target::Grow on the target of `volume` open here (ENOENT otherwise): its new size.
  StatusOr<uint64_t> GrowTarget(const std::string& volume);

  const std::string& node_id() const { return opts_.node_id; }
  // True while the node holds a live lease and its registration.
  bool joined() const;

  // Closes every target (releasing the claims) and revokes the lease. Idempotent.
  void Stop();

 private:
  ClusterAgent(cluster::ClusterStore& store, ExportHost& host, ClusterAgentOptions options);
  void OnLeaseLost(const Status& why);
  // Grants a lease and registers the node; the new lease replaces a lost one.
  Status Join();
  void JoinLoop();
  // The automatic resync: every resync_interval, each out-of-sync replica of a target here whose
  // node is registered (alive) again is resynced, one at a time.
  void ResyncLoop();
  void ResyncReturned();
  struct ResyncRequest {
    std::string volume, node;
    uint64_t rate = 0;
  };
  void RunResyncRequest(const ResyncRequest& r);
  // The resync outcome for GetTarget/ListTargets (under mu_).
  void NoteResync(const std::string& volume, const std::string& node, const Status& s);
  TargetInfo InfoLocked(Target& t) const;  // Info with resync_pending/resync_errors (under mu_)
  // At start, once joined: reopens the targets recorded in open_records_, claimed again at a
  // new epoch (a claim of ours still alive from before the restart is released first, not
  // clean). A volume gone (ENOENT) or claimed by another node (EBUSY) is forgotten; other
  // failures are logged and kept for the next start.
  void ReopenRecorded();
  static TargetInfo Info(Target& t);
  // The open target of `volume` (ENOENT when none), kept alive by the caller's reference.
  StatusOr<std::shared_ptr<Target>> FindTarget(const std::string& volume);

  cluster::ClusterStore& store_;
  ExportHost& host_;
  ClusterAgentOptions opts_;
  std::shared_ptr<cluster::Lease> lease_;  // under mu_; replaced when lost
  std::mutex ops_mu_;  // one open or close at a time (each does network I/O)
  mutable std::mutex mu_;  // targets_, lease_, join state
  // Shared: a freeze (which may wait for the drain) keeps its target alive through a close.
  std::map<std::string, std::shared_ptr<Target>> targets_;
  bool stopped_ = false;
  std::condition_variable resync_cv_;  // with mu_: wakes the loops at Stop, and a lost lease
  std::thread resync_thread_;
  std::thread join_thread_;
  Status join_error_;  // the last failed join (under mu_)
  std::map<std::string, std::string> resync_failed_;  // "volume/node" -> last error logged
  std::deque<ResyncRequest> resync_requests_;  // StartResync's, for the resync thread (mu_)
  std::set<std::string> resync_pending_;              // "volume/node" queued or running (mu_)
  std::map<std::string, std::string> resync_errors_;  // "volume/node" -> last failure (mu_)
  // The targets opened here by request, reopened after a restart (open_targets.h).
  OpenTargets open_records_;
};


}  // namespace nbdcsi::replica
