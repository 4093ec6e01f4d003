#include "tools/nbdctl/csi_cmds.h"

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <map>
#include <vector>

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <CLI/CLI.hpp>

#include "common/quantity.h"
#include "csi/csi.grpc.pb.h"
#include "tools/nbdctl/csi_render.h"

namespace nbdcsi::nbdctl {
namespace {

namespace csi = ::csi::v1;
using nlohmann::json;

constexpr double kDefaultTimeoutS = 60;

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

template <typename ProtoMap>
void PutPairs(const char* flag, const std::vector<std::string>& pairs, ProtoMap* m) {
  for (const auto& [k, v] : ParsePairs(flag, pairs)) (*m)[k] = v;
}

// --secret-file FILE: KEY=VALUE lines (blank lines and '#' comments skipped), what a Kubernetes
// Secret holds, into a request's secrets. Read from a file so that they stay out of `ps`.
template <typename ProtoMap>
void PutSecrets(const std::string& file, ProtoMap* m) {
  if (file.empty()) return;
  std::ifstream in(file);
  if (!in) throw UsageError{fmt::format("--secret-file {}: cannot read it", file)};
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.empty() || line[0] == '#') continue;
    size_t eq = line.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw UsageError{fmt::format("--secret-file {}: line {} is not KEY=VALUE", file, n)};
    }
    (*m)[line.substr(0, eq)] = line.substr(eq + 1);
  }
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

}  // namespace

struct CsiCommands::Impl {
  explicit Impl(const GlobalOptions& g) : global(g) {}

  const GlobalOptions& global;
  std::string endpoint;
  double timeout_s = kDefaultTimeoutS;
  CLI::Option* timeout_opt = nullptr;  // csi's own --timeout
  // Flags; each command binds the ones it takes.
  std::string id, name, size, fs_type, access_mode = "single-node-writer", from_snapshot,
                                       from_volume, source, snap_id, token, staging_path,
                                       target_path, volume_path, secret_file;
  std::vector<std::string> params, topology, mount_flags;
  bool block = false, readonly = false;
  int32_t max_entries = 0;

  std::unique_ptr<Connection> conn;

  // Resolves the timeout and the endpoint, and opens the channel.
  void Connect();
  std::unique_ptr<csi::Identity::Stub> IdentityStub() {
    Connect();
    return csi::Identity::NewStub(conn->channel());
  }
  std::unique_ptr<csi::Controller::Stub> ControllerStub() {
    Connect();
    return csi::Controller::NewStub(conn->channel());
  }
  std::unique_ptr<csi::Node::Stub> NodeStub() {
    Connect();
    return csi::Node::NewStub(conn->channel());
  }
  int Fail(const std::string& what, const grpc::Status& s) const { return conn->Fail(what, s); }
  int Show(const Output& o) const {
    Print(global.output, o.json, o.text);
    return kExitOk;
  }
  // A Node call on volume `id` whose answer is where it happened: on success it shows
  // {"volume_id": ID, DONE: PATH} and "volume ID DONE PREP PATH".
  template <typename Req, typename Resp>
  int NodeVolumeCall(csi::Node::Stub& nd,
                     grpc::Status (csi::Node::Stub::*method)(grpc::ClientContext*, const Req&,
                                                             Resp*),
                     const Req& req, const char* verb, const char* done, const char* prep,
                     const std::string& path) {
    Resp r;
    if (int rc = conn->Call(nd, method, req, &r, fmt::format("{} volume {}", verb, id))) return rc;
    return Show({{{"volume_id", id}, {done, path}},
                 fmt::format("volume {} {} {} {}\n", id, done, prep, path)});
  }
  csi::VolumeCapability Capability() const;
  void AddCapabilityFlags(CLI::App& c);

  int IdentityInfo();
  int IdentityProbe();
  int IdentityCapabilities();
  int CreateVolume();
  int DeleteVolume();
  int ListVolumes();
  int GetVolume();
  int ControllerExpand();
  int Modify();
  int SnapshotCreate();
  int SnapshotDelete();
  int SnapshotList();
  int Capacity();
  int ControllerCapabilities();
  int NodeInfo();
  int NodeCapabilities();
  int Stage();
  int Unstage();
  int Publish();
  int Unpublish();
  int NodeExpand();
  int NodeStats();

  void RegisterIdentity(CommandTree& tree);
  void RegisterController(CommandTree& tree);
  void RegisterControllerSnapshot(CommandTree& tree);
  void RegisterNode(CommandTree& tree);
  Command Cmd(std::vector<std::string> path, std::string help, Flags flags, int (Impl::*fn)()) {
    path.insert(path.begin(), "csi");
    return Bound(std::move(path), std::move(help), std::move(flags), this, fn);
  }
  // The positional VOLUME_ID (or SNAPSHOT_ID) most commands take, then `more`.
  Flags WithId(const char* what, const char* help, Flags more = nullptr) {
    return Positional(what, &id, help, std::move(more));
  }
};

void CsiCommands::Impl::Connect() {
  // `nbdctl --timeout 5 csi ...` (the global flag) applies when csi's own was not given.
  if (timeout_opt->count() == 0 && global.timeout_opt && global.timeout_opt->count() > 0) {
    timeout_s = global.timeout_s;
  }
  if (endpoint.empty()) {
    throw UsageError{
        "csi: --endpoint is required (or set $CSI_ENDPOINT), e.g. "
        "--endpoint unix:///var/lib/kubelet/plugins/nbd.csi.io/csi.sock"};
  }
  conn = std::make_unique<Connection>(Peer::kCsi, "--endpoint", endpoint, timeout_s);
}

void CsiCommands::Impl::AddCapabilityFlags(CLI::App& c) {
  c.add_flag("--block", block, "Raw block access (default: a mounted file system)");
  c.add_option("--fs-type", fs_type, "File system for mount access (default: the plugin's)");
  c.add_option("--mount-flag", mount_flags, "Mount option (repeatable)");
  c.add_option("--access-mode", access_mode, "Access mode")
      ->check(CLI::IsMember(AccessModeNames()))
      ->capture_default_str();
}

csi::VolumeCapability CsiCommands::Impl::Capability() const {
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

// ---- Identity ----

int CsiCommands::Impl::IdentityInfo() {
  auto stub = IdentityStub();
  csi::GetPluginInfoResponse r;
  if (int rc = conn->Call("get plugin info",
                          [&](auto* ctx) { return stub->GetPluginInfo(ctx, {}, &r); })) {
    return rc;
  }
  return Show(PluginInfoOutput(r));
}

int CsiCommands::Impl::IdentityProbe() {
  auto stub = IdentityStub();
  csi::ProbeResponse r;
  if (auto s = stub->Probe(conn->Ctx().get(), {}, &r); !s.ok()) return Fail("probe", s);
  // An unset `ready` means ready (CSI spec).
  const bool ready = !r.has_ready() || r.ready().value();
  Show(ProbeOutput(ready));
  return ready ? kExitOk : kExitServer;
}

int CsiCommands::Impl::IdentityCapabilities() {
  auto stub = IdentityStub();
  csi::GetPluginCapabilitiesResponse r;
  if (int rc = conn->Call("get plugin capabilities",
                          [&](auto* ctx) { return stub->GetPluginCapabilities(ctx, {}, &r); })) {
    return rc;
  }
  return Show(CapabilitiesOutput(CapabilityNames(r)));
}

// ---- Controller ----

int CsiCommands::Impl::CreateVolume() {
  auto ctl = ControllerStub();
  csi::CreateVolumeRequest req;
  req.set_name(name);
  if (!size.empty()) req.mutable_capacity_range()->set_required_bytes(ParseSize("--size", size));
  PutPairs("--param", params, req.mutable_parameters());
  PutSecrets(secret_file, req.mutable_secrets());
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
  if (int rc = conn->Call(fmt::format("create volume \"{}\"", name),
                          [&](auto* ctx) { return ctl->CreateVolume(ctx, req, &r); })) {
    return rc;
  }
  return Show(CreatedVolumeOutput(r.volume()));
}

int CsiCommands::Impl::DeleteVolume() {
  auto ctl = ControllerStub();
  csi::DeleteVolumeRequest req;
  req.set_volume_id(id);
  csi::DeleteVolumeResponse r;
  if (int rc = conn->Call(fmt::format("delete volume {}", id),
                          [&](auto* ctx) { return ctl->DeleteVolume(ctx, req, &r); })) {
    return rc;
  }
  return Show({{{"deleted", id}}, fmt::format("volume {} deleted\n", id)});
}

int CsiCommands::Impl::ListVolumes() {
  auto ctl = ControllerStub();
  csi::ListVolumesRequest req;
  req.set_max_entries(max_entries);
  req.set_starting_token(token);
  csi::ListVolumesResponse r;
  if (int rc =
          conn->Call("list volumes", [&](auto* ctx) { return ctl->ListVolumes(ctx, req, &r); })) {
    return rc;
  }
  return Show(VolumeListOutput(r));
}

int CsiCommands::Impl::GetVolume() {
  auto ctl = ControllerStub();
  csi::ControllerGetVolumeRequest req;
  req.set_volume_id(id);
  csi::ControllerGetVolumeResponse r;
  if (int rc = conn->Call(fmt::format("get volume {}", id),
                          [&](auto* ctx) { return ctl->ControllerGetVolume(ctx, req, &r); })) {
    return rc;
  }
  return Show(GetVolumeOutput(r));
}

int CsiCommands::Impl::ControllerExpand() {
  auto ctl = ControllerStub();
  csi::ControllerExpandVolumeRequest req;
  req.set_volume_id(id);
  req.mutable_capacity_range()->set_required_bytes(ParseSize("--size", size));
  csi::ControllerExpandVolumeResponse r;
  if (int rc = conn->Call(fmt::format("expand volume {}", id),
                          [&](auto* ctx) { return ctl->ControllerExpandVolume(ctx, req, &r); })) {
    return rc;
  }
  return Show(ControllerExpandOutput(id, r));
}

int CsiCommands::Impl::Modify() {
  auto ctl = ControllerStub();
  csi::ControllerModifyVolumeRequest req;
  req.set_volume_id(id);
  PutPairs("--param", params, req.mutable_mutable_parameters());
  csi::ControllerModifyVolumeResponse r;
  if (int rc = conn->Call(fmt::format("modify volume {}", id),
                          [&](auto* ctx) { return ctl->ControllerModifyVolume(ctx, req, &r); })) {
    return rc;
  }
  return Show({{{"modified", id}}, fmt::format("volume {} modified\n", id)});
}

int CsiCommands::Impl::SnapshotCreate() {
  auto ctl = ControllerStub();
  csi::CreateSnapshotRequest req;
  req.set_name(name);
  req.set_source_volume_id(source);
  PutPairs("--param", params, req.mutable_parameters());
  PutSecrets(secret_file, req.mutable_secrets());
  csi::CreateSnapshotResponse r;
  if (int rc = conn->Call(fmt::format("create snapshot \"{}\"", name),
                          [&](auto* ctx) { return ctl->CreateSnapshot(ctx, req, &r); })) {
    return rc;
  }
  return Show(SnapshotOutput(r.snapshot()));
}

int CsiCommands::Impl::SnapshotDelete() {
  auto ctl = ControllerStub();
  csi::DeleteSnapshotRequest req;
  req.set_snapshot_id(id);
  PutSecrets(secret_file, req.mutable_secrets());
  csi::DeleteSnapshotResponse r;
  if (int rc = conn->Call(fmt::format("delete snapshot {}", id),
                          [&](auto* ctx) { return ctl->DeleteSnapshot(ctx, req, &r); })) {
    return rc;
  }
  return Show({{{"deleted", id}}, fmt::format("snapshot {} deleted\n", id)});
}

int CsiCommands::Impl::SnapshotList() {
  auto ctl = ControllerStub();
  csi::ListSnapshotsRequest req;
  req.set_max_entries(max_entries);
  req.set_starting_token(token);
  req.set_source_volume_id(source);
  req.set_snapshot_id(snap_id);
  PutSecrets(secret_file, req.mutable_secrets());
  csi::ListSnapshotsResponse r;
  if (int rc = conn->Call("list snapshots",
                          [&](auto* ctx) { return ctl->ListSnapshots(ctx, req, &r); })) {
    return rc;
  }
  return Show(SnapshotListOutput(r));
}

int CsiCommands::Impl::Capacity() {
  auto ctl = ControllerStub();
  csi::GetCapacityRequest req;
  PutPairs("--param", params, req.mutable_parameters());
  // No --topology leaves accessible_topology unset: "any node", not "a node with no labels".
  for (const auto& [k, v] : ParsePairs("--topology", topology)) {
    (*req.mutable_accessible_topology()->mutable_segments())[k] = v;
  }
  csi::GetCapacityResponse r;
  if (int rc =
          conn->Call("get capacity", [&](auto* ctx) { return ctl->GetCapacity(ctx, req, &r); })) {
    return rc;
  }
  return Show(CapacityOutput(r));
}

int CsiCommands::Impl::ControllerCapabilities() {
  auto ctl = ControllerStub();
  csi::ControllerGetCapabilitiesResponse r;
  if (int rc = conn->Call("get controller capabilities",
                          [&](auto* ctx) { return ctl->ControllerGetCapabilities(ctx, {}, &r); })) {
    return rc;
  }
  return Show(CapabilitiesOutput(CapabilityNames(r)));
}

// ---- Node ----

int CsiCommands::Impl::NodeInfo() {
  auto nd = NodeStub();
  csi::NodeGetInfoResponse r;
  if (int rc =
          conn->Call("get node info", [&](auto* ctx) { return nd->NodeGetInfo(ctx, {}, &r); })) {
    return rc;
  }
  return Show(NodeInfoOutput(r));
}

int CsiCommands::Impl::NodeCapabilities() {
  auto nd = NodeStub();
  csi::NodeGetCapabilitiesResponse r;
  if (int rc = conn->Call("get node capabilities",
                          [&](auto* ctx) { return nd->NodeGetCapabilities(ctx, {}, &r); })) {
    return rc;
  }
  return Show(CapabilitiesOutput(CapabilityNames(r)));
}

int CsiCommands::Impl::Stage() {
  auto nd = NodeStub();
  csi::NodeStageVolumeRequest req;
  req.set_volume_id(id);
  req.set_staging_target_path(staging_path);
  *req.mutable_volume_capability() = Capability();
  PutPairs("--param", params, req.mutable_volume_context());
  return NodeVolumeCall(*nd, &csi::Node::Stub::NodeStageVolume, req, "stage", "staged", "at",
                        staging_path);
}

int CsiCommands::Impl::Unstage() {
  auto nd = NodeStub();
  csi::NodeUnstageVolumeRequest req;
  req.set_volume_id(id);
  req.set_staging_target_path(staging_path);
  return NodeVolumeCall(*nd, &csi::Node::Stub::NodeUnstageVolume, req, "unstage", "unstaged",
                        "from", staging_path);
}

int CsiCommands::Impl::Publish() {
  auto nd = NodeStub();
  csi::NodePublishVolumeRequest req;
  req.set_volume_id(id);
  req.set_staging_target_path(staging_path);
  req.set_target_path(target_path);
  req.set_readonly(readonly);
  *req.mutable_volume_capability() = Capability();
  PutPairs("--param", params, req.mutable_volume_context());
  return NodeVolumeCall(*nd, &csi::Node::Stub::NodePublishVolume, req, "publish", "published", "at",
                        target_path);
}

int CsiCommands::Impl::Unpublish() {
  auto nd = NodeStub();
  csi::NodeUnpublishVolumeRequest req;
  req.set_volume_id(id);
  req.set_target_path(target_path);
  return NodeVolumeCall(*nd, &csi::Node::Stub::NodeUnpublishVolume, req, "unpublish", "unpublished",
                        "from", target_path);
}

int CsiCommands::Impl::NodeExpand() {
  auto nd = NodeStub();
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
  if (int rc = conn->Call(fmt::format("expand volume {} on the node", id),
                          [&](auto* ctx) { return nd->NodeExpandVolume(ctx, req, &r); })) {
    return rc;
  }
  return Show(NodeExpandOutput(id, r));
}

int CsiCommands::Impl::NodeStats() {
  auto nd = NodeStub();
  csi::NodeGetVolumeStatsRequest req;
  req.set_volume_id(id);
  req.set_volume_path(volume_path);
  req.set_staging_target_path(staging_path);
  csi::NodeGetVolumeStatsResponse r;
  if (int rc = conn->Call(fmt::format("get stats of volume {}", id),
                          [&](auto* ctx) { return nd->NodeGetVolumeStats(ctx, req, &r); })) {
    return rc;
  }
  return Show(NodeStatsOutput(id, r));
}

// ---- Registration, in --help order ----

void CsiCommands::Impl::RegisterIdentity(CommandTree& tree) {
  tree.Add(Group{{"csi", "identity"}, "Identity service", "csi identity", nullptr});
  tree.Add(
      Cmd({"identity", "info"}, "GetPluginInfo: name and version", nullptr, &Impl::IdentityInfo));
  tree.Add(Cmd({"identity", "probe"}, "Probe: exit 0 when ready, 1 when not", nullptr,
               &Impl::IdentityProbe));
  tree.Add(Cmd({"identity", "capabilities"}, "GetPluginCapabilities", nullptr,
               &Impl::IdentityCapabilities));
}

void CsiCommands::Impl::RegisterController(CommandTree& tree) {
  tree.Add(Group{{"csi", "controller"}, "Controller service", "csi controller", nullptr});
  tree.Add(Cmd(
      {"controller", "create-volume"}, "CreateVolume (idempotent by NAME)",
      [this](CLI::App& c) {
        c.add_option("NAME", name, "CSI volume name (what the provisioner passes: pvc-<uid>)")
            ->required();
        c.add_option("--size", size, "Required capacity, a quantity (1Gi)");
        c.add_option("--param", params, "StorageClass parameter KEY=VALUE (repeatable)");
        c.add_option("--topology", topology,
                     "Required topology segment KEY=VALUE (repeatable), e.g. "
                     "topology.nbd.csi.io/node=node-1");
        c.add_option("--secret-file", secret_file,
                     "The call's secrets: a file of KEY=VALUE lines (a backup's credentials)");
        auto* fs = c.add_option("--from-snapshot", from_snapshot, "Restore this snapshot id");
        auto* fv = c.add_option("--from-volume", from_volume, "Clone this volume id");
        fs->excludes(fv);
        AddCapabilityFlags(c);
      },
      &Impl::CreateVolume));
  tree.Add(Cmd({"controller", "delete-volume"}, "DeleteVolume (idempotent)",
               WithId("VOLUME_ID", "Volume id"), &Impl::DeleteVolume));
  tree.Add(Cmd(
      {"controller", "list-volumes"}, "ListVolumes",
      [this](CLI::App& c) {
        c.add_option("--max", max_entries, "At most this many entries (0: all)")
            ->check(CLI::NonNegativeNumber);
        c.add_option("--token", token, "Continue from a previous NEXT TOKEN");
      },
      &Impl::ListVolumes));
  tree.Add(Cmd({"controller", "get-volume"}, "ControllerGetVolume",
               WithId("VOLUME_ID", "Volume id"), &Impl::GetVolume));
  tree.Add(
      Cmd({"controller", "expand"}, "ControllerExpandVolume",
          WithId("VOLUME_ID", "Volume id",
                 [this](CLI::App& c) {
                   c.add_option("--size", size, "New required capacity, a quantity")->required();
                 }),
          &Impl::ControllerExpand));
  tree.Add(Cmd(
      {"controller", "modify"}, "ControllerModifyVolume (QoS parameters)",
      WithId(
          "VOLUME_ID", "Volume id",
          [this](CLI::App& c) {
            c.add_option("--param", params, "Mutable parameter KEY=VALUE (repeatable)")->required();
          }),
      &Impl::Modify));
  RegisterControllerSnapshot(tree);
  tree.Add(Cmd(
      {"controller", "capacity"}, "GetCapacity",
      [this](CLI::App& c) {
        c.add_option("--topology", topology, "Topology segment KEY=VALUE (repeatable)");
        c.add_option("--param", params, "StorageClass parameter KEY=VALUE (repeatable)");
      },
      &Impl::Capacity));
  tree.Add(Cmd({"controller", "capabilities"}, "ControllerGetCapabilities", nullptr,
               &Impl::ControllerCapabilities));
}

void CsiCommands::Impl::RegisterControllerSnapshot(CommandTree& tree) {
  // Named "csi snapshot" in its usage error, as before the commands became a table.
  tree.Add(Group{{"csi", "controller", "snapshot"}, "Snapshots", "csi snapshot", nullptr});
  tree.Add(Cmd(
      {"controller", "snapshot", "create"}, "CreateSnapshot (idempotent by NAME)",
      [this](CLI::App& c) {
        c.add_option("NAME", name, "CSI snapshot name")->required();
        c.add_option("--source", source, "Source volume id")->required();
        c.add_option("--param", params, "VolumeSnapshotClass parameter KEY=VALUE");
        c.add_option("--secret-file", secret_file,
                     "The call's secrets: a file of KEY=VALUE lines (backupTarget's credentials)");
      },
      &Impl::SnapshotCreate));
  tree.Add(Cmd({"controller", "snapshot", "delete"}, "DeleteSnapshot (idempotent)",
               WithId("SNAPSHOT_ID", "Snapshot id",
                      [this](CLI::App& c) {
                        c.add_option("--secret-file", secret_file,
                                     "The call's secrets: a file of KEY=VALUE lines");
                      }),
               &Impl::SnapshotDelete));
  tree.Add(Cmd(
      {"controller", "snapshot", "list"}, "ListSnapshots",
      [this](CLI::App& c) {
        c.add_option("--source", source, "Only snapshots of this volume id");
        c.add_option("--id", snap_id, "Only this snapshot id");
        c.add_option("--secret-file", secret_file,
                     "The call's secrets: a file of KEY=VALUE lines (to list a backup snapshot)");
        c.add_option("--max", max_entries, "At most this many entries (0: all)")
            ->check(CLI::NonNegativeNumber);
        c.add_option("--token", token, "Continue from a previous NEXT TOKEN");
      },
      &Impl::SnapshotList));
}

void CsiCommands::Impl::RegisterNode(CommandTree& tree) {
  tree.Add(Group{{"csi", "node"}, "Node service", "csi node", nullptr});
  tree.Add(Cmd({"node", "info"}, "NodeGetInfo", nullptr, &Impl::NodeInfo));
  tree.Add(Cmd({"node", "capabilities"}, "NodeGetCapabilities", nullptr, &Impl::NodeCapabilities));
  auto staging = [this](CLI::App& c) {
    c.add_option("--staging-path", staging_path, "Staging target path")->required();
  };
  tree.Add(Cmd({"node", "stage"}, "NodeStageVolume",
               WithId("VOLUME_ID", "Volume id",
                      [this, staging](CLI::App& c) {
                        staging(c);
                        c.add_option("--param", params, "Volume context KEY=VALUE (repeatable)");
                        AddCapabilityFlags(c);
                      }),
               &Impl::Stage));
  tree.Add(Cmd({"node", "unstage"}, "NodeUnstageVolume", WithId("VOLUME_ID", "Volume id", staging),
               &Impl::Unstage));
  tree.Add(Cmd({"node", "publish"}, "NodePublishVolume",
               WithId("VOLUME_ID", "Volume id",
                      [this, staging](CLI::App& c) {
                        staging(c);
                        c.add_option("--target-path", target_path, "Target path")->required();
                        c.add_flag("--readonly", readonly, "Publish read-only");
                        c.add_option("--param", params, "Volume context KEY=VALUE (repeatable)");
                        AddCapabilityFlags(c);
                      }),
               &Impl::Publish));
  tree.Add(Cmd({"node", "unpublish"}, "NodeUnpublishVolume",
               WithId("VOLUME_ID", "Volume id",
                      [this](CLI::App& c) {
                        c.add_option("--target-path", target_path, "Target path")->required();
                      }),
               &Impl::Unpublish));
  tree.Add(Cmd({"node", "expand"}, "NodeExpandVolume",
               WithId("VOLUME_ID", "Volume id",
                      [this](CLI::App& c) {
                        c.add_option("--volume-path", volume_path,
                                     "Volume path (the publish target)")
                            ->required();
                        c.add_option("--staging-path", staging_path, "Staging target path");
                        c.add_option("--size", size, "Required capacity, a quantity");
                        c.add_flag("--block", block, "The volume is a raw block volume");
                      }),
               &Impl::NodeExpand));
  tree.Add(Cmd({"node", "stats"}, "NodeGetVolumeStats",
               WithId("VOLUME_ID", "Volume id",
                      [this](CLI::App& c) {
                        c.add_option("--volume-path", volume_path, "Volume path")->required();
                        c.add_option("--staging-path", staging_path, "Staging target path");
                      }),
               &Impl::NodeStats));
}

CsiCommands::CsiCommands(CommandTree& tree, const GlobalOptions& global)
    : impl_(std::make_unique<Impl>(global)) {
  Impl& m = *impl_;
  // The label reads "csi csi" as it always has (scripts may match it).
  tree.Add(Group{{"csi"},
                 "Call a CSI plugin (nbd-csi-controller, nbd-csi-node) directly, like kubelet "
                 "and the sidecars do",
                 "csi csi",
                 [&m](CLI::App& c) {
                   const char* env = std::getenv("CSI_ENDPOINT");
                   if (env && *env) m.endpoint = env;
                   c.add_option("--endpoint", m.endpoint,
                                "CSI endpoint: unix:///path or tcp://host:port (default: "
                                "$CSI_ENDPOINT)");
                   m.timeout_opt = c.add_option("--timeout", m.timeout_s,
                                                "Seconds to wait for each call (default 60: "
                                                "staging may run mkfs)")
                                       ->check(CLI::Range(0.001, 86400.0));
                 }});
  m.RegisterIdentity(tree);
  m.RegisterController(tree);
  m.RegisterNode(tree);
}

CsiCommands::~CsiCommands() = default;

}  // namespace nbdcsi::nbdctl
