// ListVolumes and ListSnapshots: every live node asked at once, entries sorted by id and paged
// (controller/paging.h). ListVolumes never fails for a node that does not answer (the health
// monitor would then learn nothing about any volume): that node's volumes are listed from its
// last listing (controller/last_listings.h), abnormal, with "node N unreachable: <cause>", and so
// are those of a node listed before whose heartbeats stopped. Both sources give the same ids, so
// a page boundary holds whichever one a page came from. A full ListSnapshots skips a node that
// does not answer (logged); a listing filtered to one node's objects fails instead: "no entry"
// would read as "gone".
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "controller/controller_service.h"
#include "controller/csi_response.h"
#include "controller/csi_status.h"
#include "controller/paging.h"
#include "csi/ids.h"
#include "csi/logging.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

namespace {

using SnapshotEntries = std::vector<std::pair<std::string, v1::ListSnapshotsResponse::Entry>>;

void SkipNode(const char* call, const std::string& node, const Status& why) {
  spdlog::warn("[{}] {} skips node {}: {}", csi::CurrentRequestId(), call, node, why.message());
}

// `r1_source`: the r1 id of the replicated volume it was taken from ("" for a single-node one).
void AddSnapshot(const std::string& node, const dpv1::Snapshot& ds, SnapshotEntries* all,
                 const std::string& r1_source = "") {
  v1::ListSnapshotsResponse::Entry e;
  FillSnapshot(node, ds, e.mutable_snapshot());
  if (!r1_source.empty()) e.mutable_snapshot()->set_source_volume_id(r1_source);
  std::string id = e.snapshot().snapshot_id();
  all->emplace_back(std::move(id), std::move(e));
}

// The snapshot `snapshot_id` names, when it exists (and was taken from `src`, or from the
// replicated volume `r1_src`, when given).
Status OneSnapshot(Nodes& nodes, ReplicatedVolumes& replicated, const std::string& snapshot_id,
                   const std::optional<csi::VolumeRef>& src, const std::string& r1_src,
                   SnapshotEntries* all) {
  auto ref = csi::ParseSnapshotId(snapshot_id);
  if (!ref.ok() || (src && src->node_id != ref->node_id)) return Status::Ok();  // names nothing
  auto ds = nodes.GetSnapshot(ref->node_id, ref->pool_name);
  // A node that cannot answer is UNAVAILABLE, not an empty list: the snapshotter would take "no
  // entry" for a snapshot that is gone.
  if (!ds.ok()) return ds.status().code() == ENOENT ? Status::Ok() : ds.status();
  const std::string r1 = replicated.ReplicatedSource(ref->node_id, ds->source_volume());
  const bool from_src =
      src ? ds->source_volume() == src->pool_name : r1_src.empty() || r1 == r1_src;
  if (from_src) AddSnapshot(ref->node_id, *ds, all, r1);
  return Status::Ok();
}

// The snapshots taken from the replicated volume `id`: every registered replica node answers.
Status SnapshotsOfReplicated(ReplicatedVolumes& replicated, const std::string& id,
                             SnapshotEntries* all) {
  std::vector<std::pair<std::string, dpv1::Snapshot>> found;
  if (Status s = replicated.SnapshotsOf(id, &found); !s.ok()) return s;
  for (const auto& [node, ds] : found) AddSnapshot(node, ds, all, id);
  return Status::Ok();
}

// The snapshots taken from `src`: its node must answer.
Status SnapshotsOf(Nodes& nodes, const csi::VolumeRef& src, SnapshotEntries* all) {
  auto list =
      nodes.On(src.node_id, [&](NodeDatapath& d) { return d.ListSnapshots(src.pool_name); });
  if (!list.ok()) return list.status();
  for (const auto& ds : *list) AddSnapshot(src.node_id, ds, all);
  return Status::Ok();
}

void AllSnapshots(Nodes& nodes, ReplicatedVolumes& replicated, SnapshotEntries* all) {
  std::vector<NodeInfo> live = nodes.List();
  auto answers = FanOut(live, [&](const NodeInfo& n) {
    return nodes.On(n.node_id, [](NodeDatapath& d) { return d.ListSnapshots(""); });
  });
  // Snapshots of replicated volumes name their r1 volume as the source, not the copy.
  const auto copies = replicated.CopyIds();
  for (size_t i = 0; i < live.size(); ++i) {
    const std::string& node = live[i].node_id;
    if (!answers[i].ok()) {
      SkipNode("ListSnapshots", node, answers[i].status());
      continue;
    }
    for (const auto& ds : *answers[i]) {
      auto r1 = copies.find({node, ds.source_volume()});
      AddSnapshot(node, ds, all, r1 == copies.end() ? "" : r1->second);
    }
  }
}

// What a ListSnapshots request asks for: one snapshot, those of one volume, or all.
Status CollectSnapshots(Nodes& nodes, ReplicatedVolumes& replicated,
                        const v1::ListSnapshotsRequest& req, SnapshotEntries* all) {
  std::optional<csi::VolumeRef> src;
  std::string r1_src;
  if (csi::IsReplicatedVolumeId(req.source_volume_id())) {
    // A malformed r1 id names no volume: OneSnapshot and SnapshotsOf find nothing from it.
    if (!csi::ParseReplicatedVolumeId(req.source_volume_id()).ok()) return Status::Ok();
    r1_src = req.source_volume_id();
  } else if (!req.source_volume_id().empty()) {
    auto r = csi::ParseVolumeId(req.source_volume_id());
    // A malformed id names no volume, so no snapshot was taken from it: an empty list.
    if (!r.ok()) return Status::Ok();
    src = *r;
  }
  if (!req.snapshot_id().empty())
    return OneSnapshot(nodes, replicated, req.snapshot_id(), src, r1_src, all);
  if (!r1_src.empty()) return SnapshotsOfReplicated(replicated, r1_src, all);
  if (src) return SnapshotsOf(nodes, *src, all);
  AllSnapshots(nodes, replicated, all);
  return Status::Ok();
}

}  // namespace

Status ControllerImpl::ListVolumes(const v1::ListVolumesRequest& req,
                                   v1::ListVolumesResponse* resp) {
  if (Status s = CheckPageToken(req.starting_token()); !s.ok()) return s;
  std::vector<NodeInfo> live = nodes_.List();
  // Before asking: a volume deleted while the answers are on their way is not published.
  const LastListings::Ticket ticket = last_listings_.Begin();
  auto answers = FanOut(live, [&](const NodeInfo& n) {
    return nodes_.On(n.node_id, [](NodeDatapath& d) { return d.ListVolumes(); });
  });
  std::vector<std::pair<std::string, v1::ListVolumesResponse::Entry>> all;
  // Replicated volumes once each (r1 ids), not their copies in the replicas' pools.
  std::set<std::pair<std::string, std::string>> copies;
  replicated_.List(&all, &copies);
  // `node`'s volumes as it (or, when `down` is set, its last listing) says, each abnormal with
  // `down` as the cause when set.
  auto add = [&](const std::string& node, const std::vector<dpv1::Volume>& volumes,
                 const std::string& down) {
    for (const auto& dv : volumes) {
      if (copies.count({node, dv.name()})) continue;
      v1::ListVolumesResponse::Entry e;
      FillVolume(node, dv, e.mutable_volume());
      auto* cond = e.mutable_status()->mutable_volume_condition();
      if (down.empty()) {
        FillCondition(dv, cond);
      } else {
        cond->set_abnormal(true);
        cond->set_message(down);
      }
      std::string id = e.volume().volume_id();
      all.emplace_back(std::move(id), std::move(e));
    }
  };
  std::set<std::string> asked;
  for (size_t i = 0; i < live.size(); ++i) {
    const std::string& node = live[i].node_id;
    asked.insert(node);
    if (answers[i].ok()) {
      last_listings_.Put(ticket, node, *answers[i]);
      add(node, *answers[i], "");
      continue;
    }
    auto last = last_listings_.Of(node);
    spdlog::warn(
        "[{}] ListVolumes: node {} did not answer ({}); {} of its volumes listed as "
        "abnormal from its last listing",
        csi::CurrentRequestId(), node, answers[i].status().message(), last ? last->size() : 0);
    if (last) {
      add(node, *last,
          NodeDownMessage(node, answers[i].status(),
                          fmt::format("node {} could not list its volumes: ", node)));
    }
  }
  // Nodes listed before whose heartbeats stopped since: not asked, their volumes still exist.
  for (const std::string& node : last_listings_.Nodes()) {
    if (asked.count(node)) continue;
    auto last = last_listings_.Of(node);
    if (last) add(node, *last, fmt::format("node {} unreachable: {}", node, nodes_.WhyAbsent()));
  }
  return Paginate(std::move(all), req.max_entries(), req.starting_token(), resp->mutable_entries(),
                  resp->mutable_next_token());
}

Status ControllerImpl::ListSnapshots(const v1::ListSnapshotsRequest& req,
                                     v1::ListSnapshotsResponse* resp) {
  if (Status s = CheckPageToken(req.starting_token()); !s.ok()) return s;
  SnapshotEntries all;
  if (csi::IsBackupSnapshotId(req.snapshot_id())) {
    // One backup snapshot (the snapshotter checks a pre-provisioned one this way). A malformed
    // id, or one asked for with a source volume (a backup keeps its source's pool name only),
    // names nothing here.
    auto ref = csi::ParseBackupSnapshotId(req.snapshot_id());
    if (!ref.ok() || !req.source_volume_id().empty()) return Status::Ok();
    auto got = backups_.Get(*ref, req.secrets());
    if (!got.ok()) return got.status();
    if (*got) {
      v1::ListSnapshotsResponse::Entry e;
      *e.mutable_snapshot() = std::move(**got);
      all.emplace_back(req.snapshot_id(), std::move(e));
    }
  } else if (Status s = CollectSnapshots(nodes_, replicated_, req, &all); !s.ok()) {
    return s;
  }
  return Paginate(std::move(all), req.max_entries(), req.starting_token(), resp->mutable_entries(),
                  resp->mutable_next_token());
}

}  // namespace nbdcsi::controller
