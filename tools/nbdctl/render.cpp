#include "tools/nbdctl/render.h"

#include <time.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "common/qos_fields.h"
#include "common/quantity.h"

namespace nbdcsi::nbdctl {
namespace {

using nlohmann::json;

std::string Limit(uint64_t v) { return v ? std::to_string(v) : "-"; }
std::string Rate(uint64_t bytes_per_sec) {
  return bytes_per_sec ? FormatQuantity(bytes_per_sec) + "/s" : "-";
}

std::string Duration(uint64_t ns) {
  if (ns < 1'000) return fmt::format("{}ns", ns);
  if (ns < 1'000'000) return fmt::format("{:.2f}us", ns / 1e3);
  if (ns < 1'000'000'000) return fmt::format("{:.2f}ms", ns / 1e6);
  return fmt::format("{:.2f}s", ns / 1e9);
}

std::string LatencyUs(uint64_t us) {
  if (us < 1'000) return fmt::format("{}us", us);
  if (us < 1'000'000) return fmt::format("{:.2f}ms", us / 1e3);
  return fmt::format("{:.2f}s", us / 1e6);
}

json QosJson(const v1::QosLimits& q) {
  json j;
#define NBDCSI_QOS_JSON(f, key, flag, kind, help) j[#f] = q.f();
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_JSON)
#undef NBDCSI_QOS_JSON
  return j;
}

json EffectiveJson(const v1::EffectiveQos& e) {
  return {{"iops", e.iops()},         {"read_iops", e.read_iops()}, {"write_iops", e.write_iops()},
          {"bps", e.bps()},           {"read_bps", e.read_bps()},   {"write_bps", e.write_bps()},
          {"burst_ms", e.burst_ms()}};
}

uint64_t Samples(const v1::LatencyHistogram& h) {
  uint64_t total = 0;
  for (const auto& b : h.buckets()) total += b.count();
  return total;
}

json HistogramJson(const v1::LatencyHistogram& h) {
  json j;
  j["samples"] = Samples(h);
  for (auto [key, p] : {std::pair{"p50_us", 0.50}, {"p90_us", 0.90}, {"p99_us", 0.99}}) {
    auto b = PercentileBucket(h, p);
    j[key] = b ? json(BucketLatencyUs(h, *b)) : json(nullptr);
  }
  json buckets = json::array();
  for (int i = 0; i < h.buckets_size(); ++i) {
    const auto& b = h.buckets(i);
    bool open_ended = b.upper_bound_us() == std::numeric_limits<uint64_t>::max();
    buckets.push_back({{"lt_us", open_ended ? json(nullptr) : json(b.upper_bound_us())},
                       {"count", b.count()}});
  }
  j["buckets"] = std::move(buckets);
  return j;
}

// A copy's progress for the READY column: in the source's allocated data once the daemon has
// mapped it (a sparse volume's copy takes the time of its data, not of its size), else in
// address space. `of` names the unit for detail views.
struct CopyFigures {
  uint64_t done, total;
  const char* of;
};
template <typename Msg>
CopyFigures FiguresOf(const Msg& m) {
  if (m.has_copy_data_total_bytes()) {
    return {m.copy_data_done_bytes(), m.copy_data_total_bytes(), " allocated data"};
  }
  return {m.copy_done_bytes(), m.copy_total_bytes(), ""};
}

// For detail views: the ready column plus the bytes behind a percentage.
std::string CopyState(bool ready, const CopyFigures& f, const std::string& error) {
  std::string r = ReadyText(ready, f.done, f.total, error);
  if (!error.empty()) return r + ": " + error;
  if (ready || f.total == 0) return r;
  return fmt::format("no, copying {} ({} of {}{})", r, FormatHuman(f.done), FormatHuman(f.total),
                     f.of);
}

json CountersJson(const v1::OpCounters& c) {
  return {{"ops", c.ops()}, {"errors", c.errors()}, {"bytes", c.bytes()}};
}

}  // namespace

std::string Table::Render() const {
  std::vector<size_t> width(header.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < width.size(); ++i) {
      width[i] = std::max(width[i], row[i].size());
    }
  };
  measure(header);
  for (const auto& r : rows) measure(r);
  std::string out;
  auto emit = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < width.size(); ++i) {
      const std::string cell = i < row.size() ? row[i] : "";
      line += cell;
      if (i + 1 < width.size()) line += std::string(width[i] - cell.size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  };
  emit(header);
  for (const auto& r : rows) emit(r);
  return out;
}

std::string RenderKeyValues(const std::vector<std::pair<std::string, std::string>>& kv) {
  size_t w = 0;
  for (const auto& [k, v] : kv) w = std::max(w, k.size() + 1);
  std::string out;
  for (const auto& [k, v] : kv) out += fmt::format("{:<{}}  {}\n", k + ":", w, v);
  return out;
}

std::optional<size_t> PercentileBucket(const v1::LatencyHistogram& h, double p) {
  uint64_t total = Samples(h);
  if (total == 0) return std::nullopt;
  uint64_t rank = static_cast<uint64_t>(std::ceil(p * static_cast<double>(total)));
  rank = std::clamp<uint64_t>(rank, 1, total);
  uint64_t seen = 0;
  for (int i = 0; i < h.buckets_size(); ++i) {
    seen += h.buckets(i).count();
    if (seen >= rank) return static_cast<size_t>(i);
  }
  return static_cast<size_t>(h.buckets_size() - 1);
}

uint64_t BucketLatencyUs(const v1::LatencyHistogram& h, size_t bucket) {
  uint64_t upper = h.buckets(static_cast<int>(bucket)).upper_bound_us();
  if (upper != std::numeric_limits<uint64_t>::max()) return upper;
  return bucket == 0 ? 0 : h.buckets(static_cast<int>(bucket) - 1).upper_bound_us();
}

std::string BucketLatencyText(const v1::LatencyHistogram& h, size_t bucket) {
  uint64_t upper = h.buckets(static_cast<int>(bucket)).upper_bound_us();
  if (upper == std::numeric_limits<uint64_t>::max()) {
    return ">=" + LatencyUs(BucketLatencyUs(h, bucket));
  }
  return "<" + LatencyUs(upper);
}

std::string FormatTime(int64_t unix_ns) {
  if (unix_ns <= 0) return "-";
  time_t secs = static_cast<time_t>(unix_ns / 1'000'000'000);
  struct tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// null until the daemon has mapped the source's data.
template <typename Msg>
json OptionalTotal(const Msg& m) {
  return m.has_copy_data_total_bytes() ? json(m.copy_data_total_bytes()) : json();
}

nlohmann::json VolumeJson(const v1::Volume& v) {
  return {{"name", v.name()},
          {"size_bytes", v.size_bytes()},
          {"size", FormatQuantity(v.size_bytes())},
          {"allocated_bytes", v.allocated_bytes()},
          {"created", FormatTime(v.created_unix_ns())},
          {"created_unix_ns", v.created_unix_ns()},
          {"read_only", v.read_only()},
          {"open_connections", v.open_connections()},
          {"data_path", v.data_path()},
          {"source", v.source()},
          {"ready", v.ready()},
          {"copy_done_bytes", v.copy_done_bytes()},
          {"copy_total_bytes", v.copy_total_bytes()},
          {"copy_data_done_bytes", v.copy_data_done_bytes()},
          {"copy_data_total_bytes", OptionalTotal(v)},
          {"fence_epoch", v.fence_epoch()},
          {"qos", QosJson(v.qos())},
          {"effective_qos", EffectiveJson(v.effective_qos())},
          {"schedule", ScheduleJson(v)}};
}

nlohmann::json ScheduleJson(const v1::Volume& v) {
  if (!v.has_schedule()) return nullptr;
  const auto& s = v.schedule();
  json runs = json::array();
  for (const auto& r : v.schedule_runs()) {
    runs.push_back({{"kind", r.kind()},
                    {"cron", r.cron()},
                    {"last_run", r.last_run_unix_ns() ? FormatTime(r.last_run_unix_ns()) : ""},
                    {"last_run_unix_ns", r.last_run_unix_ns()},
                    {"result", r.result()},
                    {"error", r.error()},
                    {"made", r.made()},
                    {"pruned", r.pruned()},
                    {"next_fire", r.next_fire_unix_ns() ? FormatTime(r.next_fire_unix_ns()) : ""},
                    {"next_fire_unix_ns", r.next_fire_unix_ns()},
                    {"job_id", r.job_id()}});
  }
  return {{"snapshot_cron", s.snapshot_cron()}, {"snapshot_retain", s.snapshot_retain()},
          {"backup_cron", s.backup_cron()},     {"backup_retain", s.backup_retain()},
          {"backup_target", s.backup_target()}, {"runs", runs}};
}

std::string ScheduleText(const v1::Volume& v) {
  if (!v.has_schedule() ||
      (v.schedule().snapshot_cron().empty() && v.schedule().backup_cron().empty())) {
    return fmt::format("volume \"{}\" has no schedule\n", v.name());
  }
  const auto& s = v.schedule();
  std::vector<std::pair<std::string, std::string>> kv = {{"Volume", v.name()}};
  if (!s.snapshot_cron().empty()) {
    kv.push_back({"Snapshots", fmt::format("\"{}\" (UTC), keep {}", s.snapshot_cron(),
                                           s.snapshot_retain())});
  }
  if (!s.backup_cron().empty()) {
    kv.push_back({"Backups", fmt::format("\"{}\" (UTC), keep {}, to {}", s.backup_cron(),
                                         s.backup_retain(), s.backup_target())});
  }
  Table runs{{"KIND", "LAST RUN", "RESULT", "MADE", "PRUNED", "NEXT"}, {}};
  std::string errors;
  for (const auto& r : v.schedule_runs()) {
    runs.rows.push_back({r.kind(), r.last_run_unix_ns() ? FormatTime(r.last_run_unix_ns()) : "-",
                         r.result().empty() ? "-" : r.result(), r.made().empty() ? "-" : r.made(),
                         std::to_string(r.pruned()),
                         r.next_fire_unix_ns() ? FormatTime(r.next_fire_unix_ns()) : "-"});
    if (!r.error().empty()) errors += fmt::format("{} error: {}\n", r.kind(), r.error());
  }
  return RenderKeyValues(kv) + "\n" + runs.Render() + errors;
}

nlohmann::json StatsJson(const v1::GetVolumeStatsResponse& s) {
  const auto& st = s.stats();
  return {{"name", s.name()},
          {"sampled_unix_ns", s.sampled_unix_ns()},
          {"open_connections", st.open_connections()},
          {"ops",
           {{"read", CountersJson(st.read())},
            {"write", CountersJson(st.write())},
            {"flush", CountersJson(st.flush())},
            {"trim", CountersJson(st.trim())},
            {"write_zeroes", CountersJson(st.write_zeroes())},
            {"block_status", CountersJson(st.block_status())}}},
          {"latency", {{"read", HistogramJson(st.read_latency())},
                       {"write", HistogramJson(st.write_latency())}}},
          {"throttled_ns", st.throttled_ns()},
          {"throttled_ops", st.throttled_ops()}};
}

nlohmann::json PoolJson(const v1::GetPoolInfoResponse& p) {
  json orphans = json::array();
  for (const auto& o : p.cleaned_orphans()) orphans.push_back(o);
  json broken = json::array();
  for (const auto& b : p.broken_volumes()) broken.push_back(b);
  json abandoned = json::array();
  for (const auto& a : p.abandoned_copies()) abandoned.push_back(a);
  return {{"dir", p.dir()},
          {"fs_type", p.fs_type()},
          {"capacity_bytes", p.capacity_bytes()},
          {"free_bytes", p.free_bytes()},
          {"free_reserve_bytes", p.free_reserve_bytes()},
          {"provisioned_bytes", p.provisioned_bytes()},
          {"allocated_bytes", p.allocated_bytes()},
          {"provisionable_bytes", p.provisionable_bytes()},
          {"overcommit_ratio", p.overcommit_ratio()},
          {"volumes", p.volumes()},
          {"cleaned_orphans", std::move(orphans)},
          {"broken_volumes", std::move(broken)},
          {"reflink", p.reflink()},
          {"snapshots", p.snapshots()},
          {"abandoned_copies", std::move(abandoned)}};
}

nlohmann::json SnapshotJson(const v1::Snapshot& s) {
  return {{"name", s.name()},
          {"source_volume", s.source_volume()},
          {"size_bytes", s.size_bytes()},
          {"size", FormatQuantity(s.size_bytes())},
          {"allocated_bytes", s.allocated_bytes()},
          {"created", FormatTime(s.created_unix_ns())},
          {"created_unix_ns", s.created_unix_ns()},
          {"method", s.method()},
          {"ready", s.ready()},
          {"copy_done_bytes", s.copy_done_bytes()},
          {"copy_total_bytes", s.copy_total_bytes()},
          {"copy_data_done_bytes", s.copy_data_done_bytes()},
          {"copy_data_total_bytes", OptionalTotal(s)},
          {"error", s.error()},
          {"data_path", s.data_path()}};
}

std::string ReadyText(bool ready, uint64_t done, uint64_t total, const std::string& error) {
  if (!error.empty()) return "failed";
  if (ready) return "yes";
  if (total == 0) return "no";
  // Floor, capped below 100: a copy that has moved every byte still has to fsync and commit.
  uint64_t pct = static_cast<uint64_t>(static_cast<long double>(std::min(done, total)) * 100 /
                                       static_cast<long double>(total));
  return fmt::format("{}%", std::min<uint64_t>(pct, 99));
}

std::string VolumeListTable(const v1::ListVolumesResponse& list) {
  Table t{{"NAME", "SIZE", "ALLOCATED", "RO", "CONNS", "IOPS", "BPS", "READY", "SOURCE",
           "CREATED"},
          {}};
  for (const auto& v : list.volumes()) {
    t.rows.push_back({v.name(), FormatQuantity(v.size_bytes()), FormatHuman(v.allocated_bytes()),
                      v.read_only() ? "yes" : "no", std::to_string(v.open_connections()),
                      Limit(v.effective_qos().iops()), Rate(v.effective_qos().bps()),
                      ReadyText(v.ready(), FiguresOf(v).done, FiguresOf(v).total),
                      v.source().empty() ? "-" : v.source(), FormatTime(v.created_unix_ns())});
  }
  return t.Render();
}

std::string VolumeDetails(const v1::Volume& v) {
  const auto& q = v.qos();
  const auto& e = v.effective_qos();
  std::vector<std::pair<std::string, std::string>> kv = {
      {"Name", v.name()},
      {"Size", fmt::format("{} ({} bytes)", FormatQuantity(v.size_bytes()), v.size_bytes())},
      {"Allocated", fmt::format("{} ({} bytes)", FormatHuman(v.allocated_bytes()),
                                v.allocated_bytes())},
      {"Read-only", v.read_only() ? "yes" : "no"},
      {"Source", v.source().empty() ? "-" : v.source()},
      {"Ready", CopyState(v.ready(), FiguresOf(v), "")},
      {"Connections", std::to_string(v.open_connections())},
      {"Fence epoch", v.fence_epoch() ? std::to_string(v.fence_epoch()) : "- (never fenced)"},
      {"Created", FormatTime(v.created_unix_ns())},
      {"Data file", v.data_path().empty() ? "-" : v.data_path()},
  };
  Table limits{{"QOS", "TOTAL", "READ", "WRITE", "PER-GIB"}, {}};
  limits.rows.push_back({"iops (set)", Limit(q.max_iops()), Limit(q.max_read_iops()),
                         Limit(q.max_write_iops()), Limit(q.iops_per_gib())});
  limits.rows.push_back({"iops (effective)", Limit(e.iops()), Limit(e.read_iops()),
                         Limit(e.write_iops()), ""});
  limits.rows.push_back({"bandwidth (set)", Rate(q.max_bps()), Rate(q.max_read_bps()),
                         Rate(q.max_write_bps()), Rate(q.bps_per_gib())});
  limits.rows.push_back({"bandwidth (effective)", Rate(e.bps()), Rate(e.read_bps()),
                         Rate(e.write_bps()), ""});
  std::string burst = q.burst_ms() ? fmt::format("{}ms", q.burst_ms())
                                   : fmt::format("{}ms (default)", e.burst_ms());
  kv.push_back({"Burst", burst});
  std::string out = RenderKeyValues(kv) + "\n" + limits.Render();
  if (v.has_schedule()) out += "\n" + ScheduleText(v);
  return out;
}

std::string StatsText(const v1::GetVolumeStatsResponse& s) {
  const auto& st = s.stats();
  Table ops{{"OP", "OPS", "ERRORS", "BYTES"}, {}};
  auto row = [&](const char* name, const v1::OpCounters& c, bool data) {
    ops.rows.push_back({name, std::to_string(c.ops()), std::to_string(c.errors()),
                        data ? FormatHuman(c.bytes()) : "-"});
  };
  row("read", st.read(), true);
  row("write", st.write(), true);
  row("flush", st.flush(), false);
  row("trim", st.trim(), false);
  row("write_zeroes", st.write_zeroes(), false);
  row("block_status", st.block_status(), false);

  Table lat{{"LATENCY", "SAMPLES", "P50", "P90", "P99"}, {}};
  auto lrow = [&](const char* name, const v1::LatencyHistogram& h) {
    std::vector<std::string> r = {name, std::to_string(Samples(h))};
    for (double p : {0.50, 0.90, 0.99}) {
      auto b = PercentileBucket(h, p);
      r.push_back(b ? BucketLatencyText(h, *b) : "-");
    }
    lat.rows.push_back(std::move(r));
  };
  lrow("read", st.read_latency());
  lrow("write", st.write_latency());

  std::string out = RenderKeyValues({
      {"Volume", s.name()},
      {"Sampled", FormatTime(s.sampled_unix_ns())},
      {"Connections", std::to_string(st.open_connections())},
      {"Throttled", fmt::format("{} waiting, {} requests delayed", Duration(st.throttled_ns()),
                                st.throttled_ops())},
  });
  return out + "\n" + ops.Render() + "\n" + lat.Render();
}

std::string PoolText(const v1::GetPoolInfoResponse& p) {
  double used = p.capacity_bytes() ? 100.0 * static_cast<double>(p.provisioned_bytes()) /
                                         static_cast<double>(p.capacity_bytes())
                                   : 0.0;
  std::string orphans = "none";
  if (p.cleaned_orphans_size() > 0) {
    orphans = fmt::format("{}", fmt::join(p.cleaned_orphans(), ", "));
  }
  // Broken volumes get one line each below their count: each names a path and a reason, which
  // would be unreadable joined on one line.
  std::string broken = "none";
  if (p.broken_volumes_size() > 0) {
    broken = fmt::format("{} (files kept; `nbdctl volume delete NAME` removes them)",
                         p.broken_volumes_size());
  }
  std::string abandoned = "none";
  if (p.abandoned_copies_size() > 0) {
    abandoned = fmt::format("{} (interrupted by a crash, removed)",
                            fmt::join(p.abandoned_copies(), ", "));
  }
  std::string out = RenderKeyValues({
      {"Directory", p.dir()},
      {"File system", p.fs_type().empty() ? "-" : p.fs_type()},
      {"Capacity", FormatHuman(p.capacity_bytes())},
      {"Free", p.free_reserve_bytes() ? fmt::format("{} ({} kept in reserve)",
                                                     FormatHuman(p.free_bytes()),
                                                     FormatHuman(p.free_reserve_bytes()))
                                       : FormatHuman(p.free_bytes())},
      {"Provisioned", fmt::format("{} ({:.1f}% of capacity)", FormatHuman(p.provisioned_bytes()),
                                  used)},
      {"Allocated", FormatHuman(p.allocated_bytes())},
      {"Overcommit", fmt::format("{:g}x", p.overcommit_ratio())},
      {"Provisionable", FormatHuman(p.provisionable_bytes())},
      {"Reflink", p.reflink() ? "yes (snapshots and clones are instant)"
                              : "no (snapshots and clones copy in the background)"},
      {"Volumes", std::to_string(p.volumes())},
      {"Snapshots", std::to_string(p.snapshots())},
      {"Abandoned copies", abandoned},
      {"Cleaned orphans", orphans},
      {"Broken volumes", broken},
  });
  for (const auto& b : p.broken_volumes()) out += "  " + b + "\n";
  return out;
}

std::string SnapshotListTable(const v1::ListSnapshotsResponse& list) {
  Table t{{"NAME", "VOLUME", "SIZE", "ALLOCATED", "METHOD", "READY", "CREATED"}, {}};
  for (const auto& s : list.snapshots()) {
    t.rows.push_back({s.name(), s.source_volume(), FormatQuantity(s.size_bytes()),
                      FormatHuman(s.allocated_bytes()), s.method().empty() ? "-" : s.method(),
                      ReadyText(s.ready(), FiguresOf(s).done, FiguresOf(s).total, s.error()),
                      FormatTime(s.created_unix_ns())});
  }
  return t.Render();
}

std::string SnapshotDetails(const v1::Snapshot& s) {
  return RenderKeyValues({
      {"Name", s.name()},
      {"Source volume", s.source_volume()},
      {"Size", fmt::format("{} ({} bytes)", FormatQuantity(s.size_bytes()), s.size_bytes())},
      {"Allocated", fmt::format("{} ({} bytes)", FormatHuman(s.allocated_bytes()),
                                s.allocated_bytes())},
      {"Method", s.method().empty() ? "-" : s.method()},
      {"Ready", CopyState(s.ready(), FiguresOf(s), s.error())},
      {"Created", FormatTime(s.created_unix_ns())},
      {"Data file", s.data_path().empty() ? "-" : s.data_path()},
  });
}

}  // namespace nbdcsi::nbdctl
