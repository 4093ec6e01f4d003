// The controller's part of backup snapshots (controller/backups.h), in-process: the real Controller
// service over fake datapaths that share one fake bucket (fake_datapath.h). What the real store
// and jobs do is tested against s3rver (test/integration/backup_csi.sh); here, the decisions:
// parameters and secrets, ids, the ready_to_use=false answer while a job runs, the job's error,
// idempotent retries, the local snapshot's removal, restore placement, ABORTED while a restore
// runs, size and QoS of the restored volume, delete while a backup runs.
#include <gtest/gtest.h>

#include "common/grpc_status.h"
#include "test/controller/csi_requests.h"
#include "test/controller/fake_datapath.h"

namespace nbdcsi::controller {
namespace {

namespace v1 = ::csi::v1;
using grpc::StatusCode;
using nbdcsi::test::VolumeRequest;
using testing::FakeBucket;
using testing::FakeCluster;
using testing::FakeDatapath;
using testing::PoolVolume;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr char kTarget[] = "s3://backups/cluster-a";

std::string Describe(const grpc::Status& s) {
  return GrpcCodeName(s.error_code()) + std::string(" ") + s.error_message();
}

void GoodSecrets(google::protobuf::Map<std::string, std::string>* m) {
  (*m)["AWS_ACCESS_KEY_ID"] = FakeBucket::kGoodKey;
  (*m)["AWS_SECRET_ACCESS_KEY"] = "secret";
  (*m)["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9";
}

class Backups_ : public ::testing::Test {
 protected:
  void SetUp() override {
    cluster_.Heartbeat("n1", 100 * kGiB);
    cluster_.Heartbeat("n2", 100 * kGiB);
    cluster_.Node("n1").PutVolume(PoolVolume("pvc-src", 64 * kMiB));
  }
  FakeDatapath& Node(const std::string& id) { return cluster_.Node(id); }
  v1::Controller::Service& C() { return cluster_.csi(); }

  v1::CreateSnapshotRequest SnapReq(const std::string& name, const std::string& target = kTarget) {
    v1::CreateSnapshotRequest r;
    r.set_name(name);
    r.set_source_volume_id("v1:n1:pvc-src");
    (*r.mutable_parameters())["backupTarget"] = target;
    (*r.mutable_parameters())["csi.storage.k8s.io/snapshotter-secret-name"] = "s3";
    GoodSecrets(r.mutable_secrets());
    return r;
  }
  grpc::Status Snap(const v1::CreateSnapshotRequest& r, v1::Snapshot* out = nullptr) {
    v1::CreateSnapshotResponse resp;
    grpc::Status s = C().CreateSnapshot(nullptr, &r, &resp);
    if (out) *out = resp.snapshot();
    return s;
  }
  grpc::Status DeleteSnap(const std::string& id, bool secrets = true) {
    v1::DeleteSnapshotRequest r;
    r.set_snapshot_id(id);
    if (secrets) GoodSecrets(r.mutable_secrets());
    v1::DeleteSnapshotResponse resp;
    return C().DeleteSnapshot(nullptr, &r, &resp);
  }
  v1::CreateVolumeRequest RestoreReq(const std::string& name, const std::string& snap_id,
                                     int64_t bytes = 0) {
    auto r = VolumeRequest(name, bytes);
    r.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snap_id);
    GoodSecrets(r.mutable_secrets());
    return r;
  }
  grpc::Status Restore(const v1::CreateVolumeRequest& r, v1::Volume* out = nullptr) {
    v1::CreateVolumeResponse resp;
    grpc::Status s = C().CreateVolume(nullptr, &r, &resp);
    if (out) *out = resp.volume();
    return s;
  }
  // A completed backup "snap-1" of pvc-src.
  std::string MustBackUp() {
    v1::Snapshot s;
    grpc::Status st = Snap(SnapReq("snap-1"), &s);
    EXPECT_TRUE(st.ok()) << Describe(st);
    EXPECT_TRUE(s.ready_to_use());
    return s.snapshot_id();
  }

  FakeCluster cluster_;
};

TEST_F(Backups_, ABackupClassSnapshotIsReadyOnceBackedUpAndLeavesNoLocalSnapshot) {
  v1::Snapshot s;
  grpc::Status st = Snap(SnapReq("snap-1"), &s);
  ASSERT_TRUE(st.ok()) << Describe(st);
  EXPECT_EQ(s.snapshot_id(), "b1:s3://backups/cluster-a#snap-1");
  EXPECT_EQ(s.source_volume_id(), "v1:n1:pvc-src");
  EXPECT_EQ(s.size_bytes(), static_cast<int64_t>(64 * kMiB));
  EXPECT_TRUE(s.ready_to_use());
  EXPECT_GT(s.creation_time().seconds(), 0);
  // The source's node made the snapshot and the backup, then removed the local snapshot.
  EXPECT_EQ(Node("n1").Count("CreateSnapshot"), 1);
  EXPECT_EQ(Node("n1").Count("CreateBackup"), 1);
  EXPECT_FALSE(Node("n1").GetSnapshot("snap-1").ok());
  // A retry finds the backup and answers the same, without cutting or uploading again.
  v1::Snapshot again;
  st = Snap(SnapReq("snap-1"), &again);
  ASSERT_TRUE(st.ok()) << Describe(st);
  EXPECT_EQ(again.snapshot_id(), s.snapshot_id());
  EXPECT_TRUE(again.ready_to_use());
  EXPECT_EQ(again.size_bytes(), s.size_bytes());
  EXPECT_EQ(Node("n1").Count("CreateSnapshot"), 1);
  EXPECT_EQ(Node("n1").Count("CreateBackup"), 1);
}

TEST_F(Backups_, WhileTheJobRunsTheSnapshotIsNotReadyAndRetriesFindTheJob) {
  Node("n1").HoldJobs(true);
  v1::Snapshot s;
  grpc::Status st = Snap(SnapReq("snap-1"), &s);
  ASSERT_TRUE(st.ok()) << Describe(st);
  EXPECT_EQ(s.snapshot_id(), "b1:s3://backups/cluster-a#snap-1");
  EXPECT_FALSE(s.ready_to_use());
  EXPECT_GT(s.creation_time().seconds(), 0);  // the local cut's point in time
  ASSERT_TRUE(Snap(SnapReq("snap-1"), &s).ok());
  EXPECT_FALSE(s.ready_to_use());
  // Still one job: the retry got the running one back.
  ASSERT_TRUE(Node("n1").ListBackupJobs().ok());
  EXPECT_EQ(Node("n1").ListBackupJobs()->size(), 1u);
  // Deleting it now would race the manifest still to come: ABORTED until the job ends.
  grpc::Status d = DeleteSnap(s.snapshot_id());
  EXPECT_EQ(d.error_code(), StatusCode::ABORTED) << Describe(d);
  EXPECT_NE(d.error_message().find("still being made"), std::string::npos) << Describe(d);
  Node("n1").FinishJobs();
  ASSERT_TRUE(Snap(SnapReq("snap-1"), &s).ok());
  EXPECT_TRUE(s.ready_to_use());
  EXPECT_FALSE(Node("n1").GetSnapshot("snap-1").ok());
}

TEST_F(Backups_, AJobThatFailsAfterTheAnswerIsRetriedByTheNextCall) {
  Node("n1").HoldJobs(true);
  v1::Snapshot s;
  ASSERT_TRUE(Snap(SnapReq("snap-1"), &s).ok());
  Node("n1").FinishJobs(Error(EIO, "chunk upload failed: HTTP 500"));
  Node("n1").HoldJobs(false);
  // The retry sees no backup and no running job: it starts another, which succeeds.
  grpc::Status st = Snap(SnapReq("snap-1"), &s);
  ASSERT_TRUE(st.ok()) << Describe(st);
  EXPECT_TRUE(s.ready_to_use());
  EXPECT_EQ(Node("n1").Count("CreateBackup"), 2);
}

TEST_F(Backups_, AMissingBucketOrRefusedCredentialsFailTheSnapshotClearly) {
  // A missing bucket: the job fails at once, and its error (FAILED_PRECONDITION, not NOT_FOUND:
  // the source volume exists) is the answer of the first call.
  grpc::Status st = Snap(SnapReq("snap-1", "s3://missing-bucket/x"));
  EXPECT_EQ(st.error_code(), StatusCode::FAILED_PRECONDITION) << Describe(st);
  EXPECT_NE(st.error_message().find("does not exist"), std::string::npos) << Describe(st);
  // The failed call leaves no local snapshot behind (no DeleteSnapshot would ever come for it).
  EXPECT_EQ(Node("n1").Count("CreateSnapshot"), 1);
  EXPECT_FALSE(Node("n1").GetSnapshot("snap-1").ok());
  // Refused credentials: refused before anything is cut.
  auto bad = SnapReq("snap-2");
  (*bad.mutable_secrets())["AWS_ACCESS_KEY_ID"] = "wrong";
  st = Snap(bad);
  EXPECT_EQ(st.error_code(), StatusCode::PERMISSION_DENIED) << Describe(st);
  EXPECT_FALSE(Node("n1").GetSnapshot("snap-2").ok());
}

TEST_F(Backups_, ClassParametersAndSecretsAreChecked) {
  auto r = SnapReq("snap-1");
  (*r.mutable_parameters())["backupTraget"] = "s3://x";
  grpc::Status st = Snap(r);
  EXPECT_EQ(st.error_code(), StatusCode::INVALID_ARGUMENT) << Describe(st);
  EXPECT_NE(st.error_message().find("backupTraget"), std::string::npos);
  for (const char* bad : {"backups", "s3://", "http://b/x", "s3://b#x"}) {
    st = Snap(SnapReq("snap-1", bad));
    EXPECT_EQ(st.error_code(), StatusCode::INVALID_ARGUMENT) << bad << ": " << Describe(st);
  }
  st = Snap(SnapReq("snap-1", "s3://b/" + std::string(120, 'p')));
  EXPECT_EQ(st.error_code(), StatusCode::INVALID_ARGUMENT) << Describe(st);
  EXPECT_NE(st.error_message().find("CSI allows 128"), std::string::npos) << Describe(st);
  r = SnapReq("snap-1");
  (*r.mutable_parameters())["backupBandwidth"] = "fast";
  EXPECT_EQ(Snap(r).error_code(), StatusCode::INVALID_ARGUMENT);
  r = SnapReq("snap-1");
  r.mutable_parameters()->erase("backupTarget");
  (*r.mutable_parameters())["backupBandwidth"] = "10Mi";
  EXPECT_EQ(Snap(r).error_code(), StatusCode::INVALID_ARGUMENT);
  r = SnapReq("snap-1");
  r.mutable_secrets()->clear();
  st = Snap(r);
  EXPECT_EQ(st.error_code(), StatusCode::INVALID_ARGUMENT) << Describe(st);
  EXPECT_NE(st.error_message().find("snapshotter-secret-name"), std::string::npos) << Describe(st);
  // Nothing was cut by any of them.
  EXPECT_EQ(Node("n1").Count("CreateSnapshot"), 0);
}

TEST_F(Backups_, RestoreMakesANewVolumeWithTheBackupsSizeAndTheClassQos) {
  const std::string id = MustBackUp();
  auto req = RestoreReq("pvc-restored", id, static_cast<int64_t>(128 * kMiB));
  (*req.mutable_parameters())["maxIops"] = "500";
  v1::Volume v;
  grpc::Status st = Restore(req, &v);
  ASSERT_TRUE(st.ok()) << Describe(st);
  EXPECT_EQ(v.capacity_bytes(), static_cast<int64_t>(128 * kMiB));  // grown to the request
  EXPECT_EQ(v.content_source().snapshot().snapshot_id(), id);
  const std::string node = v.volume_id().substr(3, 2);
  auto dv = Node(node).Volume("pvc-restored");
  ASSERT_TRUE(dv.has_value());
  EXPECT_EQ(dv->size_bytes(), 128 * kMiB);
  EXPECT_EQ(dv->qos().max_iops(), 500u);
  // The class's schedule reaches the restored volume too.
  auto sched = RestoreReq("pvc-restored-sched", id);
  (*sched.mutable_parameters())["snapshotSchedule"] = "@daily";
  v1::Volume sv;
  ASSERT_TRUE(Restore(sched, &sv).ok());
  auto sdv = Node(sv.volume_id().substr(3, 2)).Volume("pvc-restored-sched");
  ASSERT_TRUE(sdv.has_value());
  EXPECT_EQ(sdv->schedule().snapshot_cron(), "@daily");
  // A retry returns the same volume; it does not restore again.
  v1::Volume again;
  ASSERT_TRUE(Restore(req, &again).ok());
  EXPECT_EQ(again.volume_id(), v.volume_id());
  EXPECT_EQ(Node(node).Count("RestoreBackup"), 1);
  // Smaller than the backup: OUT_OF_RANGE.
  auto small = RestoreReq("pvc-small", id);
  small.mutable_capacity_range()->set_limit_bytes(static_cast<int64_t>(32 * kMiB));
  EXPECT_EQ(Restore(small).error_code(), StatusCode::OUT_OF_RANGE);
}

TEST_F(Backups_, WhileTheRestoreRunsCreateVolumeIsAbortedThenSucceeds) {
  const std::string id = MustBackUp();
  Node("n1").SetRoom(0);  // the restore goes to n2
  Node("n2").HoldJobs(true);
  auto req = RestoreReq("pvc-r", id);
  grpc::Status st = Restore(req);
  EXPECT_EQ(st.error_code(), StatusCode::ABORTED) << Describe(st);
  EXPECT_NE(st.error_message().find("running on node n2"), std::string::npos) << Describe(st);
  st = Restore(req);
  EXPECT_EQ(st.error_code(), StatusCode::ABORTED) << Describe(st);
  EXPECT_EQ(Node("n2").Count("RestoreBackup"), 1);
  Node("n2").FinishJobs();
  v1::Volume v;
  st = Restore(req, &v);
  ASSERT_TRUE(st.ok()) << Describe(st);
  EXPECT_EQ(v.volume_id(), "v1:n2:pvc-r");
  EXPECT_EQ(v.capacity_bytes(), static_cast<int64_t>(64 * kMiB));
}

TEST_F(Backups_, AFailedRestoreIsTheErrorAndTheRetryRestoresAgain) {
  const std::string id = MustBackUp();
  Node("n1").SetRoom(0);
  Node("n2").HoldJobs(true);
  auto req = RestoreReq("pvc-r", id);
  EXPECT_EQ(Restore(req).error_code(), StatusCode::ABORTED);
  Node("n2").FinishJobs(Error(EIO, "chunk at offset 0: hash mismatch"));
  Node("n2").HoldJobs(false);
  // The failed restore removed its volume (as the datapath does): the retry starts over.
  grpc::Status st = Restore(req);
  ASSERT_TRUE(st.ok()) << Describe(st);
  EXPECT_EQ(Node("n2").Count("RestoreBackup"), 2);
}

TEST_F(Backups_, RestoreErrors) {
  // No such backup: NOT_FOUND, as for any missing source snapshot.
  grpc::Status st = Restore(RestoreReq("pvc-r", "b1:s3://backups/cluster-a#nothing"));
  EXPECT_EQ(st.error_code(), StatusCode::NOT_FOUND) << Describe(st);
  // A malformed b1 id names nothing.
  EXPECT_EQ(Restore(RestoreReq("pvc-r", "b1:nonsense")).error_code(), StatusCode::NOT_FOUND);
  const std::string id = MustBackUp();
  // No credentials in the provisioner's secret.
  auto req = RestoreReq("pvc-r", id);
  req.mutable_secrets()->clear();
  st = Restore(req);
  EXPECT_EQ(st.error_code(), StatusCode::INVALID_ARGUMENT) << Describe(st);
  EXPECT_NE(st.error_message().find("provisioner-secret-name"), std::string::npos) << Describe(st);
  // Into a replicated volume: not yet.
  req = RestoreReq("pvc-r", id);
  (*req.mutable_parameters())["replicas"] = "2";
  EXPECT_EQ(Restore(req).error_code(), StatusCode::INVALID_ARGUMENT);
  // No room anywhere.
  Node("n1").SetRoom(0);
  Node("n2").SetRoom(0);
  st = Restore(RestoreReq("pvc-r", id));
  EXPECT_EQ(st.error_code(), StatusCode::RESOURCE_EXHAUSTED) << Describe(st);
}

TEST_F(Backups_, DeleteRemovesTheBackupAndListingFindsItOnlyWhileItExists) {
  const std::string id = MustBackUp();
  v1::ListSnapshotsRequest lr;
  lr.set_snapshot_id(id);
  GoodSecrets(lr.mutable_secrets());
  v1::ListSnapshotsResponse list;
  ASSERT_TRUE(C().ListSnapshots(nullptr, &lr, &list).ok());
  ASSERT_EQ(list.entries_size(), 1);
  EXPECT_EQ(list.entries(0).snapshot().snapshot_id(), id);
  EXPECT_TRUE(list.entries(0).snapshot().ready_to_use());
  EXPECT_EQ(list.entries(0).snapshot().size_bytes(), static_cast<int64_t>(64 * kMiB));
  // Without the list secret: a clear INVALID_ARGUMENT, not "no such snapshot".
  v1::ListSnapshotsRequest no_secret;
  no_secret.set_snapshot_id(id);
  grpc::Status st = C().ListSnapshots(nullptr, &no_secret, &list);
  EXPECT_EQ(st.error_code(), StatusCode::INVALID_ARGUMENT) << Describe(st);
  EXPECT_NE(st.error_message().find("snapshotter-list-secret-name"), std::string::npos);
  // Delete needs the credentials too.
  EXPECT_EQ(DeleteSnap(id, false).error_code(), StatusCode::INVALID_ARGUMENT);
  ASSERT_TRUE(DeleteSnap(id).ok());
  list.Clear();
  ASSERT_TRUE(C().ListSnapshots(nullptr, &lr, &list).ok());
  EXPECT_EQ(list.entries_size(), 0);
  // Idempotent; a malformed b1 id names nothing and succeeds.
  EXPECT_TRUE(DeleteSnap(id).ok());
  EXPECT_TRUE(DeleteSnap("b1:garbage").ok());
}

}  // namespace
}  // namespace nbdcsi::controller
