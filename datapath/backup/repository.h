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
//   PREFIX/config.json                only in an encrypted target (crypto.h): KDF, salt, key check.
//                                     Outside chunks/, manifests/ and leases/: no listing of
//                                     those, and so no collection, ever sees it.
//
// Encryption. A target is plain or encrypted, never both: Open settles which before anything
// else is read or written. A plain target (no config.json) refuses an encryption key once it
// holds a backup; an encrypted one refuses a request without its key (EINVAL) or with another
// key (EACCES "wrong encryption key for URL"). The first encrypted backup into an empty prefix
// writes config.json, reads it back and uses what it reads (two first backups racing end up on
// the one config written last; the other one's key check fails if its key differs). Because S3
// has no portable create-if-absent, every backup checks again after writing its manifest (write,
// then read, as for leases): an encrypted backup that finds config.json gone or changed, or a
// plain one that finds one, withdraws its manifest and fails with EAGAIN. In an encrypted target
// chunks are named by HMAC-SHA256(id key, content) and chunks and manifests are stored sealed
// (AES-256-GCM, crypto.h); the manifest's "sha256" fields then hold those HMACs.
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

#include "datapath/backup/crypto.h"
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
  // `prefix` without leading or trailing '/' ("" for the bucket's root). `encryption_key`: the
  // target's passphrase, empty for a plain target; it is never logged. `url` names the target in
  // messages (s3://BUCKET/PREFIX).
  Repository(ObjectStore& store, std::string prefix, LeaseTimes times = {},
             std::string encryption_key = {}, std::string url = {});
  ~Repository();

  // Settles whether the target is encrypted and derives its keys (one scrypt); the calls below
  // do it themselves when it has not been done. `create`: a backup, which may set up encryption
  // in a prefix that holds no backup yet. Errors, none of which writes anything:
  //   EINVAL  an encrypted target without a key; a key for a target that holds plain backups;
  //           an unreadable config.json
  //   EACCES  "wrong encryption key for URL"
  Status Open(bool create);
  bool encrypted() const { return state_ == State::kEncrypted || state_ == State::kKeyedEmpty; }

  // A chunk's name: the SHA-256 of its content, or in an encrypted target its HMAC.
  std::string ChunkName(std::string_view data) const;
  // The stored form of a chunk: zstd, sealed in an encrypted target.
  std::string EncodeChunk(const std::string& name, std::string_view data) const;
  // The content back, exactly `len` bytes, its name checked; EINVAL saying what is wrong.
  StatusOr<std::string> DecodeChunk(const std::string& name, std::string_view stored,
                                    uint64_t len) const;

  std::string ChunkKey(const std::string& sha256) const;
  std::string ManifestKey(const std::string& name) const;
  std::string ChunkPrefix() const { return Key("chunks/"); }
  std::string ManifestPrefix() const { return Key("manifests/"); }
  std::string LeasePrefix() const { return Key("leases/"); }
  std::string ConfigKey() const { return Key("config.json"); }
  ObjectStore& store() { return store_; }

  // Names of the backups (manifests) in this target, sorted. Also the first call of every
  // operation: a missing bucket, refused credentials or a dead endpoint fail here, clearly.
  StatusOr<std::vector<std::string>> ListNames();
  // ENOENT "backup NAME does not exist" when it has no manifest; EINVAL for a corrupt one.
  StatusOr<Manifest> Read(const std::string& name);
  Status Write(const Manifest& m);
  // A backup's commit point: Write, then the encryption check of the rule above; on a conflict
  // the manifest is deleted again and the result is EAGAIN.
  Status Commit(const Manifest& m);

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
  enum class State { kUnopened, kPlain, kEncrypted, kKeyedEmpty };
  std::string Key(const std::string& rest) const;
  std::string Url() const;
  Status Ensure() { return state_ == State::kUnopened ? Open(false) : Status::Ok(); }
  StatusOr<std::vector<std::string>> ListManifests();
  Status UseConfig(const std::string& text, bool just_written);
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
  std::string key_;  // the passphrase; wiped by the destructor
  std::string url_;
  State state_ = State::kUnopened;
  std::string config_text_;  // config.json as read when opened (encrypted targets)
  TargetKeys keys_;
};

}  // namespace nbdcsi::datapath::backup
