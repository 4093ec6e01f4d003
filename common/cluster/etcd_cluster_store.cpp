#include "common/cluster/etcd_cluster_store.h"

#include <algorithm>
#include <map>
#include <optional>

#include "common/node_id.h"

namespace nbdcsi::cluster {

namespace {

// A compare fails when anything touched the volume between our read and our write (the
// controller's SetReplicas next to a target's SetInSync, say); each failure re-reads and decides
// again. Real contention on one volume is a handful of writers, so this bound is only reached
// when something rewrites the volume in a loop.
constexpr int kMaxAttempts = 16;

Status TooBusy(const std::string& what) {
  return Error(EAGAIN, "{}: the volume kept changing during {} attempts; retry", what,
               kMaxAttempts);
}

std::vector<std::string> Intersect(const std::vector<std::string>& a,
                                   const std::vector<std::string>& b) {
  std::vector<std::string> out;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(out));
  return out;
}

// The live-claim rule readers apply: the stored target counts only while its claim key exists
// at the stored epoch.
VolumeState WithLiveTarget(VolumeState v, const std::optional<TargetClaim>& claim) {
  if (!claim || claim->epoch != v.epoch || claim->node != v.target) v.target.clear();
  return v;
}

}  // namespace

StatusOr<KeyLayout> KeyLayout::Make(std::string prefix) {
  if (prefix.empty() || prefix.back() != '/') {
    return Error(EINVAL, "cluster key prefix \"{}\" must be non-empty and end with '/'", prefix);
  }
  return KeyLayout(std::move(prefix));
}

struct EtcdClusterStore::Snapshot {
  std::optional<etcd::KeyValue> volume_kv;
  std::optional<etcd::KeyValue> claim_kv;
  VolumeState stored;
  std::optional<TargetClaim> claim;

  VolumeState live() const { return WithLiveTarget(stored, claim); }
};

StatusOr<EtcdClusterStore::Snapshot> EtcdClusterStore::Read(const std::string& name) {
  if (Status s = ValidateClusterVolumeName(name); !s.ok()) return s;
  const std::string vkey = keys_.Volume(name);
  const std::string tkey = keys_.Target(name);
  // Both keys in one Txn: one revision, so the claim and the state agree.
  etcdserverpb::TxnRequest req;
  *req.add_success() = etcd::GetOp(vkey);
  *req.add_success() = etcd::GetOp(tkey);
  auto resp = client_->Txn(req, fmt::format("read volume {}", name));
  if (!resp.ok()) return resp.status();
  Snapshot snap;
  if (resp->responses_size() != 2) {
    return Error(EIO, "read volume {}: etcd answered {} results for 2 reads", name,
                 resp->responses_size());
  }
  const auto& vr = resp->responses(0).response_range();
  const auto& tr = resp->responses(1).response_range();
  if (vr.kvs_size() > 0) {
    snap.volume_kv = etcd::FromProto(vr.kvs(0));
    auto v = DecodeVolumeState(snap.volume_kv->value, vkey);
    if (!v.ok()) return v.status();
    if (v->name != name) {
      return Error(EINVAL, "{}: holds volume {}, not {}", vkey, v->name, name);
    }
    snap.stored = std::move(*v);
  }
  if (tr.kvs_size() > 0) {
    snap.claim_kv = etcd::FromProto(tr.kvs(0));
    auto c = DecodeTargetClaim(snap.claim_kv->value, tkey);
    if (!c.ok()) return c.status();
    snap.claim = std::move(*c);
  }
  return snap;
}

StatusOr<LeaseId> EtcdClusterStore::GrantLease(int64_t ttl_seconds) {
  return client_->LeaseGrant(ttl_seconds);
}

StatusOr<int64_t> EtcdClusterStore::KeepAliveLease(LeaseId lease) {
  return client_->LeaseKeepAliveOnce(lease);
}

Status EtcdClusterStore::RevokeLease(LeaseId lease) { return client_->LeaseRevoke(lease); }

StatusOr<VolumeState> EtcdClusterStore::CreateVolume(const VolumeState& in) {
  VolumeState v = in;
  v.replicas = SortedUnique(std::move(v.replicas));
  v.in_sync = SortedUnique(std::move(v.in_sync));
  if (Status s = ValidateVolumeState(v); !s.ok()) return s;
  if (v.epoch != 0 || !v.target.empty()) {
    return Error(EINVAL, "volume {}: a new volume has epoch 0 and no target", v.name);
  }
  if (v.replicas.empty()) return Error(EINVAL, "volume {}: needs at least one replica", v.name);
  if (v.size_bytes == 0) return Error(EINVAL, "volume {}: size must be greater than 0", v.name);
  const std::string vkey = keys_.Volume(v.name);
  for (int attempt = 0; attempt < kMaxAttempts; ++attempt) {
    etcdserverpb::TxnRequest req;
    *req.add_compare() = etcd::KeyAbsent(vkey);
    *req.add_success() = etcd::PutOp(vkey, EncodeVolumeState(v));
    auto resp = client_->Txn(req, fmt::format("create volume {}", v.name));
    if (!resp.ok()) return resp.status();
    if (resp->succeeded()) return v;
    auto snap = Read(v.name);
    if (!snap.ok()) return snap.status();
    if (!snap->volume_kv) continue;  // deleted between the two: try again
    const VolumeState& old = snap->stored;
    if (old.size_bytes == v.size_bytes && old.replicas == v.replicas) return snap->live();
    return Error(EEXIST,
                 "volume {} exists with size {} and replicas [{}], not size {} and replicas [{}]",
                 v.name, old.size_bytes, fmt::join(old.replicas, ","), v.size_bytes,
                 fmt::join(v.replicas, ","));
  }
  return TooBusy(fmt::format("create volume {}", v.name));
}

StatusOr<VolumeState> EtcdClusterStore::GetVolume(const std::string& name) {
  auto snap = Read(name);
  if (!snap.ok()) return snap.status();
  if (!snap->volume_kv) return Error(ENOENT, "volume {} does not exist", name);
  return snap->live();
}

StatusOr<VolumePage> EtcdClusterStore::ListVolumes(const std::string& start_after, int64_t limit) {
  if (limit < 1 || limit > kMaxListLimit) {
    return Error(EINVAL, "list volumes: limit {} is outside 1..{}", limit, kMaxListLimit);
  }
  if (!start_after.empty()) {
    if (Status s = ValidateClusterVolumeName(start_after); !s.ok()) return s;
  }
  const std::string vprefix = keys_.VolumesPrefix();
  // The first key after start_after: start_after followed by the smallest byte.
  std::string from = start_after.empty() ? vprefix : vprefix + start_after + std::string(1, '\0');
  auto vols = client_->Range(from, etcd::PrefixEnd(vprefix), limit);
  if (!vols.ok()) return vols.status();
  VolumePage page;
  if (vols->kvs.empty()) return page;
  for (const auto& kv : vols->kvs) {
    auto v = DecodeVolumeState(kv.value, kv.key);
    if (!v.ok()) return v.status();
    page.volumes.push_back(std::move(*v));
  }
  // The claims of the same names, at the same revision, so each state agrees with its claim.
  const std::string& first = page.volumes.front().name;
  const std::string& last = page.volumes.back().name;
  auto claims = client_->Range(keys_.Target(first), keys_.Target(last) + std::string(1, '\0'), 0,
                               vols->revision);
  if (!claims.ok()) return claims.status();
  std::map<std::string, TargetClaim> by_name;
  const size_t tprefix = keys_.Target("").size();
  for (const auto& kv : claims->kvs) {
    auto c = DecodeTargetClaim(kv.value, kv.key);
    if (!c.ok()) return c.status();
    by_name.emplace(kv.key.substr(tprefix), std::move(*c));
  }
  for (VolumeState& v : page.volumes) {
    auto it = by_name.find(v.name);
    v = WithLiveTarget(std::move(v),
                       it == by_name.end() ? std::nullopt : std::optional<TargetClaim>(it->second));
  }
  if (vols->more) page.next = last;
  return page;
}

StatusOr<VolumeState> EtcdClusterStore::Modify(const std::string& name, const std::string& what,
                                               const Decide& decide) {
  for (int attempt = 0; attempt < kMaxAttempts; ++attempt) {
    auto snap = Read(name);
    if (!snap.ok()) return snap.status();
    if (!snap->volume_kv) return Error(ENOENT, "{}: volume does not exist", what);
    auto write = decide(*snap);
    if (!write.ok()) return write.status();
    if (!write->has_value()) return snap->live();
    Write& w = **write;
    auto resp = client_->Txn(w.txn, what);
    if (!resp.ok()) {
      if (w.puts_on_lease && resp.status().code() == ENOENT) {
        return Error(ENOENT, "{}: the lease is not alive ({})", what, resp.status().message());
      }
      return resp.status();
    }
    if (resp->succeeded()) return std::move(w.result);
    // A compare failed: something changed the volume or its claim since the read. Decide again
    // on a fresh read (which turns a new claim into EBUSY or ESTALE).
  }
  return TooBusy(what);
}

StatusOr<VolumeState> EtcdClusterStore::SetReplicas(const std::string& name,
                                                    std::vector<std::string> replicas,
                                                    const std::string& target_node,
                                                    uint64_t epoch) {
  replicas = SortedUnique(std::move(replicas));
  const std::string what =
      target_node.empty()
          ? fmt::format("set replicas of volume {}", name)
          : fmt::format("set replicas of volume {} by node {} at epoch {}", name, target_node,
                        epoch);
  if (replicas.empty()) return Error(EINVAL, "{}: needs at least one replica", what);
  return Modify(name, what, [&](const Snapshot& snap) -> Decision {
    if (target_node.empty() && snap.claim) {
      return Error(EBUSY, "{}: node {} is its target at epoch {} (the target changes it)", what,
                   snap.claim->node, snap.claim->epoch);
    }
    if (!target_node.empty() &&
        (!snap.claim || snap.claim->node != target_node || snap.claim->epoch != epoch ||
         snap.stored.epoch != epoch)) {
      return snap.claim ? Error(ESTALE, "{}: node {} holds it at epoch {}", what,
                                snap.claim->node, snap.claim->epoch)
                        : Error(ESTALE, "{}: no live claim (the volume is at epoch {})", what,
                                snap.stored.epoch);
    }
    VolumeState next = snap.stored;
    next.replicas = replicas;
    next.in_sync = Intersect(next.in_sync, replicas);
    if (Status s = ValidateVolumeState(next); !s.ok()) return s;
    if (next.in_sync.empty() && !snap.stored.in_sync.empty()) {
      // The only current copies would leave the set: the volume's data would be gone.
      return Error(EBUSY, "{}: [{}] drops every in-sync replica ([{}])", what,
                   fmt::join(replicas, ","), fmt::join(snap.stored.in_sync, ","));
    }
    if (next == snap.stored) return NoWrite();
    Write w;
    *w.txn.add_compare() = etcd::ModRevisionIs(keys_.Volume(name), snap.volume_kv->mod_revision);
    // The claim as read: absent for the controller (a claim made since fails the compare), the
    // holder's own for a target (one that lapsed since fails it too).
    if (snap.claim_kv)
      *w.txn.add_compare() = etcd::ModRevisionIs(keys_.Target(name), snap.claim_kv->mod_revision);
    else
      *w.txn.add_compare() = etcd::KeyAbsent(keys_.Target(name));
    *w.txn.add_success() = etcd::PutOp(keys_.Volume(name), EncodeVolumeState(next));
    w.result = WithLiveTarget(next, snap.claim);
    return Commit(std::move(w));
  });
}

StatusOr<VolumeState> EtcdClusterStore::GrowVolume(const std::string& name,
                                                   uint64_t size_bytes) {
  const std::string what = fmt::format("grow volume {} to {} bytes", name, size_bytes);
  if (size_bytes == 0) return Error(EINVAL, "{}: the size must be positive", what);
  return Modify(name, what, [&](const Snapshot& snap) -> Decision {
    if (snap.stored.size_bytes >= size_bytes) return NoWrite();  // never shrinks
    VolumeState next = snap.stored;
    next.size_bytes = size_bytes;
    Write w;
    *w.txn.add_compare() = etcd::ModRevisionIs(keys_.Volume(name), snap.volume_kv->mod_revision);
    *w.txn.add_success() = etcd::PutOp(keys_.Volume(name), EncodeVolumeState(next));
    w.result = WithLiveTarget(next, snap.claim);
    return Commit(std::move(w));
  });
}

Status EtcdClusterStore::DeleteVolume(const std::string& name) {
  const std::string what = fmt::format("delete volume {}", name);
  return Modify(name, what,
                [&](const Snapshot& snap) -> Decision {
                  if (snap.claim) {
                    return Error(EBUSY, "{}: node {} is its target at epoch {}", what,
                                 snap.claim->node, snap.claim->epoch);
                  }
                  Write w;
                  *w.txn.add_compare() =
                      etcd::ModRevisionIs(keys_.Volume(name), snap.volume_kv->mod_revision);
                  *w.txn.add_compare() = etcd::KeyAbsent(keys_.Target(name));
                  *w.txn.add_success() = etcd::DeleteOp(keys_.Volume(name));
                  return Commit(std::move(w));
                })
      .status();
}

StatusOr<VolumeState> EtcdClusterStore::ClaimTarget(const std::string& name,
                                                    const std::string& node, LeaseId lease) {
  const std::string what = fmt::format("claim target of volume {} for node {}", name, node);
  if (Status s = ValidateNodeId(node); !s.ok()) return Error(EINVAL, "{}: {}", what, s.message());
  if (lease == 0) return Error(EINVAL, "{}: a claim needs a lease", what);
  const std::string vkey = keys_.Volume(name);
  const std::string tkey = keys_.Target(name);
  return Modify(name, what, [&](const Snapshot& snap) -> Decision {
    Write w;
    w.puts_on_lease = true;
    if (snap.claim) {
      if (snap.claim->node != node) {
        return Error(EBUSY, "{}: node {} is its target at epoch {}", what, snap.claim->node,
                     snap.claim->epoch);
      }
      // Our own live claim (a retried stage, or a restarted node whose old lease lives on): the
      // epoch stays, the claim moves to the lease we keep alive now.
      if (snap.claim_kv->lease == lease) return NoWrite();
      *w.txn.add_compare() = etcd::ModRevisionIs(tkey, snap.claim_kv->mod_revision);
      *w.txn.add_success() = etcd::PutOp(tkey, snap.claim_kv->value, lease);
      w.result = snap.live();
      return Commit(std::move(w));
    }
    w.result = snap.stored;
    w.result.epoch = snap.stored.epoch + 1;
    w.result.target = node;
    w.result.dirty = true;
    *w.txn.add_compare() = etcd::ModRevisionIs(vkey, snap.volume_kv->mod_revision);
    *w.txn.add_compare() = etcd::KeyAbsent(tkey);
    *w.txn.add_success() = etcd::PutOp(vkey, EncodeVolumeState(w.result));
    *w.txn.add_success() = etcd::PutOp(tkey, EncodeTargetClaim({node, w.result.epoch}), lease);
    return Commit(std::move(w));
  });
}

Status EtcdClusterStore::ReleaseTarget(const std::string& name, const std::string& node,
                                       uint64_t epoch, bool clean) {
  const std::string what =
      fmt::format("release target of volume {} by node {} at epoch {}", name, node, epoch);
  const std::string vkey = keys_.Volume(name);
  const std::string tkey = keys_.Target(name);
  return Modify(name, what,
                [&](const Snapshot& snap) -> Decision {
                  Write w;
                  w.result = snap.stored;
                  w.result.target.clear();
                  if (clean) w.result.dirty = false;
                  if (snap.claim) {
                    if (snap.claim->node != node || snap.claim->epoch != epoch) {
                      return Error(ESTALE, "{}: node {} holds it at epoch {}", what,
                                   snap.claim->node, snap.claim->epoch);
                    }
                    *w.txn.add_compare() = etcd::ModRevisionIs(tkey, snap.claim_kv->mod_revision);
                    *w.txn.add_compare() = etcd::ModRevisionIs(vkey, snap.volume_kv->mod_revision);
                    *w.txn.add_success() = etcd::DeleteOp(tkey);
                    *w.txn.add_success() = etcd::PutOp(vkey, EncodeVolumeState(w.result));
                    return Commit(std::move(w));
                  }
                  if (snap.stored.epoch != epoch) {
                    return Error(ESTALE, "{}: the volume is at epoch {}", what, snap.stored.epoch);
                  }
                  // The claim lapsed (lease expired) or was released already, and nobody claimed
                  // since: releasing again changes nothing but the stored last target.
                  if (snap.stored.target.empty() && w.result.dirty == snap.stored.dirty)
                    return NoWrite();
                  *w.txn.add_compare() = etcd::ModRevisionIs(vkey, snap.volume_kv->mod_revision);
                  *w.txn.add_compare() = etcd::KeyAbsent(tkey);
                  *w.txn.add_success() = etcd::PutOp(vkey, EncodeVolumeState(w.result));
                  return Commit(std::move(w));
                })
      .status();
}

StatusOr<VolumeState> EtcdClusterStore::SetInSync(const std::string& name, const std::string& node,
                                                  uint64_t epoch,
                                                  std::vector<std::string> in_sync) {
  const std::string what =
      fmt::format("set in-sync replicas of volume {} by node {} at epoch {}", name, node, epoch);
  in_sync = SortedUnique(std::move(in_sync));
  const std::string vkey = keys_.Volume(name);
  const std::string tkey = keys_.Target(name);
  return Modify(name, what, [&](const Snapshot& snap) -> Decision {
    if (!snap.claim) {
      return Error(ESTALE, "{}: no live claim (the volume is at epoch {})", what,
                   snap.stored.epoch);
    }
    if (snap.claim->node != node || snap.claim->epoch != epoch || snap.stored.epoch != epoch) {
      return Error(ESTALE, "{}: node {} holds it at epoch {}", what, snap.claim->node,
                   snap.claim->epoch);
    }
    Write w;
    w.result = snap.stored;
    w.result.in_sync = in_sync;
    if (Status s = ValidateVolumeState(w.result); !s.ok()) {
      return Error(EINVAL, "{}: {}", what, s.message());
    }
    if (w.result == snap.stored) return NoWrite();
    *w.txn.add_compare() = etcd::ModRevisionIs(vkey, snap.volume_kv->mod_revision);
    // A claim whose lease expired after our read is gone: its mod revision no longer matches.
    *w.txn.add_compare() = etcd::ModRevisionIs(tkey, snap.claim_kv->mod_revision);
    *w.txn.add_success() = etcd::PutOp(vkey, EncodeVolumeState(w.result));
    return Commit(std::move(w));
  });
}

Status EtcdClusterStore::RegisterNode(const std::string& node, LeaseId lease,
                                      const std::string& nbd_endpoint) {
  if (Status s = ValidateNodeId(node); !s.ok()) return s;
  if (lease == 0) return Error(EINVAL, "register node {}: needs a lease", node);
  Status s = client_->Put(keys_.Node(node), nbd_endpoint, lease);
  if (s.code() == ENOENT) {
    return Error(ENOENT, "register node {}: lease {:x} is not alive ({})", node, lease,
                 s.message());
  }
  return s;
}

StatusOr<std::vector<std::string>> EtcdClusterStore::LiveNodes() {
  const std::string prefix = keys_.NodesPrefix();
  auto r = client_->Range(prefix, etcd::PrefixEnd(prefix));
  if (!r.ok()) return r.status();
  std::vector<std::string> nodes;
  for (const auto& kv : r->kvs) nodes.push_back(kv.key.substr(prefix.size()));
  return nodes;
}

StatusOr<std::string> EtcdClusterStore::NodeEndpoint(const std::string& node) {
  if (Status s = ValidateNodeId(node); !s.ok()) return s;
  auto kv = client_->Get(keys_.Node(node));
  if (!kv.ok()) {
    if (kv.status().code() == ENOENT) return Error(ENOENT, "node {} is not registered", node);
    return kv.status();
  }
  if (kv->value.empty()) return Error(ENXIO, "node {} registered no NBD endpoint", node);
  return kv->value;
}

}  // namespace nbdcsi::cluster
