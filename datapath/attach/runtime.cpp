#include "datapath/attach/runtime.h"

#include <spdlog/spdlog.h>

namespace nbdcsi::datapath {

AttachRuntime::AttachRuntime(std::unique_ptr<KernelNbdInterface> kernel,
                             std::unique_ptr<ExportServer> exports, const std::string& dir,
                             const AttachOptions& opts)
    : kernel_(std::move(kernel)),
      exports_(std::move(exports)),
      opts_(opts),
      manager_(dir, *kernel_, *exports_, opts) {}

AttachRuntime::~AttachRuntime() { kernel_->StopWatching(); }

StatusOr<std::unique_ptr<AttachRuntime>> AttachRuntime::Start(Pool& pool, NbdFrontend& frontend,
                                                              const std::string& dir,
                                                              const AttachOptions& opts) {
  std::unique_ptr<AttachRuntime> rt(
      new AttachRuntime(MakeLinuxKernelNbd(), MakeFrontendExportServer(pool, frontend), dir, opts));
  if (Status st = rt->manager_.Init(); !st.ok()) return st;
  rt->Recover();
  rt->WatchLinkDead();
  return rt;
}

void AttachRuntime::Recover() {
  RecoverReport rep = manager_.Recover();
  if (Status k = kernel_->Available(); !k.ok()) spdlog::warn("attach: {}", k.message());
  spdlog::info("attach: {} device(s) reconnected, {} record(s) dropped, {} failed",
               rep.reconnected.size(), rep.dropped.size(), rep.failed.size());
  for (const auto& f : rep.failed) spdlog::error("attach: not recovered: {}", f);
}

void AttachRuntime::WatchLinkDead() {
  if (!kernel_->Available().ok()) return;
  Status st = kernel_->WatchLinkDead([this](int index) {
    (void)manager_.OnLinkDead(index);  // logs its own outcome
  });
  if (!st.ok()) spdlog::warn("attach: connections the kernel drops stay dropped: {}", st.message());
}

void AttachRuntime::Stop() {
  kernel_->StopWatching();
  size_t kernel_n = 0, fuse_n = 0;
  for (const auto& a : manager_.List()) (a.fuse() ? fuse_n : kernel_n)++;
  if (kernel_n) {
    spdlog::info("attach: {} kernel device(s) stay attached; restart within {} s to reconnect them",
                 kernel_n, opts_.dead_conn_timeout_s);
  }
  if (fuse_n) {
    spdlog::warn("attach: {} fuse attachment(s) lose their link now (nbdfuse cannot reconnect): "
                 "unmount and detach them after the restart", fuse_n);
  }
}

}  // namespace nbdcsi::datapath
