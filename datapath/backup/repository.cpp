#include "datapath/backup/repository.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "datapath/backup/chunk.h"

namespace nbdcsi::datapath::backup {

namespace {

constexpr std::string_view kManifestSuffix = ".json";
constexpr size_t kSweepThreads = 4;

std::string Nonce() {
  std::random_device rd;
  uint64_t v = (uint64_t{rd()} << 32) ^ rd();
  return fmt::format("{:016x}", v);
}

std::string LeaseBody() {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return nlohmann::json{{"host", host}, {"pid", ::getpid()}}.dump();
}

}  // namespace

// ---- Lease ----

Lease::~Lease() {
  if (released_) return;
  Status s = store_.Delete(key_);
  if (!s.ok())
    spdlog::warn("backup: releasing lease {}: {} (it expires by itself)", key_, s.message());
}

Status Lease::Renew() {
  const auto send = std::chrono::steady_clock::now();
  if (Status s = store_.Put(key_, LeaseBody()); !s.ok()) return s;
  // The renewal counts only if it landed before the previous one could have expired.
  if (std::chrono::steady_clock::now() - sent_ >= times_.ttl - times_.margin) {
    return Error(EAGAIN, "backup: lease {} lost (a renewal took too long); giving up", key_);
  }
  sent_ = send;
  return Status::Ok();
}

Status Lease::Check() {
  const auto elapsed = std::chrono::steady_clock::now() - sent_;
  if (elapsed >= times_.ttl - times_.margin) {
    return Error(EAGAIN,
                 "backup: lease {} lost ({}s without a renewal, ttl {}s); giving up so a garbage "
                 "collection cannot race this operation",
                 key_, std::chrono::duration_cast<std::chrono::seconds>(elapsed).count(),
                 times_.ttl.count());
  }
  if (elapsed >= times_.ttl / 4) return Renew();
  return Status::Ok();
}

// ---- Repository ----

Repository::Repository(ObjectStore& store, std::string prefix, LeaseTimes times)
    : store_(store), prefix_(std::move(prefix)), times_(times) {}

std::string Repository::Key(const std::string& rest) const {
  return prefix_.empty() ? rest : prefix_ + "/" + rest;
}

std::string Repository::ChunkKey(const std::string& sha256) const {
  return Key("chunks/" + sha256.substr(0, 2) + "/" + sha256);
}

std::string Repository::ManifestKey(const std::string& name) const {
  return Key("manifests/" + name + std::string(kManifestSuffix));
}

StatusOr<std::vector<std::string>> Repository::ListNames() {
  const std::string prefix = ManifestPrefix();
  auto objects = store_.List(prefix);
  if (!objects.ok()) return objects.status();
  std::vector<std::string> names;
  for (const ObjectInfo& o : *objects) {
    std::string rest = o.key.substr(prefix.size());
    if (rest.size() <= kManifestSuffix.size() ||
        rest.compare(rest.size() - kManifestSuffix.size(), kManifestSuffix.size(),
                     kManifestSuffix) != 0) {
      continue;  // not ours
    }
    names.push_back(rest.substr(0, rest.size() - kManifestSuffix.size()));
  }
  std::sort(names.begin(), names.end());
  return names;
}

StatusOr<Manifest> Repository::Read(const std::string& name) {
  if (Status s = ValidateBackupName(name); !s.ok()) return s;
  auto body = store_.Get(ManifestKey(name));
  if (!body.ok()) {
    if (body.status().code() != ENOENT) return body.status();
    // A missing key or a missing bucket: the listing tells them apart, clearly.
    if (auto names = ListNames(); !names.ok()) return names.status();
    return Error(ENOENT, "backup \"{}\" does not exist", name);
  }
  auto m = ParseManifest(*body);
  if (!m.ok()) return Error(EINVAL, "backup \"{}\": {}", name, m.status().message());
  if (m->name != name) {
    return Error(EINVAL, "backup \"{}\": its manifest names \"{}\"", name, m->name);
  }
  return m;
}

Status Repository::Write(const Manifest& m) {
  return store_.Put(ManifestKey(m.name), ManifestToJson(m));
}

StatusOr<std::map<std::string, uint64_t>> Repository::ChunkSizes() {
  auto objects = store_.List(ChunkPrefix());
  if (!objects.ok()) return objects.status();
  std::map<std::string, uint64_t> out;
  for (const ObjectInfo& o : *objects) {
    std::string h = o.key.substr(o.key.rfind('/') + 1);
    if (IsSha256Hex(h)) out.emplace(std::move(h), o.size);
  }
  return out;
}

StatusOr<std::unique_ptr<Lease>> Repository::AcquireLease(const std::string& key) {
  std::unique_ptr<Lease> lease(new Lease(store_, key, times_));
  lease->sent_ = std::chrono::steady_clock::now();
  if (Status s = store_.Put(key, LeaseBody()); !s.ok()) {
    lease->released_ = true;
    return s;
  }
  auto head = store_.Head(key);
  if (!head.ok()) return head.status();
  lease->server_now_s_ = head->modified_unix_s;
  return lease;
}

StatusOr<std::vector<std::string>> Repository::LiveLeases(const std::string& kind,
                                                          const std::string& own, int64_t now_s,
                                                          std::vector<std::string>* expired) {
  auto objects = store_.List(LeasePrefix() + kind);
  if (!objects.ok()) return objects.status();
  std::vector<std::string> live;
  for (const ObjectInfo& o : *objects) {
    if (o.key == own) continue;
    if (now_s - o.modified_unix_s >= times_.ttl.count()) {
      if (expired) expired->push_back(o.key);
    } else {
      live.push_back(o.key);
    }
  }
  return live;
}

StatusOr<std::unique_ptr<Lease>> Repository::AcquireBackupLease(const std::string& backup_name) {
  const auto deadline = std::chrono::steady_clock::now() + times_.gc_wait;
  for (;;) {
    auto lease = AcquireLease(LeasePrefix() + "backup-" + backup_name + "-" + Nonce());
    if (!lease.ok()) return lease.status();
    auto gcs = LiveLeases("gc-", "", (*lease)->server_now_s_, nullptr);
    if (!gcs.ok()) return gcs.status();
    if (gcs->empty()) return lease;
    lease->reset();  // releases it: the collection must not wait for us either
    if (std::chrono::steady_clock::now() >= deadline) {
      return Error(EAGAIN,
                   "backup \"{}\": a garbage collection ({}) is running in this target; retry "
                   "when it has finished",
                   backup_name, gcs->front());
    }
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
}

StatusOr<GcResult> Repository::Delete(const std::string& name) {
  if (Status s = ValidateBackupName(name); !s.ok()) return s;
  auto head = store_.Head(ManifestKey(name));
  if (!head.ok()) {
    if (head.status().code() == ENOENT) {
      // A HEAD cannot tell a missing bucket from a missing key; the listing can.
      if (auto names = ListNames(); !names.ok()) return names.status();
      return Error(ENOENT, "backup \"{}\" does not exist", name);
    }
    return head.status();
  }
  // The commit point of a delete: from here the backup is gone, whatever happens to the chunks.
  if (Status s = store_.Delete(ManifestKey(name)); !s.ok()) return s;
  return Collect();
}

StatusOr<GcResult> Repository::Collect() {
  GcResult result;
  auto gc = AcquireLease(LeasePrefix() + "gc-" + Nonce());
  if (!gc.ok()) return gc.status();
  const int64_t now_s = (*gc)->server_now_s_;
  std::vector<std::string> expired;
  auto backups = LiveLeases("backup-", "", now_s, &expired);
  if (!backups.ok()) return backups.status();
  if (!backups->empty()) {
    result.deferred = true;
    result.deferred_by = backups->front();
    spdlog::info("backup gc: deferred, a backup is running ({})", result.deferred_by);
    return result;
  }
  if (auto gcs = LiveLeases("gc-", (*gc)->key(), now_s, &expired); !gcs.ok()) {
    return gcs.status();
  }
  if (on_gc_marking) on_gc_marking();

  auto marked = Mark();
  if (!marked.ok()) return marked.status();
  if (Status s = Sweep(*marked, **gc, result); !s.ok()) return s;
  for (const std::string& key : expired) {
    if (store_.Delete(key).ok()) ++result.stale_leases_deleted;
  }
  spdlog::info("backup gc: kept {} chunks, deleted {} ({} bytes), removed {} expired leases",
               result.chunks_kept, result.chunks_deleted, result.bytes_freed,
               result.stale_leases_deleted);
  return result;
}

// Mark. A manifest that cannot be read stops the collection: sweeping with an incomplete mark
// would delete chunks a backup still needs.
StatusOr<std::set<std::string>> Repository::Mark() {
  auto names = ListNames();
  if (!names.ok()) return names.status();
  std::set<std::string> marked;
  for (const std::string& name : *names) {
    auto m = Read(name);
    if (!m.ok()) {
      return Error(m.status().code(), "backup gc: stopped before deleting anything: {}",
                   m.status().message());
    }
    for (const ChunkRef& c : m->chunks) marked.insert(c.sha256);
  }
  return marked;
}

// Sweep, a few deletes at a time: one request per chunk, mostly waiting on the network.
Status Repository::Sweep(const std::set<std::string>& marked, Lease& gc, GcResult& result) {
  auto chunks = store_.List(ChunkPrefix());
  if (!chunks.ok()) return chunks.status();
  std::vector<const ObjectInfo*> doomed;
  for (const ObjectInfo& o : *chunks) {
    if (marked.count(o.key.substr(o.key.rfind('/') + 1))) {
      ++result.chunks_kept;
    } else {
      doomed.push_back(&o);
    }
  }
  std::mutex mu;  // guards the lease (not thread-safe), `first` and the counters
  std::atomic<size_t> next{0};
  Status first;
  auto sweep = [&] {
    for (size_t i; (i = next.fetch_add(1)) < doomed.size();) {
      {
        std::lock_guard lk(mu);
        if (!first.ok()) return;
        if (Status s = gc.Check(); !s.ok()) {
          first = s;
          return;
        }
      }
      Status s = store_.Delete(doomed[i]->key);
      std::lock_guard lk(mu);
      if (!s.ok()) {
        if (first.ok()) first = s;
        return;
      }
      ++result.chunks_deleted;
      result.bytes_freed += doomed[i]->size;
    }
  };
  {
    std::vector<std::thread> threads;
    for (size_t t = 1; t < std::min<size_t>(kSweepThreads, doomed.size()); ++t) {
      threads.emplace_back(sweep);
    }
    sweep();
    for (auto& t : threads) t.join();
  }
  return first;
}

}  // namespace nbdcsi::datapath::backup
