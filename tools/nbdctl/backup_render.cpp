#include "tools/nbdctl/backup_render.h"

#include <fmt/format.h>

#include <algorithm>

#include "common/quantity.h"
#include "tools/nbdctl/render.h"

namespace nbdcsi::nbdctl {

using nlohmann::json;

namespace {

std::string Mib(uint64_t b) { return fmt::format("{:.1f} MiB", b / 1048576.0); }

std::string Trim(const std::string& s) {
  const char* ws = " \t\r";
  size_t a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  size_t b = s.find_last_not_of(ws);
  return s.substr(a, b - a + 1);
}

double Percent(uint64_t done, uint64_t total) { return total ? 100.0 * done / total : 0.0; }

// A job's progress in allocated data once the daemon has mapped it (what takes time: a sparse
// volume's holes cost nothing), in the volume's bytes before that.
struct JobProgress {
  uint64_t done, total;
  const char* unit;  // appended to "N of M"
};
JobProgress ProgressOf(const bv1::BackupJob& j) {
  if (j.has_data_total_bytes()) {
    return {std::min(j.data_done_bytes(), j.data_total_bytes()), j.data_total_bytes(),
            " allocated data"};
  }
  return {j.done_bytes(), j.total_bytes(), ""};
}
double PercentOf(const bv1::BackupJob& j) {
  const JobProgress p = ProgressOf(j);
  // A job without data is done once the daemon has mapped it.
  if (j.has_data_total_bytes() && p.total == 0) return 100.0;
  return Percent(p.done, p.total);
}

}  // namespace

json BackupJson(const bv1::BackupInfo& b) {
  return {{"name", b.name()},
          {"source_volume", b.source_volume()},
          {"source_snapshot", b.source_snapshot()},
          {"created", FormatTime(b.created_unix_ns())},
          {"volume_size_bytes", b.volume_size()},
          {"chunk_size_bytes", b.chunk_size()},
          {"chunks", b.chunks()},
          {"data_bytes", b.data_bytes()},
          {"stored_bytes", b.stored_bytes()},
          {"uploaded_bytes", b.uploaded_bytes()},
          {"encrypted", b.encrypted()}};
}

json BackupJobJson(const bv1::BackupJob& j) {
  return {{"id", j.id()},
          {"kind", j.kind()},
          {"backup", j.backup()},
          {"target", j.target()},
          {"snapshot", j.snapshot()},
          {"volume", j.volume()},
          {"state", j.state()},
          {"error", j.error()},
          {"total_bytes", j.total_bytes()},
          {"done_bytes", j.done_bytes()},
          {"data_total_bytes", j.has_data_total_bytes() ? json(j.data_total_bytes()) : json()},
          {"data_done_bytes", j.data_done_bytes()},
          {"percent", PercentOf(j)},
          {"transferred_bytes", j.transferred_bytes()},
          {"chunks_uploaded", j.chunks_uploaded()},
          {"chunks_reused", j.chunks_reused()},
          {"chunks_restored", j.chunks_restored()},
          {"rate_bytes_per_s", j.rate_bytes_per_s()},
          {"bandwidth_bytes_per_s", j.bandwidth_bytes_per_s()},
          {"started", FormatTime(j.started_unix_ns())},
          {"finished", FormatTime(j.finished_unix_ns())}};
}

std::string BackupListTable(const bv1::ListBackupsResponse& list) {
  Table t{{"NAME", "SOURCE", "CREATED", "SIZE", "DATA", "STORED", "CHUNKS", "ENCRYPTED"}, {}};
  for (const auto& b : list.backups()) {
    std::string source = b.source_snapshot().empty() ? "volume/" + b.source_volume()
                                                     : "snapshot/" + b.source_snapshot();
    t.rows.push_back({b.name(), source, FormatTime(b.created_unix_ns()),
                      FormatQuantity(b.volume_size()), Mib(b.data_bytes()), Mib(b.stored_bytes()),
                      std::to_string(b.chunks()), b.encrypted() ? "yes" : "no"});
  }
  return t.Render();
}

std::string BackupDetails(const bv1::BackupInfo& b) {
  return RenderKeyValues(
      {{"Name", b.name()},
       {"Source volume", b.source_volume()},
       {"Source snapshot", b.source_snapshot().empty() ? "-" : b.source_snapshot()},
       {"Point in time", FormatTime(b.created_unix_ns())},
       {"Volume size", FormatQuantity(b.volume_size())},
       {"Chunk size", FormatQuantity(b.chunk_size())},
       {"Chunks", std::to_string(b.chunks())},
       {"Data", fmt::format("{} bytes ({})", b.data_bytes(), Mib(b.data_bytes()))},
       {"Stored", fmt::format("{} bytes compressed ({})", b.stored_bytes(), Mib(b.stored_bytes()))},
       {"Uploaded",
        fmt::format("{} bytes by this backup ({})", b.uploaded_bytes(), Mib(b.uploaded_bytes()))},
       {"Encrypted", b.encrypted() ? "yes (aes-256-gcm, client-side)" : "no"}});
}

std::string ProgressLine(const bv1::BackupJob& j) {
  const JobProgress p = ProgressOf(j);
  return fmt::format("{} {} \"{}\": {} {:.0f}% ({} of {}{}), {} {} at {}/s", j.kind(), j.id(),
                     j.backup(), j.state(), PercentOf(j), Mib(p.done), Mib(p.total), p.unit,
                     Mib(j.transferred_bytes()), j.kind() == "backup" ? "uploaded" : "downloaded",
                     Mib(static_cast<uint64_t>(j.rate_bytes_per_s())));
}

std::string BackupJobDetails(const bv1::BackupJob& j) {
  std::vector<std::pair<std::string, std::string>> kv = {
      {"Job", j.id()}, {"Kind", j.kind()}, {"Backup", j.backup()}, {"Target", j.target()}};
  if (!j.snapshot().empty()) kv.push_back({"Snapshot", j.snapshot()});
  if (!j.volume().empty()) kv.push_back({"Volume", j.volume()});
  kv.push_back({"State", j.state()});
  if (!j.error().empty()) kv.push_back({"Error", j.error()});
  const JobProgress p = ProgressOf(j);
  kv.push_back({"Progress", fmt::format("{:.1f}% ({} of {} bytes{})", PercentOf(j), p.done,
                                        p.total, p.unit)});
  kv.push_back({"Transferred", fmt::format("{} bytes compressed", j.transferred_bytes())});
  if (j.kind() == "backup") {
    kv.push_back({"Chunks", fmt::format("{} uploaded, {} already stored", j.chunks_uploaded(),
                                        j.chunks_reused())});
  } else {
    kv.push_back({"Chunks", fmt::format("{} restored", j.chunks_restored())});
  }
  kv.push_back({"Rate", fmt::format("{}/s", Mib(static_cast<uint64_t>(j.rate_bytes_per_s())))});
  if (j.bandwidth_bytes_per_s()) {
    kv.push_back({"Bandwidth limit", fmt::format("{}/s", Mib(j.bandwidth_bytes_per_s()))});
  }
  kv.push_back({"Started", FormatTime(j.started_unix_ns())});
  kv.push_back({"Finished", FormatTime(j.finished_unix_ns())});
  return RenderKeyValues(kv);
}

std::string BackupJobsTable(const bv1::ListBackupJobsResponse& list) {
  Table t{{"ID", "KIND", "BACKUP", "TARGET", "STATE", "PROGRESS", "STARTED"}, {}};
  for (const auto& j : list.jobs()) {
    t.rows.push_back({j.id(), j.kind(), j.backup(), j.target(), j.state(),
                      fmt::format("{:.0f}%", PercentOf(j)),
                      FormatTime(j.started_unix_ns())});
  }
  return t.Render();
}

StatusOr<FileCredentials> ParseCredentialsFile(const std::string& text,
                                               const std::string& profile) {
  FileCredentials out;
  std::string section;
  size_t lineno = 0, start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = Trim(text.substr(start, end - start));
    start = end + 1;
    ++lineno;
    if (line.empty() || line[0] == '#' || line[0] == ';') continue;
    if (line.front() == '[') {
      if (line.back() != ']') return Error(EINVAL, "credentials file line {}: bad section", lineno);
      section = Trim(line.substr(1, line.size() - 2));
      continue;
    }
    size_t eq = line.find('=');
    if (eq == std::string::npos) {
      return Error(EINVAL, "credentials file line {}: expected key = value", lineno);
    }
    if (!section.empty() && section != profile) continue;
    std::string key = Trim(line.substr(0, eq));
    std::string value = Trim(line.substr(eq + 1));
    if (key == "aws_access_key_id") {
      out.access_key_id = value;
    } else if (key == "aws_secret_access_key") {
      out.secret_access_key = value;
    } else if (key == "aws_session_token") {
      out.session_token = value;
    }
    // Other keys (region, output, ...) belong to other tools.
  }
  if (out.access_key_id.empty() || out.secret_access_key.empty()) {
    return Error(ENOENT,
                 "credentials file: profile \"{}\" has no aws_access_key_id and "
                 "aws_secret_access_key",
                 profile);
  }
  return out;
}

}  // namespace nbdcsi::nbdctl
