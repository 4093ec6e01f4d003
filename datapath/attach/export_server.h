// What device attachment needs from the NBD engine: a volume's export served over fresh sockets
// that are already in the transmission phase (the kernel never negotiates), and where a local
// NBD client such as nbdfuse connects. The only place the attach module reaches into the engine
// (frontend.h), so the dependency runs one way: attach -> engine.
#pragma once

#include <cerrno>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace nbdcsi::datapath {

class NbdFrontend;
class Pool;

// The export side of an attachment: sockets already in the transmission phase, plus what the
// kernel must be told about the export.
struct ServedExport {
  std::vector<int> client_fds;  // owned by the receiver
  uint64_t size_bytes = 0;
  bool read_only = false;
};

class ExportServer {
 public:
  virtual ~ExportServer() = default;
  virtual StatusOr<ServedExport> Serve(const std::string& volume, unsigned connections) = 0;
  // The volume's current size and read-only flag, with no sockets. ENOENT if not exported.
  virtual StatusOr<ServedExport> Describe(const std::string& volume) = 0;
  // How many NBD connections the engine holds open on the volume (0 when it is not exported).
  virtual uint64_t OpenConnections(const std::string& volume) {
    (void)volume;
    return 0;
  }
  // The daemon's Unix NBD socket, where nbdfuse connects; "" when there is none.
  virtual std::string UnixSocketPath() const { return ""; }
  // Sockets on the backend export VOLUME@target (a replicated volume's target open on this
  // datapath, issue 16); its size comes from TargetAccess, as the engine keeps it to itself.
  // ENOENT when no such export is registered.
  virtual StatusOr<std::vector<int>> ServeTarget(const std::string& volume, unsigned connections) {
    (void)volume;
    (void)connections;
    return Error(ENOENT, "no target exports here");
  }
};

// What attaching a target needs from the cluster agent (datapath/replica), which this module does
// not link: datapath/daemon/cluster_wiring.cpp adapts replica::ClusterAgent to it.
class TargetAccess {
 public:
  virtual ~TargetAccess() = default;
  // The size of the target of `volume` open on this datapath; ENOENT when none is open.
  virtual StatusOr<uint64_t> OpenTargetSize(const std::string& volume) = 0;
  // Opens the target of `volume` (claims it, connects to its replicas) and returns its size.
  // Recovery after a datapath restart calls it: the agent keeps no state across restarts, so
  // the devices recorded as targets would otherwise have nothing to be served from.
  virtual StatusOr<uint64_t> ReopenTarget(const std::string& volume) = 0;
  // The volume was expanded: the open target of `volume` takes the size in the cluster state
  // (replica::Target::Grow) and returns it. ENOENT when none is open here.
  virtual StatusOr<uint64_t> GrowTarget(const std::string& volume) = 0;
};

// ExportServer over the real engine (NbdFrontend::ServeSocketPairs) and pool.
std::unique_ptr<ExportServer> MakeFrontendExportServer(Pool& pool, NbdFrontend& frontend);

}  // namespace nbdcsi::datapath
