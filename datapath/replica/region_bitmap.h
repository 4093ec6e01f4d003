// RegionBitmap: the persistent dirty-region bitmap the target keeps for one out-of-sync replica
// (issue 16, "Resync"). Bit i covers bytes [i * region_size, (i + 1) * region_size) of the
// volume; a set bit means "this replica may miss writes in that region". A returning replica
// copies only the set regions (Resync, resync.h), and clears them once the copy is flushed.
//
// The contract the target relies on: MarkDurable(off, len) returns OK only when the bits of
// every region overlapping [off, off + len) are on disk (written and fdatasync'ed), so that a
// write acknowledged to the kernel without this replica is never forgotten, even across a crash
// of the target. When the bits were already durable, MarkDurable does no I/O at all (the common
// case: a replica is away and the same regions are written again and again). Concurrent callers
// share the work: one of them (the leader) writes every changed page and calls fdatasync once
// for everyone who waits (group commit).
//
// File layout (little-endian):
//   page 0 (4 KiB): the header: magic "NBDCSIRB", version, region size, volume size, region
//                   count, then a CRC-32C of those bytes; zero-filled to 4 KiB. Written once,
//                   at Create, never again.
//   pages 1..N:     the bits, 32768 regions per 4 KiB page, bit i of the bitmap is bit (i % 8)
//                   of byte i / 8. Bits past the last region are zero.
//
// Why a torn page write can never lose a durable bit, and why the bit pages carry no checksum:
// a page is rewritten whole, from an in-memory copy, by one writer at a time. Between two
// durable states a page changes in two ways only: Mark sets bits (not yet promised durable:
// the caller still waits for the fdatasync) and ClearCopied clears bits (whose loss only costs
// a second copy of the region). A bit that was durably set and is not being cleared is 1 in both
// the old and the new content of the page, so any mix of the two at any granularity (a torn
// sector, a torn page) still holds it. A checksum over the page would turn such a harmless mix
// into "corrupt", and the only safe answer to a corrupt bitmap is a full rebuild. The header is
// written once and is checksummed, so a wrong or damaged file is refused, never misread.
//
// After an I/O error the bitmap is failed for good (EIO from every later call that needs the
// disk): after a failed fdatasync the kernel may have dropped the dirty pages, so no later
// success could prove the earlier bits are on disk. The caller must then treat the replica as
// needing a full rebuild.
//
// Concurrent writes during a copy: BeginCopy(range) before reading the source, ClearCopied(range)
// after the destination flushed it. A Mark of a region between the two keeps that region's bit
// set (the copy may have read the data before that write), so a later pass copies it again.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"

namespace nbdcsi::replica {

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const ByteRange&) const = default;
};

class RegionBitmap {
 public:
  static constexpr uint64_t kDefaultRegionSize = 1 << 20;
  static constexpr size_t kPageSize = 4096;
  static constexpr uint32_t kVersion = 1;

  // Creates `path` (EEXIST if it exists) with every bit clear, fsyncs it and its directory.
  // region_size: a power of two, 4 KiB to 1 GiB; volume_size > 0. EINVAL otherwise.
  static StatusOr<std::unique_ptr<RegionBitmap>> Create(const std::string& path,
                                                        uint64_t volume_size,
                                                        uint64_t region_size = kDefaultRegionSize);
  // Opens an existing bitmap. EUCLEAN (naming the path and the field) for a file that is not
  // one (magic), a damaged header (checksum), an unknown version, sizes that disagree with the
  // file's length, or bits set past the last region; ENOENT if it does not exist.
  // expected_volume_size > 0: EINVAL when the bitmap was made for another volume size.
  static StatusOr<std::unique_ptr<RegionBitmap>> Open(const std::string& path,
                                                      uint64_t expected_volume_size = 0);
  ~RegionBitmap();
  RegionBitmap(const RegionBitmap&) = delete;
  RegionBitmap& operator=(const RegionBitmap&) = delete;

  // Sets the bits of every region overlapping [offset, offset + length) in memory only; Sync()
  // or a later MarkDurable makes them durable. EINVAL past the end of the volume or length 0.
  Status Mark(uint64_t offset, uint64_t length);
  // Mark, then returns once those bits are on disk. No I/O when they already were.
  Status MarkDurable(uint64_t offset, uint64_t length);
  // For callers that must not block (the engine's io threads): Mark, then true when the bits
  // were durable already (no callback, no I/O: the common case), else false and `done` runs
  // once, on the bitmap's own sync thread, when they are durable (OK) or the bitmap failed. An
  // error return (bad range, a failed bitmap) means no callback. `done` runs without the
  // bitmap's lock (it may call the bitmap again) and must not destroy the bitmap; the
  // destructor waits for every callback owed.
  StatusOr<bool> MarkDurableAsync(uint64_t offset, uint64_t length,
                                  std::function<void(const Status&)> done);
  // Every region of the volume (a new replica: everything to copy).
  Status MarkAllDurable();
  // Writes every page changed in memory and fdatasyncs (no I/O when nothing changed).
  Status Sync();

  // A copy of the regions inside [offset, offset + length) (region-aligned; the end may be the
  // volume's end) is about to read the source.
  Status BeginCopy(uint64_t offset, uint64_t length);
  // The copy begun by BeginCopy is flushed on the destination: clears (durably) the bits of its
  // regions, except those marked since BeginCopy. EINVAL for a range not region-aligned.
  Status ClearCopied(uint64_t offset, uint64_t length);

  // The dirty regions as merged byte runs, in order (the last run ends at the volume's end).
  std::vector<ByteRange> DirtyRanges() const;
  uint64_t dirty_bytes() const;
  bool IsDirty(uint64_t offset) const;

  uint64_t region_size() const { return region_size_; }
  uint64_t volume_size() const { return volume_size_; }
  uint64_t regions() const { return regions_; }
  const std::string& path() const { return path_; }

  // Test seam: called (on the syncing thread) right before each fdatasync of the bitmap file.
  void set_before_sync_hook(std::function<void()> hook);
  // Number of fdatasync calls made on the bit pages since open (tests and metrics).
  uint64_t syncs() const;

 private:
  RegionBitmap(std::string path, int fd, uint64_t volume_size, uint64_t region_size);
  Status CheckRange(uint64_t offset, uint64_t length, const char* what) const;
  // Under mu_: returns the sequence number the caller must see durable.
  uint64_t SetBitsLocked(uint64_t first, uint64_t last);
  Status WaitDurable(std::unique_lock<std::mutex>& lk, uint64_t need);
  void SyncRoundLocked(std::unique_lock<std::mutex>& lk);
  void AsyncLoop();
  bool TestBit(const std::vector<uint8_t>& v, uint64_t i) const {
    return (v[i >> 3] >> (i & 7)) & 1;
  }

  const std::string path_;
  const int fd_;
  const uint64_t volume_size_;
  const uint64_t region_size_;
  const uint64_t regions_;
  const size_t pages_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t> bits_;       // pages_ * kPageSize bytes: the pages as they should be
  std::vector<uint8_t> copying_;    // one bit per region: BeginCopy'd, not yet cleared
  std::vector<uint8_t> remarked_;   // one bit per region: marked since its BeginCopy
  std::vector<uint64_t> page_seq_;  // per page: the sequence of its last change
  std::vector<size_t> changed_;     // pages changed since the last write began
  std::vector<uint8_t> page_queued_;
  uint64_t seq_ = 0;          // bumped by every change of a page
  uint64_t durable_seq_ = 0;  // every change up to this is on disk
  bool syncing_ = false;      // a leader is writing and syncing
  Status failed_;             // sticky I/O error
  uint64_t syncs_ = 0;
  std::function<void()> before_sync_;
  struct AsyncWaiter {
    uint64_t need;
    std::function<void(const Status&)> done;
  };
  std::vector<AsyncWaiter> async_;  // guarded by mu_
  bool stop_ = false;               // guarded by mu_
  std::thread async_thread_;        // started by the first MarkDurableAsync that must wait
};

}  // namespace nbdcsi::replica
