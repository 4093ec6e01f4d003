// One per-name in-flight guard for every layer: the CSI services (a second concurrent call on the
// same volume id is ABORTED, as the spec asks), the datapath API, the attachment manager and the
// pool (which waits instead of refusing). A guard holds one or several names; several names are
// taken all at once or not at all, so two operations naming the same pair in opposite roles
// (snapshot S of V, restore V from S) can neither deadlock nor half-acquire.
//
// Names are plain strings; callers that keep separate namespaces in one NameLocks prefix them
// (e.g. "volume/" and "snapshot/").
#pragma once

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace nbdcsi {

class NameLocks {
 public:
  class Guard {
   public:
    Guard(Guard&& o) noexcept : owner_(std::exchange(o.owner_, nullptr)), names_(std::move(o.names_)) {}
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    Guard& operator=(Guard&&) = delete;
    ~Guard() {
      if (owner_) owner_->Release(names_);
    }
    const std::vector<std::string>& names() const { return names_; }

   private:
    friend class NameLocks;
    Guard(NameLocks* owner, std::vector<std::string> names)
        : owner_(owner), names_(std::move(names)) {}
    NameLocks* owner_;
    std::vector<std::string> names_;
  };

  // nullopt when any of `names` is held by another guard (nothing is taken then).
  std::optional<Guard> TryAcquireAll(std::vector<std::string> names) {
    std::lock_guard lock(mu_);
    if (AnyHeldLocked(names)) return std::nullopt;
    return TakeLocked(std::move(names));
  }
  std::optional<Guard> TryAcquire(const std::string& name) {
    return TryAcquireAll({name});
  }

  // Waits until none of `names` is held, then takes them all.
  Guard AcquireAll(std::vector<std::string> names) {
    std::unique_lock lock(mu_);
    released_.wait(lock, [&] { return !AnyHeldLocked(names); });
    return TakeLocked(std::move(names));
  }
  Guard Acquire(const std::string& name) { return AcquireAll({name}); }

  bool held(const std::string& name) const {
    std::lock_guard lock(mu_);
    return held_.count(name) > 0;
  }

 private:
  bool AnyHeldLocked(const std::vector<std::string>& names) const {
    return std::any_of(names.begin(), names.end(),
                       [&](const std::string& n) { return held_.count(n) > 0; });
  }
  Guard TakeLocked(std::vector<std::string> names) {
    // The same name twice in one request is one name (a clone whose source is itself is refused
    // by its caller, but the guard must not deadlock on it).
    std::sort(names.begin(), names.end());
    names.erase(std::unique(names.begin(), names.end()), names.end());
    held_.insert(names.begin(), names.end());
    return Guard(this, std::move(names));
  }
  void Release(const std::vector<std::string>& names) {
    {
      std::lock_guard lock(mu_);
      for (const auto& n : names) held_.erase(n);
    }
    released_.notify_all();
  }

  mutable std::mutex mu_;
  std::condition_variable released_;
  std::set<std::string> held_;
};

}  // namespace nbdcsi
