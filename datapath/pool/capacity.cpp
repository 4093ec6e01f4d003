// Capacity policy: how much may be provisioned (capacity x overcommit), what a create or resize
// may add, and what the pool reports about itself (Pool::Info, PoolInfo::provisionable).
#include <sys/statfs.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <limits>

#include "datapath/pool/pool_impl.h"

namespace nbdcsi::datapath {

namespace {

// capacity x ratio - provisioned, in long double so that neither the product nor the difference
// wraps; negative (overcommitted beyond the ratio, e.g. after the ratio was lowered) is 0.
long double RoomLeft(uint64_t capacity, double ratio, uint64_t provisioned) {
  return static_cast<long double>(capacity) * ratio - static_cast<long double>(provisioned);
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

// The pool file system's figures from one statvfs.
struct FsFigures {
  uint64_t size = 0, free = 0, reserve = 0;
};
StatusOr<FsFigures> ReadFs(const PoolOptions& o) {
  struct statvfs vfs{};
  if (statvfs(o.dir.c_str(), &vfs) != 0) return Sys(errno, "statvfs " + o.dir);
  FsFigures f;
  f.size = static_cast<uint64_t>(vfs.f_blocks) * vfs.f_frsize;
  f.free = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  f.reserve = static_cast<uint64_t>(static_cast<long double>(f.size) * o.free_reserve_ratio);
  return f;
}

// What the real free space still allows: (free - reserve) x ratio, 0 under the reserve.
long double FreeRoom(uint64_t free, uint64_t reserve, double ratio) {
  return free > reserve ? static_cast<long double>(free - reserve) * ratio : 0;
}

}  // namespace

uint64_t PoolInfo::provisionable() const {
  long double room = RoomLeft(capacity, overcommit_ratio, provisioned);
  if (reserve_applies) room = std::min(room, FreeRoom(free, free_reserve, overcommit_ratio));
  if (room >= static_cast<long double>(std::numeric_limits<uint64_t>::max())) {
    return std::numeric_limits<uint64_t>::max();
  }
  return room > 0 ? static_cast<uint64_t>(room) : 0;
}

StatusOr<Pool::Impl::Space> Pool::Impl::ReadSpace() const {
  // With a capacity override and no reserve, nothing here depends on the file system.
  if (opts.capacity_bytes && opts.free_reserve_ratio <= 0) return Space{opts.capacity_bytes};
  auto fs = ReadFs(opts);
  if (!fs.ok()) return fs.status();
  return Space{opts.capacity_bytes ? opts.capacity_bytes : fs->size, fs->free, fs->reserve};
}

uint64_t Pool::Impl::ProvisionedLocked() const {
  uint64_t sum = reserved;
  for (const auto& [n, e] : vols) sum += e.meta.size;
  return sum;
}

Status Pool::Impl::CheckCapacityLocked(const std::string& name, uint64_t extra,
                                       const Space& space) const {
  if (opts.free_reserve_ratio > 0) {
    const long double room = FreeRoom(space.free, space.reserve, opts.overcommit_ratio);
    if (room < static_cast<long double>(extra)) {
      return Error(ENOSPC,
                   "pool {} cannot provision {} more for volume {}: its file system has {} free "
                   "and keeps {} ({}% of its size) in reserve, so at most {} more may be "
                   "provisioned (overcommit {}); free space or delete volumes",
                   opts.dir, Bytes(extra), name, Bytes(space.free), Bytes(space.reserve),
                   opts.free_reserve_ratio * 100, Bytes(static_cast<uint64_t>(room)),
                   opts.overcommit_ratio);
    }
  }
  const uint64_t capacity = space.capacity;
  const uint64_t provisioned = ProvisionedLocked();
  if (RoomLeft(capacity, opts.overcommit_ratio, provisioned) < static_cast<long double>(extra)) {
    const long double limit = static_cast<long double>(capacity) * opts.overcommit_ratio;
    return Error(ENOSPC,
                 "pool {} cannot provision {} more for volume {}: {} already provisioned, the "
                 "limit is capacity {} x overcommit {} = {}",
                 opts.dir, Bytes(extra), name, Bytes(provisioned), Bytes(capacity),
                 opts.overcommit_ratio, Bytes(static_cast<uint64_t>(limit)));
  }
  return Status::Ok();
}

PoolInfo Pool::Info() {
  Impl& I = *impl_;
  PoolInfo info;
  info.dir = I.opts.dir;
  info.overcommit_ratio = I.opts.overcommit_ratio;
  if (auto fs = ReadFs(I.opts); fs.ok()) {
    info.free = fs->free;
    info.capacity = fs->size;
    info.free_reserve = fs->reserve;
    info.reserve_applies = I.opts.free_reserve_ratio > 0;
  }
  if (I.opts.capacity_bytes) info.capacity = I.opts.capacity_bytes;
  struct statfs sfs{};
  if (statfs(I.opts.dir.c_str(), &sfs) == 0) {
    info.fs_type = FsTypeName(static_cast<int64_t>(sfs.f_type));
  }
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
  for (const auto& [n, e] : I.vols) {  // lost, and not yet moved to `broken` by the watcher
    if (e.vol->data_lost()) info.broken_volumes.push_back(n + ": " + I.LostReason(n));
  }
  for (const auto& [n, why] : I.broken_snaps) {
    info.broken_volumes.push_back("snapshot/" + n + ": " + why);
  }
  return info;
}

}  // namespace nbdcsi::datapath
