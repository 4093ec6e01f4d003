#include "controller/csi_request.h"

#include <algorithm>
#include <map>
#include <set>

#include <fmt/format.h>

#include "common/qos_fields.h"
#include "common/volume_rules.h"
#include "controller/csi_status.h"
#include "csi/driver.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

StatusOr<csi::VolumeRef> NamedVolume(const std::string& id, std::string_view what) {
  if (csi::IsReplicatedVolumeId(id)) {
    return Err(EINVAL,
               "{} \"{}\" is a replicated volume: clones of replicated volumes are not "
               "supported yet (take a snapshot of it and restore that)",
               what, id);
  }
  auto r = csi::ParseVolumeId(id);
  if (!r.ok()) return Err(ENOENT, "{} \"{}\" does not exist: {}", what, id, r.status().message());
  return r;
}

StatusOr<csi::SnapshotRef> NamedSnapshot(const std::string& id, std::string_view what) {
  auto r = csi::ParseSnapshotId(id);
  if (!r.ok()) return Err(ENOENT, "{} \"{}\" does not exist: {}", what, id, r.status().message());
  return r;
}

std::string UnsupportedCapability(const v1::VolumeCapability& cap) {
  if (cap.access_type_case() == v1::VolumeCapability::ACCESS_TYPE_NOT_SET) {
    return "volume capability has neither block nor mount access type";
  }
  if (cap.has_mount()) {
    const std::string& fs = cap.mount().fs_type();
    if (!fs.empty() && !csi::IsSupportedFileSystem(fs)) {
      return fmt::format("fs_type \"{}\" is not supported ({})", fs, csi::kFileSystemList);
    }
  }
  if (!cap.has_access_mode()) return "volume capability has no access mode";
  using M = v1::VolumeCapability::AccessMode;
  switch (cap.access_mode().mode()) {
    case M::SINGLE_NODE_WRITER:
    case M::SINGLE_NODE_READER_ONLY:
    case M::SINGLE_NODE_SINGLE_WRITER:
    case M::SINGLE_NODE_MULTI_WRITER:
      return "";
    case M::MULTI_NODE_READER_ONLY:
    case M::MULTI_NODE_SINGLE_WRITER:
    case M::MULTI_NODE_MULTI_WRITER:
      return fmt::format(
          "access mode {} is not supported: a volume lives on one node's disk and is attached on "
          "that node only",
          M::Mode_Name(cap.access_mode().mode()));
    default:
      return fmt::format("access mode {} is not supported", M::Mode_Name(cap.access_mode().mode()));
  }
}

Status CheckCapabilities(const google::protobuf::RepeatedPtrField<v1::VolumeCapability>& caps) {
  if (caps.empty()) return Err(EINVAL, "volume_capabilities is required");
  for (const auto& cap : caps) {
    std::string why = UnsupportedCapability(cap);
    if (!why.empty()) return CallError(EINVAL, why);
  }
  return Status::Ok();
}

StatusOr<csi::StorageClassParameters> ParseStorageClass(
    const google::protobuf::Map<std::string, std::string>& params) {
  std::map<std::string, std::string> m(params.begin(), params.end());
  auto p = csi::ParseStorageClassParameters(m);
  if (!p.ok()) return Err(EINVAL, "parameters: {}", p.status().message());
  return p;
}

StatusOr<csi::AttributesClassParameters> ParseAttributes(
    const google::protobuf::Map<std::string, std::string>& params, std::string_view field) {
  std::map<std::string, std::string> m(params.begin(), params.end());
  auto q = csi::ParseAttributesClassParameters(m);
  if (!q.ok()) return Err(EINVAL, "{}: {}", field, q.status().message());
  return q;
}

namespace {

// QosLimits and QosPatch spell their fields alike; only the keys given are set.
template <typename M>
void SetGivenQos(const csi::QosParameters& q, M* m) {
#define NBDCSI_QOS_SET(f, key, flag, kind, help) \
  if (q.f) m->set_##f(*q.f);
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_SET)
#undef NBDCSI_QOS_SET
}

uint64_t RoundUp(uint64_t v) {
  return (v + kVolumeSizeAlignment - 1) / kVolumeSizeAlignment * kVolumeSizeAlignment;
}

}  // namespace

::nbdcsi::datapath::v1::QosLimits QosLimitsOf(const csi::QosParameters& storage_class,
                                              const csi::QosParameters& attributes_class) {
  ::nbdcsi::datapath::v1::QosLimits l;
  SetGivenQos(storage_class, &l);
  SetGivenQos(attributes_class, &l);
  return l;
}

::nbdcsi::datapath::v1::QosPatch QosPatchOf(const csi::QosParameters& q) {
  ::nbdcsi::datapath::v1::QosPatch p;
  SetGivenQos(q, &p);
  return p;
}

::nbdcsi::datapath::v1::QosPatch QosPatchOf(const ::nbdcsi::datapath::v1::QosLimits& l) {
  ::nbdcsi::datapath::v1::QosPatch p;
#define NBDCSI_QOS_SET_ALL(f, key, flag, kind, help) p.set_##f(l.f());
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_SET_ALL)
#undef NBDCSI_QOS_SET_ALL
  return p;
}

StatusOr<std::string> NodeOfTopology(const v1::Topology& t) {
  std::string node;
  for (const auto& [k, v] : t.segments()) {
    if (k != csi::kTopologyKey) {
      return Err(EINVAL, "topology key \"{}\" is not known (only {})", k, csi::kTopologyKey);
    }
    node = v;
  }
  if (node.empty()) return Err(EINVAL, "topology segment without {}", csi::kTopologyKey);
  return node;
}

uint64_t RoundDownToAlignment(uint64_t v) {
  return v / kVolumeSizeAlignment * kVolumeSizeAlignment;
}

StatusOr<uint64_t> VolumeSizeFor(const v1::CapacityRange* range, uint64_t dflt, uint64_t min_size) {
  int64_t req = range ? range->required_bytes() : 0;
  int64_t lim = range ? range->limit_bytes() : 0;
  if (req < 0 || lim < 0) {
    return Error(EINVAL, "capacity_range: negative bytes (required {}, limit {})", req, lim);
  }
  if (lim > 0 && lim < req) {
    return Error(EINVAL, "capacity_range: limit_bytes {} is below required_bytes {}", lim, req);
  }
  uint64_t floor = std::max<uint64_t>(static_cast<uint64_t>(req), RoundUp(min_size));
  uint64_t want = req > 0 ? RoundUp(static_cast<uint64_t>(req)) : RoundUp(dflt);
  want = std::max(want, RoundUp(min_size));
  if (lim > 0 && want > static_cast<uint64_t>(lim)) {
    uint64_t down = RoundDownToAlignment(static_cast<uint64_t>(lim));
    if (down == 0 || down < floor) {
      return Error(ERANGE, "capacity_range [{}, {}] (source size {}) holds no multiple of {} bytes",
                   req, lim, min_size, kVolumeSizeAlignment);
    }
    want = down;
  }
  return want;
}

}  // namespace nbdcsi::controller
