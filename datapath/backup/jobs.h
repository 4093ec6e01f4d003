// Backups and restores of the pool's snapshots and volumes as jobs of nbd-datapathd: each runs
// on its own thread, so a client that disconnects (nbdctl without --wait, or killed) does not
// stop it; clients poll Get(id). Listing, inspecting and deleting backups are quick and
// synchronous.
//
// Sources: a snapshot (immutable: its data file is read directly), or a live volume, which is
// first snapshotted as "backup-NAME" in the pool (point in time, writes paused only for the
// cut) and that snapshot deleted when the job ends, whatever its outcome.
// Restores write into a new volume: it must not exist. It is created blank with the backup's
// size and filled through its data file; until the job has succeeded the volume must not be
// used (known limit: the pool has no "not ready" state for it, nbdctl says so). A failed or
// cancelled restore deletes the volume it created.
// Copies from a peer (issue 16, restores and clones across nodes; peer_copy.h) are the third
// kind: "create volume NAME of SIZE from the export X of the node at ENDPOINT", read over NBD
// with this node's certificate; they follow the restore's rules (a new volume, a marker while it
// is filled, deleted when the copy fails or the daemon dies in it).
// Jobs live in memory: a daemon restart forgets them. A backup that dies leaves no manifest
// (engine.h); a restore that dies leaves a marker in POOL/backup-restores/, and the next start
// deletes the half-restored volume.
// Credentials and the encryption key are held only by the job's store and repository and never
// logged. Every call that opens a target settles its encryption first (Repository::Open): a
// missing, unexpected or wrong key fails the call itself, before a job starts.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "datapath/backup/engine.h"
#include "datapath/backup/s3_store.h"
#include "datapath/pool/pool.h"
#include "datapath/replica/client.h"

namespace nbdcsi::datapath::backup {

struct Target {
  std::string url;       // s3://bucket/prefix
  std::string endpoint;  // http(s)://host[:port]
  std::string region;
  S3Credentials credentials;
  std::string encryption_key;  // the target's passphrase; empty for a plain target
};

struct JobInfo {
  std::string id;
  std::string kind;  // "backup", "restore" or "copy"
  std::string backup;
  std::string target;  // url
  std::string snapshot, volume;
  std::string state;  // "running", "succeeded", "failed"
  std::string error;
  int error_code = 0;  // the failure's errno (0 while running or after success)
  uint64_t total_bytes = 0, done_bytes = 0, transferred_bytes = 0;
  std::optional<uint64_t> data_total_bytes;  // allocated data; unset until mapped
  uint64_t data_done_bytes = 0;
  uint64_t chunks_uploaded = 0, chunks_reused = 0, chunks_restored = 0;
  uint64_t bandwidth_bytes_per_s = 0;
  int64_t started_unix_ns = 0, finished_unix_ns = 0;
  double rate_bytes_per_s = 0;  // transferred bytes over the job's run time so far
};

struct BackupRequest {
  Target target;
  std::string name;
  std::string snapshot;  // exactly one of snapshot and volume
  std::string volume;
  uint64_t bandwidth_bytes_per_s = 0;
};

struct RestoreRequest {
  Target target;
  std::string name;
  std::string volume;  // the new volume
};

struct CopyRequest {
  std::string volume;       // the new volume
  uint64_t size = 0;        // its size: at least the source's
  std::string endpoint;     // tcp://HOST:PORT (or unix://PATH) of the source node's NBD listener
  std::string export_name;  // the volume to read there
  std::string source_node;  // the node whose certificate the source must present ("": the host)
};

class BackupJobs {
 public:
  // The seam in front of the object store: S3 in the daemon, an in-memory store in tests.
  using StoreFactory = std::function<StatusOr<std::unique_ptr<ObjectStore>>(const Target&)>;
  static StatusOr<std::unique_ptr<ObjectStore>> S3Factory(const Target& t);

  explicit BackupJobs(Pool& pool, StoreFactory factory = S3Factory,
                      LeaseTimes lease_times = LeaseTimes{});
  // Cancels every running job and waits for it.
  ~BackupJobs();

  // EINVAL for bad names or target, ENOENT for an unknown or unready snapshot or volume.
  // A backup of the same name and target already running is returned as is (a retried call).
  StatusOr<JobInfo> StartBackup(const BackupRequest& req);
  // EEXIST when the volume exists, ENOENT when the backup does not; the manifest is read before
  // the job starts so these come back from this call.
  StatusOr<JobInfo> StartRestore(const RestoreRequest& req);
  // A copy from a peer. The source is connected (and its size checked) before the job starts, so
  // an unreachable peer (EAGAIN), a refused certificate (EACCES) or a missing export (ENOENT)
  // come back from this call and nothing is created. EEXIST when the volume exists and no copy
  // of the same source into it is running (that one is returned as is: a retried call).
  StatusOr<JobInfo> StartCopy(const CopyRequest& req);
  // The client side of copies: this node's NBD certificate, key and CA (all empty: plaintext,
  // tests over Unix sockets). Set before the API serves.
  void SetPeerTls(replica::TlsClientFiles tls) { peer_tls_ = std::move(tls); }
  StatusOr<JobInfo> Get(const std::string& id);
  std::vector<JobInfo> List();
  // The running job of backup `name` in `target_url`, if any (inspect of a backup in progress).
  StatusOr<JobInfo> RunningBackup(const std::string& target_url, const std::string& name);

  StatusOr<std::vector<Manifest>> ListBackups(const Target& t);
  StatusOr<Manifest> Inspect(const Target& t, const std::string& name);
  StatusOr<GcResult> Delete(const Target& t, const std::string& name);

 private:
  struct Job;
  struct Opened {
    std::unique_ptr<ObjectStore> store;
    std::unique_ptr<Repository> repo;
  };
  // `create`: for a backup, which may set up encryption in an empty prefix.
  StatusOr<Opened> Open(const Target& t, bool create = false);
  std::shared_ptr<Job> Add(std::shared_ptr<Job> job);
  void RunBackup(std::shared_ptr<Job> job, BackupRequest req, Opened opened);
  void RunRestore(std::shared_ptr<Job> job, RestoreRequest req, Opened opened, Manifest m,
                  std::shared_ptr<Volume> vol);
  void RunCopy(std::shared_ptr<Job> job, CopyRequest req,
               std::shared_ptr<replica::ReplicaClient> source, std::shared_ptr<Volume> vol);
  // A new volume `volume` of `size` bytes for a restore or copy, its marker written first;
  // `restoring_` holds the name from here until the job ends.
  StatusOr<std::shared_ptr<Volume>> CreateMarked(const std::string& volume, uint64_t size,
                                                 const std::string& backup,
                                                 const std::string& target);
  // After a restore or copy: the volume deleted unless `s` is OK, then the marker removed.
  void EndMarked(Job& job, const std::string& volume, const Status& s);
  void Finish(Job& job, const Status& s);
  // POOL/backup-restores/VOLUME marks a restore in progress (written before the volume is
  // created, removed once its data is durable). Markers found at start are restores the daemon
  // died in: their volumes are deleted.
  void RemoveInterruptedRestores();
  Status WriteMarker(const std::string& volume, const std::string& backup,
                     const std::string& target);
  void RemoveMarker(const std::string& volume);
  static JobInfo Snapshot(const Job& job);

  Pool& pool_;
  StoreFactory factory_;
  LeaseTimes lease_times_;
  std::mutex mu_;
  uint64_t next_id_ = 1;                              // guarded by mu_
  std::map<std::string, std::shared_ptr<Job>> jobs_;  // guarded by mu_
  std::set<std::string> restoring_;                   // volumes being restored; guarded by mu_
  std::vector<std::thread> threads_;                  // guarded by mu_
  std::atomic<bool> stopping_{false};
  std::string marker_dir_;
  replica::TlsClientFiles peer_tls_;
};

}  // namespace nbdcsi::datapath::backup
