// The attach path for kernels without nbd.ko (WSL2, some VMs, CI containers): libnbd's nbdfuse
// turns an NBD export of this daemon into a file on a FUSE mount, and a loop device turns that
// file into a block device (/dev/loopN). Slower than kernel NBD (every I/O crosses FUSE and a
// userspace NBD client), and it does not survive a datapath restart: nbdfuse's NBD connections
// die with the daemon and nbdfuse cannot reconnect, so the device then fails its I/O until it is
// detached and attached again.
//
// Growing online: nbdfuse learns the export's size once. It therefore connects to the growable
// form of the export (frontend.h kGrowableSuffix), whose advertised size is a large window, and
// the loop device's lo_sizelimit is the volume's real size; a resize raises the limit
// (LOOP_SET_STATUS64, then LOOP_SET_CAPACITY), with the file system still mounted.
//
// Behind an abstract class so AttachmentManager can be unit-tested without FUSE or loop devices.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"

namespace nbdcsi::datapath {

struct FuseAttachParams {
  std::string volume;
  std::string uri;        // what nbdfuse connects to (FuseExportUri)
  std::string mount_dir;  // nbdfuse's mount point; the device file is FuseDeviceFile(mount_dir)
  std::string log_path;   // nbdfuse's stdout and stderr
  uint64_t size_bytes = 0;    // the volume's size: the loop device's limit
  uint64_t window_bytes = 0;  // the size nbdfuse's file must show once it is ready
  unsigned connections = 1;   // nbdfuse -C (multi-conn)
  bool read_only = false;
  // Stored as the loop device's lo_file_name (at most 63 bytes): the attachment's identity on
  // the device. Unlike the backing file's path it survives the FUSE mount going away (a
  // restarted container has a new mount namespace, and the path then reads as "/disk").
  std::string loop_tag;
  std::chrono::milliseconds start_timeout{15000};
};

struct FuseAttachment {
  int loop_index = -1;
  int pid = -1;  // nbdfuse
};

// What names an attachment for the calls below (any part may be unknown after a crash: -1/"").
struct FuseRef {
  std::string mount_dir;
  int pid = -1;
  int loop_index = -1;
  std::string loop_tag;
};

class FuseLoopInterface {
 public:
  virtual ~FuseLoopInterface() = default;

  // Ok when /dev/fuse, /dev/loop-control, nbdfuse and fusermount3 are usable; otherwise ENODEV
  // naming what is missing.
  virtual Status Available() = 0;
  // Starts nbdfuse (its own session, so it outlives a crash of this daemon instead of taking the
  // mount down with it: a mounted file system above must see EIO, not a vanished device), waits
  // until its file shows the window size, and binds a free loop device to it. `on_started` runs
  // with nbdfuse's pid as soon as it is spawned, so the caller can record it before anything
  // else can fail. On failure everything started is undone.
  virtual StatusOr<FuseAttachment> Attach(const FuseAttachParams& p,
                                          const std::function<void(int pid)>& on_started) = 0;
  // Whether the loop device is still this attachment's (its tag, or without one its backing
  // path), and not, after the attachment was torn down behind our back, someone else's.
  virtual bool LoopBound(const FuseRef& ref) = 0;
  // EBUSY while the loop device is held exclusively (a mounted file system).
  virtual Status CheckNotInUse(int loop_index) = 0;
  // Undoes an attachment in whatever state a crash left it: detaches the recorded loop device
  // (when LoopBound) and every other loop device backed by the mount's file, unmounts it
  // (nbdfuse then exits), and makes sure process `pid` (when it is still nbdfuse on that mount)
  // is gone and reaped. Idempotent.
  virtual Status Detach(const FuseRef& ref) = 0;
  // Raises the loop device's size limit to `size_bytes` and makes the block layer see it.
  virtual Status Resize(int loop_index, uint64_t size_bytes) = 0;
  // The loop device's size in bytes (sysfs), 0 if unreadable.
  virtual uint64_t SizeBytes(int loop_index) = 0;
  // "" when the attachment is healthy: the loop device is still its own (LoopBound) and nbdfuse
  // runs. Otherwise why not (an nbdfuse that exited is reaped here).
  virtual std::string LinkProblem(const FuseRef& ref) = 0;
};

// The real thing: posix_spawn(nbdfuse), fusermount3, /dev/loop-control ioctls, sysfs.
std::unique_ptr<FuseLoopInterface> MakeLinuxFuseLoop();

// "/dev/loopN"
std::string LoopDevicePath(int index);
// The file nbdfuse serves inside its mount point.
std::string FuseDeviceFile(const std::string& mount_dir);
// nbd+unix:///EXPORT?socket=SOCKET, percent-encoded: the growable export of `volume` on the
// daemon's Unix NBD socket.
std::string FuseExportUri(const std::string& volume, const std::string& socket_path);

}  // namespace nbdcsi::datapath
