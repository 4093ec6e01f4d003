// An in-memory ObjectStore for the backup unit tests: a sorted map, a settable clock for
// LastModified (lease expiry without waiting), counters, and injected failures.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <mutex>

#include "datapath/backup/object_store.h"

namespace nbdcsi::datapath::backup {

class MemoryStore final : public ObjectStore {
 public:
  Status Put(const std::string& key, std::string_view data) override {
    {
      std::lock_guard lk(mu_);
      if (fail_puts_after >= 0 && puts_ >= static_cast<uint64_t>(fail_puts_after)) {
        return Error(EIO, "injected failure of PUT {}", key);
      }
      ++puts_;
      bytes_put_ += data.size();
      objects_[key] = {std::string(data), now_s.load()};
    }
    if (after_put) after_put(key);
    return Status::Ok();
  }
  StatusOr<std::string> Get(const std::string& key) override {
    std::lock_guard lk(mu_);
    auto it = objects_.find(key);
    if (it == objects_.end()) return Error(ENOENT, "no such object {}", key);
    return it->second.data;
  }
  StatusOr<ObjectInfo> Head(const std::string& key) override {
    std::lock_guard lk(mu_);
    auto it = objects_.find(key);
    if (it == objects_.end()) return Error(ENOENT, "no such object {}", key);
    return ObjectInfo{key, it->second.data.size(), it->second.modified};
  }
  StatusOr<std::vector<ObjectInfo>> List(const std::string& prefix) override {
    std::lock_guard lk(mu_);
    std::vector<ObjectInfo> out;
    for (auto it = objects_.lower_bound(prefix);
         it != objects_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
      out.push_back({it->first, it->second.data.size(), it->second.modified});
    }
    return out;
  }
  Status Delete(const std::string& key) override {
    std::lock_guard lk(mu_);
    objects_.erase(key);
    return Status::Ok();
  }

  // Test helpers.
  void Corrupt(const std::string& key, std::string data) {
    std::lock_guard lk(mu_);
    objects_.at(key).data = std::move(data);
  }
  // Every object, key and bytes (what an attacker with the bucket sees).
  std::map<std::string, std::string> All() {
    std::lock_guard lk(mu_);
    std::map<std::string, std::string> out;
    for (const auto& [k, o] : objects_) out[k] = o.data;
    return out;
  }
  size_t Count(const std::string& prefix) {
    auto l = List(prefix);
    return l->size();
  }
  uint64_t bytes_put() {
    std::lock_guard lk(mu_);
    return bytes_put_;
  }
  uint64_t puts() {
    std::lock_guard lk(mu_);
    return puts_;
  }

  std::atomic<int64_t> now_s{1'800'000'000};  // the server's clock, seconds
  int64_t fail_puts_after = -1;               // >= 0: every PUT after that many fails
  // Called after each successful PUT, outside the lock (a test's racer acts there).
  std::function<void(const std::string& key)> after_put;

 private:
  struct Obj {
    std::string data;
    int64_t modified = 0;
  };
  std::mutex mu_;
  std::map<std::string, Obj> objects_;
  uint64_t puts_ = 0, bytes_put_ = 0;
};

}  // namespace nbdcsi::datapath::backup
