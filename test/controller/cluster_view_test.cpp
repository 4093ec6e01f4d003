// The ClusterView service (`nbdctl cluster`, controller/cluster_view.h) over fake datapaths and
// the real NodeRegistry on a test clock: every node answers; one node down (it answers with an
// error) and one expired (not asked); replicated volumes from the in-memory catalogue.
#include <condition_variable>
#include <memory>
#include <mutex>

#include <gtest/gtest.h>

#include "controller/cluster_view.h"
#include "controller/csi_response.h"
#include "test/controller/fake_datapath.h"
#include "test/support/memory_cluster_store.h"

namespace nbdcsi::controller {
namespace {

using nbdcsi::test::MemoryClusterStore;
using testing::FakeCluster;

constexpr uint64_t kMiB = uint64_t{1} << 20;

dpv1::Volume Vol(const std::string& name, uint64_t size, uint64_t allocated, uint64_t conns = 0,
                 uint64_t iops = 0) {
  dpv1::Volume v;
  v.set_name(name);
  v.set_size_bytes(size);
  v.set_allocated_bytes(allocated);
  v.set_open_connections(conns);
  v.set_ready(true);
  v.mutable_qos()->set_max_iops(iops);
  return v;
}

dpv1::Snapshot Snap(const std::string& name, const std::string& source, uint64_t size) {
  dpv1::Snapshot s;
  s.set_name(name);
  s.set_source_volume(source);
  s.set_size_bytes(size);
  s.set_created_unix_ns(1'700'000'000'000'000'000);
  s.set_ready(true);
  s.set_method("reflink");
  return s;
}

class ClusterViewTest : public ::testing::Test {
 protected:
  explicit ClusterViewTest(cluster::ClusterStore* store = nullptr)
      : cluster_(store), view_(cluster_.registry(), store) {}

  FakeCluster cluster_;
  ClusterView view_;
};

TEST_F(ClusterViewTest, NodesShowPoolRoomLivenessAndHeartbeatAge) {
  cluster_.Heartbeat("n1", 10 * kMiB);
  cluster_.Advance(std::chrono::milliseconds(500));
  cluster_.Heartbeat("n2", 20 * kMiB);
  cluster_.Advance(std::chrono::milliseconds(200));
  dpv1::ListClusterNodesResponse r;
  view_.ListNodes(&r);
  ASSERT_EQ(r.nodes_size(), 2);
  EXPECT_EQ(r.heartbeat_ttl_ms(), 3000u);
  EXPECT_EQ(r.nodes(0).node_id(), "n1");
  EXPECT_TRUE(r.nodes(0).live());
  EXPECT_EQ(r.nodes(0).heartbeat_age_ms(), 700u);
  EXPECT_EQ(r.nodes(0).provisionable_bytes(), 10 * kMiB);
  EXPECT_EQ(r.nodes(0).capacity_bytes(), 10 * kMiB);
  EXPECT_EQ(r.nodes(0).api_address(), "127.0.0.1:9820");
  EXPECT_EQ(r.nodes(0).version(), "test");
  EXPECT_EQ(r.nodes(1).node_id(), "n2");
  EXPECT_EQ(r.nodes(1).heartbeat_age_ms(), 200u);
  EXPECT_EQ(r.nodes(1).provisionable_bytes(), 20 * kMiB);

  // n1 stops heartbeating: expired past the ttl, still listed (with its age) as such.
  cluster_.Advance(std::chrono::milliseconds(2500));
  cluster_.Heartbeat("n2", 20 * kMiB);
  r.Clear();
  view_.ListNodes(&r);
  ASSERT_EQ(r.nodes_size(), 2);
  EXPECT_FALSE(r.nodes(0).live());
  EXPECT_EQ(r.nodes(0).heartbeat_age_ms(), 3200u);
  EXPECT_TRUE(r.nodes(1).live());
}

TEST_F(ClusterViewTest, EveryNodeAnswers) {
  cluster_.Heartbeat("n1", 100 * kMiB);
  cluster_.Heartbeat("n2", 100 * kMiB);
  cluster_.Node("n1").PutVolume(Vol("a", 8 * kMiB, kMiB, 1, 500));
  cluster_.Node("n1").PutVolume(Vol("b", 4 * kMiB, 0));
  auto filling = Vol("c", 4 * kMiB, 0);
  filling.set_ready(false);
  filling.set_source("snapshot/s0");
  cluster_.Node("n2").PutVolume(filling);
  cluster_.Node("n2").PutSnapshot(Snap("s0", "c", 4 * kMiB));

  dpv1::ListClusterVolumesResponse v;
  view_.ListVolumes(&v);
  ASSERT_EQ(v.volumes_size(), 3);
  EXPECT_EQ(v.volumes(0).node_id(), "n1");
  EXPECT_EQ(v.volumes(0).volume_id(), VolumeIdOf("n1", "a"));
  EXPECT_EQ(v.volumes(0).volume().size_bytes(), 8 * kMiB);
  EXPECT_EQ(v.volumes(0).volume().allocated_bytes(), kMiB);
  EXPECT_EQ(v.volumes(0).volume().open_connections(), 1u);
  EXPECT_EQ(v.volumes(0).volume().qos().max_iops(), 500u);
  EXPECT_FALSE(v.volumes(0).abnormal());
  EXPECT_EQ(v.volumes(0).condition(), "volume is healthy");
  EXPECT_EQ(v.volumes(0).replica_of(), "");
  EXPECT_EQ(v.volumes(1).volume().name(), "b");
  EXPECT_EQ(v.volumes(2).node_id(), "n2");
  EXPECT_TRUE(v.volumes(2).abnormal());  // still being filled from its snapshot
  EXPECT_NE(v.volumes(2).condition().find("being copied"), std::string::npos);
  ASSERT_EQ(v.nodes_size(), 2);
  for (const auto& a : v.nodes()) {
    EXPECT_TRUE(a.live());
    EXPECT_EQ(a.error(), "") << a.node_id();
  }
  EXPECT_EQ(v.replicated_size(), 0);
  EXPECT_EQ(v.catalogue_error(), "");

  dpv1::ListClusterSnapshotsResponse s;
  view_.ListSnapshots(&s);
  ASSERT_EQ(s.snapshots_size(), 1);
  EXPECT_EQ(s.snapshots(0).node_id(), "n2");
  EXPECT_EQ(s.snapshots(0).snapshot_id(), SnapshotIdOf("n2", "s0"));
  EXPECT_EQ(s.snapshots(0).source_volume_id(), VolumeIdOf("n2", "c"));
  EXPECT_EQ(s.snapshots(0).snapshot().size_bytes(), 4 * kMiB);
  EXPECT_EQ(s.snapshots(0).snapshot().created_unix_ns(), 1'700'000'000'000'000'000);
  ASSERT_EQ(s.nodes_size(), 2);
}

TEST_F(ClusterViewTest, ANodeDownOrExpiredIsReportedNotFatal) {
  cluster_.Heartbeat("n1", 100 * kMiB);
  cluster_.Heartbeat("n3", 100 * kMiB);
  cluster_.Advance(std::chrono::milliseconds(2000));
  cluster_.Heartbeat("n2", 100 * kMiB);
  cluster_.Heartbeat("n3", 100 * kMiB);
  cluster_.Advance(std::chrono::milliseconds(1500));  // n1: 3.5 s, past the 3 s ttl
  cluster_.Node("n1").PutVolume(Vol("old", kMiB, 0));
  cluster_.Node("n2").PutVolume(Vol("a", kMiB, 0));
  cluster_.Node("n2").PutSnapshot(Snap("s", "a", kMiB));
  cluster_.Node("n3").PutVolume(Vol("b", kMiB, 0));
  cluster_.Node("n3").SetDown(Error(EAGAIN, "node n3: connection refused"));
  int n1_calls = 0;
  cluster_.Node("n1").SetHook([&](const std::string&) { ++n1_calls; });

  dpv1::ListClusterVolumesResponse v;
  view_.ListVolumes(&v);
  ASSERT_EQ(v.volumes_size(), 1);
  EXPECT_EQ(v.volumes(0).volume_id(), VolumeIdOf("n2", "a"));
  ASSERT_EQ(v.nodes_size(), 3);
  EXPECT_EQ(v.nodes(0).node_id(), "n1");
  EXPECT_FALSE(v.nodes(0).live());
  EXPECT_NE(v.nodes(0).error().find("heartbeat expired"), std::string::npos) << v.nodes(0).error();
  EXPECT_EQ(v.nodes(1).error(), "");
  EXPECT_TRUE(v.nodes(2).live());
  EXPECT_NE(v.nodes(2).error().find("connection refused"), std::string::npos) << v.nodes(2).error();

  dpv1::ListClusterSnapshotsResponse s;
  view_.ListSnapshots(&s);
  ASSERT_EQ(s.snapshots_size(), 1);
  EXPECT_EQ(s.snapshots(0).node_id(), "n2");
  ASSERT_EQ(s.nodes_size(), 3);
  EXPECT_NE(s.nodes(0).error().find("heartbeat expired"), std::string::npos);
  EXPECT_NE(s.nodes(2).error().find("connection refused"), std::string::npos);
  EXPECT_EQ(n1_calls, 0) << "an expired node must not be asked";

  // n3 answers again: listed again, no error.
  cluster_.Node("n3").SetDown(Status::Ok());
  v.Clear();
  view_.ListVolumes(&v);
  EXPECT_EQ(v.volumes_size(), 2);
  EXPECT_EQ(v.nodes(2).error(), "");
}

// A node that hangs (its calls parked until the test lets them go) is reported as not answering
// within the wait; the others are listed, and the listing returns when the wait is over.
TEST_F(ClusterViewTest, ANodeThatHangsIsReportedAfterTheWait) {
  cluster_.Heartbeat("n1", 100 * kMiB);
  cluster_.Heartbeat("n2", 100 * kMiB);
  cluster_.Node("n1").PutVolume(Vol("a", kMiB, 0));
  cluster_.Node("n1").PutSnapshot(Snap("s", "a", kMiB));
  cluster_.Node("n2").PutVolume(Vol("b", kMiB, 0));
  struct Gate {
    std::mutex mu;
    std::condition_variable cv;
    bool open = false;
    int parked = 0, done = 0;
  };
  auto gate = std::make_shared<Gate>();
  cluster_.Node("n2").SetHook([gate](const std::string&) {
    std::unique_lock lock(gate->mu);
    ++gate->parked;
    gate->cv.wait(lock, [&] { return gate->open; });
    ++gate->done;
    gate->cv.notify_all();
  });
  const auto t0 = std::chrono::steady_clock::now();
  dpv1::ListClusterVolumesResponse v;
  view_.ListVolumes(&v, std::chrono::milliseconds(200));
  dpv1::ListClusterSnapshotsResponse s;
  view_.ListSnapshots(&s, std::chrono::milliseconds(200));
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(took, std::chrono::milliseconds(400));
  EXPECT_LT(took, std::chrono::seconds(5));
  ASSERT_EQ(v.volumes_size(), 1);
  EXPECT_EQ(v.volumes(0).node_id(), "n1");
  ASSERT_EQ(v.nodes_size(), 2);
  EXPECT_EQ(v.nodes(0).error(), "");
  EXPECT_EQ(v.nodes(1).error(), "node n2: no answer within 200 ms");
  ASSERT_EQ(s.snapshots_size(), 1);
  EXPECT_EQ(s.nodes(1).error(), "node n2: no answer within 200 ms");
  // Let the parked calls end (their answers are dropped) before the fakes go.
  std::unique_lock lock(gate->mu);
  EXPECT_EQ(gate->parked, 2);
  gate->open = true;
  gate->cv.notify_all();
  EXPECT_TRUE(gate->cv.wait_for(lock, std::chrono::seconds(10), [&] { return gate->done == 2; }));
}

TEST_F(ClusterViewTest, TheGrpcServiceAnswersWhatTheViewSays) {
  cluster_.Heartbeat("n1", kMiB);
  auto svc = MakeClusterViewService(view_);
  dpv1::ListClusterNodesRequest req;
  dpv1::ListClusterNodesResponse resp;
  grpc::ServerContext ctx;
  ASSERT_TRUE(svc->ListNodes(&ctx, &req, &resp).ok());
  ASSERT_EQ(resp.nodes_size(), 1);
  EXPECT_EQ(resp.nodes(0).node_id(), "n1");
}

// The catalogue, built before (first base) and destroyed after the view that reads it.
struct WithStore {
  MemoryClusterStore store_;
};

class ClusterViewReplicatedTest : public WithStore, public ClusterViewTest {
 protected:
  ClusterViewReplicatedTest() : ClusterViewTest(&store_) {}
};

TEST_F(ClusterViewReplicatedTest, ReplicatedVolumesWithTheirReplicasAndHealth) {
  cluster_.Heartbeat("n1", 100 * kMiB);
  cluster_.Heartbeat("n2", 100 * kMiB);
  cluster_.Heartbeat("n3", 100 * kMiB);
  cluster::VolumeState healthy, degraded;
  healthy.name = "rv";
  healthy.size_bytes = 16 * kMiB;
  healthy.replicas = healthy.in_sync = {"n1", "n2"};
  degraded.name = "rw";
  degraded.size_bytes = 8 * kMiB;
  degraded.replicas = {"n2", "n3"};
  degraded.in_sync = {"n2"};
  ASSERT_TRUE(store_.CreateVolume(healthy).ok());
  ASSERT_TRUE(store_.CreateVolume(degraded).ok());
  cluster_.Node("n1").PutVolume(Vol("rv", 16 * kMiB, kMiB));
  cluster_.Node("n2").PutVolume(Vol("rv", 16 * kMiB, kMiB));
  cluster_.Node("n2").PutVolume(Vol("rw", 8 * kMiB, 0));
  cluster_.Node("n3").PutVolume(Vol("rw", 8 * kMiB, 0));
  cluster_.Node("n3").PutVolume(Vol("plain", kMiB, 0));
  cluster_.Node("n1").PutSnapshot(Snap("snap", "rv", 16 * kMiB));

  dpv1::ListClusterVolumesResponse v;
  view_.ListVolumes(&v);
  EXPECT_EQ(v.catalogue_error(), "");
  ASSERT_EQ(v.replicated_size(), 2);
  const auto& r0 = v.replicated(0);
  EXPECT_EQ(r0.volume_id(), "r1:rv");
  EXPECT_EQ(r0.size_bytes(), 16 * kMiB);
  EXPECT_EQ(std::vector<std::string>(r0.replicas().begin(), r0.replicas().end()),
            (std::vector<std::string>{"n1", "n2"}));
  EXPECT_FALSE(r0.abnormal()) << r0.condition();
  const auto& r1 = v.replicated(1);
  EXPECT_EQ(r1.volume_id(), "r1:rw");
  EXPECT_EQ(r1.in_sync_size(), 1);
  EXPECT_TRUE(r1.abnormal());
  EXPECT_NE(r1.condition().find("degraded"), std::string::npos) << r1.condition();
  // Every copy is listed on its node, named as whose copy it is.
  ASSERT_EQ(v.volumes_size(), 5);
  int copies = 0;
  for (const auto& c : v.volumes()) {
    if (c.volume().name() == "plain") {
      EXPECT_EQ(c.replica_of(), "");
    } else {
      EXPECT_EQ(c.replica_of(), "r1:" + c.volume().name()) << c.node_id();
      ++copies;
    }
  }
  EXPECT_EQ(copies, 4);

  dpv1::ListClusterSnapshotsResponse s;
  view_.ListSnapshots(&s);
  ASSERT_EQ(s.snapshots_size(), 1);
  EXPECT_EQ(s.snapshots(0).source_volume_id(), "r1:rv");

  // A replica node whose heartbeats stop makes the volume abnormal, in the same answer that
  // reports the node as expired.
  cluster_.Advance(std::chrono::milliseconds(2000));
  cluster_.Heartbeat("n2", 100 * kMiB);
  cluster_.Heartbeat("n3", 100 * kMiB);
  cluster_.Advance(std::chrono::milliseconds(1500));
  v.Clear();
  view_.ListVolumes(&v);
  ASSERT_EQ(v.replicated_size(), 2);
  EXPECT_TRUE(v.replicated(0).abnormal());
  EXPECT_NE(v.replicated(0).condition().find("n1"), std::string::npos)
      << v.replicated(0).condition();
  EXPECT_FALSE(v.nodes(0).live());
}

}  // namespace
}  // namespace nbdcsi::controller
