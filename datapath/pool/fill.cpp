// Restores (a new volume from a snapshot) and clones (a new volume from a live volume): Create
// resolves the source under the name guard (ResolveSourceLocked), then FillNewVolume writes the
// volume by reflink, or publishes it "copying" and starts a background copy. The two differ only
// in where the data comes from (FillSource).
#include <fcntl.h>
#include <unistd.h>

#include <utility>

#include <spdlog/spdlog.h>

#include "common/fault.h"
#include "datapath/pool/pool_impl.h"

namespace nbdcsi::datapath {

namespace {

// A descriptor closed on every path unless handed on.
class OwnedFd {
 public:
  explicit OwnedFd(int fd) : fd_(fd) {}
  ~OwnedFd() {
    if (fd_ >= 0) close(fd_);
  }
  bool owned() const { return fd_ >= 0; }
  void release() { fd_ = -1; }
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;

 private:
  int fd_;
};

// The new volume's size: 0 means the source's; smaller than the source is EINVAL.
Status ResolveSize(const std::string& name, uint64_t length, const std::string& source_desc,
                   uint64_t* size) {
  if (*size == 0) *size = length;
  if (*size < length) {
    return Error(EINVAL, "volume {} of {} bytes is smaller than {} ({} bytes)", name, *size,
                 source_desc, length);
  }
  return Status::Ok();
}

}  // namespace

StatusOr<Pool::Impl::FillSource> Pool::Impl::ResolveSourceLocked(const CreateSpec& spec,
                                                                 uint64_t* size) const {
  const std::string& from = spec.source.name;
  FillSource src;
  src.label = spec.source.Label();
  if (spec.source.kind == VolumeSource::Kind::kSnapshot) {
    auto sit = snaps.find(from);
    if (sit == snaps.end()) return NotFound("snapshot", broken_snaps, from);
    const SnapshotMeta& snap = sit->second;
    if (Status s = ResolveSize(spec.name, snap.size, "snapshot " + from, size); !s.ok()) return s;
    if (snap.state != "ready") {
      return Error(EAGAIN, "snapshot {} is not ready: {}", from,
                   NotReadyReason(snap.state, snap.error));
    }
    src.op = "restore";
    src.length = snap.size;
    src.snapshot = from;  // its data file is opened outside `mu`
    return src;
  }
  auto live = LiveSourceLocked(from);
  if (!live.ok()) return live.status();
  const Entry& e = **live;
  if (Status s = ResolveSize(spec.name, e.meta.size, "its source " + from, size); !s.ok()) {
    return s;
  }
  src.op = "clone";
  src.length = e.meta.size;
  src.live = e.vol;
  src.fd = src.live->buffered_fd();
  return src;
}

// The reflink path up to the data file: clone into a temp file, grow it to `size`, fsync,
// rename to NAME.img, fsync the directory.
Status Pool::Impl::FillByReflink(int fd, const std::string& tmp, const std::string& data,
                                 const FillSource& src, uint64_t size, double* pause_ms) {
  const std::string op = src.op;
  Status st = CloneWhole(fd, tmp, src.fd, src.label, src.live ? &src.live->gate() : nullptr,
                         /*closed_ns=*/nullptr, pause_ms);
  if (!st.ok()) return st;
  // Growing after the clone: the new tail is a hole, which reads as zeros.
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) return Sys(errno, "size " + tmp);
  if (fsync(fd) != 0) return Sys(errno, "fsync " + tmp);
  FaultPoint((op + ".cloned").c_str());
  if (rename(tmp.c_str(), data.c_str()) != 0) return Sys(errno, "rename " + tmp + " to " + data);
  if (Status s = FsyncDir(vol_dir); !s.ok()) return s;
  FaultPoint((op + ".data").c_str());
  return Status::Ok();
}

// The copy path after the commit of "copying": the volume is published (not ready, so not
// exported) and a CopyJob fills it at one instant of the source. On an error it is unpublished
// again and the caller rolls back.
Status Pool::Impl::StartFillCopy(const std::shared_ptr<Volume>& v, const VolumeMeta& m,
                                 const FillSource& src, bool own_src, double* pause_ms) {
  {
    std::lock_guard lock(mu);
    vols.emplace(m.name, Entry{v, m});
  }
  auto rec = std::make_shared<CopyRec>();
  rec->target = VolKey(m.name);
  rec->source = src.label;
  rec->src_vol = src.live;
  Status s = StartCopyAtInstant(rec, src.label, src.fd, own_src, v->buffered_fd(),
                                /*own_dst=*/false, src.length, pause_ms);
  if (!s.ok()) {
    std::lock_guard lock(mu);
    vols.erase(m.name);
  }
  return s;
}

// Caller holds the name guards of the volume and its source and has reserved `size`.
StatusOr<VolumeInfo> Pool::Impl::FillNewVolume(const CreateSpec& spec, uint64_t size,
                                               FillSource src) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string& name = spec.name;
  const std::string op = src.op;
  if (!src.snapshot.empty()) {
    const std::string spath = SnapDataPath(src.snapshot);
    src.fd = open(spath.c_str(), O_RDONLY | O_CLOEXEC);
    if (src.fd < 0) return Sys(errno, "open snapshot " + src.snapshot + ": " + spath);
    src.own_fd = true;
  }
  OwnedFd src_fd(src.own_fd ? src.fd : -1);
  const VolumeMeta m{name,     size,      RealtimeNs(),
                     spec.read_only, spec.qos, src.label,
                     reflink ? "ready" : "copying", "",
                     /*fence_epoch=*/0, Normalized(spec.schedule)};  // a clone or restore is a new volume: never fenced
  const std::string data = DataPath(name), tmp = DataTmpPath(name);
  const std::string& first = reflink ? tmp : data;
  int fd = open(first.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Sys(errno, op + " volume " + name + ": create " + first);
  auto fail = [&](Status s) {
    return RollBackVolume(op + " of volume " + name + " from " + src.label, name,
                          std::exchange(fd, -1), s);
  };
  double pause_ms = -1;
  if (reflink) {
    if (Status s = FillByReflink(fd, tmp, data, src, size, &pause_ms); !s.ok()) return fail(s);
  } else {
    if (Status s = SizeDurably(fd, size, data, vol_dir); !s.ok()) return fail(s);
    FaultPoint((op + ".copy_data").c_str());
  }
  auto vol = OpenVolume(m, fd);
  fd = -1;
  if (!vol.ok()) return fail(vol.status());
  bool renamed = false;
  const std::string ft = reflink ? op + ".meta_tmp" : "", fr = reflink ? op + ".meta_renamed" : "";
  if (Status s = WriteMeta(m, ft.c_str(), fr.c_str(), &renamed); !s.ok()) {
    vol->reset();
    return fail(s);
  }
  auto paused = [&] {
    return pause_ms >= 0 ? fmt::format(": writes paused {:.2f} ms", pause_ms) : std::string();
  };
  if (reflink) {
    spdlog::info("pool {}: {} volume {} ({}) from {} by reflink{}, total {:.2f} ms", opts.dir, op,
                 name, Bytes(size), src.label, paused(), MsSince(t0));
    return InsertVolume(std::move(*vol), m);
  }
  std::shared_ptr<Volume> v = std::move(*vol);
  if (Status s = StartFillCopy(v, m, src, src_fd.owned(), &pause_ms); !s.ok()) {
    v.reset();
    return fail(s);
  }
  src_fd.release();  // the copy closes it
  FaultPoint((op + ".copy_started").c_str());
  spdlog::info("pool {}: {} volume {} ({}) from {} by background copy{}, setup {:.2f} ms",
               opts.dir, op, name, Bytes(size), src.label, paused(), MsSince(t0));
  std::lock_guard lock(mu);
  return MakeInfo(vols.at(name));
}

}  // namespace nbdcsi::datapath
