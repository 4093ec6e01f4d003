#include "node/datapath_client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"

namespace nbdcsi::node {

namespace {

class GrpcDatapathClient final : public DatapathClient {
 public:
  GrpcDatapathClient(const std::string& target, std::chrono::milliseconds timeout,
                     std::chrono::milliseconds slow_timeout)
      : channel_(grpc::CreateChannel(target, grpc::InsecureChannelCredentials())),
        datapath_(dpv1::Datapath::NewStub(channel_)),
        attachments_(dpv1::Attachments::NewStub(channel_)),
        timeout_(timeout),
        slow_timeout_(slow_timeout) {}

  StatusOr<dpv1::Attachment> Attach(const std::string& volume) override {
    dpv1::AttachVolumeRequest req;
    req.set_volume(volume);
    dpv1::AttachVolumeResponse resp;
    auto ctx = Context(slow_timeout_);
    if (Status s = Check("AttachVolume", volume, attachments_->AttachVolume(ctx.get(), req, &resp));
        !s.ok()) {
      return s;
    }
    return resp.attachment();
  }

  Status Detach(const std::string& volume) override {
    dpv1::DetachVolumeRequest req;
    req.set_volume(volume);
    dpv1::DetachVolumeResponse resp;
    auto ctx = Context(slow_timeout_);
    return Check("DetachVolume", volume, attachments_->DetachVolume(ctx.get(), req, &resp));
  }

  StatusOr<dpv1::Attachment> ResizeAttachment(const std::string& volume) override {
    dpv1::ResizeAttachmentRequest req;
    req.set_volume(volume);
    dpv1::ResizeAttachmentResponse resp;
    auto ctx = Context(slow_timeout_);
    if (Status s = Check("ResizeAttachment", volume,
                         attachments_->ResizeAttachment(ctx.get(), req, &resp));
        !s.ok()) {
      return s;
    }
    return resp.attachment();
  }

  StatusOr<std::vector<dpv1::Attachment>> ListAttachments() override {
    dpv1::ListAttachmentsRequest req;
    dpv1::ListAttachmentsResponse resp;
    auto ctx = Context(timeout_);
    if (Status s =
            Check("ListAttachments", "", attachments_->ListAttachments(ctx.get(), req, &resp));
        !s.ok()) {
      return s;
    }
    return std::vector<dpv1::Attachment>(resp.attachments().begin(), resp.attachments().end());
  }

  StatusOr<dpv1::Volume> GetVolume(const std::string& volume) override {
    dpv1::GetVolumeRequest req;
    req.set_name(volume);
    dpv1::GetVolumeResponse resp;
    auto ctx = Context(timeout_);
    if (Status s = Check("GetVolume", volume, datapath_->GetVolume(ctx.get(), req, &resp));
        !s.ok()) {
      return s;
    }
    return resp.volume();
  }

  StatusOr<dpv1::VolumeStats> GetVolumeStats(const std::string& volume) override {
    dpv1::GetVolumeStatsRequest req;
    req.set_name(volume);
    dpv1::GetVolumeStatsResponse resp;
    auto ctx = Context(timeout_);
    if (Status s =
            Check("GetVolumeStats", volume, datapath_->GetVolumeStats(ctx.get(), req, &resp));
        !s.ok()) {
      return s;
    }
    return resp.stats();
  }

  StatusOr<dpv1::GetPoolInfoResponse> GetPoolInfo() override {
    dpv1::GetPoolInfoRequest req;
    dpv1::GetPoolInfoResponse resp;
    auto ctx = Context(timeout_);
    if (Status s = Check("GetPoolInfo", "", datapath_->GetPoolInfo(ctx.get(), req, &resp));
        !s.ok()) {
      return s;
    }
    return resp;
  }

 private:
  static std::unique_ptr<grpc::ClientContext> Context(std::chrono::milliseconds timeout) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + timeout);
    return ctx;
  }

  // The datapath's own message already names the volume and the cause; say which call it was.
  static Status Check(const char* method, const std::string& volume, const grpc::Status& st) {
    if (st.ok()) return Status::Ok();
    std::string what = volume.empty() ? std::string(method) : fmt::format("{} {}", method, volume);
    if (st.error_code() == grpc::StatusCode::UNAVAILABLE) {
      return Error(EAGAIN, "datapath {}: datapath unavailable: {}", what, st.error_message());
    }
    return Error(GrpcCodeToErrno(st.error_code()), "datapath {}: {}", what, st.error_message());
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<dpv1::Datapath::Stub> datapath_;
  std::unique_ptr<dpv1::Attachments::Stub> attachments_;
  std::chrono::milliseconds timeout_, slow_timeout_;
};

}  // namespace

std::unique_ptr<DatapathClient> MakeGrpcDatapathClient(const std::string& target,
                                                       std::chrono::milliseconds timeout,
                                                       std::chrono::milliseconds slow_timeout) {
  return std::make_unique<GrpcDatapathClient>(target, timeout, slow_timeout);
}

}  // namespace nbdcsi::node
