// What the node plugin asks of its local nbd-datapathd: attach and detach volumes, tell a device
// its new size, and read volume state for stats and health. An interface so the node service is
// unit-tested against an in-process fake; MakeGrpcDatapathClient is the real one, over the
// datapath's 0600 unix socket (Datapath + Attachments services, no TLS).
//
// Errors keep the datapath's gRPC code through GrpcCodeToErrno / ToGrpc (NOT_FOUND stays
// NOT_FOUND, ABORTED stays ABORTED, ...), with the datapath's message.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/support/status.h>

#include "common/grpc_status.h"
#include "common/status.h"
#include "datapath/api/attach.pb.h"
#include "datapath/api/datapath.pb.h"

namespace nbdcsi::node {

namespace dpv1 = ::nbdcsi::datapath::v1;

class DatapathClient {
 public:
  virtual ~DatapathClient() = default;
  // Idempotent on the datapath side: a live attachment is returned as is.
  virtual StatusOr<dpv1::Attachment> Attach(const std::string& volume) = 0;
  // Idempotent: OK when not attached. EBUSY (FAILED_PRECONDITION) while the device is mounted.
  virtual Status Detach(const std::string& volume) = 0;
  // ENOENT when not attached.
  virtual StatusOr<dpv1::Attachment> ResizeAttachment(const std::string& volume) = 0;
  virtual StatusOr<std::vector<dpv1::Attachment>> ListAttachments() = 0;
  virtual StatusOr<dpv1::Volume> GetVolume(const std::string& volume) = 0;
  virtual StatusOr<dpv1::VolumeStats> GetVolumeStats(const std::string& volume) = 0;
  virtual StatusOr<dpv1::GetPoolInfoResponse> GetPoolInfo() = 0;
};

// `target` is a gRPC target ("unix:///run/nbd-csi/datapath.sock"). Calls that are not answered
// within `timeout` fail with ETIMEDOUT; attach and detach get `slow_timeout` (they wait for the
// kernel, or for nbdfuse and a loop device).
std::unique_ptr<DatapathClient> MakeGrpcDatapathClient(
    const std::string& target, std::chrono::milliseconds timeout = std::chrono::seconds(10),
    std::chrono::milliseconds slow_timeout = std::chrono::seconds(60));

}  // namespace nbdcsi::node
