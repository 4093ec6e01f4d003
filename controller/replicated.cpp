#include "controller/replicated.h"

#include <algorithm>
#include <optional>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/util/message_differencer.h>
#include <spdlog/spdlog.h>

#include "controller/csi_response.h"
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

// The r1 id of a catalogue name, for messages.
std::string IdOrName(const std::string& name) {
  auto id = csi::FormatReplicatedVolumeId(name);
  return id.ok() ? *id : name;
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
  if (existing.ok()) return Finish(a, *existing, out, true);  // an earlier attempt: finish it
  if (existing.status().code() != ENOENT) return existing.status();

  auto size = a.size_bytes();
  if (!size.ok()) return size.status();
  auto nodes = Choose(a, *size);
  if (!nodes.ok()) return nodes.status();
  cluster::VolumeState v;
  v.name = a.pool_name;
  v.size_bytes = *size;
  v.replicas = cluster::SortedUnique(*nodes);
  // Blank copies are identical; a restored or cloned volume's data is on the source's node only
  // until its first target copies it to the others.
  v.in_sync = a.source_id.empty() ? v.replicas : std::vector<std::string>{a.source_node};
  v.source = a.source_id;
  auto made = store_->CreateVolume(v);
  if (!made.ok() && made.status().code() == EEXIST) {
    // Another controller's attempt got there first (a different placement): finish that one.
    auto now = store_->GetVolume(a.pool_name);
    if (!now.ok()) return now.status();
    return Finish(a, *now, out, true);
  }
  if (!made.ok()) return made.status();
  return Finish(a, *made, out, false);
}

Status ReplicatedVolumes::Finish(const CreateArgs& a, const cluster::VolumeState& v,
                                 v1::Volume* out, bool earlier_attempt) {
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
  if (v.source != a.source_id) {
    return Err(EEXIST, "volume \"{}\" exists with content source \"{}\", not \"{}\"",
               a.csi_name, v.source, a.source_id);
  }
  if (Status s = CreateCopies(a, v, earlier_attempt); !s.ok()) {
    // Not when the copies belong to another request (ALREADY_EXISTS): they are its volume.
    if (v.epoch == 0 && s.code() != EEXIST) RollBack(v);
    return s;
  }
  Fill(v, out, nullptr);
  spdlog::info("[{}] replicated volume {} ({} bytes) on nodes {}", csi::CurrentRequestId(),
               out->volume_id(), v.size_bytes, fmt::join(v.replicas, ","));
  return Status::Ok();
}

StatusOr<std::vector<std::string>> ReplicatedVolumes::Choose(const CreateArgs& a,
                                                             uint64_t size_bytes) {
  auto live = store_->LiveNodes();
  if (!live.ok()) return live.status();
  const std::set<std::string> alive(live->begin(), live->end());
  std::vector<std::string> chosen, why_not;
  bool missing = false;
  // A restore or clone is made on its source's node, so that node comes first, and only then.
  std::vector<std::string> order = a.candidates->order;
  if (!a.source_node.empty()) {
    std::erase(order, a.source_node);
    order.insert(order.begin(), a.source_node);
  }
  for (const auto& node : order) {
    if (chosen.size() == static_cast<size_t>(a.replicas)) break;
    if (!a.source_node.empty() && chosen.empty() && node != a.source_node) {
      // The source's node was refused (why_not says why): nowhere else can hold the first copy.
      break;
    }
    auto info = nodes_.Get(node);
    if (!info) {
      missing = true;
      why_not.push_back(node + ": not registered");
    } else if (!alive.count(node)) {
      // Its datapath runs without --cluster-etcd, or lost its lease: no target could reach it.
      missing = true;
      why_not.push_back(node + ": not alive in the cluster state");
    } else if (ledger_.Room(*info) < size_bytes) {
      why_not.push_back(fmt::format("{}: {} bytes provisionable", node, ledger_.Room(*info)));
    } else {
      chosen.push_back(node);
    }
  }
  if (chosen.size() == static_cast<size_t>(a.replicas)) return chosen;
  if (!a.source_node.empty() && chosen.empty()) {
    return Err(missing ? EAGAIN : ENOSPC,
               "the content source {} is on node {}, which must hold the first replica and "
               "cannot now ({})",
               a.source_id, a.source_node, fmt::join(why_not, "; "));
  }
  std::string detail = why_not.empty() ? "no other candidate node" : fmt::format("{}", fmt::join(why_not, "; "));
  if (missing || a.candidates->order.empty()) {
    return Err(EAGAIN, "replicas={} needs {} nodes with room for {} bytes, found {} ({}); retry "
               "once more nodes register", a.replicas, a.replicas, size_bytes, chosen.size(),
               detail);
  }
  return Err(ENOSPC, "replicas={} needs {} distinct nodes with room for {} bytes, found {} ({})",
             a.replicas, a.replicas, size_bytes, chosen.size(), detail);
}

Status ReplicatedVolumes::CreateCopies(const CreateArgs& a, const cluster::VolumeState& v,
                                       bool earlier_attempt) {
  dpv1::CreateVolumeRequest req;
  req.set_name(v.name);
  req.set_size_bytes(v.size_bytes);
  *req.mutable_qos() = a.qos;
  for (const auto& node : v.replicas) {
    // A copy an earlier attempt made stays as it is: its source may be gone since (a restore's
    // snapshot deleted), and asking the pool to make it again would fail on that.
    if (earlier_attempt) {
      auto have = nodes_.GetVolume(node, v.name);
      if (have.ok() && !google::protobuf::util::MessageDifferencer::Equals(have->qos(), a.qos)) {
        return Err(EEXIST, "volume \"{}\" exists with other QoS parameters ({})", a.csi_name,
                   have->qos().ShortDebugString());
      }
      if (have.ok()) continue;
    }
    // The source's node restores or clones its copy; the others start blank (out of sync).
    if (node == a.source_node) {
      *req.mutable_source() = a.source;
    } else {
      req.clear_source();
    }
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
  // The cluster state's live nodes are read only when a replica's node is not registered here
  // (one etcd read saved on the usual delete).
  std::optional<std::vector<std::string>> live;
  for (const auto& node : v->replicas) {
    const bool registered = nodes_.Get(node).has_value();
    if (!registered && !live) {
      auto l = store_->LiveNodes();
      if (!l.ok()) return l.status();
      live = std::move(*l);
    }
    const bool gone =
        !registered && std::find(live->begin(), live->end(), node) == live->end();
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
  if (csi::ParseSnapshotId(v.source).ok()) {
    out->mutable_content_source()->mutable_snapshot()->set_snapshot_id(v.source);
  } else if (!v.source.empty()) {
    out->mutable_content_source()->mutable_volume()->set_volume_id(v.source);
  }
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

StatusOr<uint64_t> ReplicatedVolumes::Expand(const std::string& id, uint64_t size_bytes) {
  auto v = Get(id);
  if (!v.ok()) return v.status();
  // The entry grows last, so an entry at the size means every copy got there before.
  if (v->size_bytes >= size_bytes) return v->size_bytes;
  // Every copy must grow: one left small would refuse the target's writes past its end.
  for (const auto& node : v->replicas) {
    if (!nodes_.Get(node)) {
      return Err(EAGAIN, "volume {}: replica node {} is not registered; every copy must grow, "
                 "retry once it is back", id, node);
    }
  }
  for (const auto& node : v->replicas) {
    auto copy = nodes_.GetVolume(node, v->name);
    if (copy.ok() && copy->size_bytes() < size_bytes) {
      copy = nodes_.On(node, [&](NodeDatapath& d) { return d.ResizeVolume(v->name, size_bytes); });
    }
    if (!copy.ok()) {
      // A copy missing from its pool is not "no such volume" for the caller.
      const int code = copy.status().code() == ENOENT ? EIO : copy.status().code();
      return Status(code, fmt::format("volume {}: growing its copy on replica node {} to {} "
                                      "bytes: {}", id, node, size_bytes,
                                      copy.status().message()));
    }
  }
  auto grown = store_->GrowVolume(v->name, size_bytes);
  if (!grown.ok()) {
    return Status(grown.status().code(), fmt::format("volume {}: every copy grew to {} bytes, "
                                                     "recording it in the cluster state: {}",
                                                     id, size_bytes, grown.status().message()));
  }
  spdlog::info("[{}] replicated volume {} grew from {} to {} bytes on nodes {}",
               csi::CurrentRequestId(), id, v->size_bytes, grown->size_bytes,
               fmt::join(v->replicas, ","));
  return grown->size_bytes;
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

StatusOr<std::vector<cluster::VolumeState>> ReplicatedVolumes::All() {
  std::vector<cluster::VolumeState> out;
  std::string after;
  do {
    auto page = store_->ListVolumes(after, cluster::kMaxListLimit);
    if (!page.ok()) return page.status();
    out.insert(out.end(), page->volumes.begin(), page->volumes.end());
    after = page->next;
  } while (!after.empty());
  return out;
}

void ReplicatedVolumes::List(
    std::vector<std::pair<std::string, v1::ListVolumesResponse::Entry>>* all,
    std::set<std::pair<std::string, std::string>>* copies) {
  if (!store_) return;
  auto every = All();
  if (!every.ok()) {
    spdlog::warn("[{}] ListVolumes skips the replicated volumes: {}", csi::CurrentRequestId(),
                 every.status().message());
    return;
  }
  for (const auto& v : *every) {
    v1::ListVolumesResponse::Entry e;
    Fill(v, e.mutable_volume(), e.mutable_status()->mutable_volume_condition());
    std::string id = e.volume().volume_id();
    all->emplace_back(std::move(id), std::move(e));
    for (const auto& node : v.replicas) copies->emplace(node, v.name);
  }
}

Status ReplicatedVolumes::CreateSnapshot(const std::string& id, const std::string& snap_name,
                                         v1::Snapshot* out) {
  auto v = Get(id);
  if (!v.ok()) return v.status();
  // Idempotency: a snapshot of this volume can only be on one of its replica nodes.
  for (const auto& node : v->replicas) {
    if (!nodes_.Get(node)) continue;  // as the single-node search, registered nodes only
    auto found = nodes_.GetSnapshot(node, snap_name);
    if (!found.ok() && found.status().code() == ENOENT) continue;
    if (!found.ok()) return found.status();
    if (found->source_volume() != v->name) {
      return Err(EEXIST, "snapshot \"{}\" exists with another source volume ({})", snap_name,
                 VolumeIdOf(node, found->source_volume()));
    }
    FillSnapshot(node, *found, out);
    out->set_source_volume_id(id);
    return Status::Ok();
  }
  // A target that moved, or opened, between the catalogue read and the snapshot: read and try
  // again, a few times.
  constexpr int kAttempts = 3;
  Status last;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    bool again = false;
    last = SnapshotOnce(id, *v, snap_name, out, &again);
    if (!again) return last;
    v = Get(id);
    if (!v.ok()) return v.status();
  }
  return last;
}

Status ReplicatedVolumes::SnapshotOnce(const std::string& id, const cluster::VolumeState& v,
                                       const std::string& snap_name, v1::Snapshot* out,
                                       bool* again) {
  using Clock = std::chrono::steady_clock;
  *again = false;
  std::vector<std::string> candidates = v.in_sync;
  std::optional<dpv1::FreezeTargetResponse> freeze;
  // Before the freeze is asked for: its deadline on the datapath is later than this plus
  // kSnapshotFreeze, so a snapshot done by then was taken inside the freeze.
  const auto asked = Clock::now();
  if (!v.target.empty()) {
    auto f = nodes_.On(v.target,
                       [&](NodeDatapath& d) { return d.FreezeTarget(v.name, kSnapshotFreeze); });
    if (!f.ok() && f.status().code() == ENOENT) {
      *again = true;  // the target closed meanwhile
      return Err(EAGAIN, "volume {}: node {} no longer serves it: {}", id, v.target,
                 f.status().message());
    }
    if (!f.ok()) {
      return Status(f.status().code(), fmt::format("volume {}: freezing its writes on node {} "
                                                   "(its target): {}", id, v.target,
                                                   f.status().message()));
    }
    freeze = *f;
    candidates.assign(f->in_sync().begin(), f->in_sync().end());
  }
  auto made = SnapshotOnOneOf(v, candidates, snap_name);
  bool held = true;  // the freeze was in force until the snapshot was done
  if (freeze) {
    auto thawed = nodes_.On(v.target, [&](NodeDatapath& d) {
      return d.ThawTarget(v.name, freeze->freeze_id());
    });
    if (thawed.ok()) {
      held = *thawed;
    } else {
      // It lifts itself by its deadline; whether it covered the snapshot, our clock says.
      held = Clock::now() < asked + kSnapshotFreeze;
      spdlog::warn("[{}] volume {}: thawing its target on node {} failed ({}); the freeze lifts "
                   "itself within {} ms", csi::CurrentRequestId(), id, v.target,
                   thawed.status().message(), kSnapshotFreeze.count());
    }
  }
  if (!made.ok()) return made.status();
  const auto& [node, snap] = *made;
  // The proof that nothing was written around the freeze: the same epoch after the snapshot
  // (every new target raises it), and the freeze held throughout.
  const uint64_t at_epoch = freeze ? freeze->epoch() : v.epoch;
  std::string why;
  auto after = store_->GetVolume(v.name);
  if (!held) {
    why = fmt::format("the freeze of its target lifted itself ({} ms) before the snapshot was "
                      "done", kSnapshotFreeze.count());
  } else if (!after.ok()) {
    why = fmt::format("the cluster state cannot be read to confirm it: {}",
                      after.status().message());
  } else if (after->epoch != at_epoch) {
    why = fmt::format("a target opened meanwhile (epoch {} -> {})", at_epoch, after->epoch);
    *again = true;
  }
  if (!why.empty()) {
    Status d = nodes_.On(node, [&](NodeDatapath& dp) { return dp.DeleteSnapshot(snap_name); });
    if (!d.ok() && d.code() != ENOENT) {
      spdlog::error("[{}] snapshot {} of volume {} on node {} is not at one write boundary ({}) "
                    "and could not be deleted: {}; delete it (nbdctl snapshot delete) before a "
                    "retry finds it", csi::CurrentRequestId(), snap_name, id, node, why,
                    d.message());
    }
    return Err(EAGAIN, "snapshot {} of volume {} was not taken at one write boundary ({}); it was "
               "deleted, retry", snap_name, id, why);
  }
  FillSnapshot(node, snap, out);
  out->set_source_volume_id(id);
  spdlog::info("[{}] snapshot {} of replicated volume {} taken on node {} at epoch {}{}",
               csi::CurrentRequestId(), out->snapshot_id(), id, node, at_epoch,
               freeze ? fmt::format(" (target on node {} frozen {} ms to drain)", v.target,
                                    freeze->drained_ms())
                      : std::string(" (no target: the copies were quiescent)"));
  return Status::Ok();
}

StatusOr<std::pair<std::string, dpv1::Snapshot>> ReplicatedVolumes::SnapshotOnOneOf(
    const cluster::VolumeState& v, const std::vector<std::string>& nodes,
    const std::string& snap_name) {
  std::vector<std::string> skipped;
  for (const auto& node : nodes) {
    if (std::find(v.replicas.begin(), v.replicas.end(), node) == v.replicas.end()) continue;
    if (!nodes_.Get(node)) {
      skipped.push_back(node + ": not registered");
      continue;
    }
    auto made = nodes_.On(node, [&](NodeDatapath& d) { return d.CreateSnapshot(snap_name, v.name); });
    if (made.ok()) return std::make_pair(node, *made);
    // Unreachable: it never got the call, so another replica may take it. Anything else may
    // have left a snapshot there; the retry finds it.
    if (made.status().code() == EAGAIN) {
      skipped.push_back(fmt::format("{}: {}", node, made.status().message()));
      continue;
    }
    return Status(made.status().code(), fmt::format("snapshot on replica node {}: {}", node,
                                                    made.status().message()));
  }
  return Err(EAGAIN, "volume {}: no in-sync replica can take the snapshot now (in sync: [{}]; {})",
             IdOrName(v.name), fmt::join(nodes, ","),
             skipped.empty() ? std::string("none of them is a replica") : fmt::format("{}", fmt::join(skipped, "; ")));
}

Status ReplicatedVolumes::SnapshotsOf(const std::string& id,
                                      std::vector<std::pair<std::string, dpv1::Snapshot>>* out) {
  auto name = csi::ParseReplicatedVolumeId(id);
  if (!name.ok() || !store_) return Status::Ok();  // names nothing here: no snapshot of it
  auto v = store_->GetVolume(*name);
  if (!v.ok()) return v.status().code() == ENOENT ? Status::Ok() : v.status();
  for (const auto& node : v->replicas) {
    if (!nodes_.Get(node)) {
      spdlog::warn("[{}] ListSnapshots of {} skips replica node {}: not registered",
                   csi::CurrentRequestId(), id, node);
      continue;
    }
    auto list = nodes_.On(node, [&](NodeDatapath& d) { return d.ListSnapshots(v->name); });
    if (!list.ok()) return list.status();
    for (auto& snap : *list) out->emplace_back(node, std::move(snap));
  }
  return Status::Ok();
}

std::string ReplicatedVolumes::ReplicatedSource(const std::string& node,
                                                const std::string& pool_name) {
  if (!store_) return "";
  auto v = store_->GetVolume(pool_name);
  if (!v.ok() || std::find(v->replicas.begin(), v->replicas.end(), node) == v->replicas.end())
    return "";
  auto id = csi::FormatReplicatedVolumeId(pool_name);
  return id.ok() ? *id : "";
}

Status ReplicatedVolumes::RefuseCopy(const std::string& node, const std::string& pool_name,
                                     std::string_view id) {
  const std::string owner = ReplicatedSource(node, pool_name);
  if (owner.empty()) return Status::Ok();
  return Err(EBUSY, "{} is the copy of replicated volume {} on node {}: use {}", id, owner, node,
             owner);
}

std::map<std::pair<std::string, std::string>, std::string> ReplicatedVolumes::CopyIds() {
  std::map<std::pair<std::string, std::string>, std::string> ids;
  if (!store_) return ids;
  auto every = All();
  if (!every.ok()) {
    spdlog::warn("[{}] the replicated volumes' catalogue cannot be read: {}",
                 csi::CurrentRequestId(), every.status().message());
    return ids;
  }
  for (const auto& v : *every) {
    auto id = csi::FormatReplicatedVolumeId(v.name);
    if (!id.ok()) continue;
    for (const auto& node : v.replicas) ids[{node, v.name}] = *id;
  }
  return ids;
}

}  // namespace nbdcsi::controller
