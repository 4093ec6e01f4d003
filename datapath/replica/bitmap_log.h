// BitmapLog: the target's OutOfSyncLog, one RegionBitmap file per out-of-sync replica (issue 16,
// "Resync"): DIR/NODE.e<EPOCH>.bitmap. A bitmap is made the first time a write misses its
// replica and lives until the replica is readmitted (Forget).
//
// Why the epoch is in the name: a bitmap only knows what this target wrote without the replica.
// Under another epoch another target may have written too, so a bitmap of an older epoch never
// stands for "everything the replica misses"; Open removes them, and a replica without a bitmap
// of the current epoch gets a full copy.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "datapath/replica/region_bitmap.h"
#include "datapath/replica/replica_set.h"

namespace nbdcsi::replica {

class BitmapLog final : public OutOfSyncLog {
 public:
  // Creates DIR (and its parents) when missing; removes bitmaps of other epochs; keeps and opens
  // those of `epoch` (a target reopened at the same epoch on this node after a restart).
  static StatusOr<std::unique_ptr<BitmapLog>> Open(const std::string& dir, uint64_t volume_size,
                                                   uint64_t epoch);

  void MarkOutOfSync(const std::string& node, uint64_t offset, uint64_t length,
                     Done done) override;

  // The bitmap of `node`, or null when it missed nothing at this epoch (or was never out).
  RegionBitmap* Find(const std::string& node);
  // The bitmap of `node`, made (all clear) when it has none.
  StatusOr<RegionBitmap*> Get(const std::string& node);
  // Removes the bitmap of `node` (readmitted: it misses nothing now).
  Status Forget(const std::string& node);
  // The volume grew (Target::Grow): bitmaps made from now on cover `size` bytes. EBUSY while any
  // bitmap exists (a replica is out of sync: its bitmap has the old size).
  Status Grow(uint64_t size);
  // Dirty bytes per node, for inspect.
  std::map<std::string, uint64_t> DirtyBytes();

 private:
  BitmapLog(std::string dir, uint64_t volume_size, uint64_t epoch)
      : dir_(std::move(dir)), volume_size_(volume_size), epoch_(epoch) {}
  std::string PathOf(const std::string& node) const;

  const std::string dir_;
  uint64_t volume_size_;  // under mu_
  const uint64_t epoch_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<RegionBitmap>> bitmaps_;
};

}  // namespace nbdcsi::replica
