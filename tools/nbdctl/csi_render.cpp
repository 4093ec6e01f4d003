#include "tools/nbdctl/csi_render.h"

#include <cctype>
#include <map>

#include <fmt/format.h>

#include "common/quantity.h"
#include "tools/nbdctl/render.h"

namespace nbdcsi::nbdctl {
namespace {

namespace csi = ::csi::v1;
using nlohmann::json;
using KeyValues = std::vector<std::pair<std::string, std::string>>;

std::string Size(int64_t bytes) {
  return bytes <= 0 ? "-" : FormatQuantity(static_cast<uint64_t>(bytes));
}

std::string JoinMap(const google::protobuf::Map<std::string, std::string>& m) {
  // Sorted: protobuf maps iterate in an unspecified order and output must be stable.
  std::map<std::string, std::string> sorted(m.begin(), m.end());
  std::string out;
  for (const auto& [k, v] : sorted) out += (out.empty() ? "" : ",") + k + "=" + v;
  return out.empty() ? "-" : out;
}

json MapJson(const google::protobuf::Map<std::string, std::string>& m) {
  json j = json::object();
  for (const auto& [k, v] : m) j[k] = v;
  return j;
}

json TopologyJson(const google::protobuf::RepeatedPtrField<csi::Topology>& t) {
  json j = json::array();
  for (const auto& seg : t) j.push_back(MapJson(seg.segments()));
  return j;
}

std::string TopologyText(const google::protobuf::RepeatedPtrField<csi::Topology>& t) {
  std::string out;
  for (const auto& seg : t) out += (out.empty() ? "" : " ") + JoinMap(seg.segments());
  return out.empty() ? "-" : out;
}

json SourceJson(const csi::VolumeContentSource& s) {
  if (s.has_snapshot()) return {{"snapshot_id", s.snapshot().snapshot_id()}};
  if (s.has_volume()) return {{"volume_id", s.volume().volume_id()}};
  return nullptr;
}

std::string SourceText(const csi::VolumeContentSource& s) {
  if (s.has_snapshot()) return "snapshot " + s.snapshot().snapshot_id();
  if (s.has_volume()) return "volume " + s.volume().volume_id();
  return "-";
}

json ConditionJson(bool has, const csi::VolumeCondition& c) {
  if (!has) return nullptr;
  return {{"abnormal", c.abnormal()}, {"message", c.message()}};
}

std::string ConditionText(bool has, const csi::VolumeCondition& c) {
  if (!has) return "-";
  if (!c.abnormal()) return c.message().empty() ? "ok" : "ok: " + c.message();
  return "abnormal: " + c.message();
}

json VolumeJson(const csi::Volume& v) {
  return {{"volume_id", v.volume_id()},
          {"capacity_bytes", v.capacity_bytes()},
          {"volume_context", MapJson(v.volume_context())},
          {"accessible_topology", TopologyJson(v.accessible_topology())},
          {"content_source", v.has_content_source() ? SourceJson(v.content_source()) : nullptr}};
}

KeyValues VolumeKv(const csi::Volume& v) {
  return {{"Volume ID", v.volume_id()},
          {"Capacity", Size(v.capacity_bytes())},
          {"Context", JoinMap(v.volume_context())},
          {"Topology", TopologyText(v.accessible_topology())},
          {"Source", SourceText(v.content_source())}};
}

// What ListVolumes and ControllerGetVolume add to a volume: where it is published and its
// condition (their status messages are distinct types with the same fields). Fills `j` and
// returns the two texts: the nodes ("-" for none) and the condition.
template <typename VolumeStatus>
std::pair<std::string, std::string> AddStatus(const VolumeStatus& st, json& j) {
  std::vector<std::string> nodes(st.published_node_ids().begin(), st.published_node_ids().end());
  j["published_node_ids"] = nodes;
  j["volume_condition"] = ConditionJson(st.has_volume_condition(), st.volume_condition());
  std::string pub;
  for (const auto& n : nodes) pub += (pub.empty() ? "" : ",") + n;
  return {pub.empty() ? "-" : pub, ConditionText(st.has_volume_condition(), st.volume_condition())};
}

int64_t TimestampNs(const google::protobuf::Timestamp& t) {
  return t.seconds() * 1'000'000'000 + t.nanos();
}

std::string CreatedText(const csi::Snapshot& s) {
  return s.has_creation_time() ? FormatTime(TimestampNs(s.creation_time())) : "-";
}

json SnapshotJson(const csi::Snapshot& s) {
  return {{"snapshot_id", s.snapshot_id()},
          {"source_volume_id", s.source_volume_id()},
          {"size_bytes", s.size_bytes()},
          {"ready_to_use", s.ready_to_use()},
          {"creation_time", s.has_creation_time() ? json(FormatTime(TimestampNs(s.creation_time())))
                                                  : json(nullptr)}};
}

template <typename EnumDesc>
std::string EnumName(const EnumDesc* d, int v) {
  const auto* ev = d->FindValueByNumber(v);
  return ev ? ev->name() : std::to_string(v);
}

std::string WithNextToken(std::string table, const std::string& token) {
  if (!token.empty()) table += fmt::format("NEXT TOKEN: {}\n", token);
  return table;
}

}  // namespace

std::vector<std::string> AccessModeNames() {
  std::vector<std::string> out;
  const auto* e = csi::VolumeCapability::AccessMode::Mode_descriptor();
  for (int i = 0; i < e->value_count(); ++i) {
    if (e->value(i)->number() == 0) continue;
    std::string n = e->value(i)->name();
    for (char& c : n) c = c == '_' ? '-' : static_cast<char>(std::tolower(c));
    out.push_back(n);
  }
  return out;
}

Output PluginInfoOutput(const csi::GetPluginInfoResponse& r) {
  KeyValues kv = {{"Name", r.name()}, {"Version", r.vendor_version()}};
  if (!r.manifest().empty()) kv.emplace_back("Manifest", JoinMap(r.manifest()));
  return {{{"name", r.name()},
           {"vendor_version", r.vendor_version()},
           {"manifest", MapJson(r.manifest())}},
          RenderKeyValues(kv)};
}

Output ProbeOutput(bool ready) {
  return {{{"ready", ready}}, fmt::format("Ready:  {}\n", ready ? "yes" : "no")};
}

std::vector<std::string> CapabilityNames(const csi::GetPluginCapabilitiesResponse& r) {
  std::vector<std::string> caps;
  for (const auto& c : r.capabilities()) {
    if (c.has_service()) {
      caps.push_back(
          EnumName(csi::PluginCapability::Service::Type_descriptor(), c.service().type()));
    } else if (c.has_volume_expansion()) {
      caps.push_back("VOLUME_EXPANSION_" +
                     EnumName(csi::PluginCapability::VolumeExpansion::Type_descriptor(),
                              c.volume_expansion().type()));
    }
  }
  return caps;
}

std::vector<std::string> CapabilityNames(const csi::ControllerGetCapabilitiesResponse& r) {
  std::vector<std::string> caps;
  for (const auto& c : r.capabilities()) {
    caps.push_back(
        EnumName(csi::ControllerServiceCapability::RPC::Type_descriptor(), c.rpc().type()));
  }
  return caps;
}

std::vector<std::string> CapabilityNames(const csi::NodeGetCapabilitiesResponse& r) {
  std::vector<std::string> caps;
  for (const auto& c : r.capabilities()) {
    caps.push_back(EnumName(csi::NodeServiceCapability::RPC::Type_descriptor(), c.rpc().type()));
  }
  return caps;
}

Output CapabilitiesOutput(const std::vector<std::string>& names) {
  Table t{{"CAPABILITY"}, {}};
  for (const auto& c : names) t.rows.push_back({c});
  return {json{{"capabilities", names}}, t.Render()};
}

Output CreatedVolumeOutput(const csi::Volume& v) {
  return {VolumeJson(v), RenderKeyValues(VolumeKv(v))};
}

Output VolumeListOutput(const csi::ListVolumesResponse& r) {
  json vols = json::array();
  Table t{{"VOLUME ID", "CAPACITY", "TOPOLOGY", "PUBLISHED ON", "CONDITION"}, {}};
  for (const auto& e : r.entries()) {
    json j = VolumeJson(e.volume());
    auto [pub, condition] = AddStatus(e.status(), j);
    vols.push_back(j);
    t.rows.push_back({e.volume().volume_id(), Size(e.volume().capacity_bytes()),
                      TopologyText(e.volume().accessible_topology()), pub, condition});
  }
  return {{{"volumes", vols}, {"next_token", r.next_token()}},
          WithNextToken(t.Render(), r.next_token())};
}

Output GetVolumeOutput(const csi::ControllerGetVolumeResponse& r) {
  json j = VolumeJson(r.volume());
  auto [pub, condition] = AddStatus(r.status(), j);
  KeyValues kv = VolumeKv(r.volume());
  kv.emplace_back("Published on", pub);
  kv.emplace_back("Condition", condition);
  return {j, RenderKeyValues(kv)};
}

Output ControllerExpandOutput(const std::string& id, const csi::ControllerExpandVolumeResponse& r) {
  return {{{"volume_id", id},
           {"capacity_bytes", r.capacity_bytes()},
           {"node_expansion_required", r.node_expansion_required()}},
          RenderKeyValues({{"Volume ID", id},
                           {"Capacity", Size(r.capacity_bytes())},
                           {"Node expansion", r.node_expansion_required() ? "required" : "no"}})};
}

Output SnapshotOutput(const csi::Snapshot& s) {
  return {SnapshotJson(s), RenderKeyValues({{"Snapshot ID", s.snapshot_id()},
                                            {"Source", s.source_volume_id()},
                                            {"Size", Size(s.size_bytes())},
                                            {"Ready", s.ready_to_use() ? "yes" : "no"},
                                            {"Created", CreatedText(s)}})};
}

Output SnapshotListOutput(const csi::ListSnapshotsResponse& r) {
  json snaps = json::array();
  Table t{{"SNAPSHOT ID", "SOURCE", "SIZE", "READY", "CREATED"}, {}};
  for (const auto& e : r.entries()) {
    const auto& sn = e.snapshot();
    snaps.push_back(SnapshotJson(sn));
    t.rows.push_back({sn.snapshot_id(), sn.source_volume_id(), Size(sn.size_bytes()),
                      sn.ready_to_use() ? "yes" : "no", CreatedText(sn)});
  }
  return {{{"snapshots", snaps}, {"next_token", r.next_token()}},
          WithNextToken(t.Render(), r.next_token())};
}

Output CapacityOutput(const csi::GetCapacityResponse& r) {
  auto opt = [](bool has, int64_t v) { return has ? json(v) : json(nullptr); };
  return {
      {{"available_capacity", r.available_capacity()},
       {"maximum_volume_size", opt(r.has_maximum_volume_size(), r.maximum_volume_size().value())},
       {"minimum_volume_size", opt(r.has_minimum_volume_size(), r.minimum_volume_size().value())}},
      RenderKeyValues(
          {{"Available", r.available_capacity() > 0 ? Size(r.available_capacity()) : "0"},
           {"Maximum volume size",
            r.has_maximum_volume_size() ? Size(r.maximum_volume_size().value()) : "-"},
           {"Minimum volume size",
            r.has_minimum_volume_size() ? Size(r.minimum_volume_size().value()) : "-"}})};
}

Output NodeInfoOutput(const csi::NodeGetInfoResponse& r) {
  return {
      {{"node_id", r.node_id()},
       {"max_volumes_per_node", r.max_volumes_per_node()},
       {"accessible_topology",
        r.has_accessible_topology() ? MapJson(r.accessible_topology().segments()) : json(nullptr)}},
      RenderKeyValues(
          {{"Node ID", r.node_id()},
           {"Max volumes",
            r.max_volumes_per_node() > 0 ? std::to_string(r.max_volumes_per_node()) : "unlimited"},
           {"Topology", JoinMap(r.accessible_topology().segments())}})};
}

Output NodeExpandOutput(const std::string& id, const csi::NodeExpandVolumeResponse& r) {
  return {{{"volume_id", id}, {"capacity_bytes", r.capacity_bytes()}},
          RenderKeyValues({{"Volume ID", id}, {"Capacity", Size(r.capacity_bytes())}})};
}

Output NodeStatsOutput(const std::string& id, const csi::NodeGetVolumeStatsResponse& r) {
  json usage = json::array();
  Table t{{"UNIT", "TOTAL", "USED", "AVAILABLE"}, {}};
  for (const auto& u : r.usage()) {
    const std::string unit = EnumName(csi::VolumeUsage::Unit_descriptor(), u.unit());
    usage.push_back(
        {{"unit", unit}, {"total", u.total()}, {"used", u.used()}, {"available", u.available()}});
    const bool bytes = u.unit() == csi::VolumeUsage::BYTES;
    auto cell = [&](int64_t v) {
      return bytes && v > 0 ? FormatHuman(static_cast<uint64_t>(v)) : std::to_string(v);
    };
    t.rows.push_back({unit, cell(u.total()), cell(u.used()), cell(u.available())});
  }
  std::string text = t.Render();
  if (r.has_volume_condition()) {
    text += fmt::format("Condition: {}\n", ConditionText(true, r.volume_condition()));
  }
  return {{{"volume_id", id},
           {"usage", usage},
           {"volume_condition", ConditionJson(r.has_volume_condition(), r.volume_condition())}},
          text};
}

}  // namespace nbdcsi::nbdctl
