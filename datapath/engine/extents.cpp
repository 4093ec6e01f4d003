#include "datapath/engine/extents.h"

#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include "datapath/nbd/proto.h"

namespace nbdcsi::datapath {
namespace {

constexpr uint32_t kHole = nbd::kStateHole | nbd::kStateZero;
constexpr uint32_t kZero = nbd::kStateZero;  // allocated, reads as zeroes
constexpr uint32_t kData = 0;

class ExtentSink {
 public:
  ExtentSink(nbd::Extent* out, size_t max) : out_(out), max_(max) {}
  bool full() const { return closed_; }
  size_t count() const { return n_; }
  // Appends [len bytes of `flags`], merging with the previous extent of the same kind. Once
  // an extent did not fit, nothing more is taken: the reply must stay contiguous from its start.
  void Add(uint64_t len, uint32_t flags) {
    if (!len || closed_) return;
    if (n_ > 0 && out_[n_ - 1].flags == flags) {
      out_[n_ - 1].length += static_cast<uint32_t>(len);
    } else if (n_ < max_) {
      out_[n_++] = nbd::Extent{static_cast<uint32_t>(len), flags};
    } else {
      closed_ = true;
    }
  }

 private:
  nbd::Extent* out_;
  size_t max_;
  size_t n_ = 0;
  bool closed_ = false;
};

// A range that SEEK_DATA/SEEK_HOLE calls a hole reads as zeroes, but it may still be allocated:
// FALLOC_FL_ZERO_RANGE (WRITE_ZEROES with NO_HOLE) leaves unwritten extents, which both ext4
// and XFS report as holes to lseek. base:allocation should say "allocated, zero" for those
// (future writes there cannot hit ENOSPC), so FIEMAP refines the HOLE bit. It never turns a
// hole into data: zero-ness comes from lseek, which also accounts for dirty page cache.
void AddHoleRange(int fd, uint64_t start, uint64_t end, ExtentSink& sink) {
  constexpr uint32_t kBatch = 32;
  alignas(fiemap) std::array<uint8_t, sizeof(fiemap) + kBatch * sizeof(fiemap_extent)> buf;
  auto* fm = reinterpret_cast<fiemap*>(buf.data());
  uint64_t pos = start;
  while (pos < end && !sink.full()) {
    std::fill(buf.begin(), buf.end(), 0);
    fm->fm_start = pos;
    fm->fm_length = end - pos;
    fm->fm_extent_count = kBatch;
    if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0 || fm->fm_mapped_extents == 0) break;
    for (uint32_t i = 0; i < fm->fm_mapped_extents && pos < end; ++i) {
      const fiemap_extent& e = fm->fm_extents[i];
      uint64_t es = std::max<uint64_t>(e.fe_logical, pos);
      uint64_t ee = std::min<uint64_t>(e.fe_logical + e.fe_length, end);
      if (ee <= es) continue;
      sink.Add(es - pos, kHole);
      sink.Add(ee - es, kZero);
      pos = ee;
    }
    const fiemap_extent& last = fm->fm_extents[fm->fm_mapped_extents - 1];
    if (last.fe_flags & FIEMAP_EXTENT_LAST) break;
    if (fm->fm_mapped_extents < kBatch) break;
  }
  sink.Add(end - std::min(pos, end), kHole);
}

}  // namespace

int MapExtents(int fd, uint64_t offset, uint32_t length, nbd::Extent* out, size_t max_extents,
               bool req_one) {
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  ExtentSink sink(out, req_one ? 1 : max_extents);
  while (pos < end && !sink.full()) {
    // Where does the data at or after `pos` start? ENXIO: no data until EOF.
    off_t data = lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0 && errno != ENXIO) return -errno;
    uint64_t next;
    if (data < 0 || static_cast<uint64_t>(data) > pos) {
      next = data < 0 ? end : std::min<uint64_t>(static_cast<uint64_t>(data), end);
      AddHoleRange(fd, pos, next, sink);
    } else {
      off_t hole = lseek(fd, static_cast<off_t>(pos), SEEK_HOLE);
      if (hole < 0) return -errno;
      next = std::min<uint64_t>(static_cast<uint64_t>(hole), end);
      sink.Add(next - pos, kData);
    }
    if (next <= pos) break;  // defensive: the file changed under us; report what we have
    pos = next;
    if (req_one) break;
  }
  return static_cast<int>(sink.count());
}

}  // namespace nbdcsi::datapath
