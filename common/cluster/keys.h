// The key layout of the cluster state in etcd, under one prefix (default "/nbd-csi/") so that
// several installations, or tests, can share an etcd:
//
//   PREFIX volumes/<volume>   VolumeState JSON (volume_state.h); no lease
//   PREFIX targets/<volume>   TargetClaim JSON {node, epoch}; attached to the target's lease
//   PREFIX nodes/<node>       "" ; attached to the node's liveness lease
//
// Volume names and node ids never contain '/' (both are validated), so one volume's keys can
// never fall inside another's range.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"

namespace nbdcsi::cluster {

inline constexpr std::string_view kDefaultPrefix = "/nbd-csi/";

class KeyLayout {
 public:
  // EINVAL unless `prefix` is non-empty and ends with '/'.
  static StatusOr<KeyLayout> Make(std::string prefix = std::string(kDefaultPrefix));

  const std::string& prefix() const { return prefix_; }
  std::string Volume(std::string_view name) const {
    return prefix_ + "volumes/" + std::string(name);
  }
  std::string Target(std::string_view name) const {
    return prefix_ + "targets/" + std::string(name);
  }
  std::string Node(std::string_view node) const { return prefix_ + "nodes/" + std::string(node); }
  std::string VolumesPrefix() const { return prefix_ + "volumes/"; }
  std::string NodesPrefix() const { return prefix_ + "nodes/"; }

 private:
  explicit KeyLayout(std::string prefix) : prefix_(std::move(prefix)) {}
  std::string prefix_;
};

}  // namespace nbdcsi::cluster
