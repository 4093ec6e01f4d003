// Recurring snapshots and backups (issue 18): nbd-datapathd runs the schedules of the volumes in
// its pool. Why here and not in the controller: the node owns the data, needs no cluster state
// for it, keeps running while the controller is down, and already runs backup jobs
// (datapath/backup/jobs.h). The schedule itself is stored with the volume (Pool::SetSchedule,
// VolumeMeta::schedule); this runner only fires it. docs/design.md "Schedules".
//
// Each pass (RunDue; the thread runs one at every minute boundary of the clock, and every few
// seconds while a backup job it started runs):
//   1. backups it started whose jobs ended are recorded (ok or the job's error) and, when ok,
//      that volume's schedule-made backups beyond backup_retain are deleted, oldest first
//      (BackupJobs::Delete: the repository's GC rules apply);
//   2. for every volume with a schedule, per kind: when the first fire time after the kind's
//      baseline has passed, it runs once and the baseline becomes now. So a daemon that was
//      down over several fire times catches up with ONE run at start, not one per missed slot,
//      and a run that fails is recorded and retried at the next fire time, not at once. A new or
//      changed cron expression starts from now (no run for the past).
// Snapshot runs: CreateSnapshot("auto-<yyyymmddThhmm UTC>-<volume>"), then the volume's
// schedule-made snapshots (by that name form and source volume) beyond snapshot_retain are
// deleted, oldest first; no other snapshot is ever touched.
// Backup runs: a BackupJobs backup of the live volume (its temporary-snapshot path) named the
// same way into backup_target, with credentials read at fire time from the secret directory
// (files AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN,
// AWS_ENDPOINT_URL, AWS_REGION); never logged. A fire while the previous backup still runs is
// skipped (logged, not queued): the next fire time tries again. A due run whose volume has a
// snapshot still being copied (a pool without reflink copies one at a time, and a backup job
// starts with a snapshot), such as the one the snapshot schedule took in the same pass, waits
// for it: it stays due, and the passes every few seconds start it once the copy is done.
// Names: the volume's name when it is at most kMaxNameVolumePart bytes, else a prefix of it and
// a 16-hex-digit hash; so names are unique per volume and minute, sort by time within a volume,
// and "backup-" + name (the job's temporary snapshot) stays within the pool's 128 bytes.
// The last run of each kind (time, result, what it made, how many it pruned) and the baseline
// are kept in memory and in POOL/schedule-state.json (atomic write, file and directory
// fsynced), so a restart still shows them and knows what it missed. A backup recorded as
// running at start died with the daemon: it is recorded as failed.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "common/volume_schedule.h"
#include "datapath/backup/jobs.h"
#include "datapath/pool/pool.h"
#include "datapath/schedule/status.h"

namespace nbdcsi::datapath::schedule {

// The runner's time, injected so tests drive it (no waiting on the wall clock).
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t NowUnixS() = 0;
};

class SystemClock final : public Clock {
 public:
  int64_t NowUnixS() override;
};

struct RunnerOptions {
  std::string state_dir;   // where schedule-state.json lives: the pool directory
  std::string secret_dir;  // --backup-secret-dir; "": scheduled backups fail (no credentials)
  Clock* clock = nullptr;  // null: the system clock
};

inline constexpr const char* kStateFile = "schedule-state.json";
inline constexpr size_t kMaxNameVolumePart = 100;

// "auto-20261207T0545-<volume part>": the name of a schedule-made snapshot or backup.
std::string AutoName(int64_t unix_s, const std::string& volume);
// Whether `name` is AutoName(t, volume) for some minute t.
bool IsAutoName(const std::string& name, const std::string& volume);

// Credentials and endpoint of scheduled backups from the secret directory. EINVAL naming the
// directory or the missing key file; never the values.
StatusOr<backup::Target> ReadBackupTarget(const std::string& secret_dir, const std::string& url);

class ScheduleRunner {
 public:
  // `jobs` may be null: backup runs then fail ("backups are not available").
  ScheduleRunner(Pool& pool, backup::BackupJobs* jobs, RunnerOptions opts);
  ~ScheduleRunner();  // Stop()

  // Reads the state file (a missing one is an empty state; an unreadable one is logged and
  // ignored: the runner then starts every schedule from now).
  void Load();
  // The thread: RunDue at each minute boundary of the system clock, more often while backups run.
  void Start();
  void Stop();

  // One pass at the clock's now (see the top). Thread-safe; passes do not overlap.
  void RunDue();

  // The runs of `volume`'s schedule, one per kind `schedule` (the volume's now) has. Without
  // `schedule` the pool is asked for it.
  std::vector<ScheduleRunStatus> Status(const std::string& volume, const VolumeSchedule& schedule);
  std::vector<ScheduleRunStatus> Status(const std::string& volume);
  // Every scheduled volume's runs (metrics).
  std::vector<std::pair<std::string, ScheduleRunStatus>> All();

 private:
  struct KindState {
    std::string cron;
    int64_t baseline_s = 0;  // fires at the first fire time after this
    int64_t last_run_s = 0;
    std::string result, error, made, job_id, target;
    uint32_t pruned = 0;
  };
  struct VolState {
    KindState snapshot, backup;
  };

  void FinishBackups();
  void RunSnapshot(const std::string& volume, const VolumeSchedule& s, int64_t now, KindState& st);
  void RunBackup(const std::string& volume, const VolumeSchedule& s, int64_t now, KindState& st);
  // A snapshot of `volume` still being filled by a background copy.
  bool CopyRunning(const std::string& volume);
  std::string PruneSnapshots(const std::string& volume, uint32_t retain, uint32_t& pruned);
  std::string PruneBackups(const std::string& volume, const backup::Target& t, uint32_t retain,
                           uint32_t& pruned);
  void Save();  // under mu_
  int64_t Now() { return clock_->NowUnixS(); }

  Pool& pool_;
  backup::BackupJobs* jobs_;
  RunnerOptions opts_;
  SystemClock system_clock_;
  Clock* clock_;
  std::mutex run_mu_;  // one pass at a time
  std::mutex mu_;
  std::map<std::string, VolState> state_;  // guarded by mu_
  std::condition_variable cv_;
  bool stop_ = false;      // guarded by mu_
  bool deferred_ = false;  // a due run waits for a copy; guarded by mu_
  std::thread thread_;
};

}  // namespace nbdcsi::datapath::schedule
