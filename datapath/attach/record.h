// One attachment's durable record, and the directory that holds them (POOL/attachments/NAME.json).
//
// The pool's orphan sweep only looks at volumes/ and snapshots/, and the pool lock keeps a second
// daemon away from this directory. A record is written before the device exists and completed
// after (attachments.h says in which order), so no device is ever attached without a record that
// names it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace nbdcsi::datapath {

inline constexpr const char* kModeKernel = "kernel";
inline constexpr const char* kModeFuse = "fuse";
// Sockets (kernel) or nbdfuse connections (fuse) of one attachment, at most.
inline constexpr unsigned kMaxAttachConnections = 16;

struct AttachmentRecord {
  std::string volume;
  std::string mode = kModeKernel;  // kModeKernel or kModeFuse
  // kernel: N of /dev/nbdN; fuse: N of /dev/loopN. -1: not confirmed yet.
  int index = -1;
  // kernel: the device's NBD_ATTR_BACKEND_IDENTIFIER; fuse: the same form, for telling
  // attachments apart in listings.
  std::string cookie;
  unsigned connections = 0;  // kernel: sockets; fuse: nbdfuse's multi-conn connections
  uint64_t size_bytes = 0;   // what the device was last told
  bool read_only = false;
  int fuse_pid = -1;        // fuse: nbdfuse's pid (-1: not started yet)
  std::string fuse_mount;   // fuse: nbdfuse's mount point
  // The device serves the replicated volume's target (the backend export VOLUME@target, issue
  // 16) instead of the pool volume VOLUME. Kernel mode only. Persisted only when true, so the
  // records of local volumes keep their old form and records written before it load as local.
  bool target = false;

  // Not persisted: the link's state when the record was handed out (List, Get, Attach).
  bool link_ok = true;
  std::string link_error;
  // Not persisted: reconnects by this process (after its start, or when the kernel dropped a
  // socket); /metrics counts them.
  uint64_t reconnects = 0;

  bool fuse() const { return mode == kModeFuse; }
  std::string device() const;
  std::string ToJson() const;
  static StatusOr<AttachmentRecord> FromJson(const std::string& text);
};

// A record file as Load() found it.
struct LoadedRecord {
  std::string stem;  // the file name without ".json": the volume the record must describe
  std::string path;
  // Why not, when the file could not be read (unreadable) or does not hold a valid record of
  // `stem` (malformed, or naming another volume).
  StatusOr<AttachmentRecord> record;
  bool unreadable = false;
};

class RecordStore {
 public:
  explicit RecordStore(std::string dir);
  const std::string& dir() const { return dir_; }

  // Creates the directory (0700, its parent fsynced) unless it exists; ENOTDIR when the name is
  // taken by something else.
  Status Init();
  // Atomic: after a crash the file holds the old record or the new one.
  Status Write(const AttachmentRecord& r);
  // Idempotent; the directory is fsynced.
  Status Remove(const std::string& volume);
  // Every record, sorted by file name. Removes the temp files of writes a crash interrupted
  // before their rename (the record they were replacing, if any, is intact). Records that cannot
  // be used are returned with the reason, never deleted: an operator decides.
  StatusOr<std::vector<LoadedRecord>> Load() const;

 private:
  std::string dir_;
};

}  // namespace nbdcsi::datapath
