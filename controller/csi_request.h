// The parts of CSI Controller requests, checked and turned into what the datapaths take: ids,
// volume capabilities, StorageClass / VolumeAttributesClass parameters, topology segments and
// capacity ranges. Pure functions; errors are EINVAL unless said otherwise.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <google/protobuf/map.h>
#include <google/protobuf/repeated_ptr_field.h>

#include "common/status.h"
#include "csi/csi.pb.h"
#include "csi/ids.h"
#include "csi/params.h"
#include "datapath/api/datapath.pb.h"

namespace nbdcsi::controller {

// The volume or snapshot an id names. ENOENT (NOT_FOUND) for an id that is not one of ours: it
// names nothing, so "does not exist" is the truth. NamedVolume is for single-node volumes: an r1
// id (a replicated volume, controller/replicated.h) is EINVAL, naming what is not supported. `what`
// starts the message ("volume", "source volume", ...).
StatusOr<csi::VolumeRef> NamedVolume(const std::string& id, std::string_view what = "volume");
StatusOr<csi::SnapshotRef> NamedSnapshot(const std::string& id, std::string_view what = "snapshot");

// Why `cap` cannot be served, or "" when it can. A volume lives on one node's pool and is
// attached on that node only, so every MULTI_NODE mode is refused.
std::string UnsupportedCapability(const ::csi::v1::VolumeCapability& cap);
// EINVAL when `caps` is empty or one of them cannot be served.
Status CheckCapabilities(
    const google::protobuf::RepeatedPtrField<::csi::v1::VolumeCapability>& caps);

// StorageClass parameters (CreateVolume, GetCapacity, ValidateVolumeCapabilities): the QoS keys
// and replicas. EINVAL names "parameters" and the bad key or value.
StatusOr<csi::StorageClassParameters> ParseStorageClass(
    const google::protobuf::Map<std::string, std::string>& params);
// VolumeAttributesClass parameters (QoS keys, a schedule); EINVAL names `field` and the bad key
// or value.
StatusOr<csi::AttributesClassParameters> ParseAttributes(
    const google::protobuf::Map<std::string, std::string>& params, std::string_view field);
// StorageClass parameters, then the VolumeAttributesClass's on top (they are the newer word).
::nbdcsi::datapath::v1::QosLimits QosLimitsOf(const csi::QosParameters& storage_class,
                                              const csi::QosParameters& attributes_class);
// Only the keys given change; a key set to 0 removes that limit.
::nbdcsi::datapath::v1::QosPatch QosPatchOf(const csi::QosParameters& q);
// Every field set to `l`'s (0 removes that limit): a volume gets exactly these limits.
::nbdcsi::datapath::v1::QosPatch QosPatchOf(const ::nbdcsi::datapath::v1::QosLimits& l);

// The node a Topology names (its only key is csi::kTopologyKey).
StatusOr<std::string> NodeOfTopology(const ::csi::v1::Topology& t);

// The size CreateVolume provisions for `range` (null: none given): required_bytes rounded up to
// kVolumeSizeAlignment, or `dflt` when nothing is required, never below `min_size` (a content
// source's size), within limit_bytes (rounding down to it when only the default overshoots).
// EINVAL: negative bytes or limit < required; ERANGE (OUT_OF_RANGE): no aligned size fits.
StatusOr<uint64_t> VolumeSizeFor(const ::csi::v1::CapacityRange* range, uint64_t dflt,
                                 uint64_t min_size);
// `v` rounded down to kVolumeSizeAlignment: the largest volume that fits in v bytes.
uint64_t RoundDownToAlignment(uint64_t v);

}  // namespace nbdcsi::controller
