// A backup target: the layout of one prefix of an object store, the leases that keep a garbage
// collection from racing a backup, and the collection itself.
//
// Layout under PREFIX (docs/design.md, "Backups"):
//   PREFIX/chunks/HH/SHA256           one zstd frame per distinct chunk (HH: the hash's first
//                                     two hex digits, so listings and servers spread the keys)
//   PREFIX/manifests/NAME.json        a backup; written after all its chunks: its presence is
//                                     the commit point
//   PREFIX/leases/backup-NAME-NONCE   a backup in progress
//   PREFIX/leases/gc-NONCE            a garbage collection in progress
//
// The GC safety rule. A backup reuses chunks that already exist, so a collection must never
// delete a chunk between a backup's decision to reuse it and that backup's manifest. Backups
// hold a "backup" lease for their whole run; a collection holds a "gc" lease. Each side first
// writes its own lease and only then lists the other side's (S3 is strongly consistent: a list
// sees every put that completed before it started). Of a backup and a collection that overlap,
// at least one therefore sees the other: the backup waits (and finally fails with EAGAIN) while
// a live gc lease exists, the collection deletes nothing while a live backup lease exists (the
// manifests it was asked to delete are gone; their chunks wait for the next collection).
// A lease is live while the store's clock says it was written less than ttl ago (its
// LastModified against the LastModified of the reader's own lease: one clock, the server's).
// Leases of crashed processes therefore expire by themselves. A holder renews its lease every
// ttl/4 and gives up (fails, never writes a manifest or deletes) as soon as ttl - margin has
// passed on its own monotonic clock since it sent the last renewal that succeeded: the server
// cannot have stamped that renewal before it was sent, so no reader can consider the lease dead
// while its holder still acts on it. Only the clocks' rates must agree, not their settings.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "datapath/backup/manifest.h"
#include "datapath/backup/object_store.h"

namespace nbdcsi::datapath::backup {

struct LeaseTimes {
  std::chrono::seconds ttl{600};
  // Head-room for LastModified's one-second granularity and clock-rate drift.
  std::chrono::seconds margin{60};
  // How long a backup waits for a running collection before it gives up with EAGAIN.
  std::chrono::seconds gc_wait{120};
};

class Repository;

// A lease this process holds. Destroying it releases it (best effort: an expired lease is as
// good as a deleted one).
class Lease {
 public:
  ~Lease();
  // Renews when ttl/4 has passed since the last renewal; EAGAIN ("lease lost") once the lease
  // may have expired in a reader's eyes. Call it before every action that relies on the lease.
  Status Check();
  const std::string& key() const { return key_; }

 private:
  friend class Repository;
  Lease(ObjectStore& store, std::string key, LeaseTimes times)
      : store_(store), key_(std::move(key)), times_(times) {}
  Status Renew();

  ObjectStore& store_;
  std::string key_;
  LeaseTimes times_;
  std::chrono::steady_clock::time_point sent_;  // when the last successful renewal was sent
  int64_t server_now_s_ = 0;                    // its LastModified
  bool released_ = false;
};

struct GcResult {
  bool deferred = false;     // a live backup lease was seen: nothing was swept
  std::string deferred_by;   // that lease's key
  uint64_t chunks_kept = 0;  // chunks some manifest references
  uint64_t chunks_deleted = 0;
  uint64_t bytes_freed = 0;
  uint64_t stale_leases_deleted = 0;
};

class Repository {
 public:
  // `prefix` without leading or trailing '/' ("" for the bucket's root).
  Repository(ObjectStore& store, std::string prefix, LeaseTimes times = {});

  std::string ChunkKey(const std::string& sha256) const;
  std::string ManifestKey(const std::string& name) const;
  std::string ChunkPrefix() const { return Key("chunks/"); }
  std::string ManifestPrefix() const { return Key("manifests/"); }
  std::string LeasePrefix() const { return Key("leases/"); }
  ObjectStore& store() { return store_; }

  // Names of the backups (manifests) in this target, sorted. Also the first call of every
  // operation: a missing bucket, refused credentials or a dead endpoint fail here, clearly.
  StatusOr<std::vector<std::string>> ListNames();
  // ENOENT "backup NAME does not exist" when it has no manifest; EINVAL for a corrupt one.
  StatusOr<Manifest> Read(const std::string& name);
  Status Write(const Manifest& m);

  // Every chunk present: its hash and its stored (compressed) size, from one listing.
  StatusOr<std::map<std::string, uint64_t>> ChunkSizes();

  // A backup lease: waits up to gc_wait while a live gc lease exists, then EAGAIN.
  StatusOr<std::unique_ptr<Lease>> AcquireBackupLease(const std::string& backup_name);

  // Removes the manifest (ENOENT if there is none), then collects.
  StatusOr<GcResult> Delete(const std::string& name);
  // Mark and sweep under a gc lease (see the rule at the top): marks every chunk a manifest
  // references, deletes every other chunk, and removes expired leases. Deferred, sweeping
  // nothing, while a live backup lease exists.
  StatusOr<GcResult> Collect();

  // Tests: called after the gc lease is written and the backup leases were checked, before the
  // manifests are listed; lets a test start a backup exactly there.
  std::function<void()> on_gc_marking;

 private:
  std::string Key(const std::string& rest) const;
  StatusOr<std::unique_ptr<Lease>> AcquireLease(const std::string& key);
  // Live leases whose key starts with PREFIX/leases/<kind>, other than `own`, judged against
  // the server time `now_s`. Expired ones are added to *expired.
  StatusOr<std::vector<std::string>> LiveLeases(const std::string& kind, const std::string& own,
                                                int64_t now_s, std::vector<std::string>* expired);
  // Collect's two phases: the chunks some manifest references, then every other chunk deleted
  // (counted into `result`) while the gc lease `gc` holds.
  StatusOr<std::set<std::string>> Mark();
  Status Sweep(const std::set<std::string>& marked, Lease& gc, GcResult& result);

  ObjectStore& store_;
  std::string prefix_;
  LeaseTimes times_;
};

}  // namespace nbdcsi::datapath::backup
