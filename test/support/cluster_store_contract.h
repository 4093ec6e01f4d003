// The rules every ClusterStore keeps (common/cluster/cluster_store.h), as one typed gtest suite.
// Each implementation instantiates it with a backend type providing
//
//   static std::unique_ptr<cluster::ClusterStore> Make();   // a fresh, empty store
//   static void Expire(cluster::ClusterStore&, cluster::LeaseId);  // as if its TTL ran out
//
// test/unit/cluster_state_test.cpp runs it on MemoryClusterStore, and
// test/integration/etcd_cluster_test.cpp on EtcdClusterStore against a real etcd, so the fake
// the unit tests of callers lean on cannot drift from the real store.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/cluster/cluster_store.h"

namespace nbdcsi::test {

template <typename Backend>
class ClusterStoreContract : public ::testing::Test {
 protected:
  using VolumeState = cluster::VolumeState;

  void SetUp() override {
    store_ = Backend::Make();
    ASSERT_TRUE(store_);
  }

  static VolumeState Vol(std::string name, std::vector<std::string> replicas,
                         std::vector<std::string> in_sync = {}) {
    VolumeState v;
    v.name = std::move(name);
    v.size_bytes = 1 << 20;
    v.replicas = std::move(replicas);
    v.in_sync = std::move(in_sync);
    return v;
  }

  cluster::LeaseId NewLease() {
    auto l = store_->GrantLease(30);
    EXPECT_TRUE(l.ok()) << l.status().message();
    return l.ok() ? *l : 0;
  }

  // Creates `v` and claims it for `node` with a new lease; returns that lease.
  cluster::LeaseId CreateAndClaim(const VolumeState& v, const std::string& node) {
    auto c = store_->CreateVolume(v);
    EXPECT_TRUE(c.ok()) << c.status().message();
    cluster::LeaseId lease = NewLease();
    auto claimed = store_->ClaimTarget(v.name, node, lease);
    EXPECT_TRUE(claimed.ok()) << claimed.status().message();
    return lease;
  }

  std::unique_ptr<cluster::ClusterStore> store_;
};

TYPED_TEST_SUITE_P(ClusterStoreContract);

TYPED_TEST_P(ClusterStoreContract, CreateNormalisesAndGetReturnsIt) {
  auto created = this->store_->CreateVolume(this->Vol("v1", {"n2", "n1", "n2"}, {"n2"}));
  ASSERT_TRUE(created.ok()) << created.status().message();
  EXPECT_EQ(created->replicas, (std::vector<std::string>{"n1", "n2"}));
  auto got = this->store_->GetVolume("v1");
  ASSERT_TRUE(got.ok()) << got.status().message();
  EXPECT_EQ(*got, *created);
  EXPECT_EQ(got->epoch, 0u);
  EXPECT_EQ(got->target, "");
  EXPECT_EQ(got->in_sync, (std::vector<std::string>{"n2"}));
}

TYPED_TEST_P(ClusterStoreContract, CreateIsIdempotentButRefusesADifferentVolume) {
  ASSERT_TRUE(this->store_->CreateVolume(this->Vol("v1", {"n1"})).ok());
  auto again = this->store_->CreateVolume(this->Vol("v1", {"n1"}));
  EXPECT_TRUE(again.ok()) << again.status().message();
  auto bigger = this->Vol("v1", {"n1"});
  bigger.size_bytes *= 2;
  EXPECT_EQ(this->store_->CreateVolume(bigger).status().code(), EEXIST);
  EXPECT_EQ(this->store_->CreateVolume(this->Vol("v1", {"n1", "n2"})).status().code(), EEXIST);
  // The refused calls changed nothing.
  EXPECT_EQ(this->store_->GetVolume("v1")->size_bytes, uint64_t{1} << 20);
}

TYPED_TEST_P(ClusterStoreContract, CreateRefusesBadInput) {
  EXPECT_EQ(this->store_->CreateVolume(this->Vol("v1", {"n1"}, {"n2"})).status().code(), EINVAL);
  EXPECT_EQ(this->store_->CreateVolume(this->Vol("v/1", {"n1"})).status().code(), EINVAL);
  EXPECT_EQ(this->store_->CreateVolume(this->Vol("v1", {})).status().code(), EINVAL);
  EXPECT_EQ(this->store_->CreateVolume(this->Vol("v1", {"Node_1"})).status().code(), EINVAL);
  auto claimed = this->Vol("v1", {"n1"});
  claimed.epoch = 3;
  EXPECT_EQ(this->store_->CreateVolume(claimed).status().code(), EINVAL);
  auto zero = this->Vol("v1", {"n1"});
  zero.size_bytes = 0;
  EXPECT_EQ(this->store_->CreateVolume(zero).status().code(), EINVAL);
  EXPECT_EQ(this->store_->GetVolume("v1").status().code(), ENOENT);
  EXPECT_EQ(this->store_->GetVolume("../v1").status().code(), EINVAL);
}

TYPED_TEST_P(ClusterStoreContract, ClaimRaisesTheEpochOnceAndReclaimKeepsIt) {
  ASSERT_TRUE(this->store_->CreateVolume(this->Vol("v1", {"n1", "n2"})).ok());
  cluster::LeaseId lease = this->NewLease();
  auto first = this->store_->ClaimTarget("v1", "n1", lease);
  ASSERT_TRUE(first.ok()) << first.status().message();
  EXPECT_EQ(first->epoch, 1u);
  EXPECT_EQ(first->target, "n1");
  auto again = this->store_->ClaimTarget("v1", "n1", lease);
  ASSERT_TRUE(again.ok()) << again.status().message();
  EXPECT_EQ(again->epoch, 1u);
  auto got = this->store_->GetVolume("v1");
  EXPECT_EQ(got->target, "n1");
  EXPECT_EQ(got->epoch, 1u);
}

TYPED_TEST_P(ClusterStoreContract, ClaimByAnotherNodeIsBusy) {
  this->CreateAndClaim(this->Vol("v1", {"n1", "n2"}), "n1");
  auto other = this->store_->ClaimTarget("v1", "n2", this->NewLease());
  EXPECT_EQ(other.status().code(), EBUSY);
  EXPECT_NE(other.status().message().find("n1"), std::string::npos) << other.status().message();
  EXPECT_EQ(this->store_->GetVolume("v1")->epoch, 1u);
  EXPECT_EQ(this->store_->ClaimTarget("nope", "n1", this->NewLease()).status().code(), ENOENT);
}

TYPED_TEST_P(ClusterStoreContract, ClaimNeedsALiveLease) {
  ASSERT_TRUE(this->store_->CreateVolume(this->Vol("v1", {"n1"})).ok());
  cluster::LeaseId lease = this->NewLease();
  ASSERT_TRUE(this->store_->RevokeLease(lease).ok());
  EXPECT_EQ(this->store_->ClaimTarget("v1", "n1", lease).status().code(), ENOENT);
  EXPECT_EQ(this->store_->GetVolume("v1")->epoch, 0u);
  EXPECT_EQ(this->store_->RevokeLease(lease).code(), ENOENT);
  EXPECT_EQ(this->store_->KeepAliveLease(lease).status().code(), ENOENT);
}

TYPED_TEST_P(ClusterStoreContract, ReleaseLetsAnotherNodeClaimAndFencesTheOldOne) {
  this->CreateAndClaim(this->Vol("v1", {"n1", "n2"}, {"n1"}), "n1");
  ASSERT_TRUE(this->store_->ReleaseTarget("v1", "n1", 1).ok());
  EXPECT_EQ(this->store_->GetVolume("v1")->target, "");
  // Releasing twice is harmless.
  EXPECT_TRUE(this->store_->ReleaseTarget("v1", "n1", 1).ok());
  auto b = this->store_->ClaimTarget("v1", "n2", this->NewLease());
  ASSERT_TRUE(b.ok()) << b.status().message();
  EXPECT_EQ(b->epoch, 2u);
  EXPECT_EQ(this->store_->ReleaseTarget("v1", "n1", 1).code(), ESTALE);
  EXPECT_EQ(this->store_->SetInSync("v1", "n1", 1, {"n1"}).status().code(), ESTALE);
  // Right node, wrong epoch, and wrong node, right epoch: both stale.
  EXPECT_EQ(this->store_->ReleaseTarget("v1", "n2", 1).code(), ESTALE);
  EXPECT_EQ(this->store_->ReleaseTarget("v1", "n1", 2).code(), ESTALE);
  EXPECT_EQ(this->store_->GetVolume("v1")->target, "n2");
}

TYPED_TEST_P(ClusterStoreContract, ExpiredLeaseLetsAnotherNodeClaim) {
  cluster::LeaseId old = this->CreateAndClaim(this->Vol("v1", {"n1", "n2"}, {"n1", "n2"}), "n1");
  TypeParam::Expire(*this->store_, old);
  auto lapsed = this->store_->GetVolume("v1");
  ASSERT_TRUE(lapsed.ok());
  EXPECT_EQ(lapsed->target, "");
  EXPECT_EQ(lapsed->epoch, 1u);
  // With nobody claiming since, the old holder may still release (its unstage after the fact).
  EXPECT_TRUE(this->store_->ReleaseTarget("v1", "n1", 1).ok());
  auto b = this->store_->ClaimTarget("v1", "n2", this->NewLease());
  ASSERT_TRUE(b.ok()) << b.status().message();
  EXPECT_EQ(b->epoch, 2u);
  auto stale = this->store_->SetInSync("v1", "n1", 1, {"n1"});
  EXPECT_EQ(stale.status().code(), ESTALE);
  EXPECT_EQ(this->store_->ReleaseTarget("v1", "n1", 1).code(), ESTALE);
  EXPECT_EQ(this->store_->GetVolume("v1")->in_sync, (std::vector<std::string>{"n1", "n2"}));
}

TYPED_TEST_P(ClusterStoreContract, AClaimMarksDirtyAndOnlyACleanReleaseClearsIt) {
  ASSERT_TRUE(this->store_->CreateVolume(this->Vol("v1", {"n1", "n2"}, {"n1", "n2"})).ok());
  EXPECT_FALSE(this->store_->GetVolume("v1")->dirty);
  auto a = this->store_->ClaimTarget("v1", "n1", this->NewLease());
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_TRUE(a->dirty);
  EXPECT_TRUE(this->store_->GetVolume("v1")->dirty);
  // An ordinary release (a failed open, a target that could not drain) leaves it set.
  ASSERT_TRUE(this->store_->ReleaseTarget("v1", "n1", 1).ok());
  EXPECT_TRUE(this->store_->GetVolume("v1")->dirty);
  auto b = this->store_->ClaimTarget("v1", "n2", this->NewLease());
  ASSERT_TRUE(b.ok()) << b.status().message();
  ASSERT_TRUE(this->store_->ReleaseTarget("v1", "n2", 2, /*clean=*/true).ok());
  auto after = this->store_->GetVolume("v1");
  EXPECT_FALSE(after->dirty);
  EXPECT_EQ(after->target, "");
  // A stale holder cannot clear it, and the next claim sets it again.
  auto c = this->store_->ClaimTarget("v1", "n1", this->NewLease());
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(this->store_->ReleaseTarget("v1", "n2", 2, true).code(), ESTALE);
  EXPECT_TRUE(this->store_->GetVolume("v1")->dirty);
}

TYPED_TEST_P(ClusterStoreContract, ExpiredClaimRefusesItsHolderBeforeAnyNewClaim) {
  cluster::LeaseId old = this->CreateAndClaim(this->Vol("v1", {"n1", "n2"}, {"n1"}), "n1");
  TypeParam::Expire(*this->store_, old);
  // Nobody claimed yet, but the lease is gone: the old target must not change in_sync.
  EXPECT_EQ(this->store_->SetInSync("v1", "n1", 1, {"n1", "n2"}).status().code(), ESTALE);
}

TYPED_TEST_P(ClusterStoreContract, ReclaimWithANewLeaseMovesTheClaim) {
  cluster::LeaseId first = this->CreateAndClaim(this->Vol("v1", {"n1"}), "n1");
  cluster::LeaseId second = this->NewLease();
  auto again = this->store_->ClaimTarget("v1", "n1", second);
  ASSERT_TRUE(again.ok()) << again.status().message();
  EXPECT_EQ(again->epoch, 1u);
  TypeParam::Expire(*this->store_, first);
  auto got = this->store_->GetVolume("v1");
  EXPECT_EQ(got->target, "n1");
  EXPECT_EQ(this->store_->ClaimTarget("v1", "n2", this->NewLease()).status().code(), EBUSY);
}

TYPED_TEST_P(ClusterStoreContract, SetInSyncOnlyByTheTargetAndOnlyReplicas) {
  this->CreateAndClaim(this->Vol("v1", {"n1", "n2", "n3"}), "n1");
  auto s = this->store_->SetInSync("v1", "n1", 1, {"n2", "n1"});
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->in_sync, (std::vector<std::string>{"n1", "n2"}));
  EXPECT_EQ(this->store_->SetInSync("v1", "n1", 1, {"n1", "n4"}).status().code(), EINVAL);
  EXPECT_EQ(this->store_->SetInSync("v1", "n2", 1, {"n2"}).status().code(), ESTALE);
  EXPECT_EQ(this->store_->SetInSync("v1", "n1", 2, {"n1"}).status().code(), ESTALE);
  EXPECT_EQ(this->store_->SetInSync("v1", "n1", 0, {"n1"}).status().code(), ESTALE);
  EXPECT_EQ(this->store_->GetVolume("v1")->in_sync, (std::vector<std::string>{"n1", "n2"}));
}

TYPED_TEST_P(ClusterStoreContract, SetReplicasTrimsInSyncAndKeepsOneCurrentCopy) {
  ASSERT_TRUE(this->store_->CreateVolume(this->Vol("v1", {"n1", "n2"}, {"n1", "n2"})).ok());
  auto s = this->store_->SetReplicas("v1", {"n3", "n1"});
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->replicas, (std::vector<std::string>{"n1", "n3"}));
  EXPECT_EQ(s->in_sync, (std::vector<std::string>{"n1"}));
  EXPECT_EQ(this->store_->SetReplicas("v1", {"n3"}).status().code(), EBUSY);
  EXPECT_EQ(this->store_->SetReplicas("v1", {}).status().code(), EINVAL);
  EXPECT_EQ(this->store_->SetReplicas("nope", {"n1"}).status().code(), ENOENT);
  EXPECT_EQ(this->store_->GetVolume("v1")->replicas, (std::vector<std::string>{"n1", "n3"}));
}

// A served volume's replica set is its target's to change (it connects to an added replica and
// stops writing to a removed one): the controller's call is refused while a claim lives, a
// stale or foreign target's is ESTALE, and the holder's keeps the claim, epoch and in-sync set.
TYPED_TEST_P(ClusterStoreContract, SetReplicasOfAServedVolumeOnlyByItsTarget) {
  cluster::LeaseId lease =
      this->CreateAndClaim(this->Vol("v1", {"n1", "n2"}, {"n1", "n2"}), "n1");
  EXPECT_EQ(this->store_->SetReplicas("v1", {"n1", "n2", "n3"}).status().code(), EBUSY);
  EXPECT_EQ(this->store_->SetReplicas("v1", {"n1", "n2", "n3"}, "n2", 1).status().code(), ESTALE);
  EXPECT_EQ(this->store_->SetReplicas("v1", {"n1", "n2", "n3"}, "n1", 2).status().code(), ESTALE);
  auto added = this->store_->SetReplicas("v1", {"n3", "n1", "n2"}, "n1", 1);
  ASSERT_TRUE(added.ok()) << added.status().message();
  EXPECT_EQ(added->replicas, (std::vector<std::string>{"n1", "n2", "n3"}));
  EXPECT_EQ(added->in_sync, (std::vector<std::string>{"n1", "n2"}));  // n3 joins out of sync
  EXPECT_EQ(added->target, "n1");
  EXPECT_EQ(added->epoch, 1u);
  // The new replica may join the in-sync set (the target's SetInSync), then n1 may leave.
  ASSERT_TRUE(this->store_->SetInSync("v1", "n1", 1, {"n1", "n2", "n3"}).ok());
  auto removed = this->store_->SetReplicas("v1", {"n2", "n3"}, "n1", 1);
  ASSERT_TRUE(removed.ok()) << removed.status().message();
  EXPECT_EQ(removed->in_sync, (std::vector<std::string>{"n2", "n3"}));
  EXPECT_EQ(this->store_->GetVolume("v1")->replicas, (std::vector<std::string>{"n2", "n3"}));
  // Its claim gone, the target may not; the controller may again.
  TypeParam::Expire(*this->store_, lease);
  EXPECT_EQ(this->store_->SetReplicas("v1", {"n2"}, "n1", 1).status().code(), ESTALE);
  auto ctl = this->store_->SetReplicas("v1", {"n2"});
  ASSERT_TRUE(ctl.ok()) << ctl.status().message();
  EXPECT_EQ(ctl->in_sync, (std::vector<std::string>{"n2"}));
}

TYPED_TEST_P(ClusterStoreContract, GrowVolumeOnlyGrowsAndKeepsTheRest) {
  this->CreateAndClaim(this->Vol("v1", {"n1", "n2"}), "n1");
  auto before = this->store_->GetVolume("v1");
  ASSERT_TRUE(before.ok()) << before.status().message();
  auto grown = this->store_->GrowVolume("v1", before->size_bytes * 2);
  ASSERT_TRUE(grown.ok()) << grown.status().message();
  EXPECT_EQ(grown->size_bytes, before->size_bytes * 2);
  auto expected = *before;
  expected.size_bytes = before->size_bytes * 2;
  EXPECT_EQ(*grown, expected);  // the claim, epoch, replicas and in-sync set stay
  EXPECT_EQ(this->store_->GetVolume("v1")->size_bytes, expected.size_bytes);
  EXPECT_EQ(this->store_->GetVolume("v1")->epoch, expected.epoch);
  // Smaller or equal: satisfied, nothing changes.
  auto same = this->store_->GrowVolume("v1", before->size_bytes);
  ASSERT_TRUE(same.ok()) << same.status().message();
  EXPECT_EQ(*same, expected);
  EXPECT_EQ(this->store_->GrowVolume("v1", 0).status().code(), EINVAL);
  EXPECT_EQ(this->store_->GrowVolume("nope", 1 << 20).status().code(), ENOENT);
  EXPECT_EQ(this->store_->GetVolume("v1")->size_bytes, expected.size_bytes);
  EXPECT_EQ(this->store_->GetVolume("v1")->epoch, expected.epoch);
}

TYPED_TEST_P(ClusterStoreContract, DeleteWaitsForTheTargetToGo) {
  this->CreateAndClaim(this->Vol("v1", {"n1"}), "n1");
  EXPECT_EQ(this->store_->DeleteVolume("v1").code(), EBUSY);
  ASSERT_TRUE(this->store_->ReleaseTarget("v1", "n1", 1).ok());
  EXPECT_TRUE(this->store_->DeleteVolume("v1").ok());
  EXPECT_EQ(this->store_->GetVolume("v1").status().code(), ENOENT);
  EXPECT_EQ(this->store_->DeleteVolume("v1").code(), ENOENT);
}

TYPED_TEST_P(ClusterStoreContract, ListPagesInNameOrderWithLiveTargets) {
  for (const char* n : {"v3", "v1", "v5", "v2", "v4"}) {
    ASSERT_TRUE(this->store_->CreateVolume(this->Vol(n, {"n1"})).ok());
  }
  cluster::LeaseId lease = this->NewLease();
  ASSERT_TRUE(this->store_->ClaimTarget("v2", "n1", lease).ok());
  std::vector<std::string> names;
  std::string after;
  int pages = 0;
  do {
    auto page = this->store_->ListVolumes(after, 2);
    ASSERT_TRUE(page.ok()) << page.status().message();
    ASSERT_LE(page->volumes.size(), 2u);
    for (const auto& v : page->volumes) {
      names.push_back(v.name);
      EXPECT_EQ(v.target, v.name == "v2" ? "n1" : "") << v.name;
    }
    after = page->next;
    ASSERT_LT(++pages, 10);
  } while (!after.empty());
  EXPECT_EQ(names, (std::vector<std::string>{"v1", "v2", "v3", "v4", "v5"}));
  EXPECT_EQ(this->store_->ListVolumes("", 0).status().code(), EINVAL);
  auto rest = this->store_->ListVolumes("v5", 10);
  ASSERT_TRUE(rest.ok());
  EXPECT_TRUE(rest->volumes.empty());
  EXPECT_EQ(rest->next, "");
}

TYPED_TEST_P(ClusterStoreContract, NodeLivenessFollowsItsLease) {
  cluster::LeaseId a = this->NewLease();
  cluster::LeaseId b = this->NewLease();
  ASSERT_TRUE(this->store_->RegisterNode("n1", a).ok());
  ASSERT_TRUE(this->store_->RegisterNode("n2", b).ok());
  EXPECT_EQ(this->store_->LiveNodes().value(), (std::vector<std::string>{"n1", "n2"}));
  TypeParam::Expire(*this->store_, a);
  EXPECT_EQ(this->store_->LiveNodes().value(), (std::vector<std::string>{"n2"}));
  EXPECT_EQ(this->store_->RegisterNode("n1", a).code(), ENOENT);
  EXPECT_EQ(this->store_->RegisterNode("N1", b).code(), EINVAL);
  EXPECT_EQ(this->store_->NodeEndpoint("n1").status().code(), ENOENT);
  EXPECT_EQ(this->store_->NodeEndpoint("n2").status().code(), ENXIO);
  ASSERT_TRUE(this->store_->RegisterNode("n2", b, "tcp://127.0.0.12:10809").ok());
  EXPECT_EQ(this->store_->NodeEndpoint("n2").value(), "tcp://127.0.0.12:10809");
}

TYPED_TEST_P(ClusterStoreContract, RacingClaimsHaveExactlyOneWinner) {
  ASSERT_TRUE(this->store_->CreateVolume(this->Vol("v1", {"n1"})).ok());
  constexpr int kNodes = 8;
  std::vector<cluster::LeaseId> leases;
  for (int i = 0; i < kNodes; ++i) leases.push_back(this->NewLease());
  std::atomic<int> go{0}, won{0}, busy{0}, other{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kNodes; ++i) {
    threads.emplace_back([&, i] {
      go.fetch_add(1);
      while (go.load() < kNodes) std::this_thread::yield();
      auto r = this->store_->ClaimTarget("v1", "node-" + std::to_string(i), leases[i]);
      if (r.ok()) {
        won.fetch_add(1);
      } else if (r.status().code() == EBUSY) {
        busy.fetch_add(1);
      } else {
        other.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_EQ(busy.load(), kNodes - 1);
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(this->store_->GetVolume("v1")->epoch, 1u);
}

REGISTER_TYPED_TEST_SUITE_P(ClusterStoreContract, CreateNormalisesAndGetReturnsIt,
                            CreateIsIdempotentButRefusesADifferentVolume, CreateRefusesBadInput,
                            ClaimRaisesTheEpochOnceAndReclaimKeepsIt, ClaimByAnotherNodeIsBusy,
                            ClaimNeedsALiveLease, ReleaseLetsAnotherNodeClaimAndFencesTheOldOne,
                            ExpiredLeaseLetsAnotherNodeClaim,
                            ExpiredClaimRefusesItsHolderBeforeAnyNewClaim,
                            AClaimMarksDirtyAndOnlyACleanReleaseClearsIt,
                            ReclaimWithANewLeaseMovesTheClaim,
                            SetInSyncOnlyByTheTargetAndOnlyReplicas,
                            SetReplicasTrimsInSyncAndKeepsOneCurrentCopy,
                            SetReplicasOfAServedVolumeOnlyByItsTarget,
                            GrowVolumeOnlyGrowsAndKeepsTheRest,
                            DeleteWaitsForTheTargetToGo, ListPagesInNameOrderWithLiveTargets,
                            NodeLivenessFollowsItsLease, RacingClaimsHaveExactlyOneWinner);

}  // namespace nbdcsi::test
