// nbdctl: the operator CLI of nbd-datapathd's management API. See README.md for commands,
// exit codes and the JSON keys.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <grpcpp/grpcpp.h>

#include "common/endpoint.h"
#include "common/quantity.h"
#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "tools/nbdctl/attach_cmds.h"
#include "tools/nbdctl/csi_cmds.h"
#include "tools/nbdctl/render.h"

namespace nbdcsi::nbdctl {
namespace {

constexpr int kExitServer = 1;
constexpr int kExitUsage = 2;
constexpr const char* kDefaultApi = "unix:///run/nbd-csi/datapath.sock";

// Thrown for bad arguments that CLI11 cannot check itself (quantities, combinations).
struct UsageError {
  std::string message;
};

struct QosFlags {
  std::optional<std::string> max_iops, max_read_iops, max_write_iops, max_bps, max_read_bps,
      max_write_bps, iops_per_gib, bps_per_gib;
  std::optional<uint32_t> burst_ms;

  void Add(CLI::App* cmd) {
    cmd->add_option("--max-iops", max_iops, "Total IOPS limit (0: none)");
    cmd->add_option("--max-read-iops", max_read_iops, "Read IOPS limit");
    cmd->add_option("--max-write-iops", max_write_iops, "Write IOPS limit");
    cmd->add_option("--max-bps", max_bps, "Total bytes/s limit, a quantity (100Mi)");
    cmd->add_option("--max-read-bps", max_read_bps, "Read bytes/s limit");
    cmd->add_option("--max-write-bps", max_write_bps, "Write bytes/s limit");
    cmd->add_option("--iops-per-gib", iops_per_gib, "IOPS per GiB of size (when no --max-iops)");
    cmd->add_option("--bps-per-gib", bps_per_gib, "Bytes/s per GiB of size (when no --max-bps)");
    cmd->add_option("--burst-ms", burst_ms, "Burst depth in ms of the rate (0: default 100)");
  }
  bool any() const {
    return max_iops || max_read_iops || max_write_iops || max_bps || max_read_bps ||
           max_write_bps || iops_per_gib || bps_per_gib || burst_ms;
  }
  // Calls set(value) for every given flag, after parsing it as a quantity.
  template <typename Msg>
  void Apply(Msg* m) const {
    auto q = [](const char* flag, const std::optional<std::string>& v) -> std::optional<uint64_t> {
      if (!v) return std::nullopt;
      auto r = ParseQuantity(*v);
      if (!r.ok()) throw UsageError{fmt::format("{}: {}", flag, r.status().message())};
      return *r;
    };
    if (auto v = q("--max-iops", max_iops)) m->set_max_iops(*v);
    if (auto v = q("--max-read-iops", max_read_iops)) m->set_max_read_iops(*v);
    if (auto v = q("--max-write-iops", max_write_iops)) m->set_max_write_iops(*v);
    if (auto v = q("--max-bps", max_bps)) m->set_max_bps(*v);
    if (auto v = q("--max-read-bps", max_read_bps)) m->set_max_read_bps(*v);
    if (auto v = q("--max-write-bps", max_write_bps)) m->set_max_write_bps(*v);
    if (auto v = q("--iops-per-gib", iops_per_gib)) m->set_iops_per_gib(*v);
    if (auto v = q("--bps-per-gib", bps_per_gib)) m->set_bps_per_gib(*v);
    if (burst_ms) m->set_burst_ms(*burst_ms);
  }
};

uint64_t ParseSizeFlag(const std::string& flag, const std::string& value) {
  auto r = ParseQuantity(value);
  if (!r.ok()) throw UsageError{fmt::format("{}: {}", flag, r.status().message())};
  if (*r == 0) throw UsageError{fmt::format("{}: size must be greater than 0", flag)};
  return *r;
}

std::string CodeName(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::INVALID_ARGUMENT: return "invalid argument";
    case grpc::StatusCode::NOT_FOUND: return "not found";
    case grpc::StatusCode::ALREADY_EXISTS: return "already exists";
    case grpc::StatusCode::FAILED_PRECONDITION: return "failed precondition";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "out of space";
    case grpc::StatusCode::ABORTED: return "busy, retry";
    case grpc::StatusCode::UNAVAILABLE: return "not ready yet, retry later";
    case grpc::StatusCode::PERMISSION_DENIED: return "permission denied";
    case grpc::StatusCode::OUT_OF_RANGE: return "out of range";
    case grpc::StatusCode::UNIMPLEMENTED: return "not supported by this nbd-datapathd";
    case grpc::StatusCode::INTERNAL: return "internal error";
    case grpc::StatusCode::DATA_LOSS: return "data loss";
    default: return fmt::format("gRPC code {}", static_cast<int>(c));
  }
}

class Cli {
 public:
  int Run(int argc, char** argv);

 private:
  void Connect();
  std::unique_ptr<grpc::ClientContext> Ctx() const;
  // Until `deadline`: a call must not outlive a --wait's overall bound.
  std::unique_ptr<grpc::ClientContext> Ctx(std::chrono::system_clock::time_point deadline) const;
  // --wait: polls until the volume / snapshot is ready, its copy failed, or --timeout (counted
  // from the create call) runs out. Returns the exit code and leaves the last state in *out.
  int WaitVolume(const std::string& name, std::chrono::system_clock::time_point deadline,
                 v1::Volume* out);
  int WaitSnapshot(const std::string& name, std::chrono::system_clock::time_point deadline,
                   v1::Snapshot* out);
  // Prints the error for a failed call on `what` ("create volume \"x\"") and returns the exit code.
  int Fail(const std::string& what, const grpc::Status& s) const;
  void Print(const nlohmann::json& j, const std::string& text) const {
    if (output_ == "json") std::cout << j.dump(2) << "\n";
    else std::cout << text;
  }

  std::string api_;
  std::string output_ = "table";
  double timeout_s_ = 30;
  Endpoint ep_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Datapath::Stub> stub_;
  std::unique_ptr<v1::Attachments::Stub> attach_stub_;
};

constexpr auto kPollInterval = std::chrono::milliseconds(100);

void Cli::Connect() {
  auto ep = ParseEndpoint(api_);
  if (!ep.ok()) throw UsageError{"--api: " + ep.status().message()};
  ep_ = *ep;
  grpc::ChannelArguments args;
  // Fail fast with a clear message instead of gRPC's reconnect back-off when the daemon is down.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  channel_ = grpc::CreateCustomChannel(ep_.GrpcTarget(), grpc::InsecureChannelCredentials(), args);
  stub_ = v1::Datapath::NewStub(channel_);
  attach_stub_ = v1::Attachments::NewStub(channel_);
}

std::unique_ptr<grpc::ClientContext> Cli::Ctx() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(timeout_s_ * 1000)));
  return ctx;
}

std::unique_ptr<grpc::ClientContext> Cli::Ctx(std::chrono::system_clock::time_point deadline) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(deadline);
  return ctx;
}

int Cli::WaitVolume(const std::string& name, std::chrono::system_clock::time_point deadline,
                    v1::Volume* out) {
  while (!out->ready()) {
    if (std::chrono::system_clock::now() + kPollInterval >= deadline) {
      std::cerr << fmt::format("nbdctl: volume \"{}\" is not ready after {}s (--timeout): {} of "
                               "{} bytes copied; the copy continues in the daemon\n",
                               name, timeout_s_, out->copy_done_bytes(), out->copy_total_bytes());
      return kExitServer;
    }
    std::this_thread::sleep_for(kPollInterval);
    v1::GetVolumeRequest req;
    req.set_name(name);
    v1::GetVolumeResponse resp;
    auto s = stub_->GetVolume(Ctx(deadline).get(), req, &resp);
    if (!s.ok()) return Fail(fmt::format("wait for volume \"{}\"", name), s);
    *out = resp.volume();
  }
  return 0;
}

int Cli::WaitSnapshot(const std::string& name, std::chrono::system_clock::time_point deadline,
                      v1::Snapshot* out) {
  while (!out->ready()) {
    if (!out->error().empty()) {
      std::cerr << fmt::format("nbdctl: snapshot \"{}\" failed: {}\n", name, out->error());
      return kExitServer;
    }
    if (std::chrono::system_clock::now() + kPollInterval >= deadline) {
      std::cerr << fmt::format("nbdctl: snapshot \"{}\" is not ready after {}s (--timeout): {} "
                               "of {} bytes copied; the copy continues in the daemon\n",
                               name, timeout_s_, out->copy_done_bytes(), out->copy_total_bytes());
      return kExitServer;
    }
    std::this_thread::sleep_for(kPollInterval);
    v1::GetSnapshotRequest req;
    req.set_name(name);
    v1::GetSnapshotResponse resp;
    auto s = stub_->GetSnapshot(Ctx(deadline).get(), req, &resp);
    if (!s.ok()) return Fail(fmt::format("wait for snapshot \"{}\"", name), s);
    *out = resp.snapshot();
  }
  return 0;
}

int Cli::Fail(const std::string& what, const grpc::Status& s) const {
  // UNAVAILABLE is both gRPC's "no connection" and the daemon's "a copy must finish first";
  // a channel that is connected after the call means the daemon itself answered.
  bool reached = channel_ && channel_->GetState(false) == GRPC_CHANNEL_READY;
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE && !reached) {
    std::string hint = s.error_message();
    if (ep_.kind == Endpoint::Kind::kUnix) {
      struct stat st{};
      if (stat(ep_.path.c_str(), &st) != 0) {
        hint = fmt::format("socket {} does not exist", ep_.path);
      } else if (access(ep_.path.c_str(), R_OK | W_OK) != 0) {
        hint = fmt::format("no permission on socket {} (mode {:o}): run as its owner or root",
                           ep_.path, st.st_mode & 07777);
      }
    }
    std::cerr << fmt::format("nbdctl: cannot reach nbd-datapathd at {}: is it running? ({})\n",
                             ep_.ToString(), hint);
  } else if (s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    std::cerr << fmt::format("nbdctl: {}: nbd-datapathd at {} did not answer within {}s "
                             "(--timeout)\n",
                             what, ep_.ToString(), timeout_s_);
  } else {
    std::cerr << fmt::format("nbdctl: cannot {}: {} ({})\n", what, s.error_message(),
                             CodeName(s.error_code()));
  }
  return kExitServer;
}

int Cli::Run(int argc, char** argv) {
  CLI::App app{"nbdctl: manage the volumes and snapshots of nbd-datapathd"};
  const char* env_api = std::getenv("NBDCTL_API");
  api_ = env_api && *env_api ? env_api : kDefaultApi;
  app.add_option("--api", api_,
                 "Management API endpoint (default: $NBDCTL_API, else " + std::string(kDefaultApi) +
                     ")");
  app.add_option("-o,--output", output_, "Output format")
      ->check(CLI::IsMember({"table", "json"}));
  app.add_option("--timeout", timeout_s_, "Seconds to wait for the daemon")
      ->check(CLI::Range(0.001, 86400.0));

  // Global options also after the command (`nbdctl volume list -o json`), as in kubectl and
  // pxctl. Subcommands inherit this setting, so it must be set before they are added; a
  // subcommand that defines an option of the same name would shadow the global one.
  app.fallthrough();
  app.footer("Global options (--api, -o/--output, --timeout) go before or after the command.");

  std::string name, size, from_snapshot, from_volume, snap_volume;
  QosFlags qos;
  bool read_only = false, clear = false, wait = false;

  auto* volume = app.add_subcommand("volume", "Create, inspect and change volumes");
  auto* create = volume->add_subcommand("create", "Create a volume (idempotent)");
  create->add_option("NAME", name, "Volume name")->required();
  create->add_option("--size", size,
                     "Size, a quantity (1Gi, 500M, 1e9); with a source: optional, default the "
                     "source's size");
  auto* from_snap_opt = create->add_option("--from-snapshot", from_snapshot,
                                           "Restore: the new volume holds this snapshot's data");
  auto* from_vol_opt = create->add_option(
      "--from-volume", from_volume, "Clone: the new volume holds this volume's data as of now");
  from_snap_opt->excludes(from_vol_opt);
  qos.Add(create);
  create->add_flag("--read-only", read_only, "Export the volume read-only");
  create->add_flag("--wait", wait,
                   "Return only once the volume is ready (a background copy may fill it); "
                   "--timeout bounds the wait");
  auto* list = volume->add_subcommand("list", "List volumes")->alias("ls");
  auto* inspect = volume->add_subcommand("inspect", "Show one volume");
  inspect->add_option("NAME", name, "Volume name")->required();
  auto* resize = volume->add_subcommand("resize", "Grow a volume");
  resize->add_option("NAME", name, "Volume name")->required();
  resize->add_option("--size", size, "New size, a quantity")->required();
  auto* del = volume->add_subcommand("delete", "Delete a volume and its data")->alias("rm");
  del->add_option("NAME", name, "Volume name")->required();
  auto* qoscmd = volume->add_subcommand(
      "qos", "Change QoS limits live: given flags change, the others are kept; --clear first "
             "removes every limit");
  qoscmd->add_option("NAME", name, "Volume name")->required();
  qos.Add(qoscmd);
  qoscmd->add_flag("--clear", clear, "Remove all limits (then apply any flags given)");

  auto* snapshot = app.add_subcommand("snapshot", "Point-in-time snapshots of volumes");
  auto* snap_create = snapshot->add_subcommand("create", "Snapshot a volume (idempotent)");
  snap_create->add_option("SNAPSHOT", name, "Snapshot name")->required();
  snap_create->add_option("--volume", snap_volume, "The volume to snapshot")->required();
  snap_create->add_flag("--wait", wait,
                        "Return only once the snapshot is ready (a background copy may fill "
                        "it); --timeout bounds the wait");
  auto* snap_list = snapshot->add_subcommand("list", "List snapshots")->alias("ls");
  snap_list->add_option("--volume", snap_volume, "Only snapshots of this volume");
  auto* snap_inspect = snapshot->add_subcommand("inspect", "Show one snapshot");
  snap_inspect->add_option("SNAPSHOT", name, "Snapshot name")->required();
  auto* snap_del = snapshot->add_subcommand("delete", "Delete a snapshot and its data")
                       ->alias("rm");
  snap_del->add_option("SNAPSHOT", name, "Snapshot name")->required();

  auto* stats = app.add_subcommand("stats", "I/O counters and latency of a volume");
  stats->add_option("NAME", name, "Volume name")->required();
  auto* pool = app.add_subcommand("pool", "The pool");
  auto* pool_info = pool->add_subcommand("info", "Capacity, usage and state of the pool");

  unsigned connections = 0;
  auto* attach = app.add_subcommand("attach", "Attach a volume as a kernel block device /dev/nbdN "
                                              "(idempotent); prints the device");
  attach->add_option("NAME", name, "Volume name")->required();
  attach->add_option("--connections", connections,
                     "Sockets between the kernel and the daemon (default: the daemon's, "
                     "min(nproc, 4))")
      ->check(CLI::Range(1u, 16u));
  auto* detach = app.add_subcommand("detach", "Detach a volume's kernel device (idempotent; "
                                              "refused while it is mounted)");
  detach->add_option("NAME", name, "Volume name")->required();
  auto* resize_attachment = app.add_subcommand(
      "resize-attachment", "Tell an attached device the volume's current size, after `volume "
                           "resize` (online; grow the file system on it afterwards)");
  resize_attachment->add_option("NAME", name, "Volume name")->required();
  auto* attachments = app.add_subcommand("attachments", "List kernel NBD attachments");
  CsiCommands csi_cmds(&app, &output_, &timeout_s_);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "nbdctl: " << e.what() << "\n(run with --help for usage)\n";
    return kExitUsage;
  }
  if (csi_cmds.parsed()) return csi_cmds.Run();

  try {
    if (app.get_subcommands().empty()) {
      throw UsageError{"a command is required: volume, snapshot, stats, pool, attach, detach, "
                       "resize-attachment, attachments, csi (see --help)"};
    }
    if (snapshot->parsed() && snapshot->get_subcommands().empty()) {
      throw UsageError{"snapshot: a subcommand is required: create, list, inspect, delete"};
    }
    if (volume->parsed() && volume->get_subcommands().empty()) {
      throw UsageError{"volume: a subcommand is required: create, list, inspect, resize, "
                       "delete, qos"};
    }
    if (pool->parsed() && pool->get_subcommands().empty()) {
      throw UsageError{"pool: a subcommand is required: info"};
    }
    const bool has_source = from_snap_opt->count() > 0 || from_vol_opt->count() > 0;
    if (create->parsed() && !has_source && size.empty()) {
      throw UsageError{"volume create: --size is required (unless --from-snapshot or "
                       "--from-volume gives a source)"};
    }
    // The whole --wait (create call plus polling) is bounded by one --timeout.
    const auto deadline = std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(timeout_s_ * 1000));
    Connect();
    if (create->parsed()) {
      v1::CreateVolumeRequest req;
      req.set_name(name);
      if (!size.empty()) req.set_size_bytes(ParseSizeFlag("--size", size));
      if (from_snap_opt->count()) req.mutable_source()->set_snapshot(from_snapshot);
      if (from_vol_opt->count()) req.mutable_source()->set_volume(from_volume);
      qos.Apply(req.mutable_qos());
      req.set_read_only(read_only);
      v1::CreateVolumeResponse resp;
      auto s = stub_->CreateVolume(Ctx(deadline).get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("create volume \"{}\"", name), s);
      v1::Volume v = resp.volume();
      if (wait) {
        if (int rc = WaitVolume(name, deadline, &v); rc != 0) return rc;
      }
      Print(VolumeJson(v), VolumeDetails(v));
    } else if (snap_create->parsed()) {
      v1::CreateSnapshotRequest req;
      req.set_name(name);
      req.set_source_volume(snap_volume);
      v1::CreateSnapshotResponse resp;
      auto s = stub_->CreateSnapshot(Ctx(deadline).get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("create snapshot \"{}\"", name), s);
      v1::Snapshot snap = resp.snapshot();
      if (wait) {
        if (int rc = WaitSnapshot(name, deadline, &snap); rc != 0) return rc;
      }
      Print(SnapshotJson(snap), SnapshotDetails(snap));
    } else if (snap_list->parsed()) {
      v1::ListSnapshotsRequest req;
      req.set_source_volume(snap_volume);
      v1::ListSnapshotsResponse resp;
      auto s = stub_->ListSnapshots(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail("list snapshots", s);
      nlohmann::json snaps = nlohmann::json::array();
      for (const auto& sn : resp.snapshots()) snaps.push_back(SnapshotJson(sn));
      Print({{"snapshots", snaps}}, SnapshotListTable(resp));
    } else if (snap_inspect->parsed()) {
      v1::GetSnapshotRequest req;
      req.set_name(name);
      v1::GetSnapshotResponse resp;
      auto s = stub_->GetSnapshot(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("inspect snapshot \"{}\"", name), s);
      Print(SnapshotJson(resp.snapshot()), SnapshotDetails(resp.snapshot()));
    } else if (snap_del->parsed()) {
      v1::DeleteSnapshotRequest req;
      req.set_name(name);
      v1::DeleteSnapshotResponse resp;
      auto s = stub_->DeleteSnapshot(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("delete snapshot \"{}\"", name), s);
      Print({{"deleted", name}}, fmt::format("snapshot \"{}\" deleted\n", name));
    } else if (attach->parsed()) {
      v1::AttachVolumeRequest req;
      req.set_volume(name);
      req.set_connections(connections);
      v1::AttachVolumeResponse resp;
      auto s = attach_stub_->AttachVolume(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("attach volume \"{}\"", name), s);
      Print(AttachmentJson(resp.attachment()), AttachmentDetails(resp.attachment()));
    } else if (detach->parsed()) {
      v1::DetachVolumeRequest req;
      req.set_volume(name);
      v1::DetachVolumeResponse resp;
      auto s = attach_stub_->DetachVolume(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("detach volume \"{}\"", name), s);
      Print({{"detached", name}}, fmt::format("volume \"{}\" detached\n", name));
    } else if (resize_attachment->parsed()) {
      v1::ResizeAttachmentRequest req;
      req.set_volume(name);
      v1::ResizeAttachmentResponse resp;
      auto s = attach_stub_->ResizeAttachment(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("resize the attachment of volume \"{}\"", name), s);
      Print(AttachmentJson(resp.attachment()), AttachmentDetails(resp.attachment()));
    } else if (attachments->parsed()) {
      v1::ListAttachmentsResponse resp;
      auto s = attach_stub_->ListAttachments(Ctx().get(), {}, &resp);
      if (!s.ok()) return Fail("list attachments", s);
      nlohmann::json all = nlohmann::json::array();
      for (const auto& a : resp.attachments()) all.push_back(AttachmentJson(a));
      Print({{"attachments", all}}, AttachmentListTable(resp));
    } else if (list->parsed()) {
      v1::ListVolumesResponse resp;
      auto s = stub_->ListVolumes(Ctx().get(), {}, &resp);
      if (!s.ok()) return Fail("list volumes", s);
      nlohmann::json vols = nlohmann::json::array();
      for (const auto& v : resp.volumes()) vols.push_back(VolumeJson(v));
      Print({{"volumes", vols}}, VolumeListTable(resp));
    } else if (inspect->parsed()) {
      v1::GetVolumeRequest req;
      req.set_name(name);
      v1::GetVolumeResponse resp;
      auto s = stub_->GetVolume(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("inspect volume \"{}\"", name), s);
      Print(VolumeJson(resp.volume()), VolumeDetails(resp.volume()));
    } else if (resize->parsed()) {
      v1::ResizeVolumeRequest req;
      req.set_name(name);
      req.set_size_bytes(ParseSizeFlag("--size", size));
      v1::ResizeVolumeResponse resp;
      auto s = stub_->ResizeVolume(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("resize volume \"{}\"", name), s);
      Print(VolumeJson(resp.volume()), VolumeDetails(resp.volume()));
    } else if (del->parsed()) {
      v1::DeleteVolumeRequest req;
      req.set_name(name);
      v1::DeleteVolumeResponse resp;
      auto s = stub_->DeleteVolume(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("delete volume \"{}\"", name), s);
      Print({{"deleted", name}}, fmt::format("volume \"{}\" deleted\n", name));
    } else if (qoscmd->parsed()) {
      if (!clear && !qos.any()) {
        throw UsageError{"volume qos: nothing to change: give limit flags and/or --clear"};
      }
      v1::SetQosRequest req;
      req.set_name(name);
      // --clear replaces the whole set (with just the given flags); otherwise the server merges
      // the given flags into the current limits atomically.
      if (clear) qos.Apply(req.mutable_replace());
      else qos.Apply(req.mutable_patch());
      v1::SetQosResponse resp;
      auto s = stub_->SetQos(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("set QoS of volume \"{}\"", name), s);
      Print(VolumeJson(resp.volume()), VolumeDetails(resp.volume()));
    } else if (stats->parsed()) {
      v1::GetVolumeStatsRequest req;
      req.set_name(name);
      v1::GetVolumeStatsResponse resp;
      auto s = stub_->GetVolumeStats(Ctx().get(), req, &resp);
      if (!s.ok()) return Fail(fmt::format("get stats of volume \"{}\"", name), s);
      Print(StatsJson(resp), StatsText(resp));
    } else if (pool_info->parsed()) {
      v1::GetPoolInfoResponse resp;
      auto s = stub_->GetPoolInfo(Ctx().get(), {}, &resp);
      if (!s.ok()) return Fail("get pool info", s);
      Print(PoolJson(resp), PoolText(resp));
    }
  } catch (const UsageError& e) {
    std::cerr << "nbdctl: " << e.message << "\n";
    return kExitUsage;
  }
  return 0;
}

}  // namespace
}  // namespace nbdcsi::nbdctl

int main(int argc, char** argv) {
  // Not a server: gRPC's own chatter would only repeat what our error messages say.
  setenv("GRPC_VERBOSITY", "NONE", 0);
  try {
    return nbdcsi::nbdctl::Cli().Run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "nbdctl: internal error: " << e.what() << "\n";
    return 1;
  }
}
