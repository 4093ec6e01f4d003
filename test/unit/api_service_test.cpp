// The management API end to end: a real Pool in a temp dir, StartApiServer on a real unix socket,
// every RPC driven through the generated stub.
#include "datapath/api/service.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <filesystem>
#include <limits>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "datapath/api/datapath.grpc.pb.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;

class ApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/api_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    OpenPoolAndServe();
  }
  // (Re)opens the pool from disk and serves it, as a daemon restart does.
  void OpenPoolAndServe() {
    stub_.reset();
    server_.reset();
    pool_.reset();
    PoolOptions opts;
    opts.dir = dir_ + "/pool";
    opts.capacity_bytes = 10 * kGiB;  // deterministic, independent of the host's /tmp
    opts.overcommit_ratio = 2.0;
    auto pool = Pool::Open(opts);
    ASSERT_TRUE(pool.ok()) << pool.status().message();
    pool_ = std::move(*pool);
    sock_ = dir_ + "/api.sock";
    auto server = StartApiServer(*pool_, "unix://" + sock_);
    ASSERT_TRUE(server.ok()) << server.status().message();
    server_ = std::move(*server);
    stub_ = v1::Datapath::NewStub(
        grpc::CreateChannel("unix://" + sock_, grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    stub_.reset();
    server_.reset();
    pool_.reset();
    fs::remove_all(dir_);
  }

  std::unique_ptr<grpc::ClientContext> Ctx() {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return c;
  }

  grpc::Status Create(const std::string& name, uint64_t size, v1::Volume* out = nullptr,
                      v1::QosLimits qos = {}, bool ro = false) {
    v1::CreateVolumeRequest req;
    req.set_name(name);
    req.set_size_bytes(size);
    *req.mutable_qos() = qos;
    req.set_read_only(ro);
    v1::CreateVolumeResponse resp;
    auto s = stub_->CreateVolume(Ctx().get(), req, &resp);
    if (out) *out = resp.volume();
    return s;
  }
  grpc::Status Get(const std::string& name, v1::Volume* out = nullptr) {
    v1::GetVolumeRequest req;
    req.set_name(name);
    v1::GetVolumeResponse resp;
    auto s = stub_->GetVolume(Ctx().get(), req, &resp);
    if (out) *out = resp.volume();
    return s;
  }
  grpc::Status Delete(const std::string& name) {
    v1::DeleteVolumeRequest req;
    req.set_name(name);
    v1::DeleteVolumeResponse resp;
    return stub_->DeleteVolume(Ctx().get(), req, &resp);
  }
  grpc::Status Resize(const std::string& name, uint64_t size, v1::Volume* out = nullptr) {
    v1::ResizeVolumeRequest req;
    req.set_name(name);
    req.set_size_bytes(size);
    v1::ResizeVolumeResponse resp;
    auto s = stub_->ResizeVolume(Ctx().get(), req, &resp);
    if (out) *out = resp.volume();
    return s;
  }
  grpc::Status SetQos(const v1::SetQosRequest& req, v1::Volume* out = nullptr) {
    v1::SetQosResponse resp;
    auto s = stub_->SetQos(Ctx().get(), req, &resp);
    if (out) *out = resp.volume();
    return s;
  }

  std::string dir_, sock_;
  std::unique_ptr<Pool> pool_;
  std::unique_ptr<ApiServer> server_;
  std::unique_ptr<v1::Datapath::Stub> stub_;
};

TEST_F(ApiTest, SocketIsMode0600) {
  struct stat st{};
  ASSERT_EQ(stat(sock_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
}

TEST_F(ApiTest, SecondServerOnLiveSocketIsRefused) {
  auto second = StartApiServer(*pool_, "unix://" + sock_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), EADDRINUSE);
  EXPECT_NE(second.status().message().find("in use by a running process"), std::string::npos);
  EXPECT_TRUE(Get("nope").error_code() == grpc::StatusCode::NOT_FOUND) << "first server still up";
}

TEST_F(ApiTest, StaleSocketIsReplaced) {
  server_.reset();
  // Leave a dead socket file behind, as a crashed daemon would.
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, sock_.c_str(), sizeof(a.sun_path) - 1);
  unlink(sock_.c_str());
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  close(fd);
  auto server = StartApiServer(*pool_, "unix://" + sock_);
  ASSERT_TRUE(server.ok()) << server.status().message();
  server_ = std::move(*server);
  stub_ = v1::Datapath::NewStub(
      grpc::CreateChannel("unix://" + sock_, grpc::InsecureChannelCredentials()));
  EXPECT_TRUE(Create("after-restart", kMiB).ok());
}

TEST_F(ApiTest, StartRejectsBadEndpoints) {
  EXPECT_EQ(StartApiServer(*pool_, "unix://relative.sock").status().code(), EINVAL);
  EXPECT_EQ(StartApiServer(*pool_, "unix:///nonexistent-dir-xyz/api.sock").status().code(),
            ENOENT);
  std::string file = dir_ + "/regular";
  { FILE* f = fopen(file.c_str(), "w"); fclose(f); }
  EXPECT_EQ(StartApiServer(*pool_, "unix://" + file).status().code(), EEXIST);
}

TEST_F(ApiTest, CreateGetListDelete) {
  v1::QosLimits qos;
  qos.set_max_iops(500);
  qos.set_bps_per_gib(10 * kMiB);
  v1::Volume v;
  auto s = Create("vol-a", 2 * kGiB, &v, qos);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(v.name(), "vol-a");
  EXPECT_EQ(v.size_bytes(), 2 * kGiB);
  EXPECT_EQ(v.qos().max_iops(), 500u);
  EXPECT_EQ(v.effective_qos().iops(), 500u);
  EXPECT_EQ(v.effective_qos().bps(), 20 * kMiB) << "per-GiB resolved for 2 GiB";
  EXPECT_GT(v.created_unix_ns(), 0);
  EXPECT_FALSE(v.data_path().empty());
  EXPECT_EQ(v.open_connections(), 0u);

  ASSERT_TRUE(Create("vol-b", kMiB, nullptr, {}, true).ok());

  v1::Volume got;
  ASSERT_TRUE(Get("vol-b", &got).ok());
  EXPECT_TRUE(got.read_only());
  EXPECT_EQ(got.size_bytes(), kMiB);

  v1::ListVolumesResponse list;
  ASSERT_TRUE(stub_->ListVolumes(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.volumes_size(), 2);
  EXPECT_EQ(list.volumes(0).name(), "vol-a");
  EXPECT_EQ(list.volumes(1).name(), "vol-b");

  ASSERT_TRUE(Delete("vol-a").ok());
  EXPECT_EQ(Get("vol-a").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Delete("vol-a").error_code(), grpc::StatusCode::NOT_FOUND);
  list.Clear();
  ASSERT_TRUE(stub_->ListVolumes(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.volumes_size(), 1);
}

TEST_F(ApiTest, CreateIsIdempotentAndConflictsAreAlreadyExists) {
  v1::Volume first, second;
  ASSERT_TRUE(Create("idem", 4 * kMiB, &first).ok());
  auto s = Create("idem", 4 * kMiB, &second);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(first.created_unix_ns(), second.created_unix_ns()) << "the same volume, not a new one";
  s = Create("idem", 8 * kMiB);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_NE(s.error_message().find("idem"), std::string::npos) << s.error_message();
  EXPECT_EQ(Create("idem", 4 * kMiB, nullptr, {}, true).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
}

TEST_F(ApiTest, InvalidArguments) {
  struct Case {
    std::string name;
    uint64_t size;
    const char* says;
  };
  const Case cases[] = {
      {"", kMiB, "empty"},
      {"../etc", kMiB, "'/'"},
      {".hidden", kMiB, "'.'"},
      {"-x", kMiB, "'-'"},
      {"a b", kMiB, "invalid"},
      {std::string(129, 'a'), kMiB, "129 bytes"},
      {"ok", 0, "greater than 0"},
      {"ok", 1000, "multiple of 4096"},
      {"ok", std::numeric_limits<uint64_t>::max() - 4095, "maximum file size"},
  };
  for (const auto& c : cases) {
    auto s = Create(c.name, c.size);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name << " " << c.size;
    EXPECT_NE(s.error_message().find(c.says), std::string::npos)
        << c.name << ": " << s.error_message();
  }
  v1::QosLimits qos;
  qos.set_burst_ms(60001);
  EXPECT_EQ(Create("ok", kMiB, nullptr, qos).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  qos.Clear();
  qos.set_iops_per_gib(std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(Create("ok", 2 * kGiB, nullptr, qos).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Get("ok").error_code(), grpc::StatusCode::NOT_FOUND) << "nothing was created";
  EXPECT_EQ(Get("a/b").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Delete("").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Resize("", kMiB).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::GetVolumeStatsRequest sreq;
  v1::GetVolumeStatsResponse sresp;
  EXPECT_EQ(stub_->GetVolumeStats(Ctx().get(), sreq, &sresp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  v1::SetQosRequest qreq;
  qreq.set_name("x");
  EXPECT_EQ(SetQos(qreq).error_code(), grpc::StatusCode::INVALID_ARGUMENT) << "no change given";
}

TEST_F(ApiTest, ResizeGrowsAndRefusesShrink) {
  ASSERT_TRUE(Create("r", 4 * kMiB).ok());
  v1::Volume v;
  auto s = Resize("r", 8 * kMiB, &v);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(v.size_bytes(), 8 * kMiB);
  EXPECT_TRUE(Resize("r", 8 * kMiB).ok()) << "same size is a no-op";
  s = Resize("r", 4 * kMiB);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("shrink"), std::string::npos) << s.error_message();
  EXPECT_EQ(Resize("r", 0).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Resize("missing", 8 * kMiB).error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(Get("r", &v).ok());
  EXPECT_EQ(v.size_bytes(), 8 * kMiB);
}

TEST_F(ApiTest, OvercommitLimitIsResourceExhausted) {
  // capacity 10 GiB x overcommit 2 = 20 GiB.
  ASSERT_TRUE(Create("big", 15 * kGiB).ok());
  auto s = Create("too-much", 6 * kGiB);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(s.error_message().find("too-much"), std::string::npos) << s.error_message();
  EXPECT_EQ(Resize("big", 21 * kGiB).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(Get("too-much").error_code(), grpc::StatusCode::NOT_FOUND);

  v1::GetPoolInfoResponse info;
  ASSERT_TRUE(stub_->GetPoolInfo(Ctx().get(), {}, &info).ok());
  EXPECT_EQ(info.capacity_bytes(), 10 * kGiB);
  EXPECT_EQ(info.provisioned_bytes(), 15 * kGiB);
  EXPECT_EQ(info.provisionable_bytes(), 5 * kGiB);
  EXPECT_DOUBLE_EQ(info.overcommit_ratio(), 2.0);
  EXPECT_EQ(info.volumes(), 1u);
  EXPECT_EQ(info.dir(), dir_ + "/pool");
  EXPECT_FALSE(info.fs_type().empty());
  EXPECT_EQ(info.cleaned_orphans_size(), 0);
}

TEST_F(ApiTest, SetQosIsLiveAndPatchKeepsOtherLimits) {
  v1::QosLimits qos;
  qos.set_max_iops(100);
  qos.set_max_write_bps(50 * kMiB);
  ASSERT_TRUE(Create("q", kGiB, nullptr, qos).ok());

  v1::SetQosRequest req;
  req.set_name("q");
  req.mutable_patch()->set_max_iops(200);
  req.mutable_patch()->set_burst_ms(250);
  v1::Volume v;
  auto s = SetQos(req, &v);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(v.qos().max_iops(), 200u);
  EXPECT_EQ(v.qos().max_write_bps(), 50 * kMiB) << "not in the patch: kept";
  ASSERT_TRUE(Get("q", &v).ok());
  EXPECT_EQ(v.qos().max_iops(), 200u);
  EXPECT_EQ(v.effective_qos().iops(), 200u);
  EXPECT_EQ(v.effective_qos().burst_ms(), 250u);
  // The live throttle, not only the metadata, has the new limits.
  auto vol = pool_->Acquire("q");
  ASSERT_NE(vol, nullptr);
  EXPECT_EQ(vol->throttle().limits().max_iops, 200u);
  vol.reset();

  // Patch with 0 removes one limit.
  req.Clear();
  req.set_name("q");
  req.mutable_patch()->set_max_write_bps(0);
  ASSERT_TRUE(SetQos(req, &v).ok());
  EXPECT_EQ(v.qos().max_write_bps(), 0u);
  EXPECT_EQ(v.qos().max_iops(), 200u);

  // Replace sets the whole set.
  req.Clear();
  req.set_name("q");
  req.mutable_replace()->set_iops_per_gib(10);
  ASSERT_TRUE(SetQos(req, &v).ok());
  EXPECT_EQ(v.qos().max_iops(), 0u);
  EXPECT_EQ(v.qos().burst_ms(), 0u);
  EXPECT_EQ(v.effective_qos().iops(), 10u);

  req.Clear();
  req.set_name("missing");
  req.mutable_replace();
  EXPECT_EQ(SetQos(req).error_code(), grpc::StatusCode::NOT_FOUND);
  req.set_name("q");
  req.mutable_replace()->set_burst_ms(70000);
  EXPECT_EQ(SetQos(req).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  ASSERT_TRUE(Get("q", &v).ok());
  EXPECT_EQ(v.effective_qos().iops(), 10u) << "a rejected change leaves the limits alone";
}

TEST_F(ApiTest, StatsReflectRecordedOps) {
  ASSERT_TRUE(Create("s", 16 * kMiB).ok());
  {
    auto vol = pool_->Acquire("s");
    ASSERT_NE(vol, nullptr);
    vol->stats().RecordOp(OpKind::kRead, 4096, 3'000, false);     // 3 us -> bucket 2 (< 4us)
    vol->stats().RecordOp(OpKind::kWrite, 8192, 100'000, false);  // 100 us -> bucket 7
    vol->stats().RecordOp(OpKind::kWrite, 0, 1'000, true);
    vol->stats().RecordOp(OpKind::kFlush, 0, 1'000, false);
    vol->stats().RecordThrottle(5'000);
    vol->stats().ConnectionOpened();
  }
  v1::GetVolumeStatsRequest req;
  req.set_name("s");
  v1::GetVolumeStatsResponse resp;
  auto s = stub_->GetVolumeStats(Ctx().get(), req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const auto& st = resp.stats();
  EXPECT_EQ(resp.name(), "s");
  EXPECT_GT(resp.sampled_unix_ns(), 0);
  EXPECT_EQ(st.read().ops(), 1u);
  EXPECT_EQ(st.read().bytes(), 4096u);
  EXPECT_EQ(st.write().ops(), 2u);
  EXPECT_EQ(st.write().errors(), 1u);
  EXPECT_EQ(st.flush().ops(), 1u);
  EXPECT_EQ(st.trim().ops(), 0u);
  EXPECT_EQ(st.throttled_ns(), 5'000u);
  EXPECT_EQ(st.throttled_ops(), 1u);
  EXPECT_EQ(st.open_connections(), 1u);
  ASSERT_EQ(st.read_latency().buckets_size(), kLatencyBuckets);
  EXPECT_EQ(st.read_latency().buckets(0).upper_bound_us(), 1u);
  EXPECT_EQ(st.read_latency().buckets(2).upper_bound_us(), 4u);
  EXPECT_EQ(st.read_latency().buckets(kLatencyBuckets - 1).upper_bound_us(),
            std::numeric_limits<uint64_t>::max());
  uint64_t total = 0;
  for (const auto& b : st.read_latency().buckets()) total += b.count();
  EXPECT_EQ(total, 1u);
  int bucket = VolumeStats::LatencyBucket(3'000);
  EXPECT_EQ(st.read_latency().buckets(bucket).count(), 1u);

  v1::Volume v;
  ASSERT_TRUE(Get("s", &v).ok());
  EXPECT_EQ(v.open_connections(), 1u);
  auto del = Delete("s");
  EXPECT_EQ(del.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << "connected";
  EXPECT_NE(del.error_message().find("connection"), std::string::npos) << del.error_message();
  pool_->Acquire("s")->stats().ConnectionClosed();
  EXPECT_TRUE(Delete("s").ok());

  req.set_name("gone");
  EXPECT_EQ(stub_->GetVolumeStats(Ctx().get(), req, &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ApiTest, ConcurrentCreatesOfOneNameAllSucceedOrRetry) {
  // Either the same volume comes back (idempotent) or the caller is told to retry (ABORTED);
  // never two different outcomes that both claim success with different state.
  std::vector<std::thread> threads;
  std::atomic<int> ok{0}, aborted{0}, other{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      auto st = Create("race", 4 * kMiB);
      if (st.ok()) ++ok;
      else if (st.error_code() == grpc::StatusCode::ABORTED) ++aborted;
      else ++other;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_GE(ok.load(), 1);
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(ok + aborted, 8);
  v1::ListVolumesResponse list;
  ASSERT_TRUE(stub_->ListVolumes(Ctx().get(), {}, &list).ok());
  EXPECT_EQ(list.volumes_size(), 1);
}

TEST_F(ApiTest, BrokenVolumeIsReportedAndItsErrorsNameIt) {
  ASSERT_TRUE(Create("good", 4 * kMiB).ok());
  ASSERT_TRUE(Create("bad", 4 * kMiB).ok());
  // Corrupt bad's metadata the way a failing disk or a careless edit would, then restart.
  const std::string meta = dir_ + "/pool/volumes/bad.json";
  ASSERT_TRUE(fs::exists(meta));
  {
    FILE* f = fopen(meta.c_str(), "w");
    ASSERT_NE(f, nullptr);
    fputs("{not json", f);
    fclose(f);
  }
  OpenPoolAndServe();

  v1::GetPoolInfoResponse info;
  ASSERT_TRUE(stub_->GetPoolInfo(Ctx().get(), {}, &info).ok());
  ASSERT_EQ(info.broken_volumes_size(), 1);
  EXPECT_EQ(info.broken_volumes(0).rfind("bad: ", 0), 0u) << info.broken_volumes(0);
  EXPECT_NE(info.broken_volumes(0).find(meta), std::string::npos) << info.broken_volumes(0);
  EXPECT_EQ(info.volumes(), 1u);
  EXPECT_EQ(info.provisioned_bytes(), 4 * kMiB);

  v1::ListVolumesResponse list;
  ASSERT_TRUE(stub_->ListVolumes(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.volumes_size(), 1);
  EXPECT_EQ(list.volumes(0).name(), "good");
  EXPECT_TRUE(Get("good").ok());

  // Every call on the broken volume fails with INTERNAL and the pool's own message, unchanged,
  // so the operator sees which volume and why (never a misleading "not found").
  auto want = pool_->Inspect("bad");
  ASSERT_FALSE(want.ok());
  ASSERT_EQ(want.status().code(), EIO);
  const std::string& msg = want.status().message();
  EXPECT_NE(msg.find("bad"), std::string::npos) << msg;
  EXPECT_NE(msg.find("broken"), std::string::npos) << msg;
  auto expect_broken = [&](const grpc::Status& st, const char* rpc) {
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INTERNAL) << rpc << ": " << st.error_message();
    EXPECT_EQ(st.error_message(), msg) << rpc;
  };
  expect_broken(Get("bad"), "GetVolume");
  expect_broken(Resize("bad", 8 * kMiB), "ResizeVolume");
  v1::SetQosRequest qreq;
  qreq.set_name("bad");
  qreq.mutable_patch()->set_max_iops(10);
  expect_broken(SetQos(qreq), "SetQos");
  v1::GetVolumeStatsRequest sreq;
  sreq.set_name("bad");
  v1::GetVolumeStatsResponse sresp;
  expect_broken(stub_->GetVolumeStats(Ctx().get(), sreq, &sresp), "GetVolumeStats");
  // The name stays taken: creating it again must not silently shadow the broken files.
  auto c = Create("bad", 4 * kMiB);
  EXPECT_EQ(c.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_NE(c.error_message().find("broken"), std::string::npos) << c.error_message();
  EXPECT_TRUE(fs::exists(meta)) << "a failed call must not remove the broken volume's files";
  EXPECT_TRUE(fs::exists(dir_ + "/pool/volumes/bad.img"));

  // Delete is the way out; afterwards the name is free and the pool reports nothing broken.
  ASSERT_TRUE(Delete("bad").ok());
  EXPECT_FALSE(fs::exists(meta));
  ASSERT_TRUE(stub_->GetPoolInfo(Ctx().get(), {}, &info).ok());
  EXPECT_EQ(info.broken_volumes_size(), 0);
  EXPECT_EQ(Get("bad").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(Create("bad", 4 * kMiB).ok());
}

TEST(ApiServerTcp, ListensOnTcpForTests) {
  char tmpl[] = "/tmp/api_tcp.XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string dir = tmpl;
  PoolOptions opts;
  opts.dir = dir + "/pool";
  opts.capacity_bytes = kGiB;
  auto pool = Pool::Open(opts);
  ASSERT_TRUE(pool.ok()) << pool.status().message();
  // Find a free port, then listen on it: an ephemeral-port race is harmless here (retry).
  std::unique_ptr<ApiServer> server;
  for (int port = 42000 + getpid() % 1000, tries = 0; tries < 20 && !server; ++port, ++tries) {
    auto s = StartApiServer(**pool, "tcp://127.0.0.1:" + std::to_string(port));
    if (s.ok()) server = std::move(*s);
  }
  ASSERT_NE(server, nullptr);
  EXPECT_GT(server->port(), 0);
  auto stub = v1::Datapath::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(server->port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::GetPoolInfoResponse info;
  EXPECT_TRUE(stub->GetPoolInfo(&ctx, {}, &info).ok());
  server.reset();
  pool->reset();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace nbdcsi::datapath
