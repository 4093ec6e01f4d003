// In-process fakes of the node plugin's two seams: the OS (a mount table, devices with content,
// the paths kubelet hands over) and the local datapath (volumes, targets of replicated volumes,
// and their attachments). They
// keep enough real state that the service's idempotency is tested against what a retry would
// really see.
#pragma once

#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "node/datapath_client.h"
#include "node/os.h"

namespace nbdcsi::node::testing {

struct FakeDevice {
  DeviceContent content;
  uint64_t size = 0;
  dev_t rdev = 0;
};

class FakeOs : public NodeOs {
 public:
  std::map<std::string, FakeDevice> devices;
  std::map<std::string, PathKind> paths;  // files and directories that exist
  std::vector<MountInfo> mounts;          // in mount order; the last one for a path is on top
  FsStats fs_stats;
  unsigned nbd_devices = 0;
  // Every effect, in order: "mount SRC TARGET TYPE OPTS", "umount T", "mkfs DEV TYPE",
  // "grow DEV MP TYPE", "mkdir P", "touch P", "rm P".
  std::vector<std::string> calls;
  // Paths whose resolution leaves the kubelet root (a symlink out of it, on the real system):
  // CheckBeneath refuses each of them and everything below them.
  std::vector<std::string> escapes;
  // Fail the next call of this kind ("mount", "mkfs", "grow", "umount") with this status.
  std::map<std::string, Status> fail_next;

  int Count(const std::string& prefix) const {
    int n = 0;
    for (const auto& c : calls) n += c.rfind(prefix, 0) == 0;
    return n;
  }

  void AddDevice(const std::string& dev, uint64_t size, dev_t rdev, DeviceContent content = {}) {
    devices[dev] = FakeDevice{content, size, rdev};
  }

  const MountInfo* Top(const std::string& path) const {
    for (auto it = mounts.rbegin(); it != mounts.rend(); ++it) {
      if (it->target == path) return &*it;
    }
    return nullptr;
  }

  StatusOr<std::vector<MountInfo>> ListMounts() override { return mounts; }

  StatusOr<std::optional<MountInfo>> GetMount(const std::string& path) override {
    if (const MountInfo* m = Top(path)) return std::optional<MountInfo>(*m);
    return std::optional<MountInfo>();
  }

  Status Mount(const std::string& source, const std::string& target, const std::string& fstype,
               const std::vector<std::string>& options) override {
    std::string opts;
    for (const auto& o : options) opts += (opts.empty() ? "" : ",") + o;
    calls.push_back("mount " + source + " " + target + " " + fstype + " " + opts);
    if (Status s = Injected("mount"); !s.ok()) return s;
    if (!paths.count(target)) {
      return Error(ENOENT, "mount on {}: no such file or directory", target);
    }
    bool ro = HasMountOption(opts, "ro");
    MountInfo m;
    m.target = target;
    m.vfs_read_only = ro;
    m.vfs_options = ro ? "ro" : "rw";
    if (HasMountOption(opts, "bind")) {
      if (devices.count(source)) {  // a device node bound onto a file
        if (paths[target] != PathKind::kFile) return Error(ENOTDIR, "bind device onto non-file");
        m.source = "udev";
        m.fstype = "devtmpfs";
        m.root = "/" + source.substr(source.rfind('/') + 1);
        bound_devices[target] = source;
      } else {
        const MountInfo* from = Top(source);
        if (from == nullptr) {
          return Error(EINVAL, "bind of {}: fake supports mount points only", source);
        }
        m.source = from->source;
        m.fstype = from->fstype;
        m.super_options = from->super_options;
        m.super_read_only = from->super_read_only;
        m.root = "/";
      }
    } else {
      auto d = devices.find(source);
      if (d == devices.end()) return Error(ENOENT, "mount {}: no such device", source);
      if (d->second.content.kind != DeviceContent::Kind::kFilesystem ||
          d->second.content.type != fstype) {
        return Error(EINVAL, "mount {}: wrong fs type", source);
      }
      m.source = source;
      m.fstype = fstype;
      m.root = "/";
      m.super_read_only = ro;
      m.super_options = ro ? "ro" : "rw";
    }
    mounts.push_back(m);
    return Status::Ok();
  }

  Status Unmount(const std::string& target) override {
    calls.push_back("umount " + target);
    if (Status s = Injected("umount"); !s.ok()) return s;
    for (auto it = mounts.rbegin(); it != mounts.rend(); ++it) {
      if (it->target == target) {
        mounts.erase(std::next(it).base());
        if (!Top(target)) bound_devices.erase(target);
        return Status::Ok();
      }
    }
    return Error(EINVAL, "unmount {}: not mounted", target);
  }

  StatusOr<DeviceContent> Probe(const std::string& device) override {
    auto d = devices.find(device);
    if (d == devices.end()) return Error(ENOENT, "probe {}: no such device", device);
    return d->second.content;
  }

  Status MakeFs(const std::string& device, const std::string& fstype) override {
    calls.push_back("mkfs " + device + " " + fstype);
    if (Status s = Injected("mkfs"); !s.ok()) return s;
    devices[device].content = {DeviceContent::Kind::kFilesystem, fstype, devices[device].size};
    return Status::Ok();
  }

  Status GrowFs(const std::string& device, const std::string& mount_point,
                const std::string& fstype) override {
    calls.push_back("grow " + device + " " + mount_point + " " + fstype);
    return Injected("grow");
  }

  StatusOr<FsStats> StatFs(const std::string& path) override { return fs_stats; }

  std::map<std::string, Status> unopenable;  // path -> what CheckOpenable says
  Status CheckOpenable(const std::string& path) override {
    auto it = unopenable.find(path);
    return it == unopenable.end() ? Status::Ok() : it->second;
  }

  StatusOr<uint64_t> DeviceSize(const std::string& device) override {
    std::string dev = bound_devices.count(device) ? bound_devices[device] : device;
    auto d = devices.find(dev);
    if (d == devices.end()) return Error(ENOENT, "open {}: no such device", device);
    return d->second.size;
  }

  std::map<std::string, Status> unstatable;  // path -> what Stat says
  StatusOr<PathInfo> Stat(const std::string& path) override {
    if (auto it = unstatable.find(path); it != unstatable.end()) return it->second;
    PathInfo info;
    std::string dev = bound_devices.count(path) ? bound_devices[path] : path;
    if (auto d = devices.find(dev); d != devices.end()) {
      info.kind = PathKind::kBlockDevice;
      info.rdev = d->second.rdev;
      return info;
    }
    if (auto p = paths.find(path); p != paths.end()) info.kind = p->second;
    return info;
  }

  Status CheckBeneath(const std::string& root, const std::string& path) override {
    for (const auto& e : escapes) {
      if (path == e || path.rfind(e + "/", 0) == 0) {
        return Error(EINVAL, "{} leaves {}: {} is a symlink out of it", path, root, e);
      }
    }
    return Status::Ok();
  }

  Status MakeDir(const std::string& path) override {
    calls.push_back("mkdir " + path);
    auto [it, inserted] = paths.emplace(path, PathKind::kDirectory);
    if (!inserted && it->second != PathKind::kDirectory) return Error(ENOTDIR, "mkdir {}", path);
    return Status::Ok();
  }

  Status MakeFile(const std::string& path) override {
    calls.push_back("touch " + path);
    auto [it, inserted] = paths.emplace(path, PathKind::kFile);
    if (!inserted && it->second != PathKind::kFile) return Error(EISDIR, "create {}", path);
    return Status::Ok();
  }

  Status RemovePath(const std::string& path) override {
    calls.push_back("rm " + path);
    if (Top(path)) return Error(EBUSY, "remove {}: mounted", path);
    paths.erase(path);
    return Status::Ok();
  }

  unsigned CountDevices(const std::string& prefix) override {
    return prefix == "nbd" ? nbd_devices : 0;
  }

  // Is `device` mounted anywhere (directly or bound onto a file)?
  bool InUse(const std::string& device) const {
    for (const auto& m : mounts) {
      if (m.source == device) return true;
    }
    for (const auto& [t, d] : bound_devices) {
      if (d == device) return true;
    }
    return false;
  }

  std::map<std::string, std::string> bound_devices;  // target file -> device node

 private:
  Status Injected(const std::string& op) {
    auto it = fail_next.find(op);
    if (it == fail_next.end()) return Status::Ok();
    Status s = it->second;
    fail_next.erase(it);
    return s;
  }
};

class FakeDatapath : public DatapathClient {
 public:
  struct Vol {
    uint64_t size = 0;
    bool attached = false;
    std::string device;  // the device it gets when attached
    bool link_ok = true;
    uint64_t read_errors = 0, write_errors = 0;
    std::string mode = "fuse";  // what the datapath reports: "kernel" or "fuse"
  };

  // A replicated volume in the cluster state, as this node's datapath sees it.
  struct Replicated {
    uint64_t size = 0;
    std::string device;  // the device its target's attachment gets
    std::string holder;  // another node's live claim: OpenTarget fails with EBUSY naming it
    bool open = false;   // its target is open on this datapath
    bool attached = false;
    uint64_t epoch = 0;
    std::vector<std::pair<std::string, std::string>> replicas;  // node, state ("in-sync", ...)
    std::vector<std::string> unreachable;                       // dropped at open
    bool stopped = false;
    std::string stop_reason;
    Status fail_attach;  // AttachTarget fails with it (after the checks) when set
    // What ControllerExpandVolume recorded in the cluster state: ResizeAttachment grows the
    // target and its device to it (TargetAccess::GrowTarget), or fails with fail_grow.
    uint64_t catalogue_size = 0;
    Status fail_grow;
  };

  explicit FakeDatapath(FakeOs& os) : os_(os) {}

  std::map<std::string, Vol> volumes;
  std::map<std::string, Replicated> replicated;
  // "attach V", "detach V", "resize V", "attach-target V", "open V", "close V"
  std::vector<std::string> calls;
  bool unreachable = false;
  bool cluster = true;  // false: a datapath without --cluster-etcd (every Targets call fails)
  // Set when a target was closed while its device was still attached: the real datapath would
  // leave the device on a closed target, which no test may ever see the node plugin do.
  bool closed_under_device = false;
  // Called inside Attach (outside the fake's own lock), to make it block for concurrency tests.
  std::function<void(const std::string&)> on_attach;

  // A volume of `size` bytes that attaches as `device` (registered with the fake OS, blank).
  void AddVolume(const std::string& name, uint64_t size, const std::string& device, dev_t rdev) {
    volumes[name] = Vol{size, false, device};
    os_.AddDevice(device, size, rdev);
  }

  // A replicated volume `name` whose target attaches as `device` (blank, registered with the
  // fake OS), with replicas node-a and node-b in sync.
  void AddReplicated(const std::string& name, uint64_t size, const std::string& device,
                     dev_t rdev) {
    Replicated r;
    r.size = size;
    r.device = device;
    r.replicas = {{"node-a", "in-sync"}, {"node-b", "in-sync"}};
    replicated[name] = r;
    os_.AddDevice(device, size, rdev);
  }

  StatusOr<dpv1::Attachment> Attach(const std::string& volume) override {
    if (on_attach) on_attach(volume);
    std::lock_guard lock(mu_);
    calls.push_back("attach " + volume);
    auto it = volumes.find(volume);
    if (it == volumes.end()) return Error(ENOENT, "volume {} not found", volume);
    if (auto r = replicated.find(volume); r != replicated.end() && r->second.attached) {
      return Error(EBUSY, "volume {} is already attached as its replicated target", volume);
    }
    it->second.attached = true;
    return Att(volume, it->second);
  }

  StatusOr<dpv1::Attachment> AttachTarget(const std::string& volume) override {
    std::lock_guard lock(mu_);
    calls.push_back("attach-target " + volume);
    if (!cluster) return Error(EBUSY, "the target of volume {} cannot be served", volume);
    auto it = replicated.find(volume);
    if (it == replicated.end() || !it->second.open) {
      return Error(ENOENT, "no target of volume {} is open on node-a", volume);
    }
    if (auto v = volumes.find(volume); v != volumes.end() && v->second.attached) {
      return Error(EBUSY, "volume {} is already attached as a local volume", volume);
    }
    if (!it->second.fail_attach.ok()) return it->second.fail_attach;
    it->second.attached = true;
    return TargetAtt(volume, it->second);
  }

  Status Detach(const std::string& volume) override {
    std::lock_guard lock(mu_);
    calls.push_back("detach " + volume);
    if (auto r = replicated.find(volume); r != replicated.end() && r->second.attached) {
      if (os_.InUse(r->second.device)) {
        return Error(EBUSY, "{} ({}) is mounted", volume, r->second.device);
      }
      r->second.attached = false;
      return Status::Ok();
    }
    auto it = volumes.find(volume);
    if (it == volumes.end() || !it->second.attached) return Status::Ok();
    if (os_.InUse(it->second.device)) {
      return Error(EBUSY, "{} ({}) is mounted", volume, it->second.device);
    }
    it->second.attached = false;
    return Status::Ok();
  }

  StatusOr<dpv1::Attachment> ResizeAttachment(const std::string& volume) override {
    std::lock_guard lock(mu_);
    calls.push_back("resize " + volume);
    if (auto r = replicated.find(volume); r != replicated.end() && r->second.attached) {
      if (!r->second.fail_grow.ok()) return r->second.fail_grow;
      r->second.size = std::max(r->second.size, r->second.catalogue_size);
      os_.devices[r->second.device].size = r->second.size;
      return TargetAtt(volume, r->second);
    }
    auto it = volumes.find(volume);
    if (it == volumes.end() || !it->second.attached) {
      return Error(ENOENT, "{} is not attached", volume);
    }
    os_.devices[it->second.device].size = it->second.size;
    return Att(volume, it->second);
  }

  StatusOr<std::vector<dpv1::Attachment>> ListAttachments() override {
    std::lock_guard lock(mu_);
    if (unreachable) return Error(EAGAIN, "datapath unavailable: connection refused");
    std::vector<dpv1::Attachment> out;
    for (const auto& [name, v] : volumes) {
      if (v.attached) out.push_back(Att(name, v));
    }
    for (const auto& [name, r] : replicated) {
      if (r.attached) out.push_back(TargetAtt(name, r));
    }
    return out;
  }

  StatusOr<dpv1::Volume> GetVolume(const std::string& volume) override {
    std::lock_guard lock(mu_);
    auto it = volumes.find(volume);
    if (it == volumes.end()) return Error(ENOENT, "volume {} not found", volume);
    dpv1::Volume v;
    v.set_name(volume);
    v.set_size_bytes(it->second.size);
    return v;
  }

  StatusOr<dpv1::VolumeStats> GetVolumeStats(const std::string& volume) override {
    std::lock_guard lock(mu_);
    if (unreachable) return Error(EAGAIN, "datapath unavailable: connection refused");
    auto it = volumes.find(volume);
    if (it == volumes.end()) return Error(ENOENT, "volume {} not found", volume);
    dpv1::VolumeStats s;
    s.mutable_read()->set_errors(it->second.read_errors);
    s.mutable_write()->set_errors(it->second.write_errors);
    return s;
  }

  StatusOr<dpv1::GetPoolInfoResponse> GetPoolInfo() override {
    if (unreachable) return Error(EAGAIN, "datapath unavailable: connection refused");
    return dpv1::GetPoolInfoResponse();
  }

  StatusOr<dpv1::Target> OpenTarget(const std::string& volume) override {
    std::lock_guard lock(mu_);
    calls.push_back("open " + volume);
    if (!cluster) return NoCluster();
    auto it = replicated.find(volume);
    if (it == replicated.end()) {
      return Error(ENOENT, "volume {} is not in the cluster state", volume);
    }
    Replicated& r = it->second;
    if (!r.holder.empty()) {
      return Error(EBUSY,
                   "claim target of volume {} for node node-a: node {} is its target at "
                   "epoch {}",
                   volume, r.holder, r.epoch);
    }
    if (!r.open) {
      r.open = true;
      ++r.epoch;
    }
    return Tgt(volume, r);
  }

  Status CloseTarget(const std::string& volume) override {
    std::lock_guard lock(mu_);
    calls.push_back("close " + volume);
    if (!cluster) return NoCluster();
    auto it = replicated.find(volume);
    if (it == replicated.end() || !it->second.open) {
      return Error(ENOENT, "no target of volume {} is open on node node-a", volume);
    }
    if (it->second.attached) closed_under_device = true;
    it->second.open = false;
    return Status::Ok();
  }

  StatusOr<dpv1::Target> GetTarget(const std::string& volume) override {
    std::lock_guard lock(mu_);
    if (unreachable) return Error(EAGAIN, "datapath unavailable: connection refused");
    if (!cluster) return NoCluster();
    auto it = replicated.find(volume);
    if (it == replicated.end() || !it->second.open) {
      return Error(ENOENT, "no target of volume {} is open on node node-a", volume);
    }
    return Tgt(volume, it->second);
  }

 private:
  static Status NoCluster() {
    return Error(EBUSY,
                 "this nbd-datapathd runs without a cluster (--cluster-etcd): it serves "
                 "no replicated volumes");
  }

  static dpv1::Attachment TargetAtt(const std::string& name, const Replicated& r) {
    dpv1::Attachment a;
    a.set_volume(name);
    a.set_device(r.device);
    a.set_size(r.size);
    a.set_mode("kernel");
    a.set_link_ok(true);
    a.set_target(true);
    return a;
  }

  static dpv1::Target Tgt(const std::string& name, const Replicated& r) {
    dpv1::Target t;
    t.set_volume(name);
    t.set_export_name(name + "@target");
    t.set_epoch(r.epoch);
    t.set_size_bytes(r.size);
    bool degraded = false;
    for (const auto& [node, state] : r.replicas) {
      auto* m = t.add_replicas();
      m->set_node(node);
      m->set_state(state);
      if (state != "in-sync") {
        degraded = true;
        m->set_why("connection reset by peer");
      }
    }
    for (const auto& u : r.unreachable) t.add_unreachable(u);
    t.set_degraded(degraded);
    t.set_stopped(r.stopped);
    t.set_stop_reason(r.stop_reason);
    t.set_node("node-a");
    return t;
  }

  static dpv1::Attachment Att(const std::string& name, const Vol& v) {
    dpv1::Attachment a;
    a.set_volume(name);
    a.set_device(v.device);
    a.set_size(v.size);
    a.set_mode(v.mode);
    a.set_link_ok(v.link_ok);
    if (!v.link_ok) a.set_link_error("nbdfuse exited");
    return a;
  }

  FakeOs& os_;
  std::mutex mu_;
};

}  // namespace nbdcsi::node::testing
