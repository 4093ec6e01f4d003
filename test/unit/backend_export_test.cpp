// Backend exports (datapath/engine/backend.h, issue 16's replicated target) through the real
// engine: NbdFrontend on a Unix socket and its io_uring workers, with an in-memory ExportBackend
// behind the seam (test/support/memory_backend.h) that completes inline, from its own thread, or
// only when the test releases it. Clients: the project's ReplicaClient (what a target's peers
// use) and the raw client of engine_test, for what ReplicaClient never sends (BLOCK_STATUS,
// FAST_ZERO, a huge TRIM, disconnects mid-request) and for the kernel's socketpairs.
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <future>
#include <latch>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "common/endpoint.h"
#include "datapath/engine/export_name.h"
#include "datapath/engine/frontend.h"
#include "datapath/nbd/codec.h"
#include "datapath/nbd/proto.h"
#include "datapath/pool/pool.h"
#include "datapath/replica/client.h"
#include "test/support/engine_checks.h"
#include "test/support/memory_backend.h"
#include "test/support/nbd_bytes.h"
#include "test/support/nbd_raw_client.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using test::Bytes;
using test::Client;
using test::MemoryBackend;
using test::Pattern;
using test::Reply;
using Op = BackendRequest::Op;

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr int kSlowdown = 10;
#else
constexpr int kSlowdown = 1;
#endif

constexpr uint64_t kMiB = 1024 * 1024;
// NBD error values on the wire (spec "Error values"), spelled out so the test does not depend on
// the mapping it checks.
constexpr uint32_t kWireEPERM = 1, kWireEIO = 5, kWireENOSPC = 28, kWireENOTSUP = 95;

// ---- export names ------------------------------------------------------------------------------

TEST(BackendExportName, TargetSuffixParsesAndRefusesCombinations) {
  auto t = ParseExportName("pvc-1@target");
  ASSERT_TRUE(t.ok()) << t.status().message();
  EXPECT_EQ(t->volume, "pvc-1");
  EXPECT_TRUE(t->target);
  EXPECT_FALSE(t->growable);
  EXPECT_EQ(t->epoch, 0u);
  auto plain = ParseExportName("pvc-1");
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->target);

  const std::pair<const char*, const char*> bad[] = {
      {"v@target@epoch=3", "cannot be combined"},
      {"v@epoch=3@target", "cannot be combined"},
      {"v@target@grow", "cannot be combined"},
      {"v@grow@target", "cannot be combined"},
      {"v@target@target", "cannot be combined"},
      {"v@targetx", "unknown suffix"},
      {"v@Target", "unknown suffix"},
      {"@target", "no volume"},
  };
  for (const auto& [in, why] : bad) {
    auto r = ParseExportName(in);
    ASSERT_FALSE(r.ok()) << in;
    EXPECT_EQ(r.status().code(), EINVAL) << in;
    EXPECT_NE(r.status().message().find(why), std::string::npos)
        << in << ": " << r.status().message();
  }
}

// ---- the engine with backend exports ------------------------------------------------------------

class BackendExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("backend_export_test")) << tmp_.error();
    ASSERT_TRUE(test::OpenPool(test::PoolIn(tmp_.path()), &pool_));
    sock_ = tmp_.path() + "/nbd.sock";
  }
  void TearDown() override {
    if (frontend_) test::ExpectEngineRulesKept(*frontend_);
    frontend_.reset();
    pool_.reset();
    tmp_.Remove();
  }

  void Start(unsigned workers = 2) {
    frontend_ = std::make_unique<NbdFrontend>(*pool_, FrontendOptions{workers, 30});
    Endpoint ep;
    ep.kind = Endpoint::Kind::kUnix;
    ep.path = sock_;
    ASSERT_TRUE(frontend_->Listen(ep).ok());
    ASSERT_TRUE(frontend_->Start().ok());
  }
  std::shared_ptr<MemoryBackend> AddBackend(const std::string& name, uint64_t size,
                                            MemoryBackend::Mode mode) {
    auto b = std::make_shared<MemoryBackend>(name, size, mode);
    Status st = frontend_->AddBackendExport(b);
    EXPECT_TRUE(st.ok()) << st.message();
    return b;
  }
  StatusOr<std::unique_ptr<replica::ReplicaClient>> Replica(const std::string& name,
                                                            int connections = 1) {
    replica::ClientOptions o;
    o.endpoint.kind = Endpoint::Kind::kUnix;
    o.endpoint.path = sock_;
    o.export_name = name;
    o.connections = connections;
    return replica::ReplicaClient::Connect(o);
  }
  std::unique_ptr<Client> Raw(const std::string& name, bool structured = true, bool meta = false) {
    auto c = Client::Connect(sock_, name, structured, meta);
    EXPECT_NE(c, nullptr);
    return c;
  }
  EngineCounters Counters() { return frontend_->counters(); }

  test::TempDir tmp_;
  std::string sock_;
  std::unique_ptr<Pool> pool_;
  std::unique_ptr<NbdFrontend> frontend_;
};

// Blocking wrappers over ReplicaClient's callbacks.
Status Wait(const std::function<Status(replica::Callback)>& submit) {
  std::promise<Status> p;
  auto f = p.get_future();
  Status st = submit([&p](const Status& s) { p.set_value(s); });
  if (!st.ok()) return st;
  if (f.wait_for(seconds(10) * kSlowdown) != std::future_status::ready)
    return Error(ETIMEDOUT, "no completion");
  return f.get();
}

class BackendModeTest : public BackendExportTest,
                        public ::testing::WithParamInterface<MemoryBackend::Mode> {};

// Many requests in flight on several connections, each completed inline inside Submit or from
// the backend's own thread: what was written reads back, through the engine and in the backend.
TEST_P(BackendModeTest, ReadsAndWritesRoundTripWithManyInFlight) {
  Start();
  auto backend = AddBackend("vol-a", 16 * kMiB, GetParam());
  auto client = Replica("vol-a@target", 4);
  ASSERT_TRUE(client.ok()) << client.status().message();
  auto& c = **client;
  EXPECT_EQ(c.export_properties().size, 16 * kMiB);
  EXPECT_FALSE(c.export_properties().read_only());
  EXPECT_TRUE(c.export_properties().can_multi_conn());
  EXPECT_TRUE(c.export_properties().can_trim());
  EXPECT_TRUE(c.export_properties().can_write_zeroes());
  EXPECT_TRUE(c.export_properties().flags & nbd::kFlagSendFlush);
  EXPECT_TRUE(c.export_properties().flags & nbd::kFlagSendFua);

  // 256 writes of 64 KiB to distinct places, all submitted before any is awaited.
  constexpr int kN = 256;
  constexpr size_t kLen = 64 * 1024;
  std::vector<Bytes> data(kN);
  std::vector<std::promise<Status>> done(kN);
  for (int i = 0; i < kN; ++i) {
    data[i] = Pattern(kLen, 100 + i);
    ASSERT_TRUE(c.Write(i * kLen, data[i], i % 3 == 0, [&done, i](const Status& s) {
                   done[i].set_value(s);
                 }).ok());
  }
  for (int i = 0; i < kN; ++i) {
    auto f = done[i].get_future();
    ASSERT_EQ(f.wait_for(seconds(10) * kSlowdown), std::future_status::ready) << i;
    EXPECT_TRUE(f.get().ok()) << i;
  }
  EXPECT_TRUE(Wait([&](auto cb) { return c.Flush(cb); }).ok());
  EXPECT_GE(backend->flushes(), 1u);

  std::vector<Bytes> back(kN, Bytes(kLen));
  std::vector<std::promise<Status>> read(kN);
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(
        c.Read(i * kLen, back[i], [&read, i](const Status& s) { read[i].set_value(s); }).ok());
  }
  for (int i = 0; i < kN; ++i) {
    auto f = read[i].get_future();
    ASSERT_EQ(f.wait_for(seconds(10) * kSlowdown), std::future_status::ready) << i;
    EXPECT_TRUE(f.get().ok()) << i;
    EXPECT_EQ(back[i], data[i]) << "read " << i;
    EXPECT_EQ(backend->Contents(i * kLen, kLen), data[i]) << "backend " << i;
  }

  // FUA reached the backend on the writes that carried it, and only there.
  size_t fua = 0, writes = 0;
  for (const auto& r : backend->log()) {
    if (r.op != Op::kWrite) continue;
    ++writes;
    EXPECT_EQ(r.length, kLen) << "a write was split";
    if (r.fua) ++fua;
  }
  EXPECT_EQ(writes, size_t{kN});
  EXPECT_EQ(fua, size_t{(kN + 2) / 3});

  // TRIM and WRITE_ZEROES (with NO_HOLE) reach the backend and zero what they cover.
  EXPECT_TRUE(Wait([&](auto cb) { return c.Trim(0, kLen, false, cb); }).ok());
  EXPECT_TRUE(Wait([&](auto cb) { return c.WriteZeroes(kLen, kLen, true, true, cb); }).ok());
  EXPECT_EQ(backend->Contents(0, 2 * kLen), Bytes(2 * kLen, 0));
  const auto log = backend->log();
  ASSERT_GE(log.size(), 2u);
  EXPECT_EQ(log[log.size() - 2].op, Op::kTrim);
  EXPECT_EQ(log.back().op, Op::kWriteZeroes);
  EXPECT_TRUE(log.back().no_hole);
  EXPECT_TRUE(log.back().fua);
  EXPECT_EQ(Counters().backend_dropped, 0u);
}

INSTANTIATE_TEST_SUITE_P(Completion, BackendModeTest,
                         ::testing::Values(MemoryBackend::Mode::kInline,
                                           MemoryBackend::Mode::kThread),
                         [](const auto& info) {
                           return info.param == MemoryBackend::Mode::kInline ? "InlineInSubmit"
                                                                             : "FromAnotherThread";
                         });

// The backend's errno reaches the client as the NBD error of the same meaning, and the
// connection stays up for the next request.
TEST_F(BackendExportTest, BackendErrorsReachTheClient) {
  Start(1);
  auto backend = AddBackend("vol-e", 4 * kMiB, MemoryBackend::Mode::kThread);
  auto raw = Raw("vol-e@target");
  ASSERT_NE(raw, nullptr);
  const Bytes d = Pattern(4096, 1);
  const std::pair<int, uint32_t> cases[] = {
      {EIO, kWireEIO}, {ENOSPC, kWireENOSPC}, {EPERM, kWireEPERM}};
  for (const auto& [err, wire] : cases) {
    backend->Fail(Op::kWrite, err);
    backend->Fail(Op::kRead, err);
    backend->Fail(Op::kFlush, err);
    EXPECT_EQ(raw->Call(nbd::kCmdWrite, 0, 0, 4096, d).error, wire) << strerror(err);
    EXPECT_EQ(raw->Call(nbd::kCmdRead, 0, 0, 4096).error, wire) << strerror(err);
    EXPECT_EQ(raw->Call(nbd::kCmdFlush, 0, 0, 0).error, wire) << strerror(err);
  }
  backend->Fail(Op::kWrite, 0);
  backend->Fail(Op::kRead, 0);
  raw->Write(8192, d);
  EXPECT_EQ(raw->Read(8192, 4096), d);

  // The same through ReplicaClient: the errno comes back as the Status code.
  auto client = Replica("vol-e@target");
  ASSERT_TRUE(client.ok()) << client.status().message();
  for (int err : {EIO, ENOSPC, EPERM}) {
    backend->Fail(Op::kWrite, err);
    Status st = Wait([&](auto cb) { return (*client)->Write(0, d, false, cb); });
    EXPECT_EQ(st.code(), err) << st.message();
  }
}

// What only a raw client asks: BLOCK_STATUS (one data extent), FAST_ZERO (ENOTSUP at once,
// nothing reaches the backend), a TRIM longer than the maximum block size (handed to the backend
// in steps of at most that size), and simple replies.
TEST_F(BackendExportTest, BlockStatusFastZeroLongTrimAndSimpleReplies) {
  Start(1);
  auto backend = AddBackend("vol-r", 64 * kMiB, MemoryBackend::Mode::kInline);
  auto raw = Raw("vol-r@target", /*structured=*/true, /*meta=*/true);
  ASSERT_NE(raw, nullptr);
  EXPECT_EQ(raw->export_size(), 64 * kMiB);

  Reply bs = raw->Call(nbd::kCmdBlockStatus, 0, 4096, 8 * kMiB);
  EXPECT_EQ(bs.error, 0u);
  ASSERT_EQ(bs.extents.size(), 1u);
  EXPECT_EQ(bs.extents[0].length, 8 * kMiB);
  EXPECT_EQ(bs.extents[0].flags, 0u);

  const size_t before = backend->log().size();
  Reply fz = raw->Call(nbd::kCmdWriteZeroes, nbd::kCmdFlagFastZero, 0, 4096);
  EXPECT_EQ(fz.error, kWireENOTSUP);
  EXPECT_EQ(backend->log().size(), before);

  const Bytes d = Pattern(kMiB, 9);
  for (uint64_t off = 0; off < 64 * kMiB; off += kMiB) raw->Write(off, d);
  Reply trim = raw->Call(nbd::kCmdTrim, nbd::kCmdFlagFua, 4096, 64 * kMiB - 8192);
  EXPECT_EQ(trim.error, 0u);
  uint64_t covered = 0;
  uint64_t next = 4096;
  for (const auto& r : backend->log()) {
    if (r.op != Op::kTrim) continue;
    EXPECT_LE(r.length, nbd::kMaxBlock);
    EXPECT_EQ(r.offset, next) << "steps in order, without gaps";
    EXPECT_TRUE(r.fua);
    next += r.length;
    covered += r.length;
  }
  EXPECT_EQ(covered, 64 * kMiB - 8192);
  EXPECT_EQ(raw->Read(0, 4096), Bytes(d.begin(), d.begin() + 4096));
  EXPECT_EQ(raw->Read(4096, 4096), Bytes(4096, 0));
  EXPECT_EQ(raw->Read(64 * kMiB - 4096, 4096), Bytes(d.end() - 4096, d.end()));

  // Simple replies (no structured replies negotiated).
  auto simple = Raw("vol-r@target", /*structured=*/false);
  ASSERT_NE(simple, nullptr);
  simple->Write(0, Pattern(512, 3));
  EXPECT_EQ(simple->Read(0, 512), Pattern(512, 3));
  // Out of range: refused by the engine before the backend sees it.
  EXPECT_NE(simple->Call(nbd::kCmdWrite, 0, 64 * kMiB, 512, Pattern(512, 3)).error, 0u);
}

// The client goes away while its requests are held by the backend: the connection is aborted
// but waits for them; their late completions release the slots and are dropped (counted), never
// delivered, and nothing stale is seen (TearDown). Under ASan/TSan this is the use-after-free
// and race check of the done path.
TEST_F(BackendExportTest, LateCompletionsAfterTheClientLeftAreDropped) {
  Start(1);
  auto backend = AddBackend("vol-l", 4 * kMiB, MemoryBackend::Mode::kHold);
  auto raw = Raw("vol-l@target");
  ASSERT_NE(raw, nullptr);
  Bytes batch;
  for (int i = 0; i < 8; ++i) {
    const Bytes r = i % 2
                        ? test::NbdRequest(nbd::kCmdRead, 0, i, i * 4096, 4096)
                        : test::NbdRequest(nbd::kCmdWrite, 0, i, i * 4096, 4096, Pattern(4096, i));
    test::Append(batch, r);
  }
  raw->Send(batch);
  ASSERT_TRUE(test::WaitUntil([&] { return backend->held() == 8; }, seconds(5) * kSlowdown));
  raw.reset();  // the client leaves with 8 requests in flight
  ASSERT_TRUE(test::WaitUntil([&] { return Counters().draining_connections == 1; },
                              seconds(5) * kSlowdown));
  // Completed from another thread than the worker's, one by one.
  std::thread late([&] {
    for (int i = 0; i < 8; ++i) {
      backend->Release(1);
      std::this_thread::sleep_for(milliseconds(2));  // the stimulus: completions spread out
    }
  });
  late.join();
  ASSERT_TRUE(test::WaitUntil([&] { return Counters().draining_connections == 0; },
                              seconds(5) * kSlowdown));
  EXPECT_EQ(Counters().backend_dropped, 8u);
  // The export still serves new clients.
  auto again = Raw("vol-l@target");
  ASSERT_NE(again, nullptr);
  std::thread release([&] {
    test::WaitUntil([&] { return backend->held() == 1; }, seconds(5) * kSlowdown);
    backend->Release();
  });
  again->Write(0, Pattern(4096, 77));
  release.join();
}

// RemoveBackendExport with requests in flight: it waits for their done callbacks, the
// connections close, new handshakes are refused, and the engine lets go of the backend.
TEST_F(BackendExportTest, RemoveWaitsForInFlightRequestsAndClosesConnections) {
  Start(2);
  auto backend = AddBackend("vol-x", 4 * kMiB, MemoryBackend::Mode::kHold);
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(Raw("vol-x@target"));
    ASSERT_NE(clients.back(), nullptr);
    clients.back()->Send(test::NbdRequest(nbd::kCmdWrite, 0, 1, i * 4096, 4096, Pattern(4096, i)));
  }
  ASSERT_TRUE(test::WaitUntil([&] { return backend->held() == 3; }, seconds(5) * kSlowdown));

  auto removal = std::async(std::launch::async, [&] {
    return frontend_->RemoveBackendExport("vol-x", seconds(20) * kSlowdown);
  });
  EXPECT_EQ(removal.wait_for(milliseconds(300)), std::future_status::timeout)
      << "returned with requests still at the backend";
  // Gone for new clients at once.
  EXPECT_FALSE(Replica("vol-x@target").ok());
  backend->Release();
  ASSERT_EQ(removal.wait_for(seconds(10) * kSlowdown), std::future_status::ready);
  Status st = removal.get();
  EXPECT_TRUE(st.ok()) << st.message();
  for (auto& c : clients) EXPECT_TRUE(c->ClosedWithin(2000 * kSlowdown));
  EXPECT_EQ(backend.use_count(), 1) << "the engine still holds the backend";
  EXPECT_EQ(Counters().backend_dropped, 3u);
  EXPECT_EQ(Counters().draining_connections, 0u);

  EXPECT_EQ(frontend_->RemoveBackendExport("vol-x").code(), ENOENT);
  // The name is free again.
  auto b2 = AddBackend("vol-x", kMiB, MemoryBackend::Mode::kInline);
  auto c2 = Replica("vol-x@target");
  ASSERT_TRUE(c2.ok()) << c2.status().message();
  EXPECT_EQ((*c2)->export_properties().size, kMiB);
}

// A backend that never calls done: the removal gives up after its timeout with ETIMEDOUT, and
// the connection is freed when the callbacks do come.
TEST_F(BackendExportTest, RemoveTimesOutWhileTheBackendHoldsRequests) {
  Start(1);
  auto backend = AddBackend("vol-t", kMiB, MemoryBackend::Mode::kHold);
  auto raw = Raw("vol-t@target");
  ASSERT_NE(raw, nullptr);
  raw->Send(test::NbdRequest(nbd::kCmdRead, 0, 1, 0, 4096));
  ASSERT_TRUE(test::WaitUntil([&] { return backend->held() == 1; }, seconds(5) * kSlowdown));
  Status st = frontend_->RemoveBackendExport("vol-t", milliseconds(200));
  EXPECT_EQ(st.code(), ETIMEDOUT) << st.message();
  EXPECT_TRUE(raw->ClosedWithin(2000 * kSlowdown));
  EXPECT_EQ(Counters().draining_connections, 1u);
  backend->Release();
  ASSERT_TRUE(test::WaitUntil([&] { return backend.use_count() == 1; }, seconds(5) * kSlowdown));
  EXPECT_EQ(Counters().draining_connections, 0u);
  EXPECT_EQ(frontend_->RemoveBackendExport("vol-t").code(), ENOENT);
}

// The kernel's way in: socketpairs straight into the transmission phase, simple replies.
TEST_F(BackendExportTest, ServeSocketPairsOnATargetExport) {
  Start(2);
  auto backend = AddBackend("vol-k", 8 * kMiB, MemoryBackend::Mode::kThread);
  auto fds = frontend_->ServeSocketPairs("vol-k@target", 2);
  ASSERT_TRUE(fds.ok()) << fds.status().message();
  ASSERT_EQ(fds->size(), 2u);
  auto a = Client::Adopt((*fds)[0]);
  auto b = Client::Adopt((*fds)[1]);
  const Bytes d = Pattern(128 * 1024, 4);
  a->Write(kMiB, d, nbd::kCmdFlagFua);
  EXPECT_EQ(a->Call(nbd::kCmdFlush, 0, 0, 0).error, 0u);
  EXPECT_EQ(b->Read(kMiB, 128 * 1024), d) << "written on one socket, read on the other";
  EXPECT_EQ(backend->Contents(kMiB, d.size()), d);
  EXPECT_EQ(b->Call(nbd::kCmdRead, 0, 8 * kMiB, 4096).error, 22u) << "past the end: EINVAL";

  EXPECT_EQ(frontend_->ServeSocketPairs("nope@target", 1).status().code(), ENOENT);
  a.reset();
  b.reset();
  EXPECT_TRUE(frontend_->RemoveBackendExport("vol-k").ok());
}

// Registration rules, unknown targets, and pool volumes beside a target of the same name.
TEST_F(BackendExportTest, RegistrationUnknownTargetsAndPoolVolumesUnaffected) {
  Start(1);
  EXPECT_EQ(frontend_->AddBackendExport(nullptr).code(), EINVAL);
  EXPECT_EQ(frontend_->AddBackendExport(std::make_shared<MemoryBackend>("Bad/Name", kMiB)).code(),
            EINVAL);
  auto backend = AddBackend("shared", 2 * kMiB, MemoryBackend::Mode::kInline);
  EXPECT_EQ(frontend_->AddBackendExport(std::make_shared<MemoryBackend>("shared", kMiB)).code(),
            EEXIST);

  auto unknown = Replica("nope@target");
  EXPECT_FALSE(unknown.ok());
  auto bad = Replica("shared@target@grow");
  EXPECT_FALSE(bad.ok());

  // A pool volume named like the backend: "shared" is the pool's, "shared@target" the backend's.
  ASSERT_TRUE(pool_->Create("shared", 4 * kMiB, {}, false).ok());
  auto vol = Raw("shared");
  auto tgt = Raw("shared@target");
  ASSERT_NE(vol, nullptr);
  ASSERT_NE(tgt, nullptr);
  EXPECT_EQ(vol->export_size(), 4 * kMiB);
  EXPECT_EQ(tgt->export_size(), 2 * kMiB);
  vol->Write(0, Pattern(4096, 1));
  tgt->Write(0, Pattern(4096, 2));
  EXPECT_EQ(vol->Read(0, 4096), Pattern(4096, 1));
  EXPECT_EQ(tgt->Read(0, 4096), Pattern(4096, 2));
  EXPECT_EQ(backend->Contents(0, 4096), Pattern(4096, 2));
  // The pool's statistics saw only the pool connection's requests.
  auto stats = pool_->Acquire("shared")->stats().Snapshot();
  EXPECT_EQ(stats.connections, 1u);
  EXPECT_EQ(stats.ops[static_cast<size_t>(OpKind::kWrite)], 1u);
  EXPECT_EQ(stats.ops[static_cast<size_t>(OpKind::kRead)], 1u);
  vol.reset();
  tgt.reset();
  EXPECT_TRUE(frontend_->RemoveBackendExport("shared").ok());
}

}  // namespace
}  // namespace nbdcsi::datapath
