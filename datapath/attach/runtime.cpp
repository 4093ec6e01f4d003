#include "datapath/attach/runtime.h"

#include <cerrno>

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
  if (!opts.fuse_fallback) {
    // Refusing to start is what makes a node without nbd.ko visible (a crash-looping pod), where
    // serving with every attach failing would only show up at the first pod that needs a volume.
    if (Status k = rt->kernel_->Available(); !k.ok()) {
      return Error(ENODEV, "{}: and --require-kernel-nbd refuses the nbdfuse fallback (load it "
                   "with modprobe nbd)", k.message());
    }
  }
  if (Status st = rt->manager_.Init(); !st.ok()) return st;
  rt->Recover();
  rt->WatchLinkDead();
  return rt;
}

void AttachRuntime::Recover() {
  RecoverReport rep = manager_.Recover();
  if (Status k = kernel_->Available(); !k.ok()) {
    // Once, at start-up, before any volume needs it: on a node without nbd.ko every volume takes
    // the fallback, and nothing else in the log says so until the first attach.
    spdlog::warn("attach: *** {}: volumes attach through the nbdfuse + loop FALLBACK: slower, "
                 "and a datapath restart breaks their I/O; load nbd.ko (modprobe nbd) or run with "
                 "--require-kernel-nbd to refuse the fallback ***", k.message());
  } else {
    spdlog::info("attach: kernel NBD available: volumes attach as /dev/nbdN{}",
                 opts_.fuse_fallback ? "" : " (--require-kernel-nbd: no nbdfuse fallback)");
  }
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
