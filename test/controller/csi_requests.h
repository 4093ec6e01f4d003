// CSI Controller requests as the tests write them, shared by the in-process unit tests and the
// suites that drive a real controller (cluster.h).
#pragma once

#include <cstdint>
#include <string>

#include "csi/csi.pb.h"

namespace nbdcsi::test {

::csi::v1::VolumeCapability MountCap(
    ::csi::v1::VolumeCapability::AccessMode::Mode mode =
        ::csi::v1::VolumeCapability::AccessMode::SINGLE_NODE_WRITER,
    const std::string& fs = "ext4");
::csi::v1::VolumeCapability BlockCap(
    ::csi::v1::VolumeCapability::AccessMode::Mode mode =
        ::csi::v1::VolumeCapability::AccessMode::SINGLE_NODE_WRITER);
// `name` with a mount capability; required_bytes = `bytes` when positive (no range otherwise).
::csi::v1::CreateVolumeRequest VolumeRequest(const std::string& name, int64_t bytes);
::csi::v1::Topology NodeTopology(const std::string& node);
std::string NodeOf(const ::csi::v1::Volume& v);  // from accessible_topology, "" if none

}  // namespace nbdcsi::test
