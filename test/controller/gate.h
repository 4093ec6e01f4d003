// Holds callers until the test lets them go: a call kept in flight on purpose, with no sleep.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace nbdcsi::test {

class Gate {
 public:
  // Waits while the gate is closed.
  void Pass() {
    std::unique_lock lock(mu_);
    ++waiting_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
    --waiting_;
  }
  // True once a caller waits in Pass (false after `timeout`).
  bool WaitForCaller(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return waiting_ > 0; });
  }
  void Close() { Set(false); }
  void Open() { Set(true); }

 private:
  void Set(bool open) {
    std::lock_guard lock(mu_);
    open_ = open;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
  int waiting_ = 0;
};

}  // namespace nbdcsi::test
