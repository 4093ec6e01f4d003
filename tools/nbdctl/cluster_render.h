// Pure helpers of `nbdctl cluster`: tables and JSON of the controller's ClusterView answers
// (datapath/api/cluster_view.proto). Unit-tested without a server; README.md lists the keys.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "datapath/api/cluster_view.pb.h"

namespace nbdcsi::nbdctl {

namespace cv1 = ::nbdcsi::datapath::v1;

// {heartbeat_ttl_ms, nodes: [{node, address, live, heartbeat_age_ms, capacity_bytes,
// free_bytes, provisionable_bytes, provisioned_bytes, volumes, version, nbd_devices, reflink}]}
nlohmann::json ClusterNodesJson(const cv1::ListClusterNodesResponse& r);
std::string ClusterNodesTable(const cv1::ListClusterNodesResponse& r);

// {volumes: [volume keys of `volume get` + node, volume_id, attached, condition: {abnormal,
// message}, replica_of (null or the r1 id)], replicated: [{volume_id, name, size_bytes,
// replicas, in_sync, target (null when none), epoch, condition}], nodes: [{node, live, error
// (null when it answered)}], catalogue_error (null or why)}
nlohmann::json ClusterVolumesJson(const cv1::ListClusterVolumesResponse& r);
std::string ClusterVolumesTable(const cv1::ListClusterVolumesResponse& r);

// {snapshots: [snapshot keys of `snapshot get` + node, snapshot_id, source_volume_id], nodes}
nlohmann::json ClusterSnapshotsJson(const cv1::ListClusterSnapshotsResponse& r);
std::string ClusterSnapshotsTable(const cv1::ListClusterSnapshotsResponse& r);

}  // namespace nbdcsi::nbdctl
