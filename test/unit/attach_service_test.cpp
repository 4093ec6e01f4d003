// The Attachments gRPC service end to end on one host without nbd.ko: a real pool, the real engine
// serving the socketpairs, the API server on a unix socket with both services, and a fake kernel
// that holds the client ends the way nbd.ko would (dup on CONNECT, close on DISCONNECT). So the
// volume's open connections, and the EBUSY of deleting an attached volume, are the real ones.
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/attach_service.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/service.h"
#include "datapath/engine/attachments.h"
#include "datapath/engine/frontend.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::nbdcsi::datapath::v1;
constexpr uint64_t kMiB = 1024 * 1024;

class HoldingKernel final : public KernelNbdInterface {
 public:
  Status available = Status::Ok();
  std::map<int, std::pair<std::string, std::vector<int>>> devices;  // cookie, held sockets

  ~HoldingKernel() override {
    for (auto& [i, d] : devices)
      for (int fd : d.second) close(fd);
  }
  Status Available() override { return available; }
  StatusOr<int> Connect(const std::vector<int>& fds, const KernelConnectParams& p) override {
    int index = 0;
    while (devices.count(index)) ++index;
    auto& d = devices[index];
    d.first = p.backend_identifier;
    for (int fd : fds) d.second.push_back(dup(fd));
    return index;
  }
  Status Reconfigure(int, const std::vector<int>&, uint64_t, const std::string&) override {
    return Status::Ok();
  }
  Status Disconnect(int index) override {
    auto it = devices.find(index);
    if (it == devices.end()) return Error(EINVAL, "no device {}", index);
    for (int fd : it->second.second) close(fd);
    devices.erase(it);
    return Status::Ok();
  }
  std::string Backend(int index) override {
    auto it = devices.find(index);
    return it == devices.end() ? "" : it->second.first;
  }
  int FindByBackend(const std::string& cookie) override {
    for (const auto& [i, d] : devices)
      if (d.first == cookie) return i;
    return -1;
  }
  bool Connected(int index) override { return devices.count(index) > 0; }
  Status CheckNotInUse(int) override { return Status::Ok(); }
  StatusOr<unsigned> SetMaxSectorsKb(int, unsigned kb) override { return kb; }
  Status WatchLinkDead(std::function<void(int)>) override { return Status::Ok(); }
  void StopWatching() override {}
};

class AttachServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/attach_service_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    PoolOptions po;
    po.dir = dir_ + "/pool";
    po.capacity_bytes = 1024 * kMiB;
    auto pool = Pool::Open(po);
    ASSERT_TRUE(pool.ok()) << pool.status().message();
    pool_ = std::move(*pool);
    ASSERT_TRUE(pool_->Create("v", 16 * kMiB, {}).ok());
    frontend_ = std::make_unique<NbdFrontend>(*pool_, FrontendOptions{2, 30});
    ASSERT_TRUE(frontend_->Start().ok());
    exports_ = MakeFrontendExportServer(*pool_, *frontend_);
    AttachOptions ao;
    ao.default_connections = 2;
    ao.detach_wait = std::chrono::milliseconds(2000);
    manager_ = std::make_unique<AttachmentManager>(dir_ + "/pool/attachments", kernel_, *exports_,
                                                   ao);
    ASSERT_TRUE(manager_->Init().ok());
    service_ = MakeAttachmentService(*manager_);
    const std::string sock = dir_ + "/api.sock";
    auto server = StartApiServer(*pool_, "unix://" + sock, {service_.get()});
    ASSERT_TRUE(server.ok()) << server.status().message();
    server_ = std::move(*server);
    auto ch = grpc::CreateChannel("unix://" + sock, grpc::InsecureChannelCredentials());
    attach_ = v1::Attachments::NewStub(ch);
    datapath_ = v1::Datapath::NewStub(ch);
  }
  void TearDown() override {
    attach_.reset();
    datapath_.reset();
    server_.reset();
    service_.reset();
    manager_.reset();
    frontend_.reset();
    pool_.reset();
    fs::remove_all(dir_);
  }
  std::unique_ptr<grpc::ClientContext> Ctx() {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return c;
  }
  grpc::Status Attach(const std::string& name, unsigned conns, v1::Attachment* out = nullptr) {
    v1::AttachVolumeRequest req;
    req.set_volume(name);
    req.set_connections(conns);
    v1::AttachVolumeResponse resp;
    auto s = attach_->AttachVolume(Ctx().get(), req, &resp);
    if (out) *out = resp.attachment();
    return s;
  }
  grpc::Status Detach(const std::string& name) {
    v1::DetachVolumeRequest req;
    req.set_volume(name);
    v1::DetachVolumeResponse resp;
    return attach_->DetachVolume(Ctx().get(), req, &resp);
  }
  grpc::Status DeleteVolume(const std::string& name) {
    v1::DeleteVolumeRequest req;
    req.set_name(name);
    v1::DeleteVolumeResponse resp;
    return datapath_->DeleteVolume(Ctx().get(), req, &resp);
  }
  uint32_t OpenConnections(const std::string& name) {
    v1::GetVolumeRequest req;
    req.set_name(name);
    v1::GetVolumeResponse resp;
    EXPECT_TRUE(datapath_->GetVolume(Ctx().get(), req, &resp).ok());
    return resp.volume().open_connections();
  }

  std::string dir_;
  HoldingKernel kernel_;
  std::unique_ptr<Pool> pool_;
  std::unique_ptr<NbdFrontend> frontend_;
  std::unique_ptr<ExportServer> exports_;
  std::unique_ptr<AttachmentManager> manager_;
  std::unique_ptr<grpc::Service> service_;
  std::unique_ptr<ApiServer> server_;
  std::unique_ptr<v1::Attachments::Stub> attach_;
  std::unique_ptr<v1::Datapath::Stub> datapath_;
};

TEST_F(AttachServiceTest, AttachListDetachOverTheApi) {
  v1::Attachment a;
  auto s = Attach("v", 3, &a);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(a.volume(), "v");
  EXPECT_EQ(a.device(), "/dev/nbd0");
  EXPECT_EQ(a.connections(), 3u);
  EXPECT_EQ(a.size(), 16 * kMiB);
  EXPECT_FALSE(a.read_only());
  EXPECT_EQ(a.cookie(), kernel_.Backend(0));
  EXPECT_EQ(OpenConnections("v"), 3u);

  v1::Attachment again;
  ASSERT_TRUE(Attach("v", 0, &again).ok());
  EXPECT_EQ(again.device(), a.device());
  EXPECT_EQ(again.cookie(), a.cookie());
  EXPECT_EQ(OpenConnections("v"), 3u);

  v1::ListAttachmentsResponse list;
  ASSERT_TRUE(attach_->ListAttachments(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.attachments_size(), 1);
  EXPECT_EQ(list.attachments(0).device(), "/dev/nbd0");

  // Attached means connected: the pool refuses the delete.
  EXPECT_EQ(DeleteVolume("v").error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  ASSERT_TRUE(Detach("v").ok());
  EXPECT_TRUE(kernel_.devices.empty());
  ASSERT_TRUE(attach_->ListAttachments(Ctx().get(), {}, &list).ok());
  EXPECT_EQ(list.attachments_size(), 0);
  EXPECT_TRUE(Detach("v").ok());  // idempotent

  // The engine sees the kernel's sockets close; the delete then goes through.
  grpc::Status del;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!(del = DeleteVolume("v")).ok() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(del.ok()) << del.error_message();
}

TEST_F(AttachServiceTest, BadRequestsGetClearErrors) {
  EXPECT_EQ(Attach("missing", 0).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Attach("bad/name", 0).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Attach("", 0).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Detach("../x").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  auto s = Attach("v", AttachmentManager::kMaxConnections + 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("at most 16"), std::string::npos) << s.error_message();

  kernel_.available = Error(ENODEV, "kernel NBD unavailable: the nbd module is not loaded");
  s = Attach("v", 0);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.error_message().find("the nbd module is not loaded"), std::string::npos);
  EXPECT_TRUE(kernel_.devices.empty());
  EXPECT_EQ(OpenConnections("v"), 0u);
}

}  // namespace
}  // namespace nbdcsi::datapath
