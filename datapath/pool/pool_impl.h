// Internal to datapath/pool: the state of an open pool (Pool::Impl) and the steps its operations
// are made of. The steps are defined by job in commit.cpp, capacity.cpp, load.cpp, copy.cpp,
// volumes.cpp, fill.cpp and snapshots.cpp (see the map at the top of pool.h).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/fs_util.h"
#include "common/name_locks.h"
#include "common/status.h"
#include "datapath/pool/copy_job.h"
#include "datapath/pool/metadata.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {

// errno plus "what: strerror".
Status Sys(int err, const std::string& what);
// "N bytes (X.XX GiB)", for messages.
std::string Bytes(uint64_t n);
int64_t RealtimeNs();
double MsSince(std::chrono::steady_clock::time_point t0);
// Why a volume or snapshot in `state` cannot be used yet.
std::string NotReadyReason(const std::string& state, const std::string& error);
// Sizes a newly created data file (the new space is a hole) and makes it and its directory
// entry durable.
Status SizeDurably(int fd, uint64_t size, const std::string& path, const std::string& dir);
// FICLONE of a whole file at one instant; a live source (gate not null) is cloned while its writes
// flow and fixed up under a short pause (copy.cpp).
Status CloneWhole(int dst_fd, const std::string& dst_path, int src_fd, const std::string& what,
                  WriteGate* gate, int64_t* closed_ns, double* pause_ms);

// The keys of the pool's name guard (volumes and snapshots are separate namespaces), which are
// also the labels a copy and a volume's "source" use for them.
inline std::string VolKey(const std::string& name) { return "volume/" + name; }
inline std::string SnapKey(const std::string& name) { return "snapshot/" + name; }

struct Pool::Impl {
  struct Entry {
    std::shared_ptr<Volume> vol;
    VolumeMeta meta;
  };

  // A background copy filling a snapshot or a volume (file systems without reflink).
  struct CopyRec {
    uint64_t id = 0;
    std::string target;  // "snapshot/NAME" or "volume/NAME"
    std::string source;  // "volume/NAME" or "snapshot/NAME"
    std::shared_ptr<CopyJob> job;
    std::shared_ptr<Volume> src_vol;  // keeps the live source's descriptor open
    int src_fd = -1;                  // owned when src_vol is null (a snapshot's data file)
    int dst_fd = -1;                  // owned when the target is a snapshot
    int64_t point_in_time_ns = 0;
  };

  // Where a restore's or clone's data comes from, once resolved under the name guard.
  struct FillSource {
    const char* op = "";           // "restore" | "clone": prefix of fault points and messages
    std::string label;             // "snapshot/NAME" | "volume/NAME", the volume's "source"
    int fd = -1;
    bool own_fd = false;           // close it when done (a snapshot's data file)
    uint64_t length = 0;           // bytes of content
    std::shared_ptr<Volume> live;  // the live source to pause, or null for a snapshot
    std::string snapshot;          // the snapshot whose data file to open (restores)
  };

  // Serialises operations on names (the second caller waits its turn) without holding `mu`
  // during the operation, and holds the capacity promised to the operation until it ends. Keys
  // are VolKey/SnapKey; several are taken all at once, never one after the other, so two
  // operations naming the same pair in opposite roles (snapshot S of V, restore V from S) cannot
  // deadlock.
  class NameGuard {
   public:
    NameGuard(Impl& impl, std::vector<std::string> keys)
        : impl_(impl), names_(impl.names.AcquireAll(std::move(keys))) {}
    // The reservation goes first: once the names are free, another operation on them may run.
    ~NameGuard() {
      std::lock_guard lock(impl_.mu);
      impl_.reserved -= reserved_;
    }
    // Capacity promised to this operation until it finishes; caller holds impl.mu.
    void ReserveLocked(uint64_t bytes) {
      impl_.reserved += bytes;
      reserved_ += bytes;
    }
    NameGuard(const NameGuard&) = delete;
    NameGuard& operator=(const NameGuard&) = delete;

   private:
    Impl& impl_;
    NameLocks::Guard names_;
    uint64_t reserved_ = 0;
  };

  PoolOptions opts;
  std::string vol_dir;
  std::string snap_dir;
  int lock_fd = -1;
  bool reflink = false;
  std::vector<std::string> cleaned_orphans;
  std::vector<std::string> abandoned;
  NameLocks names;

  // Guards everything below. Held only for map lookups and bookkeeping, never across disk I/O:
  // a name being worked on is held in `names` instead, so slow fsyncs on one volume do not stall
  // Acquire (every NBD connect) or operations on other volumes.
  std::mutex mu;
  std::map<std::string, Entry> vols;
  std::map<std::string, std::string> broken;  // name -> why it could not be loaded
  uint64_t reserved = 0;  // capacity promised to creates/resizes in flight
  std::map<std::string, SnapshotMeta> snaps;
  std::map<std::string, std::string> broken_snaps;
  std::map<std::string, std::shared_ptr<CopyRec>> copies;  // by target
  // Jobs whose on_done has run. Dropped from another thread than the job's own, so that a
  // job is never destroyed (and joined) from inside its own callback.
  std::vector<std::shared_ptr<CopyJob>> finished_jobs;
  uint64_t next_copy_id = 1;

  // The watcher of data files (watch.cpp); its own lock, so a round never waits for `mu`
  // to stop.
  std::thread watch_thread;
  std::mutex watch_mu;
  std::condition_variable watch_cv;
  bool watch_stop = false;  // guarded by watch_mu

  ~Impl();  // copy.cpp: stops the watcher, cancels running copies

  void Step(std::string_view step) const {
    if (opts.on_step) opts.on_step(step);
  }

  // ---- paths ----
  std::string DataPath(const std::string& n) const { return vol_dir + "/" + n + ".img"; }
  std::string MetaPath(const std::string& n) const { return vol_dir + "/" + n + ".json"; }
  // WriteMeta's temp file (the same naming for every temp file, so Load sweeps them all).
  std::string TmpPath(const std::string& n) const { return AtomicTempPath(vol_dir, n + ".json"); }
  std::string DataTmpPath(const std::string& n) const {
    return AtomicTempPath(vol_dir, n + ".img");
  }
  std::string SnapDataPath(const std::string& n) const { return snap_dir + "/" + n + ".img"; }
  std::string SnapMetaPath(const std::string& n) const { return snap_dir + "/" + n + ".json"; }
  std::string SnapTmpPath(const std::string& n) const {
    return AtomicTempPath(snap_dir, n + ".json");
  }
  std::string SnapDataTmpPath(const std::string& n) const {
    return AtomicTempPath(snap_dir, n + ".img");
  }

  // ---- capacity.cpp ----
  // The pool's room as its file system has it now, read once (statvfs) before the pool lock is
  // taken, then checked under it.
  struct Space {
    uint64_t capacity = 0;  // --capacity, or the file system's size
    uint64_t free = 0;      // free on the file system (f_bavail)
    uint64_t reserve = 0;   // PoolOptions::free_reserve_ratio of the file system's size
  };
  StatusOr<Space> ReadSpace() const;
  uint64_t ProvisionedLocked() const;
  Status CheckCapacityLocked(const std::string& name, uint64_t extra, const Space& space) const;

  // ---- commit.cpp: the on-disk steps and their rollbacks ----
  Status WriteMeta(const VolumeMeta& m, const char* fault_tmp, const char* fault_renamed,
                   bool* renamed);
  Status WriteMeta(const SnapshotMeta& m, const char* fault_tmp, const char* fault_renamed,
                   bool* renamed);
  void CommitCopyState(const char* kind, const std::string& name, VolumeMeta& m);
  void CommitCopyState(const char* kind, const std::string& name, SnapshotMeta& m);
  Status CommitMetaOrRestore(const VolumeMeta& m, const VolumeMeta& old_meta,
                             const char* fault_tmp, const char* fault_renamed);
  Status RemoveDataAfterMeta(const char* kind, const std::string& dir, const std::string& name,
                             const std::string& data, const char* fault);
  Status RemoveAbandoned(const std::string& dir, const std::string& name, const std::string& label);
  void UndoFiles(const std::string& dir, const std::vector<std::string>& paths);
  static Status BrokenTaken(const char* kind, const std::map<std::string, std::string>& broken,
                            const std::string& name);
  static Status NotFound(const char* kind, const std::map<std::string, std::string>& broken,
                         const std::string& name);

  // ---- load.cpp ----
  struct LoadKind;
  template <typename M, typename Parse, typename Accept>
  Status LoadDir(const LoadKind& k, Parse parse, Accept accept);
  void MarkBroken(const LoadKind& k, const std::string& name, const std::string& why);
  void NoteOrphan(const std::string& file, const char* why, const std::string& sub);
  Status Load();
  Status LoadSnapshots();
  std::string ShortData(const Volume& v, const VolumeMeta& meta) const;
  Status Reconcile(Volume& v, uint64_t size);
  Status RecoverCopies();
  Status RestartRestore(const std::string& name, const SnapshotMeta& snap);
  bool ProbeReflink();

  // ---- watch.cpp ----
  void StartWatch();
  void StopWatch();
  void WatchOnce();
  void FenceLost(const std::string& name, const std::shared_ptr<Volume>& vol);
  std::string LostReason(const std::string& name) const;

  // ---- copy.cpp ----
  void ReapJobs();
  std::string ProgressLocked(const CopyRec& r) const;
  const CopyRec* CopyFromLocked(const std::string& source) const;
  void StartCopyLocked(const std::shared_ptr<CopyRec>& rec, int src_fd, bool own_src, int dst_fd,
                       bool own_dst, uint64_t length, WriteGate* gate);
  Status StartCopyAtInstant(const std::shared_ptr<CopyRec>& rec, const std::string& what,
                            int src_fd, bool own_src, int dst_fd, bool own_dst, uint64_t length,
                            double* pause_ms);
  void CopyDone(const std::string& target, uint64_t id, const Status& st);
  void ReleaseSpace(int fd, uint64_t size);
  void CommitSnapCopy(const std::string& name, const CopyRec& rec, const Status& st);
  void CommitVolumeCopy(const std::string& name, const CopyRec& rec, const Status& st);

  // ---- volumes.cpp ----
  // What Create decided under the guard: an existing volume to return as is, or the size and
  // source of a new one (capacity reserved).
  struct CreatePlan {
    std::optional<VolumeInfo> existing;
    uint64_t size = 0;
    FillSource src;  // unused for a blank volume
  };
  StatusOr<CreatePlan> PlanCreateLocked(const CreateSpec& spec, const Space& space,
                                        NameGuard& guard);
  std::optional<uint64_t> SourceSizeLocked(const VolumeSource& src) const;
  StatusOr<VolumeInfo> CreateBlank(const CreateSpec& spec);
  StatusOr<std::shared_ptr<Volume>> OpenVolume(const VolumeMeta& m, int buffered_fd = -1);
  StatusOr<VolumeInfo> InsertVolume(std::shared_ptr<Volume> vol, const VolumeMeta& m);
  VolumeInfo MakeInfo(const Entry& e) const;
  Status RollBackVolume(const std::string& what, const std::string& name, int fd,
                        const Status& s);
  Status StopCopiesOf(const char* kind, const std::string& name);
  Status CheckNotFillingLocked(const std::string& name, const char* what) const;
  // A change of volume `name`'s metadata alone (QoS, schedule), in volumes.cpp: refused while a
  // background copy fills the volume (the copy commits "ready" with the metadata it started
  // with; `what` ends that message). `change(meta)` edits a copy and says whether anything
  // changed; only then is the new metadata committed durably (fault points `fault_tmp`,
  // `fault_renamed`; a failure is "`label` of volume NAME: cause") and `apply(entry, meta)` runs
  // under mu. The volume's info either way.
  template <typename Change, typename Apply>
  StatusOr<VolumeInfo> ChangeVolumeMeta(const std::string& name, const char* what,
                                        const char* label, const char* fault_tmp,
                                        const char* fault_renamed, Change&& change, Apply&& apply);
  Status GrowData(Volume& vol, uint64_t old_size, uint64_t new_size);
  void ShrinkBack(Volume& vol, uint64_t old_size);

  // ---- fill.cpp ----
  // Resolves spec.source under the guard: the size the new volume gets (into *size) and where
  // its data comes from. Caller holds mu.
  StatusOr<FillSource> ResolveSourceLocked(const CreateSpec& spec, uint64_t* size) const;
  StatusOr<VolumeInfo> FillNewVolume(const CreateSpec& spec, uint64_t size, FillSource src);
  Status FillByReflink(int fd, const std::string& tmp, const std::string& data,
                       const FillSource& src, uint64_t size, double* pause_ms);
  Status StartFillCopy(const std::shared_ptr<Volume>& v, const VolumeMeta& m,
                       const FillSource& src, bool own_src, double* pause_ms);

  // ---- snapshots.cpp ----
  struct SnapshotPlan {
    std::optional<SnapshotInfo> existing;  // an idempotent retry: return it as is
    std::shared_ptr<Volume> vol;           // otherwise the source and its size
    uint64_t size = 0;
  };
  StatusOr<SnapshotPlan> PlanSnapshotLocked(const std::string& name,
                                            const std::string& volume) const;
  StatusOr<const Entry*> LiveSourceLocked(const std::string& volume) const;
  SnapshotInfo MakeSnapInfo(const SnapshotMeta& m) const;
  Status RollBackSnapshot(const std::string& name, const std::string& volume, int fd,
                          const Status& s);
  StatusOr<SnapshotInfo> SnapshotByReflink(const std::string& name, const std::string& volume,
                                           const std::shared_ptr<Volume>& vol, uint64_t size);
  StatusOr<SnapshotInfo> SnapshotByCopy(const std::string& name, const std::string& volume,
                                        const std::shared_ptr<Volume>& vol, uint64_t size);
  Status CheckCopySpace(const std::string& volume, const Volume& vol) const;
};

}  // namespace nbdcsi::datapath
