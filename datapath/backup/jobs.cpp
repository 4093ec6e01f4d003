#include "datapath/backup/jobs.h"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <nlohmann/json.hpp>

#include "common/endpoint.h"
#include "common/fs_util.h"
#include "datapath/backup/peer_copy.h"

namespace nbdcsi::datapath::backup {

namespace {

constexpr auto kLogEvery = std::chrono::seconds(5);
constexpr size_t kKeepFinished = 100;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string Mib(uint64_t b) { return fmt::format("{:.1f} MiB", b / 1048576.0); }

}  // namespace

struct BackupJobs::Job {
  std::mutex mu;
  JobInfo info;  // state, error, finished_unix_ns guarded by mu
  Progress progress;
  std::atomic<bool> cancel{false};
  std::atomic<bool> done{false};
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point end;  // guarded by mu
  std::atomic<int64_t> last_log_ns{0};
  std::thread thread;
};

StatusOr<std::unique_ptr<ObjectStore>> BackupJobs::S3Factory(const Target& t) {
  auto url = ParseS3Url(t.url);
  if (!url.ok()) return url.status();
  S3Config c;
  c.endpoint = t.endpoint;
  if (!t.region.empty()) c.region = t.region;
  if (c.endpoint.empty()) c.endpoint = "https://s3." + c.region + ".amazonaws.com";
  c.bucket = url->bucket;
  c.credentials = t.credentials;
  auto store = S3Store::Create(std::move(c));
  if (!store.ok()) return store.status();
  return std::unique_ptr<ObjectStore>(std::move(*store));
}

BackupJobs::BackupJobs(Pool& pool, StoreFactory factory, LeaseTimes lease_times)
    : pool_(pool),
      factory_(std::move(factory)),
      lease_times_(lease_times),
      marker_dir_(pool.Info().dir + "/backup-restores") {
  RemoveInterruptedRestores();
}

void BackupJobs::RemoveInterruptedRestores() {
  DIR* d = ::opendir(marker_dir_.c_str());
  if (!d) return;  // none was ever started
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') names.push_back(e->d_name);
  }
  ::closedir(d);
  for (const std::string& name : names) {
    Status s = pool_.Delete(name);
    if (!s.ok() && s.code() != ENOENT) {
      // Kept: the next start tries again. Until then the volume holds part of a backup.
      spdlog::error(
          "backup: volume \"{}\" was being restored when the daemon stopped and cannot "
          "be removed: {}; delete it",
          name, s.message());
      continue;
    }
    spdlog::warn(
        "backup: volume \"{}\" was being restored when the daemon stopped; the "
        "half-restored volume was deleted (restore it again)",
        name);
    RemoveMarker(name);
  }
}

Status BackupJobs::WriteMarker(const std::string& volume, const std::string& backup,
                               const std::string& target) {
  if (Status s = MkdirP(marker_dir_); !s.ok()) return s;
  return WriteFileAtomic(marker_dir_, volume,
                         nlohmann::json{{"backup", backup}, {"target", target}}.dump());
}

void BackupJobs::RemoveMarker(const std::string& volume) {
  const std::string path = marker_dir_ + "/" + volume;
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    spdlog::warn("backup: removing {}: {}", path, std::strerror(errno));
    return;
  }
  if (Status s = FsyncDir(marker_dir_); !s.ok()) spdlog::warn("backup: {}", s.message());
}

BackupJobs::~BackupJobs() {
  stopping_ = true;
  std::map<std::string, std::shared_ptr<Job>> jobs;
  {
    std::lock_guard lk(mu_);
    jobs = jobs_;
  }
  for (auto& [id, j] : jobs) j->cancel = true;
  for (auto& [id, j] : jobs) {
    if (j->thread.joinable()) j->thread.join();
  }
}

StatusOr<BackupJobs::Opened> BackupJobs::Open(const Target& t, bool create) {
  auto url = ParseS3Url(t.url);
  if (!url.ok()) return url.status();
  auto store = factory_(t);
  if (!store.ok()) return store.status();
  Opened o;
  o.store = std::move(*store);
  o.repo =
      std::make_unique<Repository>(*o.store, url->prefix, lease_times_, t.encryption_key, t.url);
  if (Status s = o.repo->Open(create); !s.ok()) return s;
  return o;
}

JobInfo BackupJobs::Snapshot(const Job& job) {
  auto& j = const_cast<Job&>(job);
  std::lock_guard lk(j.mu);
  JobInfo out = j.info;
  const Progress& p = j.progress;
  out.total_bytes = p.total_bytes;
  out.done_bytes = p.done_bytes;
  if (p.data_total_known) out.data_total_bytes = p.data_total_bytes.load();
  out.data_done_bytes = p.data_done_bytes;
  out.transferred_bytes = p.transferred_bytes;
  out.chunks_uploaded = p.chunks_uploaded;
  out.chunks_reused = p.chunks_reused;
  out.chunks_restored = p.chunks_restored;
  const auto end = j.done ? j.end : std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(end - j.start).count();
  out.rate_bytes_per_s = secs > 0 ? out.transferred_bytes / secs : 0;
  return out;
}

std::shared_ptr<BackupJobs::Job> BackupJobs::Add(std::shared_ptr<Job> job) {
  // Caller holds mu_. Old finished jobs go, oldest id first, and their threads are joined
  // (they have returned already).
  size_t finished = 0;
  for (auto& [id, j] : jobs_) finished += j->done ? 1 : 0;
  for (auto it = jobs_.begin(); it != jobs_.end() && finished >= kKeepFinished;) {
    if (it->second->done) {
      if (it->second->thread.joinable()) it->second->thread.join();
      it = jobs_.erase(it);
      --finished;
    } else {
      ++it;
    }
  }
  job->info.id = fmt::format("{}-{}", job->info.kind, next_id_++);
  job->info.state = "running";
  job->info.started_unix_ns = NowNs();
  jobs_[job->info.id] = job;
  return job;
}

void BackupJobs::Finish(Job& job, const Status& s) {
  {
    std::lock_guard lk(job.mu);
    job.end = std::chrono::steady_clock::now();
    job.info.finished_unix_ns = NowNs();
    job.info.state = s.ok() ? "succeeded" : "failed";
    job.info.error = s.ok() ? "" : s.message();
    job.info.error_code = s.ok() ? 0 : s.code();
  }
  job.done = true;
  JobInfo i = Snapshot(job);
  if (s.ok()) {
    spdlog::info("{} {} of \"{}\" ({}): done, {} of {} transferred at {}/s", i.kind, i.id, i.backup,
                 i.target, Mib(i.transferred_bytes), Mib(i.total_bytes),
                 Mib(static_cast<uint64_t>(i.rate_bytes_per_s)));
  } else {
    spdlog::error("{} {} of \"{}\" ({}): failed: {}", i.kind, i.id, i.backup, i.target,
                  s.message());
  }
}

StatusOr<JobInfo> BackupJobs::StartBackup(const BackupRequest& req) {
  if (Status s = ValidateBackupName(req.name); !s.ok()) return s;
  if (req.snapshot.empty() == req.volume.empty()) {
    return Error(EINVAL, "backup \"{}\": give exactly one source, a snapshot or a volume",
                 req.name);
  }
  if (auto url = ParseS3Url(req.target.url); !url.ok()) return url.status();
  if (!req.snapshot.empty()) {
    auto snap = pool_.InspectSnapshot(req.snapshot);
    if (!snap.ok()) return snap.status();
    if (!snap->ready) {
      return Error(EAGAIN, "snapshot \"{}\" is not ready yet (its copy is running)", req.snapshot);
    }
  } else {
    auto vol = pool_.Inspect(req.volume);
    if (!vol.ok()) return vol.status();
    if (Status s = ValidateSnapshotName("backup-" + req.name); !s.ok()) {
      return Error(EINVAL, "backup \"{}\": the name is too long for its temporary snapshot",
                   req.name);
    }
  }
  if (auto running = RunningBackup(req.target.url, req.name); running.ok()) {
    if (running->snapshot == req.snapshot && running->volume == req.volume) return running;
    return Error(EEXIST, "backup \"{}\" of another source is already running in {} ({})", req.name,
                 req.target.url, running->id);
  }
  auto opened = Open(req.target, /*create=*/true);
  if (!opened.ok()) return opened.status();
  std::lock_guard lk(mu_);
  if (stopping_) return Error(ESHUTDOWN, "the daemon is stopping");
  auto job = std::make_shared<Job>();
  job->info.kind = "backup";
  job->info.backup = req.name;
  job->info.target = req.target.url;
  job->info.snapshot = req.snapshot;
  job->info.volume = req.volume;
  job->info.bandwidth_bytes_per_s = req.bandwidth_bytes_per_s;
  Add(job);
  spdlog::info("backup {}: \"{}\" of {} \"{}\" to {} started{}", job->info.id, req.name,
               req.snapshot.empty() ? "volume" : "snapshot",
               req.snapshot.empty() ? req.volume : req.snapshot, req.target.url,
               req.bandwidth_bytes_per_s
                   ? fmt::format(", limited to {}/s", Mib(req.bandwidth_bytes_per_s))
                   : std::string());
  job->thread = std::thread(&BackupJobs::RunBackup, this, job, req, std::move(*opened));
  return Snapshot(*job);
}

void BackupJobs::RunBackup(std::shared_ptr<Job> job, BackupRequest req, Opened opened) {
  std::string snap_name = req.snapshot;
  bool temporary = false;
  auto run = [&]() -> Status {
    if (snap_name.empty()) {
      // A live volume: cut a point in time first.
      snap_name = "backup-" + req.name;
      // One left by a daemon that died mid-backup holds an older point in time, and
      // CreateSnapshot would hand it back as if it were new.
      if (Status d = pool_.DeleteSnapshot(snap_name); !d.ok() && d.code() != ENOENT) return d;
      auto snap = pool_.CreateSnapshot(snap_name, req.volume);
      if (!snap.ok()) return snap.status();
      temporary = true;
      while (!snap->ready) {
        if (!snap->error.empty()) {
          return Error(EIO, "snapshot \"{}\" of volume \"{}\" failed: {}", snap_name, req.volume,
                       snap->error);
        }
        if (job->cancel) return Error(ECANCELED, "backup \"{}\": cancelled", req.name);
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        snap = pool_.InspectSnapshot(snap_name);
        if (!snap.ok()) return snap.status();
      }
    }
    auto snap = pool_.InspectSnapshot(snap_name);
    if (!snap.ok()) return snap.status();
    int fd = ::open(snap->path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      return Error(errno, "backup \"{}\": open {}: {}", req.name, snap->path, std::strerror(errno));
    }
    BackupSpec spec;
    spec.name = req.name;
    spec.fd = fd;
    spec.size = snap->size;
    spec.source_volume = snap->source_volume;
    spec.source_snapshot = req.snapshot.empty() ? "" : snap_name;
    spec.created_unix_ns = snap->created_unix_ns;
    spec.bandwidth_bytes_per_s = req.bandwidth_bytes_per_s;
    spec.cancel = &job->cancel;
    spec.after_chunk = [&](uint64_t) {
      const int64_t now = NowNs();
      int64_t last = job->last_log_ns.load();
      if (now - last < std::chrono::nanoseconds(kLogEvery).count() ||
          !job->last_log_ns.compare_exchange_strong(last, now)) {
        return;
      }
      JobInfo i = Snapshot(*job);
      spdlog::info("backup {} \"{}\": {:.0f}% ({} of {}), {} uploaded at {}/s", i.id, i.backup,
                   i.total_bytes ? 100.0 * i.done_bytes / i.total_bytes : 0.0, Mib(i.done_bytes),
                   Mib(i.total_bytes), Mib(i.transferred_bytes),
                   Mib(static_cast<uint64_t>(i.rate_bytes_per_s)));
    };
    auto m = backup::RunBackup(*opened.repo, spec, &job->progress);
    ::close(fd);
    return m.status();
  };
  Status s = run();
  if (temporary) {
    if (Status d = pool_.DeleteSnapshot(snap_name); !d.ok()) {
      spdlog::warn("backup {}: deleting its temporary snapshot \"{}\": {}", job->info.id, snap_name,
                   d.message());
    }
  }
  Finish(*job, s);
}

StatusOr<std::shared_ptr<Volume>> BackupJobs::CreateMarked(const std::string& volume,
                                                           uint64_t size,
                                                           const std::string& backup,
                                                           const std::string& target) {
  {
    std::lock_guard lk(mu_);
    if (restoring_.count(volume) || pool_.Inspect(volume).ok()) {
      return Error(EEXIST, "volume \"{}\" already exists; a restore makes a new volume", volume);
    }
    restoring_.insert(volume);
  }
  // Durable before the volume exists: a daemon that dies from here on removes the volume at its
  // next start instead of serving half a backup as if it were whole.
  if (Status s = WriteMarker(volume, backup, target); !s.ok()) {
    std::lock_guard lk(mu_);
    restoring_.erase(volume);
    return s;
  }
  auto created = pool_.Create(CreateSpec::Blank(volume, size));
  std::shared_ptr<Volume> vol = created.ok() ? pool_.Acquire(volume) : nullptr;
  if (created.ok() && !vol) (void)pool_.Delete(volume);
  if (!created.ok() || !vol) {
    RemoveMarker(volume);
    std::lock_guard lk(mu_);
    restoring_.erase(volume);
    if (!created.ok()) return created.status();
    return Error(EIO, "volume \"{}\" vanished right after it was created", volume);
  }
  return vol;
}

void BackupJobs::EndMarked(Job& job, const std::string& volume, const Status& s) {
  bool remove_marker = true;
  if (!s.ok()) {
    // Nothing half-restored stays behind looking like a volume.
    if (Status d = pool_.Delete(volume); !d.ok() && d.code() != ENOENT) {
      spdlog::warn(
          "{} {}: removing the unfinished volume \"{}\": {} (the next start "
          "tries again)",
          job.info.kind, job.info.id, volume, d.message());
      remove_marker = false;
    }
  }
  // On success only after the job's fsync: the data is durable before the marker goes.
  if (remove_marker) RemoveMarker(volume);
  std::lock_guard lk(mu_);
  restoring_.erase(volume);
}

StatusOr<JobInfo> BackupJobs::StartRestore(const RestoreRequest& req) {
  if (Status s = ValidateBackupName(req.name); !s.ok()) return s;
  if (Status s = ValidateVolumeName(req.volume); !s.ok()) return s;
  auto opened = Open(req.target);
  if (!opened.ok()) return opened.status();
  auto m = opened->repo->Read(req.name);
  if (!m.ok()) return m.status();
  auto vol = CreateMarked(req.volume, m->volume_size, req.name, req.target.url);
  if (!vol.ok()) return vol.status();
  std::lock_guard lk(mu_);
  auto job = std::make_shared<Job>();
  job->info.kind = "restore";
  job->info.backup = req.name;
  job->info.target = req.target.url;
  job->info.volume = req.volume;
  Add(job);
  spdlog::info("restore {}: \"{}\" from {} into new volume \"{}\" ({} chunks) started",
               job->info.id, req.name, req.target.url, req.volume, m->chunks.size());
  job->thread =
      std::thread(&BackupJobs::RunRestore, this, job, req, std::move(*opened), *m, *vol);
  return Snapshot(*job);
}

void BackupJobs::RunRestore(std::shared_ptr<Job> job, RestoreRequest req, Opened opened, Manifest m,
                            std::shared_ptr<Volume> vol) {
  RestoreSpec spec;
  spec.fd = vol->buffered_fd();
  spec.cancel = &job->cancel;
  Status s = backup::RunRestore(*opened.repo, m, spec, &job->progress);
  if (s.ok() && !vol->CheckDataFile()) {
    s = Error(EIO, "restore into \"{}\": the volume was deleted while it was being restored",
              req.volume);
  }
  vol.reset();
  EndMarked(*job, req.volume, s);
  Finish(*job, s);
}

StatusOr<JobInfo> BackupJobs::StartCopy(const CopyRequest& req) {
  if (Status s = ValidateVolumeName(req.volume); !s.ok()) return s;
  auto ep = ParseEndpoint(req.endpoint);
  if (!ep.ok()) return Error(EINVAL, "copy into \"{}\": source endpoint: {}", req.volume,
                             ep.status().message());
  if (req.export_name.empty()) return Error(EINVAL, "copy into \"{}\": no source export", req.volume);
  {
    std::lock_guard lk(mu_);
    for (auto& [id, j] : jobs_) {
      if (j->done || j->info.kind != "copy" || j->info.volume != req.volume) continue;
      if (j->info.target == req.endpoint && j->info.backup == req.export_name) return Snapshot(*j);
      return Error(EEXIST, "volume \"{}\" is being copied from {} at {} ({})", req.volume,
                   j->info.backup, j->info.target, j->info.id);
    }
  }
  replica::ClientOptions o;
  o.endpoint = *ep;
  o.export_name = req.export_name;
  o.tls = peer_tls_;
  if (o.tls.enabled()) o.tls.server_node = req.source_node;
  o.connections = 2;
  o.read_only = true;
  o.base_allocation = true;
  o.handshake_timeout = std::chrono::seconds(5);
  o.request_timeout = std::chrono::seconds(30);
  o.name = fmt::format("{} at {}", req.export_name, req.endpoint);
  auto client = replica::ReplicaClient::Connect(o);
  if (!client.ok()) {
    int code = client.status().code();
    // The peer is down or out of reach: a retry may find it (UNAVAILABLE), not "no such thing".
    if (code == ECONNREFUSED || code == ETIMEDOUT || code == ECONNRESET ||
        code == EHOSTUNREACH || code == ENETUNREACH || code == EPIPE) {
      code = EAGAIN;
    }
    return Error(code, "copy into \"{}\": cannot read {} at {}: {}", req.volume, req.export_name,
                 req.endpoint, client.status().message());
  }
  const uint64_t source_size = (*client)->export_properties().size;
  if (req.size < source_size) {
    return Error(EINVAL, "copy into \"{}\": {} bytes asked, the source holds {}", req.volume,
                 req.size, source_size);
  }
  auto vol = CreateMarked(req.volume, req.size, req.export_name, req.endpoint);
  if (!vol.ok()) return vol.status();
  std::lock_guard lk(mu_);
  auto job = std::make_shared<Job>();
  job->info.kind = "copy";
  job->info.backup = req.export_name;
  job->info.target = req.endpoint;
  job->info.volume = req.volume;
  job->progress.total_bytes = source_size;
  Add(job);
  spdlog::info("copy {}: \"{}\" at {} (node {}) into new volume \"{}\" ({} bytes) started",
               job->info.id, req.export_name, req.endpoint,
               req.source_node.empty() ? "-" : req.source_node, req.volume, req.size);
  std::shared_ptr<replica::ReplicaClient> source(std::move(*client));
  job->thread = std::thread(&BackupJobs::RunCopy, this, job, req, std::move(source), *vol);
  return Snapshot(*job);
}

void BackupJobs::RunCopy(std::shared_ptr<Job> job, CopyRequest req,
                         std::shared_ptr<replica::ReplicaClient> source,
                         std::shared_ptr<Volume> vol) {
  Status s = CopyFromPeer(*source, vol->direct_fd(), vol->buffered_fd(), &job->cancel,
                          [&](const PeerCopyProgress& p) {
                            job->progress.done_bytes = p.done_bytes;
                            job->progress.data_done_bytes = p.copied_bytes;
                            job->progress.transferred_bytes = p.copied_bytes;
                            const int64_t now = NowNs();
                            if (now - job->last_log_ns.load() <
                                std::chrono::nanoseconds(kLogEvery).count()) {
                              return;
                            }
                            job->last_log_ns = now;
                            JobInfo i = Snapshot(*job);
                            spdlog::info("copy {} into \"{}\": {:.0f}% ({} of {}), {} at {}/s",
                                         i.id, i.volume,
                                         i.total_bytes ? 100.0 * i.done_bytes / i.total_bytes : 0.0,
                                         Mib(i.done_bytes), Mib(i.total_bytes),
                                         Mib(i.transferred_bytes),
                                         Mib(static_cast<uint64_t>(i.rate_bytes_per_s)));
                          });
  source->Close();
  if (s.ok() && !vol->CheckDataFile()) {
    s = Error(EIO, "copy into \"{}\": the volume was deleted while it was being filled",
              req.volume);
  }
  vol.reset();
  EndMarked(*job, req.volume, s);
  Finish(*job, s);
}

StatusOr<JobInfo> BackupJobs::Get(const std::string& id) {
  std::shared_ptr<Job> j;
  {
    std::lock_guard lk(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return Error(ENOENT, "job \"{}\" not found", id);
    j = it->second;
  }
  return Snapshot(*j);
}

std::vector<JobInfo> BackupJobs::List() {
  std::vector<std::shared_ptr<Job>> js;
  {
    std::lock_guard lk(mu_);
    for (auto& [id, j] : jobs_) js.push_back(j);
  }
  std::vector<JobInfo> out;
  for (auto& j : js) out.push_back(Snapshot(*j));
  std::sort(out.begin(), out.end(), [](const JobInfo& a, const JobInfo& b) {
    return a.started_unix_ns < b.started_unix_ns;
  });
  return out;
}

StatusOr<JobInfo> BackupJobs::RunningBackup(const std::string& target_url,
                                            const std::string& name) {
  std::lock_guard lk(mu_);
  for (auto& [id, j] : jobs_) {
    if (j->done || j->info.kind != "backup") continue;
    if (j->info.target == target_url && j->info.backup == name) return Snapshot(*j);
  }
  return Error(ENOENT, "no backup \"{}\" running", name);
}

StatusOr<std::vector<Manifest>> BackupJobs::ListBackups(const Target& t) {
  auto opened = Open(t);
  if (!opened.ok()) return opened.status();
  auto names = opened->repo->ListNames();
  if (!names.ok()) return names.status();
  std::vector<Manifest> out;
  for (const std::string& n : *names) {
    auto m = opened->repo->Read(n);
    // Deleted between the listing and the read: not a backup any more.
    if (!m.ok() && m.status().code() == ENOENT) continue;
    if (!m.ok()) return m.status();
    out.push_back(std::move(*m));
  }
  return out;
}

StatusOr<Manifest> BackupJobs::Inspect(const Target& t, const std::string& name) {
  auto opened = Open(t);
  if (!opened.ok()) return opened.status();
  return opened->repo->Read(name);
}

StatusOr<GcResult> BackupJobs::Delete(const Target& t, const std::string& name) {
  auto opened = Open(t);
  if (!opened.ok()) return opened.status();
  return opened->repo->Delete(name);
}

}  // namespace nbdcsi::datapath::backup
