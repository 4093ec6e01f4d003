#include "csi/params.h"

#include <charconv>
#include <limits>

#include <fmt/format.h>

#include "common/quantity.h"

namespace nbdcsi::csi {
namespace {

constexpr std::string_view kProvisionerPrefix = "csi.storage.k8s.io/";

enum class Kind { kCount, kBytes, kMillis };

struct Key {
  const char* name;
  Kind kind;
  std::optional<uint64_t> QosParameters::*u64 = nullptr;
  std::optional<uint32_t> QosParameters::*u32 = nullptr;
};

const Key kKeys[] = {
    {"maxIops", Kind::kCount, &QosParameters::max_iops},
    {"maxReadIops", Kind::kCount, &QosParameters::max_read_iops},
    {"maxWriteIops", Kind::kCount, &QosParameters::max_write_iops},
    {"maxBps", Kind::kBytes, &QosParameters::max_bps},
    {"maxReadBps", Kind::kBytes, &QosParameters::max_read_bps},
    {"maxWriteBps", Kind::kBytes, &QosParameters::max_write_bps},
    {"iopsPerGiB", Kind::kCount, &QosParameters::iops_per_gib},
    {"bpsPerGiB", Kind::kBytes, &QosParameters::bps_per_gib},
    {"burstMs", Kind::kMillis, nullptr, &QosParameters::burst_ms},
};

// Strict decimal: digits only (no sign, blanks or suffix), so "10k" for an IOPS key is an error
// rather than a silent 10.
StatusOr<uint64_t> ParseDecimal(const std::string& v) {
  if (v.empty()) return Error(EINVAL, "empty");
  for (char c : v) {
    if (c < '0' || c > '9') return Error(EINVAL, "not a decimal integer");
  }
  uint64_t out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec == std::errc::result_out_of_range) return Error(ERANGE, "does not fit in 64 bits");
  if (ec != std::errc() || p != v.data() + v.size()) return Error(EINVAL, "not a decimal integer");
  return out;
}

}  // namespace

bool QosParameters::empty() const { return *this == QosParameters{}; }

const std::vector<std::string>& QosParameterKeys() {
  static const std::vector<std::string> keys = [] {
    std::vector<std::string> k;
    for (const Key& key : kKeys) k.emplace_back(key.name);
    return k;
  }();
  return keys;
}

StatusOr<QosParameters> ParseQosParameters(const std::map<std::string, std::string>& params) {
  QosParameters out;
  // Plain references, not a structured binding: clang before 16 cannot capture a binding in the
  // lambda below, and the fuzz targets build this file with clang-14.
  for (const auto& kv : params) {
    const std::string& name = kv.first;
    const std::string& value = kv.second;
    if (std::string_view(name).substr(0, kProvisionerPrefix.size()) == kProvisionerPrefix) continue;
    const Key* key = nullptr;
    for (const Key& k : kKeys) {
      if (name == k.name) key = &k;
    }
    if (!key) {
      return Error(EINVAL, "unknown parameter \"{}\"; known: {}", name,
                   fmt::join(QosParameterKeys(), ", "));
    }
    auto bad = [&](const Status& s) {
      return Error(s.code(), "parameter {}: bad value \"{}\": {}", name, value, s.message());
    };
    if (key->kind == Kind::kBytes) {
      auto q = ParseQuantity(value);
      if (!q.ok()) return bad(q.status());
      out.*(key->u64) = *q;
    } else {
      auto n = ParseDecimal(value);
      if (!n.ok()) return bad(n.status());
      if (key->kind == Kind::kMillis) {
        if (*n > std::numeric_limits<uint32_t>::max()) {
          return bad(Error(ERANGE, "at most {}", std::numeric_limits<uint32_t>::max()));
        }
        out.*(key->u32) = static_cast<uint32_t>(*n);
      } else {
        out.*(key->u64) = *n;
      }
    }
  }
  return out;
}

}  // namespace nbdcsi::csi
