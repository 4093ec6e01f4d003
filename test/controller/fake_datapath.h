// In-process fakes behind the controller's seams: FakeDatapath is one node's pool as the controller
// sees it through NodeDatapath (volumes, snapshots, the pool's own capacity check, idempotent
// creates), and FakeCluster is a real NodeRegistry on a hand-moved clock whose nodes are such
// fakes, with the real Controller service on top. The fakes keep enough state that a retry sees
// what it would really see; tests can make a node fail a call, stop answering, or park a call.
#pragma once

#include <cerrno>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <grpcpp/support/status.h>

#include "controller/controller_service.h"
#include "controller/node_datapath.h"
#include "controller/registry.h"
#include "csi/csi.grpc.pb.h"

namespace nbdcsi::controller::testing {

// The object store behind the Backups calls, shared by every node of a FakeCluster (as a bucket
// is): backups by "URL#NAME". Credentials other than kGoodKey are refused (EACCES), as a store
// does; a target in a bucket named "missing" has no bucket (its backups' jobs fail with ENOENT).
struct FakeBucket {
  static constexpr char kGoodKey[] = "good-key";
  std::mutex mu;
  std::map<std::string, dpv1::BackupInfo> backups;  // guarded by mu
  bool Missing(const std::string& url) const { return url.starts_with("s3://missing"); }
};

class FakeDatapath : public NodeDatapath {
 public:
  explicit FakeDatapath(std::string node) : node_(std::move(node)) {}

  // ---- what a test sets up or looks at ----

  // The pool's own check: ENOSPC when the volumes would exceed this many bytes. Heartbeat figures
  // (what the controller plans with) are set on the FakeCluster, and may disagree, as they can.
  void SetRoom(uint64_t bytes) {
    Locked([&] { room_ = bytes; });
  }
  // Every call fails with `s` (a node that cannot answer: EAGAIN); Status::Ok() answers again.
  void SetDown(Status s) {
    Locked([&] { down_ = std::move(s); });
  }
  // The next call of `method` ("GetVolume", ...) fails with `s`.
  void FailNext(const std::string& method, Status s) {
    Locked([&] { fail_next_[method] = std::move(s); });
  }
  // Runs at the start of every call, outside the fake's lock, with the method name: lets a test
  // park a call or meet other nodes' calls.
  void SetHook(std::function<void(const std::string& method)> hook) {
    Locked([&] { hook_ = std::move(hook); });
  }
  // Runs when a GetVolume or ListVolumes has its answer, just before it returns it (outside the
  // fake's lock), with the method name: lets a test park an answer already given.
  void SetAnsweredHook(std::function<void(const std::string& method)> hook) {
    Locked([&] { answered_hook_ = std::move(hook); });
  }
  // New restores and clones start unfilled (ready=false), as a background copy leaves them.
  void SetCopiesStartUnfilled(bool v) {
    Locked([&] { unfilled_copies_ = v; });
  }

  // The last CopyVolume request (what a test checks the source endpoint and export against).
  std::optional<dpv1::CopyVolumeRequest> LastCopy() const;
  // Backup, restore and copy jobs stay "running" until FinishJobs (otherwise they end within the call).
  void HoldJobs(bool v) {
    Locked([&] { hold_jobs_ = v; });
  }
  // Ends every running job: succeeded (a backup writes its manifest), or failed with `err`.
  void FinishJobs(Status err = Status::Ok());
  void SetBucket(std::shared_ptr<FakeBucket> b) {
    Locked([&] { bucket_ = std::move(b); });
  }

  void PutVolume(dpv1::Volume v) {
    Locked([&] { volumes_[v.name()] = std::move(v); });
  }
  void PutSnapshot(dpv1::Snapshot s) {
    Locked([&] { snapshots_[s.name()] = std::move(s); });
  }
  // A replicated volume's target served here (what FreezeTarget finds), with the in-sync set and
  // epoch it reports; CloseTarget takes it away (its freezes go with it).
  void ServeTarget(const std::string& volume, std::vector<std::string> in_sync, uint64_t epoch);
  void CloseTarget(const std::string& volume);
  // Freezes of the volume's target held now (taken and neither thawed nor lifted).
  int Frozen(const std::string& volume) const;
  // As the datapath's own deadline does: every freeze of the volume lifts itself.
  void LiftFreezes(const std::string& volume);
  // The lift_after of the last FreezeTarget.
  std::chrono::milliseconds LastLiftAfter() const;

  std::optional<dpv1::Volume> Volume(const std::string& name) const;
  size_t VolumeCount() const;
  // "CreateVolume pvc-1", "GetVolume pvc-1", ... in call order.
  std::vector<std::string> Calls() const;
  int Count(const std::string& method) const;  // calls of `method`

  // ---- NodeDatapath ----
  StatusOr<dpv1::Volume> CreateVolume(const dpv1::CreateVolumeRequest& req) override;
  Status DeleteVolume(const std::string& name) override;
  StatusOr<dpv1::Volume> ResizeVolume(const std::string& name, uint64_t size_bytes) override;
  StatusOr<dpv1::Volume> GetVolume(const std::string& name) override;
  StatusOr<std::vector<dpv1::Volume>> ListVolumes() override;
  StatusOr<dpv1::Volume> SetQos(const std::string& name, const dpv1::QosPatch& patch) override;
  StatusOr<dpv1::Volume> SetSchedule(const std::string& name,
                                     const VolumeSchedule& schedule) override;
  StatusOr<dpv1::Snapshot> CreateSnapshot(const std::string& name,
                                          const std::string& source_volume) override;
  Status DeleteSnapshot(const std::string& name) override;
  StatusOr<dpv1::Snapshot> GetSnapshot(const std::string& name) override;
  StatusOr<std::vector<dpv1::Snapshot>> ListSnapshots(const std::string& source_volume) override;
  StatusOr<dpv1::FreezeTargetResponse> FreezeTarget(const std::string& volume,
                                                    std::chrono::milliseconds lift_after) override;
  StatusOr<bool> ThawTarget(const std::string& volume, uint64_t freeze_id) override;
  StatusOr<dpv1::BackupJob> CreateBackup(const dpv1::CreateBackupRequest& req) override;
  StatusOr<dpv1::BackupJob> RestoreBackup(const dpv1::RestoreBackupRequest& req) override;
  StatusOr<dpv1::BackupJob> CopyVolume(const dpv1::CopyVolumeRequest& req) override;
  StatusOr<dpv1::BackupJob> GetBackupJob(const std::string& id) override;
  StatusOr<std::vector<dpv1::BackupJob>> ListBackupJobs() override;
  StatusOr<dpv1::GetBackupResponse> GetBackup(const dpv1::GetBackupRequest& req) override;
  StatusOr<dpv1::DeleteBackupResponse> DeleteBackup(const dpv1::DeleteBackupRequest& req) override;

 private:
  struct FakeTarget {
    std::vector<std::string> in_sync;
    uint64_t epoch = 0;
    std::set<uint64_t> freezes;
  };
  template <typename F>
  void Locked(F&& f) {
    std::lock_guard lock(mu_);
    f();
  }
  // Records the call, runs the hook, and says whether it fails before doing anything.
  Status Enter(const std::string& method, const std::string& what);
  // Runs the answered hook (when set) and hands `answer` back.
  template <typename T>
  T Answered(const std::string& method, T answer) {
    std::function<void(const std::string&)> hook;
    Locked([&] { hook = answered_hook_; });
    if (hook) hook(method);
    return answer;
  }
  uint64_t ProvisionedLocked() const;
  StatusOr<uint64_t> SourceSizeLocked(const dpv1::VolumeContentSource& src) const;
  // EACCES unless the target carries FakeBucket::kGoodKey.
  Status CheckCredentials(const dpv1::BackupTarget& t) const;
  // A backup job's end: its manifest in the bucket (or ENOENT for a missing bucket).
  void EndBackupLocked(dpv1::BackupJob& job, const Status& err);

  const std::string node_;
  mutable std::mutex mu_;
  std::map<std::string, dpv1::Volume> volumes_;
  std::map<std::string, dpv1::Snapshot> snapshots_;
  std::map<std::string, FakeTarget> targets_;
  std::shared_ptr<FakeBucket> bucket_ = std::make_shared<FakeBucket>();
  std::map<std::string, dpv1::BackupJob> jobs_;
  std::map<std::string, dpv1::BackupTarget> job_targets_;
  bool hold_jobs_ = false;
  std::optional<dpv1::CopyVolumeRequest> last_copy_;
  int next_job_ = 1;
  uint64_t last_freeze_id_ = 0;
  std::chrono::milliseconds last_lift_after_{0};
  uint64_t room_ = uint64_t{1} << 50;
  Status down_;
  std::map<std::string, Status> fail_next_;
  std::function<void(const std::string&)> hook_;
  std::function<void(const std::string&)> answered_hook_;
  bool unfilled_copies_ = false;
  std::vector<std::string> calls_;
  int64_t clock_ns_ = 1'700'000'000'000'000'000;
};

// A ready pool volume or snapshot, as a node's pool reports it (for PutVolume / PutSnapshot).
inline dpv1::Volume PoolVolume(const std::string& name, uint64_t size) {
  dpv1::Volume v;
  v.set_name(name);
  v.set_size_bytes(size);
  v.set_ready(true);
  return v;
}
inline dpv1::Snapshot PoolSnapshot(const std::string& name, const std::string& source,
                                   uint64_t size) {
  dpv1::Snapshot s;
  s.set_name(name);
  s.set_source_volume(source);
  s.set_size_bytes(size);
  s.set_ready(true);
  return s;
}

// A NodeRegistry (real: ttl, expiry, cached clients) on a clock the test moves, whose clients are
// FakeDatapaths, and the real Controller service (decorator + ControllerImpl) over it.
class FakeCluster {
 public:
  static constexpr std::chrono::milliseconds kTtl{3000};
  static constexpr std::chrono::milliseconds kInterval{1000};

  // `store`: the cluster state of replicated volumes (ControllerOptions::cluster), or none.
  explicit FakeCluster(cluster::ClusterStore* store = nullptr);

  // The node's fake (made on first use; it answers only once the node heartbeats).
  FakeDatapath& Node(const std::string& id);
  // A heartbeat from `id` saying it can take `provisionable` more bytes.
  // `nbd_endpoint`: what the node advertises for copies across nodes ("" : none).
  void Heartbeat(const std::string& id, uint64_t provisionable,
                 const std::string& nbd_endpoint = "");
  void Advance(std::chrono::milliseconds d);

  NodeRegistry& registry() { return registry_; }
  ::csi::v1::Controller::Service& csi() { return *service_; }

 private:
  std::chrono::steady_clock::time_point Now();

  std::mutex mu_;
  std::chrono::steady_clock::time_point now_;                   // guarded by mu_
  std::map<std::string, std::shared_ptr<FakeDatapath>> fakes_;  // guarded by mu_
  std::shared_ptr<FakeBucket> bucket_ = std::make_shared<FakeBucket>();
  NodeRegistry registry_;
  std::unique_ptr<::csi::v1::Controller::Service> service_;
};

}  // namespace nbdcsi::controller::testing
