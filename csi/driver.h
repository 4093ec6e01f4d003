// Facts about the driver that every CSI binary reports the same way.
#pragma once

#include <string>

namespace nbdcsi::csi {

inline constexpr char kDriverName[] = "nbd.csi.io";
// The one topology segment: the node whose pool holds the volume.
inline constexpr char kTopologyKey[] = "topology.nbd.csi.io/node";

// The project version (CMake PROJECT_VERSION), plus the git commit when the build knew it.
std::string DriverVersion();

}  // namespace nbdcsi::csi
