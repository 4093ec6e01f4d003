// Resync (datapath/replica/resync.h) between real replicas: two nbd-datapathd processes, each
// with its own pool, started and stopped by the test. The source is read over its Unix socket,
// the destination written over mutual TLS on 127.0.0.1 (the node-to-node path of issue 16).
//   - Dirty resync: both replicas hold the same base data; then the destination is "away" while
//     random data goes to the source at scattered offsets, each write's regions marked durably in
//     a RegionBitmap as the target would. RunDirty copies exactly the dirty regions (bytes copied
//     = dirty bytes, far less than the volume), the bitmap ends clean, and the two volumes are
//     byte-identical read through nbdcopy (libnbd, an independent client) and cmp.
//   - Full rebuild of a sparse volume onto a fresh one: BLOCK_STATUS from nbd-datapathd (its
//     SEEK_DATA/SEEK_HOLE map, read through the client, equals nbdinfo --map's) lets the job
//     skip the holes; bytes skipped reported; identical.
//   - Full rebuild from qemu-nbd (a sparse raw file): the same against another server's
//     BLOCK_STATUS.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <string>
#include <vector>

#include "datapath/replica/client.h"
#include "datapath/replica/region_bitmap.h"
#include "datapath/replica/resync.h"
#include "test/support/child_proc.h"
#include "test/support/free_port.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::replica {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using test::Bin;
using test::CanConnect;
using test::Have;
using test::Proc;
using test::ReadFile;
using test::Src;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSize = 64 * kMiB;

// One node: an nbd-datapathd with its own pool, NBD on a Unix socket and (with certificates)
// on mutual TLS at 127.0.0.1:port.
struct Node {
  std::string dir, api, unix_nbd;
  int port = 0;
  Proc proc;

  bool Start(const std::string& d, const std::string& certs, const std::string& node) {
    dir = d;
    fs::create_directories(dir + "/pool");
    api = dir + "/api.sock";
    unix_nbd = dir + "/nbd.sock";
    port = test::FreeLoopbackPort();
    std::vector<std::string> argv = {
        Bin("nbd-datapathd"), "--pool",       dir + "/pool",       "--api",
        "unix://" + api,      "--nbd-listen", "unix://" + unix_nbd};
    if (!certs.empty()) {
      argv.insert(argv.end(),
                  {"--nbd-listen", "tcp://127.0.0.1:" + std::to_string(port), "--nbd-tls-cert",
                   certs + "/node-" + node + ".crt", "--nbd-tls-key",
                   certs + "/node-" + node + ".key", "--nbd-tls-ca", certs + "/ca.crt"});
    }
    if (!proc.Start(argv, dir + "/datapathd.log")) return false;
    Endpoint a;
    a.kind = Endpoint::Kind::kUnix;
    a.path = api;
    return test::WaitUntil([&] { return CanConnect(a) && CanConnect(UnixEp()); }, 20s);
  }
  Endpoint UnixEp() const {
    Endpoint e;
    e.kind = Endpoint::Kind::kUnix;
    e.path = unix_nbd;
    return e;
  }
  Endpoint TlsEp() const {
    Endpoint e;
    e.kind = Endpoint::Kind::kTcp;
    e.host = "127.0.0.1";
    e.port = static_cast<uint16_t>(port);
    return e;
  }
  bool CreateVolume(const std::string& name) {
    const std::string cmd = Bin("nbdctl") + " --api unix://" + api + " volume create " + name +
                            " --size 64Mi >>" + dir + "/nbdctl.log 2>&1";
    return std::system(cmd.c_str()) == 0;
  }
  std::string Log() const {
    return ReadFile(dir + "/datapathd.log") + ReadFile(dir + "/nbdctl.log");
  }
};

class ResyncReal : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Have("nbdcopy")) GTEST_SKIP() << "needs nbdcopy (scripts/deps.sh test installs it)";
    ASSERT_TRUE(dir_.ok()) << dir_.error();
    const std::string cmd = Src() + "/test/tls/make-certs.sh " + certs() + " node-a node-b >" +
                            dir_.path() + "/make-certs.log 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << ReadFile(dir_.path() + "/make-certs.log");
    ASSERT_TRUE(a_.Start(dir_.path() + "/a", certs(), "node-a")) << a_.Log();
    ASSERT_TRUE(b_.Start(dir_.path() + "/b", certs(), "node-b")) << b_.Log();
  }
  std::string certs() const { return dir_.path() + "/certs"; }

  std::unique_ptr<ReplicaClient> Connect(const Endpoint& ep, const std::string& vol, bool tls,
                                         bool base_allocation = false) {
    ClientOptions o;
    o.endpoint = ep;
    o.export_name = vol;
    o.connections = 2;
    o.base_allocation = base_allocation;
    if (tls) {
      o.tls.cert = certs() + "/client.crt";
      o.tls.key = certs() + "/client.key";
      o.tls.ca = certs() + "/ca.crt";
    }
    auto c = ReplicaClient::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status().message();
    return c.ok() ? std::move(c).value() : nullptr;
  }

  // Synchronous helpers over the async client.
  static Status Wait(const std::function<Status(Callback)>& submit) {
    std::promise<Status> p;
    Status s = submit([&](const Status& st) { p.set_value(st); });
    if (!s.ok()) return s;
    return p.get_future().get();
  }
  static Status WriteAt(ReplicaClient& c, uint64_t off, const std::vector<uint8_t>& d) {
    for (uint64_t at = 0; at < d.size(); at += 4 * kMiB) {
      const size_t n = std::min<uint64_t>(4 * kMiB, d.size() - at);
      Status s = Wait([&](Callback cb) {
        return c.Write(off + at, std::span<const uint8_t>(d.data() + at, n), false, cb);
      });
      if (!s.ok()) return s;
    }
    return Wait([&](Callback cb) { return c.Flush(cb); });
  }
  static std::vector<uint8_t> Random(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(rng());
    return v;
  }

  // The volume as libnbd's nbdcopy reads it, into a file.
  std::string Copy(const Node& n, const std::string& vol, const std::string& tag) {
    const std::string out = dir_.path() + "/" + tag + ".raw";
    const std::string cmd = "timeout 60 nbdcopy 'nbd+unix:///" + vol + "?socket=" + n.unix_nbd +
                            "' " + out + " >" + dir_.path() + "/nbdcopy.log 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << ReadFile(dir_.path() + "/nbdcopy.log");
    return out;
  }
  // The whole export's base:allocation map through our client, neighbours of one type merged.
  struct Ext {
    uint64_t off, len;
    uint32_t type;
    bool operator==(const Ext&) const = default;
  };
  static void Merge(std::vector<Ext>& v, Ext e) {
    if (!v.empty() && v.back().type == e.type && v.back().off + v.back().len == e.off) {
      v.back().len += e.len;
    } else {
      v.push_back(e);
    }
  }
  static std::vector<Ext> OurMap(ReplicaClient& c) {
    std::vector<Ext> out;
    const uint64_t size = c.export_properties().size;
    for (uint64_t at = 0; at < size;) {
      std::promise<std::pair<Status, std::vector<BlockExtent>>> p;
      const uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(size - at, 16 * kMiB));
      Status s = c.BlockStatus(at, len, [&](const Status& st, std::vector<BlockExtent> e) {
        p.set_value({st, std::move(e)});
      });
      if (!s.ok()) {
        ADD_FAILURE() << s.message();
        return {};
      }
      auto [st, ext] = p.get_future().get();
      if (!st.ok()) {
        ADD_FAILURE() << st.message();
        return {};
      }
      for (const BlockExtent& e : ext) {
        Merge(out, {at, e.length, e.flags});
        at += e.length;
      }
    }
    return out;
  }
  // The same map as nbdinfo (libnbd) reads it.
  std::vector<Ext> NbdinfoMap(const std::string& uri) {
    const std::string out = dir_.path() + "/map.txt";
    const std::string cmd = "timeout 60 nbdinfo --map '" + uri + "' >" + out + " 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << ReadFile(out);
    std::vector<Ext> v;
    std::ifstream f(out);
    uint64_t off, len;
    uint32_t type;
    std::string desc;
    while (f >> off >> len >> type >> desc) Merge(v, {off, len, type});
    return v;
  }

  static bool Cmp(const std::string& x, const std::string& y) {
    return std::system(("cmp -s " + x + " " + y).c_str()) == 0;
  }

  test::TempDir dir_{"resync-it"};
  Node a_, b_;
};

TEST_F(ResyncReal, DirtyRegionsOnlyThenByteIdentical) {
  ASSERT_TRUE(a_.CreateVolume("vol")) << a_.Log();
  ASSERT_TRUE(b_.CreateVolume("vol")) << b_.Log();
  auto src = Connect(a_.UnixEp(), "vol", false);
  auto dst = Connect(b_.TlsEp(), "vol", true);
  ASSERT_TRUE(src && dst);
  // In sync: the same 16 MiB of base data on both.
  const auto base = Random(16 * kMiB, 1);
  ASSERT_TRUE(WriteAt(*src, 0, base).ok());
  ASSERT_TRUE(WriteAt(*dst, 0, base).ok());

  // The destination goes away; the target writes on and marks what it writes.
  auto bm = RegionBitmap::Create(dir_.path() + "/vol.dirty", kSize, 256 * 1024);
  ASSERT_TRUE(bm.ok()) << bm.status().message();
  std::mt19937_64 rng(42);
  for (int i = 0; i < 24; ++i) {
    const uint64_t len = (1 + rng() % 48) * 4096;
    const uint64_t off = (rng() % ((kSize - len) / 4096)) * 4096;
    ASSERT_TRUE((*bm)->MarkDurable(off, len).ok());  // before the write is acknowledged
    ASSERT_TRUE(WriteAt(*src, off, Random(len, 100 + i)).ok());
  }
  const uint64_t dirty = (*bm)->dirty_bytes();
  ASSERT_GT(dirty, 0u);
  ASSERT_LT(dirty, kSize / 4);
  ASSERT_FALSE(Cmp(Copy(a_, "vol", "a0"), Copy(b_, "vol", "b0")));

  // It returns: copy only the dirty regions.
  ClientBlockChannel s(*src), d(*dst);
  ResyncOptions o;
  o.chunk_bytes = 128 * 1024;
  o.max_in_flight = 8;
  Resync job(s, d, o);
  const uint64_t written_before = dst->counters().bytes_written;
  Status st = job.RunDirty(**bm);
  ASSERT_TRUE(st.ok()) << st.message();
  const ResyncProgress p = job.progress();
  EXPECT_EQ(p.total_bytes, dirty);
  EXPECT_EQ(p.copied_bytes, dirty);
  EXPECT_EQ(dst->counters().bytes_written - written_before, dirty);
  EXPECT_EQ((*bm)->dirty_bytes(), 0u);
  std::printf("dirty resync: %llu of %llu bytes copied in %.3f s\n",
              static_cast<unsigned long long>(p.copied_bytes),
              static_cast<unsigned long long>(kSize),
              std::chrono::duration<double>(p.elapsed).count());

  src->Close();
  dst->Close();
  EXPECT_TRUE(Cmp(Copy(a_, "vol", "a1"), Copy(b_, "vol", "b1")));
  // The cleared bitmap is durable: a reopen finds it clean.
  bm->reset();
  auto again = RegionBitmap::Open(dir_.path() + "/vol.dirty", kSize);
  ASSERT_TRUE(again.ok()) << again.status().message();
  EXPECT_EQ((*again)->dirty_bytes(), 0u);
}

TEST_F(ResyncReal, FullRebuildOfASparseVolumeSkipsHoles) {
  ASSERT_TRUE(a_.CreateVolume("sparse")) << a_.Log();
  ASSERT_TRUE(b_.CreateVolume("sparse")) << b_.Log();  // the new replica: fresh and thin
  auto src = Connect(a_.UnixEp(), "sparse", false, /*base_allocation=*/true);
  auto dst = Connect(b_.TlsEp(), "sparse", true);
  ASSERT_TRUE(src && dst);
  ASSERT_TRUE(src->export_properties().base_allocation);
  uint64_t data = 0;
  const std::vector<std::pair<uint64_t, uint64_t>> writes = {
      {0, 64 * 1024}, {5 * kMiB, 3 * kMiB}, {33 * kMiB + 4096, 8192}, {kSize - kMiB, kMiB}};
  for (size_t i = 0; i < writes.size(); ++i) {
    ASSERT_TRUE(WriteAt(*src, writes[i].first, Random(writes[i].second, 7 + i)).ok());
    data += writes[i].second;
  }
  // Our BLOCK_STATUS reads the same map as libnbd's nbdinfo.
  const auto map = OurMap(*src);
  EXPECT_EQ(map, NbdinfoMap("nbd+unix:///sparse?socket=" + a_.unix_nbd));
  EXPECT_GE(map.size(), 2 * writes.size() - 1);
  ClientBlockChannel s(*src), d(*dst);
  Resync job(s, d);
  Status st = job.RunFull();
  ASSERT_TRUE(st.ok()) << st.message();
  const ResyncProgress p = job.progress();
  std::printf("full rebuild: %llu copied, %llu skipped of %llu\n",
              static_cast<unsigned long long>(p.copied_bytes),
              static_cast<unsigned long long>(p.skipped_bytes),
              static_cast<unsigned long long>(kSize));
  EXPECT_EQ(p.total_bytes, kSize);
  EXPECT_EQ(p.copied_bytes + p.skipped_bytes, kSize);
  // The pool's map is in file-system blocks: data may round out a little, never be missed.
  EXPECT_GE(p.copied_bytes, data);
  EXPECT_LE(p.copied_bytes, data + writes.size() * 2 * kMiB);
  EXPECT_GE(p.skipped_bytes, kSize / 2);
  EXPECT_EQ(dst->counters().bytes_written, p.copied_bytes);
  src->Close();
  dst->Close();
  EXPECT_TRUE(Cmp(Copy(a_, "sparse", "a"), Copy(b_, "sparse", "b")));
}

TEST_F(ResyncReal, FullRebuildFromQemuNbdUsesItsBlockStatus) {
  if (!Have("qemu-nbd")) GTEST_SKIP() << "needs qemu-nbd";
  const std::string img = dir_.path() + "/q.img";
  std::ofstream(img).close();
  fs::resize_file(img, kSize);
  const std::string sock = dir_.path() + "/q.sock";
  Proc q;
  ASSERT_TRUE(q.Start({"qemu-nbd", "--format=raw", "-x", "vol", "--persistent", "--shared=4",
                       "--socket=" + sock, img},
                      dir_.path() + "/qemu-nbd.log"));
  Endpoint qep;
  qep.kind = Endpoint::Kind::kUnix;
  qep.path = sock;
  ASSERT_TRUE(test::WaitUntil([&] { return CanConnect(qep); }, 20s))
      << ReadFile(dir_.path() + "/qemu-nbd.log");
  auto src = Connect(qep, "vol", false, /*base_allocation=*/true);
  ASSERT_TRUE(src);
  ASSERT_TRUE(src->export_properties().base_allocation);
  ASSERT_TRUE(WriteAt(*src, 10 * kMiB, Random(2 * kMiB, 3)).ok());
  ASSERT_TRUE(WriteAt(*src, 50 * kMiB, Random(kMiB, 4)).ok());
  const auto map = OurMap(*src);
  EXPECT_EQ(map, NbdinfoMap("nbd+unix:///vol?socket=" + sock));
  EXPECT_GE(map.size(), 4u);
  ASSERT_TRUE(b_.CreateVolume("fromq")) << b_.Log();
  auto dst = Connect(b_.TlsEp(), "fromq", true);
  ASSERT_TRUE(dst);
  ClientBlockChannel s(*src), d(*dst);
  Resync job(s, d);
  Status st = job.RunFull();
  ASSERT_TRUE(st.ok()) << st.message();
  const ResyncProgress p = job.progress();
  EXPECT_GE(p.copied_bytes, 3 * kMiB);
  EXPECT_LE(p.copied_bytes, 5 * kMiB);
  EXPECT_EQ(p.copied_bytes + p.skipped_bytes, kSize);
  src->Close();
  dst->Close();
  q.Stop();
  EXPECT_TRUE(Cmp(img, Copy(b_, "fromq", "b")));
}

}  // namespace
}  // namespace nbdcsi::replica
