#include "datapath/schedule/runner.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/cron.h"
#include "common/fs_util.h"

namespace nbdcsi::datapath::schedule {
namespace {

using nlohmann::json;

constexpr int64_t kNsPerS = 1000000000;

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string VolumePart(const std::string& volume) {
  if (volume.size() <= kMaxNameVolumePart) return volume;
  return fmt::format("{}-{:016x}", volume.substr(0, kMaxNameVolumePart - 17), Fnv1a(volume));
}

// A small secret file: its content without trailing blanks and newlines (a Secret's value as
// kubectl create secret --from-literal writes it has none; one written by hand often has one).
StatusOr<std::string> ReadKey(const std::string& dir, const char* key, bool required) {
  const std::string path = dir + "/" + key;
  auto v = ReadSmallFile(path, 64 * 1024);
  if (!v.ok()) {
    if (v.status().code() == ENOENT && !required) return std::string();
    if (v.status().code() == ENOENT) {
      return Error(EINVAL, "the backup secret directory {} has no {} (the Secret needs that key)",
                   dir, key);
    }
    return Error(v.status().code(), "cannot read {} of the backup secret directory {}: errno {}",
                 key, dir, v.status().code());
  }
  std::string s = std::move(*v);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  if (s.empty() && required) {
    return Error(EINVAL, "{} in the backup secret directory {} is empty", key, dir);
  }
  return s;
}

const char* KindName(bool backup) { return backup ? "backup" : "snapshot"; }

}  // namespace

int64_t SystemClock::NowUnixS() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string AutoName(int64_t unix_s, const std::string& volume) {
  return "auto-" + CompactUtc(unix_s) + "-" + VolumePart(volume);
}

bool IsAutoName(const std::string& name, const std::string& volume) {
  // auto- + yyyymmddThhmm + - + part
  const std::string part = "-" + VolumePart(volume);
  if (name.size() != 5 + 13 + part.size() || name.rfind("auto-", 0) != 0) return false;
  if (name.compare(18, std::string::npos, part) != 0) return false;
  for (size_t i = 5; i < 18; ++i) {
    const char c = name[i];
    if (i == 13 ? c != 'T' : (c < '0' || c > '9')) return false;
  }
  return true;
}

StatusOr<backup::Target> ReadBackupTarget(const std::string& secret_dir, const std::string& url) {
  if (secret_dir.empty()) {
    return Error(EINVAL,
                 "no credentials for scheduled backups: nbd-datapathd runs without "
                 "--backup-secret-dir");
  }
  backup::Target t;
  t.url = url;
  struct Want {
    const char* key;
    bool required;
    std::string* out;
  };
  for (const Want& w :
       {Want{"AWS_ACCESS_KEY_ID", true, &t.credentials.access_key_id},
        Want{"AWS_SECRET_ACCESS_KEY", true, &t.credentials.secret_access_key},
        Want{"AWS_SESSION_TOKEN", false, &t.credentials.session_token},
        Want{"AWS_ENDPOINT_URL", false, &t.endpoint}, Want{"AWS_REGION", false, &t.region}}) {
    auto v = ReadKey(secret_dir, w.key, w.required);
    if (!v.ok()) return v.status();
    *w.out = std::move(*v);
  }
  return t;
}

ScheduleRunner::ScheduleRunner(Pool& pool, backup::BackupJobs* jobs, RunnerOptions opts)
    : pool_(pool),
      jobs_(jobs),
      opts_(std::move(opts)),
      clock_(opts_.clock ? opts_.clock : &system_clock_) {}

ScheduleRunner::~ScheduleRunner() { Stop(); }

void ScheduleRunner::Load() {
  const std::string path = opts_.state_dir + "/" + kStateFile;
  auto text = ReadSmallFile(path);
  if (!text.ok()) {
    if (text.status().code() != ENOENT) {
      spdlog::warn("schedules: cannot read {}: {}; every schedule starts from now", path,
                   text.status().message());
    }
    return;
  }
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("volumes") || !j["volumes"].is_object()) {
    spdlog::warn("schedules: {} is not a schedule state file; every schedule starts from now",
                 path);
    return;
  }
  const int64_t now = Now();
  std::lock_guard lock(mu_);
  for (const auto& item : j["volumes"].items()) {
    const std::string& vol = item.key();
    const json& kinds = item.value();
    if (!kinds.is_object()) continue;
    VolState vs;
    for (bool b : {false, true}) {
      auto it = kinds.find(KindName(b));
      if (it == kinds.end() || !it->is_object()) continue;
      const json& o = *it;
      KindState& k = b ? vs.backup : vs.snapshot;
      k.cron = o.value("cron", "");
      k.baseline_s = o.value("baseline_unix_s", int64_t{0});
      k.last_run_s = o.value("last_run_unix_s", int64_t{0});
      k.result = o.value("result", "");
      k.error = o.value("error", "");
      k.made = o.value("made", "");
      k.pruned = o.value("pruned", uint32_t{0});
      k.target = o.value("target", "");
      if (k.result == "running") {
        // Jobs live in the daemon's memory: this one died with it (and left no manifest).
        k.result = "error";
        k.error = "nbd-datapathd stopped while the backup ran";
        k.last_run_s = k.last_run_s ? k.last_run_s : now;
      }
    }
    state_[vol] = std::move(vs);
  }
  spdlog::info("schedules: state of {} volume(s) loaded from {}", state_.size(), path);
}

void ScheduleRunner::Save() {
  json vols = json::object();
  for (const auto& [vol, vs] : state_) {
    json o = json::object();
    for (bool b : {false, true}) {
      const KindState& k = b ? vs.backup : vs.snapshot;
      if (k.cron.empty()) continue;
      o[KindName(b)] = {{"cron", k.cron},
                        {"baseline_unix_s", k.baseline_s},
                        {"last_run_unix_s", k.last_run_s},
                        {"result", k.result},
                        {"error", k.error},
                        {"made", k.made},
                        {"pruned", k.pruned},
                        {"target", k.target}};
    }
    if (!o.empty()) vols[vol] = o;
  }
  json j = {{"version", 1}, {"volumes", vols}};
  if (nbdcsi::Status s = WriteFileAtomic(opts_.state_dir, kStateFile, j.dump(2) + "\n"); !s.ok()) {
    spdlog::warn("schedules: cannot write the state file: {}", s.message());
  }
}

void ScheduleRunner::Start() {
  thread_ = std::thread([this] {
    std::unique_lock lock(mu_);
    while (!stop_) {
      lock.unlock();
      RunDue();
      lock.lock();
      bool running = deferred_;
      for (const auto& [v, vs] : state_) running = running || vs.backup.result == "running";
      // The next minute boundary of the system clock (plus a little, so the pass sees the new
      // minute), or a few seconds while a backup job runs or waits for a copy.
      auto now =
          std::chrono::time_point_cast<std::chrono::milliseconds>(std::chrono::system_clock::now());
      auto minute = std::chrono::floor<std::chrono::minutes>(now) + std::chrono::minutes(1) +
                    std::chrono::milliseconds(200);
      auto until = running ? std::min(minute, now + std::chrono::seconds(5)) : minute;
      cv_.wait_until(lock, until, [this] { return stop_; });
    }
  });
}

void ScheduleRunner::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ScheduleRunner::RunDue() {
  std::lock_guard run(run_mu_);
  FinishBackups();
  const int64_t now = Now();
  std::vector<VolumeInfo> vols = pool_.List();
  bool changed = false, deferred = false;
  std::map<std::string, VolState> work;
  {
    std::lock_guard lock(mu_);
    // Forget volumes that are gone or have no schedule any more (and kinds they dropped).
    for (auto it = state_.begin(); it != state_.end();) {
      auto v = std::find_if(vols.begin(), vols.end(),
                            [&](const VolumeInfo& i) { return i.name == it->first; });
      if (v == vols.end() || v->schedule.empty()) {
        it = state_.erase(it);
        changed = true;
      } else {
        ++it;
      }
    }
    work = state_;
  }
  for (const VolumeInfo& v : vols) {
    if (v.schedule.empty() || !v.ready) continue;
    VolState& vs = work[v.name];
    for (bool b : {false, true}) {
      const std::string& cron = b ? v.schedule.backup_cron : v.schedule.snapshot_cron;
      KindState& k = b ? vs.backup : vs.snapshot;
      if (cron.empty()) {
        if (!k.cron.empty()) {
          k = KindState{};
          changed = true;
        }
        continue;
      }
      if (k.cron != cron) {  // new or changed: from now on, nothing for the past
        k.cron = cron;
        k.baseline_s = now;
        changed = true;
        continue;
      }
      auto spec = ParseCron(cron);
      if (!spec.ok()) continue;  // the pool validated it; cannot happen
      auto next = spec->Next(k.baseline_s);
      if (!next || *next > now) continue;
      // A pool without reflink copies one snapshot of a volume at a time, and a backup job
      // starts with one too: while another copy runs (the snapshot this pass just took, an
      // earlier one still copying, a user's), the run waits, still due, and a later pass (a few
      // seconds on) starts it, rather than failing with EAGAIN.
      if (CopyRunning(v.name)) {
        deferred = true;
        continue;
      }
      k.baseline_s = now;
      changed = true;
      if (b)
        RunBackup(v.name, v.schedule, now, k);
      else
        RunSnapshot(v.name, v.schedule, now, k);
    }
  }
  std::lock_guard lock(mu_);
  deferred_ = deferred;
  if (!changed) return;
  // Backup jobs finished meanwhile were recorded into state_ by FinishBackups (it runs only in a
  // pass, under run_mu_, so nothing else wrote state_ since the copy): the copy is current.
  state_ = std::move(work);
  Save();
}

bool ScheduleRunner::CopyRunning(const std::string& volume) {
  auto snaps = pool_.ListSnapshots(volume);
  if (!snaps.ok()) return false;
  for (const auto& s : *snaps) {
    if (!s.ready && s.error.empty()) return true;
  }
  return false;
}

void ScheduleRunner::RunSnapshot(const std::string& volume, const VolumeSchedule& s, int64_t now,
                                 KindState& st) {
  st.last_run_s = now;
  st.made.clear();
  st.pruned = 0;
  st.error.clear();
  st.job_id.clear();
  const std::string name = AutoName(now, volume);
  auto snap = pool_.CreateSnapshot(name, volume);
  if (!snap.ok()) {
    st.result = "error";
    st.error = fmt::format("snapshot {}: {}", name, snap.status().message());
    spdlog::warn(
        "schedules: volume {}: scheduled snapshot failed: {}; next try at the next "
        "fire time",
        volume, st.error);
    return;
  }
  st.made = name;
  std::string prune_error = PruneSnapshots(volume, s.snapshot_retain, st.pruned);
  st.result = prune_error.empty() ? "ok" : "error";
  st.error = prune_error;
  spdlog::info("schedules: volume {}: snapshot {} made, {} older pruned{}", volume, name, st.pruned,
               prune_error.empty() ? "" : "; " + prune_error);
}

std::string ScheduleRunner::PruneSnapshots(const std::string& volume, uint32_t retain,
                                           uint32_t& pruned) {
  auto snaps = pool_.ListSnapshots(volume);
  if (!snaps.ok()) return "prune: " + snaps.status().message();
  std::vector<std::string> mine;
  for (const auto& s : *snaps) {
    if (s.source_volume == volume && IsAutoName(s.name, volume)) mine.push_back(s.name);
  }
  std::sort(mine.begin(), mine.end());  // oldest first: the names sort by time
  std::string err;
  for (size_t i = 0; i + retain < mine.size(); ++i) {
    if (nbdcsi::Status s = pool_.DeleteSnapshot(mine[i]); !s.ok()) {
      err = fmt::format("prune {}: {}", mine[i], s.message());
      continue;
    }
    ++pruned;
  }
  return err;
}

void ScheduleRunner::RunBackup(const std::string& volume, const VolumeSchedule& s, int64_t now,
                               KindState& st) {
  if (st.result == "running") {
    // Still running from an earlier fire: this fire is skipped, not queued.
    spdlog::warn("schedules: volume {}: backup {} still runs; this fire time is skipped", volume,
                 st.made);
    return;
  }
  st.last_run_s = now;
  st.made.clear();
  st.pruned = 0;
  st.error.clear();
  st.job_id.clear();
  st.target = s.backup_target;
  auto fail = [&](const std::string& why) {
    st.result = "error";
    st.error = why;
    spdlog::warn(
        "schedules: volume {}: scheduled backup failed: {}; next try at the next fire "
        "time",
        volume, why);
  };
  if (!jobs_) return fail("backups are not available in this daemon");
  auto target = ReadBackupTarget(opts_.secret_dir, s.backup_target);
  if (!target.ok()) return fail(target.status().message());
  const std::string name = AutoName(now, volume);
  backup::BackupRequest req;
  req.target = *target;
  req.name = name;
  req.volume = volume;
  auto job = jobs_->StartBackup(req);
  if (!job.ok()) return fail(fmt::format("backup {}: {}", name, job.status().message()));
  st.made = name;
  st.job_id = job->id;
  st.result = "running";
  spdlog::info("schedules: volume {}: backup {} to {} started (job {})", volume, name,
               s.backup_target, job->id);
}

void ScheduleRunner::FinishBackups() {
  if (!jobs_) return;
  std::vector<std::pair<std::string, KindState>> running;
  {
    std::lock_guard lock(mu_);
    for (const auto& [v, vs] : state_) {
      if (vs.backup.result == "running") running.emplace_back(v, vs.backup);
    }
  }
  if (running.empty()) return;
  for (auto& [volume, k] : running) {
    auto job = jobs_->Get(k.job_id);
    if (job.ok() && job->state == "running") continue;
    if (!job.ok()) {
      k.result = "error";
      k.error =
          fmt::format("backup {}: job {} is gone: {}", k.made, k.job_id, job.status().message());
    } else if (job->state != "succeeded") {
      k.result = "error";
      k.error = fmt::format("backup {}: {}", k.made, job->error);
    } else {
      k.result = "ok";
      uint32_t retain = kDefaultScheduleRetain;
      if (auto v = pool_.Inspect(volume); v.ok()) retain = v->schedule.backup_retain;
      auto target = ReadBackupTarget(opts_.secret_dir, k.target);
      std::string err = target.ok() ? PruneBackups(volume, *target, retain, k.pruned)
                                    : "prune: " + target.status().message();
      if (!err.empty()) {
        k.result = "error";
        k.error = err;
      }
    }
    k.job_id.clear();
    if (k.result == "ok") {
      spdlog::info("schedules: volume {}: backup {} done, {} older pruned", volume, k.made,
                   k.pruned);
    } else {
      spdlog::warn("schedules: volume {}: scheduled backup failed: {}", volume, k.error);
    }
  }
  std::lock_guard lock(mu_);
  bool changed = false;
  for (auto& [volume, k] : running) {
    auto it = state_.find(volume);
    if (it == state_.end() || it->second.backup.made != k.made) continue;
    if (k.result != "running") {
      it->second.backup = k;
      changed = true;
    }
  }
  if (changed) Save();  // not every few seconds while a job runs
}

std::string ScheduleRunner::PruneBackups(const std::string& volume, const backup::Target& t,
                                         uint32_t retain, uint32_t& pruned) {
  auto list = jobs_->ListBackups(t);
  if (!list.ok()) return "prune: " + list.status().message();
  std::vector<std::string> mine;
  for (const auto& m : *list) {
    if (m.source_volume == volume && IsAutoName(m.name, volume)) mine.push_back(m.name);
  }
  std::sort(mine.begin(), mine.end());
  std::string err;
  for (size_t i = 0; i + retain < mine.size(); ++i) {
    auto r = jobs_->Delete(t, mine[i]);
    if (!r.ok()) {
      err = fmt::format("prune backup {}: {}", mine[i], r.status().message());
      continue;
    }
    ++pruned;
  }
  return err;
}

std::vector<std::pair<std::string, ScheduleRunStatus>> ScheduleRunner::All() {
  std::vector<std::pair<std::string, ScheduleRunStatus>> out;
  for (const VolumeInfo& v : pool_.List()) {
    if (v.schedule.empty()) continue;
    for (ScheduleRunStatus& r : Status(v.name, v.schedule)) out.emplace_back(v.name, std::move(r));
  }
  return out;
}

std::vector<ScheduleRunStatus> ScheduleRunner::Status(const std::string& volume) {
  auto v = pool_.Inspect(volume);
  if (!v.ok()) return {};
  return Status(volume, v->schedule);
}

std::vector<ScheduleRunStatus> ScheduleRunner::Status(const std::string& volume,
                                                      const VolumeSchedule& schedule) {
  std::vector<ScheduleRunStatus> out;
  if (schedule.empty()) return out;
  std::lock_guard lock(mu_);
  auto it = state_.find(volume);
  for (bool b : {false, true}) {
    const std::string& cron = b ? schedule.backup_cron : schedule.snapshot_cron;
    if (cron.empty()) continue;
    ScheduleRunStatus r;
    r.kind = KindName(b);
    r.cron = cron;
    int64_t baseline = Now();
    if (it != state_.end()) {
      const KindState& k = b ? it->second.backup : it->second.snapshot;
      if (k.cron == cron) baseline = k.baseline_s;
      r.last_run_unix_ns = k.last_run_s * kNsPerS;
      r.result = k.result;
      r.error = k.error;
      r.made = k.made;
      r.pruned = k.pruned;
      r.job_id = k.job_id;
    }
    if (auto spec = ParseCron(cron); spec.ok()) {
      if (auto n = spec->Next(baseline)) r.next_fire_unix_ns = *n * kNsPerS;
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace nbdcsi::datapath::schedule
