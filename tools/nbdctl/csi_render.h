// `nbdctl csi` output: what each CSI answer looks like as a table for people and as JSON with
// stable keys for scripts (README.md lists them). Pure functions over the CSI messages, like
// render.h for the datapath's, so they need no plugin to be checked.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "csi/csi.pb.h"

namespace nbdcsi::nbdctl {

namespace csi_v1 = ::csi::v1;

// One answer in both forms; -o picks one.
struct Output {
  nlohmann::json json;
  std::string text;
};

// "single-node-writer" for SINGLE_NODE_WRITER: every access mode the proto knows, in its order.
std::vector<std::string> AccessModeNames();

Output PluginInfoOutput(const csi_v1::GetPluginInfoResponse& r);
Output ProbeOutput(bool ready);
// Capability names as the spec spells them (an RPC type this build does not know prints as its
// number); identity's volume expansion shows as VOLUME_EXPANSION_ONLINE / _OFFLINE.
std::vector<std::string> CapabilityNames(const csi_v1::GetPluginCapabilitiesResponse& r);
std::vector<std::string> CapabilityNames(const csi_v1::ControllerGetCapabilitiesResponse& r);
std::vector<std::string> CapabilityNames(const csi_v1::NodeGetCapabilitiesResponse& r);
Output CapabilitiesOutput(const std::vector<std::string>& names);

Output CreatedVolumeOutput(const csi_v1::Volume& v);
Output VolumeListOutput(const csi_v1::ListVolumesResponse& r);
Output GetVolumeOutput(const csi_v1::ControllerGetVolumeResponse& r);
Output ControllerExpandOutput(const std::string& id,
                              const csi_v1::ControllerExpandVolumeResponse& r);
Output SnapshotOutput(const csi_v1::Snapshot& s);
Output SnapshotListOutput(const csi_v1::ListSnapshotsResponse& r);
Output CapacityOutput(const csi_v1::GetCapacityResponse& r);
Output NodeInfoOutput(const csi_v1::NodeGetInfoResponse& r);
Output NodeExpandOutput(const std::string& id, const csi_v1::NodeExpandVolumeResponse& r);
Output NodeStatsOutput(const std::string& id, const csi_v1::NodeGetVolumeStatsResponse& r);

}  // namespace nbdcsi::nbdctl
