#include "tools/nbdctl/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "common/quantity.h"

namespace nbdcsi::nbdctl {

unsigned PercentOfAllocated(uint64_t done, uint64_t total) {
  if (total == 0 || done >= total) return 100;
  // long double: done * 100 overflows uint64_t past 184 PB.
  auto pct =
      static_cast<unsigned>(static_cast<long double>(done) * 100 / static_cast<long double>(total));
  return std::min(pct, 99u);
}

std::string FormatEta(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  auto s = static_cast<uint64_t>(std::ceil(seconds));
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}h{:02}m", s / 3600, s % 3600 / 60);
}

namespace {

double Seconds(ProgressClock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string Rate(double bytes_per_s) {
  return FormatHuman(static_cast<uint64_t>(std::max(bytes_per_s, 0.0))) + "/s";
}

}  // namespace

void CopyProgress::Add(const CopySample& s) {
  if (!first_) first_ = s;
  window_.push_back(s);
  // Keep one sample at or before the window's start, so the rate spans the whole window.
  while (window_.size() > 2 && s.at - window_[1].at >= kWindow) window_.pop_front();
}

std::optional<double> CopyProgress::Rate() const {
  if (window_.size() < 2) return std::nullopt;
  const auto& a = window_.front();
  const auto& b = window_.back();
  const double dt = Seconds(b.at - a.at);
  if (dt < 0.1) return std::nullopt;
  const double bytes = b.data_done >= a.data_done ? double(b.data_done - a.data_done) : 0.0;
  return bytes / dt;
}

std::string CopyProgress::Line(const std::string& what) const {
  if (window_.empty()) return what + ": waiting for the copy";
  const CopySample& last = window_.back();
  if (!last.data_total) {
    return fmt::format("{}: {} copied, counting allocated data", what, FormatHuman(last.data_done));
  }
  const uint64_t total = *last.data_total, done = std::min(last.data_done, total);
  std::string line = fmt::format("{}: {} of {} allocated data ({}%)", what, FormatHuman(done),
                                 FormatHuman(total), PercentOfAllocated(done, total));
  auto rate = Rate();
  if (done >= total) return line + ", syncing";
  if (!rate) return line;
  line += ", " + nbdctl::Rate(*rate);
  if (*rate > 0) line += ", ETA " + FormatEta(double(total - done) / *rate);
  return line;
}

std::string CopyProgress::DoneLine(const std::string& what, ProgressClock::time_point start,
                                   ProgressClock::time_point now, uint64_t allocated) const {
  const double dt = Seconds(now - start);
  if (window_.empty() || !window_.back().data_total) {
    // Done before a poll saw the data total: the result's allocation (which counts file system
    // metadata too) is all there is to say.
    return fmt::format("{}: done in {:.1f}s ({} allocated)", what, dt, FormatHuman(allocated));
  }
  const uint64_t total = *window_.back().data_total;
  std::string line =
      fmt::format("{}: done, {} of allocated data copied in {:.1f}s", what, FormatHuman(total), dt);
  if (dt >= 0.1) line += fmt::format(" ({})", nbdctl::Rate(double(total) / dt));
  return line;
}

ProgressSink::Mode ProgressSink::ModeFor(const std::string& output, int fd) {
  if (output == "json") return Mode::kOff;
  return isatty(fd) ? Mode::kTerminal : Mode::kPlain;
}

void ProgressSink::Update(const CopySample& s) {
  progress_.Add(s);
  switch (mode_) {
    case Mode::kOff:
      return;
    case Mode::kTerminal:
      if (last_shown_ && s.at - *last_shown_ < kTerminalEvery) return;
      // \r back to the start, \033[K erases what a longer previous line left behind.
      out_ << '\r' << progress_.Line(what_) << "\033[K" << std::flush;
      line_open_ = true;
      break;
    case Mode::kPlain:
      if (s.at - (last_shown_ ? *last_shown_ : start_) < kPlainEvery) return;
      out_ << progress_.Line(what_) << '\n' << std::flush;
      break;
  }
  last_shown_ = s.at;
}

void ProgressSink::Finish(bool ok, ProgressClock::time_point now, uint64_t allocated) {
  if (mode_ == Mode::kOff) return;
  if (ok && (mode_ == Mode::kTerminal || last_shown_)) {
    if (line_open_) out_ << '\r';
    out_ << progress_.DoneLine(what_, start_, now, allocated);
    if (line_open_) out_ << "\033[K";
    out_ << '\n' << std::flush;
  } else if (line_open_) {
    out_ << '\n' << std::flush;
  }
  line_open_ = false;
}

}  // namespace nbdcsi::nbdctl
