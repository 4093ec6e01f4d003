#include "tools/nbdctl/datapath_cmds.h"

#include <array>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <thread>

#include <unistd.h>

#include <fmt/format.h>

#include "common/qos_fields.h"
#include "common/quantity.h"
#include "common/volume_schedule.h"
#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "tools/nbdctl/attach_render.h"
#include "tools/nbdctl/connection.h"
#include "tools/nbdctl/progress.h"
#include "tools/nbdctl/render.h"

namespace nbdcsi::nbdctl {
namespace {

using nlohmann::json;
using Deadline = std::chrono::system_clock::time_point;

constexpr auto kPollInterval = std::chrono::milliseconds(100);

// The QoS flags of `volume create` and `volume qos`, one per row of common/qos_fields.h. Counts and
// rates are kept as text and parsed as quantities ("100Mi", "10k") when applied; milliseconds
// are a 32-bit number that CLI11 checks.
struct QosFlags {
  std::array<std::optional<std::string>, kQosFieldCount> text;
  std::array<std::optional<uint32_t>, kQosFieldCount> millis;

  void Add(CLI::App& cmd) {
    for (size_t i = 0; i < kQosFieldCount; ++i) {
      const QosField& f = kQosFields[i];
      if (f.kind == QosKind::kMillis) {
        cmd.add_option(std::string(f.flag), millis[i], std::string(f.help));
      } else {
        cmd.add_option(std::string(f.flag), text[i], std::string(f.help));
      }
    }
  }
  bool any() const {
    for (size_t i = 0; i < kQosFieldCount; ++i) {
      if (text[i] || millis[i]) return true;
    }
    return false;
  }
  // Row i's value, if its flag was given.
  std::optional<uint64_t> Value(size_t i) const {
    if (millis[i]) return *millis[i];
    if (!text[i]) return std::nullopt;
    auto r = ParseQuantity(*text[i]);
    if (!r.ok()) throw UsageError{fmt::format("{}: {}", kQosFields[i].flag, r.status().message())};
    return *r;
  }
  // Calls set_<field>(value) for every given flag, in table order.
  template <typename Msg>
  void Apply(Msg* m) const {
    size_t i = 0;
#define NBDCSI_QOS_APPLY(f, key, flag, kind, help) \
  if (auto v = Value(i++)) m->set_##f(static_cast<QosValue<QosKind::kind>>(*v));
    NBDCSI_QOS_FIELDS(NBDCSI_QOS_APPLY)
#undef NBDCSI_QOS_APPLY
  }
};

// One poll of a copy's progress, from a Volume or a Snapshot (the same copy_data_* fields).
template <typename Msg>
CopySample SampleOf(const Msg& m) {
  CopySample s;
  s.at = ProgressClock::now();
  s.data_done = m.copy_data_done_bytes();
  if (m.has_copy_data_total_bytes()) s.data_total = m.copy_data_total_bytes();
  return s;
}

uint64_t ParseSizeFlag(const std::string& flag, const std::string& value) {
  auto r = ParseQuantity(value);
  if (!r.ok()) throw UsageError{fmt::format("{}: {}", flag, r.status().message())};
  if (*r == 0) throw UsageError{fmt::format("{}: size must be greater than 0", flag)};
  return *r;
}

}  // namespace

struct DatapathCommands::Impl {
  explicit Impl(const GlobalOptions& g) : global(g) {}

  const GlobalOptions& global;
  // Flags; each command binds the ones it takes.
  std::string name, size, from_snapshot, from_volume, snap_volume;
  CLI::Option* from_snapshot_opt = nullptr;
  CLI::Option* from_volume_opt = nullptr;
  QosFlags qos;
  bool read_only = false, clear = false, wait = false, attach_target = false;
  unsigned connections = 0;
  uint64_t epoch = 0;
  // volume schedule
  std::optional<std::string> sched_snapshot, sched_backup, sched_target;
  std::optional<uint32_t> sched_snapshot_retain, sched_backup_retain;

  std::unique_ptr<Connection> conn;
  std::unique_ptr<v1::Datapath::Stub> stub;
  std::unique_ptr<v1::Attachments::Stub> attach_stub;

  void Connect() {
    conn = std::make_unique<Connection>(Peer::kDatapath, "--api", global.api, global.timeout_s);
    stub = v1::Datapath::NewStub(conn->channel());
    attach_stub = v1::Attachments::NewStub(conn->channel());
  }
  int Fail(const std::string& what, const grpc::Status& s) const { return conn->Fail(what, s); }
  using Stub = v1::Datapath::Stub;
  using AttachStub = v1::Attachments::Stub;
  // One call on the Datapath (or Attachments) service: kExitOk, or the one error path's code.
  // `what` names the action; with `named` the volume or snapshot name is added to it
  // (delete volume "x").
  template <typename Req, typename Resp>
  int Call(grpc::Status (Stub::*method)(grpc::ClientContext*, const Req&, Resp*), const Req& req,
           Resp* resp, const char* what, bool named = true) {
    return conn->Call(*stub, method, req, resp, Action(what, named));
  }
  template <typename Req, typename Resp>
  int AttachCall(grpc::Status (AttachStub::*method)(grpc::ClientContext*, const Req&, Resp*),
                 const Req& req, Resp* resp, const char* what, bool named = true) {
    return conn->Call(*attach_stub, method, req, resp, Action(what, named));
  }
  std::string Action(const char* what, bool named) const {
    return named ? fmt::format("{} \"{}\"", what, name) : std::string(what);
  }
  // A request whose only field is the name.
  template <typename Req>
  Req Named() const {
    Req r;
    r.set_name(name);
    return r;
  }
  int Show(const json& j, const std::string& text) const {
    Print(global.output, j, text);
    return kExitOk;
  }
  // The whole --wait (create call plus polling) is bounded by one --timeout.
  Deadline WaitDeadline() const {
    return std::chrono::system_clock::now() +
           std::chrono::milliseconds(static_cast<int64_t>(global.timeout_s * 1000));
  }
  // --wait: polls until the volume / snapshot is ready, its copy failed, or the deadline passes.
  // Returns the exit code and leaves the last state in *out.
  int WaitVolume(Deadline deadline, v1::Volume* out);
  int WaitSnapshot(Deadline deadline, v1::Snapshot* out);
  // Both: polls with `refresh` (one Get into *out) until *out is ready, its copy failed (what
  // has an error() says why), or the deadline passes; `label` names the progress lines.
  template <typename T, typename Refresh>
  int WaitReady(Deadline deadline, const char* kind, const std::string& label, T* out,
                Refresh refresh);
  // Past the deadline: says so and returns kExitServer; else sleeps one poll interval.
  int PollOrGiveUp(Deadline deadline, const char* kind, uint64_t done, uint64_t total) const;
  // Progress lines on stderr while a --wait polls (progress.h says where and when).
  ProgressSink Progress(const std::string& what) const {
    return ProgressSink(ProgressSink::ModeFor(global.output, STDERR_FILENO), std::cerr, what,
                        ProgressClock::now());
  }

  int VolumeCreate();
  int VolumeList();
  int VolumeInspect();
  int VolumeResize();
  int VolumeDelete();
  int VolumeQos();
  int VolumeFence();
  int VolumeSchedule();
  int SnapshotCreate();
  int SnapshotList();
  int SnapshotInspect();
  int SnapshotDelete();
  int Stats();
  int PoolInfo();
  int Attach();
  int Detach();
  int ResizeAttachment();
  int Attachments();

  void RegisterVolume(CommandTree& tree);
  void RegisterSnapshot(CommandTree& tree);
  void RegisterOthers(CommandTree& tree);
  Command Cmd(std::vector<std::string> path, std::string help, Flags flags, int (Impl::*fn)()) {
    return Bound(std::move(path), std::move(help), std::move(flags), this, fn);
  }
  // The positional NAME (or SNAPSHOT) every per-object command takes.
  Flags Named(const char* what, const char* help, Flags more = nullptr) {
    return Positional(what, &name, help, std::move(more));
  }
};

int DatapathCommands::Impl::PollOrGiveUp(Deadline deadline, const char* kind, uint64_t done,
                                         uint64_t total) const {
  if (std::chrono::system_clock::now() + kPollInterval >= deadline) {
    std::cerr << fmt::format(
        "nbdctl: {} \"{}\" is not ready after {}s (--timeout): {} of {} "
        "bytes copied; the copy continues in the daemon\n",
        kind, name, global.timeout_s, done, total);
    return kExitServer;
  }
  std::this_thread::sleep_for(kPollInterval);
  return kExitOk;
}

template <typename T, typename Refresh>
int DatapathCommands::Impl::WaitReady(Deadline deadline, const char* kind,
                                      const std::string& label, T* out, Refresh refresh) {
  if (out->ready()) return kExitOk;
  ProgressSink progress = Progress(label);
  while (!out->ready()) {
    if constexpr (requires { out->error(); }) {
      if (!out->error().empty()) {
        progress.Finish(false, ProgressClock::now(), 0);
        std::cerr << fmt::format("nbdctl: {} \"{}\" failed: {}\n", kind, name, out->error());
        return kExitServer;
      }
    }
    progress.Update(SampleOf(*out));
    if (int rc = PollOrGiveUp(deadline, kind, out->copy_done_bytes(), out->copy_total_bytes());
        rc != kExitOk) {
      progress.Finish(false, ProgressClock::now(), 0);
      return rc;
    }
    if (grpc::Status s = refresh(out); !s.ok()) {
      progress.Finish(false, ProgressClock::now(), 0);
      return Fail(fmt::format("wait for {} \"{}\"", kind, name), s);
    }
  }
  progress.Finish(true, ProgressClock::now(), out->allocated_bytes());
  return kExitOk;
}

int DatapathCommands::Impl::WaitVolume(Deadline deadline, v1::Volume* out) {
  const bool restore = out->source().rfind("snapshot/", 0) == 0;
  return WaitReady(deadline, "volume", fmt::format("{} {}", restore ? "restore" : "clone", name),
                   out, [&](v1::Volume* v) {
                     v1::GetVolumeRequest req;
                     req.set_name(name);
                     v1::GetVolumeResponse resp;
                     auto s = stub->GetVolume(conn->Ctx(deadline).get(), req, &resp);
                     if (s.ok()) *v = resp.volume();
                     return s;
                   });
}

int DatapathCommands::Impl::WaitSnapshot(Deadline deadline, v1::Snapshot* out) {
  return WaitReady(deadline, "snapshot", "snapshot " + name, out, [&](v1::Snapshot* v) {
    v1::GetSnapshotRequest req;
    req.set_name(name);
    v1::GetSnapshotResponse resp;
    auto s = stub->GetSnapshot(conn->Ctx(deadline).get(), req, &resp);
    if (s.ok()) *v = resp.snapshot();
    return s;
  });
}

int DatapathCommands::Impl::VolumeCreate() {
  const bool has_source = from_snapshot_opt->count() > 0 || from_volume_opt->count() > 0;
  if (!has_source && size.empty()) {
    throw UsageError{
        "volume create: --size is required (unless --from-snapshot or "
        "--from-volume gives a source)"};
  }
  const Deadline deadline = WaitDeadline();
  Connect();
  v1::CreateVolumeRequest req;
  req.set_name(name);
  if (!size.empty()) req.set_size_bytes(ParseSizeFlag("--size", size));
  if (from_snapshot_opt->count()) req.mutable_source()->set_snapshot(from_snapshot);
  if (from_volume_opt->count()) req.mutable_source()->set_volume(from_volume);
  qos.Apply(req.mutable_qos());
  req.set_read_only(read_only);
  v1::CreateVolumeResponse resp;
  auto s = stub->CreateVolume(conn->Ctx(deadline).get(), req, &resp);
  if (!s.ok()) return Fail(fmt::format("create volume \"{}\"", name), s);
  v1::Volume v = resp.volume();
  if (wait) {
    if (int rc = WaitVolume(deadline, &v); rc != kExitOk) return rc;
  }
  return Show(VolumeJson(v), VolumeDetails(v));
}

int DatapathCommands::Impl::VolumeList() {
  Connect();
  v1::ListVolumesResponse resp;
  if (int rc = Call(&Stub::ListVolumes, {}, &resp, "list volumes", false)) return rc;
  json vols = json::array();
  for (const auto& v : resp.volumes()) vols.push_back(VolumeJson(v));
  return Show({{"volumes", vols}}, VolumeListTable(resp));
}

int DatapathCommands::Impl::VolumeInspect() {
  Connect();
  v1::GetVolumeResponse resp;
  if (int rc = Call(&Stub::GetVolume, Named<v1::GetVolumeRequest>(), &resp, "inspect volume")) {
    return rc;
  }
  return Show(VolumeJson(resp.volume()), VolumeDetails(resp.volume()));
}

int DatapathCommands::Impl::VolumeResize() {
  Connect();
  v1::ResizeVolumeRequest req;
  req.set_name(name);
  req.set_size_bytes(ParseSizeFlag("--size", size));
  v1::ResizeVolumeResponse resp;
  if (int rc = Call(&Stub::ResizeVolume, req, &resp, "resize volume")) return rc;
  return Show(VolumeJson(resp.volume()), VolumeDetails(resp.volume()));
}

int DatapathCommands::Impl::VolumeFence() {
  Connect();
  v1::FenceVolumeRequest req;
  req.set_name(name);
  req.set_epoch(epoch);
  v1::FenceVolumeResponse resp;
  if (int rc = Call(&Stub::FenceVolume, req, &resp, "fence volume")) return rc;
  return Show({{"name", name}, {"fence_epoch", resp.epoch()}},
              fmt::format("volume \"{}\" is fenced at epoch {}\n", name, resp.epoch()));
}

// No options: show the schedule and its last runs. Otherwise the given options are the whole
// new schedule (what is not given is removed); --clear removes it.
int DatapathCommands::Impl::VolumeSchedule() {
  const bool any = sched_snapshot || sched_backup || sched_target || sched_snapshot_retain ||
                   sched_backup_retain;
  if (clear && any) throw UsageError{"volume schedule: --clear takes no other option"};
  if (sched_snapshot_retain && !sched_snapshot)
    throw UsageError{"volume schedule: --snapshot-retain needs --snapshot"};
  if ((sched_backup_retain || sched_target) && !sched_backup)
    throw UsageError{"volume schedule: --backup-retain and --target need --backup"};
  if (sched_backup && !sched_target)
    throw UsageError{"volume schedule: --backup needs --target s3://BUCKET[/PREFIX]"};
  Connect();
  if (!clear && !any) {
    v1::GetVolumeResponse resp;
    if (int rc = Call(&Stub::GetVolume, Named<v1::GetVolumeRequest>(), &resp, "inspect volume")) {
      return rc;
    }
    return Show({{"name", name}, {"schedule", ScheduleJson(resp.volume())}},
                ScheduleText(resp.volume()));
  }
  v1::SetScheduleRequest req;
  req.set_name(name);
  if (!clear) {
    auto* s = req.mutable_schedule();
    if (sched_snapshot) s->set_snapshot_cron(*sched_snapshot);
    if (sched_snapshot_retain) s->set_snapshot_retain(*sched_snapshot_retain);
    if (sched_backup) s->set_backup_cron(*sched_backup);
    if (sched_backup_retain) s->set_backup_retain(*sched_backup_retain);
    if (sched_target) s->set_backup_target(*sched_target);
  }
  v1::SetScheduleResponse resp;
  if (int rc = Call(&Stub::SetSchedule, req, &resp, "set the schedule of volume")) return rc;
  return Show({{"name", name}, {"schedule", ScheduleJson(resp.volume())}},
              ScheduleText(resp.volume()));
}

int DatapathCommands::Impl::VolumeDelete() {
  Connect();
  v1::DeleteVolumeResponse resp;
  if (int rc =
          Call(&Stub::DeleteVolume, Named<v1::DeleteVolumeRequest>(), &resp, "delete volume")) {
    return rc;
  }
  return Show({{"deleted", name}}, fmt::format("volume \"{}\" deleted\n", name));
}

int DatapathCommands::Impl::VolumeQos() {
  Connect();
  if (!clear && !qos.any()) {
    throw UsageError{"volume qos: nothing to change: give limit flags and/or --clear"};
  }
  v1::SetQosRequest req;
  req.set_name(name);
  // --clear replaces the whole set (with just the given flags); otherwise the server merges the
  // given flags into the current limits atomically.
  if (clear)
    qos.Apply(req.mutable_replace());
  else
    qos.Apply(req.mutable_patch());
  v1::SetQosResponse resp;
  if (int rc = Call(&Stub::SetQos, req, &resp, "set QoS of volume")) return rc;
  return Show(VolumeJson(resp.volume()), VolumeDetails(resp.volume()));
}

int DatapathCommands::Impl::SnapshotCreate() {
  const Deadline deadline = WaitDeadline();
  Connect();
  v1::CreateSnapshotRequest req;
  req.set_name(name);
  req.set_source_volume(snap_volume);
  v1::CreateSnapshotResponse resp;
  auto s = stub->CreateSnapshot(conn->Ctx(deadline).get(), req, &resp);
  if (!s.ok()) return Fail(fmt::format("create snapshot \"{}\"", name), s);
  v1::Snapshot snap = resp.snapshot();
  if (wait) {
    if (int rc = WaitSnapshot(deadline, &snap); rc != kExitOk) return rc;
  }
  return Show(SnapshotJson(snap), SnapshotDetails(snap));
}

int DatapathCommands::Impl::SnapshotList() {
  Connect();
  v1::ListSnapshotsRequest req;
  req.set_source_volume(snap_volume);
  v1::ListSnapshotsResponse resp;
  if (int rc = Call(&Stub::ListSnapshots, req, &resp, "list snapshots", false)) return rc;
  json snaps = json::array();
  for (const auto& sn : resp.snapshots()) snaps.push_back(SnapshotJson(sn));
  return Show({{"snapshots", snaps}}, SnapshotListTable(resp));
}

int DatapathCommands::Impl::SnapshotInspect() {
  Connect();
  v1::GetSnapshotResponse resp;
  if (int rc =
          Call(&Stub::GetSnapshot, Named<v1::GetSnapshotRequest>(), &resp, "inspect snapshot")) {
    return rc;
  }
  return Show(SnapshotJson(resp.snapshot()), SnapshotDetails(resp.snapshot()));
}

int DatapathCommands::Impl::SnapshotDelete() {
  Connect();
  v1::DeleteSnapshotResponse resp;
  if (int rc = Call(&Stub::DeleteSnapshot, Named<v1::DeleteSnapshotRequest>(), &resp,
                    "delete snapshot")) {
    return rc;
  }
  return Show({{"deleted", name}}, fmt::format("snapshot \"{}\" deleted\n", name));
}

int DatapathCommands::Impl::Stats() {
  Connect();
  v1::GetVolumeStatsResponse resp;
  if (int rc = Call(&Stub::GetVolumeStats, Named<v1::GetVolumeStatsRequest>(), &resp,
                    "get stats of volume")) {
    return rc;
  }
  return Show(StatsJson(resp), StatsText(resp));
}

int DatapathCommands::Impl::PoolInfo() {
  Connect();
  v1::GetPoolInfoResponse resp;
  if (int rc = Call(&Stub::GetPoolInfo, {}, &resp, "get pool info", false)) return rc;
  return Show(PoolJson(resp), PoolText(resp));
}

int DatapathCommands::Impl::Attach() {
  Connect();
  v1::AttachVolumeRequest req;
  req.set_volume(name);
  req.set_connections(connections);
  req.set_target(attach_target);
  v1::AttachVolumeResponse resp;
  if (int rc = AttachCall(&AttachStub::AttachVolume, req, &resp, "attach volume")) return rc;
  return Show(AttachmentJson(resp.attachment()), AttachmentDetails(resp.attachment()));
}

int DatapathCommands::Impl::Detach() {
  Connect();
  v1::DetachVolumeRequest req;
  req.set_volume(name);
  v1::DetachVolumeResponse resp;
  if (int rc = AttachCall(&AttachStub::DetachVolume, req, &resp, "detach volume")) return rc;
  return Show({{"detached", name}}, fmt::format("volume \"{}\" detached\n", name));
}

int DatapathCommands::Impl::ResizeAttachment() {
  Connect();
  v1::ResizeAttachmentRequest req;
  req.set_volume(name);
  v1::ResizeAttachmentResponse resp;
  if (int rc = AttachCall(&AttachStub::ResizeAttachment, req, &resp,
                          "resize the attachment of volume")) {
    return rc;
  }
  return Show(AttachmentJson(resp.attachment()), AttachmentDetails(resp.attachment()));
}

int DatapathCommands::Impl::Attachments() {
  Connect();
  v1::ListAttachmentsResponse resp;
  if (int rc = AttachCall(&AttachStub::ListAttachments, {}, &resp, "list attachments", false)) {
    return rc;
  }
  json all = json::array();
  for (const auto& a : resp.attachments()) all.push_back(AttachmentJson(a));
  return Show({{"attachments", all}}, AttachmentListTable(resp));
}

void DatapathCommands::Impl::RegisterVolume(CommandTree& tree) {
  tree.Add(Group{{"volume"}, "Create, inspect and change volumes", "volume", nullptr});
  tree.Add(Cmd({"volume", "create"}, "Create a volume (idempotent)",
               Named("NAME", "Volume name",
                     [this](CLI::App& c) {
                       c.add_option("--size", size,
                                    "Size, a quantity (1Gi, 500M, 1e9); with a source: optional, "
                                    "default the source's size");
                       from_snapshot_opt =
                           c.add_option("--from-snapshot", from_snapshot,
                                        "Restore: the new volume holds this snapshot's data");
                       from_volume_opt =
                           c.add_option("--from-volume", from_volume,
                                        "Clone: the new volume holds this volume's data as of now");
                       from_snapshot_opt->excludes(from_volume_opt);
                       qos.Add(c);
                       c.add_flag("--read-only", read_only, "Export the volume read-only");
                       c.add_flag(
                           "--wait", wait,
                           "Return only once the volume is ready (a background copy may fill "
                           "it); --timeout bounds the wait");
                     }),
               &Impl::VolumeCreate));
  tree.Add(Cmd(
      {"volume", "list"}, "List volumes", [](CLI::App& c) { c.alias("ls"); }, &Impl::VolumeList));
  tree.Add(Cmd({"volume", "inspect"}, "Show one volume", Named("NAME", "Volume name"),
               &Impl::VolumeInspect));
  tree.Add(Cmd({"volume", "resize"}, "Grow a volume",
               Named("NAME", "Volume name",
                     [this](CLI::App& c) {
                       c.add_option("--size", size, "New size, a quantity")->required();
                     }),
               &Impl::VolumeResize));
  tree.Add(Cmd({"volume", "delete"}, "Delete a volume and its data",
               Named("NAME", "Volume name", [](CLI::App& c) { c.alias("rm"); }),
               &Impl::VolumeDelete));
  tree.Add(Cmd({"volume", "qos"},
               "Change QoS limits live: given flags change, the others are kept; --clear first "
               "removes every limit",
               Named("NAME", "Volume name",
                     [this](CLI::App& c) {
                       qos.Add(c);
                       c.add_flag("--clear", clear,
                                  "Remove all limits (then apply any flags given)");
                     }),
               &Impl::VolumeQos));
  tree.Add(Cmd({"volume", "schedule"},
               "Show a volume's recurring snapshot/backup schedule and its last runs, or set it "
               "(the options given are the whole new schedule; cron in UTC), or --clear it",
               Named("NAME", "Volume name",
                     [this](CLI::App& c) {
                       c.add_option("--snapshot", sched_snapshot,
                                    "Snapshot schedule, 5-field cron in UTC (\"0 */6 * * *\", "
                                    "@daily)");
                       c.add_option("--snapshot-retain", sched_snapshot_retain,
                                    "Schedule-made snapshots kept, 1..1000 (default 7)")
                           ->check(CLI::Range(1u, kMaxScheduleRetain));
                       c.add_option("--backup", sched_backup,
                                    "Backup schedule, 5-field cron in UTC");
                       c.add_option("--backup-retain", sched_backup_retain,
                                    "Schedule-made backups kept in the target, 1..1000 "
                                    "(default 7)")
                           ->check(CLI::Range(1u, kMaxScheduleRetain));
                       c.add_option("--target", sched_target,
                                    "Backup target s3://BUCKET[/PREFIX]; the daemon's "
                                    "--backup-secret-dir holds its credentials");
                       c.add_flag("--clear", clear, "Remove the schedule");
                     }),
               &Impl::VolumeSchedule));
  tree.Add(Cmd({"volume", "fence"},
               "Fence a volume at an epoch: NBD clients of older epochs (and those naming none) "
               "are stopped and refused from now on; the same epoch again is a no-op",
               Named("NAME", "Volume name",
                     [this](CLI::App& c) {
                       // The range (1..2^63-1) is the pool's rule; the daemon says it.
                       c.add_option("--epoch", epoch, "The epoch, 1..2^63-1")->required();
                     }),
               &Impl::VolumeFence));
}

void DatapathCommands::Impl::RegisterSnapshot(CommandTree& tree) {
  tree.Add(Group{{"snapshot"}, "Point-in-time snapshots of volumes", "snapshot", nullptr});
  tree.Add(Cmd({"snapshot", "create"}, "Snapshot a volume (idempotent)",
               Named("SNAPSHOT", "Snapshot name",
                     [this](CLI::App& c) {
                       c.add_option("--volume", snap_volume, "The volume to snapshot")->required();
                       c.add_flag("--wait", wait,
                                  "Return only once the snapshot is ready (a background copy may "
                                  "fill it); --timeout bounds the wait");
                     }),
               &Impl::SnapshotCreate));
  tree.Add(Cmd(
      {"snapshot", "list"}, "List snapshots",
      [this](CLI::App& c) {
        c.alias("ls");
        c.add_option("--volume", snap_volume, "Only snapshots of this volume");
      },
      &Impl::SnapshotList));
  tree.Add(Cmd({"snapshot", "inspect"}, "Show one snapshot", Named("SNAPSHOT", "Snapshot name"),
               &Impl::SnapshotInspect));
  tree.Add(Cmd({"snapshot", "delete"}, "Delete a snapshot and its data",
               Named("SNAPSHOT", "Snapshot name", [](CLI::App& c) { c.alias("rm"); }),
               &Impl::SnapshotDelete));
}

void DatapathCommands::Impl::RegisterOthers(CommandTree& tree) {
  tree.Add(Cmd({"stats"}, "I/O counters and latency of a volume", Named("NAME", "Volume name"),
               &Impl::Stats));
  tree.Add(Group{{"pool"}, "The pool", "pool", nullptr});
  tree.Add(
      Cmd({"pool", "info"}, "Capacity, usage and state of the pool", nullptr, &Impl::PoolInfo));
  tree.Add(Cmd({"attach"},
               "Attach a volume as a kernel block device /dev/nbdN (idempotent); prints the "
               "device",
               Named("NAME", "Volume name",
                     [this](CLI::App& c) {
                       c.add_option("--connections", connections,
                                    "Sockets between the kernel and the daemon (default: the "
                                    "daemon's, min(nproc, 4))")
                           ->check(CLI::Range(1u, 16u));
                       c.add_flag("--target", attach_target,
                                  "Attach the replicated volume's target opened here (nbdctl "
                                  "target open NAME), not the pool volume");
                     }),
               &Impl::Attach));
  tree.Add(Cmd({"detach"},
               "Detach a volume's kernel device (idempotent; refused while it is mounted; a "
               "target's device: the target stays open)",
               Named("NAME", "Volume name"), &Impl::Detach));
  tree.Add(Cmd({"resize-attachment"},
               "Tell an attached device the volume's current size, after `volume resize` "
               "(online; grow the file system on it afterwards)",
               Named("NAME", "Volume name"), &Impl::ResizeAttachment));
  tree.Add(Cmd({"attachments"}, "List kernel NBD attachments", nullptr, &Impl::Attachments));
}

DatapathCommands::DatapathCommands(CommandTree& tree, const GlobalOptions& global)
    : impl_(std::make_unique<Impl>(global)) {
  impl_->RegisterVolume(tree);
  impl_->RegisterSnapshot(tree);
  impl_->RegisterOthers(tree);
}

DatapathCommands::~DatapathCommands() = default;

}  // namespace nbdcsi::nbdctl
