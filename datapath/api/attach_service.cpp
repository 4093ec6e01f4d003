#include "datapath/api/attach_service.h"

#include <cstring>

#include <spdlog/spdlog.h>

#include "common/grpc_status.h"
#include "datapath/api/attach.grpc.pb.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {
namespace {

namespace v1 = ::nbdcsi::datapath::v1;

grpc::Status Fail(const char* rpc, const Status& s) {
  spdlog::warn("api {}: {} (errno {}: {})", rpc, s.message(), s.code(), std::strerror(s.code()));
  return ToGrpc(s);
}

void Fill(const AttachmentRecord& r, v1::Attachment* out) {
  out->set_volume(r.volume);
  out->set_device(r.device());
  out->set_connections(r.connections);
  out->set_cookie(r.cookie);
  out->set_size(r.size_bytes);
  out->set_read_only(r.read_only);
  out->set_mode(r.mode);
  out->set_link_ok(r.link_ok);
  out->set_link_error(r.link_error);
  out->set_target(r.target);
}

class AttachmentService final : public v1::Attachments::Service {
 public:
  explicit AttachmentService(AttachmentManager& m) : m_(m) {}

  grpc::Status AttachVolume(grpc::ServerContext*, const v1::AttachVolumeRequest* req,
                            v1::AttachVolumeResponse* resp) override {
    if (Status s = ValidateVolumeName(req->volume()); !s.ok()) return Fail("AttachVolume", s);
    if (req->connections() > AttachmentManager::kMaxConnections) {
      return Fail("AttachVolume",
                  Error(EINVAL, "volume \"{}\": {} connections requested; at most {}",
                        req->volume(), req->connections(), AttachmentManager::kMaxConnections));
    }
    auto r = m_.Attach(req->volume(), req->connections(), req->target());
    if (!r.ok()) return Fail("AttachVolume", r.status());
    spdlog::info("api AttachVolume: {}volume \"{}\" on {} ({}, {} connection(s))",
                 r->target ? "target of " : "", r->volume, r->device(), r->mode, r->connections);
    Fill(*r, resp->mutable_attachment());
    return grpc::Status::OK;
  }

  grpc::Status DetachVolume(grpc::ServerContext*, const v1::DetachVolumeRequest* req,
                            v1::DetachVolumeResponse*) override {
    if (Status s = ValidateVolumeName(req->volume()); !s.ok()) return Fail("DetachVolume", s);
    if (Status s = m_.Detach(req->volume()); !s.ok()) return Fail("DetachVolume", s);
    spdlog::info("api DetachVolume: volume \"{}\" detached", req->volume());
    return grpc::Status::OK;
  }

  grpc::Status ListAttachments(grpc::ServerContext*, const v1::ListAttachmentsRequest*,
                               v1::ListAttachmentsResponse* resp) override {
    for (const auto& r : m_.List()) Fill(r, resp->add_attachments());  // List() is sorted
    return grpc::Status::OK;
  }

  grpc::Status ResizeAttachment(grpc::ServerContext*, const v1::ResizeAttachmentRequest* req,
                                v1::ResizeAttachmentResponse* resp) override {
    if (Status s = ValidateVolumeName(req->volume()); !s.ok()) return Fail("ResizeAttachment", s);
    auto r = m_.Resize(req->volume());
    if (!r.ok()) return Fail("ResizeAttachment", r.status());
    spdlog::info("api ResizeAttachment: volume \"{}\" on {} is {} bytes", r->volume, r->device(),
                 r->size_bytes);
    Fill(*r, resp->mutable_attachment());
    return grpc::Status::OK;
  }

 private:
  AttachmentManager& m_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeAttachmentService(AttachmentManager& manager) {
  return std::make_unique<AttachmentService>(manager);
}

}  // namespace nbdcsi::datapath
