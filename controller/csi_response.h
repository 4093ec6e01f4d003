// What the controller answers: CSI volumes and snapshots made from what a node's datapath
// reported, with ids that route every later call back to that node (csi/ids.h).
#pragma once

#include <string>

#include "common/status.h"
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
// The condition message of a volume whose node failed a call with `why`: "node N unreachable:
// <cause>" when the node could not be reached or did not answer in time (EAGAIN, ETIMEDOUT,
// ENODEV, ECONNREFUSED), `fallback` followed by the cause otherwise (the node answered, with an
// error).
std::string NodeDownMessage(const std::string& node, const Status& why,
                            const std::string& fallback = "");

}  // namespace nbdcsi::controller
