#include "node/node_service.h"

#include <climits>
#include <optional>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/grpc_status.h"
#include "common/name_locks.h"
#include "csi/driver.h"
#include "csi/ids.h"
#include "csi/logging.h"
#include "node/csi_request.h"

namespace nbdcsi::node {

namespace v1 = ::csi::v1;
using AccessMode = v1::VolumeCapability::AccessMode;

namespace {

constexpr const char* kFuseFallbackNote =
    "attached through the nbdfuse fallback (no kernel NBD on this node): slower, and a datapath "
    "restart breaks its I/O; load nbd.ko on the node (chart: datapath.kernelNbd)";

// A volume id resolved on this node.
struct NodeVolume {
  std::string name;         // the pool volume (v1), or the replicated volume (r1)
  bool replicated = false;  // r1: attached through the target this node opens for it
};

// OS failures are the node's problem, not the caller's argument: INTERNAL, whatever errno the
// syscall gave (an ENOENT from mkdir is not "volume not found").
Status OsError(const Status& s) { return Status(EIO, s.message()); }

class NodeService final : public v1::Node::Service {
 public:
  NodeService(NodeOptions opts, NodeOs& os, DatapathClient& dp)
      : opts_(std::move(opts)), os_(os), dp_(dp) {}

  grpc::Status NodeStageVolume(grpc::ServerContext*, const v1::NodeStageVolumeRequest* req,
                               v1::NodeStageVolumeResponse*) override {
    return Reply("NodeStageVolume", req->volume_id(), Stage(*req));
  }
  grpc::Status NodeUnstageVolume(grpc::ServerContext*, const v1::NodeUnstageVolumeRequest* req,
                                 v1::NodeUnstageVolumeResponse*) override {
    return Reply("NodeUnstageVolume", req->volume_id(), Unstage(*req));
  }
  grpc::Status NodePublishVolume(grpc::ServerContext*, const v1::NodePublishVolumeRequest* req,
                                 v1::NodePublishVolumeResponse*) override {
    return Reply("NodePublishVolume", req->volume_id(), Publish(*req));
  }
  grpc::Status NodeUnpublishVolume(grpc::ServerContext*, const v1::NodeUnpublishVolumeRequest* req,
                                   v1::NodeUnpublishVolumeResponse*) override {
    return Reply("NodeUnpublishVolume", req->volume_id(), Unpublish(*req));
  }
  grpc::Status NodeExpandVolume(grpc::ServerContext*, const v1::NodeExpandVolumeRequest* req,
                                v1::NodeExpandVolumeResponse* resp) override {
    return Reply("NodeExpandVolume", req->volume_id(), Expand(*req, resp));
  }
  grpc::Status NodeGetVolumeStats(grpc::ServerContext*, const v1::NodeGetVolumeStatsRequest* req,
                                  v1::NodeGetVolumeStatsResponse* resp) override {
    return Reply("NodeGetVolumeStats", req->volume_id(), Stats(*req, resp));
  }

  grpc::Status NodeGetCapabilities(grpc::ServerContext*, const v1::NodeGetCapabilitiesRequest*,
                                   v1::NodeGetCapabilitiesResponse* resp) override {
    for (auto t : {v1::NodeServiceCapability::RPC::STAGE_UNSTAGE_VOLUME,
                   v1::NodeServiceCapability::RPC::EXPAND_VOLUME,
                   v1::NodeServiceCapability::RPC::GET_VOLUME_STATS,
                   v1::NodeServiceCapability::RPC::VOLUME_CONDITION,
                   v1::NodeServiceCapability::RPC::SINGLE_NODE_MULTI_WRITER}) {
      resp->add_capabilities()->mutable_rpc()->set_type(t);
    }
    return grpc::Status::OK;
  }

  grpc::Status NodeGetInfo(grpc::ServerContext*, const v1::NodeGetInfoRequest*,
                           v1::NodeGetInfoResponse* resp) override {
    resp->set_node_id(opts_.node_id);
    unsigned max = opts_.max_volumes;
    if (max == 0) max = os_.CountDevices("nbd");
    if (max == 0) max = kFuseMaxVolumes;
    resp->set_max_volumes_per_node(max);
    (*resp->mutable_accessible_topology()->mutable_segments())[csi::kTopologyKey] = opts_.node_id;
    return grpc::Status::OK;
  }

 private:
  grpc::Status Reply(const char* method, const std::string& volume_id, const Status& s) {
    if (!s.ok()) {
      spdlog::warn("[{}] {} {}: {}", csi::CurrentRequestId(), method, volume_id, s.message());
    }
    return ToGrpc(s);
  }

  // What `id` names on this node: the pool volume of a v1 id that lives here, or the replicated
  // volume of an r1 id (any node serves it, through a target). ENOENT for an id that does not
  // parse or names another node's volume.
  StatusOr<NodeVolume> ResolveVolume(const std::string& id) {
    if (id.empty()) return Error(EINVAL, "volume_id is missing");
    if (csi::IsReplicatedVolumeId(id)) {
      auto name = csi::ParseReplicatedVolumeId(id);
      if (!name.ok()) return Status(ENOENT, name.status().message());
      return NodeVolume{*name, true};
    }
    auto name = LocalVolume(id);
    if (!name.ok()) return name.status();
    return NodeVolume{*name, false};
  }

  // The pool volume behind v1 `id` when it lives on this node; ENOENT otherwise.
  StatusOr<std::string> LocalVolume(const std::string& id) {
    if (id.empty()) return Error(EINVAL, "volume_id is missing");
    auto ref = csi::ParseVolumeId(id);
    if (!ref.ok()) return Status(ENOENT, ref.status().message());
    if (ref->node_id != opts_.node_id) {
      return Error(ENOENT, "volume {} lives on node {}, this is node {}", id, ref->node_id,
                   opts_.node_id);
    }
    return ref->pool_name;
  }

  // Two device paths name the same device (a symlink, or another node for the same device).
  bool SameDevice(const std::string& a, const std::string& b) {
    if (a == b) return true;
    auto sa = os_.Stat(a);
    auto sb = os_.Stat(b);
    return sa.ok() && sb.ok() && sa->kind == PathKind::kBlockDevice &&
           sb->kind == PathKind::kBlockDevice && sa->rdev == sb->rdev;
  }

  // A path kubelet gave us: clean, beneath the kubelet root, and not leaving it through a
  // symlink on the way (checked on the real file system before anything is mounted there).
  Status CheckPath(const char* what, const std::string& path) {
    if (Status s = ValidatePathUnderRoot(what, path, opts_.kubelet_root); !s.ok()) return s;
    if (Status s = os_.CheckBeneath(opts_.kubelet_root, path); !s.ok()) {
      if (s.code() == EINVAL) return Error(EINVAL, "{}: {}", what, s.message());
      return OsError(s);
    }
    return Status::Ok();
  }

  // Unmounts whatever is stacked at `path` (a retried call from an older plugin may have
  // mounted twice). OK when nothing is mounted.
  Status UnmountAll(const std::string& path) {
    for (int i = 0; i < 16; ++i) {
      auto m = os_.GetMount(path);
      if (!m.ok()) return OsError(m.status());
      if (!m->has_value()) return Status::Ok();
      spdlog::info("[{}] unmount {} ({} from {})", csi::CurrentRequestId(), path, (*m)->fstype,
                   (*m)->source);
      if (Status s = os_.Unmount(path); !s.ok()) return OsError(s);
    }
    return Error(EIO, "{} is still mounted after 16 unmounts", path);
  }

  Status Stage(const v1::NodeStageVolumeRequest& req) {
    auto volume = ResolveVolume(req.volume_id());
    if (!volume.ok() && volume.status().code() == EINVAL) return volume.status();
    if (Status s = CheckPath("staging_target_path", req.staging_target_path()); !s.ok()) {
      return s;
    }
    if (!req.has_volume_capability()) return Error(EINVAL, "volume_capability is missing");
    auto cap = ParseCapability(req.volume_capability());
    if (!cap.ok()) return cap.status();
    if (!volume.ok()) return volume.status();
    if (volume->replicated) return StageReplicated(req, volume->name, *cap);
    return StageAttached(*volume, req.staging_target_path(), *cap);
  }

  StatusOr<dpv1::Attachment> AttachOf(const NodeVolume& v) {
    return v.replicated ? dp_.AttachTarget(v.name) : dp_.Attach(v.name);
  }

  // An r1 volume: its target opened on this node's datapath (which claims the volume in the
  // cluster state), its device attached to the target, then staged as any volume. What this call
  // opened or attached is undone when the stage fails: a claim left behind would keep every other
  // node from staging the volume, and kubelet may never unstage a stage that failed.
  Status StageReplicated(const v1::NodeStageVolumeRequest& req, const std::string& name,
                         const Capability& cap) {
    const std::string& id = req.volume_id();
    bool opened = false;
    if (Status s = OpenTargetHere(id, name, &opened); !s.ok()) return s;
    auto before = dp_.ListAttachments();
    if (!before.ok()) {
      // Whether a device sits on the target is unknown: keep the target.
      UndoReplicatedStage(id, name, opened, /*attached=*/false, /*device_before=*/true);
      return before.status();
    }
    const dpv1::Attachment* had = FindAttachment(*before, name);
    if (had != nullptr && !had->target()) {
      // The local replica itself is attached (a v1 stage of the same pool volume, or an
      // operator's nbdctl attach): writing it directly would bypass the other replicas.
      UndoReplicatedStage(id, name, opened, /*attached=*/false, /*device_before=*/false);
      return Error(EBUSY,
                   "volume {} cannot be staged on node {}: its local replica {} is attached "
                   "here as a plain volume on {}; unstage or detach it first",
                   id, opts_.node_id, name, had->device());
    }
    Status s = StageAttached(NodeVolume{name, true}, req.staging_target_path(), cap);
    if (!s.ok()) UndoReplicatedStage(id, name, opened, /*attached=*/true, had != nullptr);
    return s;
  }

  // Opens the target of `name` on the local datapath unless it is open here already (*opened
  // says whether this call opened it). GetTarget first tells the two FAILED_PRECONDITION causes
  // of OpenTarget apart: no cluster on this datapath (GetTarget fails too), or another node's
  // live claim (GetTarget answers "not open here").
  Status OpenTargetHere(const std::string& id, const std::string& name, bool* opened) {
    *opened = false;
    auto cur = dp_.GetTarget(name);
    if (cur.ok()) return Status::Ok();
    if (cur.status().code() == EBUSY) {
      return Error(EBUSY,
                   "volume {} is replicated, and the nbd-datapathd of node {} runs without a "
                   "cluster (--cluster-etcd), so it cannot serve it: {}",
                   id, opts_.node_id, cur.status().message());
    }
    if (cur.status().code() != ENOENT) return cur.status();
    auto t = dp_.OpenTarget(name);
    if (!t.ok()) {
      if (t.status().code() == EBUSY) {
        // Retryable: the holder closes the target at its unstage, or its claim lapses with its
        // cluster lease when that node is gone. kubelet retries the stage until then.
        return Error(EAGAIN,
                     "volume {} is still in use on another node, so node {} cannot open its "
                     "target yet (the claim lapses with that node's cluster lease if it is "
                     "gone): {}",
                     id, opts_.node_id, t.status().message());
      }
      return t.status();
    }
    *opened = true;
    spdlog::info("[{}] opened the target of {} at epoch {} ({} replica(s){})",
                 csi::CurrentRequestId(), id, t->epoch(), t->replicas_size(),
                 t->degraded() ? ", degraded" : "");
    return Status::Ok();
  }

  // Takes back what a failed r1 stage did: the device if this call attached it (the datapath
  // refuses while anything has it mounted), then the target if this call opened it and no device
  // is attached to it. `device_before`: the target had its device before this call (or that is
  // unknown). Failures only log: the stage's own error is what the caller sees.
  void UndoReplicatedStage(const std::string& id, const std::string& name, bool opened,
                           bool attached, bool device_before) {
    bool device = device_before;
    if (attached && !device_before) {
      auto list = dp_.ListAttachments();
      if (!list.ok()) {
        device = true;  // unknown: keep the target
      } else if (FindAttachment(*list, name) != nullptr) {
        if (Status s = dp_.Detach(name); !s.ok()) {
          spdlog::warn("[{}] stage of {} failed; detaching it again: {}", csi::CurrentRequestId(),
                       id, s.message());
          device = true;
        }
      }
    }
    if (!opened || device) return;
    if (Status s = dp_.CloseTarget(name); !s.ok() && s.code() != ENOENT) {
      spdlog::warn("[{}] stage of {} failed; closing its target again: {}", csi::CurrentRequestId(),
                   id, s.message());
      return;
    }
    spdlog::info("[{}] stage of {} failed: closed the target this call opened",
                 csi::CurrentRequestId(), id);
  }

  static const dpv1::Attachment* FindAttachment(const std::vector<dpv1::Attachment>& list,
                                                const std::string& name) {
    for (const auto& a : list) {
      if (a.volume() == name) return &a;
    }
    return nullptr;
  }

  // Attaches the volume (an r1 volume's target must be open) and stages it at `staging`.
  Status StageAttached(const NodeVolume& vol, const std::string& staging, const Capability& cap) {
    const std::string& volume = vol.name;
    if (cap.block) {
      // Block volumes are attached only; publish binds the device node itself.
      auto att = AttachOf(vol);
      if (!att.ok()) return att.status();
      spdlog::info("[{}] staged block volume {} as {} ({})", csi::CurrentRequestId(), volume,
                   att->device(), att->mode());
      WarnIfFallback(volume, *att);
      return Status::Ok();
    }

    auto mounted = os_.GetMount(staging);
    if (!mounted.ok()) return OsError(mounted.status());
    auto att = AttachOf(vol);
    if (!att.ok()) return att.status();
    const std::string& device = att->device();
    if (mounted->has_value()) {
      // Done by an earlier call, if what is mounted is what is asked for now.
      return SameStaging(**mounted, volume, device, staging, cap);
    }

    if (Status s = os_.MakeDir(staging); !s.ok()) return OsError(s);
    uint64_t fs_bytes = 0;
    if (Status s = PrepareFileSystem(volume, device, cap, &fs_bytes); !s.ok()) return s;
    if (Status s = os_.Mount(device, staging, cap.fstype, StageMountOptions(cap)); !s.ok()) {
      return OsError(s);
    }
    if (Status s = GrowToDevice(volume, device, staging, cap, fs_bytes); !s.ok()) {
      // Not staged at all rather than staged smaller than asked: the kubelet retries the stage.
      if (Status u = os_.Unmount(staging); !u.ok()) {
        spdlog::warn("[{}] unmount {} after the failed growth: {}", csi::CurrentRequestId(),
                     staging, u.message());
      }
      return s;
    }
    spdlog::info("[{}] staged volume {} ({}, {}) at {}", csi::CurrentRequestId(), volume, device,
                 att->mode(), staging);
    WarnIfFallback(volume, *att);
    return Status::Ok();
  }

  static void WarnIfFallback(const std::string& volume, const dpv1::Attachment& att) {
    if (att.mode() == "fuse") {
      spdlog::warn("[{}] volume {}: {}", csi::CurrentRequestId(), volume, kFuseFallbackNote);
    }
  }

  // An existing mount at the staging path is this volume's, with the asked file system and mode;
  // EEXIST saying what differs otherwise.
  Status SameStaging(const MountInfo& m, const std::string& volume, const std::string& device,
                     const std::string& staging, const Capability& cap) {
    if (!SameDevice(m.source, device)) {
      return Error(EEXIST, "staging path {} already has {} mounted, not volume {} ({})", staging,
                   m.source, volume, device);
    }
    if (m.fstype != cap.fstype) {
      return Error(EEXIST, "volume {} is staged at {} as {}, not {}", volume, staging, m.fstype,
                   cap.fstype);
    }
    if (m.vfs_read_only != cap.ro_stage) {
      return Error(EEXIST, "volume {} is staged at {} {}, now asked {}", volume, staging,
                   m.vfs_read_only ? "read-only" : "read-write",
                   cap.ro_stage ? "read-only" : "read-write");
    }
    return Status::Ok();
  }

  // Formats a blank device; accepts one that already holds the asked file system (its size on
  // the device in *fs_bytes, 0 when just made or unknown); refuses anything else (never
  // reformats data).
  Status PrepareFileSystem(const std::string& volume, const std::string& device,
                           const Capability& cap, uint64_t* fs_bytes) {
    auto content = os_.Probe(device);
    if (!content.ok()) return OsError(content.status());
    switch (content->kind) {
      case DeviceContent::Kind::kBlank:
        if (cap.reader_only) {
          return Error(EBUSY,
                       "volume {} is blank and the access mode is read-only: there is no "
                       "file system to mount",
                       volume);
        }
        spdlog::info("[{}] volume {} ({}) is blank: mkfs {}", csi::CurrentRequestId(), volume,
                     device, cap.fstype);
        if (Status s = os_.MakeFs(device, cap.fstype); !s.ok()) return OsError(s);
        break;
      case DeviceContent::Kind::kFilesystem:
        if (content->type != cap.fstype) {
          return Error(EBUSY,
                       "volume {} holds a {} file system, not the requested {}: not "
                       "reformatting it",
                       volume, content->type, cap.fstype);
        }
        *fs_bytes = content->fs_bytes;
        break;
      case DeviceContent::Kind::kOther:
        return Error(EBUSY,
                     "volume {} ({}) holds \"{}\" data, not a {} file system: refusing to "
                     "format a device that is not blank",
                     volume, device, content->type, cap.fstype);
    }
    return Status::Ok();
  }

  // A file system smaller than its device is grown while mounted: a PVC restored from a snapshot,
  // or cloned from a PVC, into a larger size has the source's file system, and the kubelet never
  // calls NodeExpandVolume for it (the PVC already has the size it asked for). The slack covers
  // what resize2fs and xfs_growfs leave unused at the end (a part block, an XFS allocation group
  // too small to add), so a file system that fills its device is not grown on every stage.
  Status GrowToDevice(const std::string& volume, const std::string& device,
                      const std::string& staging, const Capability& cap, uint64_t fs_bytes) {
    constexpr uint64_t kSlack = 1 << 20;
    if (fs_bytes == 0) return Status::Ok();
    auto size = os_.DeviceSize(device);
    if (!size.ok()) return OsError(size.status());
    if (*size <= fs_bytes + kSlack) return Status::Ok();
    if (cap.ro_stage) {
      spdlog::warn("[{}] volume {}: its {} file system spans {} of {} bytes; staged read-only, "
                   "so it is not grown now",
                   csi::CurrentRequestId(), volume, cap.fstype, fs_bytes, *size);
      return Status::Ok();
    }
    spdlog::info("[{}] volume {}: its {} file system spans {} of {} bytes (restored or cloned "
                 "into a larger volume): growing it",
                 csi::CurrentRequestId(), volume, cap.fstype, fs_bytes, *size);
    if (Status s = os_.GrowFs(device, staging, cap.fstype); !s.ok()) {
      return Error(EIO, "volume {}: growing its {} file system from {} to {} bytes at stage: {}",
                   volume, cap.fstype, fs_bytes, *size, s.message());
    }
    return Status::Ok();
  }

  // The options of the staging mount: the user's, plus what this driver needs.
  static std::vector<std::string> StageMountOptions(const Capability& cap) {
    std::vector<std::string> options = cap.flags;
    if (cap.reader_only && !HasMountOption(Join(options), "ro")) options.push_back("ro");
    // ext4's built-in default is to carry on after metadata errors; stop writing instead, which
    // NodeGetVolumeStats then reports as an abnormal volume. The user's own errors= wins.
    if (cap.fstype == "ext4" && Join(options).find("errors=") == std::string::npos) {
      options.push_back("errors=remount-ro");
    }
    // A clone or restore carries its source's XFS UUID; without nouuid the second of the two
    // could not be mounted on the same node.
    if (cap.fstype == "xfs") options.push_back("nouuid");
    return options;
  }

  Status Unstage(const v1::NodeUnstageVolumeRequest& req) {
    if (req.volume_id().empty()) return Error(EINVAL, "volume_id is missing");
    if (Status s = CheckPath("staging_target_path", req.staging_target_path()); !s.ok()) {
      return s;
    }
    if (Status s = UnmountAll(req.staging_target_path()); !s.ok()) return s;
    auto volume = ResolveVolume(req.volume_id());
    if (!volume.ok()) {
      spdlog::info("[{}] unstage {}: {}; nothing to detach", csi::CurrentRequestId(),
                   req.volume_id(), volume.status().message());
      return Status::Ok();
    }
    if (volume->replicated) return UnstageReplicated(req.volume_id(), volume->name);
    // The datapath refuses (FAILED_PRECONDITION) while the device is still mounted somewhere,
    // e.g. a publish that was never unpublished: kubelet retries after fixing that.
    return dp_.Detach(volume->name);
  }

  // Detaches the target's device, then closes the target (which releases the volume's claim, so
  // another node can stage it). Each step is skipped when already done. A device of the same name
  // that is not the target's is the local replica attached as a plain volume: not this stage's.
  Status UnstageReplicated(const std::string& id, const std::string& name) {
    auto list = dp_.ListAttachments();
    if (!list.ok()) return list.status();
    if (const dpv1::Attachment* a = FindAttachment(*list, name); a != nullptr) {
      if (a->target()) {
        // Refused (FAILED_PRECONDITION) while the device is mounted anywhere; the target stays.
        if (Status s = dp_.Detach(name); !s.ok()) return s;
      } else {
        spdlog::warn(
            "[{}] unstage {}: {} on {} is the local replica attached as a plain "
            "volume, not the target's device: leaving it",
            csi::CurrentRequestId(), id, name, a->device());
      }
    }
    auto t = dp_.GetTarget(name);
    if (!t.ok()) {
      // Not open here, or no cluster on this datapath (so it never was): nothing to close.
      if (t.status().code() == ENOENT || t.status().code() == EBUSY) {
        spdlog::info("[{}] unstage {}: no target open here ({})", csi::CurrentRequestId(), id,
                     t.status().message());
        return Status::Ok();
      }
      return t.status();
    }
    if (Status s = dp_.CloseTarget(name); !s.ok() && s.code() != ENOENT) return s;
    spdlog::info("[{}] unstage {}: closed its target (epoch {}), claim released",
                 csi::CurrentRequestId(), id, t->epoch());
    return Status::Ok();
  }

  // What a published target must show: the staged file system, or the attached device node.
  StatusOr<std::string> PublishSource(const NodeVolume& v, const Capability& cap,
                                      const std::string& staging) {
    if (cap.block) {
      std::string source;
      auto list = dp_.ListAttachments();
      if (!list.ok()) return list.status();
      for (const auto& a : *list) {
        // An r1 volume's device is its target's, never the local replica attached as itself.
        if (a.volume() == v.name && (!v.replicated || a.target())) source = a.device();
      }
      if (source.empty()) {
        return Error(EBUSY, "volume {} is not attached on this node: stage it first", v.name);
      }
      return source;
    }
    auto staged = os_.GetMount(staging);
    if (!staged.ok()) return OsError(staged.status());
    if (!staged->has_value()) {
      return Error(EBUSY, "volume {} is not staged: nothing is mounted at {}", v.name, staging);
    }
    return (*staged)->source;
  }

  Status Publish(const v1::NodePublishVolumeRequest& req) {
    auto resolved = ResolveVolume(req.volume_id());
    StatusOr<std::string> volume =
        resolved.ok() ? StatusOr<std::string>(resolved->name) : resolved.status();
    if (!volume.ok() && volume.status().code() == EINVAL) return volume.status();
    if (Status s = CheckPath("target_path", req.target_path()); !s.ok()) return s;
    if (!req.has_volume_capability()) return Error(EINVAL, "volume_capability is missing");
    auto cap = ParseCapability(req.volume_capability());
    if (!cap.ok()) return cap.status();
    if (req.staging_target_path().empty()) {
      return Error(EBUSY, "staging_target_path is missing (this plugin stages volumes first)");
    }
    if (Status s = CheckPath("staging_target_path", req.staging_target_path()); !s.ok()) {
      return s;
    }
    if (req.staging_target_path() == req.target_path()) {
      return Error(EINVAL, "target_path and staging_target_path are both {}", req.target_path());
    }
    if (!volume.ok()) return volume.status();
    const std::string& target = req.target_path();
    bool ro = req.readonly() || cap->reader_only;

    auto published = PublishSource(*resolved, *cap, req.staging_target_path());
    if (!published.ok()) return published.status();
    const std::string& source = *published;

    if (cap->single_writer && !cap->block) {
      if (Status s = RefuseSecondTarget(*volume, source, req.staging_target_path(), target);
          !s.ok()) {
        return s;
      }
    }

    auto mounted = os_.GetMount(target);
    if (!mounted.ok()) return OsError(mounted.status());
    if (mounted->has_value()) {
      const MountInfo& m = **mounted;
      // A bound device node shows devtmpfs as its source: compare the node the path opens.
      bool same = cap->block ? SameDevice(target, source) : SameDevice(m.source, source);
      if (!same) {
        return Error(EEXIST, "target path {} already has {} mounted, not volume {}", target,
                     m.source, *volume);
      }
      if (m.vfs_read_only != ro) {
        return Error(EEXIST, "volume {} is already published at {} {}", *volume, target,
                     m.vfs_read_only ? "read-only" : "read-write");
      }
      return Status::Ok();
    }

    Status made = cap->block ? os_.MakeFile(target) : os_.MakeDir(target);
    if (!made.ok()) return OsError(made);
    // For a block volume the read-only bind is advisory: the kernel lets a device node on a
    // read-only mount be opened for writing. What enforces it is the container's device
    // permission ("r"), which kubelet sets from the same readonly flag.
    std::vector<std::string> options = {"bind"};
    if (ro) options.push_back("ro");
    const std::string& from = cap->block ? source : req.staging_target_path();
    if (Status s = os_.Mount(from, target, "", options); !s.ok()) return OsError(s);
    spdlog::info("[{}] published volume {} at {}{}", csi::CurrentRequestId(), *volume, target,
                 ro ? " read-only" : "");
    return Status::Ok();
  }

  // SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod): published at one target path at a time. The
  // spec's answer to a second one is FAILED_PRECONDITION. The mount table is the state: any mount
  // of the staged file system other than the staging path and this target is another publish.
  // Block volumes are not checked here: the kubelet bind-mounts a published device node again
  // under its own directories, which would look like a second publish.
  Status RefuseSecondTarget(const std::string& volume, const std::string& device,
                            const std::string& staging, const std::string& target) {
    auto all = os_.ListMounts();
    if (!all.ok()) return OsError(all.status());
    for (const MountInfo& m : *all) {
      if (m.target == staging || m.target == target || m.source.rfind('/', 0) != 0 ||
          !SameDevice(m.source, device)) {
        continue;
      }
      return Error(EBUSY,
                   "volume {} has the access mode SINGLE_NODE_SINGLE_WRITER and is already "
                   "published at {}: unpublish it there first",
                   volume, m.target);
    }
    return Status::Ok();
  }

  Status Unpublish(const v1::NodeUnpublishVolumeRequest& req) {
    if (req.volume_id().empty()) return Error(EINVAL, "volume_id is missing");
    if (Status s = CheckPath("target_path", req.target_path()); !s.ok()) return s;
    if (Status s = UnmountAll(req.target_path()); !s.ok()) return s;
    if (Status s = os_.RemovePath(req.target_path()); !s.ok()) return OsError(s);
    return Status::Ok();
  }

  Status Expand(const v1::NodeExpandVolumeRequest& req, v1::NodeExpandVolumeResponse* resp) {
    auto resolved = ResolveVolume(req.volume_id());
    StatusOr<std::string> volume =
        resolved.ok() ? StatusOr<std::string>(resolved->name) : resolved.status();
    if (!volume.ok() && volume.status().code() == EINVAL) return volume.status();
    if (req.volume_path().empty()) return Error(EINVAL, "volume_path is missing");
    // A volume that does not exist is NOT_FOUND whatever the path says (CSI 1.10's table;
    // csi-sanity asks with "some/path").
    if (!volume.ok() && volume.status().code() == ENOENT) return volume.status();
    // A replicated volume's device is its target's: ResizeAttachment grows the target to the
    // size the controller recorded (datapath TargetAccess::GrowTarget), then the device.
    if (Status s = CheckPath("volume_path", req.volume_path()); !s.ok()) {
      // Only on this error path: is the volume there at all (its id alone says nothing)?
      if (s.code() == EINVAL && !resolved->replicated) {
        if (auto v = dp_.GetVolume(*volume); !v.ok() && v.status().code() == ENOENT) {
          return v.status();
        }
      }
      return s;
    }
    std::optional<Capability> cap;
    if (req.has_volume_capability()) {
      auto c = ParseCapability(req.volume_capability());
      if (!c.ok()) return c.status();
      cap = *c;
    }
    if (req.capacity_range().required_bytes() < 0 || req.capacity_range().limit_bytes() < 0) {
      return Error(EINVAL, "capacity_range has a negative size");
    }
    if (!volume.ok()) return volume.status();
    const std::string& path = req.volume_path();
    auto info = os_.Stat(path);
    if (!info.ok()) return OsError(info.status());
    if (info->kind == PathKind::kMissing) {
      return Error(ENOENT, "volume_path {} does not exist", path);
    }
    bool block = (cap && cap->block) || info->kind == PathKind::kBlockDevice;

    auto att = dp_.ResizeAttachment(*volume);
    if (!att.ok()) return att.status();
    auto size = os_.DeviceSize(att->device());
    if (!size.ok()) return OsError(size.status());
    uint64_t required = static_cast<uint64_t>(req.capacity_range().required_bytes());
    if (*size < required) {
      return Error(ERANGE,
                   "volume {} is {} bytes on the device, less than the required {}: "
                   "expand the volume first (ControllerExpandVolume)",
                   *volume, *size, required);
    }
    if (!block) {
      auto m = os_.GetMount(path);
      if (!m.ok()) return OsError(m.status());
      if (!m->has_value()) return Error(ENOENT, "nothing is mounted at volume_path {}", path);
      if (!SameDevice((*m)->source, att->device())) {
        return Error(EBUSY, "{} has {} mounted, not volume {} ({})", path, (*m)->source, *volume,
                     att->device());
      }
      if ((*m)->super_read_only) {
        return Error(EBUSY, "the file system of volume {} at {} is read-only: cannot grow it",
                     *volume, path);
      }
      if (Status s = os_.GrowFs(att->device(), path, (*m)->fstype); !s.ok()) return OsError(s);
    }
    spdlog::info("[{}] expanded volume {} to {} bytes", csi::CurrentRequestId(), *volume, *size);
    resp->set_capacity_bytes(static_cast<int64_t>(*size));
    return Status::Ok();
  }

  Status Stats(const v1::NodeGetVolumeStatsRequest& req, v1::NodeGetVolumeStatsResponse* resp) {
    auto resolved = ResolveVolume(req.volume_id());
    StatusOr<std::string> volume =
        resolved.ok() ? StatusOr<std::string>(resolved->name) : resolved.status();
    if (!volume.ok() && volume.status().code() == EINVAL) return volume.status();
    if (req.volume_path().empty()) return Error(EINVAL, "volume_path is missing");
    // CSI 1.10's table: NOT_FOUND when the volume does not exist, or not on volume_path. A
    // path that is not where any volume can be (relative, outside the kubelet root) is the
    // second case, not a malformed request (csi-sanity: "some/path").
    if (!volume.ok()) return volume.status();
    if (Status s = CheckPath("volume_path", req.volume_path()); !s.ok()) {
      if (s.code() != EINVAL) return s;
      return Error(ENOENT, "volume {} does not exist on volume_path: {}", *volume, s.message());
    }
    const std::string& path = req.volume_path();
    std::vector<std::string> problems;
    // A file system that shut itself down fails even stat(2) of its root with EIO: that is the
    // volume's condition to report, not a failure of this call.
    auto info = os_.Stat(path);
    if (info.ok() && info->kind == PathKind::kMissing) {
      return Error(ENOENT, "volume_path {} does not exist", path);
    }
    if (!info.ok()) {
      problems.push_back("the file system fails I/O (shut down?): " + info.status().message());
    }

    if (info.ok() && info->kind == PathKind::kBlockDevice) {
      auto size = os_.DeviceSize(path);
      if (!size.ok()) return OsError(size.status());
      auto* u = resp->add_usage();
      u->set_unit(v1::VolumeUsage::BYTES);
      u->set_total(static_cast<int64_t>(*size));
    } else {
      auto m = os_.GetMount(path);
      if (!m.ok()) return OsError(m.status());
      if (!m->has_value()) {
        if (!info.ok()) return OsError(info.status());
        return Error(ENOENT, "volume {} is not mounted at {}", *volume, path);
      }
      auto fs = os_.StatFs(path);
      if (fs.ok()) {
        auto* b = resp->add_usage();
        b->set_unit(v1::VolumeUsage::BYTES);
        b->set_total(static_cast<int64_t>(fs->total_bytes));
        b->set_available(static_cast<int64_t>(fs->available_bytes));
        b->set_used(static_cast<int64_t>(fs->used_bytes));
        auto* i = resp->add_usage();
        i->set_unit(v1::VolumeUsage::INODES);
        i->set_total(static_cast<int64_t>(fs->total_inodes));
        i->set_available(static_cast<int64_t>(fs->available_inodes));
        i->set_used(static_cast<int64_t>(fs->used_inodes));
      } else if (info.ok()) {
        return OsError(fs.status());
      }
      // The mount still says rw but the file system went read-only under it: ext4
      // errors=remount-ro after a metadata error.
      if ((*m)->super_read_only && !(*m)->vfs_read_only) {
        problems.push_back("the file system turned read-only (I/O errors?)");
      }
      if (info.ok()) {
        if (Status s = os_.CheckOpenable(path); !s.ok()) {
          problems.push_back("the file system fails I/O (shut down?): " + s.message());
        }
      }
    }
    std::string note;
    AddDatapathHealth(*resolved, problems, note);
    auto* cond = resp->mutable_volume_condition();
    cond->set_abnormal(!problems.empty());
    std::string msg;
    for (const auto& p : problems) msg += (msg.empty() ? "" : "; ") + p;
    if (msg.empty()) {
      msg = note.empty() ? "ok" : note;
    } else if (!note.empty()) {
      msg += "; " + note;
    }
    cond->set_message(msg);
    return Status::Ok();
  }

  // Health as the datapath sees it. A datapath that does not answer is itself a problem of the
  // volume (its I/O goes nowhere), not a failure of the stats call. `note` gets what works but a
  // user should know: the nbdfuse fallback serves I/O fine until the datapath restarts, so it is
  // not abnormal, yet it is the only place a pod's owner (kubectl describe, events) can see it.
  void AddDatapathHealth(const NodeVolume& vol, std::vector<std::string>& problems,
                         std::string& note) {
    const std::string& volume = vol.name;
    auto list = dp_.ListAttachments();
    if (!list.ok()) {
      problems.push_back("datapath unreachable: " + list.status().message());
      return;
    }
    const dpv1::Attachment* att = nullptr;
    for (const auto& a : *list) {
      if (a.volume() == volume && (!vol.replicated || a.target())) att = &a;
    }
    if (att != nullptr && att->mode() == "fuse") note = kFuseFallbackNote;
    if (att == nullptr) {
      problems.push_back("not attached on this node");
    } else if (!att->link_ok()) {
      problems.push_back(
          fmt::format("link between {} and the datapath is down: {}", att->device(),
                      att->link_error().empty() ? "no reason given" : att->link_error()));
    }
    // An r1 volume's I/O goes through its target (this node may hold no replica at all).
    if (vol.replicated) return AddTargetHealth(volume, problems, note);
    auto stats = dp_.GetVolumeStats(volume);
    if (!stats.ok()) {
      problems.push_back("datapath stats: " + stats.status().message());
      return;
    }
    // The counters are since the datapath started: any error means the backing file failed a
    // request the pod made, which the pod saw as EIO.
    if (stats->read().errors() > 0 || stats->write().errors() > 0 || stats->flush().errors() > 0) {
      problems.push_back(fmt::format("datapath reported I/O errors (read {}, write {}, flush {})",
                                     stats->read().errors(), stats->write().errors(),
                                     stats->flush().errors()));
    }
  }

  // A replicated volume's target as this node's datapath serves it: open, serving, and with all
  // of the volume's replicas in sync. A degraded volume still serves every write, but one more
  // failure would lose data: abnormal, naming what is missing, until the replica is resynced.
  void AddTargetHealth(const std::string& volume, std::vector<std::string>& problems,
                       std::string& note) {
    auto t = dp_.GetTarget(volume);
    if (!t.ok()) {
      problems.push_back(t.status().code() == ENOENT
                             ? fmt::format("the target of replicated volume {} is not open on "
                                           "this node: its I/O goes nowhere",
                                           volume)
                             : "target: " + t.status().message());
      return;
    }
    if (t->stopped()) {
      problems.push_back(
          fmt::format("its target stopped serving (epoch {}): {}", t->epoch(),
                      t->stop_reason().empty() ? "no reason given" : t->stop_reason()));
    }
    size_t in_sync = 0;
    std::vector<std::string> missing;
    for (const auto& r : t->replicas()) {
      if (r.state() == "in-sync") {
        ++in_sync;
      } else {
        missing.push_back(fmt::format("{} {}{}", r.node(), r.state(),
                                      r.why().empty() ? "" : " (" + r.why() + ")"));
      }
    }
    // Every replica of the volume is a member (out of sync when it was unreachable at open);
    // why the open could not reach one is only in this list.
    for (const auto& u : t->unreachable()) missing.push_back("unreachable at open: " + u);
    size_t total = static_cast<size_t>(t->replicas_size());
    if (t->degraded() || in_sync < total) {
      std::string list;
      for (const auto& m : missing) list += (list.empty() ? "" : ", ") + m;
      problems.push_back(fmt::format("degraded: {} of {} replicas in sync; {}", in_sync, total,
                                     list.empty() ? "no reason given" : list));
    }
    if (t->has_resync()) {
      note = fmt::format("resyncing replica {}: pass {}, {:.0f}%", t->resync().node(),
                         t->resync().pass(), t->resync().percent());
    }
  }

  NodeOptions opts_;
  NodeOs& os_;
  DatapathClient& dp_;
};

class LockedNodeService final : public v1::Node::Service {
 public:
  explicit LockedNodeService(std::unique_ptr<v1::Node::Service> inner) : inner_(std::move(inner)) {}

#define NBDCSI_LOCKED(Method, Req, Resp)                                                       \
  grpc::Status Method(grpc::ServerContext* ctx, const v1::Req* req, v1::Resp* resp) override { \
    if (req->volume_id().empty()) return inner_->Method(ctx, req, resp);                       \
    auto guard = inflight_.TryAcquire(req->volume_id());                                       \
    if (!guard) {                                                                              \
      spdlog::info("[{}] " #Method " {}: another call on this volume is in progress",          \
                   csi::CurrentRequestId(), req->volume_id());                                 \
      return grpc::Status(grpc::StatusCode::ABORTED,                                           \
                          "an operation on volume " + req->volume_id() + " is in progress");   \
    }                                                                                          \
    return inner_->Method(ctx, req, resp);                                                     \
  }
  NBDCSI_LOCKED(NodeStageVolume, NodeStageVolumeRequest, NodeStageVolumeResponse)
  NBDCSI_LOCKED(NodeUnstageVolume, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse)
  NBDCSI_LOCKED(NodePublishVolume, NodePublishVolumeRequest, NodePublishVolumeResponse)
  NBDCSI_LOCKED(NodeUnpublishVolume, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse)
  NBDCSI_LOCKED(NodeExpandVolume, NodeExpandVolumeRequest, NodeExpandVolumeResponse)
  NBDCSI_LOCKED(NodeGetVolumeStats, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse)
#undef NBDCSI_LOCKED

  grpc::Status NodeGetCapabilities(grpc::ServerContext* ctx,
                                   const v1::NodeGetCapabilitiesRequest* req,
                                   v1::NodeGetCapabilitiesResponse* resp) override {
    return inner_->NodeGetCapabilities(ctx, req, resp);
  }
  grpc::Status NodeGetInfo(grpc::ServerContext* ctx, const v1::NodeGetInfoRequest* req,
                           v1::NodeGetInfoResponse* resp) override {
    return inner_->NodeGetInfo(ctx, req, resp);
  }

 private:
  std::unique_ptr<v1::Node::Service> inner_;
  NameLocks inflight_;
};

}  // namespace

std::unique_ptr<v1::Node::Service> MakeNodeService(NodeOptions opts, NodeOs& os,
                                                   DatapathClient& datapath) {
  return std::make_unique<NodeService>(std::move(opts), os, datapath);
}

std::unique_ptr<v1::Node::Service> MakeLockedNodeService(std::unique_ptr<v1::Node::Service> inner) {
  return std::make_unique<LockedNodeService>(std::move(inner));
}

}  // namespace nbdcsi::node
