// What `nbdctl volume create --from-snapshot/--from-volume --wait` and `snapshot create --wait`
// show while a background copy runs: data copied, percent, rate and ETA, all counted in the
// source's ALLOCATED data (Volume.copy_data_*), not its virtual size. A sparse 1 TiB volume with
// 10 GiB of data takes as long as 10 GiB; a percentage of 1 TiB would race through the holes and
// then stall, and its ETA would be wrong by orders of magnitude.
//
// Where it goes (ProgressSink):
//   -o json          nothing: stdout carries the JSON, stderr only errors.
//   stderr a TTY     one line, rewritten in place (\r, erase to end of line) at most every
//                    200 ms, ended with a summary line when the copy is done.
//   otherwise        a plain line every 5 s (a log or CI output shows that a long wait is
//                    moving), nothing for a copy that ends sooner.
// The pieces are pure so that they are unit-tested without a terminal or a clock.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <ostream>
#include <string>

namespace nbdcsi::nbdctl {

using ProgressClock = std::chrono::steady_clock;

// One poll of the copy: data bytes copied, and the source's data bytes once the daemon knows
// them.
struct CopySample {
  ProgressClock::time_point at;
  uint64_t data_done = 0;
  std::optional<uint64_t> data_total;
};

// Floor of done/total in percent; 100 only when every data byte is copied (the daemon may still
// be syncing it); a source without data is 100 at once. done > total counts as total.
unsigned PercentOfAllocated(uint64_t done, uint64_t total);
// "45s", "3m05s", "2h07m"; negative or not finite: "?".
std::string FormatEta(double seconds);

// The rate over a sliding window of samples (the last 5 s), so a copy that slows down (a busy
// disk) shows its current speed and an ETA that follows it.
class CopyProgress {
 public:
  static constexpr std::chrono::seconds kWindow{5};

  void Add(const CopySample& s);
  // Bytes per second over the window; nullopt until two samples at least 100 ms apart.
  std::optional<double> Rate() const;
  // "restore vol-a: 96 MiB of 256 MiB allocated data (37%), 48 MiB/s, ETA 3s".
  // Before the daemon has mapped the source's data: "..., counting allocated data".
  std::string Line(const std::string& what) const;
  // When the copy is done: "restore vol-a: done, 256 MiB of allocated data copied in 5.3s
  // (48.3 MiB/s)", timed from `start`. A copy that ended before any poll saw its data total
  // says "done in 0.1s (4 MiB allocated)" with the result's `allocated` bytes instead.
  std::string DoneLine(const std::string& what, ProgressClock::time_point start,
                       ProgressClock::time_point now, uint64_t allocated) const;
  bool empty() const { return window_.empty(); }

 private:
  std::deque<CopySample> window_;
  std::optional<CopySample> first_;
};

// Writes CopyProgress lines to a stream as described at the top.
class ProgressSink {
 public:
  enum class Mode { kOff, kTerminal, kPlain };
  static constexpr std::chrono::milliseconds kTerminalEvery{200};
  static constexpr std::chrono::seconds kPlainEvery{5};

  // kOff for JSON output; else kTerminal when `fd` is a TTY, kPlain when not.
  static Mode ModeFor(const std::string& output, int fd);
  ProgressSink(Mode mode, std::ostream& out, std::string what, ProgressClock::time_point start)
      : mode_(mode), out_(out), what_(std::move(what)), start_(start) {}

  void Update(const CopySample& s);
  // The copy is done (ok) or the wait ended without it (not ok: the caller reports why; a
  // rewritten line is ended first so that the message starts on its own line).
  void Finish(bool ok, ProgressClock::time_point now, uint64_t allocated);

 private:
  Mode mode_;
  std::ostream& out_;
  std::string what_;
  ProgressClock::time_point start_;
  CopyProgress progress_;
  std::optional<ProgressClock::time_point> last_shown_;
  bool line_open_ = false;  // a terminal line without its newline yet
};

}  // namespace nbdcsi::nbdctl
