// The cluster state against a real etcd (Debian's etcd-server), started by this test on loopback
// (127.0.0.21, free ports, data in a temp dir) and killed at the end:
//
//   - the ClusterStore contract suite (test/support/cluster_store_contract.h), the same cases the
//     memory fake passes, each in its own key prefix;
//   - separate clients (own connections) racing ClaimTarget: exactly one wins per round and the
//     epoch rises exactly once per round;
//   - a target whose keepalives stop: its lease runs out on etcd's clock, another node's claim
//     then succeeds at epoch+1 and the old holder is refused with ESTALE;
//   - keepalives hold a lease well past its TTL;
//   - etcd killed: calls fail with EAGAIN naming the endpoint, well inside their deadline, and a
//     held Lease reports its loss; etcd restarted on the same data dir: the state is intact and
//     calls work again;
//   - endpoint failover past a dead endpoint.
//
// Prints its figures (claim latency p50/p99, expiry-to-reclaim time, time to fail when etcd is
// down). Exits 77 when the etcd binary is missing, unless CI=true.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "common/cluster/etcd_cluster_store.h"
#include "common/cluster/lease.h"
#include "common/etcd/etcd_client.h"
#include "common/process.h"
#include "test/support/certs.h"
#include "test/support/etcd_process.h"
#include "test/support/cluster_store_contract.h"
#include "test/support/free_port.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::test {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using cluster::EtcdClusterStore;
using cluster::KeyLayout;
using cluster::VolumeState;

constexpr const char* kIp = "127.0.0.21";

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

EtcdProcess* g_etcd = nullptr;

etcd::EtcdOptions Options(const std::string& endpoint, std::chrono::milliseconds timeout = 5000ms) {
  etcd::EtcdOptions o;
  o.endpoints = {endpoint};
  o.call_timeout = timeout;
  return o;
}

std::unique_ptr<EtcdClusterStore> NewStore(const std::string& endpoint, const std::string& prefix,
                                           std::chrono::milliseconds timeout = 5000ms) {
  auto client = etcd::EtcdClient::Create(Options(endpoint, timeout));
  EXPECT_TRUE(client.ok()) << client.status().message();
  if (!client.ok()) return nullptr;
  auto keys = KeyLayout::Make(prefix);
  EXPECT_TRUE(keys.ok());
  return std::make_unique<EtcdClusterStore>(std::move(*client), *keys);
}

std::string UniquePrefix(const char* tag) {
  static std::atomic<int> n{0};
  return fmt::format("/it-{}-{}-{}/", tag, getpid(), n.fetch_add(1));
}

struct EtcdBackend {
  static std::unique_ptr<cluster::ClusterStore> Make() {
    return NewStore(g_etcd->endpoint(), UniquePrefix("contract"));
  }
  // Revoking is what etcd does at expiry, without waiting out a TTL (the real expiry is
  // LeaseExpiry below).
  static void Expire(cluster::ClusterStore& s, cluster::LeaseId lease) {
    ASSERT_TRUE(s.RevokeLease(lease).ok());
  }
};

INSTANTIATE_TYPED_TEST_SUITE_P(Etcd, ClusterStoreContract, EtcdBackend);

VolumeState Vol(const std::string& name, std::vector<std::string> replicas) {
  VolumeState v;
  v.name = name;
  v.size_bytes = 1 << 30;
  v.replicas = std::move(replicas);
  return v;
}

TEST(EtcdCluster, RacingClientsClaimExactlyOncePerRound) {
  const std::string prefix = UniquePrefix("race");
  constexpr int kNodes = 6;
  constexpr int kRounds = 10;
  std::vector<std::unique_ptr<EtcdClusterStore>> stores;
  std::vector<cluster::LeaseId> leases;
  for (int i = 0; i < kNodes; ++i) {
    stores.push_back(NewStore(g_etcd->endpoint(), prefix));
    ASSERT_TRUE(stores.back());
    auto l = stores.back()->GrantLease(60);
    ASSERT_TRUE(l.ok()) << l.status().message();
    leases.push_back(*l);
  }
  ASSERT_TRUE(stores[0]->CreateVolume(Vol("v", {"node-0", "node-1"})).ok());
  for (int round = 1; round <= kRounds; ++round) {
    std::atomic<int> ready{0}, busy{0};
    std::atomic<int> winner{-1};
    std::vector<std::string> errors(kNodes);
    std::vector<std::thread> threads;
    for (int i = 0; i < kNodes; ++i) {
      threads.emplace_back([&, i] {
        ready.fetch_add(1);
        while (ready.load() < kNodes) std::this_thread::yield();
        auto r = stores[i]->ClaimTarget("v", fmt::format("node-{}", i), leases[i]);
        if (r.ok()) {
          int none = -1;
          if (!winner.compare_exchange_strong(none, i)) errors[i] = "second winner";
          if (r->epoch != static_cast<uint64_t>(round)) {
            errors[i] = fmt::format("won at epoch {}", r->epoch);
          }
        } else if (r.status().code() == EBUSY) {
          busy.fetch_add(1);
        } else {
          errors[i] = r.status().message();
        }
      });
    }
    for (auto& t : threads) t.join();
    for (int i = 0; i < kNodes; ++i) EXPECT_EQ(errors[i], "") << "round " << round << " node " << i;
    ASSERT_GE(winner.load(), 0) << "round " << round;
    EXPECT_EQ(busy.load(), kNodes - 1);
    auto v = stores[0]->GetVolume("v");
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->epoch, static_cast<uint64_t>(round));
    EXPECT_EQ(v->target, fmt::format("node-{}", winner.load()));
    ASSERT_TRUE(stores[winner]->ReleaseTarget("v", v->target, v->epoch).ok());
  }
}

TEST(EtcdCluster, ClaimLatency) {
  auto store = NewStore(g_etcd->endpoint(), UniquePrefix("latency"));
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->CreateVolume(Vol("v", {"node-a"})).ok());
  auto lease = store->GrantLease(60);
  ASSERT_TRUE(lease.ok());
  std::vector<double> claim_ms;
  for (int i = 0; i < 40; ++i) {
    auto t0 = Clock::now();
    auto c = store->ClaimTarget("v", "node-a", *lease);
    claim_ms.push_back(Ms(Clock::now() - t0));
    ASSERT_TRUE(c.ok()) << c.status().message();
    ASSERT_EQ(c->epoch, static_cast<uint64_t>(i + 1));
    ASSERT_TRUE(store->ReleaseTarget("v", "node-a", c->epoch).ok());
  }
  std::sort(claim_ms.begin(), claim_ms.end());
  double p50 = claim_ms[claim_ms.size() / 2];
  double p99 = claim_ms[claim_ms.size() * 99 / 100];
  printf("FIGURE claim latency (read Txn + CAS Txn, fsync'd by etcd): p50 %.2f ms, p99 %.2f ms\n",
         p50, p99);
  RecordProperty("claim_p50_ms", fmt::format("{:.2f}", p50));
}

TEST(EtcdCluster, LeaseExpiryLetsAnotherNodeClaimAndFencesTheOldTarget) {
  const std::string prefix = UniquePrefix("expiry");
  auto a = NewStore(g_etcd->endpoint(), prefix);
  auto b = NewStore(g_etcd->endpoint(), prefix);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->CreateVolume(Vol("v", {"node-a", "node-b"})).ok());
  constexpr int64_t kTtl = 2;
  auto la = cluster::Lease::Grant(*a, kTtl);
  ASSERT_TRUE(la.ok()) << la.status().message();
  auto claimed = a->ClaimTarget("v", "node-a", (*la)->id());
  ASSERT_TRUE(claimed.ok()) << claimed.status().message();
  ASSERT_TRUE(a->SetInSync("v", "node-a", 1, {"node-a"}).ok());
  auto lb = cluster::Lease::Grant(*b, 10);
  ASSERT_TRUE(lb.ok());
  // node-a's datapath stops (no more keepalives); node-b keeps trying to take over.
  (*la)->Abandon();
  const auto stopped = Clock::now();
  EXPECT_EQ(b->ClaimTarget("v", "node-b", (*lb)->id()).status().code(), EBUSY);
  StatusOr<VolumeState> won = Error(EBUSY, "not yet");
  ASSERT_TRUE(WaitUntil(
      [&] {
        won = b->ClaimTarget("v", "node-b", (*lb)->id());
        EXPECT_TRUE(won.ok() || won.status().code() == EBUSY) << won.status().message();
        return won.ok();
      },
      std::chrono::seconds(kTtl + 8), 50ms));
  const auto took = Clock::now() - stopped;
  EXPECT_EQ(won->epoch, 2u);
  EXPECT_EQ(won->target, "node-b");
  // etcd expires a lease no earlier than its TTL after the last renewal (which was before
  // Abandon), and checks for expired leases twice a second.
  EXPECT_LT(took, std::chrono::seconds(kTtl + 3));
  printf("FIGURE keepalives stopped -> other node's claim succeeds: %.0f ms (TTL %lld s)\n",
         Ms(took), static_cast<long long>(kTtl));
  EXPECT_EQ(a->SetInSync("v", "node-a", 1, {"node-a", "node-b"}).status().code(), ESTALE);
  EXPECT_EQ(a->ReleaseTarget("v", "node-a", 1).code(), ESTALE);
  // Re-claiming with the dead lease is refused too, and changes nothing.
  EXPECT_EQ(a->ClaimTarget("v", "node-a", (*la)->id()).status().code(), EBUSY);
  auto v = b->GetVolume("v");
  EXPECT_EQ(v->epoch, 2u);
  EXPECT_EQ(v->in_sync, (std::vector<std::string>{"node-a"}));
  EXPECT_TRUE(b->SetInSync("v", "node-b", 2, {"node-a", "node-b"}).ok());
}

TEST(EtcdCluster, KeepalivesHoldALeaseWellPastItsTtl) {
  const std::string prefix = UniquePrefix("keepalive");
  auto a = NewStore(g_etcd->endpoint(), prefix);
  auto b = NewStore(g_etcd->endpoint(), prefix);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->CreateVolume(Vol("v", {"node-a"})).ok());
  auto lease = cluster::Lease::Grant(*a, 2);
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(a->ClaimTarget("v", "node-a", (*lease)->id()).ok());
  // A window for a wrong outcome: the lease must not be lost in three and a half TTLs.
  std::this_thread::sleep_for(7s);
  EXPECT_FALSE((*lease)->lost()) << (*lease)->lost_reason().message();
  EXPECT_GE((*lease)->renewals(), 6u);
  auto ttl = a->client().LeaseTimeToLive((*lease)->id());
  ASSERT_TRUE(ttl.ok()) << ttl.status().message();
  EXPECT_GT(*ttl, 0);
  EXPECT_EQ(b->GetVolume("v")->target, "node-a");
  EXPECT_EQ(b->ClaimTarget("v", "node-b", b->GrantLease(5).value()).status().code(), EBUSY);
  // Release revokes: the claim is gone at once, not after a TTL.
  ASSERT_TRUE((*lease)->Release().ok());
  EXPECT_EQ(b->GetVolume("v")->target, "");
}

TEST(EtcdCluster, FailsOverPastADeadEndpoint) {
  etcd::EtcdOptions o = Options(fmt::format("{}:{}", kIp, FreeLoopbackPort(kIp)));
  o.endpoints.push_back(g_etcd->endpoint());
  auto client = etcd::EtcdClient::Create(o);
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE((*client)->Put("/it-failover/k", "v").ok());
  EXPECT_EQ((*client)->current_endpoint(), g_etcd->endpoint());
  EXPECT_EQ((*client)->Get("/it-failover/k")->value, "v");
  EXPECT_EQ((*client)->Get("/it-failover/missing").status().code(), ENOENT);
}

TEST(EtcdCluster, DownEtcdFailsFastAndARestartKeepsTheState) {
  EtcdProcess own;
  std::string why;
  auto start = Clock::now();
  ASSERT_TRUE(own.Start(&why)) << why;
  printf("FIGURE etcd start -> first read answered: %.0f ms\n", Ms(Clock::now() - start));
  constexpr auto kDeadline = 3000ms;
  auto store = NewStore(own.endpoint(), "/nbd-csi/", kDeadline);
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->CreateVolume(Vol("v", {"node-a", "node-b"})).ok());
  Event lost;
  auto lease = cluster::Lease::Grant(*store, 2, [&](const Status&) { lost.Notify(); });
  ASSERT_TRUE(lease.ok());
  auto claimed = store->ClaimTarget("v", "node-a", (*lease)->id());
  ASSERT_TRUE(claimed.ok());
  ASSERT_TRUE(store->SetInSync("v", "node-a", 1, {"node-a"}).ok());

  own.Kill();
  auto t0 = Clock::now();
  auto down = store->GetVolume("v");
  auto took = Clock::now() - t0;
  ASSERT_FALSE(down.ok());
  EXPECT_EQ(down.status().code(), EAGAIN) << down.status().message();
  EXPECT_NE(down.status().message().find(own.endpoint()), std::string::npos)
      << down.status().message();
  EXPECT_NE(down.status().message().find("volume v"), std::string::npos) << down.status().message();
  EXPECT_LT(took, kDeadline + 500ms);
  printf("FIGURE etcd down: GetVolume failed in %.1f ms (deadline %lld ms): %s\n", Ms(took),
         static_cast<long long>(kDeadline.count()), down.status().message().c_str());
  // Every other call fails the same way, and none outlives its deadline.
  t0 = Clock::now();
  EXPECT_FALSE(store->ClaimTarget("v", "node-b", 1234).ok());
  EXPECT_FALSE(store->GrantLease(5).ok());
  EXPECT_LT(Clock::now() - t0, 2 * kDeadline + 500ms);
  // The holder learns that its lease can no longer be trusted within about its TTL.
  ASSERT_TRUE(lost.Wait(5s));
  EXPECT_EQ((*lease)->lost_reason().code(), ETIMEDOUT) << (*lease)->lost_reason().message();

  auto restart = Clock::now();
  ASSERT_TRUE(own.Start(&why)) << why;
  StatusOr<VolumeState> back = Error(EAGAIN, "not yet");
  ASSERT_TRUE(WaitUntil([&] { return (back = store->GetVolume("v")).ok(); }, 10s, 50ms))
      << back.status().message();
  printf("FIGURE etcd restart -> the old client's GetVolume works again: %.0f ms\n",
         Ms(Clock::now() - restart));
  EXPECT_EQ(back->epoch, 1u);
  EXPECT_EQ(back->replicas, (std::vector<std::string>{"node-a", "node-b"}));
  EXPECT_EQ(back->in_sync, (std::vector<std::string>{"node-a"}));
  // etcd restores leases with a fresh TTL on restart; node-a no longer renews, so the claim
  // lapses after that and node-b takes over at the next epoch.
  auto lb = cluster::Lease::Grant(*store, 10);
  ASSERT_TRUE(lb.ok()) << lb.status().message();
  StatusOr<VolumeState> won = Error(EBUSY, "not yet");
  ASSERT_TRUE(WaitUntil([&] { return (won = store->ClaimTarget("v", "node-b", (*lb)->id())).ok(); },
                        10s, 100ms))
      << won.status().message();
  EXPECT_EQ(won->epoch, 2u);
  printf("FIGURE etcd restart -> node-b's claim succeeds (old lease ran out): %.0f ms\n",
         Ms(Clock::now() - restart));
  EXPECT_EQ(store->SetInSync("v", "node-a", 1, {"node-a"}).status().code(), ESTALE);
  EXPECT_TRUE((*lb)->Release().ok());
}

TEST(EtcdCluster, MutualTlsWithTheProjectsCredentials) {
  TestCerts certs("nbdcsi-etcd-certs");
  ASSERT_TRUE(certs.ok) << "make-certs.sh failed; see " << certs.log();
  EtcdProcess tls_etcd(&certs);
  std::string why;
  ASSERT_TRUE(tls_etcd.Start(&why)) << why;

  etcd::EtcdOptions good = Options(tls_etcd.endpoint(), 2000ms);
  good.tls = tls_etcd.ClientTls();
  auto client = etcd::EtcdClient::Create(good);
  ASSERT_TRUE(client.ok()) << client.status().message();
  auto keys = KeyLayout::Make("/tls/");
  ASSERT_TRUE(keys.ok());
  EtcdClusterStore store(std::move(*client), *keys);
  ASSERT_TRUE(store.CreateVolume(Vol("v", {"node-a"})).ok());
  auto lease = store.GrantLease(10);
  ASSERT_TRUE(lease.ok()) << lease.status().message();
  auto claimed = store.ClaimTarget("v", "node-a", *lease);
  ASSERT_TRUE(claimed.ok()) << claimed.status().message();
  EXPECT_EQ(claimed->epoch, 1u);

  // Plaintext, and a certificate from another CA: refused in the handshake, reported as an
  // unreachable etcd naming the endpoint, within the deadline.
  etcd::EtcdOptions plain = Options(tls_etcd.endpoint(), 2000ms);
  auto plain_client = etcd::EtcdClient::Create(plain);
  ASSERT_TRUE(plain_client.ok());
  auto t0 = Clock::now();
  auto r = (*plain_client)->Range("/tls/volumes/v");
  EXPECT_FALSE(r.ok());
  EXPECT_LT(Clock::now() - t0, 2500ms);
  etcd::EtcdOptions foreign = good;
  foreign.tls = TlsFiles{.cert = certs("other/client.crt"),
                         .key = certs("other/client.key"),
                         .ca = certs("other/ca.crt"),
                         .insecure = false};
  auto foreign_client = etcd::EtcdClient::Create(foreign);
  ASSERT_TRUE(foreign_client.ok()) << foreign_client.status().message();
  auto f = (*foreign_client)->Range("/tls/volumes/v");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), EAGAIN) << f.status().message();
  EXPECT_NE(f.status().message().find(tls_etcd.endpoint()), std::string::npos);
  // A missing file is the caller's error at Create, not a failing call later.
  etcd::EtcdOptions missing = good;
  missing.tls.cert = certs("nope.crt");
  EXPECT_EQ(etcd::EtcdClient::Create(missing).status().code(), ENOENT);
}

}  // namespace
}  // namespace nbdcsi::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (nbdcsi::test::EtcdBinary().empty()) {
    const char* ci = getenv("CI");
    if (ci && std::string(ci) == "true") {
      fprintf(stderr, "FAIL: no etcd binary (CI=true: install etcd-server)\n");
      return 1;
    }
    fprintf(stderr, "SKIP: no etcd binary (apt-get install etcd-server, or set ETCD_BIN)\n");
    return 77;
  }
  int rc;
  {
    nbdcsi::test::EtcdProcess etcd;
    std::string why;
    if (!etcd.Start(&why)) {
      fprintf(stderr, "FAIL: %s\n", why.c_str());
      return 1;
    }
    nbdcsi::test::g_etcd = &etcd;
    rc = RUN_ALL_TESTS();
    nbdcsi::test::g_etcd = nullptr;
  }  // etcd killed, its data dir removed
  // Out through ExitProcess, as the daemons go: the leak check runs while gRPC's threads still
  // hold their OpenSSL per-thread error queues (a failed TLS handshake, MutualTls... below, makes
  // one on a gRPC thread). A normal exit tears those threads down after OpenSSL's own atexit
  // cleanup, which then cannot free the queues, and LeakSanitizer reported them now and then.
  nbdcsi::ExitProcess(rc);
}
