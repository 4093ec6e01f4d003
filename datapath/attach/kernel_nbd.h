// The kernel NBD driver's generic-netlink interface (include/uapi/linux/nbd-netlink.h), the way a
// long-lived server attaches /dev/nbdN to sockets it keeps serving:
//
//   CONNECT      the client ends of our socketpairs + size + flags + timeouts + a backend
//                identifier (our cookie), returns the device index;
//   RECONFIGURE  hands fresh sockets to a device whose server died (a restarted nbd-datapathd)
//                before the dead-connection timeout runs out, so queued I/O is retried, not failed;
//   DISCONNECT   tears the device down.
//
// Behind an abstract class so AttachmentManager can be unit-tested on hosts without nbd.ko.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace nbdcsi::datapath {

struct KernelConnectParams {
  uint64_t size_bytes = 0;
  uint64_t block_size = 4096;
  uint64_t server_flags = 0;  // the export's NBD transmission flags
  // How long the kernel keeps the device (and queues new I/O) with no live socket. A datapath
  // restart must finish within it.
  uint64_t dead_conn_timeout_s = 120;
  // The per-request timeout. It must be nonzero: drivers/block/nbd.c (nbd_xmit_timeout) only
  // requeues a request that was in flight on a dead socket when the timeout fires and either
  // there is more than one connection or the timeout is nonzero; with a single connection and
  // timeout 0 the request is "possibly stuck" forever. A requeued request then waits for a live
  // socket for up to dead_conn_timeout. So: the longest a request can hang across a restart is
  // about io_timeout + restart time, and nothing fails if the restart beats dead_conn_timeout.
  // The flip side: a live request slower than this (e.g. held back by QoS) gets its socket
  // declared dead by the kernel, so keep it well above the worst throttling delay.
  uint64_t io_timeout_s = 30;
  std::string backend_identifier;  // shown in /sys/block/nbdN/backend
  int index = -1;                  // -1: the kernel picks a free device
};

class KernelNbdInterface {
 public:
  virtual ~KernelNbdInterface() = default;

  // Ok when the "nbd" generic-netlink family exists; otherwise ENODEV with the reason.
  virtual Status Available() = 0;
  // Returns the device index (N of /dev/nbdN). The kernel takes its own references to the
  // sockets; the caller closes its descriptors afterwards either way.
  virtual StatusOr<int> Connect(const std::vector<int>& client_fds,
                                const KernelConnectParams& p) = 0;
  // `cookie` must be the device's backend identifier: the kernel refuses a RECONFIGURE of a
  // device that has one without it ("must specify backend") or with another one, which makes
  // handing our sockets to someone else's device impossible.
  virtual Status Reconfigure(int index, const std::vector<int>& client_fds,
                             uint64_t dead_conn_timeout_s, const std::string& cookie) = 0;
  virtual Status Disconnect(int index) = 0;
  // Tells a connected device its export's new size: RECONFIGURE with NBD_ATTR_SIZE_BYTES (and
  // the cookie, for the reason above) and no sockets. Debian 12's 6.1 kernel applies it at once
  // ("nbd0: detected capacity change", /sys/block/nbdN/size follows) while the device stays
  // mounted: test/vm/attach_resize.sh. A kernel that ignored the attribute would still answer
  // success, so the caller checks SizeBytes afterwards.
  virtual Status Resize(int index, uint64_t size_bytes, const std::string& cookie) = 0;
  // The device's size in bytes from /sys/block/nbdN/size (512-byte sectors), 0 if unreadable.
  virtual uint64_t SizeBytes(int index) = 0;
  // /sys/block/nbdN/backend, or "" when the device does not exist or is not connected.
  virtual std::string Backend(int index) = 0;
  // The index of the connected device whose backend is `cookie`, or -1.
  virtual int FindByBackend(const std::string& cookie) = 0;
  // True while the device is configured (/sys/block/nbdN/pid exists and the size is nonzero).
  virtual bool Connected(int index) = 0;
  // EBUSY when someone holds the device open exclusively (a mounted file system).
  virtual Status CheckNotInUse(int index) = 0;
  // Raises the request size limit (the kernel's default is 64 KiB per request), clamped to the
  // hardware limit the driver advertises. Returns the value in effect.
  virtual StatusOr<unsigned> SetMaxSectorsKb(int index, unsigned kb) = 0;

  // The kernel declares a socket dead on its own too: when a request outlives the io timeout it
  // shuts that socket down (nbd_xmit_timeout) even though this daemon is alive, e.g. behind a
  // slow QoS queue. It then multicasts NBD_CMD_LINK_DEAD; watching it lets us hand over a fresh
  // socket at once instead of leaving the device to its dead-connection timeout. `on_dead` runs
  // on a watcher thread with the device index. One watcher at a time; StopWatching joins it.
  virtual Status WatchLinkDead(std::function<void(int index)> on_dead) = 0;
  virtual void StopWatching() = 0;
};

// The real thing: libnl-genl + sysfs.
std::unique_ptr<KernelNbdInterface> MakeLinuxKernelNbd();

// "/dev/nbdN"
std::string NbdDevicePath(int index);

}  // namespace nbdcsi::datapath
