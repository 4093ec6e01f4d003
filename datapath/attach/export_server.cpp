#include "datapath/attach/export_server.h"

#include "datapath/engine/backend.h"
#include "datapath/engine/frontend.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {
namespace {

class FrontendExportServer final : public ExportServer {
 public:
  // The socket path is read once: the front door is listening by now, and Stop() clears it.
  FrontendExportServer(Pool& pool, NbdFrontend& frontend)
      : pool_(pool), frontend_(frontend), socket_(frontend.UnixSocketPath()) {}
  StatusOr<ServedExport> Describe(const std::string& volume) override {
    auto vol = pool_.Acquire(volume);
    if (!vol) return Unavailable(volume);
    ServedExport out;
    out.size_bytes = vol->size();
    out.read_only = vol->read_only();
    return out;
  }
  std::string UnixSocketPath() const override { return socket_; }
  uint64_t OpenConnections(const std::string& volume) override {
    auto vol = pool_.Acquire(volume);
    return vol ? vol->stats().connections() : 0;
  }

  // Why a volume cannot be exported: unknown (ENOENT), or a restore/clone whose background copy
  // still runs (EAGAIN -> UNAVAILABLE, so kubelet's NodeStage retries until it is filled).
  Status Unavailable(const std::string& volume) {
    auto info = pool_.Inspect(volume);
    if (info.ok() && !info->ready) {
      return Error(EAGAIN, "volume {} is not ready: its content is still being copied ({} of {} bytes)",
                   volume, info->copy_done, info->copy_total);
    }
    return Error(ENOENT, "volume {} not found", volume);
  }
  StatusOr<ServedExport> Serve(const std::string& volume, unsigned connections) override {
    auto vol = pool_.Acquire(volume);
    if (!vol) return Unavailable(volume);
    ServedExport out;
    out.size_bytes = vol->size();
    out.read_only = vol->read_only();
    auto fds = frontend_.ServeSocketPairs(volume, connections);
    if (!fds.ok()) return fds.status();
    out.client_fds = std::move(*fds);
    return out;
  }
  StatusOr<std::vector<int>> ServeTarget(const std::string& volume, unsigned connections) override {
    auto fds = frontend_.ServeSocketPairs(volume + std::string(kTargetSuffix), connections);
    if (!fds.ok() && fds.status().code() == ENOENT) {
      return Error(ENOENT, "no target of volume {} is open on this datapath", volume);
    }
    return fds;
  }

 private:
  Pool& pool_;
  NbdFrontend& frontend_;
  std::string socket_;
};

}  // namespace

std::unique_ptr<ExportServer> MakeFrontendExportServer(Pool& pool, NbdFrontend& frontend) {
  return std::make_unique<FrontendExportServer>(pool, frontend);
}

}  // namespace nbdcsi::datapath
