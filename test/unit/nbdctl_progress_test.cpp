// `nbdctl --wait` progress (tools/nbdctl/progress.h): percent of allocated data, rate over a
// window, ETA, and what reaches the stream in each mode. A fixed clock: no sleeps.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>

#include "tools/nbdctl/progress.h"

namespace nbdcsi::nbdctl {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;

constexpr uint64_t kMiB = 1024 * 1024;
const ProgressClock::time_point kT0{};

CopySample At(std::chrono::milliseconds t, uint64_t done, std::optional<uint64_t> total) {
  return {.at = kT0 + t, .data_done = done, .data_total = total};
}

TEST(NbdctlProgress, PercentOfAllocated) {
  EXPECT_EQ(PercentOfAllocated(0, 100), 0u);
  EXPECT_EQ(PercentOfAllocated(37, 100), 37u);
  EXPECT_EQ(PercentOfAllocated(999, 1000), 99u) << "floor: 99.9 is not done";
  EXPECT_EQ(PercentOfAllocated(1000, 1000), 100u);
  EXPECT_EQ(PercentOfAllocated(1001, 1000), 100u);
  EXPECT_EQ(PercentOfAllocated(0, 0), 100u) << "a source without data has nothing left";
  // No overflow of done * 100 near the top of uint64_t.
  const uint64_t big = uint64_t{1} << 62;
  EXPECT_EQ(PercentOfAllocated(big / 2, big), 50u);
}

TEST(NbdctlProgress, PercentCountsAllocatedDataNotTheVirtualSize) {
  // A 1 TiB volume holding 100 MiB: 50 MiB copied is half done, whatever the address space.
  CopyProgress p;
  p.Add(At(0ms, 0, 100 * kMiB));
  p.Add(At(1000ms, 50 * kMiB, 100 * kMiB));
  EXPECT_THAT(p.Line("restore r"), HasSubstr("50 MiB of 100 MiB allocated data (50%)"));
}

TEST(NbdctlProgress, FormatEta) {
  EXPECT_EQ(FormatEta(0), "0s");
  EXPECT_EQ(FormatEta(44.2), "45s");
  EXPECT_EQ(FormatEta(185), "3m05s");
  EXPECT_EQ(FormatEta(7620), "2h07m");
  EXPECT_EQ(FormatEta(-1), "?");
  EXPECT_EQ(FormatEta(1.0 / 0.0), "?");
}

TEST(NbdctlProgress, RateAndEtaOverTheWindow) {
  CopyProgress p;
  EXPECT_FALSE(p.Rate());
  p.Add(At(0ms, 0, 400 * kMiB));
  EXPECT_FALSE(p.Rate()) << "one sample has no rate";
  p.Add(At(50ms, kMiB, 400 * kMiB));
  EXPECT_FALSE(p.Rate()) << "50 ms is too short to say";
  p.Add(At(2000ms, 200 * kMiB, 400 * kMiB));
  ASSERT_TRUE(p.Rate());
  EXPECT_DOUBLE_EQ(*p.Rate(), 100.0 * kMiB);
  EXPECT_EQ(p.Line("restore r"),
            "restore r: 200 MiB of 400 MiB allocated data (50%), 100 MiB/s, ETA 2s");
  // The copy slows down to 10 MiB/s: after the window has passed, the rate follows.
  for (int s = 3; s <= 12; ++s) p.Add(At(s * 1000ms, 200 * kMiB + (s - 2) * 10 * kMiB, 400 * kMiB));
  ASSERT_TRUE(p.Rate());
  EXPECT_NEAR(*p.Rate(), 10.0 * kMiB, 0.5 * kMiB);
  EXPECT_THAT(p.Line("restore r"), HasSubstr("(75%), 10 MiB/s, ETA 10s"));
}

TEST(NbdctlProgress, LinesBeforeTheTotalIsKnownAndWhileSyncing) {
  CopyProgress p;
  EXPECT_EQ(p.Line("clone c"), "clone c: waiting for the copy");
  p.Add(At(0ms, 0, std::nullopt));
  EXPECT_EQ(p.Line("clone c"), "clone c: 0 B copied, counting allocated data");
  p.Add(At(1000ms, 64 * kMiB, 64 * kMiB));
  EXPECT_EQ(p.Line("clone c"), "clone c: 64 MiB of 64 MiB allocated data (100%), syncing");
}

TEST(NbdctlProgress, DoneLine) {
  CopyProgress p;
  p.Add(At(0ms, 0, 30 * kMiB));
  p.Add(At(1000ms, 30 * kMiB, 30 * kMiB));
  EXPECT_EQ(p.DoneLine("restore r", kT0, kT0 + 2000ms, 999),
            "restore r: done, 30 MiB of allocated data copied in 2.0s (15 MiB/s)");
  // Done before a poll saw the total: no claim about data, the result's allocation instead.
  CopyProgress none;
  EXPECT_EQ(none.DoneLine("restore r", kT0, kT0 + 80ms, 4 * kMiB),
            "restore r: done in 0.1s (4 MiB allocated)");
}

TEST(NbdctlProgress, ModeForOutput) {
  EXPECT_EQ(ProgressSink::ModeFor("json", 2), ProgressSink::Mode::kOff);
  // A pipe is never a terminal.
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  EXPECT_EQ(ProgressSink::ModeFor("table", fds[1]), ProgressSink::Mode::kPlain);
  EXPECT_EQ(ProgressSink::ModeFor("json", fds[1]), ProgressSink::Mode::kOff);
  close(fds[0]);
  close(fds[1]);
}

TEST(NbdctlProgress, TerminalRewritesOneLineAndEndsWithTheSummary) {
  std::ostringstream out;
  ProgressSink sink(ProgressSink::Mode::kTerminal, out, "restore r", kT0);
  sink.Update(At(0ms, 0, 100 * kMiB));
  sink.Update(At(100ms, 10 * kMiB, 100 * kMiB));  // within 200 ms of the last: not drawn
  sink.Update(At(1000ms, 50 * kMiB, 100 * kMiB));
  sink.Finish(true, kT0 + 2000ms, 0);
  const std::string s = out.str();
  EXPECT_EQ(std::count(s.begin(), s.end(), '\r'), 3) << s;
  EXPECT_EQ(std::count(s.begin(), s.end(), '\n'), 1) << "one line in the end: " << s;
  EXPECT_THAT(s, HasSubstr("\rrestore r: 50 MiB of 100 MiB allocated data (50%)"));
  EXPECT_THAT(s, Not(HasSubstr("10 MiB of")));
  EXPECT_THAT(s, HasSubstr("\rrestore r: done, 100 MiB of allocated data copied in 2.0s"));
  EXPECT_EQ(s.back(), '\n');
}

TEST(NbdctlProgress, TerminalEndsTheLineBeforeAnError) {
  std::ostringstream out;
  ProgressSink sink(ProgressSink::Mode::kTerminal, out, "restore r", kT0);
  sink.Update(At(0ms, 0, 100 * kMiB));
  sink.Finish(false, kT0 + 1000ms, 0);
  EXPECT_THAT(out.str(), Not(HasSubstr("done")));
  EXPECT_EQ(out.str().back(), '\n');
}

TEST(NbdctlProgress, PlainLinesEveryFiveSecondsAndNothingForAShortCopy) {
  std::ostringstream quick;
  ProgressSink q(ProgressSink::Mode::kPlain, quick, "restore r", kT0);
  q.Update(At(0ms, 0, 100 * kMiB));
  q.Update(At(3000ms, 90 * kMiB, 100 * kMiB));
  q.Finish(true, kT0 + 4000ms, 0);
  EXPECT_EQ(quick.str(), "") << "a wait under 5 s stays quiet when stderr is not a terminal";

  std::ostringstream slow;
  ProgressSink p(ProgressSink::Mode::kPlain, slow, "restore r", kT0);
  for (int t = 0; t <= 12000; t += 100) p.Update(At(t * 1ms, t * kMiB / 100, 200 * kMiB));
  p.Finish(true, kT0 + 13000ms, 0);
  const std::string s = slow.str();
  EXPECT_EQ(s.find('\r'), std::string::npos) << "no rewriting on a log";
  EXPECT_EQ(std::count(s.begin(), s.end(), '\n'), 3) << "at 5 s, 10 s, and done: " << s;
  EXPECT_THAT(s, HasSubstr("restore r: 50 MiB of 200 MiB allocated data (25%)"));
  EXPECT_THAT(s, HasSubstr("restore r: done, 200 MiB"));
}

TEST(NbdctlProgress, OffWritesNothing) {
  std::ostringstream out;
  ProgressSink sink(ProgressSink::Mode::kOff, out, "restore r", kT0);
  for (int t = 0; t <= 12000; t += 100) sink.Update(At(t * 1ms, t, 12000));
  sink.Finish(true, kT0 + 13s, 0);
  EXPECT_EQ(out.str(), "");
}

}  // namespace
}  // namespace nbdcsi::nbdctl
