// What the controller answers: CSI volumes and snapshots made from what a node's datapath
// reported, with ids that route every later call back to that node (csi/ids.h).
#pragma once

#include <string>

#include "csi/csi.pb.h"
#include "datapath/api/datapath.pb.h"

namespace nbdcsi::controller {

// Ids from a registered node (the registry validated it) and a pool name (the pool validated it):
// formatting cannot fail short of a bug, and then an empty id shows up (logged) instead of a crash.
std::string VolumeIdOf(const std::string& node, const std::string& name);
std::string SnapshotIdOf(const std::string& node, const std::string& name);

// The volume is reachable from `node` only.
void SetTopology(const std::string& node, ::csi::v1::Volume* vol);

// Id, size, topology and content source (the datapath's "snapshot/NAME" or "volume/NAME").
void FillVolume(const std::string& node, const ::nbdcsi::datapath::v1::Volume& dv,
                ::csi::v1::Volume* out);
void FillSnapshot(const std::string& node, const ::nbdcsi::datapath::v1::Snapshot& ds,
                  ::csi::v1::Snapshot* out);
// Abnormal while a restore or clone is still being filled (with its progress), healthy otherwise.
void FillCondition(const ::nbdcsi::datapath::v1::Volume& dv, ::csi::v1::VolumeCondition* c);

}  // namespace nbdcsi::controller
