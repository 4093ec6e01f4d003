#include "controller/csi_response.h"

#include <cerrno>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "csi/driver.h"
#include "csi/ids.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;
namespace dp = ::nbdcsi::datapath::v1;

namespace {

std::string IdOrEmpty(const StatusOr<std::string>& id, const char* kind, const std::string& node,
                      const std::string& name) {
  if (id.ok()) return id.value();
  spdlog::error("{} id for node {} {} {}: {}", kind, node, kind, name, id.status().message());
  return "";
}

}  // namespace

std::string VolumeIdOf(const std::string& node, const std::string& name) {
  return IdOrEmpty(csi::FormatVolumeId(node, name), "volume", node, name);
}

std::string SnapshotIdOf(const std::string& node, const std::string& name) {
  return IdOrEmpty(csi::FormatSnapshotId(node, name), "snapshot", node, name);
}

void SetTopology(const std::string& node, v1::Volume* vol) {
  (*vol->add_accessible_topology()->mutable_segments())[csi::kTopologyKey] = node;
}

void FillVolume(const std::string& node, const dp::Volume& dv, v1::Volume* out) {
  out->set_volume_id(VolumeIdOf(node, dv.name()));
  out->set_capacity_bytes(static_cast<int64_t>(dv.size_bytes()));
  SetTopology(node, out);
  const std::string& src = dv.source();
  if (src.rfind("snapshot/", 0) == 0) {
    out->mutable_content_source()->mutable_snapshot()->set_snapshot_id(
        SnapshotIdOf(node, src.substr(9)));
  } else if (src.rfind("volume/", 0) == 0) {
    out->mutable_content_source()->mutable_volume()->set_volume_id(VolumeIdOf(node, src.substr(7)));
  }
}

void FillSnapshot(const std::string& node, const dp::Snapshot& ds, v1::Snapshot* out) {
  out->set_snapshot_id(SnapshotIdOf(node, ds.name()));
  out->set_source_volume_id(VolumeIdOf(node, ds.source_volume()));
  out->set_size_bytes(static_cast<int64_t>(ds.size_bytes()));
  out->mutable_creation_time()->set_seconds(ds.created_unix_ns() / 1000000000);
  out->mutable_creation_time()->set_nanos(static_cast<int32_t>(ds.created_unix_ns() % 1000000000));
  out->set_ready_to_use(ds.ready());
}

void FillCondition(const dp::Volume& dv, v1::VolumeCondition* c) {
  if (!dv.ready()) {
    c->set_abnormal(true);
    c->set_message(fmt::format("content is still being copied from {} ({} of {} bytes)",
                               dv.source(), dv.copy_done_bytes(), dv.copy_total_bytes()));
  } else {
    c->set_abnormal(false);
    c->set_message("volume is healthy");
  }
}

std::string NodeDownMessage(const std::string& node, const Status& why,
                            const std::string& fallback) {
  switch (why.code()) {
    case EAGAIN:
    case ETIMEDOUT:
    case ENODEV:
    case ECONNREFUSED:
      return fmt::format("node {} unreachable: {}", node, why.message());
    default:
      return fallback + why.message();
  }
}

}  // namespace nbdcsi::controller
