// The gRPC Attachments service (datapath/api/attach.proto) over an AttachmentManager. It is
// registered on the same server as the Datapath service (StartApiServer's extra services).
#pragma once

#include <memory>

#include <grpcpp/impl/codegen/service_type.h>

#include "datapath/attach/attachments.h"

namespace nbdcsi::datapath {

// The manager must outlive the service. Handlers block (a detach waits for the kernel for up to
// AttachOptions::detach_wait), which is fine on the synchronous server's thread pool.
std::unique_ptr<grpc::Service> MakeAttachmentService(AttachmentManager& manager);

}  // namespace nbdcsi::datapath
