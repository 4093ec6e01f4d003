// Per-id in-flight tracking: a second concurrent call on the same volume or snapshot id must get
// ABORTED (CSI spec), not wait and not race. Services take a guard per id in a thin decorator and
// call an inner implementation that does no locking of its own.
#pragma once

#include <mutex>
#include <optional>
#include <set>
#include <string>

namespace nbdcsi::csi {

class InFlight {
 public:
  class Guard {
   public:
    Guard(Guard&& o) noexcept : owner_(o.owner_), key_(std::move(o.key_)) { o.owner_ = nullptr; }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    Guard& operator=(Guard&&) = delete;
    ~Guard() {
      if (owner_) owner_->Release(key_);
    }

   private:
    friend class InFlight;
    Guard(InFlight* owner, std::string key) : owner_(owner), key_(std::move(key)) {}
    InFlight* owner_;
    std::string key_;
  };

  // nullopt when `key` is already held by another call.
  std::optional<Guard> TryAcquire(const std::string& key) {
    std::lock_guard lock(mu_);
    if (!held_.insert(key).second) return std::nullopt;
    return Guard(this, key);
  }

 private:
  void Release(const std::string& key) {
    std::lock_guard lock(mu_);
    held_.erase(key);
  }
  std::mutex mu_;
  std::set<std::string> held_;
};

}  // namespace nbdcsi::csi
