// The pool: thin volumes as sparse files in one directory on the node's local disk.
//
// Layout of a pool directory DIR:
//   DIR/.pool.lock        flock(LOCK_EX) held for the daemon's lifetime: one daemon per pool
//   DIR/volumes/NAME.img  the volume's data, a sparse file (thin provisioning)
//   DIR/volumes/NAME.json the volume's metadata; its presence is the commit point of a volume
//   DIR/volumes/.*.tmp    temp files of an interrupted metadata write (removed on open)
//
// Every metadata change is crash-safe: write a temp file, fsync it, rename it over the old one,
// fsync the directory. Multi-step operations are ordered so that a kill -9 at any point leaves
// the old state or the new one after restart, never a half-made volume that looks ready:
//   create:  data file created + sized + fsynced, then metadata committed. A data file without
//            metadata is an orphan: removed (and counted) when the pool is opened.
//   delete:  metadata removed + dir fsynced (the volume is gone), then the data file.
//   resize:  data file grown + fsynced, then metadata committed. On open, a data file whose
//            size differs from its metadata is truncated back to the committed size.
// Metadata that cannot be loaded (invalid JSON, unknown version, missing data file) marks the
// volume broken: it is reported in PoolInfo::broken_volumes, nothing of it is deleted, its name
// stays taken until an explicit Delete. Only files the pool itself leaves behind (temp files,
// data files with no metadata at all) are removed automatically.
// Sizes must be multiples of kVolumeSizeAlignment; per-GiB QoS keys use the size rounded up to
// whole GiB (see qos.h Resolve).
// Fault points (common/fault.h) sit between the steps so a test can _exit at each one.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "datapath/pool/qos.h"
#include "datapath/pool/stats.h"
#include "datapath/pool/write_gate.h"

namespace nbdcsi::datapath {

inline constexpr size_t kMaxVolumeNameLen = 128;
// Volume sizes must be a multiple of this (the CSI layer rounds requests up): it keeps every
// volume usable with O_DIRECT on 4Kn disks and matches the NBD block size we advertise.
inline constexpr uint64_t kVolumeSizeAlignment = 4096;
// Upper bound for QosLimits::burst_ms: a minute of the rate is already a very deep bucket.
inline constexpr uint32_t kMaxBurstMs = 60000;

// Names: 1..128 bytes of [A-Za-z0-9._-], not starting with '.' or '-'. This rules out '/',
// "..", NUL and anything a shell or a file system would treat specially. The message says why.
Status ValidateVolumeName(const std::string& name);

struct PoolOptions {
  std::string dir;
  // Provisioned bytes may reach capacity * overcommit_ratio. 1.0 = no overcommit.
  double overcommit_ratio = 1.0;
  // Capacity override in bytes (0: the pool file system's size from statvfs).
  uint64_t capacity_bytes = 0;
};

struct VolumeInfo {
  std::string name;
  uint64_t size = 0;             // provisioned bytes
  uint64_t allocated = 0;        // bytes actually allocated on disk (st_blocks * 512)
  int64_t created_unix_ns = 0;
  bool read_only = false;
  QosLimits qos;
  std::string path;              // data file path
};

struct PoolInfo {
  std::string dir;
  uint64_t capacity = 0;         // bytes usable by the pool (statvfs or override)
  uint64_t free = 0;             // bytes free on the pool file system
  uint64_t provisioned = 0;      // sum of volume sizes
  uint64_t allocated = 0;        // sum of allocated bytes
  double overcommit_ratio = 1.0;
  uint64_t volumes = 0;
  // Orphans found and removed when the pool was opened (data files without metadata,
  // stale temp files), so an operator can see what a crash left behind.
  std::vector<std::string> cleaned_orphans;
  // Volumes whose metadata exists but that could not be loaded ("NAME: reason"): unreadable or
  // invalid metadata, or a missing data file. They are left on disk untouched (nothing is
  // deleted automatically), block their name for Create, and Delete removes them.
  std::vector<std::string> broken_volumes;
  std::string fs_type;           // "xfs", "ext4", "btrfs", ...
};

// A live volume, shared by the pool and every NBD connection serving it.
class Volume {
 public:
  const std::string& name() const { return name_; }
  uint64_t size() const { return size_.load(std::memory_order_acquire); }
  bool read_only() const { return read_only_; }
  // O_DIRECT descriptor for aligned I/O; buffered descriptor for unaligned requests.
  int direct_fd() const { return direct_fd_; }
  int buffered_fd() const { return buffered_fd_; }
  Throttle& throttle() { return throttle_; }
  // Modifying requests pass through here so snapshots and clones can pause them.
  WriteGate& gate() { return gate_; }
  VolumeStats& stats() { return stats_; }
  ~Volume();

 private:
  friend class Pool;
  std::string name_;
  std::atomic<uint64_t> size_{0};
  bool read_only_ = false;
  int direct_fd_ = -1;
  int buffered_fd_ = -1;
  Throttle throttle_;
  VolumeStats stats_;
  WriteGate gate_;
};

class Pool {
 public:
  // Opens (creating if needed) the pool directory, takes the lock, cleans orphans and loads
  // every volume. Fails with EBUSY (and names the lock file) if another daemon holds the pool.
  static StatusOr<std::unique_ptr<Pool>> Open(const PoolOptions& opts);
  ~Pool();

  // EEXIST if a volume of that name exists with a different size, read_only flag or QoS
  // limits (CSI: parameters must be compatible); idempotent (returns the existing volume)
  // when all of them match. EINVAL for a bad name, a size that is 0 or not a multiple of
  // kVolumeSizeAlignment, or bad QoS limits.
  // ENOSPC if provisioned + size would exceed capacity * overcommit.
  StatusOr<VolumeInfo> Create(const std::string& name, uint64_t size, const QosLimits& qos,
                              bool read_only = false);
  // ENOENT if missing; EBUSY if NBD connections are open.
  Status Delete(const std::string& name);
  // Grows a volume (connected clients keep working; a reconnect sees the new size).
  // EINVAL for a shrink; same size is a no-op; ENOSPC past the overcommit limit.
  StatusOr<VolumeInfo> Resize(const std::string& name, uint64_t new_size);
  // Persists the limits, then applies them live. EINVAL if burst_ms > kMaxBurstMs.
  Status SetQos(const std::string& name, const QosLimits& qos);
  StatusOr<VolumeInfo> Inspect(const std::string& name);
  std::vector<VolumeInfo> List();
  PoolInfo Info();

  // For NBD sessions: the live volume, or nullptr.
  std::shared_ptr<Volume> Acquire(const std::string& name);
  std::vector<std::string> Names();

 private:
  Pool() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::datapath
