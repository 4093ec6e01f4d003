// The Attachments gRPC service end to end on one host without nbd.ko: a real pool, the real engine
// serving the socketpairs, the API server on a unix socket with both services, and a fake kernel
// that holds the client ends the way nbd.ko would (dup on CONNECT, close on DISCONNECT). So the
// volume's open connections, and the EBUSY of deleting an attached volume, are the real ones.
#include <endian.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/attach_service.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/service.h"
#include "datapath/attach/attachments.h"
#include "datapath/engine/frontend.h"
#include "datapath/pool/pool.h"
#include "test/support/grpc_call.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

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
    sizes[index] = p.size_bytes;
    return index;
  }
  Status Reconfigure(int, const std::vector<int>&, uint64_t, const std::string&) override {
    return Status::Ok();
  }
  // A kernel that honours RECONFIGURE with a size (sizes[index] is what sysfs would show).
  std::map<int, uint64_t> sizes;
  bool ignore_resize = false;  // accepts the size without applying it
  Status Resize(int index, uint64_t size, const std::string& cookie) override {
    if (Backend(index) != cookie) return Error(EINVAL, "backend image doesn't match");
    if (!ignore_resize) sizes[index] = size;
    return Status::Ok();
  }
  uint64_t SizeBytes(int index) override { return sizes.count(index) ? sizes[index] : 0; }
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
    ASSERT_TRUE(tmp_.Create("attach_service_test")) << tmp_.error();
    dir_ = tmp_.path();
    PoolOptions po = test::PoolIn(dir_);
    po.capacity_bytes = 1024 * kMiB;
    ASSERT_TRUE(test::OpenPool(po, &pool_));
    ASSERT_TRUE(pool_->Create("v", 16 * kMiB, {}).ok());
    frontend_ = std::make_unique<NbdFrontend>(*pool_, FrontendOptions{2, 30});
    ASSERT_TRUE(frontend_->Start().ok());
    exports_ = MakeFrontendExportServer(*pool_, *frontend_);
    AttachOptions ao;
    ao.default_connections = 2;
    ao.detach_wait = std::chrono::milliseconds(2000);
    ao.fuse_fallback = false;  // the fuse path has its own tests (attach_manager_test, attach_fuse)
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
    tmp_.Remove();
  }
  std::unique_ptr<grpc::ClientContext> Ctx() { return test::CallContext(); }
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

  test::TempDir tmp_;
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
  test::WaitUntil([&] { return (del = DeleteVolume("v")).ok(); }, std::chrono::seconds(5));
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

// One NBD request on a socket the kernel would hold (transmission phase, simple replies): the
// reply's error, or -1 if the exchange broke.
int NbdRequest(int fd, uint16_t type, uint64_t offset, uint32_t length) {
  uint8_t req[28];
  auto put16 = [&](int at, uint16_t v) { v = htobe16(v); std::memcpy(req + at, &v, 2); };
  auto put32 = [&](int at, uint32_t v) { v = htobe32(v); std::memcpy(req + at, &v, 4); };
  auto put64 = [&](int at, uint64_t v) { v = htobe64(v); std::memcpy(req + at, &v, 8); };
  put32(0, 0x25609513);
  put16(4, 0);
  put16(6, type);
  put64(8, 0x1234);
  put64(16, offset);
  put32(24, length);
  std::vector<uint8_t> payload(type == 1 ? length : 0, 0xab);
  if (send(fd, req, sizeof req, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof req)) return -1;
  if (!payload.empty() &&
      send(fd, payload.data(), payload.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(length)) {
    return -1;
  }
  uint8_t rep[16];
  if (recv(fd, rep, sizeof rep, MSG_WAITALL) != static_cast<ssize_t>(sizeof rep)) return -1;
  uint32_t err;
  std::memcpy(&err, rep + 4, 4);
  err = be32toh(err);
  if (err == 0 && type == 0) {  // READ data follows a successful simple reply
    std::vector<uint8_t> data(length);
    if (recv(fd, data.data(), length, MSG_WAITALL) != static_cast<ssize_t>(length)) return -1;
  }
  return static_cast<int>(err);
}

TEST_F(AttachServiceTest, ResizeAttachmentGrowsTheLiveDevice) {
  v1::Attachment a;
  ASSERT_TRUE(Attach("v", 1, &a).ok());
  EXPECT_EQ(a.mode(), "kernel");
  EXPECT_TRUE(a.link_ok());
  EXPECT_EQ(a.link_error(), "");
  const int fd = kernel_.devices.at(0).second.at(0);
  // Past the end: refused (a write there is ENOSPC in NBD terms).
  EXPECT_EQ(NbdRequest(fd, 1, 16 * kMiB, 4096), 28);

  v1::ResizeVolumeRequest rv;
  rv.set_name("v");
  rv.set_size_bytes(32 * kMiB);
  v1::ResizeVolumeResponse rvr;
  auto s = datapath_->ResizeVolume(Ctx().get(), rv, &rvr);
  ASSERT_TRUE(s.ok()) << s.error_message();
  // The engine follows the volume's size on the kernel's sockets, before the kernel is told:
  // the new region is usable through the connections the device already has.
  EXPECT_EQ(NbdRequest(fd, 1, 16 * kMiB, 4096), 0);
  EXPECT_EQ(NbdRequest(fd, 0, 32 * kMiB - 4096, 4096), 0);
  EXPECT_EQ(NbdRequest(fd, 0, 32 * kMiB, 4096), 22);

  v1::ResizeAttachmentRequest rq;
  rq.set_volume("v");
  v1::ResizeAttachmentResponse rr;
  s = attach_->ResizeAttachment(Ctx().get(), rq, &rr);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(rr.attachment().size(), 32 * kMiB);
  EXPECT_EQ(kernel_.sizes.at(0), 32 * kMiB);
  s = attach_->ResizeAttachment(Ctx().get(), rq, &rr);  // idempotent
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(rr.attachment().size(), 32 * kMiB);
  v1::ListAttachmentsResponse list;
  ASSERT_TRUE(attach_->ListAttachments(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.attachments_size(), 1);
  EXPECT_EQ(list.attachments(0).size(), 32 * kMiB);
  EXPECT_EQ(list.attachments(0).mode(), "kernel");
  EXPECT_TRUE(list.attachments(0).link_ok());

  // A kernel that takes the size but does not apply it is caught, not reported as done.
  ASSERT_TRUE(datapath_->ResizeVolume(Ctx().get(), [] {
    v1::ResizeVolumeRequest r;
    r.set_name("v");
    r.set_size_bytes(48 * kMiB);
    return r;
  }(), &rvr).ok());
  kernel_.ignore_resize = true;
  s = attach_->ResizeAttachment(Ctx().get(), rq, &rr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << s.error_message();
  kernel_.ignore_resize = false;

  ASSERT_TRUE(Detach("v").ok());
  rq.set_volume("v");
  EXPECT_EQ(attach_->ResizeAttachment(Ctx().get(), rq, &rr).error_code(),
            grpc::StatusCode::NOT_FOUND);
  rq.set_volume("bad/name");
  EXPECT_EQ(attach_->ResizeAttachment(Ctx().get(), rq, &rr).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace nbdcsi::datapath
