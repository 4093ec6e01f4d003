// The CSI Node service: what kubelet calls to put a volume into a pod.
//
//   NodeStageVolume    attach through the local datapath; mount volumes: format a blank device
//                      (ext4 or xfs), mount it at the staging path
//   NodePublishVolume  bind the staging mount (or, for block volumes, the device node) onto the
//                      pod's target path, read-only when asked
//   NodeUnpublish/NodeUnstage  undo that; success means nothing is left mounted or attached
//   NodeExpandVolume   tell the device its new size, grow the file system online
//   NodeGetVolumeStats bytes/inodes and a VolumeCondition
//
// Every call checks the real state first (mount table, attachments) and succeeds when the work
// is already done: kubelet retries everything. All OS effects go through NodeOs, all datapath
// calls through DatapathClient.
//
// Replicated volumes ("r1:NAME", issue 16) have no home node: any node stages them. Stage opens
// the volume's target on the local datapath (which claims it in the cluster state and connects to
// its replicas), attaches the kernel device to the target, then formats and mounts as for any
// volume; a stage that fails takes back the device and the target it made itself (never a target
// with a device still on it). Unstage detaches, then closes the target, releasing the claim.
// Publish and unpublish are those of any volume. Stats report the target's health: abnormal when
// it is degraded (fewer replicas in sync than the volume has), stopped, or not open here.
//
// Error choices where the CSI spec leaves room:
// - A volume id that does not parse, or that names another node, is NOT_FOUND for the calls
//   that need the volume (stage, publish, expand, stats): no volume of this node has that id.
//   Unstage and unpublish still clean their path (it is kubelet's) and then succeed: there is
//   nothing of that id attached here.
// - Bad paths (relative, "/", "..", "." or empty components, outside the kubelet root, or
//   resolving outside it through a symlink) and unsupported capabilities (MULTI_NODE_* access
//   modes, a file system other than ext4/xfs) are INVALID_ARGUMENT: the spec's tables have no
//   code of their own for a bad path, and nothing is touched for one.
// - Stage on a device that holds something other than the requested file system (another file
//   system, a partition table, an unknown signature) is FAILED_PRECONDITION: it is never
//   formatted. A staging or target path that already has something else mounted is
//   ALREADY_EXISTS.
// - Publish before stage (nothing mounted at the staging path, or the volume not attached) and
//   a missing staging_target_path are FAILED_PRECONDITION.
// - OS failures (mount, mkfs, resize tools) are INTERNAL with the tool's message; datapath
//   errors keep the datapath's code.
// - r1: another node's live claim on the volume is UNAVAILABLE, naming that node: it goes away
//   when the holder unstages, or with its cluster lease when that node died, and kubelet retries.
//   A datapath without --cluster-etcd is FAILED_PRECONDITION. NodeExpandVolume is OUT_OF_RANGE
//   (replicated volumes keep their size for now: the table's "capacity range not allowed").
#pragma once

#include <memory>
#include <string>

#include "csi/csi.grpc.pb.h"
#include "node/csi_request.h"  // the path rules, which node/main.cpp and tests use too
#include "node/datapath_client.h"
#include "node/os.h"

namespace nbdcsi::node {

struct NodeOptions {
  std::string node_id;  // a valid Kubernetes node name (csi/ids.h ValidateNodeId)
  // NodeGetInfo max_volumes_per_node. 0: the number of /dev/nbd* devices, or kFuseMaxVolumes
  // when there are none (the nbdfuse + loop fallback, whose loop devices are made on demand).
  unsigned max_volumes = 0;
  // Staging, target and volume paths must lie beneath it (lexically, and resolved without
  // leaving it: NodeOs::CheckBeneath). A clean absolute path (ValidateKubeletRoot).
  std::string kubelet_root = "/var/lib/kubelet";
};

inline constexpr unsigned kFuseMaxVolumes = 64;

// The service without locking: callers must not run two calls on one volume at once.
// `os` and `datapath` must outlive it.
std::unique_ptr<::csi::v1::Node::Service> MakeNodeService(NodeOptions opts, NodeOs& os,
                                                          DatapathClient& datapath);

// The decorator kubelet talks to: one call per volume id at a time, a second concurrent call on
// the same id gets ABORTED (CSI spec) instead of waiting or racing. Calls without a volume id go
// straight through (the inner service rejects them).
std::unique_ptr<::csi::v1::Node::Service> MakeLockedNodeService(
    std::unique_ptr<::csi::v1::Node::Service> inner);

}  // namespace nbdcsi::node
