// CreateVolume in named steps: check the request, the candidate nodes (topology), the content
// source (which pins the node, unless the topology excludes it or it has no room: then the data
// is copied to another node, RunCopy), the idempotency search (every live node at once), the
// size, then placement and the create call on the first node that takes it.
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/util/message_differencer.h>
#include <spdlog/spdlog.h>

#include "controller/controller_service.h"
#include "controller/csi_request.h"
#include "controller/csi_response.h"
#include "controller/csi_status.h"
#include "csi/logging.h"
#include "datapath/api/schedule_proto.h"

namespace nbdcsi::controller {
namespace {

namespace v1 = ::csi::v1;

// The volume_content_source of a restore or clone.
struct ContentSource {
  std::string node;  // "" for a blank volume
  std::string name;  // the snapshot or volume in that node's pool
  dpv1::VolumeContentSource dp;

  bool present() const { return !node.empty(); }
  // As dpv1::Volume.source spells it: "", "snapshot/NAME" or "volume/NAME".
  std::string Text() const {
    if (dp.has_snapshot()) return "snapshot/" + dp.snapshot();
    if (dp.has_volume()) return "volume/" + dp.volume();
    return "";
  }
};

class CreateVolumeCall {
 public:
  CreateVolumeCall(const v1::CreateVolumeRequest& req, Nodes& nodes, PlacementLedger& ledger,
                   ReplicatedVolumes& replicated, Backups& backups, const ControllerOptions& opts)
      : req_(req),
        nodes_(nodes),
        ledger_(ledger),
        replicated_(replicated),
        backups_(backups),
        opts_(opts) {
    if (req.has_capacity_range()) range_ = &req.capacity_range();
  }

  Status Run(v1::CreateVolumeResponse* resp) {
    if (Status s = CheckRequest(); !s.ok()) return s;
    if (req_.volume_content_source().has_snapshot() &&
        csi::IsBackupSnapshotId(req_.volume_content_source().snapshot().snapshot_id())) {
      return RunRestore(resp);
    }
    if (replicas_ > 1) return RunReplicated(resp);
    if (Status s = FindCandidates(); !s.ok()) return s;
    if (Status s = ResolveSource(); !s.ok()) return s;
    if (source_.present()) {
      auto copy = NeedsCopy();
      if (!copy.ok()) return copy.status();
      if (*copy) return RunCopy(resp);
      candidates_.order = {source_.node};
    }
    if (Status s = CheckRange(); !s.ok()) return s;
    auto found = FindExisting(resp->mutable_volume());
    if (!found.ok()) return found.status();
    if (*found) return Status::Ok();
    auto size = SizeToProvision();
    if (!size.ok()) return size.status();
    return Place(*size, resp);
  }

 private:
  // Name, capabilities and parameters: what no node needs to be asked about.
  Status CheckRequest() {
    if (req_.name().empty()) return Err(EINVAL, "name is required");
    if (Status s = CheckCapabilities(req_.volume_capabilities()); !s.ok()) return s;
    auto sc = ParseStorageClass(req_.parameters());
    if (!sc.ok()) return sc.status();
    auto vac = ParseAttributes(req_.mutable_parameters(), "mutable_parameters");
    if (!vac.ok()) return vac.status();
    qos_ = QosLimitsOf(sc->qos, vac->qos);
    replicas_ = sc->replicas;
    // Recurring snapshots/backups: validated by the parameters' parser (replicated volumes
    // refused there), run by the node's datapath, which stores the schedule with the volume. A
    // VolumeAttributesClass's schedule replaces the StorageClass's.
    schedule_ = vac->schedule ? *vac->schedule : sc->schedule;
    if (!schedule_.empty() && replicas_ > 1) {
      return Err(EINVAL, "mutable_parameters: schedules are not supported for replicated volumes "
                 "yet (replicas={})", replicas_);
    }
    auto pool_name = csi::PoolNameForCsiName(req_.name());
    if (!pool_name.ok()) return Err(EINVAL, "name: {}", pool_name.status().message());
    pool_name_ = *pool_name;
    return Status::Ok();
  }

  // The nodes the request's topology allows, in the order to try them, from one registry
  // snapshot.
  Status FindCandidates() {
    live_ = nodes_.List();
    auto c = CandidatesFor(
        req_.has_accessibility_requirements() ? &req_.accessibility_requirements() : nullptr, live_,
        ledger_);
    if (!c.ok()) return c.status();
    candidates_ = std::move(*c);
    return Status::Ok();
  }

  // replicas >= 2: the catalogue in etcd decides idempotency and placement (no fan-out).
  Status RunReplicated(v1::CreateVolumeResponse* resp) {
    if (!replicated_.enabled()) {
      return replicated_.NoCatalogue(fmt::format("parameter replicas={}", replicas_));
    }
    if (Status s = CheckRange(); !s.ok()) return s;
    if (Status s = FindCandidates(); !s.ok()) return s;
    candidates_ = EveryNodeAfter(std::move(candidates_), live_, ledger_);
    // A restore or clone: its node holds the first replica (ReplicatedVolumes::Create).
    if (Status s = ResolveSource(); !s.ok()) return s;
    ReplicatedVolumes::CreateArgs a;
    a.csi_name = req_.name();
    a.pool_name = pool_name_;
    a.size_bytes = [this] { return SizeToProvision(); };
    a.range = range_;
    a.qos = qos_;
    a.replicas = replicas_;
    a.candidates = &candidates_;
    if (source_.present()) {
      const auto& cs = req_.volume_content_source();
      a.source_id = cs.has_snapshot() ? cs.snapshot().snapshot_id() : cs.volume().volume_id();
      a.source_node = source_.node;
      a.source = source_.dp;
    }
    Status s = replicated_.Create(a, resp->mutable_volume());
    if (s.code() == ENOSPC && opts_.on_placement_refused) {
      opts_.on_placement_refused(ControllerOptions::Refusal::kNoRoom);
    }
    return s;
  }

  // A backup snapshot (b1 id, controller/backups.h): restored into a new volume on any allowed
  // node with room. The restore is a job in that node's datapath; until it ends the answer is
  // ABORTED (the provisioner retries), and a retry finds the volume by name as usual.
  Status RunRestore(v1::CreateVolumeResponse* resp) {
    const std::string& id = req_.volume_content_source().snapshot().snapshot_id();
    auto ref = csi::ParseBackupSnapshotId(id);
    if (!ref.ok()) return Err(ENOENT, "source snapshot: {}", ref.status().message());
    if (replicas_ > 1) {
      return Err(EINVAL,
                 "restoring a backup (source snapshot {}) into a replicated volume (replicas={}) "
                 "is not supported yet: restore into a single-node volume",
                 id, replicas_);
    }
    auto target = TargetFromSecrets(ref->url, req_.secrets(), "provisioner");
    if (!target.ok()) return target.status();
    if (Status s = FindCandidates(); !s.ok()) return s;
    if (Status s = CheckRange(); !s.ok()) return s;
    auto found =
        FanOut(live_, [&](const NodeInfo& n) { return nodes_.GetVolume(n.node_id, pool_name_); });
    auto holder = FirstHolder(found);
    if (!holder.ok()) return holder.status();
    if (*holder) return FinishRestore(live_[**holder].node_id, *found[**holder], resp);
    auto backup = backups_.Inspect(*target, ref->name);
    if (!backup.ok()) {
      return Err(backup.status().code(), "source snapshot {}: {}", id, backup.status().message());
    }
    auto size = VolumeSizeFor(range_, backup->volume_size(), backup->volume_size());
    if (!size.ok()) return CallError(size.status().code(), size.status().message());
    // Only the start may move on to another node (its ENOSPC): once a node took the volume,
    // whatever follows is this call's answer.
    std::string node;
    dpv1::BackupJob job;
    Status placed =
        OnFirstWithRoom(*size, [&](const std::string& n, const NodeInfo& info) -> Status {
          auto started = backups_.StartRestore(n, *target, ref->name, pool_name_);
          if (!started.ok()) return started.status();
          ledger_.Add(info, *size);
          node = n;
          job = std::move(*started);
          return Status::Ok();
        });
    if (!placed.ok()) return placed;
    if (job.state() == "failed") {
      return Backups::JobError(job, fmt::format("restore of {} on node {}", id, node));
    }
    if (job.state() == "running") return Backups::RestoreRunning(job, node);
    auto vol = nodes_.GetVolume(node, pool_name_);
    if (!vol.ok()) return vol.status();
    return FinishRestore(node, *vol, resp);
  }

  // A restored volume (found by name): ABORTED while its restore runs, the restore's error if it
  // failed, else grown to the requested size, given the class's QoS, and returned.
  Status FinishRestore(const std::string& node, dpv1::Volume dv, v1::CreateVolumeResponse* resp) {
    auto job = backups_.RestoreJobOf(node, pool_name_);
    if (!job.ok()) return job.status();
    if (*job && (*job)->state() == "running") return Backups::RestoreRunning(**job, node);
    if (*job && (*job)->state() == "failed") {
      return Backups::JobError(**job, fmt::format("restore on node {}", node));
    }
    if (Status s = Complete(node, dv, resp); !s.ok()) return s;
    spdlog::info("[{}] volume {} ({} bytes) restored from {} on node {}", csi::CurrentRequestId(),
                 resp->volume().volume_id(), resp->volume().capacity_bytes(),
                 req_.volume_content_source().snapshot().snapshot_id(), node);
    return Status::Ok();
  }

  // A restored or copied volume, its data in place: in the allowed topology, grown to the
  // requested size, given the class's QoS and schedule, and returned with its content source.
  Status Complete(const std::string& node, dpv1::Volume dv, v1::CreateVolumeResponse* resp) {
    if (!candidates_.Allows(node)) {
      return Err(EEXIST,
                 "volume \"{}\" exists on node {}, which accessibility_requirements exclude",
                 req_.name(), node);
    }
    auto want = VolumeSizeFor(range_, dv.size_bytes(), dv.size_bytes());
    if (!want.ok()) return CallError(want.status().code(), want.status().message());
    if (*want > dv.size_bytes()) {
      auto grown =
          nodes_.On(node, [&](NodeDatapath& d) { return d.ResizeVolume(pool_name_, *want); });
      if (!grown.ok()) return grown.status();
      dv = std::move(*grown);
    }
    if (!google::protobuf::util::MessageDifferencer::Equals(dv.qos(), qos_)) {
      auto set =
          nodes_.On(node, [&](NodeDatapath& d) { return d.SetQos(pool_name_, QosPatchOf(qos_)); });
      if (!set.ok()) return set.status();
      dv = std::move(*set);
    }
    const VolumeSchedule have =
        dv.has_schedule() ? datapath::FromProto(dv.schedule()) : VolumeSchedule{};
    if (!(have == schedule_)) {
      auto set =
          nodes_.On(node, [&](NodeDatapath& d) { return d.SetSchedule(pool_name_, schedule_); });
      if (!set.ok()) return set.status();
      dv = std::move(*set);
    }
    FillVolume(node, dv, resp->mutable_volume());
    *resp->mutable_volume()->mutable_content_source() = req_.volume_content_source();
    return Status::Ok();
  }

  // ---- Restores and clones across nodes (issue 16) ----
  //
  // The source node serves a temporary clone of the snapshot or volume (the pool's clone:
  // instant with reflink, else a background copy the call waits for with ABORTED; named
  // TempName(), a pure function of the new volume's name, so every retry finds the same one)
  // over NBD; a node the topology allows runs a "copy" job in its datapath that makes
  // the new volume and fills it from there (datapath/backup/jobs.h). Until the job ends the
  // answer is ABORTED with its progress (the provisioner retries); a retry finds the volume by
  // name and asks its node for the job. When the job succeeded, the temporary clone goes; when
  // it failed, the datapath has removed the new volume, the clone goes too, and the job's error
  // is the answer.

  // Whether the source's node cannot hold the new volume: the topology excludes it, or its last
  // heartbeat leaves no room for it while another allowed node might have some. (The temporary
  // clone still needs the source's size there: this helps a volume asked larger than its
  // source; otherwise the clone's ENOSPC is the answer, RESOURCE_EXHAUSTED as on the fast path.)
  StatusOr<bool> NeedsCopy() {
    if (!candidates_.Allows(source_.node)) return true;
    auto info = nodes_.Get(source_.node);
    if (!info) return false;  // the fast path's own error (UNAVAILABLE) says it
    // Any error here is the fast path's to report (after its idempotency search: a retry of a
    // restore whose snapshot has been deleted since still finds its volume).
    auto size = SizeToProvision();
    if (!size.ok()) return false;
    if (info->provisionable_bytes >= *size) return false;
    // Only worth it when the copy would land: the fast path's ENOSPC is the clearer answer.
    for (const auto& n : candidates_.order) {
      if (n == source_.node) continue;
      auto other = nodes_.Get(n);
      if (other && other->provisionable_bytes >= *size) {
        // An earlier attempt may have made it on the source node after all (room changes).
        auto there = nodes_.GetVolume(source_.node, pool_name_);
        if (there.ok()) return false;
        if (there.status().code() != ENOENT) return there.status();
        return true;
      }
    }
    return false;
  }

  std::string TempName() const { return "xfer-" + pool_name_; }

  Status RunCopy(v1::CreateVolumeResponse* resp) {
    if (Status s = CheckRange(); !s.ok()) return s;
    auto found =
        FanOut(live_, [&](const NodeInfo& n) { return nodes_.GetVolume(n.node_id, pool_name_); });
    auto holder = FirstHolder(found);
    if (!holder.ok()) return holder.status();
    if (*holder) {
      const std::string& node = live_[**holder].node_id;
      if (node == source_.node) {
        // Made on the source's node by an earlier attempt (its fast path).
        if (Status s = MatchesRequest(node, *found[**holder]); !s.ok()) return s;
        FillVolume(node, *found[**holder], resp->mutable_volume());
        *resp->mutable_volume()->mutable_content_source() = req_.volume_content_source();
        return Status::Ok();
      }
      return FinishCopy(node, *found[**holder], resp);
    }
    auto size = SizeToProvision();
    if (!size.ok()) return size.status();
    auto src = nodes_.Get(source_.node);
    if (!src) {
      return Err(EAGAIN, "the content source's node {} is not registered now ({}); retry once it "
                 "heartbeats", source_.node, nodes_.WhyAbsent());
    }
    if (src->nbd_endpoint.empty()) {
      return Err(EINVAL,
                 "the content source lives on node {}, which accessibility_requirements exclude "
                 "or which has no room, and that node's datapath advertises no NBD TCP endpoint "
                 "to copy it from (start it with a tcp:// --nbd-listen)",
                 source_.node);
    }
    if (Status s = ReportFailedAttempt(); !s.ok()) return s;
    // The source's point in time, served by its node until the copy is done; read-only, as
    // nothing but the copy may see it.
    dpv1::CreateVolumeRequest tr;
    tr.set_name(TempName());
    tr.set_read_only(true);
    *tr.mutable_source() = source_.dp;
    auto temp = nodes_.On(source_.node, [&](NodeDatapath& d) { return d.CreateVolume(tr); });
    if (!temp.ok()) {
      return Err(temp.status().code(), "temporary copy of the content source on node {}: {}",
                 source_.node, temp.status().message());
    }
    if (!temp->ready()) {
      return Err(EALREADY,
                 "the content source is being copied on node {} before it is sent to another "
                 "node; retry",
                 source_.node);
    }
    std::string node;
    dpv1::BackupJob job;
    Status placed = OnFirstWithRoom(*size, [&](const std::string& n, const NodeInfo& info) -> Status {
      if (n == source_.node) return Err(ENOSPC, "{}: holds the source, no room", n);
      dpv1::CopyVolumeRequest cr;
      cr.set_volume(pool_name_);
      cr.set_size_bytes(*size);
      cr.set_endpoint(src->nbd_endpoint);
      cr.set_export_name(TempName());
      cr.set_source_node(source_.node);
      auto started = nodes_.On(n, [&](NodeDatapath& d) { return d.CopyVolume(cr); });
      if (!started.ok()) return started.status();
      ledger_.Add(info, *size);
      node = n;
      job = std::move(*started);
      return Status::Ok();
    });
    if (!placed.ok()) {
      RemoveTemp();
      return placed;
    }
    spdlog::info("[{}] volume {}: copying {} from node {} ({}) to node {} (job {})",
                 csi::CurrentRequestId(), pool_name_, source_.Text(), source_.node,
                 src->nbd_endpoint, node, job.id());
    auto seen = backups_.Wait(node, std::move(job));
    if (!seen.ok()) return seen.status();
    if (seen->state() == "running") return CopyRunning(*seen, node);
    if (seen->state() == "failed") return CopyFailed(*seen, node);
    auto vol = nodes_.GetVolume(node, pool_name_);
    if (!vol.ok()) return vol.status();
    return FinishCopy(node, *vol, resp);
  }

  // A copy job that failed between two calls has removed its volume, so nothing above found it;
  // its temporary clone is the sign that an attempt was made and not reported yet. Its failure
  // is this call's answer (the clone goes with it), and the next retry starts over.
  Status ReportFailedAttempt() {
    auto temp = nodes_.GetVolume(source_.node, TempName());
    if (!temp.ok()) return temp.status().code() == ENOENT ? Status::Ok() : temp.status();
    for (const auto& n : candidates_.order) {
      if (n == source_.node || !nodes_.Get(n)) continue;
      auto job = backups_.JobOf(n, pool_name_, "copy");
      if (!job.ok()) return job.status();
      if (*job && (*job)->state() == "failed" && (*job)->backup() == TempName()) {
        return CopyFailed(**job, n);
      }
    }
    return Status::Ok();
  }

  // The volume found on `node`, not the source's: ABORTED while its copy runs, the copy's error
  // if it failed, else done: the temporary clone goes and the volume is completed.
  Status FinishCopy(const std::string& node, dpv1::Volume dv, v1::CreateVolumeResponse* resp) {
    auto job = backups_.JobOf(node, pool_name_, "copy");
    if (!job.ok()) return job.status();
    if (*job && (*job)->backup() != TempName()) {
      return Err(EEXIST, "volume \"{}\" on node {} was copied from \"{}\", not from {}",
                 req_.name(), node, (*job)->backup(), source_.Text());
    }
    if (*job && (*job)->state() == "running") return CopyRunning(**job, node);
    if (*job && (*job)->state() == "failed") return CopyFailed(**job, node);
    // No job: it ended before the datapath restarted (one that was interrupted has deleted its
    // volume at the start), so the data is whole. A blank volume has no other way to be here
    // with this name and no source.
    if (!dv.source().empty()) {
      return Err(EEXIST, "volume \"{}\" exists on node {} with content source \"{}\", not \"{}\"",
                 req_.name(), node, dv.source(), source_.Text());
    }
    if (Status s = Complete(node, dv, resp); !s.ok()) return s;
    RemoveTemp();
    spdlog::info("[{}] volume {} ({} bytes) on node {}: copied from {} on node {}",
                 csi::CurrentRequestId(), resp->volume().volume_id(),
                 resp->volume().capacity_bytes(), node, source_.Text(), source_.node);
    return Status::Ok();
  }

  static std::string Progress(const dpv1::BackupJob& j) {
    if (j.total_bytes() == 0) return "starting";
    return fmt::format("{:.0f}% of {} bytes, {:.1f} MiB/s",
                       100.0 * j.done_bytes() / j.total_bytes(), j.total_bytes(),
                       j.rate_bytes_per_s() / 1048576.0);
  }

  Status CopyRunning(const dpv1::BackupJob& j, const std::string& node) const {
    return Err(EALREADY,
               "volume \"{}\" is being copied from node {} to node {} (job {}, {}); it is ready "
               "when the copy ends",
               req_.name(), source_.node, node, j.id(), Progress(j));
  }

  // The datapath removed the half-copied volume; the temporary clone goes too, so a retry starts
  // over. A lost connection or an unreachable peer is UNAVAILABLE (retry), a full pool
  // RESOURCE_EXHAUSTED, anything else the job's errno.
  Status CopyFailed(const dpv1::BackupJob& j, const std::string& node) {
    RemoveTemp();
    int code = j.error_errno() ? j.error_errno() : EIO;
    switch (code) {
      case ECONNRESET: case ECONNREFUSED: case EPIPE: case ETIMEDOUT: case ESHUTDOWN:
      case EPROTO: case EHOSTUNREACH: case ENETUNREACH: case ENOENT:
        code = EAGAIN;
        break;
      default:
        break;
    }
    return Err(code, "copy of {} from node {} to node {} failed (job {}): {}", source_.Text(),
               source_.node, node, j.id(), j.error());
  }

  // Best effort: a temporary clone left behind (its node unreachable now) is named xfer-VOLUME
  // and is removed by the next CreateVolume retry of the same name, or by hand.
  void RemoveTemp() {
    Status s = nodes_.On(source_.node, [&](NodeDatapath& d) { return d.DeleteVolume(TempName()); });
    if (!s.ok() && s.code() != ENOENT) {
      spdlog::warn("[{}] temporary clone {} on node {} stays: {}", csi::CurrentRequestId(),
                   TempName(), source_.node, s.message());
    }
  }

  // Restores and clones are local (reflink or local copy) when they can be: the source pins the
  // node (a replicated volume's first replica); otherwise RunCopy. Only parsed here; its size is asked for after the
  // idempotency search, so a retry still finds a restored volume whose snapshot was deleted
  // meanwhile.
  Status ResolveSource() {
    if (!req_.has_volume_content_source()) return Status::Ok();
    const auto& cs = req_.volume_content_source();
    if (cs.has_snapshot()) {
      auto ref = NamedSnapshot(cs.snapshot().snapshot_id(), "source snapshot");
      if (!ref.ok()) return ref.status();
      source_ = {ref->node_id, ref->pool_name, {}};
      source_.dp.set_snapshot(ref->pool_name);
    } else if (cs.has_volume()) {
      auto ref = NamedVolume(cs.volume().volume_id(), "source volume");
      if (!ref.ok()) return ref.status();
      source_ = {ref->node_id, ref->pool_name, {}};
      source_.dp.set_volume(ref->pool_name);
    } else {
      return Err(EINVAL, "volume_content_source names neither a snapshot nor a volume");
    }
    return Status::Ok();
  }

  // A malformed range is refused before any node is asked; whether a size fits it is known only
  // once the source's size is (SizeToProvision).
  Status CheckRange() {
    if (!range_) return Status::Ok();
    if (range_->required_bytes() < 0 || range_->limit_bytes() < 0 ||
        (range_->limit_bytes() > 0 && range_->limit_bytes() < range_->required_bytes())) {
      auto bad = VolumeSizeFor(range_, opts_.default_volume_bytes, 0);  // for its message
      return CallError(EINVAL, bad.status().message());
    }
    return Status::Ok();
  }

  // Idempotency by name: the pool name is a pure function of the CSI name, so asking every live
  // node finds an earlier attempt wherever it landed. A node that cannot answer could hold it:
  // fail (retryable) rather than risk a second copy elsewhere. True when found (`out` filled).
  StatusOr<bool> FindExisting(v1::Volume* out) {
    auto found =
        FanOut(live_, [&](const NodeInfo& n) { return nodes_.GetVolume(n.node_id, pool_name_); });
    auto holder = FirstHolder(found);
    if (!holder.ok()) return holder.status();
    if (!*holder) return false;
    const std::string& node = live_[**holder].node_id;
    if (Status s = MatchesRequest(node, *found[**holder]); !s.ok()) return s;
    FillVolume(node, *found[**holder], out);
    return true;
  }

  // EEXIST (ALREADY_EXISTS) unless the earlier attempt is what this request asks for.
  Status MatchesRequest(const std::string& node, const dpv1::Volume& existing) {
    uint64_t have = existing.size_bytes();
    bool size_ok =
        !range_ ||
        (have >= static_cast<uint64_t>(range_->required_bytes()) &&
         (range_->limit_bytes() == 0 || have <= static_cast<uint64_t>(range_->limit_bytes())));
    if (!size_ok) {
      return Err(EEXIST,
                 "volume \"{}\" exists on node {} with {} bytes, outside the requested range",
                 req_.name(), node, have);
    }
    if (existing.source() != source_.Text() || (source_.present() && source_.node != node)) {
      return Err(EEXIST, "volume \"{}\" exists on node {} with content source \"{}\", not \"{}\"",
                 req_.name(), node, existing.source(), source_.Text());
    }
    if (!google::protobuf::util::MessageDifferencer::Equals(existing.qos(), qos_)) {
      return Err(EEXIST, "volume \"{}\" exists on node {} with other QoS parameters ({})",
                 req_.name(), node, existing.qos().ShortDebugString());
    }
    const VolumeSchedule have_schedule =
        existing.has_schedule() ? datapath::FromProto(existing.schedule()) : VolumeSchedule{};
    if (!(have_schedule == schedule_) && !(have_schedule.empty() && schedule_.empty())) {
      return Err(EEXIST, "volume \"{}\" exists on node {} with another schedule ({})",
                 req_.name(), node, DescribeSchedule(have_schedule));
    }
    if (!candidates_.Allows(node)) {
      return Err(EEXIST,
                 "volume \"{}\" exists on node {}, which accessibility_requirements exclude",
                 req_.name(), node);
    }
    return Status::Ok();
  }

  // A restore or clone without a size gets its source's size, not the blank default, and never
  // less than it.
  StatusOr<uint64_t> SizeToProvision() {
    uint64_t source_size = 0;
    if (source_.dp.has_snapshot()) {
      auto snap = nodes_.GetSnapshot(source_.node, source_.name);
      if (!snap.ok()) return snap.status();
      source_size = snap->size_bytes();
    } else if (source_.present()) {
      auto vol = nodes_.GetVolume(source_.node, source_.name);
      if (!vol.ok()) return vol.status();
      source_size = vol->size_bytes();
    }
    auto size =
        VolumeSizeFor(range_, source_size ? source_size : opts_.default_volume_bytes, source_size);
    if (!size.ok()) return CallError(size.status().code(), size.status().message());
    return size;
  }

  // `make(node, info)` on the first candidate that is registered and has room for `size`. The
  // datapath checks again (the heartbeat's figure may be a few seconds old): ENOSPC from `make`
  // moves on to the next one; any other answer is the call's.
  template <typename F>
  Status OnFirstWithRoom(uint64_t size, F&& make) {
    bool missing = false;
    std::vector<std::string> why_not;  // per node, for the error an operator reads
    for (const auto& node : candidates_.order) {
      auto info = nodes_.Get(node);
      if (!info) {
        missing = true;
        why_not.push_back(node + ": not registered");
        continue;
      }
      if (info->provisionable_bytes < size) {
        why_not.push_back(
            fmt::format("{}: {} bytes provisionable", node, info->provisionable_bytes));
        continue;
      }
      Status s = make(node, *info);
      if (s.code() != ENOSPC) return s;
      why_not.push_back(s.message());
      spdlog::info("[{}] {}; trying the next node", csi::CurrentRequestId(), s.message());
    }
    return NoPlace(size, missing, why_not);
  }

  Status Place(uint64_t size, v1::CreateVolumeResponse* resp) {
    return OnFirstWithRoom(size, [&](const std::string& node, const NodeInfo& info) -> Status {
      auto created =
          nodes_.On(node, [&](NodeDatapath& d) { return d.CreateVolume(Request(size)); });
      if (!created.ok()) return created.status();
      ledger_.Add(info, size);
      FillVolume(node, *created, resp->mutable_volume());
      if (source_.present()) {
        *resp->mutable_volume()->mutable_content_source() = req_.volume_content_source();
      }
      spdlog::info("[{}] volume {} ({} bytes) created on node {}", csi::CurrentRequestId(),
                   resp->volume().volume_id(), size, node);
      return Status::Ok();
    });
  }

  dpv1::CreateVolumeRequest Request(uint64_t size) const {
    dpv1::CreateVolumeRequest r;
    r.set_name(pool_name_);
    r.set_size_bytes(size);
    *r.mutable_qos() = qos_;
    if (source_.present()) *r.mutable_source() = source_.dp;
    if (!schedule_.empty()) datapath::ToProto(schedule_, r.mutable_schedule());
    return r;
  }

  // No room anywhere allowed is RESOURCE_EXHAUSTED; but an allowed node that has not registered
  // (yet) may come with room, so then UNAVAILABLE: retry rather than fail.
  Status NoPlace(uint64_t size, bool missing, const std::vector<std::string>& why_not) const {
    const bool retry = missing || candidates_.order.empty();
    if (opts_.on_placement_refused) {
      opts_.on_placement_refused(retry ? ControllerOptions::Refusal::kNodeMissing
                                       : ControllerOptions::Refusal::kNoRoom);
    }
    if (retry) {
      return Err(EAGAIN,
                 "no registered node can take {} bytes now ({}); retry once the node's datapath "
                 "heartbeats",
                 size,
                 candidates_.order.empty() ? "no node registered yet"
                                           : fmt::format("{}", fmt::join(why_not, "; ")));
    }
    return Err(ENOSPC, "no allowed node has room for {} bytes ({})", size,
               fmt::join(why_not, "; "));
  }

  const v1::CreateVolumeRequest& req_;
  Nodes& nodes_;
  PlacementLedger& ledger_;
  ReplicatedVolumes& replicated_;
  Backups& backups_;
  const ControllerOptions& opts_;
  int replicas_ = 1;
  const v1::CapacityRange* range_ = nullptr;
  std::string pool_name_;
  dpv1::QosLimits qos_;
  VolumeSchedule schedule_;
  std::vector<NodeInfo> live_;  // one registry snapshot for the whole call
  Candidates candidates_;
  ContentSource source_;
};

}  // namespace

Status ControllerImpl::CreateVolume(const v1::CreateVolumeRequest& req,
                                    v1::CreateVolumeResponse* resp) {
  return CreateVolumeCall(req, nodes_, ledger_, replicated_, backups_, opts_).Run(resp);
}

}  // namespace nbdcsi::controller
