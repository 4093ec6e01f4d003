// The Node RPCs' request checks (csi_request.h).
#include "node/csi_request.h"

#include <climits>

#include "csi/driver.h"
#include "node/os.h"

namespace nbdcsi::node {

namespace v1 = ::csi::v1;
using AccessMode = v1::VolumeCapability::AccessMode;

Status ValidateNodePath(const std::string& what, const std::string& path) {
  if (path.empty()) return Error(EINVAL, "{} is missing", what);
  if (path.size() >= PATH_MAX) {
    return Error(EINVAL, "{} is {} bytes long (limit {})", what, path.size(), PATH_MAX - 1);
  }
  if (path.find('\0') != std::string::npos) return Error(EINVAL, "{} contains a NUL byte", what);
  if (path[0] != '/') return Error(EINVAL, "{} \"{}\" is not an absolute path", what, path);
  if (path == "/") return Error(EINVAL, "{} must not be \"/\"", what);
  if (path.back() == '/') return Error(EINVAL, "{} \"{}\" ends with '/'", what, path);
  size_t pos = 1;
  while (pos <= path.size()) {
    size_t slash = path.find('/', pos);
    if (slash == std::string::npos) slash = path.size();
    std::string part = path.substr(pos, slash - pos);
    if (part.empty() || part == "." || part == "..") {
      return Error(EINVAL, "{} \"{}\" is not a clean path (\"{}\" component)", what, path, part);
    }
    pos = slash + 1;
  }
  return Status::Ok();
}

Status ValidateKubeletRoot(const std::string& root) {
  if (root == "/") return Status::Ok();
  Status s = ValidateNodePath("--kubelet-root", root);
  return s;
}

Status ValidatePathUnderRoot(const std::string& what, const std::string& path,
                             const std::string& root) {
  if (Status s = ValidateNodePath(what, path); !s.ok()) return s;
  if (root == "/") return Status::Ok();
  if (path.size() <= root.size() + 1 || path.compare(0, root.size(), root) != 0 ||
      path[root.size()] != '/') {
    return Error(EINVAL, "{} \"{}\" is not beneath the kubelet root {} (--kubelet-root)", what,
                 path, root);
  }
  return Status::Ok();
}

StatusOr<Capability> ParseCapability(const v1::VolumeCapability& cap) {
  Capability c;
  switch (cap.access_mode().mode()) {
    case AccessMode::SINGLE_NODE_WRITER:
    case AccessMode::SINGLE_NODE_MULTI_WRITER: break;
    case AccessMode::SINGLE_NODE_SINGLE_WRITER: c.single_writer = true; break;
    case AccessMode::SINGLE_NODE_READER_ONLY: c.reader_only = true; break;
    case AccessMode::UNKNOWN: return Error(EINVAL, "volume_capability.access_mode is missing");
    default:
      return Error(EINVAL, "access mode {} is not supported: volumes live on one node's disk",
                   AccessMode::Mode_Name(cap.access_mode().mode()));
  }
  if (cap.has_block()) {
    c.block = true;
    return c;
  }
  if (!cap.has_mount()) return Error(EINVAL, "volume_capability has neither block nor mount");
  c.fstype = cap.mount().fs_type().empty() ? std::string(csi::kFileSystems[0])
                                            : cap.mount().fs_type();
  if (!csi::IsSupportedFileSystem(c.fstype)) {
    return Error(EINVAL, "fsType \"{}\" is not supported ({})", cap.mount().fs_type(),
                 csi::kFileSystemList);
  }
  for (const auto& f : cap.mount().mount_flags()) {
    if (f.empty() || f.find_first_of(std::string(" \t\n\0", 4)) != std::string::npos) {
      return Error(EINVAL, "mount flag \"{}\" is empty or contains white space", f);
    }
    c.flags.push_back(f);
    c.ro_stage = c.ro_stage || HasMountOption(f, "ro");
  }
  c.ro_stage = c.ro_stage || c.reader_only;
  return c;
}

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : ",") + x;
  return out;
}

}  // namespace nbdcsi::node
