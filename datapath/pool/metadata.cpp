#include "datapath/pool/metadata.h"

#include <algorithm>
#include <limits>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "common/json_field.h"
#include "common/qos_fields.h"
#include "datapath/pool/rules.h"

namespace nbdcsi::datapath {

namespace {

using nlohmann::json;

bool ValidState(const std::string& s) { return s == "ready" || s == "copying" || s == "failed"; }

using json_field::Need;

// obj[key] into `out`, by common/json_field.h's type rules; `where` prefixes the key in messages
// ("qos." for the nested object). An absent optional field leaves `out` as it is (its default).
template <typename T>
Status Field(const json& obj, const char* where, const char* key, T& out, Need need) {
  auto it = obj.find(key);
  if (it == obj.end()) {
    if (need == Need::kOptional) return Status::Ok();
    return Error(EINVAL, "metadata has no \"{}{}\" ({})", where, key,
                 json_field::TypeName<T>());
  }
  if (!json_field::Holds<T>(*it)) {
    return Error(EINVAL, "metadata \"{}{}\" is not {}", where, key, json_field::TypeName<T>());
  }
  out = it->template get<T>();
  return Status::Ok();
}

// A JSON object of the version this build reads (volumes and snapshots share kMetaVersion).
StatusOr<json> ParseVersionedObject(std::string_view text) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Error(EINVAL, "metadata is not valid JSON");
  if (!j.is_object()) return Error(EINVAL, "metadata is not a JSON object");
  auto version = j.find("version");
  if (version == j.end() || !version->is_number_integer())
    return Error(EINVAL, "metadata has no integer \"version\"");
  if (version->get<int64_t>() != kMetaVersion) {
    return Error(EINVAL, "metadata version {} is not supported (this build reads version {})",
                 version->dump(), kMetaVersion);
  }
  return j;
}

// The record's own name: the one its file is named for, and a valid name of its kind.
Status CheckName(const char* kind, const std::string& name, std::string_view expected) {
  if (name != expected) {
    return Error(EINVAL, "metadata names {} \"{}\" but the file is for \"{}\"", kind, name,
                 expected);
  }
  Status s = std::string_view(kind) == "volume" ? ValidateVolumeName(name)
                                                : ValidateSnapshotName(name);
  if (!s.ok()) return Error(EINVAL, "metadata: {}", s.message());
  return Status::Ok();
}

Status CheckSize(uint64_t size) {
  if (Status s = ValidateVolumeSize(size); !s.ok()) {
    return Error(EINVAL, "metadata: {}", s.message());
  }
  return Status::Ok();
}

Status CheckState(const std::string& state) {
  if (!ValidState(state))
    return Error(EINVAL, "metadata \"state\" must be \"ready\", \"copying\" or \"failed\"");
  return Status::Ok();
}

// "source" of a volume: empty (blank), or the label of a valid snapshot or volume name.
Status CheckSourceLabel(const std::string& label) {
  if (label.empty()) return Status::Ok();
  Status s =
      Error(EINVAL, "metadata \"source\" must be \"\", \"snapshot/NAME\" or \"volume/NAME\"");
  if (label.rfind("snapshot/", 0) == 0) s = ValidateSnapshotName(label.substr(9));
  else if (label.rfind("volume/", 0) == 0) s = ValidateVolumeName(label.substr(7));
  if (!s.ok()) return Error(EINVAL, "metadata \"source\": {}", s.message());
  return Status::Ok();
}

Status ParseQos(const json& j, uint64_t size, QosLimits& q) {
  auto it = j.find("qos");
  if (it == j.end()) return Status::Ok();
  if (!it->is_object()) return Error(EINVAL, "metadata \"qos\" is not an object");
  const json& o = *it;
  // Each limit is read as uint64 and clamped into its field (burst_ms is 32 bits), not
  // truncated, so that a huge value still breaks the pool's rule below.
#define NBDCSI_QOS_PARSE(f, key, flag, kind, help)                              \
  {                                                                             \
    uint64_t v = q.f;                                                           \
    if (Status s = Field(o, "qos.", #f, v, Need::kOptional); !s.ok()) return s; \
    q.f = static_cast<decltype(q.f)>(                                           \
        std::min<uint64_t>(v, std::numeric_limits<decltype(q.f)>::max()));      \
  }
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_PARSE)
#undef NBDCSI_QOS_PARSE
  if (Status s = ValidateQos(q, size); !s.ok()) return Error(EINVAL, "metadata: {}", s.message());
  return Status::Ok();
}

Status ParseScheduleField(const json& j, VolumeSchedule& s) {
  auto it = j.find("schedule");
  if (it == j.end()) return Status::Ok();
  if (!it->is_object()) return Error(EINVAL, "metadata \"schedule\" is not an object");
  const json& o = *it;
  const Need opt = Need::kOptional;
  // Retain counts are read as uint64 and clamped, so a huge value still breaks the rule below.
  uint64_t snap_retain = s.snapshot_retain, backup_retain = s.backup_retain;
  for (Status st : {Field(o, "schedule.", "snapshot_cron", s.snapshot_cron, opt),
                    Field(o, "schedule.", "snapshot_retain", snap_retain, opt),
                    Field(o, "schedule.", "backup_cron", s.backup_cron, opt),
                    Field(o, "schedule.", "backup_retain", backup_retain, opt),
                    Field(o, "schedule.", "backup_target", s.backup_target, opt)}) {
    if (!st.ok()) return st;
  }
  s.snapshot_retain = static_cast<uint32_t>(std::min<uint64_t>(snap_retain, UINT32_MAX));
  s.backup_retain = static_cast<uint32_t>(std::min<uint64_t>(backup_retain, UINT32_MAX));
  if (Status st = ValidateSchedule(s); !st.ok())
    return Error(EINVAL, "metadata \"schedule\": {}", st.message());
  return Status::Ok();
}

}  // namespace

std::string ToJson(const VolumeMeta& m) {
  const QosLimits& q = m.qos;
  json qos = json::object();  // nlohmann's object sorts its keys: the order here does not matter
#define NBDCSI_QOS_JSON(f, key, flag, kind, help) qos[#f] = q.f;
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_JSON)
#undef NBDCSI_QOS_JSON
  json j = {{"version", kMetaVersion},
            {"name", m.name},
            {"size", m.size},
            {"created_unix_ns", m.created_unix_ns},
            {"read_only", m.read_only},
            {"qos", qos},
            {"source", m.source},
            {"state", m.state}};
  if (!m.error.empty()) j["error"] = m.error;
  if (m.fence_epoch) j["fence_epoch"] = m.fence_epoch;
  if (!m.schedule.empty()) {
    const VolumeSchedule& s = m.schedule;
    j["schedule"] = {{"snapshot_cron", s.snapshot_cron},
                     {"snapshot_retain", s.snapshot_retain},
                     {"backup_cron", s.backup_cron},
                     {"backup_retain", s.backup_retain},
                     {"backup_target", s.backup_target}};
  }
  return j.dump(2) + "\n";
}

std::string ToJson(const SnapshotMeta& m) {
  json j = {{"version", kMetaVersion},
            {"name", m.name},
            {"source_volume", m.source_volume},
            {"size", m.size},
            {"created_unix_ns", m.created_unix_ns},
            {"method", m.method},
            {"state", m.state}};
  if (!m.error.empty()) j["error"] = m.error;
  return j.dump(2) + "\n";
}

StatusOr<VolumeMeta> ParseVolumeMetadata(std::string_view text, std::string_view expected_name) {
  auto parsed = ParseVersionedObject(text);
  if (!parsed.ok()) return parsed.status();
  const json& j = *parsed;
  const Need req = Need::kRequired, opt = Need::kOptional;
  VolumeMeta m;
  for (Status s : {Field(j, "", "name", m.name, req), Field(j, "", "size", m.size, req),
                   Field(j, "", "created_unix_ns", m.created_unix_ns, opt),
                   Field(j, "", "read_only", m.read_only, opt),
                   Field(j, "", "source", m.source, opt), Field(j, "", "state", m.state, opt),
                   Field(j, "", "error", m.error, opt),
                   Field(j, "", "fence_epoch", m.fence_epoch, opt)}) {
    if (!s.ok()) return s;
  }
  if (m.fence_epoch) {
    if (Status s = ValidateFenceEpoch(m.fence_epoch); !s.ok())
      return Error(EINVAL, "metadata \"fence_epoch\": {}", s.message());
  }
  for (Status s : {CheckName("volume", m.name, expected_name), CheckSize(m.size),
                   ParseQos(j, m.size, m.qos), CheckSourceLabel(m.source), CheckState(m.state),
                   ParseScheduleField(j, m.schedule)}) {
    if (!s.ok()) return s;
  }
  return m;
}

StatusOr<SnapshotMeta> ParseSnapshotMetadata(std::string_view text,
                                             std::string_view expected_name) {
  auto parsed = ParseVersionedObject(text);
  if (!parsed.ok()) return parsed.status();
  const json& j = *parsed;
  const Need req = Need::kRequired, opt = Need::kOptional;
  SnapshotMeta m;
  for (Status s : {Field(j, "", "name", m.name, req),
                   Field(j, "", "source_volume", m.source_volume, req),
                   Field(j, "", "method", m.method, req), Field(j, "", "state", m.state, req),
                   Field(j, "", "size", m.size, req),
                   Field(j, "", "created_unix_ns", m.created_unix_ns, opt),
                   Field(j, "", "error", m.error, opt)}) {
    if (!s.ok()) return s;
  }
  if (Status s = CheckName("snapshot", m.name, expected_name); !s.ok()) return s;
  if (Status s = ValidateVolumeName(m.source_volume); !s.ok())
    return Error(EINVAL, "metadata \"source_volume\": {}", s.message());
  if (m.method != "reflink" && m.method != "copy")
    return Error(EINVAL, "metadata \"method\" must be \"reflink\" or \"copy\"");
  if (Status s = CheckState(m.state); !s.ok()) return s;
  if (Status s = CheckSize(m.size); !s.ok()) return s;
  return m;
}

}  // namespace nbdcsi::datapath
