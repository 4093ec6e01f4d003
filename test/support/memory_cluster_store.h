// An in-memory ClusterStore for unit tests of callers (the node's stage path, the controller):
// the same rules and errors as EtcdClusterStore, checked by the same contract suite
// (cluster_store_contract.h). Leases never run out by time here: a test ends one with
// ExpireLease, which drops what is attached to it exactly as etcd's expiry does.
#pragma once

#include <algorithm>
#include <map>
#include <mutex>
#include <set>

#include "common/cluster/cluster_store.h"
#include "common/node_id.h"

namespace nbdcsi::test {

class MemoryClusterStore : public cluster::ClusterStore {
 public:
  using VolumeState = cluster::VolumeState;
  using LeaseId = cluster::LeaseId;

  // What etcd would do when the lease's TTL runs out. False when it was not alive.
  bool ExpireLease(LeaseId lease) {
    std::lock_guard<std::mutex> lock(mu_);
    return DropLease(lease);
  }

  StatusOr<LeaseId> GrantLease(int64_t ttl_seconds) override {
    if (ttl_seconds <= 0) return Error(EINVAL, "lease TTL must be positive, not {}", ttl_seconds);
    std::lock_guard<std::mutex> lock(mu_);
    LeaseId id = next_lease_++;
    leases_[id] = ttl_seconds;
    return id;
  }
  StatusOr<int64_t> KeepAliveLease(LeaseId lease) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = leases_.find(lease);
    if (it == leases_.end()) return Error(ENOENT, "lease {:x} has expired", lease);
    return it->second;
  }
  Status RevokeLease(LeaseId lease) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!DropLease(lease)) return Error(ENOENT, "lease {:x} not found", lease);
    return Status::Ok();
  }

  StatusOr<VolumeState> CreateVolume(const VolumeState& in) override {
    VolumeState v = in;
    v.replicas = cluster::SortedUnique(std::move(v.replicas));
    v.in_sync = cluster::SortedUnique(std::move(v.in_sync));
    if (Status s = cluster::ValidateVolumeState(v); !s.ok()) return s;
    if (v.epoch != 0 || !v.target.empty()) {
      return Error(EINVAL, "volume {}: a new volume has epoch 0 and no target", v.name);
    }
    if (v.replicas.empty()) return Error(EINVAL, "volume {}: needs at least one replica", v.name);
    if (v.size_bytes == 0) return Error(EINVAL, "volume {}: size must be greater than 0", v.name);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = volumes_.find(v.name);
    if (it == volumes_.end()) {
      volumes_[v.name] = v;
      return v;
    }
    if (it->second.size_bytes == v.size_bytes && it->second.replicas == v.replicas) {
      return Live(it->second);
    }
    return Error(EEXIST, "volume {} exists with other size or replicas", v.name);
  }

  StatusOr<VolumeState> GetVolume(const std::string& name) override {
    if (Status s = cluster::ValidateClusterVolumeName(name); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = volumes_.find(name);
    if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
    return Live(it->second);
  }

  StatusOr<cluster::VolumePage> ListVolumes(const std::string& start_after,
                                            int64_t limit) override {
    if (limit < 1 || limit > cluster::kMaxListLimit) {
      return Error(EINVAL, "list volumes: limit {} is outside 1..{}", limit,
                   cluster::kMaxListLimit);
    }
    std::lock_guard<std::mutex> lock(mu_);
    cluster::VolumePage page;
    auto it = start_after.empty() ? volumes_.begin() : volumes_.upper_bound(start_after);
    for (; it != volumes_.end() && static_cast<int64_t>(page.volumes.size()) < limit; ++it) {
      page.volumes.push_back(Live(it->second));
    }
    if (it != volumes_.end()) page.next = page.volumes.back().name;
    return page;
  }

  StatusOr<VolumeState> SetReplicas(const std::string& name, std::vector<std::string> replicas,
                                    const std::string& target_node = "",
                                    uint64_t epoch = 0) override {
    replicas = cluster::SortedUnique(std::move(replicas));
    if (replicas.empty()) return Error(EINVAL, "volume {}: needs at least one replica", name);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = volumes_.find(name);
    if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
    auto claim = claims_.find(name);
    if (target_node.empty() && claim != claims_.end())
      return Error(EBUSY, "volume {}: node {} is its target", name, claim->second.node);
    if (!target_node.empty() &&
        (claim == claims_.end() || claim->second.node != target_node ||
         claim->second.epoch != epoch || it->second.epoch != epoch))
      return Error(ESTALE, "volume {}: node {} holds no claim at epoch {}", name, target_node,
                   epoch);
    VolumeState next = it->second;
    next.replicas = replicas;
    next.in_sync.clear();
    std::set_intersection(it->second.in_sync.begin(), it->second.in_sync.end(), replicas.begin(),
                          replicas.end(), std::back_inserter(next.in_sync));
    if (Status s = cluster::ValidateVolumeState(next); !s.ok()) return s;
    if (next.in_sync.empty() && !it->second.in_sync.empty()) {
      return Error(EBUSY, "volume {}: the new replicas drop every in-sync replica", name);
    }
    it->second = next;
    return Live(next);
  }

  StatusOr<VolumeState> GrowVolume(const std::string& name, uint64_t size_bytes) override {
    if (size_bytes == 0) return Error(EINVAL, "grow volume {}: the size must be positive", name);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = volumes_.find(name);
    if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
    if (it->second.size_bytes < size_bytes) it->second.size_bytes = size_bytes;
    return Live(it->second);
  }

  Status DeleteVolume(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = volumes_.find(name);
    if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
    if (claims_.count(name)) return Error(EBUSY, "volume {} has a live target", name);
    volumes_.erase(it);
    return Status::Ok();
  }

  StatusOr<VolumeState> ClaimTarget(const std::string& name, const std::string& node,
                                    LeaseId lease) override {
    if (Status s = ValidateNodeId(node); !s.ok()) return Error(EINVAL, "{}", s.message());
    if (lease == 0) return Error(EINVAL, "a claim needs a lease");
    std::lock_guard<std::mutex> lock(mu_);
    auto it = volumes_.find(name);
    if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
    auto claim = claims_.find(name);
    if (claim != claims_.end()) {
      if (claim->second.node != node) {
        return Error(EBUSY, "volume {}: node {} is its target at epoch {}", name,
                     claim->second.node, claim->second.epoch);
      }
      if (!leases_.count(lease)) return Error(ENOENT, "lease {:x} is not alive", lease);
      claim->second.lease = lease;
      return Live(it->second);
    }
    if (!leases_.count(lease)) return Error(ENOENT, "lease {:x} is not alive", lease);
    it->second.epoch++;
    it->second.target = node;
    it->second.dirty = true;
    claims_[name] = Claim{node, it->second.epoch, lease};
    return it->second;
  }

  Status ReleaseTarget(const std::string& name, const std::string& node, uint64_t epoch,
                       bool clean = false) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = volumes_.find(name);
    if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
    auto claim = claims_.find(name);
    if (claim != claims_.end()) {
      if (claim->second.node != node || claim->second.epoch != epoch) {
        return Error(ESTALE, "volume {}: node {} holds it at epoch {}", name, claim->second.node,
                     claim->second.epoch);
      }
      claims_.erase(claim);
    } else if (it->second.epoch != epoch) {
      return Error(ESTALE, "volume {} is at epoch {}", name, it->second.epoch);
    }
    it->second.target.clear();
    if (clean) it->second.dirty = false;
    return Status::Ok();
  }

  StatusOr<VolumeState> SetInSync(const std::string& name, const std::string& node, uint64_t epoch,
                                  std::vector<std::string> in_sync) override {
    in_sync = cluster::SortedUnique(std::move(in_sync));
    std::lock_guard<std::mutex> lock(mu_);
    auto it = volumes_.find(name);
    if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
    auto claim = claims_.find(name);
    if (claim == claims_.end() || claim->second.node != node || claim->second.epoch != epoch ||
        it->second.epoch != epoch) {
      return Error(ESTALE, "volume {}: node {} is not its target at epoch {}", name, node, epoch);
    }
    VolumeState next = it->second;
    next.in_sync = in_sync;
    if (Status s = cluster::ValidateVolumeState(next); !s.ok()) return s;
    it->second = next;
    return next;
  }

  Status RegisterNode(const std::string& node, LeaseId lease,
                      const std::string& nbd_endpoint = "") override {
    if (Status s = ValidateNodeId(node); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    if (!leases_.count(lease)) return Error(ENOENT, "lease {:x} is not alive", lease);
    nodes_[node] = lease;
    endpoints_[node] = nbd_endpoint;
    return Status::Ok();
  }

  StatusOr<std::string> NodeEndpoint(const std::string& node) override {
    if (Status s = ValidateNodeId(node); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    if (!nodes_.count(node)) return Error(ENOENT, "node {} is not registered", node);
    if (endpoints_[node].empty()) return Error(ENXIO, "node {} registered no NBD endpoint", node);
    return endpoints_[node];
  }

  StatusOr<std::vector<std::string>> LiveNodes() override {
    std::lock_guard<std::mutex> lock(mu_);
    ++live_nodes_reads_;
    std::vector<std::string> out;
    for (const auto& [node, _] : nodes_) out.push_back(node);
    return out;
  }

  // How many times LiveNodes() was read (a round trip to etcd in the real store).
  int live_nodes_reads() const {
    std::lock_guard<std::mutex> lock(mu_);
    return live_nodes_reads_;
  }

 private:
  int live_nodes_reads_ = 0;
  struct Claim {
    std::string node;
    uint64_t epoch;
    LeaseId lease;
  };

  VolumeState Live(VolumeState v) const {
    auto c = claims_.find(v.name);
    if (c == claims_.end() || c->second.epoch != v.epoch || c->second.node != v.target) {
      v.target.clear();
    }
    return v;
  }

  bool DropLease(LeaseId lease) {
    if (!leases_.erase(lease)) return false;
    std::erase_if(claims_, [&](const auto& kv) { return kv.second.lease == lease; });
    std::erase_if(nodes_, [&](const auto& kv) { return kv.second == lease; });
    return true;
  }

  mutable std::mutex mu_;
  LeaseId next_lease_ = 0x1000;
  std::map<LeaseId, int64_t> leases_;
  std::map<std::string, VolumeState> volumes_;
  std::map<std::string, Claim> claims_;
  std::map<std::string, LeaseId> nodes_;
  std::map<std::string, std::string> endpoints_;  // of live and expired nodes; nodes_ decides
};

}  // namespace nbdcsi::test
