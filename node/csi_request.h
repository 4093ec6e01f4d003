// What the Node RPCs take from their requests, checked before anything is touched: the node
// paths (staging and target paths, --kubelet-root) and the volume capability. Pure functions
// over the request; node_service.cpp does the work.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "csi/csi.grpc.pb.h"

namespace nbdcsi::node {

// The path rules for staging and target paths: absolute, not "/", no empty, "." or ".."
// components, no trailing '/', shorter than PATH_MAX. EINVAL names `what` and the rule.
Status ValidateNodePath(const std::string& what, const std::string& path);

// --kubelet-root: a clean absolute path ("/" allowed), no trailing '/'. EINVAL naming the rule.
Status ValidateKubeletRoot(const std::string& root);

// ValidateNodePath, then: `path` lies strictly beneath `root` (component-wise, so /var/lib/kubeletx
// is not beneath /var/lib/kubelet). EINVAL names `what`, the path and the root.
Status ValidatePathUnderRoot(const std::string& what, const std::string& path,
                             const std::string& root);

// What a VolumeCapability asks for, checked.
struct Capability {
  bool block = false;
  std::string fstype;              // mount volumes: "ext4" or "xfs"
  std::vector<std::string> flags;  // mount volumes: the mount_flags
  bool reader_only = false;        // the access mode allows no writes
  bool single_writer = false;      // SINGLE_NODE_SINGLE_WRITER: one target path at a time
  bool ro_stage = false;           // mount volumes: staged read-only (reader_only or an "ro" flag)
};

StatusOr<Capability> ParseCapability(const ::csi::v1::VolumeCapability& cap);

// "a,b,c": mount options as one string.
std::string Join(const std::vector<std::string>& v);

}  // namespace nbdcsi::node
