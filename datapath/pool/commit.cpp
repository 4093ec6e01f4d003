// Durable metadata commits and the rollbacks of failed multi-step operations (ordering rules in
// pool.h), plus the small helpers every file of the pool uses.
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <cstring>

#include <spdlog/spdlog.h>

#include "common/fault.h"
#include "datapath/pool/pool_impl.h"

namespace nbdcsi::datapath {

Status Sys(int err, const std::string& what) {
  return Status(err, fmt::format("{}: {}", what, std::strerror(err)));
}

std::string Bytes(uint64_t n) {
  constexpr double kGiB = 1024.0 * 1024 * 1024;
  return fmt::format("{} bytes ({:.2f} GiB)", n, static_cast<double>(n) / kGiB);
}

int64_t RealtimeNs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

std::string NotReadyReason(const std::string& state, const std::string& error) {
  if (state == "failed") return "its background copy failed: " + error;
  return "its background copy is still running";
}

Status SizeDurably(int fd, uint64_t size, const std::string& path, const std::string& dir) {
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) return Sys(errno, "size " + path);
  if (fsync(fd) != 0) return Sys(errno, "fsync " + path);
  return FsyncDir(dir);
}

// The one way metadata reaches disk: temp file, fsync, rename over NAME.json, fsync dir.
// `renamed` tells a failing caller whether NAME.json may already hold the new content.
// Empty fault names are for steps that have no crash test of their own.
Status Pool::Impl::WriteMeta(const VolumeMeta& m, const char* fault_tmp, const char* fault_renamed,
                             bool* renamed) {
  return WriteFileAtomic(vol_dir, m.name + ".json", ToJson(m), fault_tmp, fault_renamed, renamed);
}

Status Pool::Impl::WriteMeta(const SnapshotMeta& m, const char* fault_tmp,
                             const char* fault_renamed, bool* renamed) {
  return WriteFileAtomic(snap_dir, m.name + ".json", ToJson(m), fault_tmp, fault_renamed, renamed);
}

namespace {

// Commits the end state of a background copy. If that write fails before its rename, disk
// still says "copying" (the next open abandons or restarts it); until then it reads as
// failed, with the reason.
template <typename Impl, typename M>
void CommitCopyStateOf(Impl& impl, const char* kind, const std::string& name, M& m) {
  bool renamed = false;
  if (Status s = impl.WriteMeta(m, "", "", &renamed); !s.ok() && !renamed) {
    spdlog::error("pool {}: {} {}: cannot commit state {}: {}", impl.opts.dir, kind, name,
                  m.state, s.message());
    m.state = "failed";
    m.error = "commit failed: " + s.message();
  }
}

}  // namespace

void Pool::Impl::CommitCopyState(const char* kind, const std::string& name, VolumeMeta& m) {
  CommitCopyStateOf(*this, kind, name, m);
}

void Pool::Impl::CommitCopyState(const char* kind, const std::string& name, SnapshotMeta& m) {
  CommitCopyStateOf(*this, kind, name, m);
}

// Commits new volume metadata; if it failed after the rename (only the directory fsync is
// missing), puts the old metadata back so the caller's rollback leaves what it started with.
Status Pool::Impl::CommitMetaOrRestore(const VolumeMeta& m, const VolumeMeta& old_meta,
                                       const char* fault_tmp, const char* fault_renamed) {
  bool renamed = false;
  Status s = WriteMeta(m, fault_tmp, fault_renamed, &renamed);
  if (!s.ok() && renamed) {
    bool again = false;
    if (Status r = WriteMeta(old_meta, "", "", &again); !r.ok())
      spdlog::error("pool {}: cannot restore metadata of {}: {}", opts.dir, m.name, r.message());
  }
  return s;
}

// Second half of deleting a volume or snapshot whose metadata (the commit point) is already
// unlinked: make that durable, then remove the data file. Stopping in between leaves an
// orphan that the next open removes.
Status Pool::Impl::RemoveDataAfterMeta(const char* kind, const std::string& dir,
                                       const std::string& name, const std::string& data,
                                       const char* fault) {
  Status result = FsyncDir(dir);
  FaultPoint(fault);
  if (unlink(data.c_str()) != 0 && errno != ENOENT && result.ok()) {
    const int err = errno;
    result = Sys(err, fmt::format("delete {} {}: unlink {} (it will be removed as an orphan on "
                                  "the next start)", kind, name, data));
  }
  if (Status s = FsyncDir(dir); !s.ok() && result.ok()) result = s;
  if (result.ok()) spdlog::info("pool {}: deleted {} {}", opts.dir, kind, name);
  return result;
}

// Removes a copy target whose point in time was lost: metadata first (the commit point),
// then the data.
Status Pool::Impl::RemoveAbandoned(const std::string& dir, const std::string& name,
                                   const std::string& label) {
  const std::string meta = dir + "/" + name + ".json", data = dir + "/" + name + ".img";
  if (unlink(meta.c_str()) != 0 && errno != ENOENT) return Sys(errno, "unlink " + meta);
  if (Status s = FsyncDir(dir); !s.ok()) return s;
  if (unlink(data.c_str()) != 0 && errno != ENOENT) return Sys(errno, "unlink " + data);
  if (Status s = FsyncDir(dir); !s.ok()) return s;
  spdlog::warn("pool {}: removed {}: its background copy was interrupted, so its point in time "
               "is lost; take it again", opts.dir, label);
  abandoned.push_back(label);
  return Status::Ok();
}

// Best-effort removal of the files a failed create, snapshot, restore or clone made (ENOENT is
// fine: the list covers every step). Whatever stays is an orphan for the next open.
void Pool::Impl::UndoFiles(const std::string& dir, const std::vector<std::string>& paths) {
  for (const auto& p : paths) {
    if (unlink(p.c_str()) != 0 && errno != ENOENT) {
      spdlog::error("pool {}: rollback could not remove {}: {} (removed as an orphan on the "
                    "next start)", opts.dir, p, std::strerror(errno));
    }
  }
  if (Status s = FsyncDir(dir); !s.ok()) {
    spdlog::error("pool {}: rollback: {}", opts.dir, s.message());
  }
}

// Lookup failures for a volume or snapshot name: a name whose metadata could not be loaded
// is taken (EEXIST for a create, EIO for a use), otherwise it is ENOENT.
Status Pool::Impl::BrokenTaken(const char* kind, const std::map<std::string, std::string>& broken,
                               const std::string& name) {
  if (auto b = broken.find(name); b != broken.end()) {
    return Error(EEXIST, "{} {} exists on disk but is broken ({}); delete it first", kind, name,
                 b->second);
  }
  return Status::Ok();
}

Status Pool::Impl::NotFound(const char* kind, const std::map<std::string, std::string>& broken,
                            const std::string& name) {
  if (auto b = broken.find(name); b != broken.end())
    return Error(EIO, "{} {} is broken: {}", kind, name, b->second);
  return Error(ENOENT, "{} {} not found", kind, name);
}

}  // namespace nbdcsi::datapath
