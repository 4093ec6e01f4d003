// The replicated target (datapath/replica: Target + ReplicaSet) against real parts: an etcd the
// test starts on 127.0.0.22, two nbd-datapathd processes acting as the replica nodes node-a
// (127.0.0.11) and node-b (127.0.0.12), each with its own pool and a TLS NBD listener with its
// node certificate, registered in etcd by themselves (--cluster-etcd). The target runs in this
// process (Target + ReplicaSet through the library, connecting over TCP with mutual TLS at the
// epoch of its claim) or, in the last test, in a third daemon, node-t (127.0.0.13), driven with
// nbdctl and written by fio.
//
//   - Writes fan out to both replicas; node-b is killed with SIGKILL while writes are in flight:
//     not one write fails, node-b is dropped from the in-sync set in etcd, and every
//     acknowledged write reads back from node-a, through the replica client and through nbdcopy
//     (libnbd) after the target closed.
//   - A second target claims after the first one's lease ran out: the first target's next write
//     is refused by the replicas (fenced, EPERM), it stops, and the write fails; the new
//     target's data is intact on both replicas and the in-sync set is unchanged.
//   - Open while a replica is down: it is dropped in etcd before anything is served.
//   - The target's node killed (SIGKILL) under a writer that logs every acknowledged block:
//     node-u claims once the lease ran out, at the next epoch, and every acknowledged write is
//     there, through the new target and on both replicas; the time from the kill to the whole
//     volume read on the new node is printed (goal: lease TTL + 5 s).
//   - A returning replica: node-b killed, 8 MiB written without it, node-b restarted and
//     resynced by `nbdctl target resync` while fio writes: only the dirty regions are copied,
//     and both copies end byte-identical.
//   - The CSI path: nbd-csi-controller with --cluster-etcd creates a replicated volume
//     (StorageClass replicas=2) on two of three registered nodes, the third opens its target and
//     writes through it, the controller reports it healthy, then degraded once a replica died,
//     refuses to delete it while the target is open, and deletes every copy once it is closed.
//   - An unclean takeover: node-b behind a silenced proxy (long --replica-timeout, so it stays in
//     sync), writes in flight reach node-a only, the target is killed and what the proxy held is
//     dropped: the replicas differ; node-u claims, serves at once (reads from one source) and
//     reconciles; afterwards both copies are identical and equal what node-u served.
//   - The daemon path: `nbdctl target open` on node-t, fio (libnbd) random writes with crc32c
//     verify on rv@target, node-b killed with SIGKILL in the middle: fio sees no error, the
//     target reports itself degraded, and node-a's copy equals what the target served.
//   - One replica's disk full (its pool on a small tmpfs) under fio: it is dropped like a dead
//     one, fio sees no error, and the target serves the other copy.
//   - `nbdctl target resync` without --wait: started in the background, followed by inspect.
//   - A snapshot of one replicated volume restored through CSI into another (replicas=2): the
//     first copy restored on the snapshot's node, the other blank and out of sync until the
//     first target copies the data to it; then both copies are the snapshot's image.
//   - A target opened by `nbdctl target open` alone, its daemon killed with SIGKILL and started
//     again: the target is reopened at the next epoch and serves what was written before; once
//     closed by request, the next start leaves it closed.
//   - Replica moves: `nbdctl target move` of a 256 MiB volume from node-b to node-u (127.0.0.14)
//     under fio with verify (no error; node-u's copy byte-identical; the next epoch fences the
//     old one); bad input refused with nothing changed, the last in-sync replica kept, node-u
//     killed during its copy (the move fails saying so, the volume keeps serving); and
//     `nbdctl cluster volume move` through the controller, which makes and deletes the copies.
//
// Exits 77 without etcd, nbdcopy or the daemons, unless CI=true.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include <grpcpp/create_channel.h>

#include "common/cluster/etcd_cluster_store.h"
#include "csi/csi.grpc.pb.h"
#include "datapath/api/target.grpc.pb.h"
#include "datapath/replica/client.h"
#include "datapath/replica/target.h"
#include "test/controller/csi_requests.h"
#include "test/support/certs.h"
#include "test/support/child_proc.h"
#include "test/support/etcd_process.h"
#include "test/support/free_port.h"
#include "test/support/http_get.h"
#include "test/support/tcp_proxy.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::replica {
namespace {

using namespace std::chrono_literals;
using datapath::BackendRequest;
namespace fs = std::filesystem;
namespace v1 = ::csi::v1;

constexpr uint64_t kSize = 64ull << 20;
constexpr uint32_t kBlock = 4096;
constexpr const char* kVolume = "rv";

using test::Bin;
using test::Have;
using test::ReadFile;

// One replica node: nbd-datapathd with its own pool, API on a Unix socket, NBD over TLS on its
// own loopback address with its node certificate.
class Node {
 public:
  Node(std::string id, std::string ip, const test::TestCerts& certs)
      : id_(std::move(id)), ip_(std::move(ip)), certs_(certs), dir_("rt-" + id_) {}

  // The daemon joins the cluster through `etcd`: it registers itself (with its TLS NBD
  // endpoint) on a lease it keeps alive, and serves targets when asked.
  void Start(const std::string& etcd, std::vector<std::string> extra = {}) {
    ASSERT_TRUE(dir_.ok()) << dir_.error();
    if (!port_) port_ = test::FreeLoopbackPort(ip_.c_str());
    fs::create_directories(dir_ / "pool");
    const std::vector<std::string> argv = {
        Bin("nbd-datapathd"), "--pool", dir_ / "pool", "--api", "unix://" + api(),
        "--nbd-listen", nbd_endpoint(), "--nbd-listen", "unix://" + nbd_sock(), "--nbd-tls-cert",
        certs_("node-" + id_ + ".crt"), "--nbd-tls-key", certs_("node-" + id_ + ".key"),
        "--nbd-tls-ca", certs_("ca.crt"), "--node-id", id_, "--cluster-etcd", etcd,
        "--cluster-etcd-insecure", "--cluster-lease-ttl", "4"};
    std::vector<std::string> args = argv;
    args.insert(args.end(), extra.begin(), extra.end());
    ASSERT_TRUE(proc_.Start(args, log()));
    auto a = ParseEndpoint("unix://" + api());
    auto n = ParseEndpoint(nbd_endpoint());
    ASSERT_TRUE(a.ok() && n.ok());
    ASSERT_TRUE(test::WaitUntil([&] { return test::CanConnect(*a) && test::CanConnect(*n); }, 20s))
        << ReadFile(log());
  }
  void CreateVolume() {
    ASSERT_EQ(Nbdctl(fmt::format("volume create {} --size 64Mi", kVolume)), 0);
  }
  // nbdctl against this daemon; its stdout in *out when asked.
  int Nbdctl(const std::string& args, std::string* out = nullptr) {
    std::string got;
    const int rc = TryNbdctl(args, &got);
    if (rc != 0) ADD_FAILURE() << "nbdctl " << args << ": " << got << ReadFile(log());
    if (out) *out = got;
    return rc;
  }
  // The same where a refusal is expected or retried: its stdout and stderr in *out. `tag` names
  // the output file, for callers on several threads.
  int TryNbdctl(const std::string& args, std::string* out = nullptr,
                const std::string& tag = "nbdctl") {
    const std::string file = dir_ / (tag + ".out");
    const std::string cmd =
        Bin("nbdctl") + " --api unix://" + api() + " " + args + " >" + file + " 2>&1";
    const int rc = std::system(cmd.c_str());
    if (out) *out = ReadFile(file);
    return rc;
  }
  // `target inspect`'s health word ("ok", "degraded", "stopped"), "" when it fails.
  std::string Health() {
    std::string out;
    if (TryNbdctl(fmt::format("target inspect {} -o json", kVolume), &out) != 0) return "";
    auto j = nlohmann::json::parse(out, nullptr, false);
    return j.is_discarded() ? "" : j["health"].get<std::string>();
  }
  // `target open`, retried while another node's claim is alive; its JSON in *out.
  bool OpenTargetWithin(std::chrono::seconds limit, std::string* out) {
    return test::WaitUntil(
        [&] { return TryNbdctl(fmt::format("target open {} -o json", kVolume), out) == 0; },
        limit, 200ms);
  }
  // VOL@target on this node's Unix socket, for libnbd clients.
  std::string TargetUri(const std::string& volume = kVolume) const {
    return fmt::format("nbd+unix:///{}@target?socket={}", volume, nbd_sock());
  }
  // The whole of VOL@target as this node serves it, into `path` (nbdcopy through libnbd).
  bool CopyTarget(const std::string& path, const std::string& volume = kVolume) {
    return std::system(
               fmt::format("timeout 60 nbdcopy '{}' {}", TargetUri(volume), path).c_str()) == 0;
  }
  void Kill9() {
    proc_.Kill(SIGKILL);
    proc_.Stop();  // reaps it, so that Start can run the node again
  }
  // The whole volume through libnbd on the node's Unix socket, opened at `epoch` (the replica
  // is fenced there, so an open without an epoch is refused).
  std::string Nbdcopy(uint64_t epoch, const std::string& volume = kVolume) {
    const std::string out = dir_ / "copy.raw";
    const std::string uri =
        fmt::format("nbd+unix:///{}@epoch={}?socket={}", volume, epoch, nbd_sock());
    auto bytes = test::NbdcopyRead(uri, out, dir_ / "nbdcopy.log");
    if (!bytes) ADD_FAILURE() << "nbdcopy failed: " << ReadFile(dir_ / "nbdcopy.log");
    return bytes.value_or("");
  }

  const std::string& id() const { return id_; }
  std::string api() const { return dir_ / "api.sock"; }
  std::string log() const { return dir_ / "datapathd.log"; }
  std::string nbd_sock() const { return dir_ / "nbd.sock"; }
  std::string dir() const { return dir_.path(); }
  std::string nbd_endpoint() const { return fmt::format("tcp://{}:{}", ip_, port_); }
  const std::string& ip() const { return ip_; }
  int port() const { return port_; }

 private:
  std::string id_, ip_;
  const test::TestCerts& certs_;
  test::TempDir dir_;
  int port_ = 0;
  test::Proc proc_;
};

// What the test has written, block by block (the last acknowledged content of each).
struct Model {
  std::mutex mu;
  std::map<uint64_t, std::vector<uint8_t>> blocks;
};

// fio, built with its nbd engine (ioengine=nbd).
bool HaveFioNbd() {
  return Have("fio") && std::system("fio --enghelp 2>/dev/null | grep -qw nbd") == 0;
}

// A 4 KiB random writer with crc32c verify through NBD at `uri`, started in `fio`:
// DIR/NAME.fio, its JSON result in DIR/NAME.json, its output in DIR/NAME.log.
struct VerifyWriter {
  int iodepth;
  std::string offset;  // "" for none
  std::string size;
  int verify_backlog;
  int rate_iops;
};
bool StartVerifyWriter(test::Proc& fio, const std::string& dir, const std::string& name,
                       const std::string& uri, const VerifyWriter& w) {
  const std::string job = dir + "/" + name + ".fio";
  std::ofstream(job) << fmt::format(
      "[global]\nioengine=nbd\nuri={}\nbs=4k\niodepth={}\n{}size={}\nverify=crc32c\n"
      "verify_fatal=1\nverify_backlog={}\nrate_iops=,{}\n[w]\nrw=randwrite\n",
      uri, w.iodepth, w.offset.empty() ? "" : "offset=" + w.offset + "\n", w.size,
      w.verify_backlog, w.rate_iops);
  return fio.Start({"fio", "--output-format=json", "--output=" + dir + "/" + name + ".json", job},
                   dir + "/" + name + ".log");
}

class ReplicatedTarget : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const bool ci = std::getenv("CI") && std::string(std::getenv("CI")) == "true";
    for (const std::string& bin : {Bin("nbd-datapathd"), Bin("nbdctl"), Bin("nbd-csi-controller")})
      if (access(bin.c_str(), X_OK) != 0) skip_ = "needs " + bin;
    if (test::EtcdBinary().empty()) skip_ = "needs etcd (scripts/deps.sh installs etcd-server)";
    if (!Have("nbdcopy")) skip_ = "needs nbdcopy";
    if (!skip_.empty() && ci) {
      fprintf(stderr, "CI=true and %s\n", skip_.c_str());
      std::exit(1);
    }
  }

  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_TRUE(certs_.ok) << ReadFile(certs_.log());
    std::string why;
    ASSERT_TRUE(etcd_.Start(&why)) << why;
    auto client = etcd::EtcdClient::Create({.endpoints = {etcd_.endpoint()}, .call_timeout = 3s});
    ASSERT_TRUE(client.ok()) << client.status().message();
    auto keys = cluster::KeyLayout::Make("/nbd-csi/");
    ASSERT_TRUE(keys.ok());
    store_ = std::make_unique<cluster::EtcdClusterStore>(std::move(*client), *keys);
    for (Node* n : {&a_, &b_}) {
      n->Start(etcd_.endpoint());
      n->CreateVolume();
      auto where = store_->NodeEndpoint(n->id());
      ASSERT_TRUE(where.ok()) << where.status().message();
      EXPECT_EQ(*where, n->nbd_endpoint());
    }
    cluster::VolumeState v;
    v.name = kVolume;
    v.size_bytes = kSize;
    v.replicas = v.in_sync = {"node-a", "node-b"};
    ASSERT_TRUE(store_->CreateVolume(v).ok());
  }

  // node-b restarted behind `proxy` (started here, on node-b's address): the NBD endpoint it
  // registers, which other nodes dial, is the proxy's.
  void RestartBBehind(test::TcpProxy& proxy) {
    ASSERT_TRUE(proxy.Start(b_.ip(), 0, b_.ip(), b_.port()));
    b_.Kill9();
    b_.Start(etcd_.endpoint(), {"--cluster-nbd-endpoint",
                                fmt::format("tcp://{}:{}", b_.ip(), proxy.port())});
  }

  TargetOptions Options(const std::string& node, cluster::LeaseId lease) {
    TargetOptions o;
    o.volume = kVolume;
    o.node = node;
    o.lease = lease;
    o.tls = {certs_("client.crt"), certs_("client.key"), certs_("ca.crt"), ""};
    o.connections = 2;
    o.request_timeout = 5s;
    o.membership_retry = 2s;
    return o;
  }

  static int Do(ReplicaSet& set, BackendRequest r) {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<int> res;
    set.Submit(r, [&](int v) {
      std::lock_guard<std::mutex> lock(mu);
      res = v;
      cv.notify_all();
    });
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, 30s, [&] { return res.has_value(); })) return -ETIMEDOUT;
    return *res;
  }

  // `n` random 4 KiB writes at random blocks, `depth` in flight; returns how many failed.
  int WriteRandom(ReplicaSet& set, Model& m, int n, int depth, std::mt19937_64& rng,
                  const std::function<void(int)>& after_each = {}) {
    std::mutex mu;
    std::condition_variable cv;
    int in_flight = 0, failed = 0, first_error = 0;
    std::set<uint64_t> batch;  // blocks of the current batch: never two writes to one in flight
    for (int i = 0; i < n; ++i) {
      if (i % depth == 0) batch.clear();
      uint64_t block;
      do block = rng() % (kSize / kBlock);
      while (!batch.insert(block).second);
      auto buf = std::make_shared<std::vector<uint8_t>>(kBlock);
      for (auto& byte : *buf) byte = static_cast<uint8_t>(rng());
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return in_flight < depth; });
        ++in_flight;
      }
      BackendRequest r{BackendRequest::Op::kWrite, block * kBlock, kBlock, buf->data(),
                       (i % 16) == 0};
      set.Submit(r, [&, buf, block](int res) {
        std::lock_guard<std::mutex> lock(mu);
        if (res == 0) {
          std::lock_guard<std::mutex> ml(m.mu);
          m.blocks[block] = *buf;
        } else {
          ++failed;
          if (!first_error) first_error = res;
        }
        --in_flight;
        cv.notify_all();
      });
      if (after_each) after_each(i);
      // A batch ends when all its writes are done, so the model's last write is the disk's.
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return in_flight == 0 || i % depth != depth - 1; });
    }
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return in_flight == 0; });
    if (failed) ADD_FAILURE() << failed << " writes failed, first with " << first_error;
    return failed;
  }

  // Every block of the model read back through `set`.
  void CheckThrough(ReplicaSet& set, Model& m) {
    std::vector<uint8_t> got(kBlock);
    for (auto& [block, want] : m.blocks) {
      ASSERT_EQ(Do(set, {BackendRequest::Op::kRead, block * kBlock, kBlock, got.data()}), 0);
      ASSERT_EQ(got, want) << "block " << block;
    }
  }

  static inline std::string skip_;
  test::TestCerts certs_{"rt-certs", "node-a node-b node-t node-u"};
  test::EtcdProcess etcd_{nullptr, "127.0.0.22"};
  std::unique_ptr<cluster::EtcdClusterStore> store_;
  Node a_{"node-a", "127.0.0.11", certs_};
  Node b_{"node-b", "127.0.0.12", certs_};
};

TEST_F(ReplicatedTarget, AKilledReplicaIsDroppedAndNoAcknowledgedWriteIsLost) {
  auto lease = store_->GrantLease(30);
  ASSERT_TRUE(lease.ok());
  auto t = Target::Open(*store_, Options("node-t", *lease));
  ASSERT_TRUE(t.ok()) << t.status().message();
  EXPECT_EQ((*t)->epoch(), 1u);
  ReplicaSet& set = *(*t)->set();
  Model m;
  std::mt19937_64 rng(42);
  ASSERT_EQ(WriteRandom(set, m, 400, 16, rng), 0);
  ASSERT_EQ(Do(set, {BackendRequest::Op::kFlush}), 0);
  EXPECT_FALSE(set.health().degraded);

  // SIGKILL node-b in the middle of the next 1,200 writes.
  ASSERT_EQ(WriteRandom(set, m, 1200, 16, rng,
                        [&](int i) {
                          if (i == 300) b_.Kill9();
                        }),
            0);
  ASSERT_EQ(Do(set, {BackendRequest::Op::kFlush}), 0);
  auto h = set.health();
  EXPECT_TRUE(h.degraded);
  EXPECT_FALSE(h.stopped) << h.stop_reason;
  EXPECT_EQ(h.in_sync, std::vector<std::string>{"node-a"});
  auto v = store_->GetVolume(kVolume);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->in_sync, std::vector<std::string>{"node-a"});
  EXPECT_EQ(v->replicas, (std::vector<std::string>{"node-a", "node-b"}));
  EXPECT_EQ(v->target, "node-t");
  printf("FIGURE %zu blocks written by 1,600 writes, %llu acked while node-b was out\n",
         m.blocks.size(), static_cast<unsigned long long>(h.acked_degraded));
  CheckThrough(set, m);
  ASSERT_TRUE((*t)->Close().ok());
  EXPECT_TRUE(store_->GetVolume(kVolume)->target.empty());

  // Independently, through libnbd: node-a holds every acknowledged write.
  std::string disk = a_.Nbdcopy(1);
  ASSERT_EQ(disk.size(), kSize);
  for (auto& [block, want] : m.blocks)
    ASSERT_EQ(0, std::memcmp(disk.data() + block * kBlock, want.data(), kBlock))
        << "block " << block;
}

TEST_F(ReplicatedTarget, AStaleTargetIsFencedAndCannotDropReplicas) {
  // The first target's claim hangs on a lease nobody renews: revoking it is what etcd does when
  // its TTL runs out while the target is partitioned from etcd (and still reaches the replicas).
  auto old_lease = store_->GrantLease(30);
  ASSERT_TRUE(old_lease.ok());
  auto t1 = Target::Open(*store_, Options("node-t", *old_lease));
  ASSERT_TRUE(t1.ok()) << t1.status().message();
  ReplicaSet& s1 = *(*t1)->set();
  std::vector<uint8_t> first(kBlock, 0x11);
  ASSERT_EQ(Do(s1, {BackendRequest::Op::kWrite, 0, kBlock, first.data()}), 0);

  // The other node's claim fails while the first one's lease lives...
  auto new_lease = store_->GrantLease(30);
  ASSERT_TRUE(new_lease.ok());
  EXPECT_EQ(Target::Open(*store_, Options("node-u", *new_lease)).status().code(), EBUSY);
  // ...and succeeds once it is gone, at the next epoch, fencing the replicas.
  ASSERT_TRUE(store_->RevokeLease(*old_lease).ok());
  auto t2 = Target::Open(*store_, Options("node-u", *new_lease));
  ASSERT_TRUE(t2.ok()) << t2.status().message();
  EXPECT_EQ((*t2)->epoch(), (*t1)->epoch() + 1);
  ReplicaSet& s2 = *(*t2)->set();
  std::vector<uint8_t> second(kBlock, 0x22);
  ASSERT_EQ(Do(s2, {BackendRequest::Op::kWrite, kBlock, kBlock, second.data()}), 0);

  // The old target tries to write over both blocks: refused, and it stops for good.
  std::vector<uint8_t> stale(kBlock, 0xee);
  EXPECT_EQ(Do(s1, {BackendRequest::Op::kWrite, 0, kBlock, stale.data()}), -EIO);
  EXPECT_EQ(Do(s1, {BackendRequest::Op::kWrite, kBlock, kBlock, stale.data()}), -EIO);
  auto h1 = s1.health();
  EXPECT_TRUE(h1.stopped);
  EXPECT_NE(h1.stop_reason.find("fenced"), std::string::npos) << h1.stop_reason;
  auto v = store_->GetVolume(kVolume);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->in_sync, (std::vector<std::string>{"node-a", "node-b"}));
  EXPECT_EQ(v->target, "node-u");

  // The new target sees its own data and the old target's acknowledged write, nothing else,
  // on both replicas (reads go to one; a second set reads the other after node-a is closed).
  std::vector<uint8_t> got(kBlock);
  ASSERT_EQ(Do(s2, {BackendRequest::Op::kRead, 0, kBlock, got.data()}), 0);
  EXPECT_EQ(got, first);
  ASSERT_EQ(Do(s2, {BackendRequest::Op::kRead, kBlock, kBlock, got.data()}), 0);
  EXPECT_EQ(got, second);
  const uint64_t epoch2 = (*t2)->epoch();
  (*t1)->Close();  // its release is refused (ESTALE): the claim is node-u's
  EXPECT_EQ(store_->GetVolume(kVolume)->target, "node-u");
  ASSERT_TRUE((*t2)->Close().ok());
  for (Node* n : {&a_, &b_}) {
    std::string disk = n->Nbdcopy(epoch2);
    ASSERT_EQ(disk.size(), kSize) << n->id();
    EXPECT_EQ(0, std::memcmp(disk.data(), first.data(), kBlock)) << n->id();
    EXPECT_EQ(0, std::memcmp(disk.data() + kBlock, second.data(), kBlock)) << n->id();
  }
}

TEST_F(ReplicatedTarget, AnUnreachableReplicaIsDroppedBeforeServing) {
  b_.Kill9();
  auto lease = store_->GrantLease(30);
  ASSERT_TRUE(lease.ok());
  auto opts = Options("node-t", *lease);
  opts.handshake_timeout = 2s;
  auto t = Target::Open(*store_, opts);
  ASSERT_TRUE(t.ok()) << t.status().message();
  ASSERT_EQ((*t)->unreachable().size(), 1u);
  EXPECT_NE((*t)->unreachable()[0].find("node-b"), std::string::npos);
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync, std::vector<std::string>{"node-a"});
  std::vector<uint8_t> w(kBlock, 0x33), got(kBlock);
  ReplicaSet& set = *(*t)->set();
  ASSERT_EQ(Do(set, {BackendRequest::Op::kWrite, 0, kBlock, w.data()}), 0);
  ASSERT_EQ(Do(set, {BackendRequest::Op::kRead, 0, kBlock, got.data()}), 0);
  EXPECT_EQ(got, w);
  // node-b is a member out of sync: the target reports itself degraded, and a resync can bring
  // node-b back once it is reachable.
  auto h = set.health();
  ASSERT_EQ(h.members.size(), 2u);
  EXPECT_EQ(h.members[1].node, "node-b");
  EXPECT_EQ(h.members[1].state, MemberState::kOut);
  EXPECT_TRUE(h.degraded);

  // With node-a gone too, nobody in sync answers: Open fails and leaves no claim behind.
  ASSERT_TRUE((*t)->Close().ok());
  a_.Kill9();
  auto none = Target::Open(*store_, opts);
  EXPECT_EQ(none.status().code(), EHOSTUNREACH) << none.status().message();
  EXPECT_TRUE(store_->GetVolume(kVolume)->target.empty());
}

// Garbage at the new entry points gets a clear error and changes nothing: the Targets API (through
// nbdctl, on a cluster node and on a datapath without a cluster) and the cluster flags.
TEST_F(ReplicatedTarget, GarbageIsRefusedWithAClearError) {
  struct Case {
    std::string args, expect;
    int rc;
  };
  const std::vector<Case> api = {
      {"target open ../x", "invalid argument", 1},
      {"target open nope", "not found", 1},
      {fmt::format("target inspect {}", kVolume), "no target of volume rv is open on node node-a", 1},
      {"target close nope", "no target of volume nope is open", 1},
      {fmt::format("target resync {} NODE!", kVolume), "invalid argument", 1},
      {fmt::format("target resync {} node-b", kVolume), "no target of volume rv is open", 1},
      {fmt::format("target resync {} node-b --rate 0", kVolume), "--rate: must be greater than 0",
       2},
      {"target open", "VOLUME is required", 2},
  };
  for (const auto& c : api) {
    std::string out;
    EXPECT_EQ(a_.TryNbdctl(c.args, &out), c.rc << 8) << c.args << ": " << out;
    EXPECT_NE(out.find(c.expect), std::string::npos) << c.args << ": " << out;
  }
  EXPECT_TRUE(store_->GetVolume(kVolume)->target.empty()) << "a refusal claimed the volume";
  EXPECT_EQ(store_->GetVolume(kVolume)->epoch, 0u);

  // Flags: each refused at start (exit 2) naming the flag.
  test::TempDir dir("rt-flags");
  const std::string pool = dir.path() + "/pool";
  fs::create_directories(pool);
  const std::string base = Bin("nbd-datapathd") + " --pool " + pool + " --api unix://" +
                           dir.path() + "/api.sock --nbd-listen unix://" + dir.path() + "/nbd.sock";
  const std::vector<std::pair<std::string, std::string>> flags = {
      {"--cluster-etcd 127.0.0.1:1", "--cluster-etcd needs --node-id"},
      {"--cluster-etcd-insecure", "--cluster-etcd-* flags need --cluster-etcd"},
      {"--node-id n --cluster-etcd 127.0.0.1:1", "give --cluster-etcd-tls-cert"},
      {"--node-id n --cluster-etcd 127.0.0.1:1 --cluster-etcd-tls-cert x",
       "missing --cluster-etcd-tls-key, --cluster-etcd-tls-ca"},
      {"--node-id n --cluster-etcd 127.0.0.1:1 --cluster-etcd-insecure --cluster-nbd-endpoint "
       "unix:///x",
       "--cluster-nbd-endpoint unix:///x: must be tcp://HOST:PORT"},
      {"--node-id n --cluster-etcd 127.0.0.1:1 --cluster-etcd-insecure --replica-resync-rate 0",
       "--replica-resync-rate: must be greater than 0"},
      // CLI11's own checks exit 2 as well, not its 105 or 109.
      {"--node-id n --cluster-etcd 127.0.0.1:1 --cluster-etcd-insecure --cluster-lease-ttl 1",
       "--cluster-lease-ttl"},
      {"--cluster-prefix", "--cluster-prefix"},
      {"stray-argument", "stray-argument"},
  };
  for (const auto& [args, expect] : flags) {
    const std::string log = dir.path() + "/flags.log";
    const int rc = std::system((base + " " + args + " >" + log + " 2>&1").c_str());
    EXPECT_EQ(rc, 2 << 8) << args << ": " << ReadFile(log);
    EXPECT_NE(ReadFile(log).find(expect), std::string::npos) << args << ": " << ReadFile(log);
  }
  // Out-of-range numbers are refused by the flag parser (CLI11), with the same exit status.
  {
    const std::string log = dir.path() + "/flags.log";
    const int rc = std::system(
        (base + " --node-id n --cluster-etcd 127.0.0.1:1 --cluster-etcd-insecure "
                "--replica-timeout 0 >" + log + " 2>&1")
            .c_str());
    EXPECT_EQ(rc, 2 << 8) << ReadFile(log);
    EXPECT_NE(ReadFile(log).find("--replica-timeout: Value 0 not in range"), std::string::npos)
        << ReadFile(log);
  }
  // The controller's cluster flags: the same rules, the same status.
  const std::vector<std::pair<std::string, std::string>> controller_flags = {
      {"--cluster-etcd-insecure", "--cluster-etcd-* flags need --cluster-etcd"},
      {"--cluster-etcd 127.0.0.1:1", "give --cluster-etcd-tls-cert"},
      {"--cluster-etcd 127.0.0.1:1 --cluster-etcd-insecure --cluster-prefix nbd",
       "--cluster-prefix"},
      {"--cluster-etcd 127.0.0.1:1 --cluster-etcd-insecure --cluster-etcd-timeout 5",
       "--cluster-etcd-timeout"},
  };
  for (const auto& [args, expect] : controller_flags) {
    const std::string log = dir.path() + "/controller-flags.log";
    const std::string cmd = Bin("nbd-csi-controller") + " --csi-endpoint unix://" + dir.path() +
                            "/csi.sock --registry-listen 127.0.0.1:0 --insecure " + args + " >" +
                            log + " 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 2 << 8) << args << ": " << ReadFile(log);
    EXPECT_NE(ReadFile(log).find(expect), std::string::npos) << args << ": " << ReadFile(log);
  }

  // A datapath without a cluster says so.
  test::Proc plain;
  ASSERT_TRUE(plain.Start({Bin("nbd-datapathd"), "--pool", pool, "--api",
                           "unix://" + dir.path() + "/api.sock", "--nbd-listen",
                           "unix://" + dir.path() + "/nbd.sock"},
                          dir.path() + "/plain.log"));
  auto api_ep = ParseEndpoint("unix://" + dir.path() + "/api.sock");
  ASSERT_TRUE(test::WaitUntil([&] { return test::CanConnect(*api_ep); }, 20s));
  const std::string out_file = dir.path() + "/plain.out";
  const int rc = std::system((Bin("nbdctl") + " --api unix://" + dir.path() +
                              "/api.sock target list >" + out_file + " 2>&1")
                                 .c_str());
  EXPECT_EQ(rc, 1 << 8);
  EXPECT_NE(ReadFile(out_file).find("runs without a cluster (--cluster-etcd)"), std::string::npos)
      << ReadFile(out_file);
}

// A replica that left under an earlier target: the new target knows nothing of what it missed
// then, so its resync copies the whole volume (skipping holes), not just this epoch's writes.
TEST_F(ReplicatedTarget, AReplicaOutSinceAnEarlierTargetGetsAFullCopy) {
  test::TempDir state("rt-state");
  auto l1 = store_->GrantLease(30);
  ASSERT_TRUE(l1.ok());
  auto o1 = Options("node-t", *l1);
  o1.state_dir = state.path();
  auto t1 = Target::Open(*store_, o1);
  ASSERT_TRUE(t1.ok()) << t1.status().message();
  b_.Kill9();
  Model m;
  std::mt19937_64 rng(11);
  ASSERT_EQ(WriteRandom(*(*t1)->set(), m, 300, 8, rng), 0);  // node-b misses these (epoch 1)
  ASSERT_TRUE((*t1)->Close().ok());

  b_.Start(etcd_.endpoint());
  auto l2 = store_->GrantLease(30);
  auto o2 = Options("node-u", *l2);
  o2.state_dir = state.path();
  auto t2 = Target::Open(*store_, o2);
  ASSERT_TRUE(t2.ok()) << t2.status().message();
  EXPECT_TRUE((*t2)->set()->health().degraded);
  ASSERT_EQ(WriteRandom(*(*t2)->set(), m, 50, 8, rng), 0);  // and these (epoch 2)
  auto r = (*t2)->ResyncReplica("node-b");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->full);
  EXPECT_GT(r->skipped_bytes + r->zeroed_bytes, 0u) << "holes are not copied as data";
  EXPECT_FALSE((*t2)->set()->health().degraded);
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync, (std::vector<std::string>{"node-a", "node-b"}));
  const uint64_t epoch = (*t2)->epoch();
  ASSERT_TRUE((*t2)->Close().ok());
  const std::string disk_a = a_.Nbdcopy(epoch), disk_b = b_.Nbdcopy(epoch);
  ASSERT_EQ(disk_a.size(), kSize);
  EXPECT_TRUE(disk_a == disk_b) << "node-b misses what it missed under the earlier target";
  for (auto& [block, want] : m.blocks)
    ASSERT_EQ(0, std::memcmp(disk_b.data() + block * kBlock, want.data(), kBlock)) << block;
}

TEST_F(ReplicatedTarget, TheDaemonsTargetKeepsFioRunningWhenAReplicaDies) {
  if (!HaveFioNbd()) GTEST_SKIP() << "needs fio with its nbd engine";
  Node t{"node-t", "127.0.0.13", certs_};
  const int metrics_port = test::FreeLoopbackPort();
  t.Start(etcd_.endpoint(), {"--metrics-listen", fmt::format("127.0.0.1:{}", metrics_port)});
  std::string out;
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {} -o json", kVolume), &out), 0);
  auto opened = nlohmann::json::parse(out);
  EXPECT_EQ(opened["epoch"], 1);
  EXPECT_EQ(opened["export_name"], "rv@target");
  EXPECT_EQ(opened["health"], "ok");

  test::Proc fio;
  const std::string fio_json = t.dir() + "/fio.json";
  ASSERT_TRUE(StartVerifyWriter(fio, t.dir(), "fio", t.TargetUri(), {16, "", "48M", 256, 1500}));
  // 12,288 writes at 1,500/s: the kill lands in the middle of the write phase.
  std::this_thread::sleep_for(3s);
  ASSERT_TRUE(fio.Alive()) << "fio ended before the kill: " << ReadFile(t.dir() + "/fio.log");
  b_.Kill9();
  ASSERT_TRUE(test::WaitUntil([&] { return !fio.Alive(); }, 120s)) << "fio did not finish";
  auto report = nlohmann::json::parse(ReadFile(fio_json), nullptr, false);
  ASSERT_FALSE(report.is_discarded()) << ReadFile(t.dir() + "/fio.log");
  EXPECT_EQ(report["jobs"][0]["error"], 0) << ReadFile(t.dir() + "/fio.log");
  EXPECT_GE(report["jobs"][0]["write"]["io_bytes"].get<uint64_t>(), 48ull << 20);
  EXPECT_GE(report["jobs"][0]["read"]["io_bytes"].get<uint64_t>(), 48ull << 20)
      << "fio verified less than it wrote";

  ASSERT_EQ(t.Nbdctl(fmt::format("target inspect {} -o json", kVolume), &out), 0);
  auto state = nlohmann::json::parse(out);
  EXPECT_EQ(state["health"], "degraded");
  EXPECT_EQ(state["in_sync"], nlohmann::json::array({"node-a"}));
  EXPECT_GT(state["acked_degraded"].get<uint64_t>(), 0u);
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync, std::vector<std::string>{"node-a"});
  // What Prometheus sees.
  auto [code, metrics] = test::HttpGet(metrics_port, "/metrics");
  EXPECT_EQ(code, 200);
  EXPECT_NE(metrics.find("nbdcsi_target_degraded{volume=\"rv\"} 1"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("nbdcsi_target_replica_in_sync{volume=\"rv\",node=\"node-b\"} 0"),
            std::string::npos)
      << metrics;

  // What the target serves now is node-a's copy, byte for byte.
  const std::string served = t.dir() + "/served.raw";
  ASSERT_TRUE(t.CopyTarget(served));
  ASSERT_EQ(t.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  EXPECT_TRUE(store_->GetVolume(kVolume)->target.empty());
  EXPECT_EQ(a_.Nbdcopy(1), ReadFile(served));
}

// One replica's disk fills up under fio: node-b's pool moved onto a 24 MiB tmpfs (the volume is
// thin: 64 MiB provisioned), so its writes fail with ENOSPC part-way through 48 MiB of random
// writes. The target drops node-b as it would a dead replica: fio sees no error and verifies
// everything, the volume is degraded, and what the target serves is node-a's copy.
TEST_F(ReplicatedTarget, AReplicaWhoseDiskFillsUpIsDroppedAndFioSeesNoError) {
  if (!HaveFioNbd()) GTEST_SKIP() << "needs fio with its nbd engine";
  const std::string pool = b_.dir() + "/pool", saved = b_.dir() + "/pool-saved";
  b_.Kill9();
  fs::rename(pool, saved);
  fs::create_directories(pool);
  ASSERT_EQ(std::system(fmt::format("mount -t tmpfs -o size=24m nbdcsi-full {}", pool).c_str()), 0)
      << "mounting a tmpfs needs root";
  struct Unmount {
    Node& b;
    std::string pool;
    ~Unmount() {
      b.Kill9();
      std::system(fmt::format("umount {}", pool).c_str());
    }
  } unmount{b_, pool};
  ASSERT_EQ(std::system(fmt::format("cp -a --sparse=always {}/. {}/", saved, pool).c_str()), 0);
  b_.Start(etcd_.endpoint(), {"--free-reserve", "0"});

  Node t{"node-t", "127.0.0.13", certs_};
  t.Start(etcd_.endpoint());
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  const std::string job = t.dir() + "/job.fio";
  std::ofstream(job) << fmt::format(
      "[global]\nioengine=nbd\nuri={}\nbs=4k\niodepth=16\nsize=48M\nverify=crc32c\n"
      "verify_fatal=1\nverify_backlog=256\n[w]\nrw=randwrite\n",
      t.TargetUri());
  const std::string fio_json = t.dir() + "/fio.json";
  const int rc = std::system(fmt::format("timeout 120 fio --output-format=json --output={} {} "
                                         ">{}/fio.log 2>&1",
                                         fio_json, job, t.dir())
                                 .c_str());
  EXPECT_EQ(rc, 0) << ReadFile(t.dir() + "/fio.log") << ReadFile(t.log());
  auto report = nlohmann::json::parse(ReadFile(fio_json), nullptr, false);
  ASSERT_FALSE(report.is_discarded()) << ReadFile(t.dir() + "/fio.log");
  EXPECT_EQ(report["jobs"][0]["error"], 0);
  EXPECT_GE(report["jobs"][0]["write"]["io_bytes"].get<uint64_t>(), 48ull << 20);
  EXPECT_GE(report["jobs"][0]["read"]["io_bytes"].get<uint64_t>(), 48ull << 20)
      << "fio verified less than it wrote";

  std::string out;
  ASSERT_EQ(t.Nbdctl(fmt::format("target inspect {} -o json", kVolume), &out), 0);
  auto state = nlohmann::json::parse(out);
  EXPECT_EQ(state["health"], "degraded") << out;
  EXPECT_EQ(state["in_sync"], nlohmann::json::array({"node-a"})) << out;
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync, std::vector<std::string>{"node-a"});
  EXPECT_NE(ReadFile(t.log()).find("No space left on device"), std::string::npos)
      << "node-b was dropped for another reason: " << ReadFile(t.log());
  const std::string served = t.dir() + "/served.raw";
  ASSERT_TRUE(t.CopyTarget(served));
  ASSERT_EQ(t.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  EXPECT_EQ(a_.Nbdcopy(1), ReadFile(served));
  t.Kill9();
}

// nbd-csi-controller with --cluster-etcd over the fixture's nodes and a third one, node-t, each
// heartbeating to it (API over TCP, plaintext on loopback) as well as registered in etcd; the
// fixture's own "rv" goes, the controller makes it with replicas=2.
class CsiCluster {
 public:
  CsiCluster() : dir_("rt-controller") {}

  void Start(Node& a, Node& b, const test::TestCerts& certs, const std::string& etcd,
             cluster::ClusterStore& store) {
    for (Node* n : {&a, &b}) ASSERT_EQ(n->Nbdctl(fmt::format("volume delete {}", kVolume)), 0);
    ASSERT_TRUE(store.DeleteVolume(kVolume).ok());
    const int registry_port = registry_port_ = test::FreeLoopbackPort();
    const std::string csi_sock = dir_ / "csi.sock";
    ASSERT_TRUE(controller_.Start(
        {Bin("nbd-csi-controller"), "--csi-endpoint", "unix://" + csi_sock, "--registry-listen",
         fmt::format("127.0.0.1:{}", registry_port), "--insecure", "--heartbeat-interval", "300",
         "--cluster-etcd", etcd, "--cluster-etcd-insecure", "--log-level", "debug"},
        log()));
    ASSERT_TRUE(test::WaitUntil([&] { return fs::exists(csi_sock); }, 10s)) << ReadFile(log());
    t_ = std::make_unique<Node>("node-t", "127.0.0.13", certs);
    auto with_controller = [&](const Node& n) {
      return std::vector<std::string>{"--controller", fmt::format("127.0.0.1:{}", registry_port),
                                      "--advertise",
                                      fmt::format("{}:{}", n.ip(), test::FreeLoopbackPort(
                                                                       n.ip().c_str())),
                                      "--insecure", "--heartbeat-interval", "300"};
    };
    for (Node* n : {&a, &b}) {
      n->Kill9();
      n->Start(etcd, with_controller(*n));
    }
    t_->Start(etcd, with_controller(*t_));
    stub_ = ::csi::v1::Controller::NewStub(
        grpc::CreateChannel("unix://" + csi_sock, grpc::InsecureChannelCredentials()));
    by_id_ = {{"node-a", &a}, {"node-b", &b}, {"node-t", t_.get()}};
  }

  // One CSI call with a 30 s deadline.
  template <typename M, typename Req, typename Resp>
  grpc::Status Call(M method, const Req& req, Resp* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 30s);
    return ((*stub_).*method)(&ctx, req, resp);
  }

  // CreateVolume of "rv" with replicas=2, retried while UNAVAILABLE (until all three nodes have
  // heartbeated).
  grpc::Status CreateReplicated(::csi::v1::CreateVolumeResponse* created) {
    auto req = test::VolumeRequest(kVolume, static_cast<int64_t>(kSize));
    (*req.mutable_parameters())["replicas"] = "2";
    grpc::Status st;
    test::WaitUntil(
        [&] {
          created->Clear();
          st = Call(&::csi::v1::Controller::Stub::CreateVolume, req, created);
          return st.error_code() != grpc::StatusCode::UNAVAILABLE;
        },
        20s, 200ms);
    return st;
  }

  // Start, then "rv" created through CSI (CreateReplicated) and its target opened on the node
  // that holds no copy (Stager): the volume's state at creation in *state, that node in *stager.
  void StartAndServe(Node& a, Node& b, const test::TestCerts& certs, const std::string& etcd,
                     cluster::ClusterStore& store, cluster::VolumeState* state, Node** stager) {
    ASSERT_NO_FATAL_FAILURE(Start(a, b, certs, etcd, store));
    ::csi::v1::CreateVolumeResponse created;
    grpc::Status st = CreateReplicated(&created);
    ASSERT_TRUE(st.ok()) << st.error_message() << ReadFile(log());
    auto got = store.GetVolume(kVolume);
    ASSERT_TRUE(got.ok());
    *state = *got;
    *stager = &Stager(state->replicas);
    ASSERT_EQ((*stager)->Nbdctl(fmt::format("target open {}", kVolume)), 0);
  }

  // The node that holds no copy of the volume (`replicas`): where the tests stage it.
  Node& Stager(const std::vector<std::string>& replicas) {
    for (auto& [id, n] : by_id_) {
      if (std::find(replicas.begin(), replicas.end(), id) == replicas.end()) return *n;
    }
    ADD_FAILURE() << "every node holds a copy";
    return *t_;
  }
  Node& ById(const std::string& id) { return *by_id_.at(id); }
  Node& t() { return *t_; }
  // Another node heartbeating to the controller (and in etcd), known by ById afterwards.
  void StartNode(Node& n, const std::string& etcd) {
    n.Start(etcd, {"--controller", fmt::format("127.0.0.1:{}", registry_port_), "--advertise",
                   fmt::format("{}:{}", n.ip(), test::FreeLoopbackPort(n.ip().c_str())),
                   "--insecure", "--heartbeat-interval", "300"});
    by_id_[n.id()] = &n;
  }
  // `nbdctl cluster ARGS` against the controller (plaintext, as it runs here) through `n`'s
  // nbdctl; its stdout and stderr in *out.
  int Cluster(Node& n, const std::string& args, std::string* out) {
    return n.TryNbdctl(
        fmt::format("cluster --controller 127.0.0.1:{} --insecure {}", registry_port_, args), out,
        "cluster");
  }
  std::string log() const { return dir_ / "controller.log"; }
  void Stop() {
    t_->Kill9();
    controller_.Stop();
  }

 private:
  test::TempDir dir_;
  test::Proc controller_;
  int registry_port_ = 0;
  std::unique_ptr<Node> t_;
  std::unique_ptr<::csi::v1::Controller::Stub> stub_;
  std::map<std::string, Node*> by_id_;
};

TEST_F(ReplicatedTarget, TheControllerCreatesServesAndDeletesAReplicatedVolumeThroughCsi) {
  CsiCluster csi;
  ASSERT_NO_FATAL_FAILURE(csi.Start(a_, b_, certs_, etcd_.endpoint(), *store_));
  auto call = [&](auto method, const auto& req, auto* resp) { return csi.Call(method, req, resp); };
  auto req = test::VolumeRequest("rv", static_cast<int64_t>(kSize));
  (*req.mutable_parameters())["replicas"] = "2";
  v1::CreateVolumeResponse created;
  grpc::Status st = csi.CreateReplicated(&created);
  ASSERT_TRUE(st.ok()) << st.error_message() << ReadFile(csi.log());
  EXPECT_EQ(created.volume().volume_id(), "r1:rv");
  EXPECT_EQ(created.volume().capacity_bytes(), static_cast<int64_t>(kSize));
  EXPECT_EQ(created.volume().accessible_topology_size(), 0);
  auto state = store_->GetVolume(kVolume);
  ASSERT_TRUE(state.ok()) << state.status().message();
  ASSERT_EQ(state->replicas.size(), 2u);
  EXPECT_EQ(state->in_sync, state->replicas);
  // A retry (the provisioner's, after a lost answer) is the same volume.
  v1::CreateVolumeResponse again;
  ASSERT_TRUE(call(&v1::Controller::Stub::CreateVolume, req, &again).ok());
  EXPECT_EQ(again.volume().volume_id(), "r1:rv");
  EXPECT_EQ(store_->GetVolume(kVolume)->replicas, state->replicas);

  // The node that holds no copy serves it: open its target and write through it.
  Node& s = csi.Stager(state->replicas);
  std::string out;
  ASSERT_EQ(s.Nbdctl(fmt::format("target open {} -o json", kVolume), &out), 0);
  const std::string data = s.dir() + "/data.raw";
  ASSERT_EQ(std::system(fmt::format("head -c {} /dev/urandom > {}", kSize, data).c_str()), 0);
  ASSERT_EQ(std::system(fmt::format("timeout 60 nbdcopy {} '{}'", data, s.TargetUri()).c_str()),
            0);

  v1::ControllerGetVolumeRequest get;
  get.set_volume_id("r1:rv");
  v1::ControllerGetVolumeResponse got;
  ASSERT_TRUE(call(&v1::Controller::Stub::ControllerGetVolume, get, &got).ok());
  EXPECT_FALSE(got.status().volume_condition().abnormal())
      << got.status().volume_condition().message();

  // Deleting a volume a node serves: FAILED_PRECONDITION, and nothing goes.
  v1::DeleteVolumeRequest del;
  del.set_volume_id("r1:rv");
  v1::DeleteVolumeResponse deleted;
  st = call(&v1::Controller::Stub::DeleteVolume, del, &deleted);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_TRUE(store_->GetVolume(kVolume).ok());

  // A replica dies; the next writes drop it, and the controller says the volume is degraded.
  Node& lost = csi.ById(state->replicas[1]);
  Node& kept = csi.ById(state->replicas[0]);
  lost.Kill9();
  ASSERT_EQ(std::system(fmt::format("timeout 60 nbdcopy {} '{}'", data, s.TargetUri()).c_str()),
            0);
  got.Clear();
  ASSERT_TRUE(call(&v1::Controller::Stub::ControllerGetVolume, get, &got).ok());
  EXPECT_TRUE(got.status().volume_condition().abnormal());
  EXPECT_NE(got.status().volume_condition().message().find("1 of 2 replicas in sync"),
            std::string::npos)
      << got.status().volume_condition().message();
  v1::ListVolumesResponse listed;
  ASSERT_TRUE(call(&v1::Controller::Stub::ListVolumes, v1::ListVolumesRequest(), &listed).ok());
  ASSERT_EQ(listed.entries_size(), 1) << listed.ShortDebugString();  // not the copies
  EXPECT_EQ(listed.entries(0).volume().volume_id(), "r1:rv");
  // What was acknowledged is on the surviving copy.
  const uint64_t epoch = store_->GetVolume(kVolume)->epoch;
  EXPECT_TRUE(kept.Nbdcopy(epoch) == ReadFile(data)) << "the surviving copy differs";

  // Unstaged: the delete goes through on the live copy (and the dead node's copy stays until it
  // returns: it heartbeats no more, and its lease runs out).
  ASSERT_EQ(s.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        st = call(&v1::Controller::Stub::DeleteVolume, del, &deleted);
        return st.ok();
      },
      20s, 300ms))
      << st.error_message();
  EXPECT_EQ(store_->GetVolume(kVolume).status().code(), ENOENT);
  EXPECT_NE(kept.TryNbdctl(fmt::format("volume inspect {}", kVolume)), 0)
      << "the surviving copy was not deleted";
  csi.Stop();
}

// A file of `bytes` random bytes at `path`.
void RandomFile(const std::string& path, uint64_t bytes) {
  ASSERT_EQ(std::system(fmt::format("head -c {} /dev/urandom > {}", bytes, path).c_str()), 0);
}

// `from` into `to` with nbdcopy (paths or NBD URIs), within 60 s.
bool Nbdcopy(const std::string& from, const std::string& to) {
  return std::system(fmt::format("timeout 60 nbdcopy '{}' '{}'", from, to).c_str()) == 0;
}

// libnbd (python3-libnbd): one WRITE of 4 KiB at `offset` on a fresh connection to `uri`, the
// client's own bounds check off, so what the server says is what counts. True when it took it.
bool RawWriteAt(const std::string& uri, uint64_t offset) {
  const std::string cmd = fmt::format(
      "timeout 30 /usr/bin/python3 -c 'import nbd, sys\n"
      "h = nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri(sys.argv[1])\n"
      "try:\n  h.pwrite(b\"\\xab\" * 4096, {})\nexcept nbd.Error as e:\n  print(e)\n  sys.exit(3)\n"
      "h.shutdown()' '{}'",
      offset, uri);
  return std::system(cmd.c_str()) == 0;
}

// "rv" created through CSI and served (CsiCluster::StartAndServe) before each test.
class ServedThroughCsi : public ReplicatedTarget {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(ReplicatedTarget::SetUp());
    if (IsSkipped()) return;
    ASSERT_NO_FATAL_FAILURE(
        csi.StartAndServe(a_, b_, certs_, etcd_.endpoint(), *store_, &state, &stager));
  }

  // CreateSnapshot of "r1:rv" named `name`.
  static v1::CreateSnapshotRequest SnapshotOfRv(const std::string& name) {
    v1::CreateSnapshotRequest snap;
    snap.set_name(name);
    snap.set_source_volume_id("r1:rv");
    return snap;
  }
  void MustSnapshot(const v1::CreateSnapshotRequest& snap, v1::CreateSnapshotResponse* made) {
    const grpc::Status st = csi.Call(&v1::Controller::Stub::CreateSnapshot, snap, made);
    ASSERT_TRUE(st.ok()) << st.error_message() << ReadFile(csi.log());
  }
  // The node a snapshot id (s1:NODE:NAME) names: the replica that holds the snapshot.
  static std::string HolderOf(const std::string& snap_id) {
    return snap_id.substr(3, snap_id.rfind(':') - 3);
  }

  CsiCluster csi;
  cluster::VolumeState state;  // at creation
  Node* stager = nullptr;      // the node that serves the target and holds no copy
};

// Online expansion of a served replicated volume: ControllerExpandVolume grows both copies and
// the catalogue entry, the target (open on the node with no copy) learns the size through
// GrowTarget, and a write past the old end, refused before, lands on both copies.
TEST_F(ServedThroughCsi, AServedReplicatedVolumeIsExpandedOnlineThroughCsi) {
  Node& s = *stager;
  grpc::Status st;
  const std::string first = s.dir() + "/first.raw", whole = s.dir() + "/whole.raw";
  ASSERT_NO_FATAL_FAILURE(RandomFile(first, kSize));
  ASSERT_TRUE(Nbdcopy(first, s.TargetUri()));
  EXPECT_TRUE(RawWriteAt(s.TargetUri(), 0)) << "a write inside the volume must land";
  EXPECT_FALSE(RawWriteAt(s.TargetUri(), kSize)) << "a write past the end must be refused";
  ASSERT_NO_FATAL_FAILURE(RandomFile(first, kSize));
  ASSERT_TRUE(Nbdcopy(first, s.TargetUri()));

  v1::ControllerExpandVolumeRequest grow;
  grow.set_volume_id("r1:rv");
  grow.mutable_capacity_range()->set_required_bytes(static_cast<int64_t>(2 * kSize));
  v1::ControllerExpandVolumeResponse grown;
  st = csi.Call(&v1::Controller::Stub::ControllerExpandVolume, grow, &grown);
  ASSERT_TRUE(st.ok()) << st.error_message() << ReadFile(csi.log());
  EXPECT_EQ(grown.capacity_bytes(), static_cast<int64_t>(2 * kSize));
  EXPECT_TRUE(grown.node_expansion_required());
  EXPECT_EQ(store_->GetVolume(kVolume)->size_bytes, 2 * kSize);
  for (const auto& node : state.replicas) {
    std::string out;
    ASSERT_EQ(csi.ById(node).Nbdctl(fmt::format("volume inspect {} -o json", kVolume), &out), 0);
    EXPECT_EQ(nlohmann::json::parse(out).value("size_bytes", uint64_t{0}), 2 * kSize) << node;
  }
  // The target still serves the old size until its node refreshes it.
  EXPECT_FALSE(RawWriteAt(s.TargetUri(), kSize));

  // The node side (what NodeExpandVolume's ResizeAttachment does before the device grows).
  auto targets = datapath::v1::Targets::NewStub(
      grpc::CreateChannel("unix://" + s.api(), grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 30s);
    datapath::v1::GrowTargetRequest r;
    r.set_volume(kVolume);
    datapath::v1::TargetResponse resp;
    st = targets->GrowTarget(&ctx, r, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message() << ReadFile(s.log());
    EXPECT_EQ(resp.target().size_bytes(), 2 * kSize);
  }
  EXPECT_TRUE(RawWriteAt(s.TargetUri(), kSize)) << "a write past the old end must now land";
  // The whole grown volume through the target: the second half past the old end.
  ASSERT_NO_FATAL_FAILURE(RandomFile(whole, 2 * kSize));
  ASSERT_TRUE(Nbdcopy(whole, s.TargetUri()));
  const std::string back = s.dir() + "/back.raw";
  ASSERT_TRUE(s.CopyTarget(back));
  EXPECT_TRUE(ReadFile(back) == ReadFile(whole)) << "the grown volume does not read back";
  auto after = store_->GetVolume(kVolume);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->in_sync, state.replicas) << "a replica was dropped by the growth";
  for (const auto& node : state.replicas) {
    EXPECT_TRUE(csi.ById(node).Nbdcopy(after->epoch) == ReadFile(whole))
        << "the copy on " << node << " differs";
  }
  ASSERT_EQ(s.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  csi.Stop();
}

// The snapshot of a replicated volume through CSI is the image at one write boundary: pattern A
// written through the target (on the node with no copy), the snapshot taken (the controller
// freezes the target over the node's TCP API, snapshots one in-sync replica, thaws), pattern B
// written over all of it; the snapshot restored as a single-node volume reads A byte for byte,
// the live volume B. Then the freeze itself, on the target's node: reads go on while it holds,
// writes wait, and one nobody thaws lifts itself after lift_after_ms.
TEST_F(ServedThroughCsi, ASnapshotThroughCsiIsTheImageAtOneWriteBoundary) {
  Node& s = *stager;
  grpc::Status st;
  const std::string pattern_a = s.dir() + "/a.raw", pattern_b = s.dir() + "/b.raw";
  ASSERT_NO_FATAL_FAILURE(RandomFile(pattern_a, kSize));
  ASSERT_NO_FATAL_FAILURE(RandomFile(pattern_b, kSize));
  ASSERT_TRUE(Nbdcopy(pattern_a, s.TargetUri()));

  const v1::CreateSnapshotRequest snap = SnapshotOfRv("snap-a");
  v1::CreateSnapshotResponse made;
  ASSERT_NO_FATAL_FAILURE(MustSnapshot(snap, &made));
  const std::string snap_id = made.snapshot().snapshot_id();
  EXPECT_EQ(made.snapshot().source_volume_id(), "r1:rv");
  EXPECT_EQ(made.snapshot().size_bytes(), static_cast<int64_t>(kSize));
  const std::string holder = HolderOf(snap_id);
  EXPECT_NE(std::find(state.replicas.begin(), state.replicas.end(), holder),
            state.replicas.end())
      << snap_id << " is not on a replica node";
  EXPECT_NE(ReadFile(csi.log()).find("frozen"), std::string::npos)
      << "the snapshot was not taken through the target's freeze: " << ReadFile(csi.log());
  // The freeze is gone: writes go through at once.
  ASSERT_TRUE(Nbdcopy(pattern_b, s.TargetUri()));
  // A retry with the same name is the same snapshot; a listing by the r1 source finds it.
  v1::CreateSnapshotResponse retried;
  ASSERT_TRUE(csi.Call(&v1::Controller::Stub::CreateSnapshot, snap, &retried).ok());
  EXPECT_EQ(retried.snapshot().snapshot_id(), snap_id);
  v1::ListSnapshotsRequest by_source;
  by_source.set_source_volume_id("r1:rv");
  v1::ListSnapshotsResponse listed;
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        listed.Clear();
        return csi.Call(&v1::Controller::Stub::ListSnapshots, by_source, &listed).ok() &&
               listed.entries_size() == 1 && listed.entries(0).snapshot().ready_to_use();
      },
      60s, 200ms))
      << listed.ShortDebugString();
  EXPECT_EQ(listed.entries(0).snapshot().snapshot_id(), snap_id);

  // Restored (a single-node volume on the snapshot's node): pattern A, byte for byte.
  auto restore = test::VolumeRequest("rv-restored", 0);
  restore.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snap_id);
  v1::CreateVolumeResponse restored;
  st = csi.Call(&v1::Controller::Stub::CreateVolume, restore, &restored);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(restored.volume().volume_id(), "v1:" + holder + ":rv-restored");
  Node& h = csi.ById(holder);
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        std::string out;
        return h.TryNbdctl("volume inspect rv-restored -o json", &out) == 0 &&
               nlohmann::json::parse(out, nullptr, false).value("ready", false);
      },
      60s, 200ms));
  const std::string got_a = s.dir() + "/restored.raw";
  ASSERT_TRUE(Nbdcopy(fmt::format("nbd+unix:///rv-restored?socket={}", h.nbd_sock()), got_a));
  EXPECT_TRUE(ReadFile(got_a) == ReadFile(pattern_a)) << "the restored snapshot is not pattern A";
  const std::string got_b = s.dir() + "/live.raw";
  ASSERT_TRUE(s.CopyTarget(got_b));
  EXPECT_TRUE(ReadFile(got_b) == ReadFile(pattern_b)) << "the live volume is not pattern B";

  // The freeze on the target's node (its unix API, as nbdctl would call it).
  auto freeze = datapath::v1::TargetFreeze::NewStub(
      grpc::CreateChannel("unix://" + s.api(), grpc::InsecureChannelCredentials()));
  auto freeze_for = [&](uint32_t ms, datapath::v1::FreezeTargetResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 30s);
    datapath::v1::FreezeTargetRequest r;
    r.set_volume(kVolume);
    r.set_lift_after_ms(ms);
    return freeze->FreezeTarget(&ctx, r, resp);
  };
  auto thaw = [&](uint64_t id) {
    grpc::ClientContext ctx;
    datapath::v1::ThawTargetRequest r;
    r.set_volume(kVolume);
    r.set_freeze_id(id);
    datapath::v1::ThawTargetResponse resp;
    EXPECT_TRUE(freeze->ThawTarget(&ctx, r, &resp).ok());
    return resp.thawed();
  };
  datapath::v1::FreezeTargetResponse f;
  EXPECT_EQ(freeze_for(0, &f).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(freeze_for(60001, &f).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Reads go on while it holds: a whole read ends with the freeze still in force.
  ASSERT_TRUE(freeze_for(60000, &f).ok());
  std::vector<std::string> in_sync(f.in_sync().begin(), f.in_sync().end());
  EXPECT_EQ(in_sync, state.replicas);
  ASSERT_TRUE(s.CopyTarget(s.dir() + "/frozen-read.raw"));
  EXPECT_TRUE(thaw(f.freeze_id())) << "the freeze did not hold through the read";
  EXPECT_FALSE(thaw(f.freeze_id())) << "a second thaw is a no-op";
  // One nobody thaws: a write waits until it lifts itself, then lands.
  const auto asked = std::chrono::steady_clock::now();
  ASSERT_TRUE(freeze_for(1500, &f).ok());
  ASSERT_TRUE(Nbdcopy(pattern_a, s.TargetUri()));
  EXPECT_GE(std::chrono::steady_clock::now() - asked, 1500ms) << "the write did not wait";
  EXPECT_FALSE(thaw(f.freeze_id())) << "it had lifted itself";
  ASSERT_TRUE(s.CopyTarget(got_b));
  EXPECT_TRUE(ReadFile(got_b) == ReadFile(pattern_a)) << "the write after the freeze is lost";

  v1::DeleteSnapshotRequest del;
  del.set_snapshot_id(snap_id);
  v1::DeleteSnapshotResponse deleted;
  EXPECT_TRUE(csi.Call(&v1::Controller::Stub::DeleteSnapshot, del, &deleted).ok());
  ASSERT_EQ(s.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  csi.Stop();
}

// A snapshot of a replicated volume restored into another replicated volume through CSI: the
// first copy is restored on the snapshot's node, the other starts blank and out of sync; the
// first target copies the data to it, and then both copies are the snapshot's image.
TEST_F(ServedThroughCsi, ASnapshotRestoredIntoAReplicatedVolumeReachesEveryCopy) {
  Node& s = *stager;
  grpc::Status st;
  // Half the volume written, half left a hole: the copy to the blank replica skips holes.
  const std::string image = s.dir() + "/image.raw";
  ASSERT_NO_FATAL_FAILURE(RandomFile(image, kSize / 2));
  ASSERT_EQ(truncate(image.c_str(), static_cast<off_t>(kSize)), 0);
  ASSERT_TRUE(Nbdcopy(image, s.TargetUri()));
  const v1::CreateSnapshotRequest snap = SnapshotOfRv("snap-r");
  v1::CreateSnapshotResponse made;
  ASSERT_NO_FATAL_FAILURE(MustSnapshot(snap, &made));
  const std::string snap_id = made.snapshot().snapshot_id();
  const std::string holder = HolderOf(snap_id);
  ASSERT_EQ(s.Nbdctl(fmt::format("target close {}", kVolume)), 0);

  auto restore = test::VolumeRequest("rv2", 0);
  (*restore.mutable_parameters())["replicas"] = "2";
  restore.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snap_id);
  v1::CreateVolumeResponse restored;
  // UNAVAILABLE while the snapshot's own copy runs (a pool without reflink): retried, as the
  // provisioner does.
  test::WaitUntil(
      [&] {
        restored.Clear();
        st = csi.Call(&v1::Controller::Stub::CreateVolume, restore, &restored);
        return st.error_code() != grpc::StatusCode::UNAVAILABLE;
      },
      60s, 300ms);
  ASSERT_TRUE(st.ok()) << st.error_message() << ReadFile(csi.log());
  EXPECT_EQ(restored.volume().volume_id(), "r1:rv2");
  EXPECT_EQ(restored.volume().capacity_bytes(), static_cast<int64_t>(kSize));
  EXPECT_EQ(restored.volume().content_source().snapshot().snapshot_id(), snap_id);
  auto rv2 = store_->GetVolume("rv2");
  ASSERT_TRUE(rv2.ok()) << rv2.status().message();
  EXPECT_EQ(rv2->in_sync, std::vector<std::string>{holder});
  ASSERT_EQ(rv2->replicas.size(), 2u);
  const std::string blank = rv2->replicas[0] == holder ? rv2->replicas[1] : rv2->replicas[0];
  v1::ControllerGetVolumeRequest get;
  get.set_volume_id("r1:rv2");
  v1::ControllerGetVolumeResponse got;
  ASSERT_TRUE(csi.Call(&v1::Controller::Stub::ControllerGetVolume, get, &got).ok());
  EXPECT_TRUE(got.status().volume_condition().abnormal())
      << got.status().volume_condition().message();

  // Its first target serves the snapshot's image at once, and copies it to the blank replica.
  Node& s2 = csi.Stager(rv2->replicas);
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        std::string out;
        return s2.TryNbdctl("target open rv2", &out) == 0;
      },
      30s, 300ms))
      << ReadFile(s2.log());
  const std::string served = s2.dir() + "/served.raw";
  ASSERT_TRUE(s2.CopyTarget(served, "rv2"));
  EXPECT_TRUE(ReadFile(served) == ReadFile(image)) << "the target does not serve the snapshot";
  // The automatic resync (every 10 s) or this request, whichever comes first, copies it.
  std::string out;
  s2.TryNbdctl(fmt::format("target resync rv2 {}", blank), &out);
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        rv2 = store_->GetVolume("rv2");
        return rv2.ok() && rv2->in_sync == rv2->replicas;
      },
      60s, 300ms))
      << out << ReadFile(s2.log());
  got.Clear();
  ASSERT_TRUE(csi.Call(&v1::Controller::Stub::ControllerGetVolume, get, &got).ok());
  EXPECT_FALSE(got.status().volume_condition().abnormal())
      << got.status().volume_condition().message();
  EXPECT_TRUE(csi.ById(blank).Nbdcopy(rv2->epoch, "rv2") == ReadFile(image))
      << "the blank replica did not get the snapshot's image";
  EXPECT_TRUE(csi.ById(holder).Nbdcopy(rv2->epoch, "rv2") == ReadFile(image))
      << "the restored replica is not the snapshot's image";

  ASSERT_EQ(s2.Nbdctl("target close rv2"), 0);
  v1::DeleteVolumeRequest del;
  del.set_volume_id("r1:rv2");
  v1::DeleteVolumeResponse deleted;
  EXPECT_TRUE(test::WaitUntil(
      [&] { return csi.Call(&v1::Controller::Stub::DeleteVolume, del, &deleted).ok(); }, 20s,
      300ms));
  v1::DeleteSnapshotRequest del_snap;
  del_snap.set_snapshot_id(snap_id);
  v1::DeleteSnapshotResponse snap_deleted;
  EXPECT_TRUE(csi.Call(&v1::Controller::Stub::DeleteSnapshot, del_snap, &snap_deleted).ok());
  csi.Stop();
}

// fio through libnbd on `uri`: random 4 KiB writes over [offset, offset + size), crc32c
// verified when `verify`; returns fio's exit code, its JSON report in *report.
int Fio(const std::string& dir, const std::string& name, const std::string& uri,
        const std::string& offset, const std::string& size, bool verify,
        nlohmann::json* report, const std::string& extra = "") {
  const std::string job = dir + "/" + name + ".fio";
  std::ofstream(job) << fmt::format(
      "[global]\nioengine=nbd\nuri={}\nbs=4k\niodepth=16\noffset={}\nsize={}\n{}{}\n"
      "[w]\nrw=randwrite\n",
      uri, offset, size,
      verify ? "verify=crc32c\nverify_fatal=1\nverify_backlog=256\n" : "", extra);
  const std::string out = dir + "/" + name + ".json";
  int rc = std::system(fmt::format("timeout 120 fio --output-format=json --output={} {} >{}/{}.log "
                                   "2>&1",
                                   out, job, dir, name)
                           .c_str());
  *report = nlohmann::json::parse(ReadFile(out), nullptr, false);
  return rc;
}

TEST_F(ReplicatedTarget, AReturningReplicaCopiesOnlyWhatItMissed) {
  if (!HaveFioNbd()) GTEST_SKIP() << "needs fio with its nbd engine";
  Node t{"node-t", "127.0.0.13", certs_};
  t.Start(etcd_.endpoint(), {"--replica-resync-interval", "0"});  // by nbdctl only, here
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  const std::string uri = t.TargetUri();
  nlohmann::json report;
  // Both replicas get the first 16 MiB.
  ASSERT_EQ(Fio(t.dir(), "both", uri, "0", "16M", false, &report), 0);
  b_.Kill9();
  // node-b misses these 8 MiB (eight 1 MiB regions of its bitmap).
  ASSERT_EQ(Fio(t.dir(), "missed", uri, "32M", "8M", true, &report), 0);
  ASSERT_EQ(report["jobs"][0]["error"], 0);
  std::string out;
  ASSERT_EQ(t.Nbdctl(fmt::format("target inspect {} -o json", kVolume), &out), 0);
  auto state = nlohmann::json::parse(out);
  EXPECT_EQ(state["health"], "degraded");
  ASSERT_EQ(state["replicas"].size(), 2u);
  EXPECT_EQ(state["replicas"][1]["node"], "node-b");
  EXPECT_EQ(state["replicas"][1]["state"], "out-of-sync");
  EXPECT_EQ(state["replicas"][1]["out_of_sync_bytes"], 8ull << 20);

  // node-b comes back (same pool), and is resynced while fio writes elsewhere on the volume.
  b_.Start(etcd_.endpoint());
  test::Proc live;
  ASSERT_TRUE(StartVerifyWriter(live, t.dir(), "live", uri, {4, "48M", "8M", 64, 400}));
  // The writer has begun once node-b (still out, resync by nbdctl only) misses more than the
  // 8 MiB it missed before.
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        std::string j;
        if (t.TryNbdctl(fmt::format("target inspect {} -o json", kVolume), &j, "begun") != 0)
          return false;
        auto state = nlohmann::json::parse(j, nullptr, false);
        return !state.is_discarded() &&
               state["replicas"][1]["out_of_sync_bytes"].get<uint64_t>() > (8ull << 20);
      },
      30s, 50ms))
      << ReadFile(t.dir() + "/live.log");
  // While it runs (paced at 8 MiB/s), inspect shows its progress.
  std::atomic<bool> resync_done{false};
  double seen_percent = -1;
  std::string seen_node;
  std::thread watcher([&] {
    std::string watched;
    while (!resync_done) {
      if (t.TryNbdctl(fmt::format("target inspect {} -o json", kVolume), &watched, "watch") == 0) {
        auto j = nlohmann::json::parse(watched, nullptr, false);
        if (!j.is_discarded() && !j["resync"].is_null()) {
          seen_node = j["resync"]["node"].get<std::string>();
          seen_percent = std::max(seen_percent, j["resync"]["percent"].get<double>());
        }
      }
      std::this_thread::sleep_for(100ms);  // pacing: an inspect every 100 ms
    }
  });
  const int rc =
      t.Nbdctl(
          fmt::format("target resync {} node-b --rate 8Mi --wait -o json --timeout 120", kVolume),
          &out);
  resync_done = true;
  watcher.join();
  ASSERT_EQ(rc, 0);
  EXPECT_EQ(seen_node, "node-b") << "no progress seen in target inspect during the resync";
  EXPECT_GE(seen_percent, 0);
  EXPECT_LE(seen_percent, 100);
  auto r = nlohmann::json::parse(out);
  EXPECT_EQ(r["full"], false);
  // The 8 MiB it missed, plus the live writer's 8 MiB window written while it was still out;
  // copied: those, plus what the writer dirtied again during the passes; never the whole
  // 64 MiB volume.
  const uint64_t dirty = r["dirty_bytes_at_start"].get<uint64_t>();
  EXPECT_GE(dirty, 8ull << 20);
  EXPECT_LE(dirty, 16ull << 20);
  EXPECT_GE(r["copied_bytes"].get<uint64_t>(), dirty);
  EXPECT_LE(r["copied_bytes"].get<uint64_t>(), 32ull << 20);
  EXPECT_EQ(r["target"]["health"], "ok");
  EXPECT_EQ(r["target"]["in_sync"], nlohmann::json::array({"node-a", "node-b"}));
  printf("FIGURE resync after 8 MiB missed: %llu bytes copied in %llu passes, %llu ms, writes "
         "held %llu ms\n",
         static_cast<unsigned long long>(r["copied_bytes"].get<uint64_t>()),
         static_cast<unsigned long long>(r["passes"].get<uint64_t>()),
         static_cast<unsigned long long>(r["took_ms"].get<uint64_t>()),
         static_cast<unsigned long long>(r["frozen_ms"].get<uint64_t>()));
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync, (std::vector<std::string>{"node-a", "node-b"}));
  ASSERT_TRUE(test::WaitUntil([&] { return !live.Alive(); }, 120s));
  auto live_report = nlohmann::json::parse(ReadFile(t.dir() + "/live.json"), nullptr, false);
  ASSERT_FALSE(live_report.is_discarded()) << ReadFile(t.dir() + "/live.log");
  EXPECT_EQ(live_report["jobs"][0]["error"], 0) << ReadFile(t.dir() + "/live.log");

  // Both copies equal, byte for byte, and equal to what the target served.
  const std::string served = t.dir() + "/served.raw";
  ASSERT_TRUE(t.CopyTarget(served));
  ASSERT_EQ(t.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  const std::string disk_a = a_.Nbdcopy(1), disk_b = b_.Nbdcopy(1);
  ASSERT_EQ(disk_a.size(), kSize);
  EXPECT_TRUE(disk_a == disk_b) << "node-a and node-b differ after the resync";
  EXPECT_TRUE(disk_a == ReadFile(served));
}

TEST_F(ReplicatedTarget, AReplicaThatComesBackIsResyncedAutomatically) {
  if (!HaveFioNbd()) GTEST_SKIP() << "needs fio with its nbd engine";
  Node t{"node-t", "127.0.0.13", certs_};
  t.Start(etcd_.endpoint(), {"--replica-resync-interval", "1"});
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  const std::string uri = t.TargetUri();
  b_.Kill9();
  nlohmann::json report;
  ASSERT_EQ(Fio(t.dir(), "missed", uri, "8M", "4M", true, &report), 0);
  ASSERT_EQ(report["jobs"][0]["error"], 0);
  b_.Start(etcd_.endpoint());
  const auto back = std::chrono::steady_clock::now();
  ASSERT_TRUE(test::WaitUntil([&] { return t.Health() == "ok"; }, 30s, 200ms))
      << t.Health() << ReadFile(t.log());
  printf("FIGURE node-b back in sync %.1f s after its restart (resync interval 1 s)\n",
         std::chrono::duration<double>(std::chrono::steady_clock::now() - back).count());
  EXPECT_NE(ReadFile(t.log()).find("resynced from node-a: 4194304 bytes copied"),
            std::string::npos)
      << "only the 4 MiB it missed should be copied: " << ReadFile(t.log());
  ASSERT_EQ(t.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  EXPECT_TRUE(a_.Nbdcopy(1) == b_.Nbdcopy(1)) << "node-a and node-b differ after the resync";
}

// A target opened with `nbdctl target open` alone (no device, served to NBD clients) comes back
// after its datapath is killed: claimed again at the next epoch (the old claim's lease may still
// run: the same node takes it over) and served with what was written before. One closed by
// request is forgotten: the next start claims nothing.
TEST_F(ReplicatedTarget, AnOpenTargetIsReopenedAfterItsDatapathIsKilled) {
  Node t{"node-t", "127.0.0.13", certs_};
  t.Start(etcd_.endpoint());
  std::string out;
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {} -o json", kVolume), &out), 0);
  const uint64_t epoch = nlohmann::json::parse(out)["epoch"].get<uint64_t>();
  const std::string written = t.dir() + "/written.raw";
  {
    std::mt19937_64 rng(7);
    std::string data(4 << 20, '\0');
    for (auto& c : data) c = static_cast<char>(rng());
    std::ofstream(written, std::ios::binary) << data;
  }
  ASSERT_EQ(std::system(
                fmt::format("timeout 60 nbdcopy {} '{}'", written, t.TargetUri()).c_str()),
            0);
  t.Kill9();
  t.Start(etcd_.endpoint());
  ASSERT_EQ(t.TryNbdctl(fmt::format("target inspect {} -o json", kVolume), &out), 0)
      << out << ReadFile(t.log());
  EXPECT_EQ(nlohmann::json::parse(out)["epoch"], epoch + 1);
  auto v = store_->GetVolume(kVolume);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->target, "node-t");
  EXPECT_EQ(v->epoch, epoch + 1);
  EXPECT_NE(ReadFile(t.log()).find("target rv reopened"), std::string::npos) << ReadFile(t.log());
  const std::string served = t.dir() + "/served.raw";
  ASSERT_TRUE(t.CopyTarget(served));
  EXPECT_TRUE(ReadFile(served).substr(0, 4 << 20) == ReadFile(written))
      << "what was written before the kill is not what the reopened target serves";

  ASSERT_EQ(t.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  t.Kill9();
  t.Start(etcd_.endpoint());
  EXPECT_NE(t.TryNbdctl(fmt::format("target inspect {}", kVolume), &out), 0) << out;
  EXPECT_TRUE(store_->GetVolume(kVolume)->target.empty());
  EXPECT_EQ(store_->GetVolume(kVolume)->epoch, epoch + 1);
}

// `nbdctl target resync` without --wait starts the resync in the background and returns at once,
// with the replica's resync_pending (or the resync running) in the target it prints; target
// inspect follows it until the replica is in sync, with no error left; asked again for an
// in-sync replica it is refused, naming why.
TEST_F(ReplicatedTarget, ResyncStartsInTheBackgroundAndInspectFollowsIt) {
  if (!HaveFioNbd()) GTEST_SKIP() << "needs fio with its nbd engine";
  Node t{"node-t", "127.0.0.13", certs_};
  t.Start(etcd_.endpoint(), {"--replica-resync-interval", "0"});  // by nbdctl only, here
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  b_.Kill9();
  nlohmann::json report;
  ASSERT_EQ(Fio(t.dir(), "missed", t.TargetUri(), "0", "8M", false, &report), 0);
  b_.Start(etcd_.endpoint());
  std::string out;
  // 8 MiB at 2 MiB/s: about 4 s of copying, which the command must not wait for.
  const auto asked = std::chrono::steady_clock::now();
  ASSERT_EQ(t.Nbdctl(fmt::format("target resync {} node-b --rate 2Mi -o json", kVolume), &out), 0);
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - asked).count();
  auto started = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(started.is_discarded()) << out;
  EXPECT_EQ(started["started"], true) << out;
  EXPECT_EQ(started["node"], "node-b") << out;
  EXPECT_LT(took, 2.0) << "the command waited for the resync";
  // What inspect says at once: queued or running (the copy itself may take only a moment).
  ASSERT_EQ(started["target"]["replicas"][1]["node"], "node-b") << out;
  EXPECT_TRUE(started["target"]["replicas"][1]["resync_pending"] == true ||
              (!started["target"]["resync"].is_null() &&
               started["target"]["resync"]["node"] == "node-b"))
      << out;
  bool seen_running = false;
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        if (t.TryNbdctl(fmt::format("target inspect {} -o json", kVolume), &out) != 0) return false;
        auto j = nlohmann::json::parse(out, nullptr, false);
        if (j.is_discarded()) return false;
        if (!j["resync"].is_null() && j["resync"]["node"] == "node-b") seen_running = true;
        return j["health"] == "ok";
      },
      60s, 100ms))
      << out << ReadFile(t.log());
  printf("FIGURE background resync of 8 MiB at 2 MiB/s: command %.2f s, in sync %.1f s after, "
         "%s\n",
         took, std::chrono::duration<double>(std::chrono::steady_clock::now() - asked).count(),
         seen_running ? "progress seen in inspect" : "done before inspect saw it run");
  auto state = nlohmann::json::parse(out);
  EXPECT_EQ(state["replicas"][1]["node"], "node-b");
  EXPECT_EQ(state["replicas"][1]["resync_pending"], false);
  EXPECT_EQ(state["replicas"][1]["resync_error"], "");
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync, (std::vector<std::string>{"node-a", "node-b"}));
  // In sync now: refused at once, with the reason.
  EXPECT_EQ(t.TryNbdctl(fmt::format("target resync {} node-b", kVolume), &out), 1 << 8) << out;
  EXPECT_NE(out.find("not out of sync"), std::string::npos) << out;
  ASSERT_EQ(t.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  EXPECT_TRUE(a_.Nbdcopy(1) == b_.Nbdcopy(1)) << "node-a and node-b differ after the resync";
}

// Writes 4 KiB blocks through one NBD connection set and remembers, per block, the last
// acknowledged content and the contents still in flight (whose fate a crash leaves open).
class LoggingWriter {
 public:
  // Blocks first_block .. first_block + 2047 (8 MiB).
  explicit LoggingWriter(const std::string& sock, uint64_t first_block = 0)
      : first_block_(first_block) {
    ClientOptions o;
    o.endpoint = ParseEndpoint("unix://" + sock).value();
    o.export_name = std::string(kVolume) + "@target";
    o.connections = 2;
    o.request_timeout = 10s;
    auto c = ReplicaClient::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status().message();
    if (c.ok()) client_ = std::move(*c);
  }
  // Keeps up to `depth` writes in flight until Stop or a failure; blocks never repeat while in
  // flight.
  void Run(int depth) {
    thread_ = std::thread([this, depth] {
      std::mt19937_64 rng(7);
      uint64_t seq = 0;
      while (!stop_) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || in_flight_ < depth; });
        if (stop_ || failed_) break;
        uint64_t block;
        do block = first_block_ + rng() % 2048;
        while (pending_.count(block));
        auto buf = std::make_shared<std::vector<uint8_t>>(kBlock);
        ++seq;
        for (size_t i = 0; i < kBlock; i += 8) std::memcpy(buf->data() + i, &seq, 8);
        pending_[block] = *buf;
        ++in_flight_;
        lock.unlock();
        Status st = client_->Write(block * kBlock, *buf, false, [this, block, buf](const Status& s) {
          std::lock_guard<std::mutex> l(mu_);
          if (s.ok()) {
            acked_[block] = *buf;
            pending_.erase(block);
            ++acks_;
          } else {
            failed_ = true;  // the target died: this write's fate is open (stays pending)
          }
          --in_flight_;
          cv_.notify_all();
        });
        if (!st.ok()) {
          std::lock_guard<std::mutex> l(mu_);
          --in_flight_;
          failed_ = true;
          break;
        }
      }
    });
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
    if (client_) client_->Close(2s);
  }
  uint64_t acks() {
    std::lock_guard<std::mutex> lock(mu_);
    return acks_;
  }
  // Writes whose fate the end of the target left open (sent, never acknowledged).
  size_t unacknowledged() {
    std::lock_guard<std::mutex> lock(mu_);
    return pending_.size();
  }
  // Every acknowledged block must read back as its last acked content, or as a write to it that
  // was still in flight when the target died.
  void Check(const std::string& disk) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [block, want] : acked_) {
      const char* got = disk.data() + block * kBlock;
      if (std::memcmp(got, want.data(), kBlock) == 0) continue;
      auto p = pending_.find(block);
      if (p != pending_.end() && std::memcmp(got, p->second.data(), kBlock) == 0) continue;
      ADD_FAILURE() << "block " << block << ": an acknowledged write is lost";
      return;
    }
  }

 private:
  uint64_t first_block_;
  std::unique_ptr<ReplicaClient> client_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, std::vector<uint8_t>> acked_, pending_;
  int in_flight_ = 0;
  uint64_t acks_ = 0;
  bool stop_ = false, failed_ = false;
  std::thread thread_;
};

TEST_F(ReplicatedTarget, TheTargetsNodeDiesAndAnotherNodeTakesOverWithEveryAckedWrite) {
  Node t{"node-t", "127.0.0.13", certs_};
  Node u{"node-u", "127.0.0.14", certs_};
  t.Start(etcd_.endpoint());
  u.Start(etcd_.endpoint());
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  LoggingWriter w(t.nbd_sock());
  w.Run(16);
  ASSERT_TRUE(test::WaitUntil([&] { return w.acks() >= 2000; }, 30s));
  // The target's node dies: datapath and all, under the writer's load.
  t.Kill9();
  const auto died = std::chrono::steady_clock::now();
  w.Stop();
  // The other node claims as soon as the dead one's lease runs out (TTL 4 s).
  std::string out;
  ASSERT_TRUE(u.OpenTargetWithin(20s, &out)) << out;
  auto state = nlohmann::json::parse(out);
  EXPECT_EQ(state["epoch"], 2);
  EXPECT_EQ(state["in_sync"], nlohmann::json::array({"node-a", "node-b"}));
  // The first I/O on the new node.
  const std::string disk = u.dir() + "/after.raw";
  ASSERT_TRUE(u.CopyTarget(disk));
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - died).count();
  printf("FIGURE %llu writes acknowledged before the kill; target death -> volume read whole on "
         "the new node: %.1f s (lease TTL 4 s)\n",
         static_cast<unsigned long long>(w.acks()), took);
  // A functional bound (the takeover waits for the lease, nothing else), loose enough for a
  // sanitizer build on a busy machine; the figure above is the measurement.
  EXPECT_LT(took, 20) << "the takeover should take about the lease TTL (4 s)";
  w.Check(ReadFile(disk));
  ASSERT_EQ(u.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  // Each replica holds every acknowledged write too.
  w.Check(a_.Nbdcopy(2));
  w.Check(b_.Nbdcopy(2));
}

TEST_F(ReplicatedTarget, AnIsolatedReplicaIsDroppedWithinTheTimeoutAndComesBack) {
  if (!HaveFioNbd()) GTEST_SKIP() << "needs fio with its nbd engine";
  // node-b is reached through a proxy of the test's: other nodes dial the endpoint it registers.
  test::TcpProxy proxy;
  ASSERT_NO_FATAL_FAILURE(RestartBBehind(proxy));
  Node t{"node-t", "127.0.0.13", certs_};
  t.Start(etcd_.endpoint(), {"--replica-timeout", "2", "--replica-resync-interval", "1"});
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  const std::string uri = t.TargetUri();
  test::Proc fio;
  ASSERT_TRUE(StartVerifyWriter(fio, t.dir(), "iso", uri, {8, "", "16M", 128, 500}));
  // Pacing: a second of steady writes (500/s) before the partition, so that writes are in
  // flight to node-b when it comes, as on a busy volume.
  std::this_thread::sleep_for(2s);
  // The partition: node-b's packets stop both ways; it stays alive and registered.
  proxy.SetMode(test::TcpProxy::Mode::kSilent);
  ASSERT_TRUE(test::WaitUntil([&] { return t.Health() == "degraded"; }, 15s, 100ms))
      << t.Health();
  // "degraded" shows as soon as node-b is failing; the drop is recorded in etcd a moment later
  // (writes wait for that record, not the health report).
  EXPECT_TRUE(test::WaitUntil(
      [&] { return store_->GetVolume(kVolume)->in_sync == std::vector<std::string>{"node-a"}; },
      10s, 50ms))
      << fmt::format("{}", fmt::join(store_->GetVolume(kVolume)->in_sync, ","));
  // A window: the partition lasts 2 s more while fio writes (node-b misses them, the resync then
  // has something to copy).
  std::this_thread::sleep_for(2s);
  // Healed: the automatic resync brings it back.
  proxy.SetMode(test::TcpProxy::Mode::kPass);
  ASSERT_TRUE(test::WaitUntil([&] { return t.Health() == "ok"; }, 30s, 200ms))
      << t.Health() << ReadFile(t.log());
  ASSERT_TRUE(test::WaitUntil([&] { return !fio.Alive(); }, 120s));
  auto report = nlohmann::json::parse(ReadFile(t.dir() + "/iso.json"), nullptr, false);
  ASSERT_FALSE(report.is_discarded()) << ReadFile(t.dir() + "/iso.log");
  EXPECT_EQ(report["jobs"][0]["error"], 0) << ReadFile(t.dir() + "/iso.log");
  const double stall = report["jobs"][0]["write"]["clat_ns"]["max"].get<double>() / 1e9;
  printf("FIGURE replica partitioned (--replica-timeout 2 s): longest write %.2f s, no error; "
         "back in sync after the partition healed\n",
         stall);
  // Functional: the silent replica was cut by its 2 s timeout, not by TCP's minutes (loose
  // enough for a sanitizer build; the figure above is the measurement).
  EXPECT_LT(stall, 8.0) << "a silent replica must cost about its timeout, not more";
  ASSERT_EQ(t.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  EXPECT_TRUE(a_.Nbdcopy(1) == b_.Nbdcopy(1)) << "node-a and node-b differ after the resync";
}

TEST_F(ReplicatedTarget, ATargetCutOffFromEtcdStopsAndAnotherNodeTakesOver) {
  // node-t reaches etcd through a proxy of the test's, and the replicas directly.
  test::TcpProxy to_etcd;
  const std::string etcd_ip = etcd_.endpoint().substr(0, etcd_.endpoint().find(':'));
  const int etcd_port = std::stoi(etcd_.endpoint().substr(etcd_.endpoint().find(':') + 1));
  ASSERT_TRUE(to_etcd.Start("127.0.0.13", 0, etcd_ip, etcd_port));
  Node t{"node-t", "127.0.0.13", certs_};
  Node u{"node-u", "127.0.0.14", certs_};
  t.Start(fmt::format("127.0.0.13:{}", to_etcd.port()));
  u.Start(etcd_.endpoint());
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  LoggingWriter w(t.nbd_sock());
  w.Run(8);
  ASSERT_TRUE(test::WaitUntil([&] { return w.acks() >= 1000; }, 30s));
  // The partition: node-t still reaches the replicas, not etcd.
  to_etcd.SetMode(test::TcpProxy::Mode::kSilent);
  const auto cut = std::chrono::steady_clock::now();
  // node-u gets the volume once etcd let node-t's lease run out (TTL 4 s).
  std::string out;
  ASSERT_TRUE(u.OpenTargetWithin(30s, &out)) << out;
  const double takeover =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - cut).count();
  w.Stop();
  ASSERT_EQ(t.Nbdctl(fmt::format("target inspect {} -o json", kVolume), &out), 0);
  auto old_state = nlohmann::json::parse(out);
  EXPECT_EQ(old_state["health"], "stopped") << out;
  // The old target, partition healed, tries to write: refused.
  to_etcd.SetMode(test::TcpProxy::Mode::kPass);
  {
    LoggingWriter late(t.nbd_sock());
    late.Run(1);
    // A window for a wrong outcome: nothing signals that a write was not acknowledged.
    std::this_thread::sleep_for(500ms);
    late.Stop();
    EXPECT_EQ(late.acks(), 0u) << "the old target acknowledged a write after the takeover";
  }
  printf("FIGURE target cut off from etcd: %llu writes acknowledged before; node-u serves the "
         "volume %.1f s after the cut (lease TTL 4 s); the old target refuses writes\n",
         static_cast<unsigned long long>(w.acks()), takeover);
  const std::string disk = u.dir() + "/after.raw";
  ASSERT_TRUE(u.CopyTarget(disk));
  w.Check(ReadFile(disk));
  ASSERT_EQ(u.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  w.Check(a_.Nbdcopy(2));
  w.Check(b_.Nbdcopy(2));
}

// Blocks (4 KiB) at which two images differ.
size_t DifferingBlocks(const std::string& x, const std::string& y) {
  if (x.size() != y.size()) return SIZE_MAX;
  size_t n = 0;
  for (size_t off = 0; off < x.size(); off += kBlock)
    if (std::memcmp(x.data() + off, y.data() + off, std::min<size_t>(kBlock, x.size() - off)))
      ++n;
  return n;
}

TEST_F(ReplicatedTarget, WritesInFlightWhenTheTargetDiesAreReconciledByTheNextTarget) {
  // node-b is reached through a proxy of the test's, which the test silences: the target's
  // writes reach node-a and wait for node-b, whose long timeout keeps it in sync.
  test::TcpProxy proxy;
  ASSERT_NO_FATAL_FAILURE(RestartBBehind(proxy));
  Node t{"node-t", "127.0.0.13", certs_};
  Node u{"node-u", "127.0.0.14", certs_};
  t.Start(etcd_.endpoint(), {"--replica-timeout", "120"});
  u.Start(etcd_.endpoint());
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  LoggingWriter w(t.nbd_sock());
  w.Run(16);
  ASSERT_TRUE(test::WaitUntil([&] { return w.acks() >= 500; }, 30s));
  proxy.SetMode(test::TcpProxy::Mode::kSilent);  // returns once the proxy forwards nothing
  // What w had in flight may have reached node-b already; a second writer's writes (on the next
  // 8 MiB, blank until now) start after the silence: node-a applies them, node-b hears nothing.
  LoggingWriter late(t.nbd_sock(), 2048);
  late.Run(16);
  // The target dies once node-a holds one of them (read at the live target's epoch).
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        const std::string disk = a_.Nbdcopy(1);
        const size_t first = disk.find_first_not_of('\0', 2048 * kBlock);
        return first != std::string::npos && first < 4096 * kBlock;
      },
      30s, 50ms))
      << "no write of the second writer reached node-a";
  t.Kill9();
  w.Stop();
  late.Stop();
  // What the partition held for node-b is lost with the target.
  proxy.DropConnections();
  proxy.SetMode(test::TcpProxy::Mode::kPass);
  EXPECT_EQ(late.acks(), 0u) << "a write was acknowledged without node-b";
  const size_t open_writes = w.unacknowledged() + late.unacknowledged();
  ASSERT_GT(open_writes, 0u) << "no write was in flight when the target died";
  // The precondition: the replicas differ where writes were in flight (read at the dead
  // target's epoch, which fences nothing new).
  const size_t differ_before = DifferingBlocks(a_.Nbdcopy(1), b_.Nbdcopy(1));
  EXPECT_GT(differ_before, 0u) << "the writes in flight should have reached node-a only";
  // Both stay in sync in etcd: nothing was acknowledged without node-b.
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync, (std::vector<std::string>{"node-a", "node-b"}));

  std::string out;
  ASSERT_TRUE(u.OpenTargetWithin(20s, &out)) << out;
  const auto opened = std::chrono::steady_clock::now();
  EXPECT_EQ(nlohmann::json::parse(out)["in_sync"],
            nlohmann::json::array({"node-a", "node-b"}));
  // Read at once, while the new target may still be reconciling.
  const std::string served = u.dir() + "/served.raw";
  ASSERT_TRUE(u.CopyTarget(served));
  // Done reconciling: inspect shows no "reconcile" any more.
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        std::string j;
        if (u.TryNbdctl(fmt::format("target inspect {} -o json", kVolume), &j) != 0) return false;
        auto state = nlohmann::json::parse(j, nullptr, false);
        return !state.is_discarded() && state["reconcile"].is_null();
      },
      60s, 100ms));
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - opened).count();
  EXPECT_TRUE(store_->GetVolume(kVolume)->dirty) << "a claim marks the volume dirty";
  ASSERT_EQ(u.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  // Reconciled, drained and flushed: the close is clean, and the next claim reconciles nothing.
  EXPECT_FALSE(store_->GetVolume(kVolume)->dirty) << "node-u's close was not recorded clean";
  const std::string disk_a = a_.Nbdcopy(2), disk_b = b_.Nbdcopy(2);
  // The daemon's own measure of the pass.
  const std::string ulog = ReadFile(u.log());
  const auto at = ulog.find("replicas reconciled in ");
  ASSERT_NE(at, std::string::npos) << "node-u never reconciled:\n" << ulog;
  const std::string pass = ulog.substr(at + 23, ulog.find('\n', at) - at - 23);
  printf("FIGURE unclean takeover: %zu writes in flight at the kill, %zu blocks differed between "
         "the replicas; the pass took %s, done %.1f s after the open (64 MiB volume, read whole "
         "through the new target meanwhile)\n",
         open_writes, differ_before, pass.c_str(), took);
  EXPECT_EQ(DifferingBlocks(disk_a, disk_b), 0u) << "node-a and node-b still differ";
  EXPECT_EQ(DifferingBlocks(ReadFile(served), disk_a), 0u)
      << "what the new target served before it reconciled is not what both replicas hold";
  w.Check(disk_a);
  w.Check(disk_b);
}

// `nbdctl target move` (issue 16): a 256 MiB volume "mv" on node-a and node-b, served by node-t,
// with 128 MiB of data; fio writes with crc32c verify through mv@target while the replica on
// node-b moves to node-u (whose pool holds a blank copy): add (out of sync), full copy in the
// background, in sync, remove node-b. fio sees no error; the catalogue lists node-a and node-u,
// both in sync, at the same epoch; node-u's copy is byte for byte node-a's and what the target
// served; node-b's copy can be deleted; the next target (node-a, epoch 2) serves from node-a and
// node-u, and node-u refuses epoch 1 (fenced).
TEST_F(ReplicatedTarget, AReplicaMovesToANewNodeUnderFioWithNoErrorAndNoDowntime) {
  if (!Have("fio") || std::system("fio --enghelp 2>/dev/null | grep -qw nbd") != 0)
    GTEST_SKIP() << "needs fio with its nbd engine";
  constexpr const char* kMv = "mv";
  constexpr uint64_t kMvSize = 256ull << 20;
  Node t{"node-t", "127.0.0.13", certs_};
  Node u{"node-u", "127.0.0.14", certs_};
  t.Start(etcd_.endpoint(), {"--replica-resync-interval", "0"});
  u.Start(etcd_.endpoint());
  for (Node* n : {&a_, &b_, &u}) ASSERT_EQ(n->Nbdctl("volume create mv --size 256Mi"), 0);
  cluster::VolumeState v;
  v.name = kMv;
  v.size_bytes = kMvSize;
  v.replicas = v.in_sync = {"node-a", "node-b"};
  ASSERT_TRUE(store_->CreateVolume(v).ok());
  ASSERT_EQ(t.Nbdctl("target open mv"), 0);
  const std::string uri = t.TargetUri(kMv);
  // 128 MiB of data (the rest holes, which the copy skips).
  const std::string data = t.dir() + "/data.raw";
  ASSERT_EQ(std::system(fmt::format("head -c 128M /dev/urandom > {}", data).c_str()), 0);
  ASSERT_EQ(std::system(fmt::format("timeout 60 nbdcopy {} '{}'", data, uri).c_str()), 0);

  // fio with verify through the target for the whole move (16 MiB at 1000 writes/s: ~4 s).
  test::Proc live;
  ASSERT_TRUE(StartVerifyWriter(live, t.dir(), "live", uri, {8, "160M", "16M", 64, 1000}));
  std::this_thread::sleep_for(500ms);
  std::string out;
  ASSERT_EQ(t.Nbdctl("target move mv --from node-b --to node-u -o json --timeout 120", &out), 0);
  EXPECT_TRUE(live.Alive()) << "fio ended before the move did: it did not cover the move";
  auto moved = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(moved.is_discarded()) << out;
  EXPECT_EQ(moved["from"], "node-b");
  EXPECT_EQ(moved["to"], "node-u");
  EXPECT_EQ(moved["target"]["in_sync"], nlohmann::json::array({"node-a", "node-u"})) << out;
  ASSERT_EQ(moved["target"]["replicas"].size(), 2u) << out;
  EXPECT_EQ(moved["target"]["health"], "ok") << out;
  const std::string tlog = ReadFile(t.log());
  const auto at = tlog.find("replica on node-u resynced from node-a: ");
  ASSERT_NE(at, std::string::npos) << tlog;
  printf("FIGURE move of a 256 MiB volume (128 MiB data) under fio: %llu ms in all, copy %llu "
         "ms (%.0f MiB/s of volume); %s\n",
         static_cast<unsigned long long>(moved["took_ms"].get<uint64_t>()),
         static_cast<unsigned long long>(moved["copy_ms"].get<uint64_t>()),
         256.0 * 1000.0 /
             static_cast<double>(std::max<uint64_t>(moved["copy_ms"].get<uint64_t>(), 1)),
         tlog.substr(at, tlog.find('\n', at) - at).c_str());
  auto after = store_->GetVolume(kMv);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->replicas, (std::vector<std::string>{"node-a", "node-u"}));
  EXPECT_EQ(after->in_sync, (std::vector<std::string>{"node-a", "node-u"}));
  EXPECT_EQ(after->epoch, 1u) << "a move needs no new claim";
  EXPECT_EQ(after->target, "node-t");
  ASSERT_TRUE(test::WaitUntil([&] { return !live.Alive(); }, 120s));
  auto report = nlohmann::json::parse(ReadFile(t.dir() + "/live.json"), nullptr, false);
  ASSERT_FALSE(report.is_discarded()) << ReadFile(t.dir() + "/live.log");
  EXPECT_EQ(report["jobs"][0]["error"], 0) << ReadFile(t.dir() + "/live.log");

  // Every acknowledged write is on the new copy: node-u's copy is node-a's and what was served.
  const std::string served = t.dir() + "/served.raw";
  ASSERT_TRUE(t.CopyTarget(served, kMv));
  ASSERT_EQ(t.Nbdctl("target close mv"), 0);
  const std::string disk_a = a_.Nbdcopy(1, kMv), disk_u = u.Nbdcopy(1, kMv);
  ASSERT_EQ(disk_u.size(), kMvSize);
  EXPECT_TRUE(disk_a == disk_u) << "node-a and node-u differ after the move";
  EXPECT_TRUE(disk_u == ReadFile(served)) << "node-u does not hold what the target served";
  // fio wrote from 160 MiB on only: the first 128 MiB are the data written before the move.
  EXPECT_TRUE(disk_u.compare(0, 128 << 20, ReadFile(data)) == 0)
      << "the data written before the move is not on node-u";
  // The old copy is the operator's to delete, and nothing holds it any more.
  ASSERT_EQ(b_.Nbdctl("volume delete mv"), 0);
  EXPECT_NE(b_.TryNbdctl("volume inspect mv", &out), 0) << out;
  // The next target connects to the new replica set; the new copy refuses the old epoch.
  ASSERT_EQ(a_.Nbdctl("target open mv -o json", &out), 0);
  auto reopened = nlohmann::json::parse(out);
  EXPECT_EQ(reopened["epoch"], 2);
  EXPECT_EQ(reopened["in_sync"], nlohmann::json::array({"node-a", "node-u"})) << out;
  EXPECT_EQ(reopened["health"], "ok") << out;
  EXPECT_FALSE(test::NbdcopyRead(fmt::format("nbd+unix:///mv@epoch=1?socket={}", u.nbd_sock()),
                                 u.dir() + "/stale.raw", u.dir() + "/stale.log"))
      << "node-u served epoch 1 after a target claimed epoch 2";
  ASSERT_EQ(a_.Nbdctl("target close mv"), 0);
}

// Bad input to replica changes, each refused with a clear error and nothing changed; the last
// in-sync replica is never removed; a new replica whose node dies during its copy stays out of
// sync while the volume keeps serving, and the move says so, keeping the old replica.
TEST_F(ReplicatedTarget, ReplicaChangesRefuseBadInputAndADeadNewNodeLosesNothing) {
  Node t{"node-t", "127.0.0.13", certs_};
  Node u{"node-u", "127.0.0.14", certs_};
  t.Start(etcd_.endpoint(), {"--replica-resync-interval", "0"});
  u.Start(etcd_.endpoint());
  ASSERT_EQ(t.Nbdctl(fmt::format("target open {}", kVolume)), 0);
  const std::string data = t.dir() + "/data.raw";
  ASSERT_EQ(std::system(fmt::format("head -c 48M /dev/urandom > {}", data).c_str()), 0);
  ASSERT_EQ(std::system(fmt::format("timeout 60 nbdcopy {} '{}'", data, t.TargetUri()).c_str()),
            0);
  auto before = store_->GetVolume(kVolume);
  ASSERT_TRUE(before.ok());
  std::string out;
  auto refused = [&](const std::string& args, const std::string& says) {
    EXPECT_EQ(t.TryNbdctl(args, &out), 1 << 8) << args << ": " << out;
    EXPECT_NE(out.find(says), std::string::npos) << args << ": " << out;
    auto now = store_->GetVolume(kVolume);
    ASSERT_TRUE(now.ok());
    EXPECT_TRUE(now.value() == before.value()) << args << " changed the catalogue";
  };
  refused("target replica add rv node-a", "holds a replica already");
  refused("target replica add rv node-zz", "not registered");
  refused("target replica add rv node-u", "does not answer");  // no copy in node-u's pool
  refused("target move rv --from node-zz --to node-u", "not a replica");
  refused("target replica remove rv node-zz", "no replica on node-zz");
  refused("target replica add nope node-u", "no target of volume nope");
  EXPECT_EQ(t.TryNbdctl("target move rv --from node-a --to node-a", &out), 2 << 8) << out;

  // node-u with a copy, its full copy paced at 4 MiB/s (48 MiB of data: ~12 s), killed in the
  // middle: the move fails saying so, node-b stays, node-u stays out of sync, writes go on.
  ASSERT_EQ(u.Nbdctl(fmt::format("volume create {} --size 64Mi", kVolume)), 0);
  std::atomic<int> move_rc{-1};
  std::thread move([&] {
    move_rc = t.TryNbdctl(
        fmt::format("--timeout 60 target move {} --from node-b --to node-u --rate 4Mi", kVolume),
        nullptr, "move");
  });
  struct Join {
    std::thread& t;
    ~Join() {
      if (t.joinable()) t.join();
    }
  } join{move};
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        auto v = store_->GetVolume(kVolume);
        return v.ok() && v->replicas.size() == 3;
      },
      20s, 50ms))
      << ReadFile(t.dir() + "/move.out");
  std::this_thread::sleep_for(2s);
  u.Kill9();
  ASSERT_TRUE(test::WaitUntil([&] { return move_rc >= 0; }, 60s));
  EXPECT_EQ(move_rc, 1 << 8);
  const std::string said = ReadFile(t.dir() + "/move.out");
  EXPECT_NE(said.find("is not in sync"), std::string::npos) << said;
  EXPECT_NE(said.find("keeps serving"), std::string::npos) << said;
  auto v = store_->GetVolume(kVolume);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->replicas, (std::vector<std::string>{"node-a", "node-b", "node-u"}));
  EXPECT_EQ(v->in_sync, (std::vector<std::string>{"node-a", "node-b"}));
  EXPECT_EQ(v->epoch, before->epoch);
  EXPECT_EQ(t.Health(), "degraded");
  const std::string more = t.dir() + "/more.raw";
  ASSERT_EQ(std::system(fmt::format("head -c 1M /dev/urandom > {}", more).c_str()), 0);
  ASSERT_EQ(std::system(fmt::format("timeout 60 nbdcopy {} '{}'", more, t.TargetUri()).c_str()),
            0)
      << "the volume stopped serving";

  // The half-added replica can be removed again; the last in-sync one never.
  ASSERT_EQ(t.Nbdctl("target replica remove rv node-u"), 0);
  ASSERT_EQ(t.Nbdctl("target replica remove rv node-b -o json", &out), 0);
  EXPECT_EQ(nlohmann::json::parse(out)["target"]["in_sync"], nlohmann::json::array({"node-a"}));
  EXPECT_EQ(t.TryNbdctl("target replica remove rv node-a", &out), 1 << 8) << out;
  EXPECT_NE(out.find("last one in sync"), std::string::npos) << out;
  EXPECT_EQ(store_->GetVolume(kVolume)->replicas, (std::vector<std::string>{"node-a"}));
  const std::string served = t.dir() + "/served.raw";
  ASSERT_TRUE(t.CopyTarget(served));
  ASSERT_EQ(t.Nbdctl(fmt::format("target close {}", kVolume)), 0);
  EXPECT_TRUE(a_.Nbdcopy(1) == ReadFile(served));
  EXPECT_TRUE(ReadFile(served).compare(0, 1 << 20, ReadFile(more)) == 0);
  EXPECT_TRUE(ReadFile(served).compare(1 << 20, (48 << 20) - (1 << 20), ReadFile(data), 1 << 20,
                                       (48 << 20) - (1 << 20)) == 0);
}

// `nbdctl cluster volume move` through nbd-csi-controller: "rv" made over CSI on two nodes and
// served by the third; node-u joins; the controller makes node-u's blank copy, has the target
// add and copy it (fio with verify writing meanwhile), then remove the old replica, and deletes
// the old copy. Then the controller's refusals, and its changes with no target: a move is
// refused, an add is recorded out of sync (the next target copies it), the last in-sync replica
// is never removed.
TEST_F(ReplicatedTarget, TheControllerMovesAReplicaAndDeletesTheOldCopy) {
  if (!Have("fio") || std::system("fio --enghelp 2>/dev/null | grep -qw nbd") != 0)
    GTEST_SKIP() << "needs fio with its nbd engine";
  CsiCluster csi;
  cluster::VolumeState state;
  Node* s = nullptr;
  ASSERT_NO_FATAL_FAILURE(
      csi.StartAndServe(a_, b_, certs_, etcd_.endpoint(), *store_, &state, &s));
  Node u{"node-u", "127.0.0.14", certs_};
  csi.StartNode(u, etcd_.endpoint());
  std::string out;
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        return csi.Cluster(u, "nodes -o json", &out) == 0 &&
               out.find("\"node-u\"") != std::string::npos;
      },
      20s, 200ms))
      << out;
  const std::string from = state.replicas[1], kept = state.replicas[0];
  const std::string data = s->dir() + "/data.raw";
  ASSERT_EQ(std::system(fmt::format("head -c 32M /dev/urandom > {}", data).c_str()), 0);
  ASSERT_EQ(std::system(fmt::format("timeout 60 nbdcopy {} '{}'", data, s->TargetUri()).c_str()),
            0);
  test::Proc live;
  ASSERT_TRUE(
      StartVerifyWriter(live, s->dir(), "live", s->TargetUri(), {8, "40M", "8M", 64, 1000}));
  std::this_thread::sleep_for(300ms);
  ASSERT_EQ(csi.Cluster(u, fmt::format("volume move r1:rv --from {} --to node-u -o json", from),
                        &out),
            0)
      << out << ReadFile(csi.log());
  auto moved = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(moved.is_discarded()) << out;
  const auto want = cluster::SortedUnique(std::vector<std::string>{kept, "node-u"});
  EXPECT_EQ(moved["replicas"], nlohmann::json(want)) << out;
  EXPECT_EQ(moved["in_sync"], nlohmann::json(want)) << out;
  EXPECT_EQ(moved["copy_left"], "") << out;
  EXPECT_EQ(moved["target"], s->id()) << out;
  printf("FIGURE controller move of a 64 MiB volume (32 MiB data) under fio: %llu ms, copy "
         "%llu ms\n",
         static_cast<unsigned long long>(moved["took_ms"].get<uint64_t>()),
         static_cast<unsigned long long>(moved["copy_ms"].get<uint64_t>()));
  auto after = store_->GetVolume(kVolume);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->replicas, want);
  EXPECT_EQ(after->in_sync, want);
  EXPECT_EQ(after->epoch, state.epoch + 1) << "the stage's claim only";
  EXPECT_NE(csi.ById(from).TryNbdctl("volume inspect rv", &out), 0)
      << "the old copy is still in " << from << "'s pool: " << out;
  ASSERT_TRUE(test::WaitUntil([&] { return !live.Alive(); }, 120s));
  auto report = nlohmann::json::parse(ReadFile(s->dir() + "/live.json"), nullptr, false);
  ASSERT_FALSE(report.is_discarded()) << ReadFile(s->dir() + "/live.log");
  EXPECT_EQ(report["jobs"][0]["error"], 0) << ReadFile(s->dir() + "/live.log");
  const std::string served = s->dir() + "/served.raw";
  ASSERT_TRUE(s->CopyTarget(served));

  // Refusals, nothing changed.
  auto refused = [&](const std::string& args, const std::string& says) {
    EXPECT_EQ(csi.Cluster(u, args, &out), 1 << 8) << args << ": " << out;
    EXPECT_NE(out.find(says), std::string::npos) << args << ": " << out;
    EXPECT_EQ(store_->GetVolume(kVolume)->replicas, want) << args;
  };
  refused(fmt::format("volume move r1:rv --from {} --to node-u", kept), "holds a replica");
  refused("volume move r1:rv --from node-zz --to node-a", "holds no replica");
  refused(fmt::format("volume replica add r1:rv node-zz"), "not registered");
  refused("volume replica add r1:nope node-u", "does not exist");
  // With no target: a move is refused; an add is recorded out of sync; the last in-sync replica
  // stays.
  ASSERT_EQ(s->Nbdctl(fmt::format("target close {}", kVolume)), 0);
  EXPECT_TRUE(csi.ById(kept).Nbdcopy(after->epoch, kVolume) == ReadFile(served));
  EXPECT_TRUE(u.Nbdcopy(after->epoch, kVolume) == ReadFile(served))
      << "node-u does not hold what the target served";
  refused(fmt::format("volume move r1:rv --from {} --to {}", kept, from), "no node serves it");
  ASSERT_EQ(csi.Cluster(u, fmt::format("volume replica add rv {} -o json", from), &out), 0) << out;
  EXPECT_NE(out.find("the next target copies it"), std::string::npos) << out;
  EXPECT_EQ(store_->GetVolume(kVolume)->replicas,
            cluster::SortedUnique(std::vector<std::string>{kept, from, "node-u"}));
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync, want);
  ASSERT_EQ(csi.Cluster(u, fmt::format("volume replica remove rv {} -o json", kept), &out), 0)
      << out;
  EXPECT_NE(csi.ById(kept).TryNbdctl("volume inspect rv", &out), 0) << out;
  EXPECT_EQ(csi.Cluster(u, "volume replica remove rv node-u", &out), 1 << 8) << out;
  EXPECT_NE(out.find("last one in sync"), std::string::npos) << out;
  // The next target copies the out-of-sync replica; then it holds the volume too.
  ASSERT_EQ(s->Nbdctl(fmt::format("target open {}", kVolume)), 0);
  ASSERT_EQ(s->Nbdctl(fmt::format("target resync {} {} --wait --timeout 60", kVolume, from)), 0);
  ASSERT_EQ(s->Nbdctl(fmt::format("target close {}", kVolume)), 0);
  const uint64_t epoch = store_->GetVolume(kVolume)->epoch;
  EXPECT_EQ(store_->GetVolume(kVolume)->in_sync,
            cluster::SortedUnique(std::vector<std::string>{from, "node-u"}));
  EXPECT_TRUE(csi.ById(from).Nbdcopy(epoch, kVolume) == ReadFile(served));
  csi.Stop();
}

}  // namespace
}  // namespace nbdcsi::replica
