// Cluster state without etcd: the VolumeState / TargetClaim JSON codec (good and bad input), the
// key layout, etcd key-range arithmetic, Lease's keepalive and loss rules on the memory store,
// and the ClusterStore contract run on MemoryClusterStore (the same cases run on etcd in
// test/integration/etcd_cluster_test.cpp).
#include <gtest/gtest.h>

#include <atomic>

#include "common/cluster/keys.h"
#include "common/cluster/lease.h"
#include "common/cluster/volume_state.h"
#include "common/etcd/etcd_client.h"
#include "test/support/cluster_store_contract.h"
#include "test/support/memory_cluster_store.h"
#include "test/support/wait.h"

namespace nbdcsi::cluster {
namespace {

VolumeState Sample() {
  VolumeState v;
  v.name = "pvc-1";
  v.size_bytes = 1ull << 30;
  v.replicas = {"node-a", "node-b", "node-c"};
  v.in_sync = {"node-a", "node-c"};
  v.target = "node-a";
  v.epoch = 7;
  return v;
}

TEST(VolumeStateJson, RoundTripsAndIsCanonical) {
  VolumeState v = Sample();
  std::string text = EncodeVolumeState(v);
  EXPECT_EQ(text, R"({"epoch":7,"in_sync":["node-a","node-c"],"name":"pvc-1",)"
                  R"("replicas":["node-a","node-b","node-c"],"size_bytes":1073741824,)"
                  R"("target":"node-a"})");
  auto back = DecodeVolumeState(text, "k");
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, v);
  // Epochs use the whole unsigned range.
  v.epoch = UINT64_MAX;
  EXPECT_EQ(DecodeVolumeState(EncodeVolumeState(v), "k")->epoch, UINT64_MAX);
}

TEST(VolumeStateJson, DirtyIsStoredOnlyWhenSet) {
  VolumeState v = Sample();
  v.dirty = true;
  const std::string text = EncodeVolumeState(v);
  EXPECT_NE(text.find(R"("dirty":true)"), std::string::npos) << text;
  auto back = DecodeVolumeState(text, "k");
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_TRUE(back->dirty);
  v.dirty = false;
  EXPECT_EQ(EncodeVolumeState(v).find("dirty"), std::string::npos);
  // A state written before the key existed is clean; a dirty that is not a bool is refused.
  EXPECT_FALSE(DecodeVolumeState(EncodeVolumeState(Sample()), "k")->dirty);
  std::string bad = text;
  bad.replace(bad.find("true"), 4, "1");
  EXPECT_FALSE(DecodeVolumeState(bad, "k").ok());
}

TEST(VolumeStateJson, SourceIsStoredOnlyWhenSet) {
  VolumeState v = Sample();
  EXPECT_EQ(EncodeVolumeState(v).find("source"), std::string::npos);
  v.source = "s1:node-a:snap-1";
  const std::string text = EncodeVolumeState(v);
  auto back = DecodeVolumeState(text, "k");
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->source, "s1:node-a:snap-1");
  EXPECT_EQ(*back, v);
  // A state written before the key existed is blank; a source that is not a string is refused.
  EXPECT_EQ(DecodeVolumeState(EncodeVolumeState(Sample()), "k")->source, "");
  std::string bad = text;
  bad.replace(bad.find("\"s1:node-a:snap-1\""), 18, "7");
  EXPECT_FALSE(DecodeVolumeState(bad, "k").ok()) << bad;
}

TEST(VolumeStateJson, RefusesBadInput) {
  const std::string good = EncodeVolumeState(Sample());
  struct Case {
    const char* why;
    std::string json;
    const char* says;
  };
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    auto at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return s.replace(at, from.size(), to);
  };
  const Case cases[] = {
      {"not JSON", "{", "not valid JSON"},
      {"not an object", "[1]", "expected a JSON object"},
      {"unknown field", replace(R"("epoch":7)", R"("epoch":7,"extra":1)"), "unknown field"},
      {"missing field", replace(R"("epoch":7,)", ""), "has no \"epoch\""},
      {"negative epoch", replace(R"("epoch":7)", R"("epoch":-1)"), "unsigned integer"},
      {"float size", replace("1073741824", "1.5"), "unsigned integer"},
      {"size as string", replace("1073741824", "\"1\""), "unsigned integer"},
      {"name not a string", replace(R"("pvc-1")", "5"), "is not a string"},
      {"replica not a string", replace(R"(["node-a","node-b")", R"(["node-a",2)"),
       "array of strings"},
      {"replicas not an array", replace(R"(["node-a","node-b","node-c"])", R"("node-a")"),
       "array of strings"},
      {"in_sync not a subset", replace(R"(["node-a","node-c"])", R"(["node-a","node-x"])"),
       "is not a replica"},
      {"unsorted replicas",
       replace(R"(["node-a","node-b","node-c"])", R"(["node-b","node-a","node-c"])"), "sorted"},
      {"duplicate in_sync", replace(R"(["node-a","node-c"])", R"(["node-a","node-a"])"), "sorted"},
      {"bad node id", replace(R"("target":"node-a")", R"("target":"Node_A")"), "not allowed"},
      {"name with slash", replace(R"("pvc-1")", R"("a/b")"), "must not contain '/'"},
  };
  for (const Case& c : cases) {
    auto r = DecodeVolumeState(c.json, "/p/volumes/pvc-1");
    ASSERT_FALSE(r.ok()) << c.why;
    EXPECT_EQ(r.status().code(), EINVAL) << c.why;
    EXPECT_NE(r.status().message().find(c.says), std::string::npos)
        << c.why << ": " << r.status().message();
    EXPECT_EQ(r.status().message().rfind("/p/volumes/pvc-1", 0), 0u) << r.status().message();
  }
}

TEST(TargetClaimJson, RoundTripsAndRefusesBadInput) {
  TargetClaim c{"node-a", 3};
  EXPECT_EQ(EncodeTargetClaim(c), R"({"epoch":3,"node":"node-a"})");
  EXPECT_EQ(DecodeTargetClaim(EncodeTargetClaim(c), "k").value(), c);
  for (const char* bad : {R"({"epoch":0,"node":"node-a"})", R"({"epoch":1})",
                          R"({"epoch":1,"node":"node-a","lease":5})", R"({"epoch":1,"node":""})",
                          R"({"epoch":"1","node":"node-a"})", "null"}) {
    EXPECT_EQ(DecodeTargetClaim(bad, "k").status().code(), EINVAL) << bad;
  }
}

TEST(VolumeName, FollowsThePoolRules) {
  EXPECT_TRUE(ValidateClusterVolumeName("pvc-0f_1.A").ok());
  EXPECT_TRUE(ValidateClusterVolumeName(std::string(128, 'a')).ok());
  for (std::string bad :
       {std::string(), std::string(129, 'a'), std::string(".x"), std::string("-x"),
        std::string("a/b"), std::string("a b"), std::string("a\nb")}) {
    auto s = ValidateClusterVolumeName(bad);
    EXPECT_EQ(s.code(), EINVAL) << bad;
    EXPECT_EQ(s.message().find('\n'), std::string::npos) << "raw control byte in the message";
  }
}

TEST(KeyLayout, PutsEachKindUnderThePrefix) {
  auto k = KeyLayout::Make();
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->Volume("v1"), "/nbd-csi/volumes/v1");
  EXPECT_EQ(k->Target("v1"), "/nbd-csi/targets/v1");
  EXPECT_EQ(k->Node("n1"), "/nbd-csi/nodes/n1");
  EXPECT_EQ(k->VolumesPrefix(), "/nbd-csi/volumes/");
  auto custom = KeyLayout::Make("/t/x/");
  ASSERT_TRUE(custom.ok());
  EXPECT_EQ(custom->Target("a"), "/t/x/targets/a");
  EXPECT_EQ(KeyLayout::Make("").status().code(), EINVAL);
  EXPECT_EQ(KeyLayout::Make("/nbd-csi").status().code(), EINVAL);
}

TEST(EtcdRanges, PrefixEndIsTheFirstKeyAfterThePrefix) {
  EXPECT_EQ(etcd::PrefixEnd("/a/"), "/a0");
  EXPECT_EQ(etcd::PrefixEnd("ab"), "ac");
  EXPECT_EQ(etcd::PrefixEnd(std::string("a\xff", 2)), "b");
  EXPECT_EQ(etcd::PrefixEnd(std::string("\xff\xff", 2)), std::string(1, '\0'));
  EXPECT_EQ(etcd::PrefixEnd(""), std::string(1, '\0'));
}

TEST(EtcdClientOptions, RefusesBadEndpoints) {
  EXPECT_EQ(etcd::EtcdClient::Create({}).status().code(), EINVAL);
  etcd::EtcdOptions o;
  o.endpoints = {"127.0.0.1"};
  EXPECT_EQ(etcd::EtcdClient::Create(o).status().code(), EINVAL);
  o.endpoints = {"http://127.0.0.1:2379", "https://localhost:2379"};
  auto c = etcd::EtcdClient::Create(o);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ((*c)->current_endpoint(), "127.0.0.1:2379");
  o.tls.insecure = false;
  EXPECT_EQ(etcd::EtcdClient::Create(o).status().code(), EINVAL);
}

// A memory store whose keepalives can be made to fail as if etcd were unreachable.
class FlakyStore : public test::MemoryClusterStore {
 public:
  std::atomic<bool> unreachable{false};
  StatusOr<int64_t> KeepAliveLease(LeaseId lease) override {
    if (unreachable) return Error(EAGAIN, "etcd unavailable (test)");
    return MemoryClusterStore::KeepAliveLease(lease);
  }
};

TEST(Lease, KeepsRenewingUntilReleasedThenRevokes) {
  test::MemoryClusterStore store;
  auto lease = Lease::Grant(store, 1);
  ASSERT_TRUE(lease.ok()) << lease.status().message();
  LeaseId id = (*lease)->id();
  EXPECT_TRUE(test::WaitUntil([&] { return (*lease)->renewals() >= 3; }));
  EXPECT_FALSE((*lease)->lost());
  ASSERT_TRUE((*lease)->Release().ok());
  EXPECT_EQ(store.KeepAliveLease(id).status().code(), ENOENT);
  EXPECT_TRUE((*lease)->Release().ok());  // idempotent
}

TEST(Lease, ReportsAnExpiredLeaseAtOnce) {
  test::MemoryClusterStore store;
  test::Event lost;
  Status why;
  auto lease = Lease::Grant(store, 3, [&](const Status& s) {
    why = s;
    lost.Notify();
  });
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(store.ExpireLease((*lease)->id()));
  // The next keepalive (TTL/3 = 1 s) learns it.
  ASSERT_TRUE(lost.Wait(std::chrono::seconds(5)));
  EXPECT_EQ(why.code(), ENOENT);
  EXPECT_TRUE((*lease)->lost());
  EXPECT_TRUE((*lease)->Release().ok());
}

TEST(Lease, ReportsLossWhenKeepalivesFailForTheTtl) {
  FlakyStore store;
  test::Event lost;
  auto lease = Lease::Grant(store, 1, [&](const Status&) { lost.Notify(); });
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(test::WaitUntil([&] { return (*lease)->renewals() >= 1; }));
  store.unreachable = true;
  auto since = std::chrono::steady_clock::now();
  ASSERT_TRUE(lost.Wait(std::chrono::seconds(5)));
  auto after = std::chrono::steady_clock::now() - since;
  // Reported once a TTL (1 s) has passed since the last renewal, which came before `since`, plus
  // at most one retry interval (250 ms); the rest is slack for a loaded machine.
  EXPECT_LT(after, std::chrono::milliseconds(2000));
  EXPECT_EQ((*lease)->lost_reason().code(), ETIMEDOUT);
}

TEST(Lease, TheLossCallbackMayReleaseTheLease) {
  test::MemoryClusterStore store;
  test::Event released;
  std::unique_ptr<Lease> lease;
  auto granted = Lease::Grant(store, 1, [&](const Status&) {
    EXPECT_TRUE(lease->Release().ok());
    released.Notify();
  });
  ASSERT_TRUE(granted.ok());
  lease = std::move(*granted);
  ASSERT_TRUE(store.ExpireLease(lease->id()));
  ASSERT_TRUE(released.Wait(std::chrono::seconds(5)));
  lease.reset();  // joins the keepalive thread, which has returned
}

TEST(Lease, RefusesANonPositiveTtl) {
  test::MemoryClusterStore store;
  EXPECT_EQ(Lease::Grant(store, 0).status().code(), EINVAL);
}

}  // namespace
}  // namespace nbdcsi::cluster

namespace nbdcsi::test {
namespace {

struct MemoryBackend {
  static std::unique_ptr<cluster::ClusterStore> Make() {
    return std::make_unique<MemoryClusterStore>();
  }
  static void Expire(cluster::ClusterStore& s, cluster::LeaseId lease) {
    ASSERT_TRUE(static_cast<MemoryClusterStore&>(s).ExpireLease(lease));
  }
};

INSTANTIATE_TYPED_TEST_SUITE_P(Memory, ClusterStoreContract, MemoryBackend);

}  // namespace
}  // namespace nbdcsi::test
