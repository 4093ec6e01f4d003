// nbdctl output: aligned tables for people, JSON with stable keys for scripts (README.md lists
// the keys). Pure functions over the API messages so they are unit-tested without a server.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "datapath/api/datapath.pb.h"

namespace nbdcsi::nbdctl {

namespace v1 = ::nbdcsi::datapath::v1;

// Columns padded to the widest cell, two spaces apart, header row first; no trailing blanks.
struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  std::string Render() const;
};

// "Key:  value" lines with the values aligned.
std::string RenderKeyValues(const std::vector<std::pair<std::string, std::string>>& kv);

// Index of the histogram bucket holding the p-th quantile (0 < p <= 1), or nullopt when the
// histogram has no samples. Nearest-rank definition: the first bucket whose cumulative count
// reaches ceil(p * total).
std::optional<size_t> PercentileBucket(const v1::LatencyHistogram& h, double p);

// Latency of a bucket for JSON: its upper bound in us, or for the open-ended last bucket its
// lower bound (the slowest value we can vouch for).
uint64_t BucketLatencyUs(const v1::LatencyHistogram& h, size_t bucket);
// For tables: "<64us", "<1.02ms", ">=4.19s".
std::string BucketLatencyText(const v1::LatencyHistogram& h, size_t bucket);

// RFC 3339 UTC with second precision, "-" for 0.
std::string FormatTime(int64_t unix_ns);

nlohmann::json VolumeJson(const v1::Volume& v);
nlohmann::json StatsJson(const v1::GetVolumeStatsResponse& s);
nlohmann::json PoolJson(const v1::GetPoolInfoResponse& p);
nlohmann::json SnapshotJson(const v1::Snapshot& s);

// Readiness of a volume or snapshot filled by a background copy: "yes", "37%" while copying
// (floor, so 100% only once ready), "failed" when the copy failed, "no" without progress yet.
std::string ReadyText(bool ready, uint64_t done, uint64_t total, const std::string& error = "");

std::string VolumeListTable(const v1::ListVolumesResponse& list);
std::string VolumeDetails(const v1::Volume& v);
// A volume's recurring snapshot/backup schedule and its last runs: the "schedule" member of
// VolumeJson (null without one), and the text of `nbdctl volume schedule VOL`.
nlohmann::json ScheduleJson(const v1::Volume& v);
std::string ScheduleText(const v1::Volume& v);
std::string StatsText(const v1::GetVolumeStatsResponse& s);
std::string PoolText(const v1::GetPoolInfoResponse& p);
std::string SnapshotListTable(const v1::ListSnapshotsResponse& list);
std::string SnapshotDetails(const v1::Snapshot& s);

}  // namespace nbdcsi::nbdctl
