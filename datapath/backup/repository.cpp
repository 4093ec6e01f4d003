#include "datapath/backup/repository.h"

#include <openssl/crypto.h>
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
// An encrypted manifest is decompressed after it was authenticated; this only bounds memory
// (a 1 TiB volume in 4 MiB chunks makes about 30 MB of manifest).
constexpr uint64_t kMaxManifestBytes = uint64_t{256} << 20;

std::string ChunkAad(const std::string& name) { return "chunk:" + name; }
std::string ManifestAad(const std::string& name) { return "manifest:" + name; }

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

Repository::Repository(ObjectStore& store, std::string prefix, LeaseTimes times,
                       std::string encryption_key, std::string url)
    : store_(store),
      prefix_(std::move(prefix)),
      times_(times),
      key_(std::move(encryption_key)),
      url_(std::move(url)) {}

Repository::~Repository() {
  if (!key_.empty()) OPENSSL_cleanse(key_.data(), key_.size());
}

std::string Repository::Key(const std::string& rest) const {
  return prefix_.empty() ? rest : prefix_ + "/" + rest;
}

std::string Repository::Url() const {
  return url_.empty() ? fmt::format("target prefix \"{}\"", prefix_) : url_;
}

// ---- Encryption (the rule is in repository.h) ----

Status Repository::UseConfig(const std::string& text, bool just_written) {
  auto c = ParseEncryptionConfig(text);
  if (!c.ok()) return Error(EINVAL, "{}: {}: {}", Url(), ConfigKey(), c.status().message());
  Status s = keys_.Derive(*c, key_);
  if (s.code() == EACCES) {
    return Error(EACCES, "wrong encryption key for {}{}", Url(),
                 just_written ? " (another backup set up its encryption at the same moment, "
                                "with another key)"
                              : "");
  }
  if (!s.ok()) return Error(s.code(), "{}: {}", Url(), s.message());
  config_text_ = text;
  state_ = State::kEncrypted;
  return Status::Ok();
}

Status Repository::Open(bool create) {
  if (state_ == State::kPlain || state_ == State::kEncrypted) return Status::Ok();
  auto cfg = store_.Get(ConfigKey());
  if (cfg.ok()) {
    if (key_.empty()) {
      return Error(EINVAL, "{} is encrypted: give its encryption key", Url());
    }
    return UseConfig(*cfg, false);
  }
  if (cfg.status().code() != ENOENT) return cfg.status();
  // No config: a plain target, or an empty one.
  if (key_.empty()) {
    state_ = State::kPlain;
    return Status::Ok();
  }
  auto names = ListManifests();  // a missing bucket fails here, clearly
  if (!names.ok()) return names.status();
  if (!names->empty()) {
    return Error(EINVAL,
                 "{} holds unencrypted backups (\"{}\"): it takes no encryption key; use "
                 "another prefix for encrypted backups",
                 Url(), names->front());
  }
  if (!create) {
    state_ = State::kKeyedEmpty;  // nothing to decrypt yet, and nothing is written
    return Status::Ok();
  }
  // The first encrypted backup: write the config, then read it back and use what is there.
  auto fresh = TargetKeys::NewConfig(key_);
  if (!fresh.ok()) return Error(fresh.status().code(), "{}: {}", Url(), fresh.status().message());
  const std::string mine = EncryptionConfigToJson(*fresh);
  if (Status s = store_.Put(ConfigKey(), mine); !s.ok()) return s;
  auto back = store_.Get(ConfigKey());
  if (!back.ok()) return back.status();
  if (Status s = UseConfig(*back, *back != mine); !s.ok()) return s;
  // A plain first backup may have committed between the listing above and the put: it finds
  // the config at its own commit check and withdraws, unless its check came first. Then its
  // manifest is listed now, and the config (if it is still ours) goes again.
  names = ListManifests();
  if (!names.ok()) return names.status();
  for (const std::string& name : *names) {
    auto body = store_.Get(ManifestKey(name));
    if (body.ok() && ParseManifest(*body).ok()) {
      state_ = State::kUnopened;
      auto now = store_.Get(ConfigKey());
      if (now.ok() && *now == mine) (void)store_.Delete(ConfigKey());
      return Error(EAGAIN,
                   "{}: an unencrypted backup (\"{}\") was made while its encryption was being "
                   "set up; the target stays unencrypted",
                   Url(), name);
    }
  }
  spdlog::info("backup: {} is now an encrypted target ({})", Url(), ConfigKey());
  return Status::Ok();
}

std::string Repository::ChunkName(std::string_view data) const {
  return state_ == State::kEncrypted ? keys_.ChunkId(data) : Sha256Hex(data);
}

std::string Repository::EncodeChunk(const std::string& name, std::string_view data) const {
  std::string frame = Compress(data);
  return state_ == State::kEncrypted ? keys_.Seal(frame, ChunkAad(name)) : frame;
}

StatusOr<std::string> Repository::DecodeChunk(const std::string& name, std::string_view stored,
                                              uint64_t len) const {
  std::string plain_frame;
  if (state_ == State::kEncrypted) {
    auto u = keys_.Unseal(stored, ChunkAad(name));
    if (!u.ok()) return Error(EINVAL, "decryption: {}", u.status().message());
    plain_frame = std::move(*u);
    stored = plain_frame;
  } else if (state_ != State::kPlain) {
    return Error(EINVAL, "{} was not opened", Url());
  }
  auto data = Decompress(stored, len);
  if (!data.ok()) return data.status();
  std::string got = ChunkName(*data);
  if (got != name) {
    return Error(EINVAL, "its content {} to {}",
                 state_ == State::kEncrypted ? "has the HMAC" : "hashes", got);
  }
  return data;
}

std::string Repository::ChunkKey(const std::string& sha256) const {
  return Key("chunks/" + sha256.substr(0, 2) + "/" + sha256);
}

std::string Repository::ManifestKey(const std::string& name) const {
  return Key("manifests/" + name + std::string(kManifestSuffix));
}

StatusOr<std::vector<std::string>> Repository::ListNames() {
  if (Status s = Ensure(); !s.ok()) return s;
  return ListManifests();
}

StatusOr<std::vector<std::string>> Repository::ListManifests() {
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
  if (Status s = Ensure(); !s.ok()) return s;
  auto body = store_.Get(ManifestKey(name));
  if (!body.ok()) {
    if (body.status().code() != ENOENT) return body.status();
    // A missing key or a missing bucket: the listing tells them apart, clearly.
    if (auto names = ListNames(); !names.ok()) return names.status();
    return Error(ENOENT, "backup \"{}\" does not exist", name);
  }
  std::string text;
  if (state_ == State::kKeyedEmpty) {
    return Error(EAGAIN, "{}: backup \"{}\" appeared while the target was opened; retry", Url(),
                 name);
  } else if (state_ == State::kEncrypted) {
    auto u = keys_.Unseal(*body, ManifestAad(name));
    if (!u.ok()) {
      return Error(EINVAL, "backup \"{}\": its manifest cannot be decrypted: {}", name,
                   u.status().message());
    }
    auto t = DecompressUpTo(*u, kMaxManifestBytes);
    if (!t.ok()) return Error(EINVAL, "backup \"{}\": {}", name, t.status().message());
    text = std::move(*t);
  } else {
    text = std::move(*body);
  }
  auto m = ParseManifest(text);
  if (!m.ok()) return Error(EINVAL, "backup \"{}\": {}", name, m.status().message());
  if (m->name != name) {
    return Error(EINVAL, "backup \"{}\": its manifest names \"{}\"", name, m->name);
  }
  m->encrypted = state_ == State::kEncrypted;
  return m;
}

Status Repository::Write(const Manifest& m) {
  if (Status s = Ensure(); !s.ok()) return s;
  if (state_ == State::kKeyedEmpty) return Error(EINVAL, "{} was not opened for a backup", Url());
  const std::string json = ManifestToJson(m);
  if (state_ == State::kEncrypted) {
    return store_.Put(ManifestKey(m.name), keys_.Seal(Compress(json), ManifestAad(m.name)));
  }
  return store_.Put(ManifestKey(m.name), json);
}

Status Repository::Commit(const Manifest& m) {
  if (Status s = Write(m); !s.ok()) return s;
  // Written, then read (the rule in repository.h).
  auto cfg = store_.Get(ConfigKey());
  std::string conflict;
  if (state_ == State::kEncrypted) {
    if (!cfg.ok() && cfg.status().code() != ENOENT) {
      conflict =
          fmt::format("its encryption config could not be read back: {}", cfg.status().message());
    } else if (!cfg.ok() || *cfg != config_text_) {
      conflict =
          "its encryption config was replaced or removed meanwhile (another first backup "
          "raced this one)";
    }
  } else if (cfg.ok()) {
    conflict = "it became an encrypted target meanwhile";
  } else if (cfg.status().code() != ENOENT) {
    conflict =
        fmt::format("its encryption config could not be checked: {}", cfg.status().message());
  }
  if (conflict.empty()) return Status::Ok();
  Status d = store_.Delete(ManifestKey(m.name));
  return Error(EAGAIN, "backup \"{}\" in {}: {}; the backup was {}withdrawn: retry", m.name, Url(),
               conflict, d.ok() ? "" : "NOT (" + d.message() + ") ");
}

StatusOr<std::map<std::string, uint64_t>> Repository::ChunkSizes() {
  if (Status s = Ensure(); !s.ok()) return s;
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
  // The key is needed before anything is removed: the collection reads every manifest.
  if (Status s = Ensure(); !s.ok()) return s;
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
  if (Status s = Ensure(); !s.ok()) return s;
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
