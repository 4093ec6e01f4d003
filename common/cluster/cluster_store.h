// The seam between nbd-csi and wherever its cluster state lives (issue 16): the per-volume
// replica set, in-sync set, target and epoch, node liveness, and the leases that tie a target's
// claim to the process that holds it. EtcdClusterStore (etcd_cluster_store.h) is the real one;
// a Kubernetes-API backend can follow behind the same interface; test/support has a memory
// implementation for unit tests of callers.
//
// Every change is one atomic compare-and-swap on the backend: no read-modify-write ever lands
// without a compare on what was read. The rules every implementation keeps (the contract test,
// test/support/cluster_store_contract.h, runs the same cases against each):
//
//   - At most one node holds a live claim on a volume (is its target). A claim lives as long as
//     the lease it was made with, or until the holder releases it.
//   - ClaimTarget succeeds only when no live claim exists (or the caller holds it already), and
//     then raises the epoch by exactly one.
//   - SetInSync and ReleaseTarget succeed only for the live claim's holder at the current epoch;
//     a node that lost its claim gets ESTALE.
//
// Errors (errno style): ENOENT no such volume (or lease), EEXIST a different volume of that name,
// EBUSY another node holds a live claim, ESTALE the caller's epoch or claim is not current,
// EINVAL bad input, EAGAIN/ETIMEDOUT the backend is unreachable (retry; nothing was decided, or
// the retry finds it decided: every operation is safe to repeat).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/cluster/volume_state.h"
#include "common/status.h"

namespace nbdcsi::cluster {

using LeaseId = int64_t;

struct VolumePage {
  std::vector<VolumeState> volumes;  // in name order
  // Pass as start_after for the next page; empty when this page was the last.
  std::string next;
};

class ClusterStore {
 public:
  virtual ~ClusterStore() = default;

  // --- Leases: a claim or a liveness key lives as long as its lease. ---
  // A new lease of at least `ttl_seconds` (the backend may raise it to its minimum).
  virtual StatusOr<LeaseId> GrantLease(int64_t ttl_seconds) = 0;
  // Renews the lease; returns its TTL in seconds. ENOENT when it has expired or was revoked.
  virtual StatusOr<int64_t> KeepAliveLease(LeaseId lease) = 0;
  // Ends the lease now, dropping every claim and key attached to it. ENOENT when already gone.
  virtual Status RevokeLease(LeaseId lease) = 0;

  // --- Volumes. ---
  // Creates `v` (epoch 0, no target; in_sync may name the replicas created in sync). OK with the
  // stored state when an identical volume (name, size, replicas) exists; EEXIST when a different
  // one does.
  virtual StatusOr<VolumeState> CreateVolume(const VolumeState& v) = 0;
  // The state, with target empty unless a live claim holds it at the current epoch.
  virtual StatusOr<VolumeState> GetVolume(const std::string& name) = 0;
  // Volumes after `start_after` in name order, at most `limit` (1..1000) of them.
  virtual StatusOr<VolumePage> ListVolumes(const std::string& start_after, int64_t limit) = 0;
  // Sets the replica set (sorted and deduplicated here); in_sync keeps only nodes still in it
  // (a node added is out of sync). Who may: with `target_node` empty, the controller, and only
  // while no live claim exists (EBUSY naming the holder: a served volume's replica set is changed
  // by its target, which must connect to an added replica and stop writing to a removed one);
  // with `target_node`, only the live claim's holder at `epoch` (ESTALE otherwise). Either
  // compares the volume's revision, so it cannot race a target's SetInSync unnoticed. EBUSY when
  // the new set would drop every in-sync replica; ENOENT when there is no such volume.
  virtual StatusOr<VolumeState> SetReplicas(const std::string& name,
                                            std::vector<std::string> replicas,
                                            const std::string& target_node = "",
                                            uint64_t epoch = 0) = 0;
  // Raises size_bytes to `size_bytes` (expansion; the controller's call, after every replica's
  // copy grew). Never shrinks: a smaller or equal size returns the stored state unchanged.
  // Compares the volume's revision like SetReplicas. ENOENT when there is no such volume, EINVAL
  // for 0.
  virtual StatusOr<VolumeState> GrowVolume(const std::string& name, uint64_t size_bytes) = 0;
  // EBUSY while a live claim exists; ENOENT when there is no such volume.
  virtual Status DeleteVolume(const std::string& name) = 0;

  // --- The target. ---
  // Makes `node` the volume's target under `lease`, raising the epoch by one and setting dirty;
  // returns the new state. When `node` holds the live claim already, returns the current state without a bump
  // (moving the claim to `lease` if it differs). EBUSY naming the holder when another node holds
  // a live claim; ENOENT for no such volume or a lease that is not alive.
  virtual StatusOr<VolumeState> ClaimTarget(const std::string& name, const std::string& node,
                                            LeaseId lease) = 0;
  // Ends `node`'s claim at `epoch` (unstage). OK when the claim already lapsed at that same epoch
  // and nobody claimed since; ESTALE when another claim (a later epoch) exists or it is not
  // `node`'s. `clean`: the target ended with nothing in flight and its in-sync replicas
  // identical, so the next claim needs no reconciliation (clears dirty, in the same write).
  virtual Status ReleaseTarget(const std::string& name, const std::string& node, uint64_t epoch,
                               bool clean = false) = 0;
  // Sets the in-sync set; only `node` holding the live claim at `epoch` may (ESTALE otherwise).
  // EINVAL when in_sync is not a subset of the replicas.
  virtual StatusOr<VolumeState> SetInSync(const std::string& name, const std::string& node,
                                          uint64_t epoch, std::vector<std::string> in_sync) = 0;

  // --- Node liveness. ---
  // Marks `node` alive for as long as `lease` lives; `nbd_endpoint` is where other nodes' targets
  // reach its replicas (tcp://ADDR:PORT; may be empty for a node that holds none).
  virtual Status RegisterNode(const std::string& node, LeaseId lease,
                              const std::string& nbd_endpoint = "") = 0;
  // Node ids with a live registration, sorted.
  virtual StatusOr<std::vector<std::string>> LiveNodes() = 0;
  // The endpoint a live node registered; ENOENT when it is not registered (or its lease ran
  // out), ENXIO when it registered none.
  virtual StatusOr<std::string> NodeEndpoint(const std::string& node) = 0;
};

// Bounds for ListVolumes' limit.
inline constexpr int64_t kMaxListLimit = 1000;

}  // namespace nbdcsi::cluster
