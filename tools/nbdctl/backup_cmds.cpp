#include "tools/nbdctl/backup_cmds.h"

#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include <unistd.h>

#include "common/quantity.h"
#include "datapath/api/backup.grpc.pb.h"
#include "tools/nbdctl/backup_render.h"
#include "tools/nbdctl/progress.h"

namespace nbdcsi::nbdctl {
namespace {

using nlohmann::json;
constexpr auto kPollInterval = std::chrono::milliseconds(250);

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace

struct BackupCommands::Impl {
  explicit Impl(const GlobalOptions& g) : global(g) {}

  const GlobalOptions& global;
  std::string name, target, endpoint, region, credentials_file, profile, snapshot, volume,
      bandwidth, job_id, encryption_key_file;
  bool wait = false;

  std::unique_ptr<Connection> conn;
  std::unique_ptr<bv1::Backups::Stub> stub;

  void Connect() {
    conn = std::make_unique<Connection>(Peer::kDatapath, "--api", global.api, global.timeout_s);
    stub = bv1::Backups::NewStub(conn->channel());
  }

  // The target with its credentials: --credentials-file if given, else the environment.
  bv1::BackupTarget Target() const {
    bv1::BackupTarget t;
    t.set_url(target);
    t.set_endpoint(endpoint.empty() ? Env("AWS_ENDPOINT_URL") : endpoint);
    t.set_region(region.empty() ? Env("AWS_REGION") : region);
    if (!credentials_file.empty()) {
      std::ifstream in(credentials_file);
      if (!in)
        throw UsageError{fmt::format("--credentials-file {}: cannot read it", credentials_file)};
      std::stringstream ss;
      ss << in.rdbuf();
      std::string p = profile.empty() ? Env("AWS_PROFILE") : profile;
      auto c = ParseCredentialsFile(ss.str(), p.empty() ? "default" : p);
      if (!c.ok()) {
        throw UsageError{
            fmt::format("--credentials-file {}: {}", credentials_file, c.status().message())};
      }
      t.set_access_key_id(c->access_key_id);
      t.set_secret_access_key(c->secret_access_key);
      t.set_session_token(c->session_token);
    } else {
      t.set_access_key_id(Env("AWS_ACCESS_KEY_ID"));
      t.set_secret_access_key(Env("AWS_SECRET_ACCESS_KEY"));
      t.set_session_token(Env("AWS_SESSION_TOKEN"));
    }
    if (t.access_key_id().empty() || t.secret_access_key().empty()) {
      throw UsageError{
          "backup: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give "
          "--credentials-file"};
    }
    t.set_encryption_key(EncryptionKey());
    return t;
  }

  // --encryption-key-file (its content, one trailing newline dropped, so `echo KEY >FILE`
  // works), else $NBDCSI_BACKUP_ENCRYPTION_KEY, else none (a plain target).
  std::string EncryptionKey() const {
    if (encryption_key_file.empty()) return Env("NBDCSI_BACKUP_ENCRYPTION_KEY");
    std::ifstream in(encryption_key_file, std::ios::binary);
    if (!in) {
      throw UsageError{
          fmt::format("--encryption-key-file {}: cannot read it", encryption_key_file)};
    }
    std::stringstream ss;
    ss << in.rdbuf();
    std::string key = ss.str();
    if (!key.empty() && key.back() == '\n') key.pop_back();
    if (!key.empty() && key.back() == '\r') key.pop_back();
    if (key.empty()) {
      throw UsageError{
          fmt::format("--encryption-key-file {}: the file is empty", encryption_key_file)};
    }
    return key;
  }

  int Show(const json& j, const std::string& text) const {
    Print(global.output, j, text);
    return kExitOk;
  }

  // --wait: polls the job until it ends, with progress on stderr in allocated data (progress.h
  // says where and when). Bounded by --timeout only when it was given: a backup of a large
  // volume takes as long as it takes, and the job goes on in the daemon anyway.
  int WaitJob(bv1::BackupJob job) {
    const bool bounded = global.timeout_opt && global.timeout_opt->count() > 0;
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(global.timeout_s * 1000));
    ProgressSink progress(ProgressSink::ModeFor(global.output, STDERR_FILENO), std::cerr,
                          fmt::format("{} {}", job.kind(), job.backup()), ProgressClock::now());
    auto sample = [](const bv1::BackupJob& j) {
      CopySample s;
      s.at = ProgressClock::now();
      s.data_done = j.data_done_bytes();
      if (j.has_data_total_bytes()) s.data_total = j.data_total_bytes();
      return s;
    };
    while (job.state() == "running") {
      progress.Update(sample(job));
      if (bounded && std::chrono::steady_clock::now() >= deadline) {
        progress.Finish(false, ProgressClock::now(), 0);
        std::cerr << fmt::format(
            "nbdctl: {} is still running after {}s (--timeout): {}; it continues in the daemon "
            "(nbdctl backup job {})\n",
            job.id(), global.timeout_s, ProgressLine(job), job.id());
        return kExitServer;
      }
      std::this_thread::sleep_for(kPollInterval);
      bv1::GetBackupJobRequest req;
      req.set_id(job.id());
      bv1::BackupJobResponse resp;
      grpc::Status s = stub->GetBackupJob(conn->Ctx().get(), req, &resp);
      if (!s.ok()) {
        progress.Finish(false, ProgressClock::now(), 0);
        return conn->Fail(fmt::format("wait for job {}", job.id()), s);
      }
      job = resp.job();
    }
    if (job.state() != "succeeded") {
      progress.Finish(false, ProgressClock::now(), 0);
      if (global.output == "json") Print(global.output, BackupJobJson(job), "");
      std::cerr << fmt::format("nbdctl: {} \"{}\" failed: {}\n", job.kind(), job.backup(),
                               job.error());
      return kExitServer;
    }
    progress.Finish(true, ProgressClock::now(), job.data_total_bytes());
    return Show(BackupJobJson(job), BackupJobDetails(job));
  }

  int Create() {
    if (snapshot.empty() == volume.empty()) {
      throw UsageError{"backup create: give exactly one of --snapshot and --volume"};
    }
    bv1::CreateBackupRequest req;
    *req.mutable_target() = Target();
    req.set_name(name);
    req.set_snapshot(snapshot);
    req.set_volume(volume);
    if (!bandwidth.empty()) {
      auto b = ParseQuantity(bandwidth);
      if (!b.ok() || *b == 0) {
        throw UsageError{fmt::format("--bandwidth: {}",
                                     b.ok() ? "must be greater than 0" : b.status().message())};
      }
      req.set_bandwidth_bytes_per_s(*b);
    }
    Connect();
    bv1::BackupJobResponse resp;
    if (int rc = conn->Call(*stub, &bv1::Backups::Stub::CreateBackup, req, &resp,
                            fmt::format("create backup \"{}\"", name))) {
      return rc;
    }
    if (wait) return WaitJob(resp.job());
    return Show(BackupJobJson(resp.job()), BackupJobDetails(resp.job()));
  }

  int Restore() {
    bv1::RestoreBackupRequest req;
    *req.mutable_target() = Target();
    req.set_name(name);
    req.set_volume(volume);
    Connect();
    bv1::BackupJobResponse resp;
    if (int rc = conn->Call(*stub, &bv1::Backups::Stub::RestoreBackup, req, &resp,
                            fmt::format("restore backup \"{}\"", name))) {
      return rc;
    }
    if (wait) return WaitJob(resp.job());
    if (global.output != "json") {
      std::cerr << fmt::format(
          "nbdctl: volume \"{}\" is being restored; do not use it until job {} has "
          "succeeded\n",
          volume, resp.job().id());
    }
    return Show(BackupJobJson(resp.job()), BackupJobDetails(resp.job()));
  }

  int List() {
    bv1::ListBackupsRequest req;
    *req.mutable_target() = Target();
    Connect();
    bv1::ListBackupsResponse resp;
    if (int rc = conn->Call(*stub, &bv1::Backups::Stub::ListBackups, req, &resp,
                            fmt::format("list backups in {}", target))) {
      return rc;
    }
    json all = json::array();
    for (const auto& b : resp.backups()) all.push_back(BackupJson(b));
    return Show({{"backups", all}}, BackupListTable(resp));
  }

  int Inspect() {
    bv1::GetBackupRequest req;
    *req.mutable_target() = Target();
    req.set_name(name);
    Connect();
    bv1::GetBackupResponse resp;
    if (int rc = conn->Call(*stub, &bv1::Backups::Stub::GetBackup, req, &resp,
                            fmt::format("inspect backup \"{}\"", name))) {
      return rc;
    }
    json j = json::object();
    std::string text;
    if (resp.has_backup()) {
      j["backup"] = BackupJson(resp.backup());
      text += BackupDetails(resp.backup());
    }
    if (resp.has_job()) {
      j["job"] = BackupJobJson(resp.job());
      if (!text.empty()) text += "\n";
      text += BackupJobDetails(resp.job());
    }
    return Show(j, text);
  }

  int Delete() {
    bv1::DeleteBackupRequest req;
    *req.mutable_target() = Target();
    req.set_name(name);
    Connect();
    bv1::DeleteBackupResponse resp;
    if (int rc = conn->Call(*stub, &bv1::Backups::Stub::DeleteBackup, req, &resp,
                            fmt::format("delete backup \"{}\"", name))) {
      return rc;
    }
    std::string text =
        resp.gc_deferred()
            ? fmt::format(
                  "backup \"{}\" deleted; its chunks are collected later (a backup is "
                  "running in this target)\n",
                  name)
            : fmt::format(
                  "backup \"{}\" deleted; {} unreferenced chunks ({} bytes) freed, {} "
                  "kept\n",
                  name, resp.chunks_deleted(), resp.bytes_freed(), resp.chunks_kept());
    return Show({{"name", name},
                 {"gc_deferred", resp.gc_deferred()},
                 {"chunks_deleted", resp.chunks_deleted()},
                 {"bytes_freed", resp.bytes_freed()},
                 {"chunks_kept", resp.chunks_kept()}},
                text);
  }

  int Job() {
    bv1::GetBackupJobRequest req;
    req.set_id(job_id);
    Connect();
    bv1::BackupJobResponse resp;
    if (int rc = conn->Call(*stub, &bv1::Backups::Stub::GetBackupJob, req, &resp,
                            fmt::format("get job {}", job_id))) {
      return rc;
    }
    if (wait) return WaitJob(resp.job());
    return Show(BackupJobJson(resp.job()), BackupJobDetails(resp.job()));
  }

  int Jobs() {
    Connect();
    bv1::ListBackupJobsResponse resp;
    if (int rc =
            conn->Call(*stub, &bv1::Backups::Stub::ListBackupJobs, {}, &resp, "list backup jobs")) {
      return rc;
    }
    json all = json::array();
    for (const auto& j : resp.jobs()) all.push_back(BackupJobJson(j));
    return Show({{"jobs", all}}, BackupJobsTable(resp));
  }

  Flags TargetFlags(Flags more = nullptr) {
    return [this, more = std::move(more)](CLI::App& c) {
      c.add_option("--target", target, "Where backups live: s3://BUCKET[/PREFIX]")->required();
      c.add_option("--endpoint", endpoint,
                   "S3 endpoint, http(s)://HOST[:PORT] (default: $AWS_ENDPOINT_URL, else AWS)");
      c.add_option("--region", region, "S3 region (default: $AWS_REGION, else us-east-1)");
      c.add_option("--credentials-file", credentials_file,
                   "AWS-style credentials file (default: $AWS_ACCESS_KEY_ID and "
                   "$AWS_SECRET_ACCESS_KEY)");
      c.add_option("--profile", profile,
                   "Profile in --credentials-file (default: $AWS_PROFILE, "
                   "else default)");
      c.add_option("--encryption-key-file", encryption_key_file,
                   "File holding the target's encryption key (default: "
                   "$NBDCSI_BACKUP_ENCRYPTION_KEY, else none: an unencrypted target). The first "
                   "backup with a key into an empty prefix makes it an encrypted target; a lost "
                   "key cannot be recovered");
      if (more) more(c);
    };
  }
  Command Cmd(std::vector<std::string> path, std::string help, Flags flags, int (Impl::*fn)()) {
    return Bound(std::move(path), std::move(help), std::move(flags), this, fn);
  }

  void Register(CommandTree& tree) {
    tree.Add(Group{{"backup"},
                   "Backups of snapshots and volumes to S3-compatible object storage",
                   "backup",
                   nullptr});
    tree.Add(Cmd({"backup", "create"},
                 "Back up a snapshot (or a volume, through a temporary snapshot): only chunks "
                 "the target does not hold yet are uploaded",
                 Positional("NAME", &name, "Backup name", TargetFlags([this](CLI::App& c) {
                              auto* s = c.add_option("--snapshot", snapshot, "Snapshot to back up");
                              auto* v =
                                  c.add_option("--volume", volume, "Volume to back up as of now");
                              s->excludes(v);
                              c.add_option("--bandwidth", bandwidth,
                                           "Upload limit in bytes/s, a quantity (50Mi)");
                              c.add_flag("--wait", wait,
                                         "Return once the backup has finished, with progress on "
                                         "stderr");
                            })),
                 &Impl::Create));
    tree.Add(Cmd({"backup", "list"}, "List the backups in a target",
                 TargetFlags([](CLI::App& c) { c.alias("ls"); }), &Impl::List));
    tree.Add(Cmd({"backup", "inspect"},
                 "Show a backup, and its progress while this daemon is still making it",
                 Positional("NAME", &name, "Backup name", TargetFlags()), &Impl::Inspect));
    tree.Add(Cmd(
        {"backup", "delete"}, "Delete a backup and the chunks no other backup uses",
        Positional("NAME", &name, "Backup name", TargetFlags([](CLI::App& c) { c.alias("rm"); })),
        &Impl::Delete));
    tree.Add(Cmd({"backup", "restore"},
                 "Restore a backup into a new volume (every chunk's hash is verified)",
                 Positional("NAME", &name, "Backup name", TargetFlags([this](CLI::App& c) {
                              c.add_option("--volume", volume, "The new volume")->required();
                              c.add_flag("--wait", wait,
                                         "Return once the restore has finished, with progress "
                                         "on stderr");
                            })),
                 &Impl::Restore));
    tree.Add(Cmd(
        {"backup", "job"}, "Show a backup or restore job",
        Positional("ID", &job_id, "Job id (backup-N, restore-N)",
                   [this](CLI::App& c) { c.add_flag("--wait", wait, "Wait for the job to end"); }),
        &Impl::Job));
    tree.Add(Cmd({"backup", "jobs"}, "List this daemon's backup and restore jobs", nullptr,
                 &Impl::Jobs));
  }
};

BackupCommands::BackupCommands(CommandTree& tree, const GlobalOptions& global)
    : impl_(std::make_unique<Impl>(global)) {
  impl_->Register(tree);
}

BackupCommands::~BackupCommands() = default;

}  // namespace nbdcsi::nbdctl
