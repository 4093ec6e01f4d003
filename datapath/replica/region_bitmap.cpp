#include "datapath/replica/region_bitmap.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>

#include "common/fs_util.h"

namespace nbdcsi::replica {
namespace {

constexpr char kMagic[8] = {'N', 'B', 'D', 'C', 'S', 'I', 'R', 'B'};
constexpr size_t kHeaderFields = 8 + 4 + 4 + 8 + 8 + 8;  // magic .. region count, reserved
constexpr uint64_t kRegionsPerPage = RegionBitmap::kPageSize * 8;

void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void Put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t Get32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint64_t Get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// CRC-32C (Castagnoli), bit by bit: it only ever covers the 40 header bytes.
uint32_t Crc32c(const uint8_t* p, size_t n) {
  uint32_t crc = ~0u;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
  }
  return ~crc;
}

Status Errno(const char* step, const std::string& path) {
  return Error(errno, "region bitmap {}: {}: {}", path, step, strerror(errno));
}

Status PwriteAll(int fd, const uint8_t* p, size_t n, off_t off, const std::string& path) {
  while (n > 0) {
    const ssize_t w = pwrite(fd, p, n, off);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Errno("write", path);
    }
    p += w;
    n -= static_cast<size_t>(w);
    off += w;
  }
  return Status::Ok();
}

Status PreadAll(int fd, uint8_t* p, size_t n, off_t off, const std::string& path) {
  while (n > 0) {
    const ssize_t r = pread(fd, p, n, off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return Errno("read", path);
    }
    if (r == 0) return Error(EUCLEAN, "region bitmap {}: truncated at byte {}", path, off);
    p += r;
    n -= static_cast<size_t>(r);
    off += r;
  }
  return Status::Ok();
}

uint64_t RegionCount(uint64_t volume_size, uint64_t region_size) {
  return volume_size / region_size + (volume_size % region_size ? 1 : 0);
}

size_t PageCount(uint64_t regions) {
  return static_cast<size_t>((regions + kRegionsPerPage - 1) / kRegionsPerPage);
}

}  // namespace

RegionBitmap::RegionBitmap(std::string path, int fd, uint64_t volume_size, uint64_t region_size)
    : path_(std::move(path)),
      fd_(fd),
      volume_size_(volume_size),
      region_size_(region_size),
      regions_(RegionCount(volume_size, region_size)),
      pages_(PageCount(regions_)),
      bits_(pages_ * kPageSize, 0),
      copying_((regions_ + 7) / 8, 0),
      remarked_((regions_ + 7) / 8, 0),
      page_seq_(pages_, 0),
      page_queued_(pages_, 0) {}

RegionBitmap::~RegionBitmap() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  // The sync thread finishes what it owes (every callback runs) before it exits.
  if (async_thread_.joinable()) async_thread_.join();
  close(fd_);
}

StatusOr<std::unique_ptr<RegionBitmap>> RegionBitmap::Create(const std::string& path,
                                                             uint64_t volume_size,
                                                             uint64_t region_size) {
  if (region_size < 4096 || region_size > (uint64_t{1} << 30) ||
      (region_size & (region_size - 1)) != 0) {
    return Error(EINVAL, "region bitmap {}: region size {} is not a power of two in [4 KiB, 1 GiB]",
                 path, region_size);
  }
  if (volume_size == 0) return Error(EINVAL, "region bitmap {}: volume size 0", path);
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Errno("create", path);
  std::unique_ptr<RegionBitmap> bm(new RegionBitmap(path, fd, volume_size, region_size));
  // On any failure below the half-made file goes, so a retry can create it again.
  auto fail = [&](Status s) -> Status {
    unlink(path.c_str());
    return s;
  };
  std::vector<uint8_t> page(kPageSize, 0);
  std::memcpy(page.data(), kMagic, 8);
  Put32(page.data() + 8, kVersion);
  Put32(page.data() + 12, static_cast<uint32_t>(std::countr_zero(region_size)));
  Put64(page.data() + 16, volume_size);
  Put64(page.data() + 24, bm->regions_);
  Put32(page.data() + kHeaderFields, Crc32c(page.data(), kHeaderFields));
  if (Status s = PwriteAll(fd, page.data(), kPageSize, 0, path); !s.ok()) return fail(s);
  // The bit pages as real zeroes, not a sparse tail: a later page write must not need an
  // allocation that could fail with ENOSPC while a write waits for its mark.
  std::fill(page.begin(), page.end(), 0);
  for (size_t p = 0; p < bm->pages_; ++p) {
    if (Status s =
            PwriteAll(fd, page.data(), kPageSize, static_cast<off_t>((p + 1) * kPageSize), path);
        !s.ok()) {
      return fail(s);
    }
  }
  if (fsync(fd) != 0) return fail(Errno("fsync", path));
  const std::string dir = std::filesystem::path(path).parent_path().string();
  if (Status s = FsyncDir(dir.empty() ? "." : dir); !s.ok()) return fail(s);
  return bm;
}

StatusOr<std::unique_ptr<RegionBitmap>> RegionBitmap::Open(const std::string& path,
                                                           uint64_t expected_volume_size) {
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return Errno("open", path);
  auto bad = [&](std::string why) -> Status {
    close(fd);
    return Status(EUCLEAN, fmt::format("region bitmap {}: {}", path, why));
  };
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    Status s = Errno("stat", path);
    close(fd);
    return s;
  }
  if (st.st_size < static_cast<off_t>(kPageSize)) {
    return bad(fmt::format("{} bytes, shorter than its header", st.st_size));
  }
  uint8_t h[kPageSize];
  if (Status s = PreadAll(fd, h, kPageSize, 0, path); !s.ok()) {
    close(fd);
    return s;
  }
  if (std::memcmp(h, kMagic, 8) != 0) return bad("not a region bitmap (bad magic)");
  const uint32_t crc = Get32(h + kHeaderFields);
  if (crc != Crc32c(h, kHeaderFields)) {
    return bad(
        fmt::format("header checksum {:#010x}, expected {:#010x}", crc, Crc32c(h, kHeaderFields)));
  }
  const uint32_t version = Get32(h + 8);
  if (version != kVersion)
    return bad(fmt::format("version {} (this build knows {})", version, kVersion));
  const uint32_t shift = Get32(h + 12);
  const uint64_t volume_size = Get64(h + 16);
  const uint64_t regions = Get64(h + 24);
  if (shift < 12 || shift > 30) return bad(fmt::format("region size 2^{}", shift));
  const uint64_t region_size = uint64_t{1} << shift;
  if (volume_size == 0 || regions != RegionCount(volume_size, region_size)) {
    return bad(fmt::format("{} regions of {} bytes do not cover a volume of {} bytes", regions,
                           region_size, volume_size));
  }
  const uint64_t want = (1 + PageCount(regions)) * kPageSize;
  if (static_cast<uint64_t>(st.st_size) != want) {
    return bad(fmt::format("{} bytes, expected {}", st.st_size, want));
  }
  if (expected_volume_size > 0 && expected_volume_size != volume_size) {
    close(fd);
    return Error(EINVAL, "region bitmap {}: made for a volume of {} bytes, not {}", path,
                 volume_size, expected_volume_size);
  }
  std::unique_ptr<RegionBitmap> bm(new RegionBitmap(path, fd, volume_size, region_size));
  if (Status s = PreadAll(fd, bm->bits_.data(), bm->bits_.size(), kPageSize, path); !s.ok()) {
    return s;  // bm owns fd now
  }
  for (uint64_t i = regions; i < bm->bits_.size() * 8; ++i) {
    if (bm->TestBit(bm->bits_, i)) {
      return Status(EUCLEAN, fmt::format("region bitmap {}: bit {} set past the last region {}",
                                         path, i, regions - 1));
    }
  }
  return bm;
}

Status RegionBitmap::CheckRange(uint64_t offset, uint64_t length, const char* what) const {
  if (length == 0 || offset >= volume_size_ || length > volume_size_ - offset) {
    return Error(EINVAL, "region bitmap {}: {} [{}, +{}) outside the {}-byte volume", path_, what,
                 offset, length, volume_size_);
  }
  return Status::Ok();
}

uint64_t RegionBitmap::SetBitsLocked(uint64_t first, uint64_t last) {
  uint64_t need = 0;
  for (uint64_t i = first; i <= last; ++i) {
    const size_t page = static_cast<size_t>(i / kRegionsPerPage);
    uint8_t& byte = bits_[i >> 3];
    const uint8_t mask = static_cast<uint8_t>(1u << (i & 7));
    if (copying_[i >> 3] & mask) remarked_[i >> 3] |= mask;
    if (!(byte & mask)) {
      byte |= mask;
      page_seq_[page] = ++seq_;
      if (!page_queued_[page]) {
        page_queued_[page] = 1;
        changed_.push_back(page);
      }
    }
    // A bit set by another caller whose sync is still running is not durable yet either.
    need = std::max(need, page_seq_[page]);
  }
  return need;
}

Status RegionBitmap::Mark(uint64_t offset, uint64_t length) {
  if (Status s = CheckRange(offset, length, "mark"); !s.ok()) return s;
  std::lock_guard lk(mu_);
  SetBitsLocked(offset / region_size_, (offset + length - 1) / region_size_);
  return Status::Ok();
}

Status RegionBitmap::MarkDurable(uint64_t offset, uint64_t length) {
  if (Status s = CheckRange(offset, length, "mark"); !s.ok()) return s;
  std::unique_lock lk(mu_);
  const uint64_t need = SetBitsLocked(offset / region_size_, (offset + length - 1) / region_size_);
  return WaitDurable(lk, need);
}

Status RegionBitmap::MarkAllDurable() { return MarkDurable(0, volume_size_); }

Status RegionBitmap::Sync() {
  std::unique_lock lk(mu_);
  return WaitDurable(lk, seq_);
}

Status RegionBitmap::WaitDurable(std::unique_lock<std::mutex>& lk, uint64_t need) {
  for (;;) {
    if (!failed_.ok()) return failed_;
    if (durable_seq_ >= need) return Status::Ok();
    if (syncing_) {
      cv_.wait(lk);
      continue;
    }
    SyncRoundLocked(lk);
  }
}

// Leader: writes every changed page as it is now, then one fdatasync for all waiters. Called
// with mu_ held and no round running; releases mu_ for the I/O.
void RegionBitmap::SyncRoundLocked(std::unique_lock<std::mutex>& lk) {
  syncing_ = true;
  const uint64_t target = seq_;
  std::vector<size_t> pages;
  pages.swap(changed_);
  std::sort(pages.begin(), pages.end());
  std::vector<uint8_t> snap(pages.size() * kPageSize);
  for (size_t k = 0; k < pages.size(); ++k) {
    page_queued_[pages[k]] = 0;
    std::memcpy(snap.data() + k * kPageSize, bits_.data() + pages[k] * kPageSize, kPageSize);
  }
  std::function<void()> hook = before_sync_;
  lk.unlock();
  Status s;
  for (size_t k = 0; k < pages.size() && s.ok(); ++k) {
    s = PwriteAll(fd_, snap.data() + k * kPageSize, kPageSize,
                  static_cast<off_t>((pages[k] + 1) * kPageSize), path_);
  }
  if (s.ok()) {
    if (hook) hook();
    if (fdatasync(fd_) != 0) s = Errno("fdatasync", path_);
  }
  lk.lock();
  syncing_ = false;
  ++syncs_;
  if (s.ok()) {
    durable_seq_ = std::max(durable_seq_, target);
  } else {
    failed_ = Error(s.code() ? s.code() : EIO,
                    "{} (the bitmap is failed: the replica needs a full rebuild)", s.message());
  }
  cv_.notify_all();
}

StatusOr<bool> RegionBitmap::MarkDurableAsync(uint64_t offset, uint64_t length,
                                              std::function<void(const Status&)> done) {
  if (Status s = CheckRange(offset, length, "mark"); !s.ok()) return s;
  std::lock_guard lk(mu_);
  if (!failed_.ok()) return failed_;
  const uint64_t need = SetBitsLocked(offset / region_size_, (offset + length - 1) / region_size_);
  if (durable_seq_ >= need) return true;
  async_.push_back({need, std::move(done)});
  if (!async_thread_.joinable()) async_thread_ = std::thread([this] { AsyncLoop(); });
  cv_.notify_all();
  return false;
}

// The sync thread of MarkDurableAsync: one leader round per batch of waiters (sharing rounds
// with synchronous callers), callbacks outside the lock.
void RegionBitmap::AsyncLoop() {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !async_.empty(); });
    if (async_.empty()) return;  // stopping, nothing owed
    uint64_t need = 0;
    for (const AsyncWaiter& w : async_) need = std::max(need, w.need);
    if (failed_.ok() && durable_seq_ < need) {
      if (syncing_) {
        cv_.wait(lk);  // another leader's round may cover them
        continue;
      }
      SyncRoundLocked(lk);
    }
    std::vector<AsyncWaiter> ready;
    for (auto it = async_.begin(); it != async_.end();) {
      if (!failed_.ok() || it->need <= durable_seq_) {
        ready.push_back(std::move(*it));
        it = async_.erase(it);
      } else {
        ++it;
      }
    }
    const Status result = failed_;
    lk.unlock();
    for (AsyncWaiter& w : ready) w.done(result);
    lk.lock();
  }
}

Status RegionBitmap::BeginCopy(uint64_t offset, uint64_t length) {
  if (Status s = CheckRange(offset, length, "copy"); !s.ok()) return s;
  std::lock_guard lk(mu_);
  for (uint64_t i = offset / region_size_; i <= (offset + length - 1) / region_size_; ++i) {
    const uint8_t mask = static_cast<uint8_t>(1u << (i & 7));
    copying_[i >> 3] |= mask;
    remarked_[i >> 3] &= static_cast<uint8_t>(~mask);
  }
  return Status::Ok();
}

Status RegionBitmap::ClearCopied(uint64_t offset, uint64_t length) {
  if (Status s = CheckRange(offset, length, "clear"); !s.ok()) return s;
  const uint64_t end = offset + length;
  if (offset % region_size_ != 0 || (end % region_size_ != 0 && end != volume_size_)) {
    return Error(EINVAL, "region bitmap {}: clear [{}, +{}) is not aligned to {}-byte regions",
                 path_, offset, length, region_size_);
  }
  std::unique_lock lk(mu_);
  uint64_t need = 0;  // nothing cleared: nothing to wait for
  for (uint64_t i = offset / region_size_; i <= (end - 1) / region_size_; ++i) {
    const uint8_t mask = static_cast<uint8_t>(1u << (i & 7));
    const bool copying = copying_[i >> 3] & mask;
    const bool remarked = remarked_[i >> 3] & mask;
    copying_[i >> 3] &= static_cast<uint8_t>(~mask);
    remarked_[i >> 3] &= static_cast<uint8_t>(~mask);
    // Not begun: the copy may predate a write we never heard of. Re-marked: it does.
    if (!copying || remarked || !(bits_[i >> 3] & mask)) continue;
    bits_[i >> 3] &= static_cast<uint8_t>(~mask);
    const size_t page = static_cast<size_t>(i / kRegionsPerPage);
    page_seq_[page] = need = ++seq_;
    if (!page_queued_[page]) {
      page_queued_[page] = 1;
      changed_.push_back(page);
    }
  }
  return WaitDurable(lk, need);
}

std::vector<ByteRange> RegionBitmap::DirtyRanges() const {
  std::lock_guard lk(mu_);
  std::vector<ByteRange> out;
  for (uint64_t i = 0; i < regions_; ++i) {
    if (bits_[i >> 3] == 0 && (i & 7) == 0) {
      i += 7;  // a whole clear byte
      continue;
    }
    if (!TestBit(bits_, i)) continue;
    const uint64_t begin = i * region_size_;
    const uint64_t end = std::min(volume_size_, (i + 1) * region_size_);
    if (!out.empty() && out.back().offset + out.back().length == begin) {
      out.back().length += end - begin;
    } else {
      out.push_back({begin, end - begin});
    }
  }
  return out;
}

uint64_t RegionBitmap::dirty_bytes() const {
  uint64_t n = 0;
  for (const ByteRange& r : DirtyRanges()) n += r.length;
  return n;
}

bool RegionBitmap::IsDirty(uint64_t offset) const {
  if (offset >= volume_size_) return false;
  std::lock_guard lk(mu_);
  return TestBit(bits_, offset / region_size_);
}

void RegionBitmap::set_before_sync_hook(std::function<void()> hook) {
  std::lock_guard lk(mu_);
  before_sync_ = std::move(hook);
}

uint64_t RegionBitmap::syncs() const {
  std::lock_guard lk(mu_);
  return syncs_;
}

}  // namespace nbdcsi::replica
