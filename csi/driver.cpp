#include "csi/driver.h"

#ifndef NBDCSI_VERSION
#error "NBDCSI_VERSION must be defined by the build (csi/CMakeLists.txt)"
#endif

namespace nbdcsi::csi {

std::string DriverVersion() {
  std::string v = NBDCSI_VERSION;
#ifdef NBDCSI_GIT_COMMIT
  // Semver build metadata: two builds of one release stay distinguishable in GetPluginInfo.
  if (sizeof(NBDCSI_GIT_COMMIT) > 1) v += "+" NBDCSI_GIT_COMMIT;
#endif
  return v;
}

}  // namespace nbdcsi::csi
