// Every effect the node plugin has on the operating system goes through NodeOs: mounts, the mount
// table, file system probing, mkfs, file system growth, statvfs, device sizes and the files and
// directories kubelet hands us. The service is unit-tested with a fake; LinuxOs is the real one.
//
// Errors are errno Statuses whose message names the path or device and the step that failed
// ("mount /dev/loop3 on /var/lib/kubelet/...: wrong fs type ..."), so the service can return
// them as they are.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <sys/types.h>

#include "common/status.h"

namespace nbdcsi::node {

// One entry of /proc/self/mountinfo.
struct MountInfo {
  std::string target;  // the mount point
  std::string source;  // "/dev/loop3"; for a bind of a device node the devtmpfs source
  std::string root;    // the path inside the source file system that is mounted ("/" mostly)
  std::string fstype;
  std::string vfs_options;    // per-mount: "rw,relatime"
  std::string super_options;  // per-superblock: "rw,errors=remount-ro"
  // This mount point is read-only (mount -o ro, or a read-only bind).
  bool vfs_read_only = false;
  // The file system itself is read-only: mounted so, or (ext4 errors=remount-ro, xfs shutdown)
  // it turned read-only after an I/O error while the mount still says rw.
  bool super_read_only = false;
};

enum class PathKind { kMissing, kDirectory, kFile, kBlockDevice, kOther };

struct PathInfo {
  PathKind kind = PathKind::kMissing;
  dev_t rdev = 0;  // kBlockDevice: the device number (a bind-mounted device node keeps it)
};

// What a device holds, as libblkid sees it.
struct DeviceContent {
  enum class Kind {
    kBlank,       // no signature at all: safe to format
    kFilesystem,  // `type` is the file system ("ext4", "xfs", ...)
    kOther,       // a partition table, RAID or LVM member, swap, ...: never format it
  };
  Kind kind = Kind::kBlank;
  std::string type;  // "ext4"; "dos" for a partition table; "" when blank
  // kFilesystem: the bytes the file system spans on the device, from its superblock (ext2/3/4
  // and XFS); 0 when unknown. Smaller than the device after a restore or clone into a larger
  // volume, which the kubelet never expands (the PVC already has the size it asked for).
  uint64_t fs_bytes = 0;
};

struct FsStats {
  uint64_t total_bytes = 0, available_bytes = 0, used_bytes = 0;
  uint64_t total_inodes = 0, available_inodes = 0, used_inodes = 0;
};

class NodeOs {
 public:
  virtual ~NodeOs() = default;

  // The topmost mount whose mount point is `path` (symlinks resolved when the path exists);
  // nullopt when nothing is mounted there.
  virtual StatusOr<std::optional<MountInfo>> GetMount(const std::string& path) = 0;
  // Every entry of the mount table, in mount order.
  virtual StatusOr<std::vector<MountInfo>> ListMounts() = 0;

  // mount(8) semantics without helpers: `options` are mount(8) options ("ro", "noatime",
  // "discard", "data=ordered", "bind"); a "bind,ro" mount is made read-only in the same call.
  virtual Status Mount(const std::string& source, const std::string& target,
                       const std::string& fstype, const std::vector<std::string>& options) = 0;
  // Unmounts the topmost mount at `target`. EINVAL when nothing is mounted there.
  virtual Status Unmount(const std::string& target) = 0;

  virtual StatusOr<DeviceContent> Probe(const std::string& device) = 0;
  // mkfs.ext4 / mkfs.xfs on `device`, without discard (a thin volume is all holes already). The
  // tool's stderr is in the error message.
  virtual Status MakeFs(const std::string& device, const std::string& fstype) = 0;
  // Grows the mounted file system to the device size: resize2fs DEVICE or xfs_growfs MOUNTPOINT.
  virtual Status GrowFs(const std::string& device, const std::string& mount_point,
                        const std::string& fstype) = 0;

  virtual StatusOr<FsStats> StatFs(const std::string& path) = 0;
  // Opens the directory at `path`: a file system that shut itself down after I/O errors (XFS
  // shutdown, ext4 forced shutdown) fails this with EIO while statvfs still answers.
  virtual Status CheckOpenable(const std::string& path) = 0;
  // BLKGETSIZE64 on the device (or on a device node bound onto a file).
  virtual StatusOr<uint64_t> DeviceSize(const std::string& device) = 0;
  // lstat(2) apart from the mount point itself being followed; kMissing for ENOENT.
  virtual StatusOr<PathInfo> Stat(const std::string& path) = 0;

  // `path` lies lexically beneath `root` (the service checked that). OK when the deepest part of
  // it that exists resolves without leaving `root`: no symlink on the way (nor the last
  // component, if it is one) may point outside it, and absolute symlinks are refused outright
  // (openat2 RESOLVE_BENEATH). EINVAL saying which part escapes.
  virtual Status CheckBeneath(const std::string& root, const std::string& path) = 0;

  // mkdir -p (0750 for what it creates). OK when it exists as a directory.
  virtual Status MakeDir(const std::string& path) = 0;
  // Creates an empty regular file (and its parent directories), the mount point of a block
  // volume. OK when it exists as a file.
  virtual Status MakeFile(const std::string& path) = 0;
  // Removes an empty directory or a file. OK when already gone.
  virtual Status RemovePath(const std::string& path) = 0;

  // How many block devices /dev/<prefix>N exist (common/block_devices.h; NodeGetInfo counts
  // "nbd").
  virtual unsigned CountDevices(const std::string& prefix) = 0;
};

std::unique_ptr<NodeOs> MakeLinuxOs();

// Splits mount(8)-style comma-separated options and finds one ("ro" in "rw,ro" -> true).
bool HasMountOption(const std::string& options, const std::string& option);

}  // namespace nbdcsi::node
