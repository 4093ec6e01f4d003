#include "node/metrics.h"

#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <chrono>
#include <utility>

namespace nbdcsi::node {
namespace {

// From a mount (milliseconds) to a mkfs.xfs or an attach through nbdfuse
// (seconds).
const prometheus::Histogram::BucketBoundaries& Buckets() {
  static const prometheus::Histogram::BucketBoundaries b = {
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
  return b;
}

bool Ok(const Status& s) { return s.ok(); }
template <typename T>
bool Ok(const StatusOr<T>& s) {
  return s.ok();
}

// Runs `f` and records how long it took under `op`.
template <typename F>
auto Timed(NodeMetrics& m, const char* op, F&& f) {
  const auto start = std::chrono::steady_clock::now();
  auto result = f();
  m.Observe(op, Ok(result),
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return result;
}

class MeasuredNodeOs final : public NodeOs {
 public:
  MeasuredNodeOs(NodeOs& inner, NodeMetrics& m) : in_(inner), m_(m) {}

  Status Mount(const std::string& source, const std::string& target, const std::string& fstype,
               const std::vector<std::string>& options) override {
    return Timed(m_, "mount", [&] { return in_.Mount(source, target, fstype, options); });
  }
  Status Unmount(const std::string& target) override {
    return Timed(m_, "unmount", [&] { return in_.Unmount(target); });
  }
  Status MakeFs(const std::string& device, const std::string& fstype) override {
    return Timed(m_, "mkfs", [&] { return in_.MakeFs(device, fstype); });
  }
  Status GrowFs(const std::string& device, const std::string& mount_point,
                const std::string& fstype) override {
    return Timed(m_, "grow_fs", [&] { return in_.GrowFs(device, mount_point, fstype); });
  }

  StatusOr<std::optional<MountInfo>> GetMount(const std::string& path) override {
    return in_.GetMount(path);
  }
  StatusOr<std::vector<MountInfo>> ListMounts() override { return in_.ListMounts(); }
  StatusOr<DeviceContent> Probe(const std::string& device) override { return in_.Probe(device); }
  StatusOr<FsStats> StatFs(const std::string& path) override { return in_.StatFs(path); }
  Status CheckOpenable(const std::string& path) override { return in_.CheckOpenable(path); }
  StatusOr<uint64_t> DeviceSize(const std::string& device) override {
    return in_.DeviceSize(device);
  }
  StatusOr<PathInfo> Stat(const std::string& path) override { return in_.Stat(path); }
  Status CheckBeneath(const std::string& root, const std::string& path) override {
    return in_.CheckBeneath(root, path);
  }
  Status MakeDir(const std::string& path) override { return in_.MakeDir(path); }
  Status MakeFile(const std::string& path) override { return in_.MakeFile(path); }
  Status RemovePath(const std::string& path) override { return in_.RemovePath(path); }
  unsigned CountDevices(const std::string& prefix) override { return in_.CountDevices(prefix); }

 private:
  NodeOs& in_;
  NodeMetrics& m_;
};

class MeasuredDatapathClient final : public DatapathClient {
 public:
  MeasuredDatapathClient(DatapathClient& inner, NodeMetrics& m) : in_(inner), m_(m) {}

  StatusOr<dpv1::Attachment> Attach(const std::string& volume) override {
    return Timed(m_, "attach", [&] { return in_.Attach(volume); });
  }
  Status Detach(const std::string& volume) override {
    return Timed(m_, "detach", [&] { return in_.Detach(volume); });
  }
  StatusOr<dpv1::Attachment> ResizeAttachment(const std::string& volume) override {
    return Timed(m_, "resize_attachment", [&] { return in_.ResizeAttachment(volume); });
  }
  StatusOr<dpv1::Attachment> AttachTarget(const std::string& volume) override {
    return Timed(m_, "attach_target", [&] { return in_.AttachTarget(volume); });
  }
  // Opening connects to every replica and claims the volume in etcd: the slow part of staging a
  // replicated volume, and the one a dead replica's handshake timeout stretches.
  StatusOr<dpv1::Target> OpenTarget(const std::string& volume) override {
    return Timed(m_, "open_target", [&] { return in_.OpenTarget(volume); });
  }
  Status CloseTarget(const std::string& volume) override {
    return Timed(m_, "close_target", [&] { return in_.CloseTarget(volume); });
  }
  StatusOr<dpv1::Target> GetTarget(const std::string& volume) override {
    return in_.GetTarget(volume);
  }

  StatusOr<std::vector<dpv1::Attachment>> ListAttachments() override {
    return in_.ListAttachments();
  }
  StatusOr<dpv1::Volume> GetVolume(const std::string& volume) override {
    return in_.GetVolume(volume);
  }
  StatusOr<dpv1::VolumeStats> GetVolumeStats(const std::string& volume) override {
    return in_.GetVolumeStats(volume);
  }
  StatusOr<dpv1::GetPoolInfoResponse> GetPoolInfo() override { return in_.GetPoolInfo(); }

 private:
  DatapathClient& in_;
  NodeMetrics& m_;
};

}  // namespace

NodeMetrics::NodeMetrics(const std::string& version)
    : registry_(std::make_shared<prometheus::Registry>()),
      rpc_(std::make_unique<GrpcServerMetrics>(*registry_, "nbdcsi_csi")) {
  ops_ = &prometheus::BuildHistogram()
              .Name("nbdcsi_node_operation_duration_seconds")
              .Help(
                  "Steps of stage, publish and expand: datapath attach, detach, "
                  "resize_attachment, attach_target, open_target and close_target; mkfs, "
                  "grow_fs, mount and unmount; by result")
              .Register(*registry_);
  rpc_->Declare("csi.v1.Identity");
  rpc_->Declare("csi.v1.Node");
  // Every series from the start, at 0 (see GrpcServerMetrics::Declare).
  for (const char* op : {"attach", "detach", "resize_attachment", "attach_target", "open_target",
                         "close_target", "mkfs", "grow_fs", "mount", "unmount"}) {
    for (bool ok : {true, false}) Series(op, ok);
  }
  prometheus::BuildGauge()
      .Name("nbdcsi_node_build_info")
      .Help("The running version, as a label")
      .Register(*registry_)
      .Add({{"version", version}})
      .Set(1);
}

NodeMetrics::~NodeMetrics() = default;

std::vector<std::shared_ptr<prometheus::Collectable>> NodeMetrics::Collectables() const {
  return {registry_};
}

prometheus::Histogram& NodeMetrics::Series(const char* operation, bool ok) {
  return ops_->Add({{"operation", operation}, {"result", ok ? "ok" : "error"}}, Buckets());
}

void NodeMetrics::Observe(const char* operation, bool ok, double seconds) {
  Series(operation, ok).Observe(seconds);
}

std::unique_ptr<NodeOs> MeasuredOs(NodeOs& inner, NodeMetrics& m) {
  return std::make_unique<MeasuredNodeOs>(inner, m);
}

std::unique_ptr<DatapathClient> MeasuredDatapath(DatapathClient& inner, NodeMetrics& m) {
  return std::make_unique<MeasuredDatapathClient>(inner, m);
}

}  // namespace nbdcsi::node
