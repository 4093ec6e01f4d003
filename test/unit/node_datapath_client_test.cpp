// The gRPC DatapathClient against an in-process Datapath + Attachments + Targets server on a
// unix socket:
// requests carry the volume, answers come back whole, and a datapath error keeps its gRPC code
// through Status (GrpcCodeToErrno, then ToGrpc) with the datapath's message.
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <string>

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>

#include "common/grpc_status.h"
#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/target.grpc.pb.h"
#include "node/datapath_client.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::node {
namespace {

namespace dp = ::nbdcsi::datapath::v1;

// Answers for volume "good"; every other name fails with the code named by the volume
// ("NOT_FOUND", "ABORTED", ...), so one table drives the error cases.
grpc::Status Outcome(const std::string& volume) {
  if (volume == "good") return grpc::Status::OK;
  static const std::map<std::string, grpc::StatusCode> codes = {
      {"NOT_FOUND", grpc::StatusCode::NOT_FOUND},
      {"ABORTED", grpc::StatusCode::ABORTED},
      {"FAILED_PRECONDITION", grpc::StatusCode::FAILED_PRECONDITION},
      {"INVALID_ARGUMENT", grpc::StatusCode::INVALID_ARGUMENT},
      {"DEADLINE_EXCEEDED", grpc::StatusCode::DEADLINE_EXCEEDED},
      {"RESOURCE_EXHAUSTED", grpc::StatusCode::RESOURCE_EXHAUSTED},
      {"INTERNAL", grpc::StatusCode::INTERNAL},
  };
  auto it = codes.find(volume);
  return grpc::Status(it == codes.end() ? grpc::StatusCode::UNKNOWN : it->second,
                      "volume " + volume + ": the datapath's reason");
}

class FakeAttachments final : public dp::Attachments::Service {
  grpc::Status AttachVolume(grpc::ServerContext*, const dp::AttachVolumeRequest* req,
                            dp::AttachVolumeResponse* resp) override {
    auto* a = resp->mutable_attachment();
    a->set_volume(req->volume());
    a->set_device(req->target() ? "/dev/nbd3" : "/dev/loop7");
    a->set_mode(req->target() ? "kernel" : "fuse");
    a->set_link_ok(true);
    a->set_target(req->target());
    return Outcome(req->volume());
  }
  grpc::Status DetachVolume(grpc::ServerContext*, const dp::DetachVolumeRequest* req,
                            dp::DetachVolumeResponse*) override {
    return Outcome(req->volume());
  }
  grpc::Status ListAttachments(grpc::ServerContext*, const dp::ListAttachmentsRequest*,
                               dp::ListAttachmentsResponse* resp) override {
    for (const char* v : {"a", "b"}) {
      auto* a = resp->add_attachments();
      a->set_volume(v);
      a->set_device(std::string("/dev/nbd-") + v);
    }
    return grpc::Status::OK;
  }
  grpc::Status ResizeAttachment(grpc::ServerContext*, const dp::ResizeAttachmentRequest* req,
                                dp::ResizeAttachmentResponse* resp) override {
    resp->mutable_attachment()->set_volume(req->volume());
    resp->mutable_attachment()->set_size(2u << 30);
    return Outcome(req->volume());
  }
};

class FakeDatapathService final : public dp::Datapath::Service {
  grpc::Status GetVolume(grpc::ServerContext*, const dp::GetVolumeRequest* req,
                         dp::GetVolumeResponse* resp) override {
    resp->mutable_volume()->set_name(req->name());
    resp->mutable_volume()->set_size_bytes(1u << 30);
    return Outcome(req->name());
  }
  grpc::Status GetVolumeStats(grpc::ServerContext*, const dp::GetVolumeStatsRequest* req,
                              dp::GetVolumeStatsResponse* resp) override {
    resp->mutable_stats()->mutable_write()->set_errors(5);
    return Outcome(req->name());
  }
  grpc::Status GetPoolInfo(grpc::ServerContext*, const dp::GetPoolInfoRequest*,
                           dp::GetPoolInfoResponse* resp) override {
    resp->set_dir("/pool");
    return grpc::Status::OK;
  }
};

class FakeTargets final : public dp::Targets::Service {
 public:
  std::vector<std::string> closed;

 private:
  static void Fill(const std::string& volume, dp::TargetResponse* resp) {
    auto* t = resp->mutable_target();
    t->set_volume(volume);
    t->set_epoch(3);
    t->set_degraded(true);
    t->add_replicas()->set_node("node-b");
  }
  grpc::Status OpenTarget(grpc::ServerContext*, const dp::OpenTargetRequest* req,
                          dp::TargetResponse* resp) override {
    Fill(req->volume(), resp);
    return Outcome(req->volume());
  }
  grpc::Status CloseTarget(grpc::ServerContext*, const dp::CloseTargetRequest* req,
                           dp::CloseTargetResponse*) override {
    closed.push_back(req->volume());
    return Outcome(req->volume());
  }
  grpc::Status GetTarget(grpc::ServerContext*, const dp::GetTargetRequest* req,
                         dp::TargetResponse* resp) override {
    Fill(req->volume(), resp);
    return Outcome(req->volume());
  }
};

class DatapathClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("nbdcsi-dpclient")) << tmp_.error();
    dir_ = tmp_.path();
    target_ = "unix://" + dir_ + "/api.sock";
    grpc::ServerBuilder b;
    b.AddListeningPort(target_, grpc::InsecureServerCredentials());
    b.RegisterService(&attachments_);
    b.RegisterService(&datapath_);
    b.RegisterService(&targets_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    client_ = MakeGrpcDatapathClient(target_, std::chrono::seconds(5), std::chrono::seconds(5));
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
    unlink((dir_ + "/api.sock").c_str());
    rmdir(dir_.c_str());
  }

  test::TempDir tmp_;
  std::string dir_, target_;
  FakeAttachments attachments_;
  FakeDatapathService datapath_;
  FakeTargets targets_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<DatapathClient> client_;
};

TEST_F(DatapathClientTest, Answers) {
  auto a = client_->Attach("good");
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_EQ(a->volume(), "good");
  EXPECT_EQ(a->device(), "/dev/loop7");
  EXPECT_EQ(a->mode(), "fuse");
  EXPECT_TRUE(client_->Detach("good").ok());
  auto r = client_->ResizeAttachment("good");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->size(), 2u << 30);
  auto list = client_->ListAttachments();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[1].device(), "/dev/nbd-b");
  auto v = client_->GetVolume("good");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->size_bytes(), 1u << 30);
  auto s = client_->GetVolumeStats("good");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->write().errors(), 5u);
  auto p = client_->GetPoolInfo();
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->dir(), "/pool");
}

TEST_F(DatapathClientTest, TargetAnswers) {
  auto a = client_->AttachTarget("good");
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_TRUE(a->target()) << "the request did not ask for the target";
  EXPECT_EQ(a->device(), "/dev/nbd3");
  auto plain = client_->Attach("good");
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->target());
  for (auto t : {client_->OpenTarget("good"), client_->GetTarget("good")}) {
    ASSERT_TRUE(t.ok()) << t.status().message();
    EXPECT_EQ(t->volume(), "good");
    EXPECT_EQ(t->epoch(), 3u);
    EXPECT_TRUE(t->degraded());
    ASSERT_EQ(t->replicas_size(), 1);
    EXPECT_EQ(t->replicas(0).node(), "node-b");
  }
  EXPECT_TRUE(client_->CloseTarget("good").ok());
  EXPECT_EQ(targets_.closed, std::vector<std::string>{"good"});
}

TEST_F(DatapathClientTest, ErrorsKeepTheirCode) {
  for (const char* code : {"NOT_FOUND", "ABORTED", "FAILED_PRECONDITION", "INVALID_ARGUMENT",
                           "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL"}) {
    std::vector<Status> results = {
        client_->Attach(code).status(),           client_->Detach(code),
        client_->ResizeAttachment(code).status(), client_->GetVolume(code).status(),
        client_->GetVolumeStats(code).status(),   client_->AttachTarget(code).status(),
        client_->OpenTarget(code).status(),       client_->CloseTarget(code),
        client_->GetTarget(code).status()};
    for (const Status& st : results) {
      ASSERT_FALSE(st.ok()) << code;
      grpc::Status g = ToGrpc(st);
      EXPECT_EQ(Outcome(code).error_code(), g.error_code()) << code << ": " << st.message();
      EXPECT_NE(st.message().find("the datapath's reason"), std::string::npos) << st.message();
      EXPECT_NE(st.message().find(code), std::string::npos) << st.message();
    }
  }
}

TEST_F(DatapathClientTest, DatapathDownIsUnavailable) {
  server_->Shutdown();
  server_.reset();
  auto st = client_->GetPoolInfo().status();
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(ToGrpc(st).error_code(), grpc::StatusCode::UNAVAILABLE) << st.message();
  EXPECT_NE(st.message().find("unavailable"), std::string::npos) << st.message();
}

TEST(GrpcCodeToErrnoTest, RoundTripsThroughErrnoToGrpcCode) {
  using C = grpc::StatusCode;
  for (C c : {C::OK, C::NOT_FOUND, C::ALREADY_EXISTS, C::INVALID_ARGUMENT, C::RESOURCE_EXHAUSTED,
              C::FAILED_PRECONDITION, C::UNAVAILABLE, C::PERMISSION_DENIED, C::OUT_OF_RANGE,
              C::UNIMPLEMENTED, C::CANCELLED, C::DEADLINE_EXCEEDED, C::ABORTED, C::INTERNAL}) {
    EXPECT_EQ(ErrnoToGrpcCode(GrpcCodeToErrno(c)), c) << c;
  }
  // Codes with no errno of their own land on the nearest one.
  EXPECT_EQ(ErrnoToGrpcCode(GrpcCodeToErrno(C::UNAUTHENTICATED)), C::PERMISSION_DENIED);
  EXPECT_EQ(ErrnoToGrpcCode(GrpcCodeToErrno(C::UNKNOWN)), C::INTERNAL);
  EXPECT_EQ(ErrnoToGrpcCode(GrpcCodeToErrno(C::DATA_LOSS)), C::INTERNAL);
}

}  // namespace
}  // namespace nbdcsi::node
