#include "datapath/pool/pool.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/fault.h"
#include "common/fs_util.h"
#include "datapath/pool/copy_job.h"

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
  std::string source;  // "", "snapshot/NAME" or "volume/NAME"
  std::string state = "ready";  // "ready" | "copying" | "failed"
  std::string error;   // why a background fill failed
};

// What snapshots/NAME.json holds.
struct SnapMeta {
  std::string name;
  std::string source_volume;
  uint64_t size = 0;
  int64_t created_unix_ns = 0;
  std::string method;  // "reflink" | "copy"
  std::string state;   // "ready" | "copying" | "failed"
  std::string error;
};

bool ValidState(const std::string& s) { return s == "ready" || s == "copying" || s == "failed"; }

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

// Metadata files are a few hundred bytes; anything this large is not what the pool wrote.
StatusOr<std::string> ReadMetaFile(const std::string& path) {
  constexpr size_t kMaxMeta = size_t{1} << 20;
  auto text = ReadSmallFile(path, kMaxMeta);
  if (!text.ok() && text.status().code() == EFBIG)
    return Error(EFBIG, "{} is larger than 1 MiB: not volume metadata", path);
  return text;
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
                      {"qos", QosToJson(m.qos)},
                      {"source", m.source},
                      {"state", m.state}};
  if (!m.error.empty()) j["error"] = m.error;
  return j.dump(2) + "\n";
}

std::string SnapMetaToText(const SnapMeta& m) {
  nlohmann::json j = {{"version", kMetaVersion},
                      {"name", m.name},
                      {"source_volume", m.source_volume},
                      {"size", m.size},
                      {"created_unix_ns", m.created_unix_ns},
                      {"method", m.method},
                      {"state", m.state}};
  if (!m.error.empty()) j["error"] = m.error;
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

// The checks every metadata file starts with (volumes and snapshots share kMetaVersion): a JSON
// object of a version this build reads.
StatusOr<nlohmann::json> ParseVersionedObject(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Error(EINVAL, "metadata is not valid JSON");
  if (!j.is_object()) return Error(EINVAL, "metadata is not a JSON object");
  auto version = j.find("version");
  if (version == j.end() || !version->is_number_integer())
    return Error(EINVAL, "metadata has no integer \"version\"");
  if (version->get<int64_t>() != kMetaVersion) {
    return Error(EINVAL, "metadata version {} is not supported (this build reads version {})",
                 version->dump(), kMetaVersion);
  }
  return j;
}

// "size", which must be a valid volume size (a snapshot's is its source's).
StatusOr<uint64_t> ParseSizeField(const nlohmann::json& j) {
  auto size = j.find("size");
  if (size == j.end() || !size->is_number_unsigned())
    return Error(EINVAL, "metadata has no unsigned \"size\"");
  const uint64_t n = size->get<uint64_t>();
  if (Status s = ValidateSize(n); !s.ok()) return Error(EINVAL, "metadata: {}", s.message());
  return n;
}

StatusOr<Meta> ParseMeta(const std::string& text, const std::string& expected_name) {
  auto parsed = ParseVersionedObject(text);
  if (!parsed.ok()) return parsed.status();
  const nlohmann::json& j = *parsed;
  auto field = [&](const char* key) -> const nlohmann::json* {
    auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  };
  Meta m;
  const auto* name = field("name");
  if (!name || !name->is_string()) return Error(EINVAL, "metadata has no string \"name\"");
  m.name = name->get<std::string>();
  if (m.name != expected_name) {
    return Error(EINVAL, "metadata names volume \"{}\" but the file is for \"{}\"", m.name,
                 expected_name);
  }
  auto size = ParseSizeField(j);
  if (!size.ok()) return size.status();
  m.size = *size;
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
  // Absent in metadata written before snapshots existed: a blank, ready volume.
  if (const auto* src = field("source")) {
    if (!src->is_string()) return Error(EINVAL, "metadata \"source\" is not a string");
    m.source = src->get<std::string>();
  }
  if (const auto* st = field("state")) {
    if (!st->is_string() || !ValidState(st->get<std::string>()))
      return Error(EINVAL, "metadata \"state\" must be \"ready\", \"copying\" or \"failed\"");
    m.state = st->get<std::string>();
  }
  if (const auto* e = field("error"); e && e->is_string()) m.error = e->get<std::string>();
  return m;
}

StatusOr<SnapMeta> ParseSnapMeta(const std::string& text, const std::string& expected_name) {
  auto parsed = ParseVersionedObject(text);
  if (!parsed.ok()) return parsed.status();
  const nlohmann::json& j = *parsed;
  auto str = [&](const char* key, std::string& out) -> Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string()) return Error(EINVAL, "metadata has no string \"{}\"", key);
    out = it->get<std::string>();
    return Status::Ok();
  };
  SnapMeta m;
  for (Status s : {str("name", m.name), str("source_volume", m.source_volume),
                   str("method", m.method), str("state", m.state)}) {
    if (!s.ok()) return s;
  }
  if (m.name != expected_name) {
    return Error(EINVAL, "metadata names snapshot \"{}\" but the file is for \"{}\"", m.name,
                 expected_name);
  }
  if (m.method != "reflink" && m.method != "copy")
    return Error(EINVAL, "metadata \"method\" must be \"reflink\" or \"copy\"");
  if (!ValidState(m.state))
    return Error(EINVAL, "metadata \"state\" must be \"ready\", \"copying\" or \"failed\"");
  auto size = ParseSizeField(j);
  if (!size.ok()) return size.status();
  m.size = *size;
  if (auto c = j.find("created_unix_ns"); c != j.end() && c->is_number_integer())
    m.created_unix_ns = c->get<int64_t>();
  if (auto e = j.find("error"); e != j.end() && e->is_string()) m.error = e->get<std::string>();
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

// Holds a volume's writes paused; always reopens, also on every error path.
class GatePause {
 public:
  explicit GatePause(WriteGate& gate) : gate_(gate) {
    gate_.CloseAndDrain();
    closed_ns_ = RealtimeNs();
    t0_ = std::chrono::steady_clock::now();
  }
  ~GatePause() { Open(); }
  // Reopens (once) and returns how long writes were paused, in milliseconds.
  double Open() {
    if (!open_) {
      gate_.Open();
      open_ = true;
      ms_ = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
    }
    return ms_;
  }
  // The instant the snapshot holds: every write acknowledged before it is in, none after.
  int64_t closed_ns() const { return closed_ns_; }
  GatePause(const GatePause&) = delete;
  GatePause& operator=(const GatePause&) = delete;

 private:
  WriteGate& gate_;
  int64_t closed_ns_ = 0;
  std::chrono::steady_clock::time_point t0_;
  bool open_ = false;
  double ms_ = 0;
};

// FICLONERANGE of [offset, offset + length) of src into the same range of dst.
Status CloneRange(int dst_fd, int src_fd, uint64_t offset, uint64_t length, const std::string& what,
                  const std::string& dst_path) {
  file_clone_range r{};
  r.src_fd = src_fd;
  r.src_offset = offset;
  r.src_length = length;
  r.dest_offset = offset;
  if (ioctl(dst_fd, FICLONERANGE, &r) != 0) {
    return Sys(errno, fmt::format("FICLONERANGE {} [{}, +{}) into {}", what, offset, length, dst_path));
  }
  return Status::Ok();
}

// Reflink of a whole source file into dst_fd at one instant. A live source (gate not null) has
// its writes paused and its data flushed: the workers' O_DIRECT writes are already on the device,
// but buffered (unaligned) ones may still be in the page cache, and a clone shares what the file
// maps. `what` names the source in messages. For a live source, *closed_ns is the instant the copy
// holds and *pause_ms how long writes waited; the gate is open again on return.
Status CloneWhole(int dst_fd, const std::string& dst_path, int src_fd, const std::string& what,
                  WriteGate* gate, int64_t* closed_ns, double* pause_ms) {
  if (!gate) {  // an immutable source: one FICLONE, nobody to pause
    if (ioctl(dst_fd, FICLONE, src_fd) != 0) return Sys(errno, "FICLONE " + what + " into " + dst_path);
    return Status::Ok();
  }
  // A live source. FICLONE costs time per extent, and XFS keeps the source's writers out while it
  // runs: one FICLONE of a fragmented volume (10k+ extents) stalls its I/O for most of a second.
  // So the clone is taken while writes flow and fixed up under a short pause:
  //  1. a DirtyTracker is installed on the gate (the pause of one drain);
  //  2. the file is cloned in 16 MiB segments (FICLONERANGE), each keeping writers out only for its
  //     own extents; every write admitted meanwhile marks its chunks in the tracker;
  //  3. fdatasync outside the pause, so the one inside has little left to flush;
  //  4. pause: drain, fdatasync, clone again only the chunks written since step 1, reopen.
  // A chunk nobody wrote since step 1 still holds, at step 4's instant, what step 2 cloned; a
  // written chunk is cloned again inside the pause. The result is the source at step 4's instant.
  constexpr uint64_t kSegment = uint64_t{16} << 20;
  constexpr uint64_t kChunk = uint64_t{1} << 20;
  struct stat st_src {};
  if (fstat(src_fd, &st_src) != 0) return Sys(errno, "stat " + what);
  const uint64_t size = static_cast<uint64_t>(st_src.st_size);
  if (ftruncate(dst_fd, static_cast<off_t>(size)) != 0) return Sys(errno, "size " + dst_path);
  auto tracker = std::make_shared<DirtyTracker>(kChunk);
  {
    GatePause install(*gate);
    gate->SetTracker(tracker);
  }
  struct Untrack {
    WriteGate* g;
    ~Untrack() { g->ClearTracker(); }
  } untrack{gate};
  for (uint64_t off = 0; off < size; off += kSegment) {
    if (Status s = CloneRange(dst_fd, src_fd, off, std::min(kSegment, size - off), what, dst_path);
        !s.ok()) {
      return s;
    }
  }
  if (fdatasync(src_fd) != 0) return Sys(errno, "fdatasync " + what);
  GatePause pause(*gate);
  if (closed_ns) *closed_ns = pause.closed_ns();
  Status st = Status::Ok();
  if (fdatasync(src_fd) != 0) st = Sys(errno, "fdatasync " + what);
  for (const auto& [off, len] : tracker->Ranges(size)) {
    if (!st.ok()) break;
    st = CloneRange(dst_fd, src_fd, off, len, what, dst_path);
  }
  *pause_ms = pause.Open();
  return st;
}

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Sizes a newly created data file (the new space is a hole) and makes it and its directory
// entry durable.
Status SizeDurably(int fd, uint64_t size, const std::string& path, const std::string& dir) {
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) return Sys(errno, "size " + path);
  if (fsync(fd) != 0) return Sys(errno, "fsync " + path);
  return FsyncDir(dir);
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

namespace {
Status ValidateName(const char* kind, const std::string& name) {
  if (name.empty()) return Error(EINVAL, "{} name must not be empty", kind);
  if (name.size() > kMaxVolumeNameLen) {
    return Error(EINVAL, "{} name is {} bytes, the limit is {}", kind, name.size(), kMaxVolumeNameLen);
  }
  if (name.find('\0') != std::string::npos) return Error(EINVAL, "{} name contains NUL", kind);
  if (name.find('/') != std::string::npos) return Error(EINVAL, "{} name must not contain '/'", kind);
  if (name[0] == '.') return Error(EINVAL, "{} name \"{}\" must not start with '.'", kind, name);
  if (name[0] == '-') return Error(EINVAL, "{} name \"{}\" must not start with '-'", kind, name);
  for (unsigned char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) {
      if (c >= 0x21 && c < 0x7f) {
        return Error(EINVAL, "{} name \"{}\" contains invalid character '{}' (allowed: A-Z a-z 0-9 . _ -)",
                     kind, name, static_cast<char>(c));
      }
      return Error(EINVAL, "{} name contains invalid byte 0x{:02x} (allowed: A-Z a-z 0-9 . _ -)", kind, c);
    }
  }
  return Status::Ok();
}
}  // namespace

Status ValidateVolumeName(const std::string& name) { return ValidateName("volume", name); }
Status ValidateSnapshotName(const std::string& name) { return ValidateName("snapshot", name); }

Volume::~Volume() {
  if (direct_fd_ >= 0 && direct_fd_ != buffered_fd_) close(direct_fd_);
  if (buffered_fd_ >= 0) close(buffered_fd_);
}

struct Pool::Impl {
  struct Entry {
    std::shared_ptr<Volume> vol;
    Meta meta;
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

  PoolOptions opts;
  std::string vol_dir;
  std::string snap_dir;
  int lock_fd = -1;
  bool reflink = false;
  std::vector<std::string> cleaned_orphans;
  std::vector<std::string> abandoned;

  // Guards everything below. Held only for map lookups and bookkeeping, never across disk I/O:
  // a name being worked on is marked busy instead, so slow fsyncs on one volume do not stall
  // Acquire (every NBD connect) or operations on other volumes.
  std::mutex mu;
  std::condition_variable idle;
  std::map<std::string, Entry> vols;
  std::map<std::string, std::string> broken;  // name -> why it could not be loaded
  std::set<std::string> busy;
  uint64_t reserved = 0;  // capacity promised to creates/resizes in flight
  std::map<std::string, SnapMeta> snaps;
  std::map<std::string, std::string> broken_snaps;
  std::map<std::string, std::shared_ptr<CopyRec>> copies;  // by target
  // Jobs whose on_done has run. Dropped from another thread than the job's own, so that a
  // job is never destroyed (and joined) from inside its own callback.
  std::vector<std::shared_ptr<CopyJob>> finished_jobs;
  uint64_t next_copy_id = 1;

  ~Impl() {
    // A cancelled copy leaves its metadata at "copying"; the next open deals with it exactly as
    // with a crash (abandon a snapshot/clone, restart a restore). Waiting for a copy of a
    // whole volume to finish would hold up a daemon restart for minutes.
    std::vector<std::shared_ptr<CopyJob>> jobs;
    {
      std::lock_guard lock(mu);
      for (auto& [t, rec] : copies)
        if (rec->job) jobs.push_back(rec->job);
    }
    for (auto& j : jobs) j->Cancel();
    for (auto& j : jobs) j->Wait();
    jobs.clear();
    ReapJobs();
    if (lock_fd >= 0) close(lock_fd);
  }

  void ReapJobs() {
    std::vector<std::shared_ptr<CopyJob>> done;
    {
      std::lock_guard lock(mu);
      done.swap(finished_jobs);
    }
  }

  std::string DataPath(const std::string& n) const { return vol_dir + "/" + n + ".img"; }
  std::string MetaPath(const std::string& n) const { return vol_dir + "/" + n + ".json"; }
  // WriteMeta's temp file (the same naming for every temp file, so Load sweeps them all).
  std::string TmpPath(const std::string& n) const { return AtomicTempPath(vol_dir, n + ".json"); }
  std::string DataTmpPath(const std::string& n) const { return AtomicTempPath(vol_dir, n + ".img"); }
  std::string SnapDataPath(const std::string& n) const { return snap_dir + "/" + n + ".img"; }
  std::string SnapMetaPath(const std::string& n) const { return snap_dir + "/" + n + ".json"; }
  std::string SnapTmpPath(const std::string& n) const { return AtomicTempPath(snap_dir, n + ".json"); }
  std::string SnapDataTmpPath(const std::string& n) const { return AtomicTempPath(snap_dir, n + ".img"); }

  // Serialises operations on names (the second caller waits its turn) without holding `mu`
  // during the operation. Volumes are keyed by their name, snapshots by "snapshot/NAME" ('/'
  // is not a valid name character, so the two cannot collide). Several names are taken all at
  // once, never one after the other, so two operations naming the same pair in opposite roles
  // (snapshot S of V, restore V from S) cannot deadlock.
  class NameGuard {
   public:
    NameGuard(Impl& impl, const std::string& name) : NameGuard(impl, std::vector<std::string>{name}) {}
    NameGuard(Impl& impl, std::vector<std::string> names) : impl_(impl), names_(std::move(names)) {
      std::unique_lock lock(impl_.mu);
      impl_.idle.wait(lock, [&] {
        return std::none_of(names_.begin(), names_.end(), [&](const auto& n) { return impl_.busy.count(n) > 0; });
      });
      for (const auto& n : names_) impl_.busy.insert(n);
    }
    ~NameGuard() {
      std::lock_guard lock(impl_.mu);
      for (const auto& n : names_) impl_.busy.erase(n);
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
    std::vector<std::string> names_;
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
    return WriteFileAtomic(vol_dir, m.name + ".json", MetaToText(m), fault_tmp, fault_renamed, renamed);
  }
  Status WriteMeta(const SnapMeta& m, const char* fault_tmp, const char* fault_renamed,
                   bool* renamed) {
    return WriteFileAtomic(snap_dir, m.name + ".json", SnapMetaToText(m), fault_tmp, fault_renamed,
                           renamed);
  }

  // Commits the end state of a background copy. If that write fails before its rename, disk
  // still says "copying" (the next open abandons or restarts it); until then it reads as
  // failed, with the reason.
  template <typename M>
  void CommitCopyState(const char* kind, const std::string& name, M& m) {
    bool renamed = false;
    if (Status s = WriteMeta(m, "", "", &renamed); !s.ok() && !renamed) {
      spdlog::error("pool {}: {} {}: cannot commit state {}: {}", opts.dir, kind, name, m.state,
                    s.message());
      m.state = "failed";
      m.error = "commit failed: " + s.message();
    }
  }

  // Commits new volume metadata; if it failed after the rename (only the directory fsync is
  // missing), puts the old metadata back so the caller's rollback leaves what it started with.
  Status CommitMetaOrRestore(const Meta& m, const Meta& old_meta, const char* fault_tmp,
                             const char* fault_renamed) {
    bool renamed = false;
    Status s = WriteMeta(m, fault_tmp, fault_renamed, &renamed);
    if (!s.ok() && renamed) {
      bool again = false;
      if (Status r = WriteMeta(old_meta, "", "", &again); !r.ok())
        spdlog::error("pool {}: cannot restore metadata of {}: {}", opts.dir, m.name, r.message());
    }
    return s;
  }

  // Lookup failures for a volume or snapshot name: a name whose metadata could not be loaded
  // is taken (EEXIST for a create, EIO for a use), otherwise it is ENOENT.
  static Status BrokenTaken(const char* kind, const std::map<std::string, std::string>& broken,
                            const std::string& name) {
    if (auto b = broken.find(name); b != broken.end()) {
      return Error(EEXIST, "{} {} exists on disk but is broken ({}); delete it first", kind, name,
                   b->second);
    }
    return Status::Ok();
  }
  static Status NotFound(const char* kind, const std::map<std::string, std::string>& broken,
                         const std::string& name) {
    if (auto b = broken.find(name); b != broken.end())
      return Error(EIO, "{} {} is broken: {}", kind, name, b->second);
    return Error(ENOENT, "{} {} not found", kind, name);
  }

  // Second half of deleting a volume or snapshot whose metadata (the commit point) is already
  // unlinked: make that durable, then remove the data file. Stopping in between leaves an
  // orphan that the next open removes.
  Status RemoveDataAfterMeta(const char* kind, const std::string& dir, const std::string& name,
                             const std::string& data, const char* fault) {
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
    info.source = e.meta.source;
    info.ready = e.meta.state == "ready";
    struct stat st{};
    if (fstat(e.vol->buffered_fd(), &st) == 0) info.allocated = static_cast<uint64_t>(st.st_blocks) * 512;
    if (auto c = copies.find("volume/" + e.meta.name); c != copies.end() && c->second->job) {
      info.copy_done = c->second->job->copied_bytes();
      info.copy_total = c->second->job->total_bytes();
    }
    return info;
  }

  // A restore or clone retried onto an existing volume: the same call returns it (CSI
  // idempotency), anything else is EEXIST. `want` is the size the request resolves to.
  StatusOr<VolumeInfo> ExistingFillTargetLocked(const Entry& e, const std::string& label,
                                                uint64_t want, const QosLimits& qos,
                                                bool read_only) const {
    const Meta& m = e.meta;
    if (m.source != label || m.size != want || m.read_only != read_only || !(m.qos == qos)) {
      return Error(EEXIST, "volume {} already exists with other parameters (source \"{}\", size "
                   "{}, read_only={}; requested {}, size {}, read_only={})",
                   m.name, m.source, m.size, m.read_only, label, want, read_only);
    }
    return MakeInfo(e);
  }

  SnapshotInfo MakeSnapInfo(const SnapMeta& m) const {
    SnapshotInfo info;
    info.name = m.name;
    info.source_volume = m.source_volume;
    info.size = m.size;
    info.created_unix_ns = m.created_unix_ns;
    info.method = m.method;
    info.ready = m.state == "ready";
    info.error = m.error;
    info.path = SnapDataPath(m.name);
    struct stat st{};
    if (stat(info.path.c_str(), &st) == 0) info.allocated = static_cast<uint64_t>(st.st_blocks) * 512;
    if (auto c = copies.find("snapshot/" + m.name); c != copies.end()) {
      if (c->second->job) {
        info.copy_done = c->second->job->copied_bytes();
        info.copy_total = c->second->job->total_bytes();
      }
      if (c->second->point_in_time_ns) info.created_unix_ns = c->second->point_in_time_ns;
    }
    if (info.ready) info.copy_done = info.copy_total = 0;
    return info;
  }

  // "NN%" of the copy filling `target`, for messages.
  std::string ProgressLocked(const CopyRec& r) const {
    if (!r.job || r.job->total_bytes() == 0) return "0%";
    return fmt::format("{}%", r.job->copied_bytes() * 100 / r.job->total_bytes());
  }
  const CopyRec* CopyFromLocked(const std::string& source) const {
    for (const auto& [t, r] : copies)
      if (r->source == source) return r.get();
    return nullptr;
  }

  void NoteOrphan(const std::string& file, const char* why, const std::string& sub = "volumes") {
    std::string path = opts.dir + "/" + sub + "/" + file;
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      spdlog::error("pool {}: cannot remove {} ({}): {}", opts.dir, path, why, std::strerror(errno));
      return;
    }
    spdlog::warn("pool {}: removed {} ({}), left by an interrupted operation", opts.dir, path, why);
    cleaned_orphans.push_back(sub + "/" + file);
  }

  // What differs between loading volumes and loading snapshots; the rest is LoadDir.
  struct LoadKind {
    const char* kind;  // "volume" | "snapshot": name rules and messages
    const std::string& dir;
    const char* sub;      // "volumes" | "snapshots": orphan labels
    const char* tmp_why;  // how a temp file is described when it is removed
    const char* img_why;  // how a data file without metadata is described
    std::map<std::string, std::string>& broken;
  };

  // Scans one object directory: temp files and data files without metadata are orphans and
  // removed; every NAME.json is name-checked, read and parsed, and a failure there marks NAME
  // broken. What happens to a parsed object is up to `accept(name, meta, has_data)`, which
  // returns an error only for failures that must stop the open.
  template <typename M, typename Accept>
  Status LoadDir(const LoadKind& k, StatusOr<M> (*parse)(const std::string&, const std::string&),
                 Accept accept) {
    DIR* d = opendir(k.dir.c_str());
    if (!d) return Sys(errno, "open directory " + k.dir);
    std::set<std::string> json, img, tmp;
    errno = 0;
    while (dirent* ent = readdir(d)) {
      std::string f = ent->d_name;
      if (f == "." || f == "..") continue;
      if (ent->d_type != DT_REG && ent->d_type != DT_UNKNOWN) continue;  // e.g. future subdirs
      if (EndsWith(f, ".tmp")) tmp.insert(f);
      else if (EndsWith(f, ".json")) json.insert(f.substr(0, f.size() - 5));
      else if (EndsWith(f, ".img")) img.insert(f.substr(0, f.size() - 4));
      else spdlog::warn("pool {}: ignoring unexpected file {}/{}", opts.dir, k.dir, f);
    }
    int err = errno;
    closedir(d);
    if (err) return Sys(err, "read directory " + k.dir);

    bool removed = false;
    for (const auto& f : tmp) {
      NoteOrphan(f, k.tmp_why, k.sub);
      removed = true;
    }
    for (const auto& name : json) {
      const std::string meta_path = k.dir + "/" + name + ".json";
      if (Status s = ValidateName(k.kind, name); !s.ok()) {
        MarkBroken(k, name, meta_path + ": " + s.message());
        continue;
      }
      auto text = ReadMetaFile(meta_path);
      if (!text.ok()) {
        if (text.status().code() == EACCES || text.status().code() == EISDIR ||
            text.status().code() == EFBIG) {
          MarkBroken(k, name, text.status().message());
          continue;
        }
        return text.status();
      }
      auto meta = parse(*text, name);
      if (!meta.ok()) {
        MarkBroken(k, name, meta_path + ": " + meta.status().message());
        continue;
      }
      if (Status s = accept(name, std::move(*meta), img.count(name) > 0); !s.ok()) return s;
    }
    for (const auto& name : img) {
      if (!json.count(name)) {
        NoteOrphan(name + ".img", k.img_why, k.sub);
        removed = true;
      }
    }
    if (removed) return FsyncDir(k.dir);
    return Status::Ok();
  }

  void MarkBroken(const LoadKind& k, const std::string& name, const std::string& why) {
    spdlog::error("pool {}: {} {} is broken and was not loaded: {}; its files are kept, "
                  "delete the {} to remove them",
                  opts.dir, k.kind, name, why, k.kind);
    k.broken[name] = why;
  }

  Status Load() {
    const LoadKind k{"volume", vol_dir, "volumes", "metadata temp file", "data file without metadata",
                     broken};
    return LoadDir<Meta>(k, ParseMeta, [&](const std::string& name, Meta meta, bool has_data) {
      if (!has_data) {
        MarkBroken(k, name, "data file " + DataPath(name) + " is missing");
        return Status::Ok();
      }
      auto vol = OpenVolume(meta);
      if (!vol.ok()) {
        if (vol.status().code() == ENOENT || vol.status().code() == EACCES) {
          MarkBroken(k, name, vol.status().message());
          return Status::Ok();
        }
        return vol.status();
      }
      if (Status s = Reconcile(**vol, meta.size); !s.ok()) return s;
      vols.emplace(name, Entry{std::move(*vol), std::move(meta)});
      return Status::Ok();
    });
  }

  Status LoadSnapshots() {
    const LoadKind k{"snapshot", snap_dir, "snapshots", "snapshot temp file",
                     "snapshot data file without metadata", broken_snaps};
    return LoadDir<SnapMeta>(k, ParseSnapMeta, [&](const std::string& name, SnapMeta meta,
                                                   bool has_data) {
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

  // Best-effort removal of files a failed snapshot/restore/clone made (ENOENT is fine: the
  // list covers every step). Whatever stays is an orphan for the next open.
  void UndoFiles(const std::string& dir, const std::vector<std::string>& paths) {
    for (const auto& p : paths) {
      if (unlink(p.c_str()) != 0 && errno != ENOENT) {
        spdlog::error("pool {}: rollback could not remove {}: {} (removed as an orphan on the "
                      "next start)", opts.dir, p, std::strerror(errno));
      }
    }
    if (Status s = FsyncDir(dir); !s.ok()) spdlog::error("pool {}: rollback: {}", opts.dir, s.message());
  }

  // Removes a copy target whose point in time was lost: metadata first (the commit point),
  // then the data.
  Status RemoveAbandoned(const std::string& dir, const std::string& name, const std::string& label) {
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

  // Volumes still "copying" after a restart: a restore restarts from scratch (its snapshot is
  // immutable, so the result is still exactly the snapshot); a clone of a live volume cannot be
  // finished and is removed.
  Status RecoverCopies() {
    std::vector<std::string> names;
    for (const auto& [n, e] : vols)
      if (e.meta.state == "copying") names.push_back(n);
    for (const auto& n : names) {
      auto vit = vols.find(n);
      const Meta m = vit->second.meta;
      std::string snap = m.source.rfind("snapshot/", 0) == 0 ? m.source.substr(9) : "";
      auto sit = snaps.find(snap);
      if (snap.empty() || sit == snaps.end() || sit->second.state != "ready") {
        vols.erase(vit);
        if (Status s = RemoveAbandoned(vol_dir, n, "volume/" + n); !s.ok()) return s;
        continue;
      }
      std::shared_ptr<Volume> vol = vit->second.vol;
      int fd = vol->buffered_fd();
      // Truncating to 0 first drops what the first attempt copied: holes in the snapshot must
      // read as zeros, and the copy skips them.
      if (ftruncate(fd, 0) != 0 || ftruncate(fd, static_cast<off_t>(m.size)) != 0 || fsync(fd) != 0)
        return Sys(errno, "reset " + DataPath(n) + " to restart its copy");
      int src = open(SnapDataPath(snap).c_str(), O_RDONLY | O_CLOEXEC);
      if (src < 0) return Sys(errno, "open " + SnapDataPath(snap));
      spdlog::warn("pool {}: volume {} was being restored from snapshot {} when the daemon "
                   "stopped; restarting the copy from the beginning", opts.dir, n, snap);
      auto rec = std::make_shared<CopyRec>();
      rec->target = "volume/" + n;
      rec->source = "snapshot/" + snap;
      std::lock_guard lock(mu);
      StartCopyLocked(rec, src, /*own_src=*/true, fd, /*own_dst=*/false, sit->second.size, nullptr);
    }
    return Status::Ok();
  }

  bool ProbeReflink() {
    if (opts.disable_reflink) return false;
    const std::string a = snap_dir + "/.reflink-probe-src.tmp", b = snap_dir + "/.reflink-probe-dst.tmp";
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

  // Registers and starts a background copy; a live source's gate must be held closed by the
  // caller. `mu` is held so the record is in place before on_done can look for it.
  void StartCopyLocked(const std::shared_ptr<CopyRec>& rec, int src_fd, bool own_src, int dst_fd,
                       bool own_dst, uint64_t length, WriteGate* gate) {
    rec->id = next_copy_id++;
    rec->src_fd = own_src ? src_fd : -1;
    rec->dst_fd = own_dst ? dst_fd : -1;
    CopyJob::Options o;
    o.src_fd = src_fd;
    o.dst_fd = dst_fd;
    o.length = length;
    o.gate = gate;
    o.on_done = [this, target = rec->target, id = rec->id](const Status& st) {
      CopyDone(target, id, st);
    };
    copies[rec->target] = rec;
    rec->job = CopyJob::Start(std::move(o));
  }

  // Starts a background copy at one instant. A live source (rec->src_vol) has its writes paused
  // and flushed, the copy is installed as its copy-before-write preserver, and writes resume;
  // rec->point_in_time_ns is the instant. `what` names the source in messages. On an error
  // nothing was started and the caller still owns both descriptors.
  Status StartCopyAtInstant(const std::shared_ptr<CopyRec>& rec, const std::string& what,
                            int src_fd, bool own_src, int dst_fd, bool own_dst, uint64_t length,
                            double* pause_ms) {
    WriteGate* gate = rec->src_vol ? &rec->src_vol->gate() : nullptr;
    std::optional<GatePause> pause;
    if (gate) {
      pause.emplace(*gate);
      rec->point_in_time_ns = pause->closed_ns();
      if (fdatasync(src_fd) != 0) return Sys(errno, "fdatasync " + what);
    }
    {
      std::lock_guard lock(mu);
      StartCopyLocked(rec, src_fd, own_src, dst_fd, own_dst, length, gate);
    }
    if (pause) *pause_ms = pause->Open();
    return Status::Ok();
  }

  // on_done of every copy, on the job's thread. The data is fsynced by the job; committing
  // "ready" is the step that makes it usable. A cancelled copy changes nothing on disk: whoever
  // cancelled it (delete, shutdown) decides what happens to it.
  void CopyDone(const std::string& target, uint64_t id, const Status& st) {
    std::shared_ptr<CopyRec> rec;
    {
      std::lock_guard lock(mu);
      auto it = copies.find(target);
      if (it == copies.end() || it->second->id != id) return;
      rec = it->second;
    }
    const bool is_snap = target.rfind("snapshot/", 0) == 0;
    const bool from_snap = rec->source.rfind("snapshot/", 0) == 0;
    const std::string name = target.substr(target.find('/') + 1);
    if (st.code() != ECANCELED) {
      if (st.ok()) FaultPoint(is_snap ? "snapshot.copy_done" : from_snap ? "restore.copy_done" : "clone.copy_done");
      if (is_snap) CommitSnapCopy(name, *rec, st);
      else CommitVolumeCopy(name, *rec, st);
    }
    std::lock_guard lock(mu);
    if (rec->src_fd >= 0) close(rec->src_fd);
    if (rec->dst_fd >= 0) close(rec->dst_fd);
    rec->src_fd = rec->dst_fd = -1;
    copies.erase(target);
    if (rec->job) finished_jobs.push_back(std::move(rec->job));
    rec->src_vol.reset();
  }

  // A failed copy gives its space back but keeps its metadata, so the failure and its reason
  // stay visible until the object is deleted.
  void ReleaseSpace(int fd, uint64_t size) {
    if (ftruncate(fd, 0) != 0 || ftruncate(fd, static_cast<off_t>(size)) != 0 || fsync(fd) != 0)
      spdlog::error("pool {}: cannot release the space of a failed copy: {}", opts.dir, std::strerror(errno));
  }

  void CommitSnapCopy(const std::string& name, const CopyRec& rec, const Status& st) {
    SnapMeta m;
    {
      std::lock_guard lock(mu);
      auto it = snaps.find(name);
      if (it == snaps.end()) return;
      m = it->second;
    }
    m.created_unix_ns = rec.point_in_time_ns;
    if (st.ok()) {
      m.state = "ready";
    } else {
      if (ftruncate(rec.dst_fd, 0) != 0 || fsync(rec.dst_fd) != 0)
        spdlog::error("pool {}: cannot release the space of failed snapshot {}: {}", opts.dir, name, std::strerror(errno));
      m.state = "failed";
      m.error = st.message();
    }
    CommitCopyState("snapshot", name, m);
    if (m.state == "ready") {
      spdlog::info("pool {}: snapshot {} of volume {} is ready (background copy of {})", opts.dir,
                   name, m.source_volume, Bytes(m.size));
    } else {
      spdlog::error("pool {}: snapshot {} of volume {} failed: {}", opts.dir, name, m.source_volume, m.error);
    }
    std::lock_guard lock(mu);
    if (auto it = snaps.find(name); it != snaps.end()) it->second = m;
  }

  void CommitVolumeCopy(const std::string& name, const CopyRec& rec, const Status& st) {
    Meta m;
    std::shared_ptr<Volume> vol;
    {
      std::lock_guard lock(mu);
      auto it = vols.find(name);
      if (it == vols.end()) return;
      m = it->second.meta;
      vol = it->second.vol;
    }
    if (st.ok()) {
      m.state = "ready";
      m.error.clear();
    } else {
      ReleaseSpace(vol->buffered_fd(), m.size);
      m.state = "failed";
      m.error = st.message();
    }
    CommitCopyState("volume", name, m);
    if (m.state == "ready") {
      spdlog::info("pool {}: volume {} is ready (background copy from {})", opts.dir, name, rec.source);
    } else {
      spdlog::error("pool {}: volume {} (copy from {}) failed: {}", opts.dir, name, rec.source, m.error);
    }
    std::lock_guard lock(mu);
    if (auto it = vols.find(name); it != vols.end()) it->second.meta = m;
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
  impl->snap_dir = dir + "/snapshots";
  if (Status s = MkdirP(impl->vol_dir); !s.ok()) return s;
  if (Status s = MkdirP(impl->snap_dir); !s.ok()) return s;

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
  if (Status s = impl->LoadSnapshots(); !s.ok()) return s;
  // After the orphan sweep, so its temp files are never mistaken for a crash's leftovers.
  impl->reflink = impl->ProbeReflink();
  if (Status s = impl->RecoverCopies(); !s.ok()) return s;
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
    if (Status s = Impl::BrokenTaken("volume", I.broken, name); !s.ok()) return s;
    if (auto it = I.vols.find(name); it != I.vols.end()) {
      const Meta& m = it->second.meta;
      if (!m.source.empty()) {
        return Error(EEXIST, "volume {} already exists with content from {} (requested a blank volume)",
                     name, m.source);
      }
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
  if (Status s = SizeDurably(fd, size, data, I.vol_dir); !s.ok()) return fail(s);
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
  I.ReapJobs();
  Impl::NameGuard guard(I, name);
  Impl::Entry entry;
  bool was_broken = false;
  std::shared_ptr<CopyJob> filling;
  {
    std::lock_guard lock(I.mu);
    if (const auto* c = I.CopyFromLocked("volume/" + name)) {
      return Error(EBUSY, "volume {} is the source of a running copy to {} ({}); delete that or "
                   "wait for it", name, c->target, I.ProgressLocked(*c));
    }
    if (auto c = I.copies.find("volume/" + name); c != I.copies.end()) filling = c->second->job;
  }
  if (filling) {
    // A restore or clone still filling it: nothing of value is lost by stopping it.
    filling->Cancel();
    filling->Wait();
  }
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
  return I.RemoveDataAfterMeta("volume", I.vol_dir, name, I.DataPath(name), "delete.meta");
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
    if (auto c = I.copies.find("volume/" + name); c != I.copies.end())
      return Error(EAGAIN, "volume {} is being filled from {} ({}); resize it when that is done",
                   name, c->second->source, I.ProgressLocked(*c->second));
    if (const auto* c = I.CopyFromLocked("volume/" + name))
      return Error(EAGAIN, "a copy from volume {} to {} is running ({}); resize it when that is done",
                   name, c->target, I.ProgressLocked(*c));
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
  if (Status s = I.CommitMetaOrRestore(m, old_meta, "resize.meta_tmp", "resize.meta_renamed");
      !s.ok()) {
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
    // Its metadata is rewritten when the copy ends; two writers would lose one update.
    if (auto c = I.copies.find("volume/" + name); c != I.copies.end())
      return Error(EAGAIN, "volume {} is being filled from {} ({}); change its QoS when that is done",
                   name, c->second->source, I.ProgressLocked(*c->second));
    old_meta = it->second.meta;
  }
  if (old_meta.qos == qos) return Status::Ok();
  Meta m = old_meta;
  m.qos = qos;
  if (Status s = I.CommitMetaOrRestore(m, old_meta, "qos.meta_tmp", "qos.meta_renamed"); !s.ok()) {
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
  if (it == impl_->vols.end()) return Impl::NotFound("volume", impl_->broken, name);
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
  for (const auto& [n, m] : I.snaps) info.allocated += I.MakeSnapInfo(m).allocated;
  info.snapshots = I.snaps.size();
  info.reflink = I.reflink;
  info.abandoned_copies = I.abandoned;
  info.cleaned_orphans = I.cleaned_orphans;
  for (const auto& [n, why] : I.broken) info.broken_volumes.push_back(n + ": " + why);
  for (const auto& [n, why] : I.broken_snaps) info.broken_volumes.push_back("snapshot/" + n + ": " + why);
  return info;
}

namespace {
std::string NotReadyReason(const std::string& state, const std::string& error) {
  if (state == "failed") return "its background copy failed: " + error;
  return "its background copy is still running";
}
}  // namespace

StatusOr<SnapshotInfo> Pool::CreateSnapshot(const std::string& name, const std::string& volume) {
  if (Status s = ValidateName("snapshot", name); !s.ok()) return s;
  if (Status s = ValidateVolumeName(volume); !s.ok()) return s;
  Impl& I = *impl_;
  I.ReapJobs();
  Impl::NameGuard guard(I, std::vector<std::string>{"snapshot/" + name, volume});
  std::shared_ptr<Volume> vol;
  uint64_t size = 0;
  {
    std::lock_guard lock(I.mu);
    if (Status s = Impl::BrokenTaken("snapshot", I.broken_snaps, name); !s.ok()) return s;
    if (auto it = I.snaps.find(name); it != I.snaps.end()) {
      if (it->second.source_volume != volume) {
        return Error(EEXIST, "snapshot {} already exists with source volume {}, not {}", name,
                     it->second.source_volume, volume);
      }
      return I.MakeSnapInfo(it->second);
    }
    auto it = I.vols.find(volume);
    if (it == I.vols.end()) return Impl::NotFound("volume", I.broken, volume);
    if (it->second.meta.state != "ready") {
      return Error(EAGAIN, "volume {} is not ready: {}", volume,
                   NotReadyReason(it->second.meta.state, it->second.meta.error));
    }
    if (const auto* c = I.CopyFromLocked("volume/" + volume))
      return Error(EAGAIN, "a copy from volume {} is running ({})", volume, I.ProgressLocked(*c));
    vol = it->second.vol;
    size = it->second.meta.size;
  }
  const auto t0 = std::chrono::steady_clock::now();
  const std::string data = I.SnapDataPath(name), tmp = I.SnapDataTmpPath(name);

  if (I.reflink) {
    int fd = open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return Sys(errno, "create snapshot " + name + ": " + tmp);
    auto fail = [&](Status s) -> Status {
      spdlog::error("pool {}: snapshot {} of volume {} failed, rolling back: {}", I.opts.dir, name,
                    volume, s.message());
      if (fd >= 0) close(fd);
      I.UndoFiles(I.snap_dir, {I.SnapMetaPath(name), I.SnapTmpPath(name), data, tmp});
      return s;
    };
    int64_t at = 0;
    double pause_ms = 0;
    if (Status st = CloneWhole(fd, tmp, vol->buffered_fd(), "volume " + volume, &vol->gate(), &at,
                               &pause_ms);
        !st.ok())
      return fail(st);
    FaultPoint("snapshot.cloned");
    if (fsync(fd) != 0) return fail(Sys(errno, "fsync " + tmp));
    close(fd);
    fd = -1;
    if (rename(tmp.c_str(), data.c_str()) != 0) return fail(Sys(errno, "rename " + tmp + " to " + data));
    if (Status s = FsyncDir(I.snap_dir); !s.ok()) return fail(s);
    FaultPoint("snapshot.data");
    SnapMeta m{name, volume, size, at, "reflink", "ready", ""};
    bool renamed = false;
    if (Status s = I.WriteMeta(m, "snapshot.meta_tmp", "snapshot.meta_renamed", &renamed); !s.ok())
      return fail(s);
    spdlog::info("pool {}: snapshot {} of volume {} ({}) by reflink: writes paused {:.2f} ms, "
                 "total {:.2f} ms",
                 I.opts.dir, name, volume, Bytes(size), pause_ms, MsSince(t0));
    std::lock_guard lock(I.mu);
    auto [it, inserted] = I.snaps.emplace(name, m);
    return I.MakeSnapInfo(it->second);
  }

  // Copy: the copy may have to hold every allocated byte of the source, and a copy that runs
  // out of space midway only wastes time, so refuse it up front.
  struct stat st{};
  if (fstat(vol->buffered_fd(), &st) != 0) return Sys(errno, "fstat volume " + volume);
  const uint64_t need = static_cast<uint64_t>(st.st_blocks) * 512;
  struct statvfs vfs{};
  if (statvfs(I.opts.dir.c_str(), &vfs) != 0) return Sys(errno, "statvfs " + I.opts.dir);
  const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  if (free_bytes < need) {
    return Error(ENOSPC, "pool {} has {} free, but a copy snapshot of volume {} needs up to {} "
                 "(the volume's allocated bytes)",
                 I.opts.dir, Bytes(free_bytes), volume, Bytes(need));
  }
  int fd = open(data.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Sys(errno, "create snapshot " + name + ": " + data);
  auto fail = [&](Status s) -> Status {
    spdlog::error("pool {}: snapshot {} of volume {} failed, rolling back: {}", I.opts.dir, name,
                  volume, s.message());
    if (fd >= 0) close(fd);
    {
      std::lock_guard lock(I.mu);
      I.snaps.erase(name);
    }
    I.UndoFiles(I.snap_dir, {I.SnapMetaPath(name), I.SnapTmpPath(name), data});
    return s;
  };
  if (Status s = SizeDurably(fd, size, data, I.snap_dir); !s.ok()) return fail(s);
  FaultPoint("snapshot.copy_data");
  SnapMeta m{name, volume, size, RealtimeNs(), "copy", "copying", ""};
  bool renamed = false;
  if (Status s = I.WriteMeta(m, "", "", &renamed); !s.ok()) return fail(s);
  {
    std::lock_guard lock(I.mu);
    I.snaps.emplace(name, m);
  }
  auto rec = std::make_shared<Impl::CopyRec>();
  rec->target = "snapshot/" + name;
  rec->source = "volume/" + volume;
  rec->src_vol = vol;
  double pause_ms = 0;
  if (Status s = I.StartCopyAtInstant(rec, "volume " + volume, vol->buffered_fd(), /*own_src=*/false,
                                      fd, /*own_dst=*/true, size, &pause_ms);
      !s.ok())
    return fail(s);
  fd = -1;  // the copy closes it
  FaultPoint("snapshot.copy_started");
  spdlog::info("pool {}: snapshot {} of volume {} ({}) by background copy: writes paused {:.2f} ms, "
               "setup {:.2f} ms",
               I.opts.dir, name, volume, Bytes(size), pause_ms, MsSince(t0));
  std::lock_guard lock(I.mu);
  return I.MakeSnapInfo(I.snaps.at(name));
}

Status Pool::DeleteSnapshot(const std::string& name) {
  if (Status s = ValidateName("snapshot", name); !s.ok()) return s;
  Impl& I = *impl_;
  I.ReapJobs();
  Impl::NameGuard guard(I, "snapshot/" + name);
  std::shared_ptr<CopyJob> job;
  {
    std::lock_guard lock(I.mu);
    if (!I.snaps.count(name) && !I.broken_snaps.count(name))
      return Error(ENOENT, "snapshot {} not found", name);
    if (const auto* c = I.CopyFromLocked("snapshot/" + name)) {
      return Error(EBUSY, "snapshot {} is the source of a running restore to {} ({})", name,
                   c->target, I.ProgressLocked(*c));
    }
    if (auto c = I.copies.find("snapshot/" + name); c != I.copies.end()) job = c->second->job;
  }
  if (job) {
    job->Cancel();
    job->Wait();
  }
  const std::string meta = I.SnapMetaPath(name), data = I.SnapDataPath(name);
  if (unlink(meta.c_str()) != 0 && errno != ENOENT)
    return Sys(errno, "delete snapshot " + name + ": unlink " + meta);
  {
    std::lock_guard lock(I.mu);
    I.snaps.erase(name);
    I.broken_snaps.erase(name);
  }
  return I.RemoveDataAfterMeta("snapshot", I.snap_dir, name, data, "snapshot.delete_meta");
}

std::vector<SnapshotInfo> Pool::ListSnapshots(const std::string& volume) {
  std::lock_guard lock(impl_->mu);
  std::vector<SnapshotInfo> out;
  for (const auto& [n, m] : impl_->snaps)
    if (volume.empty() || m.source_volume == volume) out.push_back(impl_->MakeSnapInfo(m));
  return out;
}

StatusOr<SnapshotInfo> Pool::InspectSnapshot(const std::string& name) {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->snaps.find(name);
  if (it == impl_->snaps.end()) return Impl::NotFound("snapshot", impl_->broken_snaps, name);
  return impl_->MakeSnapInfo(it->second);
}

struct Pool::FillSource {
  const char* op;       // "restore" | "clone": prefix of the fault points and messages
  std::string label;    // "snapshot/NAME" | "volume/NAME", recorded as the volume's source
  int fd = -1;
  bool own_fd = false;  // close it when done (a snapshot's data file)
  uint64_t length = 0;  // bytes of content
  std::shared_ptr<Volume> live;  // the live source to pause, or null for a snapshot
};

// Caller holds the name guards and has reserved capacity for `size`.
StatusOr<VolumeInfo> Pool::FillNewVolume(const std::string& name, uint64_t size,
                                         const QosLimits& qos, bool read_only,
                                         const FillSource& src) {
  Impl& I = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  const std::string op = src.op;
  auto point = [&](const char* step) { FaultPoint((op + "." + step).c_str()); };
  bool src_owned_here = src.own_fd;
  auto close_src = [&] {
    if (src_owned_here) close(src.fd);
    src_owned_here = false;
  };
  Meta m;
  m.name = name;
  m.size = size;
  m.created_unix_ns = RealtimeNs();
  m.read_only = read_only;
  m.qos = qos;
  m.source = src.label;
  m.state = I.reflink ? "ready" : "copying";
  const std::string data = I.DataPath(name), tmp = I.DataTmpPath(name);
  const std::string& first = I.reflink ? tmp : data;
  int fd = open(first.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    Status s = Sys(errno, op + " volume " + name + ": create " + first);
    close_src();
    return s;
  }
  auto fail = [&](Status s) -> Status {
    spdlog::error("pool {}: {} of volume {} from {} failed, rolling back: {}", I.opts.dir, op,
                  name, src.label, s.message());
    if (fd >= 0) close(fd);
    close_src();
    I.UndoFiles(I.vol_dir, {I.MetaPath(name), I.TmpPath(name), data, tmp});
    return s;
  };
  double pause_ms = -1;
  if (I.reflink) {
    Status st = CloneWhole(fd, tmp, src.fd, src.label, src.live ? &src.live->gate() : nullptr,
                           /*closed_ns=*/nullptr, &pause_ms);
    close_src();
    if (!st.ok()) return fail(st);
    // Growing after the clone: the new tail is a hole, which reads as zeros.
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) return fail(Sys(errno, "size " + tmp));
    if (fsync(fd) != 0) return fail(Sys(errno, "fsync " + tmp));
    point("cloned");
    if (rename(tmp.c_str(), data.c_str()) != 0) return fail(Sys(errno, "rename " + tmp + " to " + data));
    if (Status s = FsyncDir(I.vol_dir); !s.ok()) return fail(s);
    point("data");
  } else {
    if (Status s = SizeDurably(fd, size, data, I.vol_dir); !s.ok()) return fail(s);
    point("copy_data");
  }
  auto vol = I.OpenVolume(m, fd);
  fd = -1;
  if (!vol.ok()) return fail(vol.status());
  bool renamed = false;
  const std::string ft = op + ".meta_tmp", fr = op + ".meta_renamed";
  Status ws = I.reflink ? I.WriteMeta(m, ft.c_str(), fr.c_str(), &renamed) : I.WriteMeta(m, "", "", &renamed);
  if (!ws.ok()) {
    vol->reset();
    return fail(ws);
  }
  if (I.reflink) {
    spdlog::info("pool {}: {} volume {} ({}) from {} by reflink{}, total {:.2f} ms", I.opts.dir, op,
                 name, Bytes(size), src.label,
                 pause_ms >= 0 ? fmt::format(": writes paused {:.2f} ms", pause_ms) : "", MsSince(t0));
    std::lock_guard lock(I.mu);
    auto [it, inserted] = I.vols.emplace(name, Impl::Entry{std::move(*vol), m});
    return I.MakeInfo(it->second);
  }
  std::shared_ptr<Volume> v = std::move(*vol);
  {
    std::lock_guard lock(I.mu);
    I.vols.emplace(name, Impl::Entry{v, m});
  }
  auto rec = std::make_shared<Impl::CopyRec>();
  rec->target = "volume/" + name;
  rec->source = src.label;
  rec->src_vol = src.live;
  if (Status s = I.StartCopyAtInstant(rec, src.label, src.fd, src_owned_here, v->buffered_fd(),
                                      /*own_dst=*/false, src.length, &pause_ms);
      !s.ok()) {
    {
      std::lock_guard lock(I.mu);
      I.vols.erase(name);
    }
    v.reset();
    return fail(s);
  }
  src_owned_here = false;  // the copy closes it
  point("copy_started");
  spdlog::info("pool {}: {} volume {} ({}) from {} by background copy{}, setup {:.2f} ms",
               I.opts.dir, op, name, Bytes(size), src.label,
               pause_ms >= 0 ? fmt::format(": writes paused {:.2f} ms", pause_ms) : "", MsSince(t0));
  std::lock_guard lock(I.mu);
  return I.MakeInfo(I.vols.at(name));
}

StatusOr<VolumeInfo> Pool::CreateVolumeFromSnapshot(const std::string& name,
                                                    const std::string& snapshot, uint64_t size,
                                                    const QosLimits& qos, bool read_only) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  if (Status s = ValidateName("snapshot", snapshot); !s.ok()) return s;
  if (size != 0) {
    if (Status s = ValidateSize(size); !s.ok()) return s;
  }
  if (Status s = ValidateQos(qos); !s.ok()) return s;
  Impl& I = *impl_;
  I.ReapJobs();
  Impl::NameGuard guard(I, std::vector<std::string>{name, "snapshot/" + snapshot});
  auto capacity_or = I.Capacity();
  if (!capacity_or.ok()) return capacity_or.status();
  const std::string label = "snapshot/" + snapshot;
  uint64_t length = 0;
  {
    std::lock_guard lock(I.mu);
    if (Status s = Impl::BrokenTaken("volume", I.broken, name); !s.ok()) return s;
    auto sit = I.snaps.find(snapshot);
    if (auto it = I.vols.find(name); it != I.vols.end()) {
      // Checked before the snapshot, which may be gone by the time the call is retried.
      uint64_t want = size ? size : sit != I.snaps.end() ? sit->second.size : it->second.meta.size;
      return I.ExistingFillTargetLocked(it->second, label, want, qos, read_only);
    }
    if (sit == I.snaps.end()) return Impl::NotFound("snapshot", I.broken_snaps, snapshot);
    length = sit->second.size;
    if (size == 0) size = length;
    if (size < length) {
      return Error(EINVAL, "volume {} of {} bytes is smaller than snapshot {} ({} bytes)", name,
                   size, snapshot, length);
    }
    if (sit->second.state != "ready") {
      return Error(EAGAIN, "snapshot {} is not ready: {}", snapshot,
                   NotReadyReason(sit->second.state, sit->second.error));
    }
    if (Status s = I.CheckCapacityLocked(name, size, *capacity_or); !s.ok()) return s;
    guard.ReserveLocked(size);
  }
  const std::string spath = I.SnapDataPath(snapshot);
  int sfd = open(spath.c_str(), O_RDONLY | O_CLOEXEC);
  if (sfd < 0) return Sys(errno, "open snapshot " + snapshot + ": " + spath);
  FillSource src{"restore", label, sfd, true, length, nullptr};
  return FillNewVolume(name, size, qos, read_only, src);
}

StatusOr<VolumeInfo> Pool::CloneVolume(const std::string& name, const std::string& source,
                                       uint64_t size, const QosLimits& qos, bool read_only) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  if (Status s = ValidateVolumeName(source); !s.ok()) return s;
  if (size != 0) {
    if (Status s = ValidateSize(size); !s.ok()) return s;
  }
  if (Status s = ValidateQos(qos); !s.ok()) return s;
  if (name == source) return Error(EINVAL, "cannot clone volume {} onto itself", name);
  Impl& I = *impl_;
  I.ReapJobs();
  Impl::NameGuard guard(I, std::vector<std::string>{name, source});
  auto capacity_or = I.Capacity();
  if (!capacity_or.ok()) return capacity_or.status();
  const std::string label = "volume/" + source;
  std::shared_ptr<Volume> src_vol;
  uint64_t length = 0;
  {
    std::lock_guard lock(I.mu);
    if (Status s = Impl::BrokenTaken("volume", I.broken, name); !s.ok()) return s;
    auto sit = I.vols.find(source);
    if (auto it = I.vols.find(name); it != I.vols.end()) {
      uint64_t want = size ? size : sit != I.vols.end() ? sit->second.meta.size : it->second.meta.size;
      return I.ExistingFillTargetLocked(it->second, label, want, qos, read_only);
    }
    if (sit == I.vols.end()) return Impl::NotFound("volume", I.broken, source);
    if (sit->second.meta.state != "ready") {
      return Error(EAGAIN, "volume {} is not ready: {}", source,
                   NotReadyReason(sit->second.meta.state, sit->second.meta.error));
    }
    if (const auto* c = I.CopyFromLocked(label))
      return Error(EAGAIN, "a copy from volume {} is running ({})", source, I.ProgressLocked(*c));
    length = sit->second.meta.size;
    if (size == 0) size = length;
    if (size < length) {
      return Error(EINVAL, "volume {} of {} bytes is smaller than its source {} ({} bytes)", name,
                   size, source, length);
    }
    if (Status s = I.CheckCapacityLocked(name, size, *capacity_or); !s.ok()) return s;
    guard.ReserveLocked(size);
    src_vol = sit->second.vol;
  }
  FillSource src{"clone", label, src_vol->buffered_fd(), false, length, src_vol};
  return FillNewVolume(name, size, qos, read_only, src);
}

std::shared_ptr<Volume> Pool::Acquire(const std::string& name) {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->vols.find(name);
  if (it == impl_->vols.end() || it->second.meta.state != "ready") return nullptr;
  return it->second.vol;
}

std::vector<std::string> Pool::Names() {
  std::lock_guard lock(impl_->mu);
  std::vector<std::string> out;
  out.reserve(impl_->vols.size());
  for (const auto& [n, e] : impl_->vols) out.push_back(n);
  return out;
}

}  // namespace nbdcsi::datapath
