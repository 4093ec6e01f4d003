#include "test/controller/csi_requests.h"

#include "csi/driver.h"

namespace nbdcsi::test {

namespace v1 = ::csi::v1;

v1::VolumeCapability MountCap(v1::VolumeCapability::AccessMode::Mode mode, const std::string& fs) {
  v1::VolumeCapability c;
  c.mutable_mount()->set_fs_type(fs);
  c.mutable_access_mode()->set_mode(mode);
  return c;
}

v1::VolumeCapability BlockCap(v1::VolumeCapability::AccessMode::Mode mode) {
  v1::VolumeCapability c;
  c.mutable_block();
  c.mutable_access_mode()->set_mode(mode);
  return c;
}

v1::CreateVolumeRequest VolumeRequest(const std::string& name, int64_t bytes) {
  v1::CreateVolumeRequest r;
  r.set_name(name);
  if (bytes > 0) r.mutable_capacity_range()->set_required_bytes(bytes);
  *r.add_volume_capabilities() = MountCap();
  return r;
}

v1::Topology NodeTopology(const std::string& node) {
  v1::Topology t;
  (*t.mutable_segments())[csi::kTopologyKey] = node;
  return t;
}

std::string NodeOf(const v1::Volume& v) {
  if (v.accessible_topology().empty()) return "";
  auto it = v.accessible_topology(0).segments().find(csi::kTopologyKey);
  return it == v.accessible_topology(0).segments().end() ? "" : it->second;
}

}  // namespace nbdcsi::test
