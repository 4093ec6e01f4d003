// Attachments of pool volumes as local block devices, and their durable records. Two modes:
//
//   "kernel"  /dev/nbdN served by this process over socketpairs. The records let a restarted
//             nbd-datapathd hand fresh sockets to devices the kernel kept alive for it
//             (NBD_CMD_RECONFIGURE within the dead-connection timeout).
//   "fuse"    /dev/loopN over a file that libnbd's nbdfuse serves from this daemon's Unix NBD
//             socket (fuse_attach.h). Chosen automatically, per attach, only when the kernel has
//             no NBD driver; slower, and it does not survive a datapath restart: a recovered
//             fuse record is reported with link_ok=false until it is detached (which still
//             cleans everything up: loop device, mount, nbdfuse).
//
// Records live in POOL/attachments/NAME.json (record.h). A record is written, with index -1,
// BEFORE the kernel is asked to CONNECT, and completed after: a crash in between leaves a record
// whose cookie Recover() can still find in /sys/block/nbd*/backend, so no device is ever attached
// without a record that names it. A fuse record is likewise written before nbdfuse
// starts (with the mount point every later cleanup starts from), again with nbdfuse's pid, and
// completed with the loop index.
//
// A replicated volume's target (issue 16: the backend export VOLUME@target that the cluster
// agent opened here) attaches like a local volume in kernel mode, with `target` in its record:
// the device is served from ServeTarget, its size is the target's (Resize grows both), and
// it cannot be resized yet (ENOTSUP). The nbdfuse fallback is refused for it (ENODEV): nbdfuse
// needs the growable export VOLUME@grow, which a backend export does not combine with, and a
// target's device must survive a datapath restart, which nbdfuse does not. Detach leaves the
// target open (the node plugin closes it, CloseTarget, at unstage). After a restart, Recover()
// reopens each recorded target through TargetAccess::ReopenTarget before it re-feeds the device;
// without TargetAccess, or when the reopen fails, the device is kept with link_ok=false and the
// reason, so the kernel keeps queueing I/O until its dead-connection timeout and an operator
// (or the next attach) can still act.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/name_locks.h"
#include "common/status.h"
#include "datapath/attach/export_server.h"
#include "datapath/attach/fuse_attach.h"
#include "datapath/attach/kernel_nbd.h"
#include "datapath/attach/record.h"

namespace nbdcsi::datapath {

struct AttachOptions {
  unsigned default_connections = 0;  // 0: min(nproc, 4)
  uint64_t dead_conn_timeout_s = 120;
  uint64_t io_timeout_s = 30;  // see KernelConnectParams::io_timeout_s
  unsigned max_sectors_kb = 1024;
  std::chrono::milliseconds detach_wait{10000};
  // After the device lets go of its sockets, how long a detach waits for the engine to have
  // noticed (see AwaitEngineClosed) before it returns anyway.
  std::chrono::milliseconds engine_close_wait{2000};
  // Attach through nbdfuse + a loop device when the kernel has no NBD driver.
  bool fuse_fallback = true;
  // The Unix NBD socket nbdfuse connects to; "" = ExportServer::UnixSocketPath().
  std::string nbd_socket;
  // The targets of replicated volumes open on this datapath (the cluster agent); nullptr when it
  // runs without --cluster-etcd, and then a target cannot be attached (ENODEV). Must outlive the
  // manager.
  TargetAccess* targets = nullptr;
};

struct RecoverReport {
  std::vector<std::string> reconnected;  // "volume -> /dev/nbdN"
  std::vector<std::string> dropped;      // records of devices that are gone: "volume: why"
  std::vector<std::string> failed;       // kept, for an operator to look at: "volume: why"
};

class AttachmentManager {
 public:
  static constexpr unsigned kMaxConnections = kMaxAttachConnections;

  // `dir` is the records directory (POOL/attachments); Init() creates it. The fuse fallback
  // uses the real nbdfuse + loop implementation (MakeLinuxFuseLoop), created when first needed.
  AttachmentManager(std::string dir, KernelNbdInterface& kernel, ExportServer& server,
                    AttachOptions opts = {});
  // With an explicit fuse implementation (tests).
  AttachmentManager(std::string dir, KernelNbdInterface& kernel, FuseLoopInterface& fuse,
                    ExportServer& server, AttachOptions opts = {});
  ~AttachmentManager();

  Status Init();
  // Reconnects every recorded device that the kernel still holds for us; drops the records of
  // devices that are gone or now belong to someone else. Call once, before serving the API.
  RecoverReport Recover();

  // Idempotent: an attachment that is still live (same cookie in sysfs; for fuse: nbdfuse runs
  // and the loop device is still bound) is returned as is. connections 0 = the default; more
  // than kMaxConnections is EINVAL. The mode is kernel when the kernel has the nbd driver, else
  // fuse (logged once as the slower path); ENODEV when neither works. A broken fuse attachment
  // (after a restart) is replaced, unless it is still mounted: EBUSY. EALREADY while another
  // Attach/Detach/Resize of the same volume runs.
  // `target`: attach the target of replicated volume `volume` (VOLUME@target, open here) instead
  // of the pool volume; kernel NBD only (ENODEV otherwise, or without TargetAccess). An existing
  // attachment of the other kind is EBUSY.
  StatusOr<AttachmentRecord> Attach(const std::string& volume, unsigned connections = 0,
                                    bool target = false);
  // Idempotent: detaching a volume that is not attached succeeds. EBUSY while the device is
  // mounted; ETIMEDOUT if the kernel does not let go in time (the record stays, so retry).
  Status Detach(const std::string& volume);
  // Tells the attached device the volume's current size (after Pool::Resize grew it), online:
  // kernel: RECONFIGURE with the new size; fuse: the loop device's limit. Idempotent. ENOENT
  // when not attached; ENODEV when the link is down; EOPNOTSUPP when the kernel takes the new
  // size but the device does not change (checked against sysfs). A target's attachment: the
  // target takes the expanded size first (TargetAccess::GrowTarget; its errors as they are).
  StatusOr<AttachmentRecord> Resize(const std::string& volume);

  // The kernel dropped a socket of device `index` while we are alive (KernelNbdInterface::
  // WatchLinkDead): serve fresh sockets and RECONFIGURE, unless the device is not ours or an
  // Attach/Detach of its volume is running (that call decides the device's fate).
  Status OnLinkDead(int index);

  // Runs `close` (the cluster agent's CloseTarget of `volume`) unless a device is attached to
  // the target VOLUME@target here: then EBUSY naming the device, and `close` is not called. The
  // volume's attach/detach guard is held while `close` runs, so no attachment of the target can
  // start meanwhile (EALREADY when one is in progress). An attachment of the pool volume of the
  // same name (a local replica) does not count.
  Status CloseTargetUnlessAttached(const std::string& volume, const std::function<Status()>& close);

  // With link_ok/link_error filled in.
  std::vector<AttachmentRecord> List() const;
  std::optional<AttachmentRecord> Get(const std::string& volume) const;
  unsigned DefaultConnections() const;

 private:
  std::optional<AttachmentRecord> Find(const std::string& volume) const;
  AttachmentRecord WithLink(AttachmentRecord r) const;
  FuseLoopInterface& Fuse();
  // Attach's look at a record of `volume` already here: the attachment to return as it is, or
  // nullopt to attach anew (a broken fuse attachment replaced, a stale record dropped).
  StatusOr<std::optional<AttachmentRecord>> KeepExisting(const std::string& volume,
                                                         unsigned connections, bool target);
  // Attach through nbdfuse + loop when kernel NBD is unavailable (`kernel` says why).
  StatusOr<AttachmentRecord> AttachFallback(const std::string& volume, unsigned connections,
                                            const Status& kernel);
  StatusOr<AttachmentRecord> AttachKernel(const std::string& volume, unsigned connections,
                                          bool target);
  // Fresh sockets (and the size) for a record's export: the pool volume, or its target. With
  // `reopen`, a target that is not open here is reopened through TargetAccess first.
  StatusOr<ServedExport> ServeExport(const std::string& volume, unsigned connections, bool target,
                                     bool reopen = false);
  StatusOr<AttachmentRecord> AttachFuse(const std::string& volume, unsigned connections,
                                        const std::string& socket);
  Status DetachFuse(const AttachmentRecord& r);
  void AwaitEngineClosed(const std::string& volume, uint64_t before, unsigned ours);
  void RecoverFuse(AttachmentRecord r, RecoverReport& rep);
  void RecoverKernel(AttachmentRecord r, const Status& available, RecoverReport& rep);
  std::string FuseMount(const std::string& volume) const;
  Status WriteRecord(const AttachmentRecord& r) { return store_.Write(r); }
  Status RemoveRecord(const std::string& volume) { return store_.Remove(volume); }
  // The kernel's current device for a record: its index if the cookie still matches, else -1.
  int LiveIndex(const AttachmentRecord& r);

  RecordStore store_;
  KernelNbdInterface& kernel_;
  std::unique_ptr<FuseLoopInterface> own_fuse_;  // guarded by mu_ until created
  FuseLoopInterface* fuse_ = nullptr;            // guarded by mu_ until created
  ExportServer& server_;
  AttachOptions opts_;
  mutable std::mutex mu_;
  std::map<std::string, AttachmentRecord> records_;  // guarded by mu_
  // One Attach/Detach/Resize/link repair per volume at a time: a second one gets EALREADY
  // instead of racing (TryAcquire, never a wait).
  NameLocks busy_;
  // Fuse attachments made by this process: the others (recovered) lost their NBD connection.
  std::set<std::string> fuse_live_;  // guarded by mu_
  // Why a kernel attachment's link is down (a failed RECONFIGURE), until it is repaired.
  std::map<std::string, std::string> link_errors_;  // guarded by mu_
  std::map<std::string, uint64_t> reconnects_;      // guarded by mu_
  bool fallback_logged_ = false;                    // guarded by mu_
};

}  // namespace nbdcsi::datapath
