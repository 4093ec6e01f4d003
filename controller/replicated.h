// Replicated volumes (issue 16; StorageClass parameter replicas >= 2, ids "r1:<name>"): the
// controller's part. The cluster state in etcd (common/cluster/cluster_store.h) is the catalogue:
// it names each volume's replica nodes, so these calls need no fan-out over the nodes; the pools
// on those nodes hold the data under the volume's pool name. The node that stages the volume opens
// its target (datapath/replica/target.h), which writes to every in-sync replica.
//
// CreateVolume writes the catalogue entry first (replica nodes chosen, all in sync: blank volumes
// are identical), then asks each replica node's datapath to create its copy. A retry finds the
// entry and finishes on the same nodes. A failure on a volume that was never staged (epoch 0: no
// data anywhere) rolls the whole attempt back, pool copies and entry, so the retry places it
// afresh (a node that went away for good cannot pin it). Placement: the candidates in
// EveryNodeAfter's order (preferred, then requisite: WaitForFirstConsumer's node gets a replica;
// then every other node by room: the topology never bounds a volume every node reaches), each on
// a distinct node that is registered here, alive in the cluster state, and has room.
//
// DeleteVolume: FAILED_PRECONDITION while a node holds the volume's target (it is staged); each
// replica's copy is deleted, then the entry. A replica whose node is neither registered here nor
// alive in the cluster state is skipped (logged: its copy stays in that pool, for `nbdctl volume
// delete` if the node ever returns); a registered node that fails the call fails the delete
// (retried).
//
// CreateSnapshot (at one write boundary): the snapshot is taken in ONE in-sync replica's pool
// (that pool's CreateSnapshot: reflink or copy-before-write) and is an ordinary s1:<node>:<name>
// snapshot of that node, so that ListSnapshots, DeleteSnapshot and restores (a single-node volume
// on that node) work as for any other; its source_volume_id is the r1 id. When a node serves the
// volume's target, the target is frozen first (TargetFreeze on that node: writes held, those in
// flight acknowledged by every in-sync replica, every in-sync replica flushed), the snapshot is
// taken on a replica the freeze reported in sync, and the target is thawed, also on error; the
// freeze lifts itself after kSnapshotFreeze if the controller dies. With no target the copies are
// quiescent (every write needs a claim, which raises the epoch). Either way the snapshot counts
// only when the epoch after it is the one it was taken at and a freeze was held throughout;
// otherwise it is deleted again and the call fails with UNAVAILABLE (the sidecar retries).
// Idempotency asks the volume's replica nodes only (those registered), not every node.
//
// Expand (ControllerExpandVolume): every replica's copy grows first (its node's ResizeVolume; a
// copy already at the size is left alone), then the catalogue entry records the size
// (ClusterStore::GrowVolume). All replica nodes must be registered and answer, else UNAVAILABLE
// with the entry unchanged; a crash or failure in between leaves some copies bigger than the
// entry, which nothing reads past (the target serves the entry's size), and the retry finishes.
// A served volume's target learns the size on its node (NodeExpandVolume: RefreshTarget).
//
// Restore and clone into a replicated volume (a content source: a snapshot s1:NODE:NAME, or a
// single-node volume v1:NODE:NAME): the source's node holds the first replica, restored or cloned
// there by its pool (reflink or local copy, as for any restore); the other replicas are blank
// copies of the same size, and the catalogue entry records them as OUT OF SYNC (in_sync is the
// source's node alone) with the source's id (VolumeState::source: idempotency compares it, and
// the CSI volume reports it as its content source). The first target that opens the volume (its
// first stage) gives every other replica a full copy, holes skipped, in the background
// (datapath/replica/target.h: a replica out of sync at the claim); until then the volume reports
// itself degraded, and its data lives on the source's node only. The source's node must be
// registered, alive in the cluster state and have room, else UNAVAILABLE (it may come back) or
// RESOURCE_EXHAUSTED.
//
// Not yet for replicated volumes (INVALID_ARGUMENT, saying so): clones FROM one (take a snapshot
// and restore that).
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/cluster/cluster_store.h"
#include "common/status.h"
#include "controller/nodes.h"
#include "controller/placement.h"
#include "csi/csi.pb.h"
#include "datapath/api/datapath.pb.h"

namespace nbdcsi::controller {

class ReplicatedVolumes {
 public:
  // `store` null: the controller runs without --cluster-etcd; every call says so.
  ReplicatedVolumes(cluster::ClusterStore* store, Nodes& nodes, PlacementLedger& ledger)
      : store_(store), nodes_(nodes), ledger_(ledger) {}

  struct CreateArgs {
    std::string csi_name;
    std::string pool_name;
    // What a fresh volume gets; asked only when the catalogue holds no earlier attempt (a
    // retry must find a restored volume even once its snapshot is deleted).
    std::function<StatusOr<uint64_t>()> size_bytes;
    const ::csi::v1::CapacityRange* range = nullptr;  // what an existing one must fit
    dpv1::QosLimits qos;
    int replicas = 2;
    const Candidates* candidates = nullptr;
    // A restore or clone: the CSI id of its source, the node that holds it, and the pool's
    // spelling of it (for that node's CreateVolume). Empty id: a blank volume.
    std::string source_id;
    std::string source_node;
    dpv1::VolumeContentSource source;
  };
  Status Create(const CreateArgs& a, ::csi::v1::Volume* out);
  // `id` is an r1 id (csi::IsReplicatedVolumeId); a malformed one names nothing: deleted.
  Status Delete(const std::string& id);
  // ENOENT (NOT_FOUND) when the id is malformed or the volume does not exist.
  StatusOr<cluster::VolumeState> Get(const std::string& id);
  // The CSI volume (no topology: any node may stage it) and its condition.
  void Fill(const cluster::VolumeState& v, ::csi::v1::Volume* out,
            ::csi::v1::VolumeCondition* cond);
  // Grows every replica's copy, then the entry, to at least `size_bytes`; never shrinks. Returns
  // the volume's size after.
  StatusOr<uint64_t> Expand(const std::string& id, uint64_t size_bytes);
  // The QoS patch on every replica's copy (each applies it to the writes it receives).
  Status SetQos(const std::string& id, const dpv1::QosPatch& patch);
  // Every entry of the catalogue, all its pages read (for listings); the store's error when one
  // cannot be read. Needs the catalogue (enabled()).
  StatusOr<std::vector<cluster::VolumeState>> All();
  // Every replicated volume, for ListVolumes: (id, entry) pairs, and the (node, pool name) of
  // each replica's copy, which the caller leaves out of the nodes' own volumes. An unreachable
  // catalogue is logged and lists nothing, as a node that does not answer does.
  void List(std::vector<std::pair<std::string, ::csi::v1::ListVolumesResponse::Entry>>* all,
            std::set<std::pair<std::string, std::string>>* copies);

  // How long a snapshot may hold a served volume's writes before the freeze lifts itself.
  static constexpr std::chrono::milliseconds kSnapshotFreeze{10000};

  // CreateSnapshot of the r1 volume `id` as `snap_name` (the pool name of the CSI name).
  Status CreateSnapshot(const std::string& id, const std::string& snap_name,
                        ::csi::v1::Snapshot* out);
  // ListSnapshots filtered by the r1 volume `id`: its snapshots on its (registered) replica
  // nodes, as (node, snapshot); a replica node that cannot answer fails the listing. A malformed
  // id or a volume not in the catalogue has none.
  Status SnapshotsOf(const std::string& id,
                     std::vector<std::pair<std::string, dpv1::Snapshot>>* out);
  // The r1 id of the volume whose copy is `pool_name` on `node`, or "" (a single-node volume, or
  // none): what a snapshot's source_volume_id says. Reads the catalogue once per call.
  std::string ReplicatedSource(const std::string& node, const std::string& pool_name);
  // EBUSY (FAILED_PRECONDITION) when the single-node id `id` names a replicated volume's copy on
  // its node: a crafted v1 id must not delete, grow, retune or snapshot a copy behind its target.
  // An unreadable catalogue lets the call through (single-node volumes do not depend on etcd).
  Status RefuseCopy(const std::string& node, const std::string& pool_name, std::string_view id);
  // Every replica copy (node, pool name) -> r1 id, for listings of many snapshots; empty when
  // the catalogue cannot be read (logged).
  std::map<std::pair<std::string, std::string>, std::string> CopyIds();

  // The error of a call that needs the catalogue when there is none (EINVAL: a StorageClass the
  // deployment cannot serve, or an id from one that could).
  Status NoCatalogue(std::string_view what) const;
  bool enabled() const { return store_ != nullptr; }

 private:
  StatusOr<std::vector<std::string>> Choose(const CreateArgs& a, uint64_t size_bytes);
  // `earlier_attempt`: the entry was there before this call (a retry, or another controller's).
  Status Finish(const CreateArgs& a, const cluster::VolumeState& v, ::csi::v1::Volume* out,
                bool earlier_attempt);
  Status CreateCopies(const CreateArgs& a, const cluster::VolumeState& v, bool earlier_attempt);
  void RollBack(const cluster::VolumeState& v);
  // One attempt of CreateSnapshot on the catalogue entry `v`.
  Status SnapshotOnce(const std::string& id, const cluster::VolumeState& v,
                      const std::string& snap_name, ::csi::v1::Snapshot* out, bool* retry);
  // Takes the snapshot on the first of `nodes` that answers (registered, in v.replicas).
  StatusOr<std::pair<std::string, dpv1::Snapshot>> SnapshotOnOneOf(
      const cluster::VolumeState& v, const std::vector<std::string>& nodes,
      const std::string& snap_name);

  cluster::ClusterStore* store_;
  Nodes& nodes_;
  PlacementLedger& ledger_;
};

}  // namespace nbdcsi::controller
