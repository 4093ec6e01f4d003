#include "tools/nbdctl/cluster_render.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/quantity.h"
#include "tools/nbdctl/render.h"

namespace nbdcsi::nbdctl {
namespace {

using nlohmann::json;

std::string Age(uint64_t ms) {
  if (ms < 60'000) return fmt::format("{:.1f}s ago", ms / 1e3);
  if (ms < 3'600'000) return fmt::format("{}m{}s ago", ms / 60'000, ms / 1000 % 60);
  return fmt::format("{}h{}m ago", ms / 3'600'000, ms / 60'000 % 60);
}

std::string Limit(uint64_t v) { return v ? std::to_string(v) : "-"; }
std::string Rate(uint64_t bps) { return bps ? FormatQuantity(bps) + "/s" : "-"; }
std::string Attached(uint64_t conns) {
  return conns ? fmt::format("yes ({})", conns) : "no";
}
std::string Condition(bool abnormal, const std::string& message) {
  return abnormal ? "abnormal: " + message : "ok";
}
json NullIfEmpty(const std::string& s) { return s.empty() ? json(nullptr) : json(s); }

template <typename Answers>
json NodeAnswersJson(const Answers& nodes) {
  json out = json::array();
  for (const auto& a : nodes) {
    out.push_back({{"node", a.node_id()}, {"live", a.live()}, {"error", NullIfEmpty(a.error())}});
  }
  return out;
}

// The nodes that did not answer, after the table: "" when all did.
template <typename Answers>
std::string Unanswered(const Answers& nodes) {
  std::string out;
  for (const auto& a : nodes) {
    if (!a.error().empty()) out += fmt::format("node {}: not listed: {}\n", a.node_id(), a.error());
  }
  return out.empty() ? out : "\n" + out;
}

}  // namespace

json ClusterNodesJson(const cv1::ListClusterNodesResponse& r) {
  json nodes = json::array();
  for (const auto& n : r.nodes()) {
    nodes.push_back({{"node", n.node_id()},
                     {"address", n.api_address()},
                     {"live", n.live()},
                     {"heartbeat_age_ms", n.heartbeat_age_ms()},
                     {"capacity_bytes", n.capacity_bytes()},
                     {"free_bytes", n.free_bytes()},
                     {"provisionable_bytes", n.provisionable_bytes()},
                     {"provisioned_bytes", n.provisioned_bytes()},
                     {"volumes", n.volumes()},
                     {"version", n.version()},
                     {"nbd_devices", n.nbd_devices()},
                     {"reflink", n.reflink()}});
  }
  return {{"heartbeat_ttl_ms", r.heartbeat_ttl_ms()}, {"nodes", nodes}};
}

std::string ClusterNodesTable(const cv1::ListClusterNodesResponse& r) {
  Table t{{"NODE", "ADDRESS", "STATE", "HEARTBEAT", "CAPACITY", "FREE", "PROVISIONABLE",
           "PROVISIONED", "VOLUMES", "VERSION"},
          {}};
  for (const auto& n : r.nodes()) {
    t.rows.push_back({n.node_id(), n.api_address(), n.live() ? "live" : "expired",
                      Age(n.heartbeat_age_ms()), FormatHuman(n.capacity_bytes()),
                      FormatHuman(n.free_bytes()), FormatHuman(n.provisionable_bytes()),
                      FormatHuman(n.provisioned_bytes()), std::to_string(n.volumes()),
                      n.version()});
  }
  return r.nodes().empty() ? "No node has registered with the controller.\n" : t.Render();
}

json ClusterVolumesJson(const cv1::ListClusterVolumesResponse& r) {
  json vols = json::array();
  for (const auto& c : r.volumes()) {
    json j = VolumeJson(c.volume());
    j["node"] = c.node_id();
    j["volume_id"] = c.volume_id();
    j["attached"] = c.volume().open_connections() > 0;
    j["condition"] = {{"abnormal", c.abnormal()}, {"message", c.condition()}};
    j["replica_of"] = NullIfEmpty(c.replica_of());
    vols.push_back(std::move(j));
  }
  json repl = json::array();
  for (const auto& v : r.replicated()) {
    repl.push_back({{"volume_id", v.volume_id()},
                    {"name", v.name()},
                    {"size_bytes", v.size_bytes()},
                    {"replicas", json(std::vector<std::string>(v.replicas().begin(),
                                                               v.replicas().end()))},
                    {"in_sync", json(std::vector<std::string>(v.in_sync().begin(),
                                                              v.in_sync().end()))},
                    {"target", NullIfEmpty(v.target())},
                    {"epoch", v.epoch()},
                    {"condition", {{"abnormal", v.abnormal()}, {"message", v.condition()}}}});
  }
  return {{"volumes", vols},
          {"replicated", repl},
          {"nodes", NodeAnswersJson(r.nodes())},
          {"catalogue_error", NullIfEmpty(r.catalogue_error())}};
}

std::string ClusterVolumesTable(const cv1::ListClusterVolumesResponse& r) {
  Table t{{"NODE", "NAME", "SIZE", "ALLOCATED", "IOPS", "BPS", "ATTACHED", "REPLICA-OF",
           "CONDITION"},
          {}};
  for (const auto& c : r.volumes()) {
    const auto& v = c.volume();
    t.rows.push_back({c.node_id(), v.name(), FormatQuantity(v.size_bytes()),
                      FormatHuman(v.allocated_bytes()), Limit(v.effective_qos().iops()),
                      Rate(v.effective_qos().bps()), Attached(v.open_connections()),
                      c.replica_of().empty() ? "-" : c.replica_of(),
                      Condition(c.abnormal(), c.condition())});
  }
  std::string out = r.volumes().empty() ? "No volumes.\n" : t.Render();
  if (!r.replicated().empty()) {
    Table rt{{"REPLICATED", "SIZE", "REPLICAS", "IN-SYNC", "TARGET", "EPOCH", "CONDITION"}, {}};
    for (const auto& v : r.replicated()) {
      rt.rows.push_back({v.volume_id(), FormatQuantity(v.size_bytes()),
                         fmt::format("{}", fmt::join(v.replicas(), ",")),
                         fmt::format("{}", fmt::join(v.in_sync(), ",")),
                         v.target().empty() ? "-" : v.target(), std::to_string(v.epoch()),
                         Condition(v.abnormal(), v.condition())});
    }
    out += "\n" + rt.Render();
  }
  if (!r.catalogue_error().empty())
    out += "\nreplicated volumes not listed: " + r.catalogue_error() + "\n";
  return out + Unanswered(r.nodes());
}

json ClusterSnapshotsJson(const cv1::ListClusterSnapshotsResponse& r) {
  json snaps = json::array();
  for (const auto& c : r.snapshots()) {
    json j = SnapshotJson(c.snapshot());
    j["node"] = c.node_id();
    j["snapshot_id"] = c.snapshot_id();
    j["source_volume_id"] = c.source_volume_id();
    snaps.push_back(std::move(j));
  }
  return {{"snapshots", snaps}, {"nodes", NodeAnswersJson(r.nodes())}};
}

std::string ClusterSnapshotsTable(const cv1::ListClusterSnapshotsResponse& r) {
  Table t{{"NODE", "NAME", "SOURCE", "SIZE", "ALLOCATED", "METHOD", "READY", "CREATED"}, {}};
  for (const auto& c : r.snapshots()) {
    const auto& s = c.snapshot();
    t.rows.push_back({c.node_id(), s.name(), c.source_volume_id(), FormatQuantity(s.size_bytes()),
                      FormatHuman(s.allocated_bytes()), s.method(),
                      ReadyText(s.ready(), s.copy_done_bytes(), s.copy_total_bytes(), s.error()),
                      FormatTime(s.created_unix_ns())});
  }
  return (r.snapshots().empty() ? "No snapshots.\n" : t.Render()) + Unanswered(r.nodes());
}

}  // namespace nbdcsi::nbdctl
