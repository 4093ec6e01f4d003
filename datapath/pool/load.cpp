// Opening a pool: the directory lock, loading volumes and snapshots from their metadata, removing
// what a crash left behind (temp files, data files without metadata), marking what cannot be
// loaded as broken (kept on disk), and recovering background copies a stop interrupted.
#include <dirent.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <set>

#include <spdlog/spdlog.h>

#include "datapath/pool/pool_impl.h"

namespace nbdcsi::datapath {

namespace {

// Metadata files are a few hundred bytes; anything this large is not what the pool wrote.
StatusOr<std::string> ReadMetaFile(const std::string& path) {
  constexpr size_t kMaxMeta = size_t{1} << 20;
  auto text = ReadSmallFile(path, kMaxMeta);
  if (!text.ok() && text.status().code() == EFBIG)
    return Error(EFBIG, "{} is larger than 1 MiB: not volume metadata", path);
  return text;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The files of one object directory, sorted by what they are.
struct DirScan {
  std::set<std::string> json, img, tmp;  // NAME of NAME.json / NAME.img; whole name of temps
};

StatusOr<DirScan> ScanDir(const std::string& pool_dir, const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (!d) return Sys(errno, "open directory " + dir);
  DirScan scan;
  errno = 0;
  while (dirent* ent = readdir(d)) {
    std::string f = ent->d_name;
    if (f == "." || f == "..") continue;
    if (ent->d_type != DT_REG && ent->d_type != DT_UNKNOWN) continue;  // e.g. future subdirs
    if (EndsWith(f, ".tmp")) scan.tmp.insert(f);
    else if (EndsWith(f, ".json")) scan.json.insert(f.substr(0, f.size() - 5));
    else if (EndsWith(f, ".img")) scan.img.insert(f.substr(0, f.size() - 4));
    else spdlog::warn("pool {}: ignoring unexpected file {}/{}", pool_dir, dir, f);
  }
  const int err = errno;
  closedir(d);
  if (err) return Sys(err, "read directory " + dir);
  return scan;
}

}  // namespace

// What differs between loading volumes and loading snapshots; the rest is LoadDir.
struct Pool::Impl::LoadKind {
  const char* kind;  // "volume" | "snapshot": name rules and messages
  const std::string& dir;
  const char* sub;      // "volumes" | "snapshots": orphan labels
  const char* tmp_why;  // how a temp file is described when it is removed
  const char* img_why;  // how a data file without metadata is described
  std::map<std::string, std::string>& broken;
  Status (*validate_name)(const std::string&);
};

void Pool::Impl::NoteOrphan(const std::string& file, const char* why, const std::string& sub) {
  std::string path = opts.dir + "/" + sub + "/" + file;
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    spdlog::error("pool {}: cannot remove {} ({}): {}", opts.dir, path, why, std::strerror(errno));
    return;
  }
  spdlog::warn("pool {}: removed {} ({}), left by an interrupted operation", opts.dir, path, why);
  cleaned_orphans.push_back(sub + "/" + file);
}

void Pool::Impl::MarkBroken(const LoadKind& k, const std::string& name, const std::string& why) {
  spdlog::error("pool {}: {} {} is broken and was not loaded: {}; its files are kept, "
                "delete the {} to remove them",
                opts.dir, k.kind, name, why, k.kind);
  k.broken[name] = why;
}

// Scans one object directory: temp files and data files without metadata are orphans and
// removed; every NAME.json is name-checked, read and parsed, and a failure there marks NAME
// broken. What happens to a parsed object is up to `accept(name, meta, has_data)`, which
// returns an error only for failures that must stop the open.
template <typename M, typename Parse, typename Accept>
Status Pool::Impl::LoadDir(const LoadKind& k, Parse parse, Accept accept) {
  auto scan = ScanDir(opts.dir, k.dir);
  if (!scan.ok()) return scan.status();
  for (const auto& f : scan->tmp) NoteOrphan(f, k.tmp_why, k.sub);
  for (const auto& name : scan->json) {
    const std::string meta_path = k.dir + "/" + name + ".json";
    if (Status s = k.validate_name(name); !s.ok()) {
      MarkBroken(k, name, meta_path + ": " + s.message());
      continue;
    }
    auto text = ReadMetaFile(meta_path);
    if (!text.ok()) {
      const int err = text.status().code();
      if (err != EACCES && err != EISDIR && err != EFBIG) return text.status();
      MarkBroken(k, name, text.status().message());
      continue;
    }
    StatusOr<M> meta = parse(*text, name);
    if (!meta.ok()) {
      MarkBroken(k, name, meta_path + ": " + meta.status().message());
      continue;
    }
    if (Status s = accept(name, std::move(*meta), scan->img.count(name) > 0); !s.ok()) return s;
  }
  bool removed = !scan->tmp.empty();
  for (const auto& name : scan->img) {
    if (scan->json.count(name)) continue;
    NoteOrphan(name + ".img", k.img_why, k.sub);
    removed = true;
  }
  if (removed) return FsyncDir(k.dir);
  return Status::Ok();
}

Status Pool::Impl::Load() {
  const LoadKind k{"volume", vol_dir, "volumes", "metadata temp file",
                   "data file without metadata", broken, ValidateVolumeName};
  return LoadDir<VolumeMeta>(k, ParseVolumeMetadata, [&](const std::string& name, VolumeMeta meta,
                                                         bool has_data) {
    if (!has_data) {
      MarkBroken(k, name, "data file " + DataPath(name) + " is missing");
      return Status::Ok();
    }
    auto vol = OpenVolume(meta);
    if (!vol.ok()) {
      if (vol.status().code() != ENOENT && vol.status().code() != EACCES) return vol.status();
      MarkBroken(k, name, vol.status().message());
      return Status::Ok();
    }
    if (auto why = ShortData(**vol, meta); !why.empty()) {
      MarkBroken(k, name, why);  // its descriptors close with `vol`; nothing is changed
      return Status::Ok();
    }
    if (Status s = Reconcile(**vol, meta.size); !s.ok()) {
      // A size this file system cannot hold (corrupt metadata, or a pool copied from a file
      // system with larger files: ext4 stops at 16 TiB) fences this volume, not the pool. Found
      // by test/fuzz pool_load on ext4.
      if (s.code() != EFBIG && s.code() != EINVAL) return s;
      MarkBroken(k, name, s.message());
      return Status::Ok();
    }
    vols.emplace(name, Entry{std::move(*vol), std::move(meta)});
    return Status::Ok();
  });
}

Status Pool::Impl::LoadSnapshots() {
  const LoadKind k{"snapshot", snap_dir, "snapshots", "snapshot temp file",
                   "snapshot data file without metadata", broken_snaps, ValidateSnapshotName};
  return LoadDir<SnapshotMeta>(k, ParseSnapshotMetadata, [&](const std::string& name,
                                                             SnapshotMeta meta, bool has_data) {
    if (meta.state == "copying") {
      // The copy-before-write that made it point-in-time died with the process; the
      // source has moved on, so what was copied so far is not any instant of it.
      return RemoveAbandoned(snap_dir, name, "snapshot/" + name);
    }
    if (!has_data) {
      MarkBroken(k, name, "data file " + SnapDataPath(name) + " is missing");
      return Status::Ok();
    }
    snaps.emplace(name, std::move(meta));
    return Status::Ok();
  });
}

// A data file shorter than its metadata's size: no pool operation leaves one (create and resize
// size the data file durably before they commit the metadata), so its end was cut off outside
// the pool and the data there is lost. Extending it would hand out zeroes as if they were the
// volume's data. A volume still being filled is the exception: its copy starts over (restore) or
// it is removed (clone), so its content does not matter yet. Returns why it is broken, or "".
std::string Pool::Impl::ShortData(const Volume& v, const VolumeMeta& meta) const {
  if (meta.state == "copying") return "";
  struct stat st{};
  if (fstat(v.buffered_fd(), &st) != 0)
    return "fstat " + DataPath(v.name()) + ": " + std::strerror(errno);
  if (static_cast<uint64_t>(st.st_size) >= meta.size) return "";
  return fmt::format("data file {} is {} bytes, shorter than the {} bytes its metadata records: "
                     "its end was cut off outside the pool (the file is left as it is)",
                     DataPath(v.name()), st.st_size, meta.size);
}

// A data file longer than its metadata is a resize that never committed: roll it back.
Status Pool::Impl::Reconcile(Volume& v, uint64_t size) {
  struct stat st{};
  if (fstat(v.buffered_fd(), &st) != 0) return Sys(errno, "fstat " + DataPath(v.name()));
  if (static_cast<uint64_t>(st.st_size) == size) return Status::Ok();
  spdlog::warn("pool {}: volume {} data file is {} bytes but its metadata says {}; truncating "
               "to the committed size (an interrupted resize)",
               opts.dir, v.name(), st.st_size, size);
  if (ftruncate(v.buffered_fd(), static_cast<off_t>(size)) != 0)
    return Sys(errno, "truncate " + DataPath(v.name()));
  if (fsync(v.buffered_fd()) != 0) return Sys(errno, "fsync " + DataPath(v.name()));
  return Status::Ok();
}

// Volumes still "copying" after a restart: a restore restarts from scratch (its snapshot is
// immutable, so the result is still exactly the snapshot); a clone of a live volume cannot be
// finished and is removed.
Status Pool::Impl::RecoverCopies() {
  std::vector<std::string> names;
  for (const auto& [n, e] : vols)
    if (e.meta.state == "copying") names.push_back(n);
  for (const auto& n : names) {
    const std::string& source = vols.at(n).meta.source;
    const std::string snap = source.rfind("snapshot/", 0) == 0 ? source.substr(9) : "";
    auto sit = snaps.find(snap);
    if (snap.empty() || sit == snaps.end() || sit->second.state != "ready") {
      vols.erase(n);
      if (Status s = RemoveAbandoned(vol_dir, n, "volume/" + n); !s.ok()) return s;
      continue;
    }
    if (Status s = RestartRestore(n, sit->second); !s.ok()) return s;
  }
  return Status::Ok();
}

Status Pool::Impl::RestartRestore(const std::string& name, const SnapshotMeta& snap) {
  const Entry& e = vols.at(name);
  const int fd = e.vol->buffered_fd();
  // Truncating to 0 first drops what the first attempt copied: holes in the snapshot must
  // read as zeros, and the copy skips them.
  if (ftruncate(fd, 0) != 0 || ftruncate(fd, static_cast<off_t>(e.meta.size)) != 0 ||
      fsync(fd) != 0) {
    return Sys(errno, "reset " + DataPath(name) + " to restart its copy");
  }
  int src = open(SnapDataPath(snap.name).c_str(), O_RDONLY | O_CLOEXEC);
  if (src < 0) return Sys(errno, "open " + SnapDataPath(snap.name));
  spdlog::warn("pool {}: volume {} was being restored from snapshot {} when the daemon "
               "stopped; restarting the copy from the beginning", opts.dir, name, snap.name);
  auto rec = std::make_shared<CopyRec>();
  rec->target = VolKey(name);
  rec->source = SnapKey(snap.name);
  std::lock_guard lock(mu);
  StartCopyLocked(rec, src, /*own_src=*/true, fd, /*own_dst=*/false, snap.size, nullptr);
  return Status::Ok();
}

bool Pool::Impl::ProbeReflink() {
  if (opts.disable_reflink) return false;
  const std::string a = snap_dir + "/.reflink-probe-src.tmp";
  const std::string b = snap_dir + "/.reflink-probe-dst.tmp";
  int fa = open(a.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int fb = fa < 0 ? -1 : open(b.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  bool ok = false;
  int err = errno;
  // A real block, not an empty file: some file systems accept FICLONE of nothing.
  if (fb >= 0 && WriteAll(fa, std::string(4096, 'r'), a).ok()) {
    ok = ioctl(fb, FICLONE, fa) == 0;
    err = errno;
  }
  if (fa >= 0) close(fa);
  if (fb >= 0) close(fb);
  unlink(a.c_str());
  unlink(b.c_str());
  if (!ok) {
    spdlog::info("pool {}: no reflink support ({}): snapshots and clones use background copies",
                 opts.dir, std::strerror(err));
  }
  return ok;
}

namespace {

// Takes DIR/.pool.lock for the daemon's lifetime: one daemon per pool.
Status LockPoolDir(const std::string& dir, int* lock_fd) {
  const std::string lock_path = dir + "/.pool.lock";
  const bool created = access(lock_path.c_str(), F_OK) != 0;
  *lock_fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (*lock_fd < 0) return Sys(errno, "open lock file " + lock_path);
  if (flock(*lock_fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return Error(EBUSY, "pool {} is in use by another nbd-datapathd (lock {} held)", dir,
                   lock_path);
    }
    return Sys(errno, "flock " + lock_path);
  }
  if (created) return FsyncDir(dir);
  return Status::Ok();
}

}  // namespace

StatusOr<std::unique_ptr<Pool>> Pool::Open(const PoolOptions& opts) {
  if (opts.dir.empty()) return Error(EINVAL, "pool directory must not be empty");
  if (!(opts.overcommit_ratio > 0) || !std::isfinite(opts.overcommit_ratio)) {
    return Error(EINVAL, "overcommit ratio {} must be a positive number", opts.overcommit_ratio);
  }
  auto impl = std::make_unique<Impl>();
  impl->opts = opts;
  while (impl->opts.dir.size() > 1 && impl->opts.dir.back() == '/') impl->opts.dir.pop_back();
  const std::string& dir = impl->opts.dir;
  impl->vol_dir = dir + "/volumes";
  impl->snap_dir = dir + "/snapshots";
  if (Status s = MkdirP(impl->vol_dir); !s.ok()) return s;
  if (Status s = MkdirP(impl->snap_dir); !s.ok()) return s;
  if (Status s = LockPoolDir(dir, &impl->lock_fd); !s.ok()) return s;
  if (Status s = impl->Load(); !s.ok()) return s;
  if (Status s = impl->LoadSnapshots(); !s.ok()) return s;
  // After the orphan sweep, so its temp files are never mistaken for a crash's leftovers.
  impl->reflink = impl->ProbeReflink();
  if (Status s = impl->RecoverCopies(); !s.ok()) return s;
  impl->StartWatch();
  spdlog::info("pool {}: opened with {} volumes and {} snapshots ({} orphans removed, {} broken, "
               "{} interrupted copies abandoned, reflink {})",
               dir, impl->vols.size(), impl->snaps.size(), impl->cleaned_orphans.size(),
               impl->broken.size() + impl->broken_snaps.size(), impl->abandoned.size(),
               impl->reflink ? "yes" : "no");
  std::unique_ptr<Pool> pool(new Pool());
  pool->impl_ = std::move(impl);
  return pool;
}

Pool::~Pool() = default;

}  // namespace nbdcsi::datapath
