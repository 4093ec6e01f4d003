// The daemons' log level at run time. One parser for every way a level is named (--log-level,
// the datapath's SetLogLevel, `nbdctl log-level`), and one control per process that changes the
// level, optionally for a while: operators turn on debug for ten minutes and forget it, so a
// timed change comes back by itself. nbd-datapathd drives it from its management API (Logging
// service); every daemon also takes SIGUSR1 (one step more verbose) and SIGUSR2 (one step less)
// through common/process.h's signal wait.
#pragma once

#include <spdlog/common.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/status.h"

namespace nbdcsi {

using LogLevel = spdlog::level::level_enum;

// The accepted names, most verbose first: trace, debug, info, warn, error.
const std::vector<std::string>& LogLevelNames();
// "trace, debug, info, warn or error", for help texts and error messages.
const std::string& LogLevelChoices();
// EINVAL naming the accepted values for anything else (spdlog's own from_str would silently
// answer "off").
StatusOr<LogLevel> ParseLogLevel(std::string_view name);
// The name ParseLogLevel takes back ("warn", where spdlog says "warning"); spdlog's own name
// ("critical", "off") for the two levels outside the five.
std::string LogLevelName(LogLevel level);

// The longest timed change: beyond a week the operator wants a permanent level, set as such.
inline constexpr std::chrono::milliseconds kMaxTimedLogLevel = std::chrono::hours(24 * 7);
// EINVAL unless 0 < d <= kMaxTimedLogLevel.
Status CheckLogLevelDuration(std::chrono::milliseconds d);

class LogLevelControl {
 public:
  using Clock = std::chrono::steady_clock;

  struct State {
    LogLevel level = spdlog::level::info;
    // Set while a timed change is pending: the level that comes back at revert_at.
    std::optional<LogLevel> revert_to;
    Clock::time_point revert_at{};
  };
  struct Change {
    LogLevel previous = spdlog::level::info;
    State now;
  };

  // `apply` makes a level take effect (spdlog's default logger for ProcessLogLevel(); tests
  // record it). It is called with the control's lock held, in the order the changes happen.
  // `now` is the time timed changes are measured on: the steady clock unless a test gives its
  // own (the timer thread then waits, in real time, for what `now` says is left, and looks at
  // `now` again at each Wake()).
  LogLevelControl(LogLevel initial, std::function<void(LogLevel)> apply,
                  std::function<Clock::time_point()> now = nullptr);
  ~LogLevelControl();  // Shutdown()
  LogLevelControl(const LogLevelControl&) = delete;
  LogLevelControl& operator=(const LogLevelControl&) = delete;

  State Get() const;
  // Sets `level` and logs the change with the old and new level and `who` asked ("api",
  // "SIGUSR1"). `duration` 0: until the next change (a pending revert is cancelled). Otherwise
  // (CheckLogLevelDuration) the level from before comes back when it ends; when a timed change
  // is already pending, that one's original level stays the one that comes back, so stacking
  // changes never leaves a temporary level in place. EINVAL for a bad duration, EAGAIN after
  // Shutdown(); nothing changes then.
  StatusOr<Change> Set(LogLevel level, std::chrono::milliseconds duration, std::string_view who);
  // One step along trace < debug < info < warn < error: `more_verbose` true goes towards trace.
  // Clamped at the ends; a level outside the five (critical, off) steps to the nearest end.
  // Like an untimed Set, it cancels a pending revert.
  Change Step(bool more_verbose, std::string_view who);
  // Cancels a pending revert (the level stays as it is) and stops the timer thread. Idempotent.
  void Shutdown();

  // For a test's own clock: it moved, the timer thread looks at it again.
  void Wake();
  // How many times the timer thread has looked at the state and the clock (and reverted when
  // due): a test that moved its clock and called Wake() waits for this to grow.
  uint64_t TimerPasses() const;

 private:
  void ApplyLocked(LogLevel level, std::string_view why);
  void TimerLoop();

  std::function<void(LogLevel)> apply_;
  std::function<Clock::time_point()> now_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  State state_;
  bool stopping_ = false;
  uint64_t timer_passes_ = 0;
  std::thread timer_;  // started by the first timed Set
};

// The process's control over spdlog's default logger, made on first use with spdlog's level at
// that time: set --log-level first. Never destroyed (threads may log to the end); the daemon
// calls Shutdown() when it stops.
LogLevelControl& ProcessLogLevel();

}  // namespace nbdcsi
