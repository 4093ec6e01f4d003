#include "common/grpc_status.h"
#include "tools/nbdctl/csi_cmds.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "common/endpoint.h"
#include "common/quantity.h"
#include "csi/csi.grpc.pb.h"
#include "tools/nbdctl/render.h"

namespace nbdcsi::nbdctl {
namespace {

namespace csi = ::csi::v1;
using nlohmann::json;

constexpr int kExitServer = 1;
constexpr int kExitUsage = 2;
constexpr double kDefaultTimeoutS = 60;

struct UsageError {
  std::string message;
};

// "single-node-writer" <-> SINGLE_NODE_WRITER, from the proto's own enum so new modes appear
// without code changes.
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

csi::VolumeCapability::AccessMode::Mode AccessModeFromName(const std::string& name) {
  std::string n = name;
  for (char& c : n) c = c == '-' ? '_' : static_cast<char>(std::toupper(c));
  csi::VolumeCapability::AccessMode::Mode m{};
  if (!csi::VolumeCapability::AccessMode::Mode_Parse(n, &m)) {
    throw UsageError{fmt::format("--access-mode: unknown mode \"{}\"", name)};
  }
  return m;
}

// "k=v" pairs; the value may contain '='.
std::map<std::string, std::string> ParsePairs(const char* flag,
                                              const std::vector<std::string>& pairs) {
  std::map<std::string, std::string> out;
  for (const auto& p : pairs) {
    size_t eq = p.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw UsageError{fmt::format("{}: \"{}\" is not KEY=VALUE", flag, p)};
    }
    if (!out.emplace(p.substr(0, eq), p.substr(eq + 1)).second) {
      throw UsageError{fmt::format("{}: key \"{}\" given twice", flag, p.substr(0, eq))};
    }
  }
  return out;
}

int64_t ParseSize(const std::string& flag, const std::string& value) {
  auto r = ParseQuantity(value);
  if (!r.ok()) throw UsageError{fmt::format("{}: {}", flag, r.status().message())};
  if (*r == 0) throw UsageError{fmt::format("{}: size must be greater than 0", flag)};
  if (*r > static_cast<uint64_t>(INT64_MAX)) {
    throw UsageError{fmt::format("{}: {} is larger than CSI's int64 byte counts", flag, value)};
  }
  return static_cast<int64_t>(*r);
}

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

std::vector<std::pair<std::string, std::string>> VolumeKv(const csi::Volume& v) {
  return {{"Volume ID", v.volume_id()},
          {"Capacity", Size(v.capacity_bytes())},
          {"Context", JoinMap(v.volume_context())},
          {"Topology", TopologyText(v.accessible_topology())},
          {"Source", SourceText(v.content_source())}};
}

int64_t TimestampNs(const google::protobuf::Timestamp& t) {
  return t.seconds() * 1'000'000'000 + t.nanos();
}

json SnapshotJson(const csi::Snapshot& s) {
  return {{"snapshot_id", s.snapshot_id()},
          {"source_volume_id", s.source_volume_id()},
          {"size_bytes", s.size_bytes()},
          {"ready_to_use", s.ready_to_use()},
          {"creation_time", s.has_creation_time()
                                ? json(FormatTime(TimestampNs(s.creation_time())))
                                : json(nullptr)}};
}

std::string SnapshotText(const csi::Snapshot& s) {
  return RenderKeyValues({{"Snapshot ID", s.snapshot_id()},
                          {"Source", s.source_volume_id()},
                          {"Size", Size(s.size_bytes())},
                          {"Ready", s.ready_to_use() ? "yes" : "no"},
                          {"Created", s.has_creation_time()
                                          ? FormatTime(TimestampNs(s.creation_time()))
                                          : "-"}});
}

// Capability names as the spec spells them; an RPC type this build does not know prints as
// its number rather than disappearing.
template <typename EnumDesc>
std::string EnumName(const EnumDesc* d, int v) {
  const auto* ev = d->FindValueByNumber(v);
  return ev ? ev->name() : std::to_string(v);
}

int PrintCapabilities(const std::vector<std::string>& caps, const std::string& output) {
  if (output == "json") {
    std::cout << json{{"capabilities", caps}}.dump(2) << "\n";
  } else {
    Table t{{"CAPABILITY"}, {}};
    for (const auto& c : caps) t.rows.push_back({c});
    std::cout << t.Render();
  }
  return 0;
}

}  // namespace

struct CsiCommands::Impl {
  CLI::App* app = nullptr;
  const std::string* output = nullptr;
  const double* global_timeout = nullptr;

  CLI::App* csi_cmd = nullptr;
  CLI::Option* timeout_opt = nullptr;
  std::string endpoint;
  double timeout_s = kDefaultTimeoutS;

  // Flags; each subcommand binds the ones it takes.
  std::string id, name, size, fs_type, access_mode = "single-node-writer", from_snapshot,
                                       from_volume, source, snap_id, token, staging_path,
                                       target_path, volume_path;
  std::vector<std::string> params, topology, mount_flags;
  bool block = false, readonly = false;
  int32_t max_entries = 0;

  CLI::App *id_info, *id_probe, *id_caps;
  CLI::App *c_create, *c_delete, *c_list, *c_get, *c_expand, *c_modify, *c_snap, *s_create,
      *s_delete, *s_list, *c_capacity, *c_caps;
  CLI::App *n_info, *n_caps, *n_stage, *n_unstage, *n_publish, *n_unpublish, *n_expand, *n_stats;
  CLI::App *identity, *controller, *node;

  Endpoint ep;
  std::shared_ptr<grpc::Channel> channel;

  void Define();
  void AddCapabilityFlags(CLI::App* c) {
    c->add_flag("--block", block, "Raw block access (default: a mounted file system)");
    c->add_option("--fs-type", fs_type, "File system for mount access (default: the plugin's)");
    c->add_option("--mount-flag", mount_flags, "Mount option (repeatable)");
    c->add_option("--access-mode", access_mode, "Access mode")
        ->check(CLI::IsMember(AccessModeNames()))
        ->capture_default_str();
  }
  csi::VolumeCapability Capability() const {
    csi::VolumeCapability cap;
    if (block) {
      if (!fs_type.empty() || !mount_flags.empty()) {
        throw UsageError{"--block excludes --fs-type and --mount-flag"};
      }
      cap.mutable_block();
    } else {
      cap.mutable_mount()->set_fs_type(fs_type);
      for (const auto& f : mount_flags) cap.mutable_mount()->add_mount_flags(f);
    }
    cap.mutable_access_mode()->set_mode(AccessModeFromName(access_mode));
    return cap;
  }
  std::unique_ptr<grpc::ClientContext> Ctx() const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    return ctx;
  }
  bool Json() const { return *output == "json"; }
  void Print(const json& j, const std::string& text) const {
    if (Json()) std::cout << j.dump(2) << "\n";
    else std::cout << text;
  }
  int Fail(const std::string& what, const grpc::Status& s) const;
  int Dispatch();
};

void CsiCommands::Impl::Define() {
  csi_cmd = app->add_subcommand(
      "csi", "Call a CSI plugin (nbd-csi-controller, nbd-csi-node) directly, like kubelet and "
             "the sidecars do");
  const char* env = std::getenv("CSI_ENDPOINT");
  if (env && *env) endpoint = env;
  csi_cmd->add_option("--endpoint", endpoint,
                      "CSI endpoint: unix:///path or tcp://host:port (default: $CSI_ENDPOINT)");
  timeout_opt = csi_cmd->add_option("--timeout", timeout_s,
                                    "Seconds to wait for each call (default 60: staging may "
                                    "run mkfs)")
                    ->check(CLI::Range(0.001, 86400.0));

  identity = csi_cmd->add_subcommand("identity", "Identity service");
  id_info = identity->add_subcommand("info", "GetPluginInfo: name and version");
  id_probe = identity->add_subcommand("probe", "Probe: exit 0 when ready, 1 when not");
  id_caps = identity->add_subcommand("capabilities", "GetPluginCapabilities");

  controller = csi_cmd->add_subcommand("controller", "Controller service");
  c_create = controller->add_subcommand("create-volume", "CreateVolume (idempotent by NAME)");
  c_create->add_option("NAME", name, "CSI volume name (what the provisioner passes: pvc-<uid>)")
      ->required();
  c_create->add_option("--size", size, "Required capacity, a quantity (1Gi)");
  c_create->add_option("--param", params, "StorageClass parameter KEY=VALUE (repeatable)");
  c_create->add_option("--topology", topology,
                       "Required topology segment KEY=VALUE (repeatable), e.g. "
                       "topology.nbd.csi.io/node=node-1");
  auto* fs = c_create->add_option("--from-snapshot", from_snapshot, "Restore this snapshot id");
  auto* fv = c_create->add_option("--from-volume", from_volume, "Clone this volume id");
  fs->excludes(fv);
  AddCapabilityFlags(c_create);
  c_delete = controller->add_subcommand("delete-volume", "DeleteVolume (idempotent)");
  c_delete->add_option("VOLUME_ID", id, "Volume id")->required();
  c_list = controller->add_subcommand("list-volumes", "ListVolumes");
  c_list->add_option("--max", max_entries, "At most this many entries (0: all)")
      ->check(CLI::NonNegativeNumber);
  c_list->add_option("--token", token, "Continue from a previous NEXT TOKEN");
  c_get = controller->add_subcommand("get-volume", "ControllerGetVolume");
  c_get->add_option("VOLUME_ID", id, "Volume id")->required();
  c_expand = controller->add_subcommand("expand", "ControllerExpandVolume");
  c_expand->add_option("VOLUME_ID", id, "Volume id")->required();
  c_expand->add_option("--size", size, "New required capacity, a quantity")->required();
  c_modify = controller->add_subcommand("modify", "ControllerModifyVolume (QoS parameters)");
  c_modify->add_option("VOLUME_ID", id, "Volume id")->required();
  c_modify->add_option("--param", params, "Mutable parameter KEY=VALUE (repeatable)")
      ->required();
  c_snap = controller->add_subcommand("snapshot", "Snapshots");
  s_create = c_snap->add_subcommand("create", "CreateSnapshot (idempotent by NAME)");
  s_create->add_option("NAME", name, "CSI snapshot name")->required();
  s_create->add_option("--source", source, "Source volume id")->required();
  s_create->add_option("--param", params, "VolumeSnapshotClass parameter KEY=VALUE");
  s_delete = c_snap->add_subcommand("delete", "DeleteSnapshot (idempotent)");
  s_delete->add_option("SNAPSHOT_ID", id, "Snapshot id")->required();
  s_list = c_snap->add_subcommand("list", "ListSnapshots");
  s_list->add_option("--source", source, "Only snapshots of this volume id");
  s_list->add_option("--id", snap_id, "Only this snapshot id");
  s_list->add_option("--max", max_entries, "At most this many entries (0: all)")
      ->check(CLI::NonNegativeNumber);
  s_list->add_option("--token", token, "Continue from a previous NEXT TOKEN");
  c_capacity = controller->add_subcommand("capacity", "GetCapacity");
  c_capacity->add_option("--topology", topology, "Topology segment KEY=VALUE (repeatable)");
  c_capacity->add_option("--param", params, "StorageClass parameter KEY=VALUE (repeatable)");
  c_caps = controller->add_subcommand("capabilities", "ControllerGetCapabilities");

  node = csi_cmd->add_subcommand("node", "Node service");
  n_info = node->add_subcommand("info", "NodeGetInfo");
  n_caps = node->add_subcommand("capabilities", "NodeGetCapabilities");
  n_stage = node->add_subcommand("stage", "NodeStageVolume");
  n_stage->add_option("VOLUME_ID", id, "Volume id")->required();
  n_stage->add_option("--staging-path", staging_path, "Staging target path")->required();
  n_stage->add_option("--param", params, "Volume context KEY=VALUE (repeatable)");
  AddCapabilityFlags(n_stage);
  n_unstage = node->add_subcommand("unstage", "NodeUnstageVolume");
  n_unstage->add_option("VOLUME_ID", id, "Volume id")->required();
  n_unstage->add_option("--staging-path", staging_path, "Staging target path")->required();
  n_publish = node->add_subcommand("publish", "NodePublishVolume");
  n_publish->add_option("VOLUME_ID", id, "Volume id")->required();
  n_publish->add_option("--staging-path", staging_path, "Staging target path")->required();
  n_publish->add_option("--target-path", target_path, "Target path")->required();
  n_publish->add_flag("--readonly", readonly, "Publish read-only");
  n_publish->add_option("--param", params, "Volume context KEY=VALUE (repeatable)");
  AddCapabilityFlags(n_publish);
  n_unpublish = node->add_subcommand("unpublish", "NodeUnpublishVolume");
  n_unpublish->add_option("VOLUME_ID", id, "Volume id")->required();
  n_unpublish->add_option("--target-path", target_path, "Target path")->required();
  n_expand = node->add_subcommand("expand", "NodeExpandVolume");
  n_expand->add_option("VOLUME_ID", id, "Volume id")->required();
  n_expand->add_option("--volume-path", volume_path, "Volume path (the publish target)")
      ->required();
  n_expand->add_option("--staging-path", staging_path, "Staging target path");
  n_expand->add_option("--size", size, "Required capacity, a quantity");
  n_expand->add_flag("--block", block, "The volume is a raw block volume");
  n_stats = node->add_subcommand("stats", "NodeGetVolumeStats");
  n_stats->add_option("VOLUME_ID", id, "Volume id")->required();
  n_stats->add_option("--volume-path", volume_path, "Volume path")->required();
  n_stats->add_option("--staging-path", staging_path, "Staging target path");
}

int CsiCommands::Impl::Fail(const std::string& what, const grpc::Status& s) const {
  bool reached = channel && channel->GetState(false) == GRPC_CHANNEL_READY;
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE && !reached) {
    std::string hint = s.error_message();
    if (ep.kind == Endpoint::Kind::kUnix) {
      struct stat st{};
      if (stat(ep.path.c_str(), &st) != 0) {
        hint = fmt::format("socket {} does not exist", ep.path);
      } else if (access(ep.path.c_str(), R_OK | W_OK) != 0) {
        hint = fmt::format("no permission on socket {} (mode {:o}): run as its owner or root",
                           ep.path, st.st_mode & 07777);
      }
    }
    std::cerr << fmt::format("nbdctl: cannot reach the CSI plugin at {}: is it running? ({})\n",
                             ep.ToString(), hint);
  } else if (s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    std::cerr << fmt::format("nbdctl: cannot {}: DEADLINE_EXCEEDED: no answer from {} within "
                             "{}s (--timeout)\n",
                             what, ep.ToString(), timeout_s);
  } else {
    std::cerr << fmt::format("nbdctl: cannot {}: {}: {}\n", what, GrpcCodeName(s.error_code()),
                             s.error_message());
  }
  return kExitServer;
}

int CsiCommands::Impl::Dispatch() {
  if (id_info->parsed()) {
    auto stub = csi::Identity::NewStub(channel);
    csi::GetPluginInfoResponse r;
    if (auto s = stub->GetPluginInfo(Ctx().get(), {}, &r); !s.ok()) {
      return Fail("get plugin info", s);
    }
    std::vector<std::pair<std::string, std::string>> kv = {{"Name", r.name()},
                                                           {"Version", r.vendor_version()}};
    if (!r.manifest().empty()) kv.emplace_back("Manifest", JoinMap(r.manifest()));
    Print({{"name", r.name()}, {"vendor_version", r.vendor_version()},
           {"manifest", MapJson(r.manifest())}},
          RenderKeyValues(kv));
    return 0;
  }
  if (id_probe->parsed()) {
    auto stub = csi::Identity::NewStub(channel);
    csi::ProbeResponse r;
    if (auto s = stub->Probe(Ctx().get(), {}, &r); !s.ok()) return Fail("probe", s);
    // An unset `ready` means ready (CSI spec).
    const bool ready = !r.has_ready() || r.ready().value();
    Print({{"ready", ready}}, fmt::format("Ready:  {}\n", ready ? "yes" : "no"));
    return ready ? 0 : kExitServer;
  }
  if (id_caps->parsed()) {
    auto stub = csi::Identity::NewStub(channel);
    csi::GetPluginCapabilitiesResponse r;
    if (auto s = stub->GetPluginCapabilities(Ctx().get(), {}, &r); !s.ok()) {
      return Fail("get plugin capabilities", s);
    }
    std::vector<std::string> caps;
    for (const auto& c : r.capabilities()) {
      if (c.has_service()) {
        caps.push_back(EnumName(csi::PluginCapability::Service::Type_descriptor(),
                                c.service().type()));
      } else if (c.has_volume_expansion()) {
        caps.push_back("VOLUME_EXPANSION_" +
                       EnumName(csi::PluginCapability::VolumeExpansion::Type_descriptor(),
                                c.volume_expansion().type()));
      }
    }
    return PrintCapabilities(caps, *output);
  }

  auto ctl = csi::Controller::NewStub(channel);
  if (c_create->parsed()) {
    csi::CreateVolumeRequest req;
    req.set_name(name);
    if (!size.empty()) req.mutable_capacity_range()->set_required_bytes(ParseSize("--size", size));
    for (const auto& [k, v] : ParsePairs("--param", params)) (*req.mutable_parameters())[k] = v;
    auto topo = ParsePairs("--topology", topology);
    if (!topo.empty()) {
      // The external-provisioner sends the chosen node as both requisite and preferred.
      auto* req_t = req.mutable_accessibility_requirements();
      for (auto* t : {req_t->add_requisite(), req_t->add_preferred()}) {
        for (const auto& [k, v] : topo) (*t->mutable_segments())[k] = v;
      }
    }
    if (!from_snapshot.empty()) {
      req.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(from_snapshot);
    }
    if (!from_volume.empty()) {
      req.mutable_volume_content_source()->mutable_volume()->set_volume_id(from_volume);
    }
    *req.add_volume_capabilities() = Capability();
    csi::CreateVolumeResponse r;
    if (auto s = ctl->CreateVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("create volume \"{}\"", name), s);
    }
    Print(VolumeJson(r.volume()), RenderKeyValues(VolumeKv(r.volume())));
    return 0;
  }
  if (c_delete->parsed()) {
    csi::DeleteVolumeRequest req;
    req.set_volume_id(id);
    csi::DeleteVolumeResponse r;
    if (auto s = ctl->DeleteVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("delete volume {}", id), s);
    }
    Print({{"deleted", id}}, fmt::format("volume {} deleted\n", id));
    return 0;
  }
  if (c_list->parsed()) {
    csi::ListVolumesRequest req;
    req.set_max_entries(max_entries);
    req.set_starting_token(token);
    csi::ListVolumesResponse r;
    if (auto s = ctl->ListVolumes(Ctx().get(), req, &r); !s.ok()) return Fail("list volumes", s);
    json vols = json::array();
    Table t{{"VOLUME ID", "CAPACITY", "TOPOLOGY", "PUBLISHED ON", "CONDITION"}, {}};
    for (const auto& e : r.entries()) {
      json j = VolumeJson(e.volume());
      std::vector<std::string> nodes(e.status().published_node_ids().begin(),
                                     e.status().published_node_ids().end());
      j["published_node_ids"] = nodes;
      j["volume_condition"] = ConditionJson(e.status().has_volume_condition(),
                                            e.status().volume_condition());
      vols.push_back(j);
      std::string pub;
      for (const auto& n : nodes) pub += (pub.empty() ? "" : ",") + n;
      t.rows.push_back({e.volume().volume_id(), Size(e.volume().capacity_bytes()),
                        TopologyText(e.volume().accessible_topology()), pub.empty() ? "-" : pub,
                        ConditionText(e.status().has_volume_condition(),
                                      e.status().volume_condition())});
    }
    std::string text = t.Render();
    if (!r.next_token().empty()) text += fmt::format("NEXT TOKEN: {}\n", r.next_token());
    Print({{"volumes", vols}, {"next_token", r.next_token()}}, text);
    return 0;
  }
  if (c_get->parsed()) {
    csi::ControllerGetVolumeRequest req;
    req.set_volume_id(id);
    csi::ControllerGetVolumeResponse r;
    if (auto s = ctl->ControllerGetVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("get volume {}", id), s);
    }
    json j = VolumeJson(r.volume());
    std::vector<std::string> nodes(r.status().published_node_ids().begin(),
                                   r.status().published_node_ids().end());
    j["published_node_ids"] = nodes;
    j["volume_condition"] =
        ConditionJson(r.status().has_volume_condition(), r.status().volume_condition());
    auto kv = VolumeKv(r.volume());
    std::string pub;
    for (const auto& n : nodes) pub += (pub.empty() ? "" : ",") + n;
    kv.emplace_back("Published on", pub.empty() ? "-" : pub);
    kv.emplace_back("Condition", ConditionText(r.status().has_volume_condition(),
                                               r.status().volume_condition()));
    Print(j, RenderKeyValues(kv));
    return 0;
  }
  if (c_expand->parsed()) {
    csi::ControllerExpandVolumeRequest req;
    req.set_volume_id(id);
    req.mutable_capacity_range()->set_required_bytes(ParseSize("--size", size));
    csi::ControllerExpandVolumeResponse r;
    if (auto s = ctl->ControllerExpandVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("expand volume {}", id), s);
    }
    Print({{"volume_id", id},
           {"capacity_bytes", r.capacity_bytes()},
           {"node_expansion_required", r.node_expansion_required()}},
          RenderKeyValues({{"Volume ID", id},
                           {"Capacity", Size(r.capacity_bytes())},
                           {"Node expansion", r.node_expansion_required() ? "required" : "no"}}));
    return 0;
  }
  if (c_modify->parsed()) {
    csi::ControllerModifyVolumeRequest req;
    req.set_volume_id(id);
    for (const auto& [k, v] : ParsePairs("--param", params)) {
      (*req.mutable_mutable_parameters())[k] = v;
    }
    csi::ControllerModifyVolumeResponse r;
    if (auto s = ctl->ControllerModifyVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("modify volume {}", id), s);
    }
    Print({{"modified", id}}, fmt::format("volume {} modified\n", id));
    return 0;
  }
  if (s_create->parsed()) {
    csi::CreateSnapshotRequest req;
    req.set_name(name);
    req.set_source_volume_id(source);
    for (const auto& [k, v] : ParsePairs("--param", params)) (*req.mutable_parameters())[k] = v;
    csi::CreateSnapshotResponse r;
    if (auto s = ctl->CreateSnapshot(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("create snapshot \"{}\"", name), s);
    }
    Print(SnapshotJson(r.snapshot()), SnapshotText(r.snapshot()));
    return 0;
  }
  if (s_delete->parsed()) {
    csi::DeleteSnapshotRequest req;
    req.set_snapshot_id(id);
    csi::DeleteSnapshotResponse r;
    if (auto s = ctl->DeleteSnapshot(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("delete snapshot {}", id), s);
    }
    Print({{"deleted", id}}, fmt::format("snapshot {} deleted\n", id));
    return 0;
  }
  if (s_list->parsed()) {
    csi::ListSnapshotsRequest req;
    req.set_max_entries(max_entries);
    req.set_starting_token(token);
    req.set_source_volume_id(source);
    req.set_snapshot_id(snap_id);
    csi::ListSnapshotsResponse r;
    if (auto s = ctl->ListSnapshots(Ctx().get(), req, &r); !s.ok()) {
      return Fail("list snapshots", s);
    }
    json snaps = json::array();
    Table t{{"SNAPSHOT ID", "SOURCE", "SIZE", "READY", "CREATED"}, {}};
    for (const auto& e : r.entries()) {
      const auto& sn = e.snapshot();
      snaps.push_back(SnapshotJson(sn));
      t.rows.push_back({sn.snapshot_id(), sn.source_volume_id(), Size(sn.size_bytes()),
                        sn.ready_to_use() ? "yes" : "no",
                        sn.has_creation_time() ? FormatTime(TimestampNs(sn.creation_time()))
                                               : "-"});
    }
    std::string text = t.Render();
    if (!r.next_token().empty()) text += fmt::format("NEXT TOKEN: {}\n", r.next_token());
    Print({{"snapshots", snaps}, {"next_token", r.next_token()}}, text);
    return 0;
  }
  if (c_capacity->parsed()) {
    csi::GetCapacityRequest req;
    for (const auto& [k, v] : ParsePairs("--param", params)) (*req.mutable_parameters())[k] = v;
    auto topo = ParsePairs("--topology", topology);
    for (const auto& [k, v] : topo) (*req.mutable_accessible_topology()->mutable_segments())[k] = v;
    csi::GetCapacityResponse r;
    if (auto s = ctl->GetCapacity(Ctx().get(), req, &r); !s.ok()) return Fail("get capacity", s);
    auto opt = [](bool has, int64_t v) { return has ? json(v) : json(nullptr); };
    Print({{"available_capacity", r.available_capacity()},
           {"maximum_volume_size",
            opt(r.has_maximum_volume_size(), r.maximum_volume_size().value())},
           {"minimum_volume_size",
            opt(r.has_minimum_volume_size(), r.minimum_volume_size().value())}},
          RenderKeyValues(
              {{"Available", r.available_capacity() > 0 ? Size(r.available_capacity()) : "0"},
               {"Maximum volume size",
                r.has_maximum_volume_size() ? Size(r.maximum_volume_size().value()) : "-"},
               {"Minimum volume size",
                r.has_minimum_volume_size() ? Size(r.minimum_volume_size().value()) : "-"}}));
    return 0;
  }
  if (c_caps->parsed()) {
    csi::ControllerGetCapabilitiesResponse r;
    if (auto s = ctl->ControllerGetCapabilities(Ctx().get(), {}, &r); !s.ok()) {
      return Fail("get controller capabilities", s);
    }
    std::vector<std::string> caps;
    for (const auto& c : r.capabilities()) {
      caps.push_back(
          EnumName(csi::ControllerServiceCapability::RPC::Type_descriptor(), c.rpc().type()));
    }
    return PrintCapabilities(caps, *output);
  }

  auto nd = csi::Node::NewStub(channel);
  if (n_info->parsed()) {
    csi::NodeGetInfoResponse r;
    if (auto s = nd->NodeGetInfo(Ctx().get(), {}, &r); !s.ok()) return Fail("get node info", s);
    Print({{"node_id", r.node_id()},
           {"max_volumes_per_node", r.max_volumes_per_node()},
           {"accessible_topology", r.has_accessible_topology()
                                       ? MapJson(r.accessible_topology().segments())
                                       : json(nullptr)}},
          RenderKeyValues({{"Node ID", r.node_id()},
                           {"Max volumes", r.max_volumes_per_node() > 0
                                               ? std::to_string(r.max_volumes_per_node())
                                               : "unlimited"},
                           {"Topology", JoinMap(r.accessible_topology().segments())}}));
    return 0;
  }
  if (n_caps->parsed()) {
    csi::NodeGetCapabilitiesResponse r;
    if (auto s = nd->NodeGetCapabilities(Ctx().get(), {}, &r); !s.ok()) {
      return Fail("get node capabilities", s);
    }
    std::vector<std::string> caps;
    for (const auto& c : r.capabilities()) {
      caps.push_back(EnumName(csi::NodeServiceCapability::RPC::Type_descriptor(), c.rpc().type()));
    }
    return PrintCapabilities(caps, *output);
  }
  if (n_stage->parsed()) {
    csi::NodeStageVolumeRequest req;
    req.set_volume_id(id);
    req.set_staging_target_path(staging_path);
    *req.mutable_volume_capability() = Capability();
    for (const auto& [k, v] : ParsePairs("--param", params)) {
      (*req.mutable_volume_context())[k] = v;
    }
    csi::NodeStageVolumeResponse r;
    if (auto s = nd->NodeStageVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("stage volume {}", id), s);
    }
    Print({{"volume_id", id}, {"staged", staging_path}},
          fmt::format("volume {} staged at {}\n", id, staging_path));
    return 0;
  }
  if (n_unstage->parsed()) {
    csi::NodeUnstageVolumeRequest req;
    req.set_volume_id(id);
    req.set_staging_target_path(staging_path);
    csi::NodeUnstageVolumeResponse r;
    if (auto s = nd->NodeUnstageVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("unstage volume {}", id), s);
    }
    Print({{"volume_id", id}, {"unstaged", staging_path}},
          fmt::format("volume {} unstaged from {}\n", id, staging_path));
    return 0;
  }
  if (n_publish->parsed()) {
    csi::NodePublishVolumeRequest req;
    req.set_volume_id(id);
    req.set_staging_target_path(staging_path);
    req.set_target_path(target_path);
    req.set_readonly(readonly);
    *req.mutable_volume_capability() = Capability();
    for (const auto& [k, v] : ParsePairs("--param", params)) {
      (*req.mutable_volume_context())[k] = v;
    }
    csi::NodePublishVolumeResponse r;
    if (auto s = nd->NodePublishVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("publish volume {}", id), s);
    }
    Print({{"volume_id", id}, {"published", target_path}},
          fmt::format("volume {} published at {}\n", id, target_path));
    return 0;
  }
  if (n_unpublish->parsed()) {
    csi::NodeUnpublishVolumeRequest req;
    req.set_volume_id(id);
    req.set_target_path(target_path);
    csi::NodeUnpublishVolumeResponse r;
    if (auto s = nd->NodeUnpublishVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("unpublish volume {}", id), s);
    }
    Print({{"volume_id", id}, {"unpublished", target_path}},
          fmt::format("volume {} unpublished from {}\n", id, target_path));
    return 0;
  }
  if (n_expand->parsed()) {
    csi::NodeExpandVolumeRequest req;
    req.set_volume_id(id);
    req.set_volume_path(volume_path);
    req.set_staging_target_path(staging_path);
    if (!size.empty()) req.mutable_capacity_range()->set_required_bytes(ParseSize("--size", size));
    if (block) {
      req.mutable_volume_capability()->mutable_block();
      req.mutable_volume_capability()->mutable_access_mode()->set_mode(
          AccessModeFromName(access_mode));
    }
    csi::NodeExpandVolumeResponse r;
    if (auto s = nd->NodeExpandVolume(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("expand volume {} on the node", id), s);
    }
    Print({{"volume_id", id}, {"capacity_bytes", r.capacity_bytes()}},
          RenderKeyValues({{"Volume ID", id}, {"Capacity", Size(r.capacity_bytes())}}));
    return 0;
  }
  if (n_stats->parsed()) {
    csi::NodeGetVolumeStatsRequest req;
    req.set_volume_id(id);
    req.set_volume_path(volume_path);
    req.set_staging_target_path(staging_path);
    csi::NodeGetVolumeStatsResponse r;
    if (auto s = nd->NodeGetVolumeStats(Ctx().get(), req, &r); !s.ok()) {
      return Fail(fmt::format("get stats of volume {}", id), s);
    }
    json usage = json::array();
    Table t{{"UNIT", "TOTAL", "USED", "AVAILABLE"}, {}};
    for (const auto& u : r.usage()) {
      const std::string unit = EnumName(csi::VolumeUsage::Unit_descriptor(), u.unit());
      usage.push_back({{"unit", unit},
                       {"total", u.total()},
                       {"used", u.used()},
                       {"available", u.available()}});
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
    Print({{"volume_id", id},
           {"usage", usage},
           {"volume_condition", ConditionJson(r.has_volume_condition(), r.volume_condition())}},
          text);
    return 0;
  }
  throw UsageError{"csi: a command is required: identity, controller, node (see --help)"};
}

CsiCommands::CsiCommands(CLI::App* app, const std::string* output, const double* timeout_s)
    : impl_(std::make_unique<Impl>()) {
  impl_->app = app;
  impl_->output = output;
  impl_->global_timeout = timeout_s;
  impl_->Define();
}

CsiCommands::~CsiCommands() = default;

bool CsiCommands::parsed() const { return impl_->csi_cmd->parsed(); }

int CsiCommands::Run() {
  Impl& m = *impl_;
  try {
    // `nbdctl --timeout 5 csi ...` (the global flag) applies when csi's own was not given.
    const CLI::Option* global = m.app->get_option_no_throw("--timeout");
    if (m.timeout_opt->count() == 0 && global && global->count() > 0) {
      m.timeout_s = *m.global_timeout;
    }
    for (CLI::App* group : {m.csi_cmd, m.identity, m.controller, m.c_snap, m.node}) {
      if (group->parsed() && group->get_subcommands().empty()) {
        std::vector<std::string> names;
        for (const CLI::App* s : group->get_subcommands([](CLI::App*) { return true; })) {
          names.push_back(s->get_name());
        }
        throw UsageError{fmt::format("csi {}: a subcommand is required: {}", group->get_name(),
                                     fmt::join(names, ", "))};
      }
    }
    if (m.endpoint.empty()) {
      throw UsageError{"csi: --endpoint is required (or set $CSI_ENDPOINT), e.g. "
                       "--endpoint unix:///var/lib/kubelet/plugins/nbd.csi.io/csi.sock"};
    }
    auto ep = ParseEndpoint(m.endpoint);
    if (!ep.ok()) throw UsageError{"--endpoint: " + ep.status().message()};
    m.ep = *ep;
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    m.channel =
        grpc::CreateCustomChannel(m.ep.GrpcTarget(), grpc::InsecureChannelCredentials(), args);
    return m.Dispatch();
  } catch (const UsageError& e) {
    std::cerr << "nbdctl: " << e.message << "\n";
    return kExitUsage;
  }
}

}  // namespace nbdcsi::nbdctl
