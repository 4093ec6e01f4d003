// ReplicaChanges (controller/replica_changes.h: `nbdctl cluster volume move|replica`) over fake
// datapaths, the real NodeRegistry and the in-memory catalogue: the refusals that change nothing,
// and the changes the controller makes itself when no node serves the volume (add: copy made and
// listed out of sync; remove: out of the catalogue, copy deleted, or left and reported when its
// node does not answer; never the last in-sync replica). A target that cannot add the replica
// gets the new copy deleted again. The target's side is integration.replicated_target's.
#include <gtest/gtest.h>

#include <vector>

#include "controller/replica_changes.h"
#include "test/controller/fake_datapath.h"
#include "test/support/memory_cluster_store.h"

namespace nbdcsi::controller {
namespace {

using nbdcsi::test::MemoryClusterStore;
using testing::FakeCluster;

constexpr uint64_t kMiB = uint64_t{1} << 20;

class ReplicaChangesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    lease_ = store_.GrantLease(30).value();
    for (const char* n : {"n1", "n2", "n3", "n4"}) cluster_.Heartbeat(n, 1024 * kMiB);
    for (const char* n : {"n1", "n2", "n3"}) ASSERT_TRUE(store_.RegisterNode(n, lease_).ok());
    cluster::VolumeState v;
    v.name = "rv";
    v.size_bytes = 64 * kMiB;
    v.replicas = v.in_sync = {"n1", "n2"};
    ASSERT_TRUE(store_.CreateVolume(v).ok());
    for (const char* n : {"n1", "n2"}) {
      dpv1::Volume copy;
      copy.set_name("rv");
      copy.set_size_bytes(64 * kMiB);
      copy.mutable_qos()->set_max_iops(500);
      cluster_.Node(n).PutVolume(copy);
    }
  }

  Status Change(const std::string& add, const std::string& remove, std::string volume = "r1:rv") {
    ReplicaChanges::Request r;
    r.volume = std::move(volume);
    r.add = add;
    r.remove = remove;
    r.poll = std::chrono::milliseconds(1);
    seen_.clear();
    return changes_.Change(r, [&](const dpv1::ChangeReplicasProgress& p) { seen_.push_back(p); });
  }
  cluster::VolumeState State() { return store_.GetVolume("rv").value(); }

  MemoryClusterStore store_;
  FakeCluster cluster_{&store_};
  ReplicaChanges changes_{&store_, cluster_.registry()};
  cluster::LeaseId lease_ = 0;
  std::vector<dpv1::ChangeReplicasProgress> seen_;
};

TEST_F(ReplicaChangesTest, BadInputIsRefusedAndChangesNothing) {
  const auto before = State();
  EXPECT_EQ(Change("n3", "", "r1:nope").code(), ENOENT);
  EXPECT_EQ(Change("n1", "").code(), EEXIST);
  EXPECT_EQ(Change("", "n3").code(), ENOENT);
  EXPECT_EQ(Change("n9", "").code(), ENOENT) << "not registered";
  EXPECT_EQ(Change("n4", "").code(), EAGAIN) << "registered, not alive in the cluster state";
  EXPECT_EQ(Change("", "").code(), EINVAL);
  EXPECT_EQ(Change("n1", "n1").code(), EINVAL);
  EXPECT_EQ(Change("n3", "", "r1:Bad/Name").code(), EINVAL);
  // A move copies through the target: with none it is refused before anything is made.
  Status s = Change("n3", "n1");
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_NE(s.message().find("no node serves it"), std::string::npos) << s.message();
  EXPECT_EQ(State(), before);
  EXPECT_EQ(cluster_.Node("n3").Count("CreateVolume"), 0);
  EXPECT_TRUE(seen_.empty());
}

TEST_F(ReplicaChangesTest, WithNoTargetAnAddIsListedOutOfSyncForTheNextTarget) {
  ASSERT_TRUE(Change("n3", "", "rv").ok());
  auto copy = cluster_.Node("n3").Volume("rv");
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->size_bytes(), 64 * kMiB);
  EXPECT_EQ(copy->qos().max_iops(), 500u) << "the new copy takes an existing copy's QoS";
  EXPECT_EQ(State().replicas, (std::vector<std::string>{"n1", "n2", "n3"}));
  EXPECT_EQ(State().in_sync, (std::vector<std::string>{"n1", "n2"}));
  ASSERT_GE(seen_.size(), 2u);
  EXPECT_EQ(seen_.front().phase(), "adding");
  EXPECT_EQ(seen_.back().phase(), "done");
  EXPECT_NE(seen_.back().message().find("the next target copies it"), std::string::npos)
      << seen_.back().message();
}

TEST_F(ReplicaChangesTest, WithNoTargetARemoveDeletesTheCopyButNeverTheLastInSync) {
  ASSERT_TRUE(Change("", "n1").ok());
  EXPECT_EQ(State().replicas, std::vector<std::string>{"n2"});
  EXPECT_EQ(State().in_sync, std::vector<std::string>{"n2"});
  EXPECT_FALSE(cluster_.Node("n1").Volume("rv")) << "the removed copy stays in n1's pool";
  EXPECT_EQ(seen_.back().copy_left(), "");
  // n3 added (out of sync): n2 is still the only one in sync, and stays.
  ASSERT_TRUE(Change("n3", "").ok());
  Status s = Change("", "n2");
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_NE(s.message().find("last one in sync"), std::string::npos) << s.message();
  EXPECT_EQ(State().replicas, (std::vector<std::string>{"n2", "n3"}));
  EXPECT_TRUE(cluster_.Node("n2").Volume("rv"));
}

TEST_F(ReplicaChangesTest, ARemovedReplicasCopyOnANodeThatDoesNotAnswerIsReported) {
  cluster_.Node("n2").SetDown(Error(EAGAIN, "node down"));
  ASSERT_TRUE(Change("", "n2").ok());
  EXPECT_EQ(State().replicas, std::vector<std::string>{"n1"});
  EXPECT_EQ(seen_.back().copy_left(), "n2");
  EXPECT_NE(seen_.back().message().find("stays in n2's pool"), std::string::npos);
}

TEST_F(ReplicaChangesTest, ANewCopyTheTargetCannotTakeIsDeletedAgain) {
  // n1 serves the volume; its datapath cannot add the replica (the fake answers ENOTSUP).
  ASSERT_TRUE(store_.ClaimTarget("rv", "n1", lease_).ok());
  const auto before = State();
  Status s = Change("n3", "");
  EXPECT_EQ(s.code(), ENOTSUP) << s.message();
  EXPECT_NE(s.message().find("its target on n1"), std::string::npos) << s.message();
  EXPECT_EQ(cluster_.Node("n3").Count("CreateVolume"), 1);
  EXPECT_FALSE(cluster_.Node("n3").Volume("rv")) << "the new copy was not deleted";
  EXPECT_EQ(State(), before);
  // And the catalogue refuses the controller's own change while the claim lives.
  EXPECT_EQ(store_.SetReplicas("rv", {"n1", "n2", "n3"}).status().code(), EBUSY);
}

}  // namespace
}  // namespace nbdcsi::controller
