// Waiting in tests for something another thread or process does. A fixed sleep followed by a
// check is either too short on a loaded machine (a flaky failure) or longer than needed (a slow
// suite); these wait exactly until the condition holds, with a deadline so that a broken
// condition fails the test instead of hanging it.
#pragma once

#include <sys/types.h>
#include <sys/wait.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace nbdcsi::test {

// Polls `done` until it returns true or `timeout` passes; returns its last answer. For state that
// nothing signals (a counter in another thread, a file, a process, a socket): the poll interval is
// the only sleep, and it never decides the outcome.
template <typename Pred>
bool WaitUntil(Pred&& done, std::chrono::milliseconds timeout = std::chrono::seconds(10),
               std::chrono::milliseconds poll = std::chrono::milliseconds(2)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return done();
    std::this_thread::sleep_for(poll);
  }
  return true;
}

// Reaps child `pid` once it has exited, within `timeout`: true with its waitpid status in
// *status; false when it is still running (not reaped: the caller decides to kill it).
inline bool WaitExited(pid_t pid, int* status,
                       std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  return WaitUntil([&] { return waitpid(pid, status, WNOHANG) == pid; }, timeout,
                   std::chrono::milliseconds(10));
}

// A one-shot event: one side Notify()s, the other Wait()s with a deadline. For fakes and hooks
// that can say "I got here" themselves.
class Event {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  bool Wait(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return set_; });
  }
  bool IsSet() {
    std::lock_guard<std::mutex> lock(mu_);
    return set_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

}  // namespace nbdcsi::test
