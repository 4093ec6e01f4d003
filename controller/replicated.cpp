#include "controller/replicated.h"

#include <algorithm>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "controller/csi_status.h"
#include "csi/ids.h"
#include "csi/logging.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

namespace {

// The replicas the in-sync set leaves out, for messages.
std::vector<std::string> OutOfSync(const cluster::VolumeState& v) {
  std::vector<std::string> out;
  std::set_difference(v.replicas.begin(), v.replicas.end(), v.in_sync.begin(), v.in_sync.end(),
                      std::back_inserter(out));
  return out;
}

}  // namespace

Status ReplicatedVolumes::NoCatalogue(std::string_view what) const {
  return Err(EINVAL,
             "{} needs the cluster state of replicated volumes, and this nbd-csi-controller runs "
             "without --cluster-etcd (Helm: cluster.enabled=true)",
             what);
}

Status ReplicatedVolumes::Create(const CreateArgs& a, v1::Volume* out) {
  if (!store_) return NoCatalogue(fmt::format("parameter replicas={}", a.replicas));
  auto existing = store_->GetVolume(a.pool_name);
  if (existing.ok()) return Finish(a, *existing, out);  // an earlier attempt: finish it
  if (existing.status().code() != ENOENT) return existing.status();

  auto nodes = Choose(a);
  if (!nodes.ok()) return nodes.status();
  cluster::VolumeState v;
  v.name = a.pool_name;
  v.size_bytes = a.size_bytes;
  v.replicas = cluster::SortedUnique(*nodes);
  v.in_sync = v.replicas;  // blank copies are identical
  auto made = store_->CreateVolume(v);
  if (!made.ok() && made.status().code() == EEXIST) {
    // Another controller's attempt got there first (a different placement): finish that one.
    auto now = store_->GetVolume(a.pool_name);
    if (!now.ok()) return now.status();
    return Finish(a, *now, out);
  }
  if (!made.ok()) return made.status();
  return Finish(a, *made, out);
}

Status ReplicatedVolumes::Finish(const CreateArgs& a, const cluster::VolumeState& v,
                                 v1::Volume* out) {
  const v1::CapacityRange* r = a.range;
  const bool size_ok =
      !r || (v.size_bytes >= static_cast<uint64_t>(r->required_bytes()) &&
             (r->limit_bytes() == 0 || v.size_bytes <= static_cast<uint64_t>(r->limit_bytes())));
  if (!size_ok) {
    return Err(EEXIST, "volume \"{}\" exists with {} bytes, outside the requested range",
               a.csi_name, v.size_bytes);
  }
  if (v.replicas.size() != static_cast<size_t>(a.replicas)) {
    return Err(EEXIST, "volume \"{}\" exists with {} replicas, not {}", a.csi_name,
               v.replicas.size(), a.replicas);
  }
  if (Status s = CreateCopies(a, v); !s.ok()) {
    if (v.epoch == 0) RollBack(v);
    return s;
  }
  Fill(v, out, nullptr);
  spdlog::info("[{}] replicated volume {} ({} bytes) on nodes {}", csi::CurrentRequestId(),
               out->volume_id(), v.size_bytes, fmt::join(v.replicas, ","));
  return Status::Ok();
}

StatusOr<std::vector<std::string>> ReplicatedVolumes::Choose(const CreateArgs& a) {
  auto live = store_->LiveNodes();
  if (!live.ok()) return live.status();
  const std::set<std::string> alive(live->begin(), live->end());
  std::vector<std::string> chosen, why_not;
  bool missing = false;
  for (const auto& node : a.candidates->order) {
    if (chosen.size() == static_cast<size_t>(a.replicas)) break;
    auto info = nodes_.Get(node);
    if (!info) {
      missing = true;
      why_not.push_back(node + ": not registered");
    } else if (!alive.count(node)) {
      // Its datapath runs without --cluster-etcd, or lost its lease: no target could reach it.
      missing = true;
      why_not.push_back(node + ": not alive in the cluster state");
    } else if (ledger_.Room(*info) < a.size_bytes) {
      why_not.push_back(fmt::format("{}: {} bytes provisionable", node, ledger_.Room(*info)));
    } else {
      chosen.push_back(node);
    }
  }
  if (chosen.size() == static_cast<size_t>(a.replicas)) return chosen;
  std::string detail = why_not.empty() ? "no other candidate node" : fmt::format("{}", fmt::join(why_not, "; "));
  if (missing || a.candidates->order.empty()) {
    return Err(EAGAIN, "replicas={} needs {} nodes with room for {} bytes, found {} ({}); retry "
               "once more nodes register", a.replicas, a.replicas, a.size_bytes, chosen.size(),
               detail);
  }
  return Err(ENOSPC, "replicas={} needs {} distinct nodes with room for {} bytes, found {} ({})",
             a.replicas, a.replicas, a.size_bytes, chosen.size(), detail);
}

Status ReplicatedVolumes::CreateCopies(const CreateArgs& a, const cluster::VolumeState& v) {
  dpv1::CreateVolumeRequest req;
  req.set_name(v.name);
  req.set_size_bytes(v.size_bytes);
  *req.mutable_qos() = a.qos;
  for (const auto& node : v.replicas) {
    auto made = nodes_.On(node, [&](NodeDatapath& d) { return d.CreateVolume(req); });
    if (!made.ok() && made.status().code() == ENOSPC) {
      // Believe the pool over its last heartbeat until the next one: a retry places elsewhere.
      if (auto info = nodes_.Get(node)) ledger_.Add(*info, ledger_.Room(*info));
    }
    if (!made.ok()) {
      return Status(made.status().code(), fmt::format("replica on node {}: {}", node,
                                                      made.status().message()));
    }
    if (auto info = nodes_.Get(node)) ledger_.Add(*info, v.size_bytes);
  }
  return Status::Ok();
}

void ReplicatedVolumes::RollBack(const cluster::VolumeState& v) {
  for (const auto& node : v.replicas) {
    Status s = nodes_.On(node, [&](NodeDatapath& d) { return d.DeleteVolume(v.name); });
    if (!s.ok() && s.code() != ENOENT) {
      spdlog::warn("[{}] rolling back volume {}: its copy on node {} stays: {}",
                   csi::CurrentRequestId(), v.name, node, s.message());
    }
  }
  if (Status s = store_->DeleteVolume(v.name); !s.ok() && s.code() != ENOENT) {
    // The retry finds the entry and tries the same nodes again.
    spdlog::warn("[{}] rolling back volume {}: the catalogue entry stays: {}",
                 csi::CurrentRequestId(), v.name, s.message());
  }
}

StatusOr<cluster::VolumeState> ReplicatedVolumes::Get(const std::string& id) {
  auto name = csi::ParseReplicatedVolumeId(id);
  if (!name.ok()) return Err(ENOENT, "volume \"{}\" does not exist: {}", id, name.status().message());
  if (!store_) return NoCatalogue(fmt::format("volume {}", id));
  auto v = store_->GetVolume(*name);
  if (!v.ok() && v.status().code() == ENOENT) {
    return Err(ENOENT, "volume \"{}\" does not exist", id);
  }
  return v;
}

Status ReplicatedVolumes::Delete(const std::string& id) {
  auto name = csi::ParseReplicatedVolumeId(id);
  if (!name.ok()) {
    spdlog::info("[{}] DeleteVolume of a malformed id \"{}\" succeeds: {}", csi::CurrentRequestId(),
                 id, name.status().message());
    return Status::Ok();
  }
  if (!store_) return NoCatalogue(fmt::format("deleting volume {}", id));
  auto v = store_->GetVolume(*name);
  if (!v.ok()) return v.status().code() == ENOENT ? Status::Ok() : v.status();
  if (!v->target.empty()) {
    return Err(EBUSY, "volume {} is in use: node {} serves it (epoch {}); unstage it first", id,
               v->target, v->epoch);
  }
  auto live = store_->LiveNodes();
  if (!live.ok()) return live.status();
  for (const auto& node : v->replicas) {
    const bool gone = !nodes_.Get(node) &&
                      std::find(live->begin(), live->end(), node) == live->end();
    if (gone) {
      spdlog::warn("[{}] volume {}: node {} is gone (not registered, not alive in the cluster "
                   "state); its copy, if any, stays in that node's pool",
                   csi::CurrentRequestId(), id, node);
      continue;
    }
    Status s = nodes_.On(node, [&](NodeDatapath& d) { return d.DeleteVolume(*name); });
    if (!s.ok() && s.code() != ENOENT) {
      return Status(s.code(), fmt::format("replica on node {}: {}", node, s.message()));
    }
  }
  Status s = store_->DeleteVolume(*name);
  if (s.code() == EBUSY) {
    return Err(EBUSY, "volume {} is in use: a node claimed it during the delete", id);
  }
  if (!s.ok() && s.code() != ENOENT) return s;
  spdlog::info("[{}] replicated volume {} deleted from nodes {}", csi::CurrentRequestId(), id,
               fmt::join(v->replicas, ","));
  return Status::Ok();
}

void ReplicatedVolumes::Fill(const cluster::VolumeState& v, v1::Volume* out,
                             v1::VolumeCondition* cond) {
  auto id = csi::FormatReplicatedVolumeId(v.name);
  out->set_volume_id(id.ok() ? *id : "");
  out->set_capacity_bytes(static_cast<int64_t>(v.size_bytes));
  // No accessible_topology: every node reaches the replicas over the network.
  if (!cond) return;
  std::vector<std::string> problems;
  if (auto out_of_sync = OutOfSync(v); !out_of_sync.empty()) {
    problems.push_back(fmt::format("degraded: {} of {} replicas in sync (out of sync: {})",
                                   v.in_sync.size(), v.replicas.size(),
                                   fmt::join(out_of_sync, ",")));
  }
  for (const auto& node : v.in_sync) {
    if (!nodes_.Get(node)) problems.push_back(fmt::format("replica node {} is not registered", node));
  }
  cond->set_abnormal(!problems.empty());
  cond->set_message(problems.empty()
                        ? fmt::format("volume is healthy: {} of {} replicas in sync{}",
                                      v.in_sync.size(), v.replicas.size(),
                                      v.target.empty() ? "" : ", served by node " + v.target)
                        : fmt::format("{}", fmt::join(problems, "; ")));
}

Status ReplicatedVolumes::SetQos(const std::string& id, const dpv1::QosPatch& patch) {
  auto v = Get(id);
  if (!v.ok()) return v.status();
  for (const auto& node : v->replicas) {
    auto changed = nodes_.On(node, [&](NodeDatapath& d) { return d.SetQos(v->name, patch); });
    if (!changed.ok()) {
      return Status(changed.status().code(), fmt::format("replica on node {}: {}", node,
                                                         changed.status().message()));
    }
  }
  return Status::Ok();
}

void ReplicatedVolumes::List(
    std::vector<std::pair<std::string, v1::ListVolumesResponse::Entry>>* all,
    std::set<std::pair<std::string, std::string>>* copies) {
  if (!store_) return;
  std::string after;
  do {
    auto page = store_->ListVolumes(after, cluster::kMaxListLimit);
    if (!page.ok()) {
      spdlog::warn("[{}] ListVolumes skips the replicated volumes: {}", csi::CurrentRequestId(),
                   page.status().message());
      return;
    }
    for (const auto& v : page->volumes) {
      v1::ListVolumesResponse::Entry e;
      Fill(v, e.mutable_volume(), e.mutable_status()->mutable_volume_condition());
      std::string id = e.volume().volume_id();
      all->emplace_back(std::move(id), std::move(e));
      for (const auto& node : v.replicas) copies->emplace(node, v.name);
    }
    after = page->next;
  } while (!after.empty());
}

}  // namespace nbdcsi::controller
