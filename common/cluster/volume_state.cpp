#include "common/cluster/volume_state.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "common/node_id.h"

namespace nbdcsi::cluster {

namespace {

using nlohmann::json;

constexpr size_t kMaxVolumeNameLen = 128;

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

// The JSON checks every decoder shares: an object holding exactly `keys`.
Status CheckObject(const json& j, std::string_view where, std::initializer_list<const char*> keys) {
  if (!j.is_object()) return Error(EINVAL, "{}: expected a JSON object", where);
  for (const auto& [k, _] : j.items()) {
    if (std::find_if(keys.begin(), keys.end(), [&](const char* w) { return k == w; }) ==
        keys.end()) {
      return Error(EINVAL, "{}: unknown field \"{}\"", where, k);
    }
  }
  for (const char* k : keys) {
    if (!j.contains(k)) return Error(EINVAL, "{}: missing field \"{}\"", where, k);
  }
  return Status::Ok();
}

Status GetString(const json& j, const char* key, std::string_view where, std::string* out) {
  const json& v = j.at(key);
  if (!v.is_string()) return Error(EINVAL, "{}: \"{}\" must be a string", where, key);
  *out = v.get<std::string>();
  return Status::Ok();
}

Status GetUnsigned(const json& j, const char* key, std::string_view where, uint64_t* out) {
  const json& v = j.at(key);
  // nlohmann parses a non-negative integer as unsigned; a negative one, a float or a string is
  // refused here rather than converted.
  if (!v.is_number_unsigned()) {
    return Error(EINVAL, "{}: \"{}\" must be a non-negative integer", where, key);
  }
  *out = v.get<uint64_t>();
  return Status::Ok();
}

Status GetStringList(const json& j, const char* key, std::string_view where,
                     std::vector<std::string>* out) {
  const json& v = j.at(key);
  if (!v.is_array()) return Error(EINVAL, "{}: \"{}\" must be an array of strings", where, key);
  out->clear();
  for (const json& e : v) {
    if (!e.is_string()) {
      return Error(EINVAL, "{}: \"{}\" must be an array of strings", where, key);
    }
    out->push_back(e.get<std::string>());
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
  if (name.empty()) return Error(EINVAL, "volume name is empty");
  if (name.size() > kMaxVolumeNameLen) {
    return Error(EINVAL, "volume name {:?}... is longer than {} bytes", name.substr(0, 32),
                 kMaxVolumeNameLen);
  }
  if (name[0] == '.' || name[0] == '-') {
    return Error(EINVAL, "volume name {:?} must not start with '.' or '-'", name);
  }
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) return Error(EINVAL, "volume name {:?} may only hold [A-Za-z0-9._-]", name);
  }
  return Status::Ok();
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
  return j.dump();
}

StatusOr<VolumeState> DecodeVolumeState(std::string_view text, std::string_view where) {
  auto j = Parse(text, where);
  if (!j.ok()) return j.status();
  if (Status s =
          CheckObject(*j, where, {"name", "size_bytes", "replicas", "in_sync", "target", "epoch"});
      !s.ok()) {
    return s;
  }
  VolumeState v;
  Status s = GetString(*j, "name", where, &v.name);
  if (s.ok()) s = GetUnsigned(*j, "size_bytes", where, &v.size_bytes);
  if (s.ok()) s = GetStringList(*j, "replicas", where, &v.replicas);
  if (s.ok()) s = GetStringList(*j, "in_sync", where, &v.in_sync);
  if (s.ok()) s = GetString(*j, "target", where, &v.target);
  if (s.ok()) s = GetUnsigned(*j, "epoch", where, &v.epoch);
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
  if (Status s = CheckObject(*j, where, {"node", "epoch"}); !s.ok()) return s;
  TargetClaim c;
  Status s = GetString(*j, "node", where, &c.node);
  if (s.ok()) s = GetUnsigned(*j, "epoch", where, &c.epoch);
  if (!s.ok()) return s;
  if (Status bad = ValidateNodeId(c.node); !bad.ok()) {
    return Error(EINVAL, "{}: node: {}", where, bad.message());
  }
  if (c.epoch == 0) return Error(EINVAL, "{}: a claim's epoch starts at 1", where);
  return c;
}

}  // namespace nbdcsi::cluster
