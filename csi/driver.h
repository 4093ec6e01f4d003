// Facts about the driver that every CSI binary reports the same way.
#pragma once

#include <string>
#include <string_view>

namespace nbdcsi::csi {

inline constexpr char kDriverName[] = "nbd.csi.io";
// The one topology segment: the node whose pool holds the volume.
inline constexpr char kTopologyKey[] = "topology.nbd.csi.io/node";

// The file systems a mount volume may ask for (StorageClass csi.storage.k8s.io/fstype), the first
// being the default for an empty fs_type. One list for the controller, which refuses the others
// at CreateVolume, and the node, which makes and grows them.
inline constexpr std::string_view kFileSystems[] = {"ext4", "xfs"};
inline constexpr char kFileSystemList[] = "ext4 or xfs";
inline bool IsSupportedFileSystem(std::string_view fs) {
  for (std::string_view f : kFileSystems) {
    if (f == fs) return true;
  }
  return false;
}

// The project version (CMake PROJECT_VERSION), plus the git commit when the build knew it.
std::string DriverVersion();

}  // namespace nbdcsi::csi
