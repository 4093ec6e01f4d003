#include "csi/params.h"

#include <charconv>
#include <limits>
#include <tuple>

#include <fmt/format.h>

#include "common/cron.h"
#include "common/quantity.h"

namespace nbdcsi::csi {
namespace {

constexpr std::string_view kProvisionerPrefix = "csi.storage.k8s.io/";

// Sets the member of `out` that the table calls `field`.
void Assign(QosParameters& out, std::string_view field, uint64_t v) {
#define NBDCSI_QOS_ASSIGN(f, key, flag, kind, help)  \
  if (field == #f) {                                 \
    out.f = static_cast<QosValue<QosKind::kind>>(v); \
    return;                                          \
  }
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_ASSIGN)
#undef NBDCSI_QOS_ASSIGN
}

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

StatusOr<QosParameters> ParseQosKeys(const std::map<std::string, std::string>& params,
                                     bool storage_class);

const std::vector<std::string_view>& ScheduleKeys() {
  static const std::vector<std::string_view> keys = {kSnapshotScheduleKey, kSnapshotRetainKey,
                                                     kBackupScheduleKey, kBackupRetainKey,
                                                     kBackupTargetKey};
  return keys;
}

bool IsStorageClassOnlyKey(const std::string& name) {
  if (name == kReplicasKey) return true;
  for (auto k : ScheduleKeys()) {
    if (name == k) return true;
  }
  return false;
}

// The schedule keys into `out`; each error names its key. The combinations are checked here
// too, with the keys' names, before common/volume_schedule.h's validator (which names fields)
// has anything left to refuse.
Status ParseSchedule(const std::map<std::string, std::string>& params, VolumeSchedule& out) {
  auto get = [&](std::string_view key) -> const std::string* {
    auto it = params.find(std::string(key));
    return it == params.end() ? nullptr : &it->second;
  };
  for (auto [key, cron] : {std::pair{kSnapshotScheduleKey, &out.snapshot_cron},
                           std::pair{kBackupScheduleKey, &out.backup_cron}}) {
    const std::string* v = get(key);
    if (!v) continue;
    if (auto c = ParseCron(*v); !c.ok()) {
      return Error(EINVAL, "parameter {}: bad value \"{}\": {}", key, *v, c.status().message());
    }
    *cron = *v;
  }
  for (auto [key, sched, retain] :
       {std::tuple{kSnapshotRetainKey, kSnapshotScheduleKey, &out.snapshot_retain},
        std::tuple{kBackupRetainKey, kBackupScheduleKey, &out.backup_retain}}) {
    const std::string* v = get(key);
    if (!v) continue;
    auto n = ParseDecimal(*v);
    if (!n.ok() || *n < 1 || *n > kMaxScheduleRetain) {
      return Error(EINVAL, "parameter {}: bad value \"{}\": a whole number from 1 to {}", key,
                   *v, kMaxScheduleRetain);
    }
    if (!get(sched)) return Error(EINVAL, "parameter {} is set without {}", key, sched);
    *retain = static_cast<uint32_t>(*n);
  }
  const std::string* target = get(kBackupTargetKey);
  if (target) {
    if (Status s = ValidateS3Target(*target); !s.ok()) {
      return Error(EINVAL, "parameter {}: bad value \"{}\": {}", kBackupTargetKey, *target,
                   s.message());
    }
    if (out.backup_cron.empty()) {
      return Error(EINVAL, "parameter {} is set without {}", kBackupTargetKey,
                   kBackupScheduleKey);
    }
    out.backup_target = *target;
  } else if (!out.backup_cron.empty()) {
    return Error(EINVAL, "parameter {} needs {} (s3://BUCKET[/PREFIX]: where the backups go)",
                 kBackupScheduleKey, kBackupTargetKey);
  }
  if (Status s = ValidateSchedule(out); !s.ok()) return Error(EINVAL, "parameters: {}", s.message());
  return Status::Ok();
}

}  // namespace

bool QosParameters::empty() const { return *this == QosParameters{}; }

const std::vector<std::string>& QosParameterKeys() {
  static const std::vector<std::string> keys = [] {
    std::vector<std::string> k;
    for (const QosField& f : kQosFields) k.emplace_back(f.csi_key);
    return k;
  }();
  return keys;
}

StatusOr<QosParameters> ParseQosParameters(const std::map<std::string, std::string>& params) {
  return ParseQosKeys(params, false);
}

StatusOr<StorageClassParameters> ParseStorageClassParameters(
    const std::map<std::string, std::string>& params) {
  StorageClassParameters out;
  auto qos = ParseQosKeys(params, true);
  if (!qos.ok()) return qos.status();
  out.qos = std::move(*qos);
  auto it = params.find(std::string(kReplicasKey));
  if (it != params.end()) {
    auto n = ParseDecimal(it->second);
    if (!n.ok() || *n < 1 || *n > kMaxReplicas) {
      return Error(EINVAL, "parameter {}: bad value \"{}\": a whole number from 1 to {}",
                   kReplicasKey, it->second, kMaxReplicas);
    }
    out.replicas = static_cast<int>(*n);
  }
  if (Status s = ParseSchedule(params, out.schedule); !s.ok()) return s;
  if (!out.schedule.empty() && out.replicas > 1) {
    return Error(EINVAL, "parameters {}/{}: schedules are not supported for replicated volumes "
                 "yet ({}={})", kSnapshotScheduleKey, kBackupScheduleKey, kReplicasKey,
                 out.replicas);
  }
  return out;
}

StatusOr<AttributesClassParameters> ParseAttributesClassParameters(
    const std::map<std::string, std::string>& params) {
  AttributesClassParameters out;
  std::map<std::string, std::string> qos_keys;
  bool schedule = false;
  for (const auto& kv : params) {
    bool is_schedule = false;
    for (auto k : ScheduleKeys()) is_schedule = is_schedule || kv.first == k;
    if (is_schedule) {
      schedule = true;
    } else {
      qos_keys.insert(kv);
    }
  }
  auto qos = ParseQosKeys(qos_keys, false);
  if (!qos.ok()) return qos.status();
  out.qos = std::move(*qos);
  if (schedule) {
    VolumeSchedule s;
    if (Status st = ParseSchedule(params, s); !st.ok()) return st;
    out.schedule = s;
  }
  return out;
}

namespace {

StatusOr<QosParameters> ParseQosKeys(const std::map<std::string, std::string>& params,
                                     bool storage_class) {
  QosParameters out;
  // Plain references, not a structured binding: clang before 16 cannot capture a binding in the
  // lambda below, and the fuzz targets build this file with clang-14.
  for (const auto& kv : params) {
    const std::string& name = kv.first;
    const std::string& value = kv.second;
    if (std::string_view(name).substr(0, kProvisionerPrefix.size()) == kProvisionerPrefix) continue;
    const QosField* key = nullptr;
    for (const QosField& f : kQosFields) {
      if (name == f.csi_key) key = &f;
    }
    if (storage_class && IsStorageClassOnlyKey(name)) continue;
    if (!key) {
      return Error(EINVAL, "unknown parameter \"{}\"; known: {}{}", name,
                   fmt::join(QosParameterKeys(), ", "),
                   storage_class ? fmt::format(", {}, {}", kReplicasKey,
                                               fmt::join(ScheduleKeys(), ", "))
                                 : "");
    }
    auto bad = [&](const Status& s) {
      return Error(s.code(), "parameter {}: bad value \"{}\": {}", name, value, s.message());
    };
    auto n = key->kind == QosKind::kBytes ? ParseQuantity(value) : ParseDecimal(value);
    if (!n.ok()) return bad(n.status());
    if (key->kind == QosKind::kMillis && *n > std::numeric_limits<uint32_t>::max()) {
      return bad(Error(ERANGE, "at most {}", std::numeric_limits<uint32_t>::max()));
    }
    Assign(out, key->field, *n);
  }
  return out;
}

}  // namespace
}  // namespace nbdcsi::csi
