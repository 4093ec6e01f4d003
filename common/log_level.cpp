#include "common/log_level.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "common/duration.h"

namespace nbdcsi {

const std::vector<std::string>& LogLevelNames() {
  static const std::vector<std::string> kNames = {"trace", "debug", "info", "warn", "error"};
  return kNames;
}

const std::string& LogLevelChoices() {
  static const std::string kChoices = "trace, debug, info, warn or error";
  return kChoices;
}

StatusOr<LogLevel> ParseLogLevel(std::string_view name) {
  // The order of LogLevelNames() is spdlog's own, trace (0) to error (4).
  const auto& names = LogLevelNames();
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<LogLevel>(spdlog::level::trace + i);
  }
  return Error(EINVAL, "log level \"{}\": want {}", name, LogLevelChoices());
}

std::string LogLevelName(LogLevel level) {
  // spdlog calls warn "warning": answer with the name the parser takes back.
  const auto& names = LogLevelNames();
  if (level >= spdlog::level::trace && level <= spdlog::level::err) return names[level];
  const auto sv = spdlog::level::to_string_view(level);
  return std::string(sv.data(), sv.size());
}

Status CheckLogLevelDuration(std::chrono::milliseconds d) {
  if (d.count() <= 0) return Error(EINVAL, "duration must be greater than 0");
  if (d > kMaxTimedLogLevel) {
    return Error(EINVAL, "duration {} is longer than {}: set the level without one instead",
                 FormatDuration(d), FormatDuration(kMaxTimedLogLevel));
  }
  return Status::Ok();
}

LogLevelControl::LogLevelControl(LogLevel initial, std::function<void(LogLevel)> apply,
                                 std::function<Clock::time_point()> now)
    : apply_(std::move(apply)), now_(now ? std::move(now) : [] { return Clock::now(); }) {
  state_.level = initial;
}

LogLevelControl::~LogLevelControl() { Shutdown(); }

LogLevelControl::State LogLevelControl::Get() const {
  std::lock_guard lk(mu_);
  return state_;
}

void LogLevelControl::ApplyLocked(LogLevel level, std::string_view why) {
  const LogLevel old = state_.level;
  state_.level = level;
  // The line goes out while the more verbose of the two levels is in force, so that it is seen
  // whichever way the level moves; at warn when neither level shows info.
  const LogLevel verbose = std::min(old, level);
  const LogLevel msg = verbose <= spdlog::level::info ? spdlog::level::info : spdlog::level::warn;
  auto log = [&] {
    spdlog::log(msg, "log level {} -> {} ({})", LogLevelName(old), LogLevelName(level), why);
  };
  if (level < old) {
    apply_(level);
    log();
  } else {
    log();
    apply_(level);
  }
}

StatusOr<LogLevelControl::Change> LogLevelControl::Set(LogLevel level,
                                                       std::chrono::milliseconds duration,
                                                       std::string_view who) {
  if (duration.count() != 0) {
    if (Status s = CheckLogLevelDuration(duration); !s.ok()) return s;
  }
  std::lock_guard lk(mu_);
  if (stopping_) return Error(EAGAIN, "the daemon is shutting down");
  Change c;
  c.previous = state_.level;
  if (duration.count() == 0) {
    state_.revert_to.reset();
    ApplyLocked(level, who);
  } else {
    if (!state_.revert_to) state_.revert_to = state_.level;
    state_.revert_at = now_() + duration;
    if (!timer_.joinable()) timer_ = std::thread([this] { TimerLoop(); });
    ApplyLocked(level, fmt::format("{}; for {}, then back to {}", who, FormatDuration(duration),
                                   LogLevelName(*state_.revert_to)));
  }
  cv_.notify_all();
  c.now = state_;
  return c;
}

LogLevelControl::Change LogLevelControl::Step(bool more_verbose, std::string_view who) {
  std::lock_guard lk(mu_);
  Change c;
  c.previous = state_.level;
  const int cur = std::min<int>(state_.level, spdlog::level::err);
  const int next = more_verbose ? std::max<int>(spdlog::level::trace, cur - 1)
                                : std::min<int>(spdlog::level::err, cur + 1);
  state_.revert_to.reset();
  ApplyLocked(static_cast<LogLevel>(next), who);
  cv_.notify_all();
  c.now = state_;
  return c;
}

void LogLevelControl::TimerLoop() {
  std::unique_lock lk(mu_);
  while (!stopping_) {
    if (state_.revert_to && now_() >= state_.revert_at) {
      const LogLevel back = *state_.revert_to;
      state_.revert_to.reset();
      ApplyLocked(back, "the timed change is over");
    }
    ++timer_passes_;
    if (!state_.revert_to) {
      cv_.wait(lk);
    } else {
      cv_.wait_for(lk, state_.revert_at - now_());
    }
  }
}

void LogLevelControl::Wake() {
  std::lock_guard lk(mu_);
  cv_.notify_all();
}

uint64_t LogLevelControl::TimerPasses() const {
  std::lock_guard lk(mu_);
  return timer_passes_;
}

void LogLevelControl::Shutdown() {
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
    state_.revert_to.reset();
  }
  cv_.notify_all();
  if (timer_.joinable()) timer_.join();
}

LogLevelControl& ProcessLogLevel() {
  // Leaked on purpose: a thread may still log, or a signal step, after main returns.
  static LogLevelControl* const control =
      new LogLevelControl(spdlog::get_level(), [](LogLevel l) { spdlog::set_level(l); });
  return *control;
}

}  // namespace nbdcsi
