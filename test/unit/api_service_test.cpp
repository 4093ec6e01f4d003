// The management API end to end: a real Pool in a temp dir, StartApiServer on a real unix socket,
// every RPC driven through the generated stub.
#include "datapath/api/service.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <limits>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "datapath/api/datapath.grpc.pb.h"
#include "test/support/grpc_call.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;

class ApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("api_test")) << tmp_.error();
    dir_ = tmp_.path();
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
    tmp_.Remove();
  }

  std::unique_ptr<grpc::ClientContext> Ctx() { return test::CallContext(); }

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

  grpc::Status Snap(const std::string& name, const std::string& volume,
                    v1::Snapshot* out = nullptr) {
    v1::CreateSnapshotRequest req;
    req.set_name(name);
    req.set_source_volume(volume);
    v1::CreateSnapshotResponse resp;
    auto s = stub_->CreateSnapshot(Ctx().get(), req, &resp);
    if (out) *out = resp.snapshot();
    return s;
  }
  grpc::Status GetSnap(const std::string& name, v1::Snapshot* out = nullptr) {
    v1::GetSnapshotRequest req;
    req.set_name(name);
    v1::GetSnapshotResponse resp;
    auto s = stub_->GetSnapshot(Ctx().get(), req, &resp);
    if (out) *out = resp.snapshot();
    return s;
  }
  grpc::Status DeleteSnap(const std::string& name) {
    v1::DeleteSnapshotRequest req;
    req.set_name(name);
    v1::DeleteSnapshotResponse resp;
    return stub_->DeleteSnapshot(Ctx().get(), req, &resp);
  }
  std::vector<std::string> ListSnaps(const std::string& volume = "") {
    v1::ListSnapshotsRequest req;
    req.set_source_volume(volume);
    v1::ListSnapshotsResponse resp;
    auto s = stub_->ListSnapshots(Ctx().get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    std::vector<std::string> names;
    for (const auto& sn : resp.snapshots()) names.push_back(sn.name());
    return names;
  }
  // source: "snapshot/NAME", "volume/NAME" or "" (blank).
  grpc::Status CreateFrom(const std::string& name, const std::string& source, uint64_t size,
                          v1::Volume* out = nullptr, v1::QosLimits qos = {}) {
    v1::CreateVolumeRequest req;
    req.set_name(name);
    req.set_size_bytes(size);
    *req.mutable_qos() = qos;
    if (source.rfind("snapshot/", 0) == 0) req.mutable_source()->set_snapshot(source.substr(9));
    if (source.rfind("volume/", 0) == 0) req.mutable_source()->set_volume(source.substr(7));
    v1::CreateVolumeResponse resp;
    auto s = stub_->CreateVolume(Ctx().get(), req, &resp);
    if (out) *out = resp.volume();
    return s;
  }
  // Polls until ready (a background copy may fill it); the last state.
  v1::Snapshot WaitSnap(const std::string& name) {
    v1::Snapshot s;
    test::WaitUntil([&] {
      EXPECT_TRUE(GetSnap(name, &s).ok());
      return s.ready() || !s.error().empty();
    });
    return s;
  }
  v1::Volume WaitVol(const std::string& name) {
    v1::Volume v;
    test::WaitUntil([&] {
      EXPECT_TRUE(Get(name, &v).ok());
      return v.ready();
    });
    return v;
  }
  void WriteAt(const std::string& path, uint64_t off, const std::string& data) {
    int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << path;
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)),
              static_cast<ssize_t>(data.size()));
    ASSERT_EQ(fsync(fd), 0);
    close(fd);
  }
  std::string ReadAt(const std::string& path, uint64_t off, size_t len) {
    std::string out(len, '\0');
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0) << path;
    if (fd < 0) return {};
    EXPECT_EQ(pread(fd, out.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
    close(fd);
    return out;
  }

  test::TempDir tmp_;
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

// One errno per rule whatever the RPC: the pool decides, the API maps it once.
TEST_F(ApiTest, SizeAndQosRulesGiveTheSameCodeOnEveryRpc) {
  const uint64_t too_big = std::numeric_limits<uint64_t>::max() - 4095;
  v1::QosLimits per_gib;
  per_gib.set_iops_per_gib(std::numeric_limits<uint64_t>::max() / 2);
  ASSERT_TRUE(Create("q", 2 * kGiB, nullptr, per_gib).ok()) << "x 2 GiB still fits 64 bits";
  ASSERT_TRUE(Snap("s", "q").ok());
  WaitSnap("s");
  struct Case {
    const char* rpc;
    grpc::Status got;
    const char* says;
  };
  const Case cases[] = {
      {"CreateVolume", Create("x", too_big), "maximum file size"},
      {"ResizeVolume", Resize("q", too_big), "maximum file size"},
      {"CreateVolume from snapshot", CreateFrom("x", "snapshot/s", too_big), "maximum file size"},
      {"CreateVolume clone", CreateFrom("x", "volume/q", too_big), "maximum file size"},
      {"ResizeVolume per-GiB", Resize("q", 3 * kGiB), "volume q: QoS iops_per_gib"},
      {"CreateVolume from snapshot per-GiB", CreateFrom("x", "snapshot/s", 3 * kGiB, nullptr,
                                                        per_gib),
       "volume x: QoS iops_per_gib"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(c.got.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.rpc;
    EXPECT_NE(c.got.error_message().find(c.says), std::string::npos)
        << c.rpc << ": " << c.got.error_message();
  }
  v1::Volume v;
  ASSERT_TRUE(Get("q", &v).ok());
  EXPECT_EQ(v.size_bytes(), 2 * kGiB) << "a refused resize changed the volume";
  EXPECT_EQ(Get("x").error_code(), grpc::StatusCode::NOT_FOUND);
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

// Schedules (issue 18): CreateVolume and SetSchedule store them, GetVolume and ListVolumes show
// them with the runs the daemon's runner reports (here a stand-in), bad ones are
// INVALID_ARGUMENT naming the field, a retain of 0 means the default.
TEST_F(ApiTest, SchedulesAreStoredAndShownWithTheirRuns) {
  server_->SetScheduleStatus([](const std::string& volume, const VolumeSchedule& s) {
    ScheduleRunStatus r;
    r.kind = "snapshot";
    r.cron = s.snapshot_cron;
    r.result = "ok";
    r.made = "auto-20261207T0600-" + volume;
    r.next_fire_unix_ns = 42;
    return std::vector<ScheduleRunStatus>{r};
  });
  v1::CreateVolumeRequest creq;
  creq.set_name("s");
  creq.set_size_bytes(kMiB);
  creq.mutable_schedule()->set_snapshot_cron("*/15 * * * *");
  v1::CreateVolumeResponse cresp;
  ASSERT_TRUE(stub_->CreateVolume(Ctx().get(), creq, &cresp).ok());
  EXPECT_EQ(cresp.volume().schedule().snapshot_cron(), "*/15 * * * *");
  EXPECT_EQ(cresp.volume().schedule().snapshot_retain(), 7u) << "0 is the default";
  ASSERT_EQ(cresp.volume().schedule_runs_size(), 1);
  EXPECT_EQ(cresp.volume().schedule_runs(0).made(), "auto-20261207T0600-s");
  EXPECT_EQ(cresp.volume().schedule_runs(0).next_fire_unix_ns(), 42);
  // Another schedule for the same name: ALREADY_EXISTS.
  creq.mutable_schedule()->set_snapshot_retain(3);
  EXPECT_EQ(stub_->CreateVolume(Ctx().get(), creq, &cresp).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);

  v1::SetScheduleRequest req;
  req.set_name("s");
  req.mutable_schedule()->set_backup_cron("0 3 * * *");
  req.mutable_schedule()->set_backup_target("s3://b/p");
  req.mutable_schedule()->set_backup_retain(2);
  v1::SetScheduleResponse resp;
  auto st = stub_->SetSchedule(Ctx().get(), req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  v1::Volume v;
  ASSERT_TRUE(Get("s", &v).ok());
  EXPECT_EQ(v.schedule().snapshot_cron(), "") << "SetSchedule replaces the whole schedule";
  EXPECT_EQ(v.schedule().backup_cron(), "0 3 * * *");
  EXPECT_EQ(v.schedule().backup_retain(), 2u);
  ASSERT_TRUE(Create("plain", kMiB).ok());
  ASSERT_TRUE(Get("plain", &v).ok());
  EXPECT_FALSE(v.has_schedule());
  EXPECT_EQ(v.schedule_runs_size(), 0);
  v1::ListVolumesResponse list;
  ASSERT_TRUE(stub_->ListVolumes(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.volumes_size(), 2);
  EXPECT_FALSE(list.volumes(0).has_schedule());  // "plain"
  EXPECT_EQ(list.volumes(1).schedule().backup_target(), "s3://b/p");

  req.mutable_schedule()->set_backup_target("");
  st = stub_->SetSchedule(Ctx().get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("needs a backup target"), std::string::npos)
      << st.error_message();
  req.mutable_schedule()->set_backup_target("s3://b/p");
  req.mutable_schedule()->set_backup_cron("0 3 * * 9");
  st = stub_->SetSchedule(Ctx().get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("field 5 (day of week)"), std::string::npos)
      << st.error_message();
  req.mutable_schedule()->set_backup_cron("0 3 * * 6");
  req.set_name("missing");
  EXPECT_EQ(stub_->SetSchedule(Ctx().get(), req, &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);
  // An unset schedule removes it.
  v1::SetScheduleRequest clear;
  clear.set_name("s");
  ASSERT_TRUE(stub_->SetSchedule(Ctx().get(), clear, &resp).ok());
  EXPECT_FALSE(resp.volume().has_schedule());
  server_->SetScheduleStatus(nullptr);
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
  test::TempDir tmp("api_tcp");
  ASSERT_TRUE(tmp.ok()) << tmp.error();
  const std::string& dir = tmp.path();
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
  auto stub = test::InsecureStub<v1::Datapath>("127.0.0.1:" + std::to_string(server->port()));
  v1::GetPoolInfoResponse info;
  EXPECT_TRUE(stub->GetPoolInfo(test::CallContext().get(), {}, &info).ok());
  server.reset();
  pool->reset();
}

// ---- snapshots, restores, clones ----

TEST_F(ApiTest, SnapshotCreateGetListDelete) {
  v1::Volume v;
  ASSERT_TRUE(Create("v", 4 * kMiB, &v).ok());
  WriteAt(v.data_path(), 0, std::string(4096, 'A'));
  v1::Snapshot s;
  auto st = Snap("s", "v", &s);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(s.name(), "s");
  EXPECT_EQ(s.source_volume(), "v");
  EXPECT_EQ(s.size_bytes(), 4 * kMiB);
  EXPECT_GT(s.created_unix_ns(), 0);
  EXPECT_TRUE(s.method() == "reflink" || s.method() == "copy") << s.method();
  EXPECT_FALSE(s.data_path().empty());
  s = WaitSnap("s");
  ASSERT_TRUE(s.ready()) << s.error();
  EXPECT_TRUE(s.error().empty());
  EXPECT_EQ(ReadAt(s.data_path(), 0, 4096), std::string(4096, 'A'));

  // Idempotent: the same point in time comes back, not a new one.
  v1::Snapshot again;
  ASSERT_TRUE(Snap("s", "v", &again).ok());
  EXPECT_EQ(again.created_unix_ns(), s.created_unix_ns());

  ASSERT_TRUE(Create("w", 4 * kMiB).ok());
  ASSERT_TRUE(Snap("t", "w").ok());
  WaitSnap("t");
  EXPECT_EQ(ListSnaps(), (std::vector<std::string>{"s", "t"}));
  EXPECT_EQ(ListSnaps("v"), (std::vector<std::string>{"s"}));
  EXPECT_TRUE(ListSnaps("nobody").empty());

  v1::GetPoolInfoResponse info;
  ASSERT_TRUE(stub_->GetPoolInfo(Ctx().get(), {}, &info).ok());
  EXPECT_EQ(info.snapshots(), 2u);
  EXPECT_EQ(info.reflink(), s.method() == "reflink");
  EXPECT_EQ(info.abandoned_copies_size(), 0);
  EXPECT_EQ(info.volumes(), 2u) << "snapshots are not volumes";

  ASSERT_TRUE(DeleteSnap("s").ok());
  EXPECT_EQ(DeleteSnap("s").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(GetSnap("s").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_FALSE(fs::exists(s.data_path()));
  EXPECT_EQ(ListSnaps(), (std::vector<std::string>{"t"}));
  // The volume is untouched by its snapshot's deletion.
  EXPECT_EQ(ReadAt(v.data_path(), 0, 4096), std::string(4096, 'A'));
}

TEST_F(ApiTest, SnapshotErrorsMapToGrpcCodes) {
  ASSERT_TRUE(Create("a", 4 * kMiB).ok());
  ASSERT_TRUE(Create("b", 4 * kMiB).ok());
  ASSERT_TRUE(Snap("s", "a").ok());
  WaitSnap("s");
  auto other = Snap("s", "b");
  EXPECT_EQ(other.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_NE(other.error_message().find("source volume a, not b"), std::string::npos)
      << other.error_message();
  EXPECT_EQ(Snap("t", "ghost").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(GetSnap("ghost").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(DeleteSnap("ghost").error_code(), grpc::StatusCode::NOT_FOUND);

  // Bad arguments never reach the pool, and the message says which name was wrong.
  for (const std::string& bad : std::vector<std::string>{"", "../x", ".hidden", "-x", "a/b", std::string(129, 'n')}) {
    auto c = Snap(bad, "a");
    EXPECT_EQ(c.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(c.error_message().find("snapshot name"), std::string::npos) << c.error_message();
    EXPECT_EQ(GetSnap(bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_EQ(DeleteSnap(bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    auto src = Snap("ok", bad);
    EXPECT_EQ(src.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(src.error_message().find("source volume name"), std::string::npos)
        << src.error_message();
  }
  v1::ListSnapshotsRequest req;
  req.set_source_volume("../x");
  v1::ListSnapshotsResponse resp;
  EXPECT_EQ(stub_->ListSnapshots(Ctx().get(), req, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ListSnaps(), (std::vector<std::string>{"s"})) << "a failed call left something";
  for (const auto& e : fs::directory_iterator(dir_ + "/pool/snapshots")) {
    EXPECT_NE(e.path().filename().string()[0], '.') << e.path();
  }
}

TEST_F(ApiTest, SnapshotAndVolumeNamesAreSeparateNamespaces) {
  ASSERT_TRUE(Create("a", 4 * kMiB).ok());
  ASSERT_TRUE(Snap("a", "a").ok());
  WaitSnap("a");
  v1::Volume v;
  ASSERT_TRUE(Get("a", &v).ok());
  EXPECT_TRUE(v.source().empty());
  ASSERT_TRUE(DeleteSnap("a").ok());
  EXPECT_TRUE(Get("a").ok()) << "deleting snapshot a must not touch volume a";

  // The in-flight marks are separate too: many concurrent snapshots named like the volume, each
  // racing a GetVolume and a SetQos on the volume, never see ABORTED for the volume's sake.
  std::atomic<int> ok{0}, aborted{0}, other{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      auto st = Snap("a", "a");
      if (st.ok()) ++ok;
      else if (st.error_code() == grpc::StatusCode::ABORTED) {
        ++aborted;
        EXPECT_NE(st.error_message().find("snapshot \"a\""), std::string::npos)
            << st.error_message();
      } else if (st.error_code() != grpc::StatusCode::UNAVAILABLE) {
        ++other;
        ADD_FAILURE() << st.error_message();
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_GE(ok.load(), 1);
  EXPECT_EQ(other.load(), 0);
}

TEST_F(ApiTest, RestoreFromSnapshotHoldsThePointInTime) {
  v1::Volume v;
  ASSERT_TRUE(Create("v", 8 * kMiB, &v).ok());
  WriteAt(v.data_path(), kMiB, std::string(8192, 'A'));
  ASSERT_TRUE(Snap("s", "v").ok());
  ASSERT_TRUE(WaitSnap("s").ready());
  WriteAt(v.data_path(), kMiB, std::string(8192, 'B'));

  v1::QosLimits qos;
  qos.set_max_iops(300);
  v1::Volume r;
  auto st = CreateFrom("r", "snapshot/s", 0, &r, qos);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(r.size_bytes(), 8 * kMiB) << "size 0 means the snapshot's size";
  EXPECT_EQ(r.source(), "snapshot/s");
  EXPECT_EQ(r.qos().max_iops(), 300u);
  if (!r.ready()) { EXPECT_EQ(r.copy_total_bytes(), 8 * kMiB); }
  r = WaitVol("r");
  ASSERT_TRUE(r.ready());
  EXPECT_EQ(ReadAt(r.data_path(), kMiB, 8192), std::string(8192, 'A'));
  EXPECT_EQ(ReadAt(v.data_path(), kMiB, 8192), std::string(8192, 'B'));

  // Idempotent with size 0 or the same explicit size; other parameters are ALREADY_EXISTS.
  EXPECT_TRUE(CreateFrom("r", "snapshot/s", 0, nullptr, qos).ok());
  EXPECT_TRUE(CreateFrom("r", "snapshot/s", 8 * kMiB, nullptr, qos).ok());
  EXPECT_EQ(CreateFrom("r", "snapshot/s", 16 * kMiB, nullptr, qos).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(CreateFrom("r", "volume/v", 0, nullptr, qos).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(CreateFrom("r", "", 8 * kMiB, nullptr, qos).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);

  // Larger is fine, smaller is not; unknown source is NOT_FOUND; nothing half-made stays.
  v1::Volume big;
  ASSERT_TRUE(CreateFrom("big", "snapshot/s", 16 * kMiB, &big).ok());
  EXPECT_EQ(big.size_bytes(), 16 * kMiB);
  auto small = CreateFrom("small", "snapshot/s", 4 * kMiB);
  EXPECT_EQ(small.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(small.error_message().find("smaller than snapshot s"), std::string::npos);
  EXPECT_EQ(CreateFrom("x", "snapshot/ghost", 0).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(CreateFrom("x", "snapshot/ghost", 8 * kMiB).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Get("small").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Get("x").error_code(), grpc::StatusCode::NOT_FOUND);
  WaitVol("big");

  // ListVolumes and a reopened pool keep the source.
  OpenPoolAndServe();
  v1::ListVolumesResponse list;
  ASSERT_TRUE(stub_->ListVolumes(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.volumes_size(), 3);
  EXPECT_EQ(list.volumes(0).name(), "big");
  EXPECT_EQ(list.volumes(0).source(), "snapshot/s");
  EXPECT_EQ(list.volumes(1).source(), "snapshot/s");
  EXPECT_EQ(list.volumes(2).source(), "");
  for (const auto& vol : list.volumes()) EXPECT_TRUE(vol.ready()) << vol.name();
}

TEST_F(ApiTest, CloneOfALiveVolume) {
  v1::Volume v;
  ASSERT_TRUE(Create("v", 8 * kMiB, &v).ok());
  WriteAt(v.data_path(), 0, std::string(4096, 'C'));
  v1::Volume c;
  auto st = CreateFrom("c", "volume/v", 0, &c);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(c.source(), "volume/v");
  EXPECT_EQ(c.size_bytes(), 8 * kMiB);
  c = WaitVol("c");
  ASSERT_TRUE(c.ready());
  EXPECT_EQ(ReadAt(c.data_path(), 0, 4096), std::string(4096, 'C'));
  EXPECT_TRUE(CreateFrom("c", "volume/v", 0).ok()) << "idempotent";
  EXPECT_EQ(CreateFrom("c", "volume/v", 12 * kMiB).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(CreateFrom("c2", "volume/ghost", 0).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(CreateFrom("c3", "volume/v", 4 * kMiB).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  auto self = CreateFrom("v", "volume/v", 0);
  EXPECT_EQ(self.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(self.error_message().find("onto itself"), std::string::npos) << self.error_message();
}

TEST_F(ApiTest, CreateWithSourceValidatesArguments) {
  ASSERT_TRUE(Create("v", 4 * kMiB).ok());
  ASSERT_TRUE(Snap("s", "v").ok());
  WaitSnap("s");
  // A source message that names neither kind.
  v1::CreateVolumeRequest req;
  req.set_name("r");
  req.mutable_source();
  v1::CreateVolumeResponse resp;
  auto st = stub_->CreateVolume(Ctx().get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("neither"), std::string::npos) << st.error_message();
  // Both kinds at once cannot be sent: the oneof keeps only the last one set.
  req.mutable_source()->set_snapshot("s");
  req.mutable_source()->set_volume("v");
  EXPECT_EQ(req.source().kind_case(), v1::VolumeContentSource::kVolume);

  for (const std::string bad : {"", "../x", ".x"}) {
    auto a = CreateFrom("r", "snapshot/" + bad, 0);
    EXPECT_EQ(a.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(a.error_message().find("source snapshot name"), std::string::npos)
        << a.error_message();
    auto b = CreateFrom("r", "volume/" + bad, 0);
    EXPECT_EQ(b.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(b.error_message().find("source volume name"), std::string::npos)
        << b.error_message();
  }
  EXPECT_EQ(CreateFrom("../r", "snapshot/s", 0).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(CreateFrom("r", "snapshot/s", 1000).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Without a source, size 0 is still an error.
  EXPECT_EQ(CreateFrom("r", "", 0).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Per-GiB limits are checked against the source's size when size is 0: times 3 GiB this
  // overflows, times 0 bytes it would not.
  ASSERT_TRUE(Create("big", 3 * kGiB).ok());
  v1::QosLimits huge;
  huge.set_bps_per_gib(std::numeric_limits<uint64_t>::max() / 2);
  auto q = CreateFrom("r", "volume/big", 0, nullptr, huge);
  EXPECT_EQ(q.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(q.error_message().find("3 GiB overflows"), std::string::npos) << q.error_message();
  v1::QosLimits burst;
  burst.set_burst_ms(kMaxBurstMs + 1);
  EXPECT_EQ(CreateFrom("r", "volume/v", 0, nullptr, burst).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Get("r").error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ApiTest, RunningCopyIsUnavailableThenSucceeds) {
  // A background copy of real data takes a moment on the copy path; while it runs, a second
  // snapshot of the volume and a restore from the unfinished snapshot are UNAVAILABLE (retry).
  v1::Volume v;
  ASSERT_TRUE(Create("v", 128 * kMiB, &v).ok());
  WriteAt(v.data_path(), 0, std::string(128 * kMiB, 'D'));
  v1::Snapshot s;
  ASSERT_TRUE(Snap("s", "v", &s).ok());
  if (s.ready()) GTEST_SKIP() << "snapshot method " << s.method() << " is ready at once";
  auto again = Snap("s2", "v");
  auto restore = CreateFrom("r", "snapshot/s", 0);
  v1::Snapshot now;
  ASSERT_TRUE(GetSnap("s", &now).ok());
  if (now.ready()) GTEST_SKIP() << "the copy finished before the calls could race it";
  EXPECT_EQ(again.error_code(), grpc::StatusCode::UNAVAILABLE) << again.error_message();
  EXPECT_EQ(restore.error_code(), grpc::StatusCode::UNAVAILABLE) << restore.error_message();
  EXPECT_LE(now.copy_done_bytes(), now.copy_total_bytes());
  EXPECT_EQ(now.copy_total_bytes(), 128 * kMiB);
  ASSERT_TRUE(WaitSnap("s").ready());
  EXPECT_TRUE(Snap("s2", "v").ok());
  EXPECT_TRUE(CreateFrom("r", "snapshot/s", 0).ok());
  WaitVol("r");
  WaitSnap("s2");
}

}  // namespace
}  // namespace nbdcsi::datapath
