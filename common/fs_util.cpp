#include "common/fs_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "common/fault.h"

namespace nbdcsi {

namespace {

Status Sys(int err, const std::string& what) {
  return Status(err, fmt::format("{}: {}", what, std::strerror(err)));
}

std::string Parent(const std::string& path) {
  auto pos = path.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

}  // namespace

Status FsyncDir(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Sys(errno, "open directory " + dir + " for fsync");
  int rc = fsync(fd);
  int err = errno;
  close(fd);
  if (rc != 0) return Sys(err, "fsync directory " + dir);
  return Status::Ok();
}

Status MkdirP(const std::string& path) {
  if (path.empty()) return Error(EINVAL, "empty directory path");
  struct stat st{};
  if (stat(path.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) return Error(ENOTDIR, "{} exists and is not a directory", path);
    return Status::Ok();
  }
  if (errno != ENOENT) return Sys(errno, "stat " + path);
  std::string parent = Parent(path);
  if (parent != path) {
    if (Status s = MkdirP(parent); !s.ok()) return s;
  }
  if (mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) return Sys(errno, "mkdir " + path);
  return FsyncDir(parent);
}

Status WriteAll(int fd, const std::string& data, const std::string& path) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Sys(errno, "write " + path);
    }
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

StatusOr<std::string> ReadSmallFile(const std::string& path, size_t max_bytes) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Sys(errno, "open " + path);
  std::string out;
  char buf[8192];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      close(fd);
      return Sys(err, "read " + path);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_bytes) {
      close(fd);
      return Error(EFBIG, "{} is larger than the {} bytes expected at most", path, max_bytes);
    }
  }
  close(fd);
  return out;
}

std::string AtomicTempPath(const std::string& dir, const std::string& name) {
  return dir + "/." + name + ".tmp";
}

Status WriteFileAtomic(const std::string& dir, const std::string& name, const std::string& content,
                       const char* fault_tmp, const char* fault_renamed, bool* renamed) {
  bool dummy = false;
  if (!renamed) renamed = &dummy;
  *renamed = false;
  const std::string tmp = AtomicTempPath(dir, name), final_path = dir + "/" + name;
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Sys(errno, "create " + tmp);
  Status s = WriteAll(fd, content, tmp);
  if (s.ok() && fsync(fd) != 0) s = Sys(errno, "fsync " + tmp);
  if (close(fd) != 0 && s.ok()) s = Sys(errno, "close " + tmp);
  if (!s.ok()) {
    unlink(tmp.c_str());
    return s;
  }
  if (fault_tmp && *fault_tmp) FaultPoint(fault_tmp);
  if (rename(tmp.c_str(), final_path.c_str()) != 0) {
    s = Sys(errno, "rename " + tmp + " to " + final_path);
    unlink(tmp.c_str());
    return s;
  }
  *renamed = true;
  if (fault_renamed && *fault_renamed) FaultPoint(fault_renamed);
  return FsyncDir(dir);
}

Status CheckBlockDeviceNotInUse(const std::string& dev) {
  int fd = open(dev.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == EBUSY) return Error(EBUSY, "{} is in use (mounted or held open exclusively)", dev);
    if (errno == ENOENT || errno == ENXIO) return Status::Ok();
    return Error(errno, "cannot open {}: {}", dev, std::strerror(errno));
  }
  close(fd);
  return Status::Ok();
}

}  // namespace nbdcsi
