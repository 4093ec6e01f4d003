#include "common/log_format.h"

#include "common/log_level.h"

#include <fmt/chrono.h>
#include <spdlog/formatter.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string_view>

namespace nbdcsi {
namespace {

constexpr char kTextPattern[] = "%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%t] %v";

std::atomic<LogContextFn> g_context{nullptr};

void AppendJsonString(spdlog::memory_buf_t& out, std::string_view s) {
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out.append(std::string_view("\\\""));
        break;
      case '\\':
        out.append(std::string_view("\\\\"));
        break;
      case '\n':
        out.append(std::string_view("\\n"));
        break;
      case '\r':
        out.append(std::string_view("\\r"));
        break;
      case '\t':
        out.append(std::string_view("\\t"));
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char esc[8];
          snprintf(esc, sizeof esc, "\\u%04x", c);
          out.append(std::string_view(esc));
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  out.push_back('"');
}

void AppendField(spdlog::memory_buf_t& out, std::string_view key, std::string_view value) {
  out.push_back(',');
  AppendJsonString(out, key);
  out.push_back(':');
  AppendJsonString(out, value);
}

// {"time":"2026-12-06T10:00:00.123Z","level":"info","thread":123,"msg":"...",<context>}
class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const auto ms = std::chrono::time_point_cast<std::chrono::milliseconds>(msg.time);
    dest.append(std::string_view("{\"time\":\""));
    fmt::format_to(std::back_inserter(dest), "{:%Y-%m-%dT%H:%M:%S}.{:03d}Z",
                   fmt::gmtime(std::chrono::system_clock::to_time_t(ms)),
                   static_cast<int>(ms.time_since_epoch().count() % 1000));
    dest.append(std::string_view("\",\"level\":"));
    const auto level = spdlog::level::to_string_view(msg.level);
    AppendJsonString(dest, std::string_view(level.data(), level.size()));
    fmt::format_to(std::back_inserter(dest), ",\"thread\":{}", msg.thread_id);
    AppendField(dest, "msg", std::string_view(msg.payload.data(), msg.payload.size()));
    if (LogContextFn fn = g_context.load()) {
      for (const auto& [k, v] : fn()) {
        if (!v.empty()) AppendField(dest, k, v);
      }
    }
    dest.append(std::string_view("}\n"));
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>();
  }
};

}  // namespace

Status SetLogFormat(const std::string& format) {
  if (format == "text") {
    spdlog::set_pattern(kTextPattern);
  } else if (format == "json") {
    spdlog::set_formatter(std::make_unique<JsonFormatter>());
  } else {
    return Error(EINVAL, "log format \"{}\": want text or json", format);
  }
  return Status::Ok();
}

void SetLogContextProvider(LogContextFn fn) { g_context.store(fn); }

bool ApplyLogFlags(const std::string& level, const std::string& format) {
  spdlog::set_level(ParseLogLevel(level).value());
  if (Status s = SetLogFormat(format); !s.ok()) {
    spdlog::critical("--log-format: {}", s.message());
    return false;
  }
  return true;
}

}  // namespace nbdcsi
