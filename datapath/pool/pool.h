// The pool: thin volumes as sparse files in one directory on the node's local disk.
//
// This header is the pool's interface; the pool owns the rules for names, sizes, QoS limits and
// capacity, and checks them itself (rules.h) under its own per-name guard, so callers convert
// and forward. Where the implementation lives (datapath/pool/):
//   rules.{h,cpp}      name, size and QoS rules: the one validator, one errno per rule
//   metadata.{h,cpp}   schema of NAME.json and its JSON form; pure parsers (fuzzable)
//   pool_impl.h        the open pool's state (Pool::Impl) and its steps, shared by the files below
//   commit.cpp         durable metadata commit (temp, fsync, rename, dir fsync), rollbacks
//   capacity.cpp       capacity, overcommit, provisionable bytes, Pool::Info
//   load.cpp           Pool::Open: lock, load, orphans, broken objects, recovery of copies
//   watch.cpp          data files removed under the running daemon: the volume is fenced
//   copy.cpp           reflink (CloneWhole) and background-copy (CopyJob) orchestration
//   volumes.cpp        Create (every source), Delete, Resize, QoS, schedule, Inspect, List,
//                      Acquire
//   fill.cpp           restores and clones: source resolution and filling the new volume
//   snapshots.cpp      snapshot create, delete, list, inspect
//   copy_job, write_gate, qos, stats: the copy engine, the write pause, throttling, counters
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
//   resize:  data file grown + fsynced, then metadata committed. On open, a data file longer
//            than its metadata is truncated back to the committed size.
// Metadata that cannot be loaded (invalid JSON, unknown version, missing data file, a data file
// shorter than the metadata's size, which no pool operation leaves) marks the volume broken: it
// is reported in PoolInfo::broken_volumes, nothing of it is deleted, its name stays taken until
// an explicit Delete. Only files the pool itself leaves behind (temp files, data files with no
// metadata at all) are removed automatically.
// Sizes must be multiples of kVolumeSizeAlignment; per-GiB QoS keys use the size rounded up to
// whole GiB (see qos.h Resolve). The errno of every rule is listed in rules.h: each is EINVAL,
// including a size above the largest file size (never EFBIG, which the API once answered with a
// different gRPC code than the pool's own check).
//
// Snapshots, restores and clones:
//   DIR/snapshots/NAME.img + NAME.json   a snapshot: same name rules, same version field and
//                                        same commit rule as volumes, separate namespace.
//   DIR/snapshots/.NAME.img.tmp, .NAME.json.tmp, DIR/volumes/.NAME.img.tmp  temp files.
// Point in time: the source volume's WriteGate is closed and drained (new writes park in their
// workers, in-flight ones finish), its data is fdatasync'ed, then the copy is set up and the
// gate reopens. created_unix_ns is the instant the gate closed. Only that volume pauses.
// Two methods, chosen once at open by probing FICLONE between two temp files in DIR/snapshots
// (PoolInfo::reflink):
//   reflink (XFS reflink=1, btrfs): a live source is cloned into a temp file in 16 MiB
//            FICLONERANGE segments while its writes flow (a DirtyTracker on the gate records
//            them), then under the pause only the chunks written meanwhile are cloned again
//            (copy.cpp CloneWhole); an immutable source is one FICLONE. Then fsync, rename to
//            NAME.img, fsync dir, commit NAME.json ("ready").
//   copy (ext4 ...): NAME.img is created sized and NAME.json committed with state "copying"
//            first (visible, ready=false, with progress); under the pause a CopyJob
//            (copy_job.h) is installed as the source's copy-before-write preserver; when it has
//            copied and fsynced everything, NAME.json is committed "ready" (or "failed" with
//            the error, data truncated to release its space). One copy per source at a time.
//   Restores and clones (Create with a source) write a volume the same way;
//   its metadata records "source" and a "state"; a volume that is not "ready" is not exported
//   (Acquire returns nullptr).
// Crash recovery at open: temp files and data files without metadata are orphans, as for
// volumes. A snapshot or clone still "copying" lost its point in time (its copy-before-write
// died with the process): it is removed and listed in PoolInfo::abandoned_copies. A restore
// still "copying" restarts from scratch (a snapshot never changes) and stays not ready until
// done. Closing the pool cancels running copies, which the next open treats the same way.
// Deleting a snapshot: its own copy is cancelled, metadata removed (commit point), then data.
// While a copy runs: the source volume cannot be deleted (EBUSY) or resized (EAGAIN), the
// target volume cannot be resized or have its QoS changed (EAGAIN), the source snapshot cannot
// be deleted (EBUSY). Snapshot allocated bytes count reflinked extents again (st_blocks), so
// PoolInfo::allocated overstates use on reflink pools.
// A data file removed while the daemon runs (the volume's descriptors keep a nameless inode
// alive) is noticed by the engine at the next FLUSH or FUA write, which fails with EIO, and by
// the pool's watcher within a second even when the volume is idle: the volume is then broken
// like one that failed to load (listed with the reason, not served, its name taken until a
// Delete), and its other files are left as they are.
// Fault points (common/fault.h) sit between the steps so a test can _exit at each one.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "common/volume_schedule.h"
#include "datapath/pool/qos.h"
#include "datapath/pool/rules.h"
#include "datapath/pool/stats.h"
#include "datapath/pool/write_gate.h"

namespace nbdcsi::datapath {

struct PoolOptions {
  std::string dir;
  // Provisioned bytes may reach capacity * overcommit_ratio. 1.0 = no overcommit.
  double overcommit_ratio = 1.0;
  // Capacity override in bytes (0: the pool file system's size from statvfs).
  uint64_t capacity_bytes = 0;
  // The share of the pool file system's size kept free: when its real free space is under it,
  // nothing more is provisioned, and what may still be is at most (free - reserve) x overcommit.
  // Thin volumes fill as they are written; this keeps placement from choosing a disk that is
  // about to fill (other data on it, or volumes written full). 0 (the library's default, for
  // tests) checks only capacity x overcommit; nbd-datapathd defaults to 0.10.
  double free_reserve_ratio = 0;
  // Never use FICLONE even where the file system supports it: snapshots, restores and clones
  // take the background-copy path (tests; or a file system whose reflink is known to be bad).
  bool disable_reflink = false;
  // Tests only: called with a step's name while the operation holds its name guard, so a test
  // can hold it there and race another call deterministically. Steps: "create.resolved" (a
  // create has checked its target and source and reserved capacity; nothing is on disk yet),
  // "delete_snapshot.guarded".
  std::function<void(std::string_view step)> on_step;
};

// Where a new volume's content comes from.
struct VolumeSource {
  enum class Kind { kBlank, kSnapshot, kVolume };
  Kind kind = Kind::kBlank;
  std::string name;  // the snapshot (restore) or the live volume (clone)

  static VolumeSource FromSnapshot(std::string snapshot) {
    return {Kind::kSnapshot, std::move(snapshot)};
  }
  static VolumeSource FromVolume(std::string volume) { return {Kind::kVolume, std::move(volume)}; }
  // "" (blank), "snapshot/NAME" or "volume/NAME": VolumeInfo::source and the metadata's "source".
  std::string Label() const;
};

struct CreateSpec {
  std::string name;
  // Bytes. With a source, 0 means the source's size; a larger size grows the copy (the new tail
  // reads as zeros), a smaller one is EINVAL.
  uint64_t size = 0;
  QosLimits qos;
  bool read_only = false;
  VolumeSource source;
  // Recurring snapshots and backups (common/volume_schedule.h), stored with the volume; part of
  // the idempotency check like the QoS limits.
  VolumeSchedule schedule = {};

  // The three kinds in one expression (tools and tests).
  static CreateSpec Blank(std::string name, uint64_t size, QosLimits qos = {},
                          bool read_only = false) {
    return {std::move(name), size, qos, read_only, {}, {}};
  }
  static CreateSpec Restore(std::string name, std::string snapshot, uint64_t size = 0,
                            QosLimits qos = {}, bool read_only = false) {
    return {std::move(name), size, qos, read_only, VolumeSource::FromSnapshot(std::move(snapshot)),
            {}};
  }
  static CreateSpec Clone(std::string name, std::string volume, uint64_t size = 0,
                          QosLimits qos = {}, bool read_only = false) {
    return {std::move(name), size, qos, read_only, VolumeSource::FromVolume(std::move(volume)),
            {}};
  }
};

struct VolumeInfo {
  std::string name;
  uint64_t size = 0;             // provisioned bytes
  uint64_t allocated = 0;        // bytes actually allocated on disk (st_blocks * 512)
  int64_t created_unix_ns = 0;
  bool read_only = false;
  QosLimits qos;
  std::string path;              // data file path
  // Content source: "" (blank), "snapshot/NAME" (restore) or "volume/NAME" (clone).
  std::string source;
  // False while a background copy fills it (restore/clone without reflink): such a volume is
  // not exported over NBD (Acquire returns nullptr) until the copy is done.
  bool ready = true;
  uint64_t copy_done = 0, copy_total = 0;  // progress of that copy, bytes
  // The same in allocated data (CopyJob::data_*); no total until the job has mapped it.
  uint64_t copy_data_done = 0;
  std::optional<uint64_t> copy_data_total;
  // The epoch the volume is fenced at (Pool::FenceVolume); 0 = never fenced.
  uint64_t fence_epoch = 0;
  VolumeSchedule schedule;  // empty(): none
};

// Snapshots live in DIR/snapshots/NAME.img + NAME.json, with the same crash-safety rules and
// name rules as volumes (a separate namespace). They are independent files: deleting the
// source volume keeps them.
struct SnapshotInfo {
  std::string name;
  std::string source_volume;     // the volume it was taken from (may no longer exist)
  uint64_t size = 0;             // the source's size at the snapshot instant
  uint64_t allocated = 0;
  int64_t created_unix_ns = 0;   // the point in time the snapshot holds
  std::string method;            // "reflink" (FICLONE, O(metadata)) or "copy" (background copy)
  bool ready = false;            // false while a "copy" snapshot is still being filled
  uint64_t copy_done = 0, copy_total = 0;
  uint64_t copy_data_done = 0;  // as in VolumeInfo
  std::optional<uint64_t> copy_data_total;
  std::string error;             // set when a background copy failed (state "failed")
  std::string path;
};

struct PoolInfo {
  std::string dir;
  uint64_t capacity = 0;         // bytes usable by the pool (statvfs or override)
  uint64_t free = 0;             // bytes free on the pool file system (statvfs f_bavail)
  uint64_t free_reserve = 0;     // bytes of it kept free (PoolOptions::free_reserve_ratio)
  bool reserve_applies = false;  // a reserve is set and statvfs answered: free counts below
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
  bool reflink = false;          // FICLONE works on this pool (probed at open)
  uint64_t snapshots = 0;
  // Snapshots/clones whose background copy was interrupted by a crash: their point in time is
  // lost, so they were removed at open and are listed here.
  std::vector<std::string> abandoned_copies;

  // How many more bytes may be provisioned: capacity x overcommit ratio minus what is
  // provisioned, and (when reserve_applies) at most (free - free_reserve) x overcommit ratio; 0
  // when overcommitted already or under the reserve, saturating at UINT64_MAX. The same policy
  // Create and Resize enforce (capacity.cpp); GetPoolInfo, GetCapacity and the heartbeat report
  // it.
  uint64_t provisionable() const;
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
  // True once the data file was found removed (unlinked) while the volume was open. What is
  // written into the nameless inode is gone when the last descriptor closes, so from then on
  // the engine answers writes and FLUSH with EIO (a FLUSH must never promise durability the
  // file cannot give), no new connection gets the volume, and the pool reports it broken.
  bool data_lost() const { return data_lost_.load(std::memory_order_acquire); }
  // One fstat of the open data file: a file with no name left (st_nlink == 0) marks the volume
  // lost. Returns !data_lost(). The engine calls it when a FLUSH or FUA write completes, before
  // it answers; the pool's watcher calls it for every volume each second (kWatchPeriod).
  bool CheckDataFile();
  // The epoch this volume is fenced at (Pool::FenceVolume), 0 when it never was. The engine
  // compares each request's connection epoch with it before it starts the request (one load).
  uint64_t fence_epoch() const { return fence_epoch_.load(std::memory_order_acquire); }
  ~Volume();

 private:
  friend class Pool;
  std::atomic<bool> data_lost_{false};
  std::atomic<uint64_t> fence_epoch_{0};
  std::string name_;
  std::atomic<uint64_t> size_{0};
  bool read_only_ = false;
  int direct_fd_ = -1;
  int buffered_fd_ = -1;
  Throttle throttle_;
  VolumeStats stats_;
  WriteGate gate_;
};

// Every operation checks its arguments against rules.h first (EINVAL, nothing touched), then
// takes the names it works on (waiting for another operation on them to finish), then decides
// on the pool's state under that guard: no caller can see a state that changes before it acts.
class Pool {
 public:
  // Opens (creating if needed) the pool directory, takes the lock, cleans orphans and loads
  // every volume. Fails with EBUSY (and names the lock file) if another daemon holds the pool.
  static StatusOr<std::unique_ptr<Pool>> Open(const PoolOptions& opts);
  ~Pool();

  // The one way to make a volume: blank, restored from a snapshot, or cloned from a live volume.
  // Idempotent (CSI): when a volume of that name exists with the same source, size (after
  // resolving 0), read_only flag and QoS limits, it is returned; otherwise EEXIST naming what
  // differs. EINVAL: bad names, size or QoS (rules.h; per-GiB keys against the resolved size), a
  // size smaller than the source's, a clone onto itself. ENOENT: unknown source; EIO: broken
  // source; EAGAIN: the source is not ready or a copy from it runs. ENOSPC if provisioned + size
  // would exceed capacity * overcommit. Restores and clones hold the source's name too, so the
  // source cannot be deleted between the checks and the copy.
  StatusOr<VolumeInfo> Create(const CreateSpec& spec);
  // A blank volume (tests and tools): Create with no source.
  StatusOr<VolumeInfo> Create(const std::string& name, uint64_t size, const QosLimits& qos,
                              bool read_only = false) {
    return Create(CreateSpec::Blank(name, size, qos, read_only));
  }
  // ENOENT if missing; EBUSY if NBD connections are open.
  Status Delete(const std::string& name);
  // Grows a volume (connected clients keep working; a reconnect sees the new size).
  // EINVAL for a shrink, or when its per-GiB QoS limits overflow at the new size; same size is a
  // no-op; ENOSPC past the overcommit limit.
  StatusOr<VolumeInfo> Resize(const std::string& name, uint64_t new_size);
  // Applies `patch` to the volume's limits under its guard, persists the result, then applies it
  // live; returns the volume. EINVAL if the result breaks the QoS rules for the volume's size.
  StatusOr<VolumeInfo> UpdateQos(const std::string& name, const QosPatch& patch);
  Status SetQos(const std::string& name, const QosLimits& qos) {
    return UpdateQos(name, QosPatch::All(qos)).status();
  }
  // Replaces the volume's recurring snapshot/backup schedule (an empty one removes it) and
  // persists it; the schedule runner (datapath/schedule) reads it at its next tick. EINVAL:
  // ValidateSchedule's rules; ENOENT; EAGAIN while a background copy fills the volume.
  StatusOr<VolumeInfo> SetSchedule(const std::string& name, const VolumeSchedule& schedule);
  StatusOr<VolumeInfo> Inspect(const std::string& name);
  std::vector<VolumeInfo> List();

  // Fencing (replicated volumes, docs/design.md "Fencing"): records `epoch` as the volume's
  // fence epoch R, durably, then stops every connection of an older epoch: the volume's writes
  // pause and drain (WriteGate), R becomes visible to the engine, writes resume, and from then
  // on the engine answers every request of a connection whose epoch is below R with EPERM.
  // When it returns, no modifying request of an older epoch is running or can start. Returns
  // the recorded epoch. epoch == R: nothing to do (idempotent). EINVAL: epoch outside
  // 1..kMaxFenceEpoch; ESTALE: epoch < R (the message names both); ENOENT; EAGAIN while a
  // background copy fills the volume. A restart keeps R; snapshots and clones start at 0.
  StatusOr<uint64_t> FenceVolume(const std::string& name, uint64_t epoch);
  PoolInfo Info();

  // ---- snapshots (restores and clones are Create with a source; design in copy_job.h) ----
  // Point-in-time snapshot of a live volume: its writes are paused (WriteGate), in-flight
  // writes drain and are made durable (fdatasync), the data is cloned (FICLONE where the pool
  // file system supports reflink; otherwise a CopyJob installed as copy-before-write
  // preserver), writes resume. Other volumes never pause.
  // Idempotent by name: same name + same source returns the existing snapshot; same name and
  // another source is EEXIST naming both. ENOENT: unknown volume. ENOSPC: not enough room for
  // a copy. EAGAIN: another copy from this volume is still running (retry later).
  StatusOr<SnapshotInfo> CreateSnapshot(const std::string& name, const std::string& volume);
  // ENOENT if missing; EBUSY while a restore is copying from it.
  Status DeleteSnapshot(const std::string& name);
  // All snapshots, or those taken from `volume` when it is not empty (EINVAL for a bad name).
  StatusOr<std::vector<SnapshotInfo>> ListSnapshots(const std::string& volume = "");
  StatusOr<SnapshotInfo> InspectSnapshot(const std::string& name);

  // For NBD sessions: the live volume, or nullptr.
  std::shared_ptr<Volume> Acquire(const std::string& name);
  std::vector<std::string> Names();

 private:
  Pool() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::datapath
