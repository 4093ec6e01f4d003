#include "datapath/pool/pool.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/fault.h"

namespace nbdcsi::datapath {

namespace {

constexpr int kMetaVersion = 1;

// What NAME.json holds. The QoS limits are stored as the user gave them (per-GiB keys
// unresolved) so that a resize re-resolves them.
struct Meta {
  std::string name;
  uint64_t size = 0;
  int64_t created_unix_ns = 0;
  bool read_only = false;
  QosLimits qos;
};

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

Status FsyncDir(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Sys(errno, "open directory " + dir + " for fsync");
  int rc = fsync(fd);
  int err = errno;
  close(fd);
  if (rc != 0) return Sys(err, "fsync directory " + dir);
  return Status::Ok();
}

std::string Parent(const std::string& path) {
  auto pos = path.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

// mkdir -p that makes each directory it creates durable by fsyncing its parent.
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

StatusOr<std::string> ReadSmallFile(const std::string& path) {
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
    if (out.size() > (1u << 20)) {
      close(fd);
      return Error(EFBIG, "{} is larger than 1 MiB: not volume metadata", path);
    }
  }
  close(fd);
  return out;
}

nlohmann::json QosToJson(const QosLimits& q) {
  return {{"max_iops", q.max_iops},         {"max_read_iops", q.max_read_iops},
          {"max_write_iops", q.max_write_iops}, {"max_bps", q.max_bps},
          {"max_read_bps", q.max_read_bps}, {"max_write_bps", q.max_write_bps},
          {"iops_per_gib", q.iops_per_gib}, {"bps_per_gib", q.bps_per_gib},
          {"burst_ms", q.burst_ms}};
}

std::string MetaToText(const Meta& m) {
  nlohmann::json j = {{"version", kMetaVersion},
                      {"name", m.name},
                      {"size", m.size},
                      {"created_unix_ns", m.created_unix_ns},
                      {"read_only", m.read_only},
                      {"qos", QosToJson(m.qos)}};
  return j.dump(2) + "\n";
}

Status ValidateSize(uint64_t size) {
  if (size == 0) return Error(EINVAL, "volume size must be greater than 0");
  if (size % kVolumeSizeAlignment != 0) {
    return Error(EINVAL, "volume size {} is not a multiple of {} bytes", size,
                 kVolumeSizeAlignment);
  }
  if (size > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
    return Error(EFBIG, "volume size {} exceeds the largest file size", size);
  }
  return Status::Ok();
}

Status ValidateQos(const QosLimits& q) {
  if (q.burst_ms > kMaxBurstMs) {
    return Error(EINVAL, "QoS burst_ms {} is too large, the limit is {} ms", q.burst_ms,
                 kMaxBurstMs);
  }
  return Status::Ok();
}

StatusOr<Meta> ParseMeta(const std::string& text, const std::string& expected_name) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Error(EINVAL, "metadata is not valid JSON");
  if (!j.is_object()) return Error(EINVAL, "metadata is not a JSON object");
  auto field = [&](const char* key) -> const nlohmann::json* {
    auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  };
  const auto* version = field("version");
  if (!version || !version->is_number_integer())
    return Error(EINVAL, "metadata has no integer \"version\"");
  if (version->get<int64_t>() != kMetaVersion) {
    return Error(EINVAL, "metadata version {} is not supported (this build reads version {})",
                 version->dump(), kMetaVersion);
  }
  Meta m;
  const auto* name = field("name");
  if (!name || !name->is_string()) return Error(EINVAL, "metadata has no string \"name\"");
  m.name = name->get<std::string>();
  if (m.name != expected_name) {
    return Error(EINVAL, "metadata names volume \"{}\" but the file is for \"{}\"", m.name,
                 expected_name);
  }
  const auto* size = field("size");
  if (!size || !size->is_number_unsigned()) return Error(EINVAL, "metadata has no unsigned \"size\"");
  m.size = size->get<uint64_t>();
  if (Status s = ValidateSize(m.size); !s.ok()) return Error(EINVAL, "metadata: {}", s.message());
  if (const auto* c = field("created_unix_ns"); c && c->is_number_integer())
    m.created_unix_ns = c->get<int64_t>();
  if (const auto* ro = field("read_only")) {
    if (!ro->is_boolean()) return Error(EINVAL, "metadata \"read_only\" is not a boolean");
    m.read_only = ro->get<bool>();
  }
  if (const auto* q = field("qos")) {
    if (!q->is_object()) return Error(EINVAL, "metadata \"qos\" is not an object");
    auto u64 = [&](const char* key, uint64_t& out) -> Status {
      auto it = q->find(key);
      if (it == q->end()) return Status::Ok();
      if (!it->is_number_unsigned()) return Error(EINVAL, "metadata qos.{} is not an unsigned number", key);
      out = it->get<uint64_t>();
      return Status::Ok();
    };
    uint64_t burst = 0;
    for (Status s : {u64("max_iops", m.qos.max_iops), u64("max_read_iops", m.qos.max_read_iops),
                     u64("max_write_iops", m.qos.max_write_iops), u64("max_bps", m.qos.max_bps),
                     u64("max_read_bps", m.qos.max_read_bps),
                     u64("max_write_bps", m.qos.max_write_bps),
                     u64("iops_per_gib", m.qos.iops_per_gib),
                     u64("bps_per_gib", m.qos.bps_per_gib), u64("burst_ms", burst)}) {
      if (!s.ok()) return s;
    }
    if (burst > kMaxBurstMs) return Error(EINVAL, "metadata qos.burst_ms {} is too large", burst);
    m.qos.burst_ms = static_cast<uint32_t>(burst);
  }
  return m;
}

std::string FsTypeName(int64_t type) {
  switch (static_cast<uint64_t>(type) & 0xffffffffu) {
    case 0x58465342: return "xfs";
    case 0xEF53: return "ext4";  // ext2/3/4 share the magic; ext4 is what anyone runs now
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x794c7630: return "overlayfs";
    case 0x2fc12fc1: return "zfs";
    case 0xF2F52010: return "f2fs";
    case 0x6969: return "nfs";
    default: return fmt::format("unknown(0x{:x})", static_cast<uint64_t>(type));
  }
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Status ValidateVolumeName(const std::string& name) {
  if (name.empty()) return Error(EINVAL, "volume name must not be empty");
  if (name.size() > kMaxVolumeNameLen) {
    return Error(EINVAL, "volume name is {} bytes, the limit is {}", name.size(), kMaxVolumeNameLen);
  }
  if (name.find('\0') != std::string::npos) return Error(EINVAL, "volume name contains NUL");
  if (name.find('/') != std::string::npos) return Error(EINVAL, "volume name must not contain '/'");
  if (name[0] == '.') return Error(EINVAL, "volume name \"{}\" must not start with '.'", name);
  if (name[0] == '-') return Error(EINVAL, "volume name \"{}\" must not start with '-'", name);
  for (unsigned char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) {
      if (c >= 0x21 && c < 0x7f) {
        return Error(EINVAL, "volume name \"{}\" contains invalid character '{}' (allowed: A-Z a-z 0-9 . _ -)",
                     name, static_cast<char>(c));
      }
      return Error(EINVAL, "volume name contains invalid byte 0x{:02x} (allowed: A-Z a-z 0-9 . _ -)", c);
    }
  }
  return Status::Ok();
}

Volume::~Volume() {
  if (direct_fd_ >= 0 && direct_fd_ != buffered_fd_) close(direct_fd_);
  if (buffered_fd_ >= 0) close(buffered_fd_);
}

struct Pool::Impl {
  struct Entry {
    std::shared_ptr<Volume> vol;
    Meta meta;
  };

  PoolOptions opts;
  std::string vol_dir;
  int lock_fd = -1;
  std::vector<std::string> cleaned_orphans;

  // Guards everything below. Held only for map lookups and bookkeeping, never across disk I/O:
  // a name being worked on is marked busy instead, so slow fsyncs on one volume do not stall
  // Acquire (every NBD connect) or operations on other volumes.
  std::mutex mu;
  std::condition_variable idle;
  std::map<std::string, Entry> vols;
  std::map<std::string, std::string> broken;  // name -> why it could not be loaded
  std::set<std::string> busy;
  uint64_t reserved = 0;  // capacity promised to creates/resizes in flight

  ~Impl() {
    if (lock_fd >= 0) close(lock_fd);
  }

  std::string DataPath(const std::string& n) const { return vol_dir + "/" + n + ".img"; }
  std::string MetaPath(const std::string& n) const { return vol_dir + "/" + n + ".json"; }
  std::string TmpPath(const std::string& n) const { return vol_dir + "/." + n + ".json.tmp"; }

  // Serialises operations on one name (the second caller waits its turn) without holding `mu`
  // during the operation.
  class NameGuard {
   public:
    NameGuard(Impl& impl, const std::string& name) : impl_(impl), name_(name) {
      std::unique_lock lock(impl_.mu);
      impl_.idle.wait(lock, [&] { return !impl_.busy.count(name_); });
      impl_.busy.insert(name_);
    }
    ~NameGuard() {
      std::lock_guard lock(impl_.mu);
      impl_.busy.erase(name_);
      impl_.reserved -= reserved_;
      impl_.idle.notify_all();
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
    std::string name_;
    uint64_t reserved_ = 0;
  };

  StatusOr<uint64_t> Capacity() const {
    if (opts.capacity_bytes) return opts.capacity_bytes;
    struct statvfs vfs{};
    if (statvfs(opts.dir.c_str(), &vfs) != 0) return Sys(errno, "statvfs " + opts.dir);
    return static_cast<uint64_t>(vfs.f_blocks) * vfs.f_frsize;
  }

  uint64_t ProvisionedLocked() const {
    uint64_t sum = reserved;
    for (const auto& [n, e] : vols) sum += e.meta.size;
    return sum;
  }

  Status CheckCapacityLocked(const std::string& name, uint64_t extra, uint64_t capacity) const {
    uint64_t provisioned = ProvisionedLocked();
    long double limit = static_cast<long double>(capacity) * opts.overcommit_ratio;
    if (static_cast<long double>(provisioned) + extra > limit) {
      return Error(ENOSPC,
                   "pool {} cannot provision {} more for volume {}: {} already provisioned, the "
                   "limit is capacity {} x overcommit {} = {}",
                   opts.dir, Bytes(extra), name, Bytes(provisioned), Bytes(capacity),
                   opts.overcommit_ratio, Bytes(static_cast<uint64_t>(limit)));
    }
    return Status::Ok();
  }

  // The one way metadata reaches disk: temp file, fsync, rename over NAME.json, fsync dir.
  // `renamed` tells a failing caller whether NAME.json may already hold the new content.
  // Empty fault names are for restores, which have no crash step of their own.
  Status WriteMeta(const Meta& m, const char* fault_tmp, const char* fault_renamed, bool* renamed) {
    *renamed = false;
    const std::string tmp = TmpPath(m.name), final_path = MetaPath(m.name);
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return Sys(errno, "create " + tmp);
    Status s = WriteAll(fd, MetaToText(m), tmp);
    if (s.ok() && fsync(fd) != 0) s = Sys(errno, "fsync " + tmp);
    if (close(fd) != 0 && s.ok()) s = Sys(errno, "close " + tmp);
    if (!s.ok()) {
      unlink(tmp.c_str());
      return s;
    }
    if (*fault_tmp) FaultPoint(fault_tmp);
    if (rename(tmp.c_str(), final_path.c_str()) != 0) {
      s = Sys(errno, "rename " + tmp + " to " + final_path);
      unlink(tmp.c_str());
      return s;
    }
    *renamed = true;
    if (*fault_renamed) FaultPoint(fault_renamed);
    return FsyncDir(vol_dir);
  }

  // Opens the data file of a committed volume. ENOENT is returned as is so Load can tell a
  // missing data file from other failures.
  StatusOr<std::shared_ptr<Volume>> OpenVolume(const Meta& m, int buffered_fd = -1) {
    const std::string path = DataPath(m.name);
    if (buffered_fd < 0) {
      buffered_fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
      if (buffered_fd < 0) return Sys(errno, "open " + path);
    }
    auto v = std::make_shared<Volume>();
    v->buffered_fd_ = buffered_fd;
    int dfd = open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    if (dfd < 0) {
      if (errno != EINVAL) {
        Status s = Sys(errno, "open " + path + " with O_DIRECT");
        return s;  // v's destructor closes buffered_fd
      }
      // tmpfs and some FUSE file systems refuse O_DIRECT; the engine then does buffered I/O.
      spdlog::warn("volume {}: {} does not support O_DIRECT; using buffered I/O", m.name, path);
      dfd = buffered_fd;
    }
    v->direct_fd_ = dfd;
    v->name_ = m.name;
    v->size_.store(m.size, std::memory_order_release);
    v->read_only_ = m.read_only;
    v->throttle_.SetLimits(m.qos, m.size, MonotonicNowNs());
    return v;
  }

  VolumeInfo MakeInfo(const Entry& e) const {
    VolumeInfo info;
    info.name = e.meta.name;
    info.size = e.meta.size;
    info.created_unix_ns = e.meta.created_unix_ns;
    info.read_only = e.meta.read_only;
    info.qos = e.meta.qos;
    info.path = DataPath(e.meta.name);
    struct stat st{};
    if (fstat(e.vol->buffered_fd(), &st) == 0) info.allocated = static_cast<uint64_t>(st.st_blocks) * 512;
    return info;
  }

  void NoteOrphan(const std::string& file, const char* why) {
    std::string path = vol_dir + "/" + file;
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      spdlog::error("pool {}: cannot remove {} ({}): {}", opts.dir, path, why, std::strerror(errno));
      return;
    }
    spdlog::warn("pool {}: removed {} ({}), left by an interrupted operation", opts.dir, path, why);
    cleaned_orphans.push_back("volumes/" + file);
  }

  Status Load() {
    DIR* d = opendir(vol_dir.c_str());
    if (!d) return Sys(errno, "open directory " + vol_dir);
    std::set<std::string> json, img, tmp;
    errno = 0;
    while (dirent* ent = readdir(d)) {
      std::string f = ent->d_name;
      if (f == "." || f == "..") continue;
      if (ent->d_type != DT_REG && ent->d_type != DT_UNKNOWN) continue;  // e.g. future subdirs
      if (EndsWith(f, ".tmp")) tmp.insert(f);
      else if (EndsWith(f, ".json")) json.insert(f.substr(0, f.size() - 5));
      else if (EndsWith(f, ".img")) img.insert(f.substr(0, f.size() - 4));
      else spdlog::warn("pool {}: ignoring unexpected file {}/{}", opts.dir, vol_dir, f);
    }
    int err = errno;
    closedir(d);
    if (err) return Sys(err, "read directory " + vol_dir);

    bool removed = false;
    for (const auto& f : tmp) {
      NoteOrphan(f, "metadata temp file");
      removed = true;
    }
    for (const auto& name : json) {
      std::string meta_path = MetaPath(name);
      if (Status s = ValidateVolumeName(name); !s.ok()) {
        MarkBroken(name, meta_path + ": " + s.message());
        continue;
      }
      auto text = ReadSmallFile(meta_path);
      if (!text.ok()) {
        if (text.status().code() == EACCES || text.status().code() == EISDIR ||
            text.status().code() == EFBIG) {
          MarkBroken(name, text.status().message());
          continue;
        }
        return text.status();
      }
      auto meta = ParseMeta(*text, name);
      if (!meta.ok()) {
        MarkBroken(name, meta_path + ": " + meta.status().message());
        continue;
      }
      if (!img.count(name)) {
        MarkBroken(name, "data file " + DataPath(name) + " is missing");
        continue;
      }
      auto vol = OpenVolume(*meta);
      if (!vol.ok()) {
        if (vol.status().code() == ENOENT || vol.status().code() == EACCES) {
          MarkBroken(name, vol.status().message());
          continue;
        }
        return vol.status();
      }
      if (Status s = Reconcile(**vol, meta->size); !s.ok()) return s;
      vols.emplace(name, Entry{std::move(*vol), std::move(*meta)});
    }
    for (const auto& name : img) {
      if (!json.count(name)) {
        NoteOrphan(name + ".img", "data file without metadata");
        removed = true;
      }
    }
    if (removed) {
      if (Status s = FsyncDir(vol_dir); !s.ok()) return s;
    }
    return Status::Ok();
  }

  void MarkBroken(const std::string& name, const std::string& why) {
    spdlog::error("pool {}: volume {} is broken and was not loaded: {}; its files are kept, "
                  "delete the volume to remove them",
                  opts.dir, name, why);
    broken[name] = why;
  }

  // A data file longer than its metadata is a resize that never committed: roll it back.
  Status Reconcile(Volume& v, uint64_t size) {
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

  // Best-effort undo of a create that failed after the data file was made.
  void UndoCreate(const std::string& name) {
    unlink(MetaPath(name).c_str());
    unlink(TmpPath(name).c_str());
    if (unlink(DataPath(name).c_str()) != 0 && errno != ENOENT) {
      spdlog::error("pool {}: rollback of volume {} could not remove {}: {} (it will be removed "
                    "as an orphan on the next start)",
                    opts.dir, name, DataPath(name), std::strerror(errno));
    }
    if (Status s = FsyncDir(vol_dir); !s.ok()) spdlog::error("pool {}: rollback: {}", opts.dir, s.message());
  }
};

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
  if (Status s = MkdirP(impl->vol_dir); !s.ok()) return s;

  const std::string lock_path = dir + "/.pool.lock";
  bool created = access(lock_path.c_str(), F_OK) != 0;
  impl->lock_fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (impl->lock_fd < 0) return Sys(errno, "open lock file " + lock_path);
  if (flock(impl->lock_fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return Error(EBUSY, "pool {} is in use by another nbd-datapathd (lock {} held)", dir, lock_path);
    }
    return Sys(errno, "flock " + lock_path);
  }
  if (created) {
    if (Status s = FsyncDir(dir); !s.ok()) return s;
  }
  if (Status s = impl->Load(); !s.ok()) return s;
  spdlog::info("pool {}: opened with {} volumes ({} orphans removed, {} broken)", dir,
               impl->vols.size(), impl->cleaned_orphans.size(), impl->broken.size());
  std::unique_ptr<Pool> pool(new Pool());
  pool->impl_ = std::move(impl);
  return pool;
}

Pool::~Pool() = default;

StatusOr<VolumeInfo> Pool::Create(const std::string& name, uint64_t size, const QosLimits& qos,
                                  bool read_only) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  if (Status s = ValidateSize(size); !s.ok()) return s;
  if (Status s = ValidateQos(qos); !s.ok()) return s;
  Impl& I = *impl_;
  Impl::NameGuard guard(I, name);
  auto capacity_or = I.Capacity();
  if (!capacity_or.ok()) return capacity_or.status();
  uint64_t capacity = *capacity_or;
  {
    std::lock_guard lock(I.mu);
    if (auto b = I.broken.find(name); b != I.broken.end()) {
      return Error(EEXIST, "volume {} exists on disk but is broken ({}); delete it first", name,
                   b->second);
    }
    if (auto it = I.vols.find(name); it != I.vols.end()) {
      const Meta& m = it->second.meta;
      if (m.size != size) {
        return Error(EEXIST, "volume {} already exists with size {} (requested {})", name, m.size, size);
      }
      if (m.read_only != read_only) {
        return Error(EEXIST, "volume {} already exists with read_only={} (requested {})", name,
                     m.read_only, read_only);
      }
      if (!(m.qos == qos)) {
        return Error(EEXIST, "volume {} already exists with different QoS limits", name);
      }
      return I.MakeInfo(it->second);
    }
    if (Status s = I.CheckCapacityLocked(name, size, capacity); !s.ok()) return s;
    guard.ReserveLocked(size);
  }

  const std::string data = I.DataPath(name);
  int fd = open(data.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) {
      // Only possible if something outside the daemon wrote into the pool directory.
      return Error(EEXIST, "cannot create volume {}: {} already exists but is not a volume", name, data);
    }
    return Sys(errno, "create volume " + name + ": " + data);
  }
  auto fail = [&](Status s) -> Status {
    spdlog::error("pool {}: create volume {} failed, rolling back: {}", I.opts.dir, name, s.message());
    if (fd >= 0) close(fd);
    I.UndoCreate(name);
    return s;
  };
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) return fail(Sys(errno, "size " + data));
  if (fsync(fd) != 0) return fail(Sys(errno, "fsync " + data));
  if (Status s = FsyncDir(I.vol_dir); !s.ok()) return fail(s);
  FaultPoint("create.data");

  Meta m;
  m.name = name;
  m.size = size;
  m.created_unix_ns = RealtimeNs();
  m.read_only = read_only;
  m.qos = qos;
  // Open the descriptors before the commit, so nothing that can fail comes after it.
  auto vol = I.OpenVolume(m, fd);
  fd = -1;  // owned by the volume (or closed by its destructor) from here
  if (!vol.ok()) return fail(vol.status());
  bool renamed = false;
  if (Status s = I.WriteMeta(m, "create.meta_tmp", "create.meta_renamed", &renamed); !s.ok()) {
    vol->reset();
    return fail(s);
  }
  std::lock_guard lock(I.mu);
  auto [it, inserted] = I.vols.emplace(name, Impl::Entry{std::move(*vol), m});
  spdlog::info("pool {}: created volume {} of {}", I.opts.dir, name, Bytes(size));
  return I.MakeInfo(it->second);
}

Status Pool::Delete(const std::string& name) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  Impl& I = *impl_;
  Impl::NameGuard guard(I, name);
  Impl::Entry entry;
  bool was_broken = false;
  {
    std::lock_guard lock(I.mu);
    auto it = I.vols.find(name);
    if (it == I.vols.end()) {
      if (!I.broken.count(name)) return Error(ENOENT, "volume {} not found", name);
      was_broken = true;
    } else {
      uint64_t conns = it->second.vol->stats().connections();
      if (conns > 0) return Error(EBUSY, "volume {} has {} open NBD connections", name, conns);
      // Out of the map in the same critical section as the check, so no new connection can
      // Acquire it from here on.
      entry = std::move(it->second);
      I.vols.erase(it);
    }
  }
  const std::string meta = I.MetaPath(name);
  if (unlink(meta.c_str()) != 0 && errno != ENOENT) {
    Status s = Sys(errno, "delete volume " + name + ": unlink " + meta);
    std::lock_guard lock(I.mu);
    if (!was_broken) I.vols.emplace(name, std::move(entry));
    return s;
  }
  {
    std::lock_guard lock(I.mu);
    I.broken.erase(name);
  }
  // From here the volume is gone; the data file is an orphan if we stop now.
  Status result = FsyncDir(I.vol_dir);
  FaultPoint("delete.meta");
  const std::string data = I.DataPath(name);
  if (unlink(data.c_str()) != 0 && errno != ENOENT && result.ok()) {
    result = Sys(errno, "delete volume " + name + ": unlink " + data +
                            " (it will be removed as an orphan on the next start)");
  }
  if (Status s = FsyncDir(I.vol_dir); !s.ok() && result.ok()) result = s;
  if (result.ok()) spdlog::info("pool {}: deleted volume {}", I.opts.dir, name);
  return result;
}

StatusOr<VolumeInfo> Pool::Resize(const std::string& name, uint64_t new_size) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  if (Status s = ValidateSize(new_size); !s.ok()) return s;
  Impl& I = *impl_;
  Impl::NameGuard guard(I, name);
  auto capacity_or = I.Capacity();
  if (!capacity_or.ok()) return capacity_or.status();
  uint64_t capacity = *capacity_or;
  Meta old_meta;
  std::shared_ptr<Volume> vol;
  {
    std::lock_guard lock(I.mu);
    auto it = I.vols.find(name);
    if (it == I.vols.end()) return Error(ENOENT, "volume {} not found", name);
    old_meta = it->second.meta;
    vol = it->second.vol;
    if (new_size < old_meta.size) {
      return Error(EINVAL, "shrinking volume {} from {} to {} is not supported", name,
                   old_meta.size, new_size);
    }
    if (new_size == old_meta.size) return I.MakeInfo(it->second);
    if (Status s = I.CheckCapacityLocked(name, new_size - old_meta.size, capacity); !s.ok()) return s;
    guard.ReserveLocked(new_size - old_meta.size);
  }
  const std::string data = I.DataPath(name);
  int fd = vol->buffered_fd();
  auto undo_data = [&] {
    if (ftruncate(fd, static_cast<off_t>(old_meta.size)) != 0 || fsync(fd) != 0) {
      spdlog::error("pool {}: resize of {} failed and the data file could not be truncated back "
                    "({}); the next start truncates it to the committed size",
                    I.opts.dir, name, std::strerror(errno));
    }
  };
  if (ftruncate(fd, static_cast<off_t>(new_size)) != 0) {
    Status s = Sys(errno, "resize volume " + name + ": grow " + data);
    undo_data();
    return s;
  }
  if (fsync(fd) != 0) {
    Status s = Sys(errno, "resize volume " + name + ": fsync " + data);
    undo_data();
    return s;
  }
  FaultPoint("resize.data");
  Meta m = old_meta;
  m.size = new_size;
  bool renamed = false;
  if (Status s = I.WriteMeta(m, "resize.meta_tmp", "resize.meta_renamed", &renamed); !s.ok()) {
    if (renamed) {
      bool again = false;
      if (Status r = I.WriteMeta(old_meta, "", "", &again); !r.ok())
        spdlog::error("pool {}: cannot restore metadata of {}: {}", I.opts.dir, name, r.message());
    }
    undo_data();
    return Error(s.code(), "resize volume {}: {}", name, s.message());
  }
  std::lock_guard lock(I.mu);
  auto it = I.vols.find(name);  // still there: the name guard excludes Delete
  it->second.meta = m;
  vol->size_.store(new_size, std::memory_order_release);
  vol->throttle_.SetLimits(m.qos, new_size, MonotonicNowNs());
  spdlog::info("pool {}: resized volume {} from {} to {}", I.opts.dir, name, old_meta.size, new_size);
  return I.MakeInfo(it->second);
}

Status Pool::SetQos(const std::string& name, const QosLimits& qos) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  if (Status s = ValidateQos(qos); !s.ok()) return s;
  Impl& I = *impl_;
  Impl::NameGuard guard(I, name);
  Meta old_meta;
  {
    std::lock_guard lock(I.mu);
    auto it = I.vols.find(name);
    if (it == I.vols.end()) return Error(ENOENT, "volume {} not found", name);
    old_meta = it->second.meta;
  }
  if (old_meta.qos == qos) return Status::Ok();
  Meta m = old_meta;
  m.qos = qos;
  bool renamed = false;
  if (Status s = I.WriteMeta(m, "qos.meta_tmp", "qos.meta_renamed", &renamed); !s.ok()) {
    if (renamed) {
      bool again = false;
      if (Status r = I.WriteMeta(old_meta, "", "", &again); !r.ok())
        spdlog::error("pool {}: cannot restore metadata of {}: {}", I.opts.dir, name, r.message());
    }
    return Error(s.code(), "set QoS of volume {}: {}", name, s.message());
  }
  std::lock_guard lock(I.mu);
  auto it = I.vols.find(name);
  it->second.meta = m;
  it->second.vol->throttle_.SetLimits(qos, m.size, MonotonicNowNs());
  return Status::Ok();
}

StatusOr<VolumeInfo> Pool::Inspect(const std::string& name) {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->vols.find(name);
  if (it == impl_->vols.end()) {
    if (auto b = impl_->broken.find(name); b != impl_->broken.end())
      return Error(EIO, "volume {} is broken: {}", name, b->second);
    return Error(ENOENT, "volume {} not found", name);
  }
  return impl_->MakeInfo(it->second);
}

std::vector<VolumeInfo> Pool::List() {
  std::lock_guard lock(impl_->mu);
  std::vector<VolumeInfo> out;
  out.reserve(impl_->vols.size());
  for (const auto& [n, e] : impl_->vols) out.push_back(impl_->MakeInfo(e));
  return out;
}

PoolInfo Pool::Info() {
  Impl& I = *impl_;
  PoolInfo info;
  info.dir = I.opts.dir;
  info.overcommit_ratio = I.opts.overcommit_ratio;
  struct statvfs vfs{};
  if (statvfs(I.opts.dir.c_str(), &vfs) == 0) {
    info.free = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    info.capacity = static_cast<uint64_t>(vfs.f_blocks) * vfs.f_frsize;
  }
  if (I.opts.capacity_bytes) info.capacity = I.opts.capacity_bytes;
  struct statfs sfs{};
  if (statfs(I.opts.dir.c_str(), &sfs) == 0) info.fs_type = FsTypeName(static_cast<int64_t>(sfs.f_type));
  std::lock_guard lock(I.mu);
  for (const auto& [n, e] : I.vols) {
    VolumeInfo v = I.MakeInfo(e);
    info.provisioned += v.size;
    info.allocated += v.allocated;
  }
  info.volumes = I.vols.size();
  info.cleaned_orphans = I.cleaned_orphans;
  for (const auto& [n, why] : I.broken) info.broken_volumes.push_back(n + ": " + why);
  return info;
}

std::shared_ptr<Volume> Pool::Acquire(const std::string& name) {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->vols.find(name);
  return it == impl_->vols.end() ? nullptr : it->second.vol;
}

std::vector<std::string> Pool::Names() {
  std::lock_guard lock(impl_->mu);
  std::vector<std::string> out;
  out.reserve(impl_->vols.size());
  for (const auto& [n, e] : impl_->vols) out.push_back(n);
  return out;
}

}  // namespace nbdcsi::datapath
