// What the node plugin asks of its local nbd-datapathd: attach and detach volumes, tell a device
// its new size, read volume state for stats and health, and open and close the targets of
// replicated volumes. An interface so the node service is unit-tested against an in-process fake;
// MakeGrpcDatapathClient is the real one, over the datapath's 0600 unix socket (Datapath,
// Attachments and Targets services, no TLS).
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
#include "datapath/api/target.pb.h"

namespace nbdcsi::node {

namespace dpv1 = ::nbdcsi::datapath::v1;

class DatapathClient {
 public:
  virtual ~DatapathClient() = default;
  // Idempotent on the datapath side: a live attachment is returned as is.
  virtual StatusOr<dpv1::Attachment> Attach(const std::string& volume) = 0;
  // The kernel device on the target of replicated volume `volume` open on this datapath
  // (AttachVolume with `target`). ENOENT when no target of it is open here; EBUSY when the
  // datapath has no cluster or kernel NBD, or `volume` is attached here as a local volume.
  virtual StatusOr<dpv1::Attachment> AttachTarget(const std::string& volume) = 0;
  // Idempotent: OK when not attached. EBUSY (FAILED_PRECONDITION) while the device is mounted.
  virtual Status Detach(const std::string& volume) = 0;
  // ENOENT when not attached.
  virtual StatusOr<dpv1::Attachment> ResizeAttachment(const std::string& volume) = 0;
  virtual StatusOr<std::vector<dpv1::Attachment>> ListAttachments() = 0;
  virtual StatusOr<dpv1::Volume> GetVolume(const std::string& volume) = 0;
  virtual StatusOr<dpv1::VolumeStats> GetVolumeStats(const std::string& volume) = 0;
  virtual StatusOr<dpv1::GetPoolInfoResponse> GetPoolInfo() = 0;

  // Targets (datapath/api/target.proto). Every call is EBUSY (FAILED_PRECONDITION) when the
  // datapath runs without --cluster-etcd. OpenTarget is idempotent (a target open here is
  // returned as is); EBUSY too when another node holds the volume's claim, the message naming it.
  virtual StatusOr<dpv1::Target> OpenTarget(const std::string& volume) = 0;
  // ENOENT when no target of `volume` is open here.
  virtual Status CloseTarget(const std::string& volume) = 0;
  virtual StatusOr<dpv1::Target> GetTarget(const std::string& volume) = 0;
};

// `target` is a gRPC target ("unix:///run/nbd-csi/datapath.sock"). Calls that are not answered
// within `timeout` fail with ETIMEDOUT; attach and detach get `slow_timeout` (they wait for the
// kernel, or for nbdfuse and a loop device).
std::unique_ptr<DatapathClient> MakeGrpcDatapathClient(
    const std::string& target, std::chrono::milliseconds timeout = std::chrono::seconds(10),
    std::chrono::milliseconds slow_timeout = std::chrono::seconds(60));

}  // namespace nbdcsi::node
