#include "tools/logwrites/log_writes.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "tools/logwrites/dm_control.h"

namespace nbdcsi::logwrites {

namespace {

uint64_t Le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint32_t Le32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

Status Sys(int err, const std::string& what) {
  return Status(err, fmt::format("{}: {}", what, std::strerror(err)));
}

StatusOr<uint64_t> SizeOf(int fd, const std::string& path, bool* is_block) {
  struct stat st{};
  if (fstat(fd, &st) != 0) return Sys(errno, "stat " + path);
  *is_block = S_ISBLK(st.st_mode);
  if (*is_block) {
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) return Sys(errno, "BLKGETSIZE64 " + path);
    return bytes;
  }
  if (!S_ISREG(st.st_mode)) {
    return Error(EINVAL, "{}: neither a regular file nor a block device", path);
  }
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace

StatusOr<Super> ParseSuper(const uint8_t* p, size_t n) {
  if (n < kSuperBytes) return Error(EINVAL, "log superblock: {} bytes, want {}", n, kSuperBytes);
  const uint64_t magic = Le64(p), version = Le64(p + 8);
  if (magic != kLogMagic) {
    return Error(EINVAL, "log superblock: magic {:#x}, want {:#x} (not a dm-log-writes log?)",
                 magic, kLogMagic);
  }
  if (version != kLogVersion) {
    return Error(EINVAL, "log superblock: version {}, this reader knows {}", version, kLogVersion);
  }
  Super s;
  s.nr_entries = Le64(p + 16);
  s.sectorsize = Le32(p + 24);
  if (s.sectorsize < 512 || s.sectorsize > 65536 || (s.sectorsize & (s.sectorsize - 1)) != 0) {
    return Error(EINVAL, "log superblock: sectorsize {} is not a power of two in 512..65536",
                 s.sectorsize);
  }
  return s;
}

StatusOr<Entry> ParseEntry(const uint8_t* p, size_t n, uint32_t sectorsize, uint64_t index,
                           uint64_t offset) {
  auto bad = [&](const std::string& why) {
    return Error(EINVAL, "log entry {} (byte {}): {}", index, offset, why);
  };
  if (n < sectorsize || sectorsize < kEntryHeaderBytes) return bad("short header block");
  Entry e;
  e.index = index;
  e.offset = offset;
  e.sector = Le64(p);
  e.nr_sectors = Le64(p + 8);
  e.flags = Le64(p + 16);
  e.data_len = Le64(p + 24);
  if (e.flags & ~kKnownFlags) return bad(fmt::format("unknown flags {:#x}", e.flags));
  if (e.flags & kFlagMark) {
    if (e.nr_sectors != 0) return bad("a MARK with data blocks");
    if (e.data_len == 0 || e.data_len > sectorsize - kEntryHeaderBytes) {
      return bad(fmt::format("MARK text of {} bytes does not fit its block", e.data_len));
    }
    e.mark.assign(reinterpret_cast<const char*>(p + kEntryHeaderBytes), e.data_len);
  } else if (e.data_len != 0) {
    // Inline data without a mark is not produced for block I/O; refuse rather than misplace it.
    return bad(fmt::format("data_len {} on a non-MARK entry is not supported", e.data_len));
  }
  if ((e.flags & kFlagDiscard) && (e.flags & (kFlagFlush | kFlagFua))) {
    return bad("a DISCARD with FLUSH/FUA");
  }
  const uint64_t max_blocks = UINT64_MAX / sectorsize;
  if (e.nr_sectors > max_blocks || e.sector > max_blocks - e.nr_sectors) {
    return bad(fmt::format("extent {}+{} overflows", e.sector, e.nr_sectors));
  }
  return e;
}

uint64_t EntryLogBytes(const Entry& e, uint32_t sectorsize) {
  uint64_t blocks = 1 + ((e.flags & kFlagDiscard) ? 0 : e.nr_sectors);
  return blocks * sectorsize;
}

std::string FlagNames(uint64_t flags) {
  static const std::pair<uint64_t, const char*> kNames[] = {
      {kFlagFlush, "FLUSH"}, {kFlagFua, "FUA"},     {kFlagDiscard, "DISCARD"},
      {kFlagMark, "MARK"},   {kFlagMetadata, "META"}};
  std::string out;
  for (const auto& [bit, name] : kNames) {
    if (!(flags & bit)) continue;
    if (!out.empty()) out += '|';
    out += name;
  }
  return out.empty() ? "WRITE" : out;
}

std::string PrintableMark(const std::string& mark) {
  std::string out = mark;
  for (char& c : out) {
    if (c <= ' ' || c > '~') c = '?';
  }
  return out.empty() ? "?" : out;
}

// ---- LogReader ----------------------------------------------------------------------------------

StatusOr<std::unique_ptr<LogReader>> LogReader::Open(const std::string& path) {
  std::unique_ptr<LogReader> r(new LogReader());
  r->path_ = path;
  r->fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (r->fd_ < 0) return Sys(errno, "open log " + path);
  bool is_block = false;
  auto size = SizeOf(r->fd_, path, &is_block);
  if (!size.ok()) return size.status();
  r->size_ = *size;
  uint8_t buf[kSuperBytes];
  if (Status s = r->ReadAt(0, buf, sizeof(buf), "superblock"); !s.ok()) return s;
  auto sup = ParseSuper(buf, sizeof(buf));
  if (!sup.ok()) return Error(EINVAL, "{}: {}", path, sup.status().message());
  r->super_ = *sup;
  r->next_offset_ = r->super_.sectorsize;
  return r;
}

LogReader::~LogReader() {
  if (fd_ >= 0) close(fd_);
}

Status LogReader::ReadAt(uint64_t off, uint8_t* buf, size_t len, const char* what) {
  if (off > size_ || len > size_ - off) {
    return Error(EINVAL, "{}: {} at byte {} (+{}) is past the end of the log ({} bytes): truncated?",
                 path_, what, off, len, size_);
  }
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd_, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Sys(errno, fmt::format("read {} {} at byte {}", path_, what, off + done));
    if (n == 0) return Error(EIO, "{}: unexpected end of file reading {}", path_, what);
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

StatusOr<std::optional<Entry>> LogReader::Next() {
  if (next_index_ >= super_.nr_entries) return std::optional<Entry>();
  std::vector<uint8_t> block(super_.sectorsize);
  if (Status s = ReadAt(next_offset_, block.data(), block.size(), "entry header"); !s.ok()) {
    return Error(s.code(), "entry {}: {}", next_index_, s.message());
  }
  auto e = ParseEntry(block.data(), block.size(), super_.sectorsize, next_index_, next_offset_);
  if (!e.ok()) return Error(EINVAL, "{}: {}", path_, e.status().message());
  const uint64_t bytes = EntryLogBytes(*e, super_.sectorsize);
  if (next_offset_ > size_ || bytes > size_ - next_offset_) {
    return Error(EINVAL, "{}: entry {} (byte {}) needs {} bytes, past the end of the log",
                 path_, next_index_, next_offset_, bytes);
  }
  ++next_index_;
  next_offset_ += bytes;
  return std::optional<Entry>(std::move(*e));
}

Status LogReader::Seek(uint64_t index, uint64_t offset) {
  if (index > super_.nr_entries || offset < super_.sectorsize || offset > size_ ||
      offset % super_.sectorsize != 0) {
    return Error(EINVAL, "{}: cursor entry {} at byte {} does not fit this log ({} entries, {} bytes)",
                 path_, index, offset, super_.nr_entries, size_);
  }
  next_index_ = index;
  next_offset_ = offset;
  return Status::Ok();
}

Status LogReader::ReadData(const Entry& e, std::vector<uint8_t>& out) {
  out.clear();
  if ((e.flags & kFlagDiscard) || e.nr_sectors == 0) return Status::Ok();
  out.resize(e.nr_sectors * super_.sectorsize);
  return ReadAt(e.offset + super_.sectorsize, out.data(), out.size(), "entry data");
}

// ---- ReplayTarget -------------------------------------------------------------------------------

StatusOr<std::unique_ptr<ReplayTarget>> ReplayTarget::Open(const std::string& path) {
  std::unique_ptr<ReplayTarget> t(new ReplayTarget());
  t->path_ = path;
  t->fd_ = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (t->fd_ < 0) return Sys(errno, "open replay target " + path);
  auto size = SizeOf(t->fd_, path, &t->is_block_);
  if (!size.ok()) return size.status();
  t->size_ = *size;
  return t;
}

ReplayTarget::~ReplayTarget() {
  if (fd_ >= 0) close(fd_);
}

Status ReplayTarget::Apply(const Entry& e, uint32_t sectorsize, const std::vector<uint8_t>& data) {
  if (e.nr_sectors == 0) return Status::Ok();  // a mark or a bare flush: nothing to write
  const uint64_t off = e.sector * sectorsize, len = e.nr_sectors * sectorsize;
  if (off > size_ || len > size_ - off) {
    return Error(EINVAL, "entry {}: blocks {}+{} end past {} ({} bytes): wrong target?", e.index,
                 e.sector, e.nr_sectors, path_, size_);
  }
  if (e.flags & kFlagDiscard) {
    if (is_block_) {
      uint64_t range[2] = {off, len};
      if (ioctl(fd_, BLKZEROOUT, range) != 0) {
        return Sys(errno, fmt::format("entry {}: BLKZEROOUT {}+{} on {}", e.index, off, len, path_));
      }
    } else if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                         static_cast<off_t>(len)) != 0) {
      return Sys(errno, fmt::format("entry {}: punch {}+{} in {}", e.index, off, len, path_));
    }
    return Status::Ok();
  }
  if (data.size() != len) {
    return Error(EINVAL, "entry {}: {} data bytes for {} blocks", e.index, data.size(), e.nr_sectors);
  }
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd_, data.data() + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return Sys(n < 0 ? errno : EIO, fmt::format("entry {}: write {} at byte {}", e.index, path_,
                                                  off + done));
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status ReplayTarget::Sync() {
  if (fsync(fd_) != 0) return Sys(errno, "fsync " + path_);
  return Status::Ok();
}

// ---- points and replay -------------------------------------------------------------------------

StatusOr<std::vector<Point>> CrashPoints(LogReader& r, const std::string& from_mark) {
  std::vector<Point> out;
  bool started = from_mark.empty();
  bool changed = false;  // a write or discard since the last point
  for (;;) {
    auto e = r.Next();
    if (!e.ok()) return e.status();
    if (!e->has_value()) break;
    const Entry& en = **e;
    if (!started) {
      if (!(en.flags & kFlagMark) || en.mark != from_mark) continue;
      started = true;
    }
    if (!out.empty() && en.changes_image()) changed = true;
    if (en.is_point()) {
      if (!out.empty()) out.back().same_as_next = !changed;
      out.push_back(Point{en, false});
      changed = false;
    }
  }
  if (!started) return Error(ENOENT, "no mark '{}' in the log", from_mark);
  return out;
}

Status ReplayThrough(LogReader& r, ReplayTarget& t, uint64_t to) {
  std::vector<uint8_t> data;
  while (r.next_index() <= to) {
    auto e = r.Next();
    if (!e.ok()) return e.status();
    if (!e->has_value()) break;
    if (Status s = r.ReadData(**e, data); !s.ok()) return s;
    if (Status s = t.Apply(**e, r.super().sectorsize, data); !s.ok()) return s;
  }
  return t.Sync();
}

// ---- marks --------------------------------------------------------------------------------------

Status ValidateMarkText(const std::string& text) {
  if (text.empty() || text.size() > 400) {
    return Error(EINVAL, "mark text must be 1..400 bytes, got {}", text.size());
  }
  for (char c : text) {
    if (c <= ' ' || c > '~') {
      return Error(EINVAL, "mark text '{}': only printable ASCII without blanks", text);
    }
  }
  return Status::Ok();
}

Status SendMark(const std::string& dm_name, const std::string& text) {
  if (Status s = ValidateMarkText(text); !s.ok()) return s;
  if (Status s = DmMessage(dm_name, "mark " + text); !s.ok()) {
    return Error(s.code(), "mark '{}': {}", text, s.message());
  }
  return Status::Ok();
}

}  // namespace nbdcsi::logwrites
