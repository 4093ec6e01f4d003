// Strict reads of JSON fields, for every file and object nbd-csi parses that it did not just
// write itself (pool metadata after a crash, backup manifests in a bucket, cluster state).
//
// nlohmann's get<T>() converts whatever it finds: -1 becomes 2^64-1 as a uint64_t, 1.9e19 is
// undefined behaviour, 2.5 becomes 2. A size, an offset or a count read that way passes every
// later range check with the wrong value. Here a field must already have the JSON type of T: a
// uint64_t is a non-negative integer literal ("an unsigned integer"), an int64_t an integer literal that fits.
#pragma once

#include <cerrno>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace nbdcsi::json_field {

template <typename T>
bool Holds(const nlohmann::json& v) {
  if constexpr (std::is_same_v<T, std::string>) {
    return v.is_string();
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    if (!v.is_array()) return false;
    for (const auto& e : v) {
      if (!e.is_string()) return false;
    }
    return true;
  } else if constexpr (std::is_same_v<T, bool>) {
    return v.is_boolean();
  } else if constexpr (std::is_same_v<T, uint64_t>) {
    return v.is_number_unsigned();
  } else if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, int>) {
    if (v.is_number_unsigned()) {
      return v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
    }
    if (!v.is_number_integer()) return false;
    const int64_t x = v.get<int64_t>();
    return x >= std::numeric_limits<T>::min() && x <= std::numeric_limits<T>::max();
  } else {
    static_assert(sizeof(T) == 0, "no strict JSON reading for this type");
  }
}

template <typename T>
const char* TypeName() {
  if constexpr (std::is_same_v<T, std::string>) return "a string";
  if constexpr (std::is_same_v<T, std::vector<std::string>>) return "an array of strings";
  if constexpr (std::is_same_v<T, bool>) return "a boolean";
  if constexpr (std::is_same_v<T, uint64_t>) return "an unsigned integer";
  if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, int>) return "an integer";
}

enum class Need { kRequired, kOptional };

// obj[key] into `out`, EINVAL "WHAT has no "KEY" (TYPE)" or "WHAT "KEY" is not TYPE" otherwise.
// `what` names the document for the reader ("manifest", "metadata"). An absent optional field
// leaves `out` as it is (its default).
template <typename T>
Status Read(const nlohmann::json& obj, std::string_view what, std::string_view key, T& out,
            Need need = Need::kRequired) {
  auto it = obj.find(key);
  if (it == obj.end()) {
    if (need == Need::kOptional) return Status::Ok();
    return Error(EINVAL, "{} has no \"{}\" ({})", what, key, TypeName<T>());
  }
  if (!Holds<T>(*it)) return Error(EINVAL, "{} \"{}\" is not {}", what, key, TypeName<T>());
  out = it->template get<T>();
  return Status::Ok();
}

// EINVAL unless `obj` is an object holding exactly `keys`: "WHAT: expected a JSON object",
// "WHAT: unknown field "K"" (a newer writer's field this reader would silently drop), or
// "WHAT has no "K"".
inline Status CheckKeys(const nlohmann::json& obj, std::string_view what,
                        std::initializer_list<std::string_view> keys) {
  if (!obj.is_object()) return Error(EINVAL, "{}: expected a JSON object", what);
  for (const auto& [k, _] : obj.items()) {
    bool known = false;
    for (std::string_view w : keys) known = known || k == w;
    if (!known) return Error(EINVAL, "{}: unknown field \"{}\"", what, k);
  }
  for (std::string_view k : keys) {
    if (!obj.contains(k)) return Error(EINVAL, "{} has no \"{}\"", what, k);
  }
  return Status::Ok();
}

}  // namespace nbdcsi::json_field
