#include "node/datapath_client.h"

#include <string_view>
#include <type_traits>
#include <utility>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "common/grpc_reconnect.h"
#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/target.grpc.pb.h"

namespace nbdcsi::node {

namespace {

class GrpcDatapathClient final : public DatapathClient {
 public:
  GrpcDatapathClient(const std::string& target, std::chrono::milliseconds timeout,
                     std::chrono::milliseconds slow_timeout)
      : channel_(grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), Args())),
        datapath_(dpv1::Datapath::NewStub(channel_)),
        attachments_(dpv1::Attachments::NewStub(channel_)),
        targets_(dpv1::Targets::NewStub(channel_)),
        timeout_(timeout),
        slow_timeout_(slow_timeout) {}

  // A restarted datapath (the node's most common fault) is dialled again within a second, not
  // after gRPC's default backoff of up to two minutes: until then every stage and every volume's
  // condition would say "datapath unreachable".
  static grpc::ChannelArguments Args() {
    grpc::ChannelArguments args;
    SetPromptReconnect(args);
    return args;
  }

  StatusOr<dpv1::Attachment> Attach(const std::string& volume) override {
    dpv1::AttachVolumeRequest req;
    req.set_volume(volume);
    return Call(*attachments_, &Attachments::AttachVolume, req, volume, slow_timeout_,
                [](auto& r) { return r.attachment(); });
  }

  StatusOr<dpv1::Attachment> AttachTarget(const std::string& volume) override {
    dpv1::AttachVolumeRequest req;
    req.set_volume(volume);
    req.set_target(true);
    return Call(*attachments_, &Attachments::AttachVolume, req, volume, slow_timeout_,
                [](auto& r) { return r.attachment(); });
  }

  Status Detach(const std::string& volume) override {
    dpv1::DetachVolumeRequest req;
    req.set_volume(volume);
    return Call(*attachments_, &Attachments::DetachVolume, req, volume, slow_timeout_,
                [](auto&) { return true; })
        .status();
  }

  StatusOr<dpv1::Attachment> ResizeAttachment(const std::string& volume) override {
    dpv1::ResizeAttachmentRequest req;
    req.set_volume(volume);
    return Call(*attachments_, &Attachments::ResizeAttachment, req, volume, slow_timeout_,
                [](auto& r) { return r.attachment(); });
  }

  StatusOr<std::vector<dpv1::Attachment>> ListAttachments() override {
    return Call(*attachments_, &Attachments::ListAttachments, dpv1::ListAttachmentsRequest(), "",
                timeout_, [](auto& r) {
                  return std::vector<dpv1::Attachment>(r.attachments().begin(),
                                                       r.attachments().end());
                });
  }

  StatusOr<dpv1::Volume> GetVolume(const std::string& volume) override {
    dpv1::GetVolumeRequest req;
    req.set_name(volume);
    return Call(*datapath_, &Datapath::GetVolume, req, volume, timeout_,
                [](auto& r) { return r.volume(); });
  }

  StatusOr<dpv1::VolumeStats> GetVolumeStats(const std::string& volume) override {
    dpv1::GetVolumeStatsRequest req;
    req.set_name(volume);
    return Call(*datapath_, &Datapath::GetVolumeStats, req, volume, timeout_,
                [](auto& r) { return r.stats(); });
  }

  StatusOr<dpv1::GetPoolInfoResponse> GetPoolInfo() override {
    return Call(*datapath_, &Datapath::GetPoolInfo, dpv1::GetPoolInfoRequest(), "", timeout_,
                [](auto& r) { return r; });
  }

  // Opening connects to the replicas over TLS and claims the volume in etcd: a slow call.
  StatusOr<dpv1::Target> OpenTarget(const std::string& volume) override {
    dpv1::OpenTargetRequest req;
    req.set_volume(volume);
    return Call(*targets_, &Targets::OpenTarget, req, volume, slow_timeout_,
                [](auto& r) { return r.target(); });
  }

  Status CloseTarget(const std::string& volume) override {
    dpv1::CloseTargetRequest req;
    req.set_volume(volume);
    return Call(*targets_, &Targets::CloseTarget, req, volume, slow_timeout_,
                [](auto&) { return true; })
        .status();
  }

  StatusOr<dpv1::Target> GetTarget(const std::string& volume) override {
    dpv1::GetTargetRequest req;
    req.set_volume(volume);
    return Call(*targets_, &Targets::GetTarget, req, volume, timeout_,
                [](auto& r) { return r.target(); });
  }

 private:
  using Datapath = dpv1::Datapath::Stub;
  using Attachments = dpv1::Attachments::Stub;
  using Targets = dpv1::Targets::Stub;

  // One call with its own deadline: the answer's part that `take` picks, or the error (Check).
  template <typename Stub, typename Req, typename Resp, typename Take>
  static auto Call(Stub& stub,
                   grpc::Status (Stub::*method)(grpc::ClientContext*, const Req&, Resp*),
                   const Req& req, const std::string& volume, std::chrono::milliseconds timeout,
                   Take take) -> StatusOr<std::decay_t<decltype(take(std::declval<Resp&>()))>> {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + timeout);
    Resp resp;
    if (Status s = Check(MethodName(req), volume, (stub.*method)(&ctx, req, &resp)); !s.ok()) {
      return s;
    }
    return take(resp);
  }

  // "GetVolume" for a GetVolumeRequest: the call's name, for messages.
  template <typename Req>
  static std::string MethodName(const Req&) {
    std::string n(Req::descriptor()->name());
    return n.substr(0, n.size() - std::string_view("Request").size());
  }

  // The datapath's own message already names the volume and the cause; say which call it was.
  static Status Check(const std::string& method, const std::string& volume,
                      const grpc::Status& st) {
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
  std::unique_ptr<dpv1::Targets::Stub> targets_;
  std::chrono::milliseconds timeout_, slow_timeout_;
};

}  // namespace

std::unique_ptr<DatapathClient> MakeGrpcDatapathClient(const std::string& target,
                                                       std::chrono::milliseconds timeout,
                                                       std::chrono::milliseconds slow_timeout) {
  return std::make_unique<GrpcDatapathClient>(target, timeout, slow_timeout);
}

}  // namespace nbdcsi::node
