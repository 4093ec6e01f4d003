// The identity of one version of a file, to notice that a certificate file changed without
// reading it on every poll.
//
// A Kubernetes secret volume swaps a symlink (new inode); an in-place rewrite changes the size
// or mtime. ctime is compared too: a copy that restores mtime (cp -p, rsync -t, touch -r) with
// the same size changes only ctime. A change that is not one (chmod) costs one extra read, and
// the readers compare contents before they publish, so strict is the safe side for both TLS
// reloaders (gRPC in common/tls.cpp, NBD in datapath/engine/nbd_tls.cpp).
#pragma once

#include <sys/stat.h>

#include <cerrno>
#include <string>

namespace nbdcsi {

struct FileId {
  int err = 0;  // stat failed with this errno; the rest is then zero
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  timespec mtime{};
  timespec ctime{};

  static FileId Of(const std::string& path) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) return FileId{.err = errno};
    return FileId{.dev = st.st_dev,
                  .ino = st.st_ino,
                  .size = st.st_size,
                  .mtime = st.st_mtim,
                  .ctime = st.st_ctim};
  }
  bool operator==(const FileId& o) const {
    return err == o.err && dev == o.dev && ino == o.ino && size == o.size &&
           mtime.tv_sec == o.mtime.tv_sec && mtime.tv_nsec == o.mtime.tv_nsec &&
           ctime.tv_sec == o.ctime.tv_sec && ctime.tv_nsec == o.ctime.tv_nsec;
  }
};

}  // namespace nbdcsi
