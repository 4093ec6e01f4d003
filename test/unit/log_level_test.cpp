// The log level at run time: the one parser of level names and durations, the control's timed
// changes (revert, cancel by a later change, stacking, shutdown), the signal steps and the
// datapath's Logging service handlers. `nbdctl log-level`'s rendering: logging_render_test.
#include "common/log_level.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "common/duration.h"
#include "datapath/api/logging.grpc.pb.h"
#include "datapath/api/logging_service.h"

namespace nbdcsi {
namespace {

using namespace std::chrono_literals;
using spdlog::level::debug;
using spdlog::level::err;
using spdlog::level::info;
using spdlog::level::trace;
using spdlog::level::warn;

TEST(ParseLogLevel, AcceptsTheFiveNames) {
  const std::pair<const char*, LogLevel> cases[] = {
      {"trace", trace}, {"debug", debug}, {"info", info}, {"warn", warn}, {"error", err}};
  for (const auto& [name, want] : cases) {
    auto l = ParseLogLevel(name);
    ASSERT_TRUE(l.ok()) << name;
    EXPECT_EQ(*l, want) << name;
    EXPECT_EQ(LogLevelName(want), name);  // spdlog's own name for warn is "warning"
  }
  EXPECT_EQ(LogLevelNames().size(), 5u);
}

TEST(ParseLogLevel, RefusesOthersNamingTheChoices) {
  // spdlog's from_str would answer "off" for each of these: logging silently gone.
  for (const char* bad : {"", "INFO", "Debug", "warning", "err", "off", "critical", "info ", "3"}) {
    auto l = ParseLogLevel(bad);
    ASSERT_FALSE(l.ok()) << bad;
    EXPECT_EQ(l.status().code(), EINVAL);
    EXPECT_EQ(l.status().message(),
              fmt::format("log level \"{}\": want trace, debug, info, warn or error", bad));
  }
}

TEST(Duration, ParsesUnitsAndSums) {
  const std::pair<const char*, int64_t> cases[] = {
      {"0s", 0},          {"500ms", 500},         {"90s", 90'000},
      {"10m", 600'000},   {"1h30m", 5'400'000},   {"2h", 7'200'000},
      {"1d", 86'400'000}, {"1m30s250ms", 90'250}, {"30s1m", 90'000}};
  for (const auto& [text, ms] : cases) {
    auto d = ParseDuration(text);
    ASSERT_TRUE(d.ok()) << text << ": " << d.status().message();
    EXPECT_EQ(d->count(), ms) << text;
  }
}

TEST(Duration, RefusesWhatIsAmbiguousOrBroken) {
  for (const char* bad : {"", "10", "1h30", "m", "-5m", "1.5h", "10 m", "10min", "1w", "5S",
                          "99999999999999999999s", "9223372036854775807h"}) {
    auto d = ParseDuration(bad);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), EINVAL);
    EXPECT_NE(d.status().message().find(fmt::format("duration \"{}\"", bad)), std::string::npos)
        << d.status().message();
  }
  EXPECT_NE(ParseDuration("10").status().message().find("a unit is required"), std::string::npos);
}

TEST(Duration, FormatsCompactly) {
  EXPECT_EQ(FormatDuration(0ms), "0s");
  EXPECT_EQ(FormatDuration(450ms), "450ms");
  EXPECT_EQ(FormatDuration(1999ms), "1s");
  EXPECT_EQ(FormatDuration(599s), "9m59s");
  EXPECT_EQ(FormatDuration(10min), "10m");
  EXPECT_EQ(FormatDuration(90min), "1h30m");
  EXPECT_EQ(FormatDuration(3601s), "1h1s");
  EXPECT_EQ(FormatDuration(168h), "7d");
  EXPECT_EQ(FormatDuration(49h + 1s), "2d1h1s");
  for (const char* text : {"9m59s", "1h30m", "450ms", "1h1s", "2d1h"}) {
    EXPECT_EQ(FormatDuration(ParseDuration(text).value()), text);
  }
}

TEST(CheckLogLevelDuration, BetweenZeroAndAWeek) {
  EXPECT_TRUE(CheckLogLevelDuration(1ms).ok());
  EXPECT_TRUE(CheckLogLevelDuration(kMaxTimedLogLevel).ok());
  EXPECT_EQ(CheckLogLevelDuration(0ms).code(), EINVAL);
  EXPECT_EQ(CheckLogLevelDuration(-1s).code(), EINVAL);
  Status s = CheckLogLevelDuration(kMaxTimedLogLevel + 1s);
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_EQ(s.message(), "duration 7d1s is longer than 7d: set the level without one instead");
}

// Captures the default logger's lines (the control logs every change) and restores it after.
class LogLevelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    prev_ = spdlog::default_logger();
    sink_ = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(64);
    auto logger = std::make_shared<spdlog::logger>("t", sink_);
    logger->set_pattern("%l %v");
    logger->set_level(trace);  // every line the control logs, whatever level it uses
    spdlog::set_default_logger(logger);
  }
  void TearDown() override { spdlog::set_default_logger(prev_); }

  std::vector<std::string> Lines() { return sink_->last_formatted(); }
  bool Logged(const std::string& line) {
    for (auto l : Lines()) {
      while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
      if (l == line) return true;
    }
    return false;
  }

  // What the control applied, in order (its stand-in for spdlog::set_level).
  std::vector<LogLevel> Applied() {
    std::lock_guard lk(mu_);
    return applied_;
  }
  std::function<void(LogLevel)> Recorder() {
    return [this](LogLevel l) {
      std::lock_guard lk(mu_);
      applied_.push_back(l);
    };
  }
  // Polls `pred` for up to 5 s (a loaded machine is slow, never this slow).
  template <typename F>
  bool Within5s(F pred) {
    const auto end = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < end) {
      if (pred()) return true;
      std::this_thread::sleep_for(5ms);
    }
    return pred();
  }

  std::shared_ptr<spdlog::logger> prev_;
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
  std::mutex mu_;
  std::vector<LogLevel> applied_;
};

TEST_F(LogLevelTest, UntimedSetStaysAndIsLogged) {
  LogLevelControl c(info, Recorder());
  auto ch = c.Set(debug, 0ms, "test");
  ASSERT_TRUE(ch.ok());
  EXPECT_EQ(ch->previous, info);
  EXPECT_EQ(ch->now.level, debug);
  EXPECT_FALSE(ch->now.revert_to);
  EXPECT_EQ(c.Get().level, debug);
  EXPECT_EQ(Applied(), std::vector<LogLevel>{debug});
  EXPECT_TRUE(Logged("info log level info -> debug (test)"))
      << fmt::format("{}", fmt::join(Lines(), "|"));
  // Quieter than info on both sides: the line is a warning, so it is still seen at warn.
  ASSERT_TRUE(c.Set(warn, 0ms, "t2").ok());
  ASSERT_TRUE(c.Set(err, 0ms, "t3").ok());
  EXPECT_TRUE(Logged("info log level debug -> warn (t2)"));
  EXPECT_TRUE(Logged("warning log level warn -> error (t3)"));
}

TEST_F(LogLevelTest, TimedSetRevertsByItself) {
  LogLevelControl c(info, Recorder());
  const auto before = LogLevelControl::Clock::now();
  auto ch = c.Set(debug, 50ms, "test");
  ASSERT_TRUE(ch.ok());
  EXPECT_EQ(ch->now.level, debug);
  ASSERT_TRUE(ch->now.revert_to);
  EXPECT_EQ(*ch->now.revert_to, info);
  EXPECT_GE(ch->now.revert_at, before + 50ms);
  EXPECT_TRUE(Logged("info log level info -> debug (test; for 50ms, then back to info)"));
  ASSERT_TRUE(Within5s([&] { return c.Get().level == info; }));
  EXPECT_FALSE(c.Get().revert_to);
  EXPECT_GE(LogLevelControl::Clock::now(), before + 50ms);  // not early
  EXPECT_EQ(Applied(), (std::vector<LogLevel>{debug, info}));
  EXPECT_TRUE(Logged("info log level debug -> info (the timed change is over)"));
}

TEST_F(LogLevelTest, LaterUntimedSetCancelsTheRevert) {
  // On a clock of the test's: the cancelled revert's time comes when the test moves it, and the
  // timer's passes say when it has looked (no window of real time for a wrong outcome).
  const auto t0 = LogLevelControl::Clock::now();
  std::atomic<int64_t> elapsed_ms{0};
  LogLevelControl c(info, Recorder(),
                    [&] { return t0 + std::chrono::milliseconds(elapsed_ms.load()); });
  ASSERT_TRUE(c.Set(debug, 100ms, "test").ok());
  auto ch = c.Set(trace, 0ms, "test");
  ASSERT_TRUE(ch.ok());
  EXPECT_FALSE(ch->now.revert_to);
  elapsed_ms = 400;  // well past the first change's end
  const uint64_t passes = c.TimerPasses();
  c.Wake();
  ASSERT_TRUE(Within5s([&] { return c.TimerPasses() > passes; })) << "the timer never looked";
  EXPECT_EQ(c.Get().level, trace);
  EXPECT_EQ(Applied(), (std::vector<LogLevel>{debug, trace}));
}

TEST_F(LogLevelTest, StackedTimedChangesComeBackToTheFirstLevel) {
  LogLevelControl c(info, Recorder());
  ASSERT_TRUE(c.Set(debug, 1h, "test").ok());
  // The second timed change replaces the first one's end; what comes back is still info, not
  // debug (which would then stay for good).
  auto ch = c.Set(trace, 50ms, "test");
  ASSERT_TRUE(ch.ok());
  EXPECT_EQ(ch->previous, debug);
  ASSERT_TRUE(ch->now.revert_to);
  EXPECT_EQ(*ch->now.revert_to, info);
  EXPECT_LT(ch->now.revert_at, LogLevelControl::Clock::now() + 1min);
  ASSERT_TRUE(Within5s([&] { return c.Get().level == info; }));
  EXPECT_EQ(Applied(), (std::vector<LogLevel>{debug, trace, info}));
}

TEST_F(LogLevelTest, ShutdownCancelsAPendingRevertPromptly) {
  LogLevelControl c(info, Recorder());
  ASSERT_TRUE(c.Set(debug, 1h, "test").ok());
  const auto t0 = std::chrono::steady_clock::now();
  c.Shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);  // the timer thread did not sleep on
  EXPECT_EQ(c.Get().level, debug);
  EXPECT_FALSE(c.Get().revert_to);
  auto late = c.Set(info, 10ms, "test");
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.status().code(), EAGAIN);
  EXPECT_EQ(c.Get().level, debug);
  c.Shutdown();  // idempotent
  EXPECT_EQ(Applied(), std::vector<LogLevel>{debug});
}

TEST_F(LogLevelTest, BadDurationChangesNothing) {
  LogLevelControl c(info, Recorder());
  auto r = c.Set(debug, kMaxTimedLogLevel + 1ms, "test");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EINVAL);
  EXPECT_EQ(c.Get().level, info);
  EXPECT_TRUE(Applied().empty());
}

TEST_F(LogLevelTest, StepsAreClampedAndCancelARevert) {
  LogLevelControl c(info, Recorder());
  ASSERT_TRUE(c.Set(warn, 1h, "test").ok());
  EXPECT_EQ(c.Step(true, "SIGUSR1").now.level, info);
  EXPECT_FALSE(c.Get().revert_to);
  EXPECT_TRUE(Logged("info log level warn -> info (SIGUSR1)"));
  EXPECT_EQ(c.Step(true, "SIGUSR1").now.level, debug);
  EXPECT_EQ(c.Step(true, "SIGUSR1").now.level, trace);
  EXPECT_EQ(c.Step(true, "SIGUSR1").now.level, trace);
  for (int i = 0; i < 4; ++i) c.Step(false, "SIGUSR2");
  EXPECT_EQ(c.Get().level, err);
  EXPECT_EQ(c.Step(false, "SIGUSR2").now.level, err);
  // A level outside the five steps in from the quiet end.
  LogLevelControl off(spdlog::level::off, Recorder());
  EXPECT_EQ(off.Step(true, "SIGUSR1").now.level, warn);
}

// The service's handlers, called in-process (no socket: the access control is the server's).
class LoggingServiceTest : public LogLevelTest {
 protected:
  grpc::Status Set(const std::string& level, uint64_t ms, datapath::v1::LogLevelResponse* r) {
    datapath::v1::SetLogLevelRequest req;
    req.set_level(level);
    req.set_duration_ms(ms);
    grpc::ServerContext ctx;
    return svc_->SetLogLevel(&ctx, &req, r);
  }
  grpc::Status Get(datapath::v1::LogLevelResponse* r) {
    grpc::ServerContext ctx;
    datapath::v1::GetLogLevelRequest req;
    return svc_->GetLogLevel(&ctx, &req, r);
  }
  LogLevelControl control_{info, Recorder()};
  std::unique_ptr<grpc::Service> owned_ = datapath::MakeLoggingService(control_);
  datapath::v1::Logging::Service* svc_ = static_cast<datapath::v1::Logging::Service*>(owned_.get());
};

TEST_F(LoggingServiceTest, GetSetAndRevert) {
  datapath::v1::LogLevelResponse r;
  ASSERT_TRUE(Get(&r).ok());
  EXPECT_EQ(r.level(), "info");
  EXPECT_EQ(r.previous(), "");
  EXPECT_EQ(r.revert_to(), "");

  r.Clear();
  ASSERT_TRUE(Set("debug", 600'000, &r).ok());
  EXPECT_EQ(r.level(), "debug");
  EXPECT_EQ(r.previous(), "info");
  EXPECT_EQ(r.revert_to(), "info");
  EXPECT_GT(r.revert_in_ms(), 0u);
  EXPECT_LE(r.revert_in_ms(), 600'000u);
  EXPECT_TRUE(Logged("info log level info -> debug (management API; for 10m, then back to info)"));

  r.Clear();
  ASSERT_TRUE(Get(&r).ok());
  EXPECT_EQ(r.level(), "debug");
  EXPECT_EQ(r.revert_to(), "info");

  r.Clear();
  ASSERT_TRUE(Set("error", 0, &r).ok());
  EXPECT_EQ(r.previous(), "debug");
  EXPECT_EQ(r.revert_to(), "");
  EXPECT_EQ(r.revert_in_ms(), 0u);
}

TEST_F(LoggingServiceTest, BadRequestsAreInvalidArgumentAndChangeNothing) {
  datapath::v1::LogLevelResponse r;
  grpc::Status s = Set("verbose", 0, &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "log level \"verbose\": want trace, debug, info, warn or error");
  s = Set("", 0, &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  s = Set("debug", 8ull * 24 * 3600 * 1000, &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("longer than 7d"), std::string::npos) << s.error_message();
  s = Set("debug", UINT64_MAX, &r);  // no overflow into a negative or tiny duration
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(control_.Get().level, info);
  EXPECT_TRUE(Applied().empty());
}

}  // namespace
}  // namespace nbdcsi
