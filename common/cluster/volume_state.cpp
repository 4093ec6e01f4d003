#include "common/cluster/volume_state.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "common/json_field.h"
#include "common/node_id.h"
#include "common/volume_rules.h"

namespace nbdcsi::cluster {

namespace {

using nlohmann::json;

bool IsSortedUnique(const std::vector<std::string>& ids) {
  return std::adjacent_find(ids.begin(), ids.end(),
                            [](const auto& a, const auto& b) { return a >= b; }) == ids.end();
}

Status ValidateNodeList(const VolumeState& v, const char* field,
                        const std::vector<std::string>& ids) {
  for (const std::string& id : ids) {
    if (Status s = ValidateNodeId(id); !s.ok()) {
      return Error(EINVAL, "volume {}: {}: {}", v.name, field, s.message());
    }
  }
  if (!IsSortedUnique(ids)) {
    return Error(EINVAL, "volume {}: {} must be sorted and without duplicates", v.name, field);
  }
  return Status::Ok();
}

StatusOr<json> Parse(std::string_view text, std::string_view where) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Error(EINVAL, "{}: not valid JSON", where);
  return j;
}

}  // namespace

Status ValidateClusterVolumeName(std::string_view name) {
  return ValidateObjectName("volume", name);
}

Status ValidateVolumeState(const VolumeState& v) {
  if (Status s = ValidateClusterVolumeName(v.name); !s.ok()) return s;
  if (Status s = ValidateNodeList(v, "replicas", v.replicas); !s.ok()) return s;
  if (Status s = ValidateNodeList(v, "in_sync", v.in_sync); !s.ok()) return s;
  for (const std::string& id : v.in_sync) {
    if (!std::binary_search(v.replicas.begin(), v.replicas.end(), id)) {
      return Error(EINVAL, "volume {}: in-sync node {} is not a replica", v.name, id);
    }
  }
  if (!v.target.empty()) {
    if (Status s = ValidateNodeId(v.target); !s.ok()) {
      return Error(EINVAL, "volume {}: target: {}", v.name, s.message());
    }
  }
  return Status::Ok();
}

std::vector<std::string> SortedUnique(std::vector<std::string> ids) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

std::string EncodeVolumeState(const VolumeState& v) {
  // nlohmann::json keeps object keys sorted, so the bytes are canonical.
  json j = {{"name", v.name},       {"size_bytes", v.size_bytes}, {"replicas", v.replicas},
            {"in_sync", v.in_sync}, {"target", v.target},         {"epoch", v.epoch}};
  // Only when set, so that a cleanly released volume's bytes are what they were before the key.
  if (v.dirty) j["dirty"] = true;
  if (!v.source.empty()) j["source"] = v.source;
  return j.dump();
}

StatusOr<VolumeState> DecodeVolumeState(std::string_view text, std::string_view where) {
  auto j = Parse(text, where);
  if (!j.ok()) return j.status();
  // "dirty" and "source" are optional (absent: false and "", so states written before they
  // existed read as clean and blank); every other key is required.
  nlohmann::json required = *j;
  if (required.is_object()) {
    required.erase("dirty");
    required.erase("source");
  }
  if (Status s = json_field::CheckKeys(required, where,
                                       {"name", "size_bytes", "replicas", "in_sync", "target",
                                        "epoch"});
      !s.ok()) {
    return s;
  }
  VolumeState v;
  Status s = json_field::Read(*j, where, "name", v.name);
  if (s.ok()) s = json_field::Read(*j, where, "size_bytes", v.size_bytes);
  if (s.ok()) s = json_field::Read(*j, where, "replicas", v.replicas);
  if (s.ok()) s = json_field::Read(*j, where, "in_sync", v.in_sync);
  if (s.ok()) s = json_field::Read(*j, where, "target", v.target);
  if (s.ok()) s = json_field::Read(*j, where, "epoch", v.epoch);
  if (s.ok() && j->contains("dirty")) s = json_field::Read(*j, where, "dirty", v.dirty);
  if (s.ok() && j->contains("source")) s = json_field::Read(*j, where, "source", v.source);
  if (!s.ok()) return s;
  if (Status bad = ValidateVolumeState(v); !bad.ok()) {
    return Error(EINVAL, "{}: {}", where, bad.message());
  }
  return v;
}

std::string EncodeTargetClaim(const TargetClaim& c) {
  json j = {{"node", c.node}, {"epoch", c.epoch}};
  return j.dump();
}

StatusOr<TargetClaim> DecodeTargetClaim(std::string_view text, std::string_view where) {
  auto j = Parse(text, where);
  if (!j.ok()) return j.status();
  if (Status s = json_field::CheckKeys(*j, where, {"node", "epoch"}); !s.ok()) return s;
  TargetClaim c;
  Status s = json_field::Read(*j, where, "node", c.node);
  if (s.ok()) s = json_field::Read(*j, where, "epoch", c.epoch);
  if (!s.ok()) return s;
  if (Status bad = ValidateNodeId(c.node); !bad.ok()) {
    return Error(EINVAL, "{}: node: {}", where, bad.message());
  }
  if (c.epoch == 0) return Error(EINVAL, "{}: a claim's epoch starts at 1", where);
  return c;
}

}  // namespace nbdcsi::cluster
