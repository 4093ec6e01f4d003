#include "datapath/attach/fuse_attach.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <signal.h>
#include <spawn.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/fs_util.h"

extern char** environ;

namespace nbdcsi::datapath {
namespace {

constexpr const char* kDeviceFileName = "disk";
constexpr auto kPoll = std::chrono::milliseconds(20);

Status Sys(int err, const std::string& what) {
  return Error(err, "{}: {}", what, std::strerror(err));
}

std::string ReadLine(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  if (in) std::getline(in, s);
  return s;
}

// The executable `name` on PATH, or "".
std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream ss(path ? path : "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    std::string p = dir + "/" + name;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

// The canonical form of a path whose last component may be a dead FUSE mount (stat on it fails
// with ENOTCONN): only the parent is resolved.
std::string CanonicalDir(const std::string& dir) {
  auto slash = dir.find_last_of('/');
  std::string parent = slash == std::string::npos ? "." : dir.substr(0, slash);
  if (parent.empty()) parent = "/";
  char buf[PATH_MAX];
  if (!realpath(parent.c_str(), buf)) return dir;
  std::string out = buf;
  if (out != "/") out += "/";
  return out + dir.substr(slash == std::string::npos ? 0 : slash + 1);
}

std::string BackingFile(int loop_index) {
  std::string s = ReadLine(fmt::format("/sys/block/loop{}/loop/backing_file", loop_index));
  // The kernel appends " (deleted)" when the file is unlinked; a FUSE file never is.
  return s;
}

// The name stored in the loop device's lo_file_name (our tag), "" when the device is unbound,
// nullopt when its status cannot be read: LOOP_GET_STATUS64 asks the backing file's file system
// for the file's attributes, and once the nbdfuse behind a fuse attachment is gone that fails
// (ENOTCONN) as soon as the attributes are no longer cached. Callers then fall back to the
// backing file's path.
std::optional<std::string> LoopTagOf(int loop_index) {
  int fd = open(LoopDevicePath(loop_index).c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return errno == ENOENT || errno == ENXIO ? std::optional<std::string>("") : std::nullopt;
  loop_info64 info{};
  int r = ioctl(fd, LOOP_GET_STATUS64, &info);
  int err = errno;
  close(fd);
  if (r != 0) return err == ENXIO ? std::optional<std::string>("") : std::nullopt;
  info.lo_file_name[LO_NAME_SIZE - 1] = 0;
  return std::string(reinterpret_cast<const char*>(info.lo_file_name));
}

std::vector<int> LoopsBackedBy(const std::string& file) {
  std::vector<int> out;
  DIR* d = opendir("/sys/block");
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    int index = -1;
    char tail = 0;
    if (std::sscanf(e->d_name, "loop%d%c", &index, &tail) != 1 || index < 0) continue;
    if (BackingFile(index) == file) out.push_back(index);
  }
  closedir(d);
  return out;
}

// argv of process `pid`, empty if it is gone (or a zombie).
std::vector<std::string> Cmdline(int pid) {
  std::ifstream in(fmt::format("/proc/{}/cmdline", pid), std::ios::binary);
  std::vector<std::string> args;
  std::string a;
  while (std::getline(in, a, '\0')) args.push_back(a);
  return args;
}

// Whether `pid` is an nbdfuse serving `file` (guards against a reused pid).
bool IsNbdfuseFor(int pid, const std::string& file) {
  auto args = Cmdline(pid);
  if (args.empty()) return false;
  std::string argv0 = args[0].substr(args[0].find_last_of('/') + 1);
  if (argv0 != "nbdfuse") return false;
  for (const auto& a : args) {
    if (a == file) return true;
  }
  return false;
}

std::vector<int> NbdfusesFor(const std::string& file) {
  std::vector<int> out;
  DIR* d = opendir("/proc");
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (!end || *end != '\0' || pid <= 0) continue;
    if (IsNbdfuseFor(static_cast<int>(pid), file)) out.push_back(static_cast<int>(pid));
  }
  closedir(d);
  return out;
}

// True once `pid` is gone. Reaps it when it is our child; for another's (a previous daemon's
// nbdfuse, adopted by init) it watches /proc.
bool Gone(int pid, const std::string& file) {
  int st = 0;
  pid_t r = waitpid(pid, &st, WNOHANG);
  if (r == pid) return true;
  if (r == 0) return false;  // our child, still running
  return !IsNbdfuseFor(pid, file);
}

bool WaitGone(int pid, const std::string& file, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!Gone(pid, file)) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(kPoll);
  }
  return true;
}

std::string LogTail(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  std::string l;
  while (std::getline(in, l)) {
    lines.push_back(l);
    if (lines.size() > 5) lines.erase(lines.begin());
  }
  std::string out;
  for (const auto& x : lines) out += (out.empty() ? "" : " | ") + x;
  return out.empty() ? "(no output)" : out;
}

bool IsMountPoint(const std::string& dir) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    // Field 5 is the mount point, with spaces etc. octal-escaped; our paths have none.
    std::istringstream ss(line);
    std::string f[5];
    for (auto& x : f) ss >> x;
    if (f[4] == dir) return true;
  }
  return false;
}

class LinuxFuseLoop final : public FuseLoopInterface {
 public:
  Status Available() override {
    std::vector<std::string> missing;
    if (access("/dev/fuse", R_OK | W_OK) != 0) missing.push_back("/dev/fuse");
    if (access("/dev/loop-control", R_OK | W_OK) != 0) missing.push_back("/dev/loop-control");
    if (FindOnPath("nbdfuse").empty()) missing.push_back("nbdfuse (Debian package nbdfuse)");
    if (missing.empty()) return Status::Ok();
    std::string list;
    for (const auto& m : missing) list += (list.empty() ? "" : ", ") + m;
    return Error(ENODEV, "the nbdfuse + loop attach path is unavailable: missing {}", list);
  }

  StatusOr<FuseAttachment> Attach(const FuseAttachParams& p,
                                  const std::function<void(int)>& on_started) override {
    if (mkdir(p.mount_dir.c_str(), 0700) != 0 && errno != EEXIST) {
      return Sys(errno, "mkdir " + p.mount_dir);
    }
    const std::string dir = CanonicalDir(p.mount_dir);
    const std::string file = FuseDeviceFile(dir);
    if (IsMountPoint(dir) || !LoopsBackedBy(file).empty()) {
      // Leftovers of this volume's earlier attachment (the directory is private to it, under the
      // pool) that no record names any more: clear them rather than fail forever.
      spdlog::warn("attach: {}: clearing a leftover nbdfuse mount at {}", p.volume, dir);
      if (Status s = Detach(FuseRef{dir, -1, -1, ""}); !s.ok()) {
        return Error(s.code(), "{} holds a leftover attachment that cannot be cleared: {}", dir,
                     s.message());
      }
      if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return Sys(errno, "mkdir " + dir);
    }

    auto pid = Spawn(p, file);
    if (!pid.ok()) return pid.status();
    on_started(*pid);
    FuseAttachment out;
    out.pid = *pid;
    auto fail = [&](Status s) -> Status {
      if (Status d = Detach(FuseRef{dir, out.pid, out.loop_index, p.loop_tag}); !d.ok()) {
        spdlog::error("attach: {}: cleaning up after a failed fuse attach: {}", p.volume,
                      d.message());
      }
      return s;
    };

    // Ready when the FUSE file shows the window: nbdfuse mounts only after its NBD handshake.
    auto deadline = std::chrono::steady_clock::now() + p.start_timeout;
    for (;;) {
      int st = 0;
      if (waitpid(out.pid, &st, WNOHANG) == out.pid) {
        out.pid = -1;
        return fail(Error(EIO, "nbdfuse for volume {} exited ({}) before it was ready: {}",
                          p.volume, DescribeExit(st), LogTail(p.log_path)));
      }
      struct stat sb;
      if (stat(file.c_str(), &sb) == 0 && static_cast<uint64_t>(sb.st_size) == p.window_bytes) {
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        return fail(Error(ETIMEDOUT, "nbdfuse for volume {} did not present {} in {} ms: {}",
                          p.volume, file, p.start_timeout.count(), LogTail(p.log_path)));
      }
      std::this_thread::sleep_for(kPoll);
    }

    auto loop = BindLoop(p, file);
    if (!loop.ok()) return fail(loop.status());
    out.loop_index = *loop;
    return out;
  }

  bool LoopBound(const FuseRef& ref) override {
    if (ref.loop_index < 0) return false;
    if (!ref.loop_tag.empty()) {
      if (std::optional<std::string> tag = LoopTagOf(ref.loop_index)) return *tag == ref.loop_tag;
    }
    return BackingFile(ref.loop_index) == FuseDeviceFile(CanonicalDir(ref.mount_dir));
  }

  Status CheckNotInUse(int loop_index) override {
    return CheckBlockDeviceNotInUse(LoopDevicePath(loop_index));
  }

  Status Detach(const FuseRef& ref) override {
    const std::string dir = CanonicalDir(ref.mount_dir);
    const std::string file = FuseDeviceFile(dir);
    const int pid = ref.pid;
    // 1. Loop devices first: they hold the FUSE file open, which keeps the mount busy.
    std::vector<int> loops = LoopsBackedBy(file);
    if (LoopBound(ref) &&
        std::find(loops.begin(), loops.end(), ref.loop_index) == loops.end()) {
      loops.push_back(ref.loop_index);
    }
    auto ours = [&](int index) {
      return BackingFile(index) == file ||
             (index == ref.loop_index && !ref.loop_tag.empty() &&
              LoopTagOf(index) == std::optional<std::string>(ref.loop_tag));
    };
    for (int index : loops) {
      std::string dev = LoopDevicePath(index);
      int fd = open(dev.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return Sys(errno, "open " + dev);
      int r = ioctl(fd, LOOP_CLR_FD, 0);
      int err = errno;
      close(fd);
      if (r != 0 && err != ENXIO) return Sys(err, "LOOP_CLR_FD " + dev);
      // With another opener (udev's probe) the kernel only marks the device for autoclear.
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (ours(index)) {
        if (std::chrono::steady_clock::now() >= deadline) {
          return Error(EBUSY, "{} still holds {} 5 s after LOOP_CLR_FD; retry", dev, file);
        }
        std::this_thread::sleep_for(kPoll);
      }
    }
    // 2. The mount: unmounting ends nbdfuse's FUSE session, and nbdfuse exits by itself.
    if (IsMountPoint(dir)) {
      if (umount2(dir.c_str(), 0) != 0) {
        int err = errno;
        if (err != EINVAL && err != ENOENT) {
          // Someone still has the file open: detach it lazily so nbdfuse can still exit.
          spdlog::warn("attach: umount {}: {}; unmounting lazily", dir, std::strerror(err));
          if (umount2(dir.c_str(), MNT_DETACH) != 0 && errno != EINVAL) {
            return Sys(errno, "umount -l " + dir);
          }
        }
      }
    }
    // 3. nbdfuse: the recorded pid, and any other nbdfuse on this file (a crash before the
    // record had its pid).
    std::vector<int> pids = NbdfusesFor(file);
    if (pid > 0 && std::find(pids.begin(), pids.end(), pid) == pids.end()) pids.push_back(pid);
    for (int p : pids) {
      if (WaitGone(p, file, std::chrono::seconds(3))) continue;
      spdlog::warn("attach: nbdfuse (pid {}) for {} did not exit after the unmount; killing it", p,
                   dir);
      kill(p, SIGTERM);
      if (WaitGone(p, file, std::chrono::seconds(2))) continue;
      kill(p, SIGKILL);
      if (!WaitGone(p, file, std::chrono::seconds(2))) {
        return Error(EBUSY, "nbdfuse (pid {}) for {} survives SIGKILL; retry", p, dir);
      }
    }
    if (rmdir(dir.c_str()) != 0 && errno != ENOENT) {
      spdlog::warn("attach: cannot remove {}: {}", dir, std::strerror(errno));
    }
    return Status::Ok();
  }

  Status Resize(int loop_index, uint64_t size_bytes) override {
    std::string dev = LoopDevicePath(loop_index);
    int fd = open(dev.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Sys(errno, "open " + dev);
    loop_info64 info{};
    Status s = Status::Ok();
    if (ioctl(fd, LOOP_GET_STATUS64, &info) != 0) {
      s = Sys(errno, "LOOP_GET_STATUS64 " + dev);
    } else {
      info.lo_sizelimit = size_bytes;
      // Kernels before 5.x refuse a size change with EAGAIN while the device's page cache is
      // being written back; a few retries cover that.
      int r = -1;
      for (int i = 0; i < 10; ++i) {
        r = ioctl(fd, LOOP_SET_STATUS64, &info);
        if (r == 0 || errno != EAGAIN) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      if (r != 0) {
        s = Sys(errno, "LOOP_SET_STATUS64 " + dev);
      } else if (ioctl(fd, LOOP_SET_CAPACITY, 0) != 0) {
        // Recent kernels apply the new limit in SET_STATUS64 already; older ones need this.
        s = Sys(errno, "LOOP_SET_CAPACITY " + dev);
      }
    }
    close(fd);
    return s;
  }

  uint64_t SizeBytes(int loop_index) override {
    try {
      return std::stoull(ReadLine(fmt::format("/sys/block/loop{}/size", loop_index))) * 512;
    } catch (const std::exception&) {
      return 0;
    }
  }

  std::string LinkProblem(const FuseRef& ref) override {
    const std::string file = FuseDeviceFile(CanonicalDir(ref.mount_dir));
    const int pid = ref.pid;
    if (ref.loop_index < 0) return "the loop device was never bound";
    if (!LoopBound(ref)) {
      return fmt::format("{} is no longer this attachment's", LoopDevicePath(ref.loop_index));
    }
    if (pid <= 0) return "nbdfuse's pid is unknown";
    int st = 0;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) return fmt::format("nbdfuse (pid {}) exited ({})", pid, DescribeExit(st));
    if (r == 0) return "";
    if (!IsNbdfuseFor(pid, file)) return fmt::format("nbdfuse (pid {}) is not running", pid);
    return "";
  }

 private:
  static std::string DescribeExit(int st) {
    if (WIFEXITED(st)) return fmt::format("exit status {}", WEXITSTATUS(st));
    if (WIFSIGNALED(st)) return fmt::format("killed by signal {}", WTERMSIG(st));
    return "unknown status";
  }

  StatusOr<int> Spawn(const FuseAttachParams& p, const std::string& file) {
    std::vector<std::string> args = {"nbdfuse", "-C", std::to_string(std::max(p.connections, 1u))};
    if (p.read_only) args.push_back("-r");
    args.push_back(file);
    args.push_back(p.uri);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);

    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, p.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                     0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    // Its own session: a terminal hangup or a signal to our process group must not reach it.
    // The daemon's threads may block signals (and ignore SIGPIPE): none of that is inherited.
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    sigdelset(&all, SIGKILL);
    sigdelset(&all, SIGSTOP);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
                                         POSIX_SPAWN_SETSIGDEF);
    pid_t pid = -1;
    int r = posix_spawnp(&pid, "nbdfuse", &fa, &attr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (r != 0) return Sys(r, "cannot start nbdfuse for volume " + p.volume);
    spdlog::info("attach: started nbdfuse (pid {}) for volume {}: {}", pid, p.volume,
                 fmt::join(args, " "));
    return static_cast<int>(pid);
  }

  StatusOr<int> BindLoop(const FuseAttachParams& p, const std::string& file) {
    int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0) return Sys(errno, "open /dev/loop-control");
    int backing = open(file.c_str(), (p.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (backing < 0) {
      int err = errno;
      close(ctl);
      return Sys(err, "open " + file);
    }
    StatusOr<int> result = Error(EBUSY, "no free loop device after 8 attempts");
    bool direct = true;
    for (int attempt = 0; attempt < 8; ++attempt) {
      int index = ioctl(ctl, LOOP_CTL_GET_FREE);
      if (index < 0) {
        result = Sys(errno, "LOOP_CTL_GET_FREE");
        break;
      }
      std::string dev = LoopDevicePath(index);
      int fd = open(dev.c_str(), (p.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
      if (fd < 0) {
        result = Sys(errno, "open " + dev);
        break;
      }
      loop_config cfg{};
      cfg.fd = static_cast<uint32_t>(backing);
      cfg.block_size = 4096;  // as the kernel NBD path: file systems see 4 KiB sectors either way
      cfg.info.lo_sizelimit = p.size_bytes;
      // No LO_FLAGS_AUTOCLEAR: the device must outlive this daemon (a crash must not pull the
      // device from under a mounted file system), and Detach clears it explicitly.
      cfg.info.lo_flags = (direct ? LO_FLAGS_DIRECT_IO : 0) | (p.read_only ? LO_FLAGS_READ_ONLY : 0);
      const std::string& name = p.loop_tag.empty() ? file : p.loop_tag;
      std::snprintf(reinterpret_cast<char*>(cfg.info.lo_file_name), LO_NAME_SIZE, "%s",
                    name.c_str());
      int r = ioctl(fd, LOOP_CONFIGURE, &cfg);
      int err = errno;
      close(fd);
      if (r == 0) {
        result = index;
        break;
      }
      if (err == EBUSY) continue;  // another process took it between GET_FREE and CONFIGURE
      if (err == EINVAL && direct) {  // direct I/O refused for this file: use the page cache
        direct = false;
        --attempt;
        continue;
      }
      result = Sys(err, "LOOP_CONFIGURE " + dev);
      break;
    }
    close(backing);
    close(ctl);
    if (result.ok()) {
      std::string dio = ReadLine(fmt::format("/sys/block/loop{}/loop/dio", *result));
      spdlog::info("attach: {} bound to {} (limit {} bytes, direct I/O {})",
                   LoopDevicePath(*result), file, p.size_bytes, dio == "1" ? "on" : "off");
    }
    return result;
  }
};

bool Unreserved(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '.' || c == '_' || c == '~';
}

std::string Escape(const std::string& s, bool keep_slash) {
  std::string out;
  for (char c : s) {
    if (Unreserved(c) || (keep_slash && c == '/') || (!keep_slash && c == '@')) {
      out += c;
    } else {
      out += fmt::format("%{:02X}", static_cast<unsigned char>(c));
    }
  }
  return out;
}

}  // namespace

std::unique_ptr<FuseLoopInterface> MakeLinuxFuseLoop() { return std::make_unique<LinuxFuseLoop>(); }

std::string LoopDevicePath(int index) { return fmt::format("/dev/loop{}", index); }

std::string FuseDeviceFile(const std::string& mount_dir) {
  return mount_dir + "/" + kDeviceFileName;
}

std::string FuseExportUri(const std::string& volume, const std::string& socket_path) {
  return fmt::format("nbd+unix:///{}?socket={}", Escape(volume, false),
                     Escape(socket_path, true));
}

}  // namespace nbdcsi::datapath
