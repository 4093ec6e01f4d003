// The attachment side of nbd-datapathd, wired in the order the daemon needs: start it after the
// engine serves (reconnecting a device means serving it at once) and before the API (so no attach
// or detach races with the reconnects); stop it before the engine stops.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "datapath/attach/attachments.h"

namespace nbdcsi::datapath {

class NbdFrontend;
class Pool;

class AttachRuntime {
 public:
  // Opens the records in `dir` (POOL/attachments), gives every device the kernel still holds for
  // us fresh sockets (within its dead-connection timeout), and starts watching for sockets the
  // kernel drops while we live. Fails only when the records directory cannot be made.
  static StatusOr<std::unique_ptr<AttachRuntime>> Start(Pool& pool, NbdFrontend& frontend,
                                                        const std::string& dir,
                                                        const AttachOptions& opts);
  ~AttachRuntime();

  AttachmentManager& manager() { return manager_; }

  // At shutdown, before the engine closes the sockets: our own shutdown must not look like links
  // to repair. Attached devices stay attached on purpose: the kernel queues their I/O for the
  // dead-connection timeout and the next start reconnects them (an upgrade or restart must not
  // fail I/O; detaching is an explicit API call). This says so in the log.
  void Stop();

 private:
  AttachRuntime(std::unique_ptr<KernelNbdInterface> kernel, std::unique_ptr<ExportServer> exports,
                const std::string& dir, const AttachOptions& opts);
  void Recover();
  void WatchLinkDead();

  std::unique_ptr<KernelNbdInterface> kernel_;
  std::unique_ptr<ExportServer> exports_;
  AttachOptions opts_;
  // Destroyed first; the destructor stops the watcher (which calls into it) before that.
  AttachmentManager manager_;
};

}  // namespace nbdcsi::datapath
