// NodeOs on Linux: libmount for the mount table and for mounting (so "bind,ro", "noatime" and
// file system specific options are split into flags and data the way mount(8) does), libblkid
// for probing, and the e2fsprogs / xfsprogs tools run with posix_spawn.
#include <blkid/blkid.h>
#include <fcntl.h>
#include <libmount/libmount.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <spawn.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/block_devices.h"
#include "common/c_ptr.h"
#include "node/os.h"

extern char** environ;

namespace nbdcsi::node {

bool HasMountOption(const std::string& options, const std::string& option) {
  size_t pos = 0;
  while (pos <= options.size()) {
    size_t comma = options.find(',', pos);
    if (comma == std::string::npos) comma = options.size();
    if (options.compare(pos, comma - pos, option) == 0 && comma - pos == option.size()) {
      return true;
    }
    pos = comma + 1;
  }
  return false;
}

namespace {

std::string Join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (const auto& s : v) {
    if (!out.empty()) out += sep;
    out += s;
  }
  return out;
}

// The tools live in sbin, which a container's PATH does not always include.
std::string FindTool(const std::string& name) {
  for (const char* dir : {"/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"}) {
    std::string p = dir + name;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return name;  // let posix_spawnp search PATH and report ENOENT with the name
}

// The last `max` bytes of a tool's output: its error is at the end.
std::string Tail(const std::string& s, size_t max = 2048) {
  std::string t = s.size() > max ? "..." + s.substr(s.size() - max) : s;
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  for (auto& c : t) {
    if (c == '\n') c = ' ';
  }
  return t;
}

// Runs argv[0] (resolved by FindTool) with stdout and stderr captured together. Exit status 0
// is success; anything else is EIO with the command line and the output's tail.
Status RunTool(const std::vector<std::string>& args) {
  std::string path = FindTool(args[0]);
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) return Error(errno, "{}: pipe: {}", args[0], strerror(errno));
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 2);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, path.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(pipefd[1]);
  if (rc != 0) {
    close(pipefd[0]);
    return Error(rc, "run {}: {}", path, strerror(rc));
  }
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = read(pipefd[0], buf, sizeof buf);
    if (n > 0) {
      // Keep the head bounded; the tail is what matters and is kept below.
      out.append(buf, static_cast<size_t>(n));
      if (out.size() > (256u << 10)) out.erase(0, out.size() - (64u << 10));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  close(pipefd[0]);
  int wstatus = 0;
  while (waitpid(pid, &wstatus, 0) < 0) {
    if (errno != EINTR) return Error(errno, "wait for {}: {}", path, strerror(errno));
  }
  std::string cmd = Join(args, " ");
  if (WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) {
    spdlog::debug("ran {}: {}", cmd, Tail(out, 512));
    return Status::Ok();
  }
  if (WIFSIGNALED(wstatus)) {
    return Error(EIO, "{}: killed by signal {}: {}", cmd, WTERMSIG(wstatus), Tail(out));
  }
  return Error(EIO, "{}: exit status {}: {}", cmd, WEXITSTATUS(wstatus), Tail(out));
}

using MountTable = CPtr<libmnt_table, mnt_unref_table>;

const char* Str(const char* s) { return s ? s : ""; }

StatusOr<MountTable> ParseMountTable() {
  MountTable tb(mnt_new_table());
  if (!tb) return Error(ENOMEM, "mount table: out of memory");
  int rc = mnt_table_parse_file(tb.get(), "/proc/self/mountinfo");
  if (rc != 0) {
    return Error(rc < 0 ? -rc : EIO, "parse /proc/self/mountinfo: {}",
                 strerror(rc < 0 ? -rc : EIO));
  }
  return tb;
}

MountInfo ToMountInfo(libmnt_fs* fs) {
  MountInfo m;
  m.target = Str(mnt_fs_get_target(fs));
  m.source = Str(mnt_fs_get_source(fs));
  m.root = Str(mnt_fs_get_root(fs));
  m.fstype = Str(mnt_fs_get_fstype(fs));
  m.vfs_options = Str(mnt_fs_get_vfs_options(fs));
  m.super_options = Str(mnt_fs_get_fs_options(fs));
  m.vfs_read_only = HasMountOption(m.vfs_options, "ro");
  m.super_read_only = HasMountOption(m.super_options, "ro");
  return m;
}

uint32_t Le32(const unsigned char* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
uint32_t Be32(const unsigned char* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}

// The bytes a file system spans, from its on-disk superblock; 0 when the type is another one or
// the superblock does not read back as expected. libblkid 2.38 does not report it (FSSIZE came
// later).
//   ext2/3/4: superblock at byte 1024, little endian: s_blocks_count_lo @0x04, s_log_block_size
//             @0x18 (block = 1024 << it), s_magic @0x38 = 0xEF53, s_feature_incompat @0x60 with
//             INCOMPAT_64BIT 0x80, then s_blocks_count_hi @0x150.
//   XFS:      superblock at byte 0, big endian: "XFSB", sb_blocksize @4, sb_dblocks @8.
uint64_t FsBytes(const std::string& device, const std::string& type) {
  int fd = open(device.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  unsigned char sb[0x154] = {};
  uint64_t bytes = 0;
  if (type == "ext2" || type == "ext3" || type == "ext4") {
    if (pread(fd, sb, sizeof(sb), 1024) == ssize_t(sizeof(sb)) && sb[0x38] == 0x53 &&
        sb[0x39] == 0xEF && Le32(sb + 0x18) <= 16) {
      uint64_t blocks = Le32(sb + 0x04);
      if (Le32(sb + 0x60) & 0x80) blocks |= uint64_t(Le32(sb + 0x150)) << 32;
      bytes = blocks * (uint64_t(1024) << Le32(sb + 0x18));
    }
  } else if (type == "xfs") {
    if (pread(fd, sb, 16, 0) == 16 && memcmp(sb, "XFSB", 4) == 0) {
      const uint64_t dblocks = uint64_t(Be32(sb + 8)) << 32 | Be32(sb + 12);
      bytes = dblocks * Be32(sb + 4);
    }
  }
  close(fd);
  return bytes;
}

std::string Canonical(const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(path.c_str(), buf) != nullptr) return buf;
  return path;  // missing, or a dead mount (ENOTCONN): compare as given
}

// Kernels before 5.6 have no openat2: the same rule from realpath(3) of the deepest existing
// prefix (checked, then used, so a symlink swapped in between is not caught; openat2 has the
// same window before the mount, but no way around a relative symlink's "..").
Status CheckBeneathByRealpath(const std::string& root, const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(root.c_str(), buf) == nullptr) {
    return Error(errno, "realpath kubelet root {}: {}", root, strerror(errno));
  }
  const std::string real_root = buf;
  std::string p = path;
  while (p.size() > root.size()) {
    if (realpath(p.c_str(), buf) != nullptr) {
      std::string real = buf;
      if (real_root == "/" ||
          (real.size() > real_root.size() && real.compare(0, real_root.size(), real_root) == 0 &&
           real[real_root.size()] == '/')) {
        return Status::Ok();
      }
      return Error(EINVAL, "{} leaves {}: {} resolves to {}", path, root, p, real);
    }
    if (errno != ENOENT && errno != ENOTCONN) {
      return Error(errno, "realpath {}: {}", p, strerror(errno));
    }
    p = p.substr(0, p.rfind('/'));
  }
  return Status::Ok();
}

class LinuxOs final : public NodeOs {
 public:
  StatusOr<std::optional<MountInfo>> GetMount(const std::string& path) override {
    auto tb = ParseMountTable();
    if (!tb.ok()) return tb.status();
    std::string target = Canonical(path);
    // Backward: the last entry for a path is the mount on top, the one a lookup of it sees.
    libmnt_fs* fs = mnt_table_find_target(tb->get(), target.c_str(), MNT_ITER_BACKWARD);
    if (fs == nullptr) return std::optional<MountInfo>();
    return std::optional<MountInfo>(ToMountInfo(fs));
  }

  StatusOr<std::vector<MountInfo>> ListMounts() override {
    auto tb = ParseMountTable();
    if (!tb.ok()) return tb.status();
    CPtr<libmnt_iter, mnt_free_iter> it(mnt_new_iter(MNT_ITER_FORWARD));
    if (!it) return Error(ENOMEM, "mount table: out of memory");
    std::vector<MountInfo> out;
    libmnt_fs* fs = nullptr;
    while (mnt_table_next_fs(tb->get(), it.get(), &fs) == 0) out.push_back(ToMountInfo(fs));
    return out;
  }

  Status Mount(const std::string& source, const std::string& target, const std::string& fstype,
               const std::vector<std::string>& options) override {
    CPtr<libmnt_context, mnt_free_context> cxt(mnt_new_context());
    if (!cxt) return Error(ENOMEM, "mount {} on {}: out of memory", source, target);
    // No /sbin/mount.* helpers and no utab: the mount table is the only state we keep.
    mnt_context_disable_helpers(cxt.get(), 1);
    mnt_context_disable_mtab(cxt.get(), 1);
    std::string opts = Join(options, ",");
    if (mnt_context_set_source(cxt.get(), source.c_str()) != 0 ||
        mnt_context_set_target(cxt.get(), target.c_str()) != 0 ||
        (!fstype.empty() && mnt_context_set_fstype(cxt.get(), fstype.c_str()) != 0) ||
        (!opts.empty() && mnt_context_set_options(cxt.get(), opts.c_str()) != 0)) {
      return Error(EINVAL, "mount {} on {} (options \"{}\"): bad arguments", source, target, opts);
    }
    int rc = mnt_context_mount(cxt.get());
    if (rc == 0) return Status::Ok();
    int err = mnt_context_get_syscall_errno(cxt.get());
    char msg[1024] = "";
    mnt_context_get_excode(cxt.get(), rc, msg, sizeof msg);
    if (err == 0) err = rc < 0 ? -rc : EIO;
    return Error(err, "mount {} on {} (type \"{}\", options \"{}\"): {}", source, target, fstype,
                 opts, msg[0] ? msg : strerror(err));
  }

  Status Unmount(const std::string& target) override {
    if (umount2(target.c_str(), UMOUNT_NOFOLLOW) != 0) {
      return Error(errno, "unmount {}: {}", target, strerror(errno));
    }
    return Status::Ok();
  }

  StatusOr<DeviceContent> Probe(const std::string& device) override {
    CPtr<blkid_struct_probe, blkid_free_probe> pr(
        blkid_new_probe_from_filename(device.c_str()));
    if (!pr) {
      int err = errno ? errno : EIO;
      return Error(err, "probe {}: open: {}", device, strerror(err));
    }
    blkid_probe_enable_superblocks(pr.get(), 1);
    blkid_probe_set_superblocks_flags(pr.get(), BLKID_SUBLKS_TYPE | BLKID_SUBLKS_USAGE);
    blkid_probe_enable_partitions(pr.get(), 1);
    blkid_probe_set_partitions_flags(pr.get(), BLKID_PARTS_MAGIC);
    int rc = blkid_do_fullprobe(pr.get());
    DeviceContent c;
    if (rc == 1) return c;  // nothing found
    if (rc == -2) {
      // Several signatures that contradict each other: certainly not blank.
      c.kind = DeviceContent::Kind::kOther;
      c.type = "ambivalent";
      return c;
    }
    if (rc != 0) return Error(EIO, "probe {}: libblkid failed", device);
    const char* value = nullptr;
    if (blkid_probe_lookup_value(pr.get(), "PTTYPE", &value, nullptr) == 0) {
      c.kind = DeviceContent::Kind::kOther;
      c.type = Str(value);
      return c;
    }
    const char* type = nullptr;
    const char* usage = nullptr;
    blkid_probe_lookup_value(pr.get(), "TYPE", &type, nullptr);
    blkid_probe_lookup_value(pr.get(), "USAGE", &usage, nullptr);
    c.type = Str(type);
    c.kind = std::string(Str(usage)) == "filesystem" ? DeviceContent::Kind::kFilesystem
                                                     : DeviceContent::Kind::kOther;
    if (c.type.empty()) c.type = "unknown";
    if (c.kind == DeviceContent::Kind::kFilesystem) c.fs_bytes = FsBytes(device, c.type);
    return c;
  }

  Status MakeFs(const std::string& device, const std::string& fstype) override {
    if (fstype == "ext4") {
      // -F: a loop or nbd device is not a partition, and mke2fs would ask. No discard: the
      // volume is a sparse file; discarding it all only costs time.
      return RunTool({"mkfs.ext4", "-F", "-q", "-E", "nodiscard", device});
    }
    if (fstype == "xfs") {
      // No -f: mkfs.xfs refuses a device with a signature, a second guard behind Probe.
      return RunTool({"mkfs.xfs", "-q", "-K", device});
    }
    return Error(ENOTSUP, "mkfs {}: file system type \"{}\" is not supported", device, fstype);
  }

  Status GrowFs(const std::string& device, const std::string& mount_point,
                const std::string& fstype) override {
    if (fstype == "ext4" || fstype == "ext3" || fstype == "ext2") {
      return RunTool({"resize2fs", device});
    }
    if (fstype == "xfs") return RunTool({"xfs_growfs", "-d", mount_point});
    return Error(ENOTSUP, "grow {} at {}: file system type \"{}\" is not supported", device,
                 mount_point, fstype);
  }

  StatusOr<FsStats> StatFs(const std::string& path) override {
    struct statvfs s {};
    if (statvfs(path.c_str(), &s) != 0) {
      return Error(errno, "statvfs {}: {}", path, strerror(errno));
    }
    FsStats f;
    uint64_t bs = s.f_frsize ? s.f_frsize : s.f_bsize;
    f.total_bytes = uint64_t(s.f_blocks) * bs;
    f.available_bytes = uint64_t(s.f_bavail) * bs;
    f.used_bytes = uint64_t(s.f_blocks - s.f_bfree) * bs;
    f.total_inodes = s.f_files;
    f.available_inodes = s.f_favail;
    f.used_inodes = s.f_files - s.f_ffree;
    return f;
  }

  Status CheckOpenable(const std::string& path) override {
    int fd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return Error(errno, "open {}: {}", path, strerror(errno));
    close(fd);
    return Status::Ok();
  }

  StatusOr<uint64_t> DeviceSize(const std::string& device) override {
    int fd = open(device.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Error(errno, "open {}: {}", device, strerror(errno));
    uint64_t size = 0;
    int rc = ioctl(fd, BLKGETSIZE64, &size);
    int err = errno;
    close(fd);
    if (rc != 0) return Error(err, "BLKGETSIZE64 {}: {}", device, strerror(err));
    return size;
  }

  StatusOr<PathInfo> Stat(const std::string& path) override {
    struct stat st {};
    PathInfo info;
    if (stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return info;
      return Error(errno, "stat {}: {}", path, strerror(errno));
    }
    if (S_ISDIR(st.st_mode)) {
      info.kind = PathKind::kDirectory;
    } else if (S_ISREG(st.st_mode)) {
      info.kind = PathKind::kFile;
    } else if (S_ISBLK(st.st_mode)) {
      info.kind = PathKind::kBlockDevice;
      info.rdev = st.st_rdev;
    } else {
      info.kind = PathKind::kOther;
    }
    return info;
  }

  Status CheckBeneath(const std::string& root, const std::string& path) override {
    int rootfd = open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0) return Error(errno, "open kubelet root {}: {}", root, strerror(errno));
    // Relative to the root; the service made sure `path` is root + "/" + something clean.
    std::string rel = root == "/" ? path.substr(1) : path.substr(root.size() + 1);
    Status result = Status::Ok();
    // The deepest existing prefix is what a mount there would resolve through; what does not
    // exist yet is created (mkdir, no symlinks) by this plugin.
    while (!rel.empty()) {
      open_how how{};
      how.flags = O_PATH | O_CLOEXEC;
      how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
      long fd = syscall(SYS_openat2, rootfd, rel.c_str(), &how, sizeof how);
      if (fd >= 0) {
        close(static_cast<int>(fd));
        break;
      }
      const int err = errno;
      if (err == EXDEV || err == ELOOP) {
        result = Error(EINVAL, "{} leaves {}: {}/{} resolves outside it (a symlink out of the "
                               "root, or an absolute one)", path, root, root == "/" ? "" : root,
                       rel);
        break;
      }
      if (err == ENOSYS) {
        result = CheckBeneathByRealpath(root, path);
        break;
      }
      // Missing, or a dead FUSE mount (ENOTCONN): look at its parent instead.
      if (err != ENOENT && err != ENOTCONN) {
        result = Error(err, "resolve {} beneath {}: {}", path, root, strerror(err));
        break;
      }
      size_t slash = rel.rfind('/');
      rel = slash == std::string::npos ? "" : rel.substr(0, slash);
    }
    close(rootfd);
    return result;
  }

  Status MakeDir(const std::string& path) override {
    if (path.empty() || path[0] != '/') {
      return Error(EINVAL, "mkdir {}: not an absolute path", path);
    }
    size_t pos = 1;
    while (pos <= path.size()) {
      size_t slash = path.find('/', pos);
      if (slash == std::string::npos) slash = path.size();
      std::string part = path.substr(0, slash);
      if (mkdir(part.c_str(), 0750) != 0 && errno != EEXIST) {
        return Error(errno, "mkdir {}: {}", part, strerror(errno));
      }
      pos = slash + 1;
    }
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) return Error(errno, "stat {}: {}", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
      return Error(ENOTDIR, "mkdir {}: exists and is not a directory", path);
    }
    return Status::Ok();
  }

  Status MakeFile(const std::string& path) override {
    size_t slash = path.rfind('/');
    if (slash == std::string::npos) return Error(EINVAL, "create {}: not an absolute path", path);
    if (slash > 0) {
      if (Status s = MakeDir(path.substr(0, slash)); !s.ok()) return s;
    }
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (fd < 0) {
      // A block device node bound onto the file opens as that device: still "exists".
      struct stat st {};
      if (errno != ENOENT && stat(path.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
        return Status::Ok();
      }
      return Error(errno, "create {}: {}", path, strerror(errno));
    }
    close(fd);
    return Status::Ok();
  }

  Status RemovePath(const std::string& path) override {
    struct stat st {};
    if (lstat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return Status::Ok();
      return Error(errno, "stat {}: {}", path, strerror(errno));
    }
    int rc = S_ISDIR(st.st_mode) ? rmdir(path.c_str()) : unlink(path.c_str());
    if (rc != 0 && errno != ENOENT) return Error(errno, "remove {}: {}", path, strerror(errno));
    return Status::Ok();
  }

  unsigned CountDevices(const std::string& prefix) override {
    return CountBlockDevices("/dev", prefix);
  }
};

}  // namespace

std::unique_ptr<NodeOs> MakeLinuxOs() { return std::make_unique<LinuxOs>(); }

}  // namespace nbdcsi::node
