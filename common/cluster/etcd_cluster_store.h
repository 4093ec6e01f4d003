// ClusterStore on etcd (v3 API, common/etcd). Key layout: keys.h. Each change is one etcd Txn
// whose compares pin everything the decision was based on:
//
//   CreateVolume   volumes/<v> absent                         -> put volumes/<v>
//   ClaimTarget    volumes/<v> mod == read, targets/<v> absent  -> put volumes/<v> (epoch+1,
//                                                                target) and targets/<v>
//                                                                {node, epoch+1} on the lease
//   ReleaseTarget  volumes/<v> mod == read, targets/<v> mod == read (holder and epoch checked)
//                                                             -> delete targets/<v>, clear target
//   SetInSync      volumes/<v> mod == read, targets/<v> mod == read (holder and epoch checked)
//                                                             -> put volumes/<v>
//   SetReplicas    volumes/<v> mod == read                    -> put volumes/<v>
//   GrowVolume     volumes/<v> mod == read                    -> put volumes/<v>
//   DeleteVolume   volumes/<v> mod == read, targets/<v> absent  -> delete volumes/<v>
//
// Reads of a volume take both keys in one Txn, so they see one revision. A compare that fails
// because something else changed the volume in between is re-read and decided again (bounded);
// a compare that fails because of another claim becomes EBUSY or ESTALE on that re-read.
//
// The lease rule: targets/<v> is attached to the claimant's lease, so etcd itself deletes it when
// the lease expires. "No targets/<v> key" therefore means "the old target released or its lease
// ran out", which is exactly when a new claim may raise the epoch. A target that stops renewing
// learns of its loss from its Lease (lease.h) within the TTL and must stop serving; the replicas
// refuse its writes from the new epoch on either way.
#pragma once

#include <functional>
#include <memory>
#include <optional>

#include "common/cluster/cluster_store.h"
#include "common/cluster/keys.h"
#include "common/etcd/etcd_client.h"

namespace nbdcsi::cluster {

class EtcdClusterStore : public ClusterStore {
 public:
  EtcdClusterStore(std::shared_ptr<etcd::EtcdClient> client, KeyLayout keys)
      : client_(std::move(client)), keys_(std::move(keys)) {}

  StatusOr<LeaseId> GrantLease(int64_t ttl_seconds) override;
  StatusOr<int64_t> KeepAliveLease(LeaseId lease) override;
  Status RevokeLease(LeaseId lease) override;

  StatusOr<VolumeState> CreateVolume(const VolumeState& v) override;
  StatusOr<VolumeState> GetVolume(const std::string& name) override;
  StatusOr<VolumePage> ListVolumes(const std::string& start_after, int64_t limit) override;
  StatusOr<VolumeState> SetReplicas(const std::string& name, std::vector<std::string> replicas,
                                    const std::string& target_node = "",
                                    uint64_t epoch = 0) override;
  StatusOr<VolumeState> GrowVolume(const std::string& name, uint64_t size_bytes) override;
  Status DeleteVolume(const std::string& name) override;

  StatusOr<VolumeState> ClaimTarget(const std::string& name, const std::string& node,
                                    LeaseId lease) override;
  Status ReleaseTarget(const std::string& name, const std::string& node, uint64_t epoch,
                       bool clean = false) override;
  StatusOr<VolumeState> SetInSync(const std::string& name, const std::string& node, uint64_t epoch,
                                  std::vector<std::string> in_sync) override;

  Status RegisterNode(const std::string& node, LeaseId lease,
                      const std::string& nbd_endpoint = "") override;
  StatusOr<std::vector<std::string>> LiveNodes() override;
  StatusOr<std::string> NodeEndpoint(const std::string& node) override;

  const KeyLayout& keys() const { return keys_; }
  etcd::EtcdClient& client() { return *client_; }

 private:
  struct Snapshot;
  StatusOr<Snapshot> Read(const std::string& name);

  // A decision taken on one snapshot of an existing volume: no write (nullopt: the answer is the
  // volume as read), or a transaction whose success makes `result` the answer.
  struct Write {
    etcdserverpb::TxnRequest txn;
    VolumeState result;
    bool puts_on_lease = false;  // ENOENT from etcd then means "lease not alive"
  };
  using Decision = StatusOr<std::optional<Write>>;
  static Decision NoWrite() { return std::optional<Write>(); }
  static Decision Commit(Write w) { return std::optional<Write>(std::move(w)); }
  using Decide = std::function<Decision(const Snapshot&)>;
  // The loop every change of an existing volume runs: read (ENOENT when absent), decide, commit
  // with the decision's compares; on a failed compare read and decide again, at most a bounded
  // number of times (EAGAIN after that).
  StatusOr<VolumeState> Modify(const std::string& name, const std::string& what,
                               const Decide& decide);

  std::shared_ptr<etcd::EtcdClient> client_;
  KeyLayout keys_;
};

}  // namespace nbdcsi::cluster
