// --log-format json: every line is one JSON object that a parser reads back, whatever bytes the
// message holds, with the calling thread's context fields; "text" keeps the one-line pattern; any
// other name is refused and changes nothing.
#include "common/log_format.h"

#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace nbdcsi {
namespace {

thread_local std::string t_req;

std::vector<std::pair<const char*, std::string>> Context() {
  return {{"request_id", t_req}, {"volume_id", t_req.empty() ? "" : "v1:n:pvc-1"}};
}

class LogFormatTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    prev_ = spdlog::default_logger();
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("t", sink));
  }
  void TearDown() override {
    SetLogContextProvider(nullptr);
    spdlog::set_default_logger(prev_);
  }
  std::vector<nlohmann::json> Lines() {
    std::vector<nlohmann::json> v;
    std::istringstream in(out_.str());
    for (std::string l; std::getline(in, l);) v.push_back(nlohmann::json::parse(l));
    return v;
  }
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> prev_;
};

TEST_F(LogFormatTest, JsonLinesParseWithTheirContext) {
  ASSERT_TRUE(SetLogFormat("json").ok());
  SetLogContextProvider(&Context);
  const std::string nasty = "quote \" backslash \\ newline \n tab \t bell \x07 utf8 \xc3\xa9 end";
  spdlog::warn("{}", nasty);
  t_req = "r-000042";
  spdlog::info("in a call");
  t_req.clear();
  auto lines = Lines();
  ASSERT_EQ(lines.size(), 2u) << out_.str();
  EXPECT_EQ(lines[0]["msg"], nasty);
  EXPECT_EQ(lines[0]["level"], "warning");
  EXPECT_FALSE(lines[0].contains("request_id")) << "empty context values are left out";
  EXPECT_TRUE(lines[0]["thread"].is_number());
  EXPECT_EQ(lines[0]["time"].get<std::string>().size(), 24u) << lines[0]["time"];
  EXPECT_EQ(lines[1]["msg"], "in a call");
  EXPECT_EQ(lines[1]["request_id"], "r-000042");
  EXPECT_EQ(lines[1]["volume_id"], "v1:n:pvc-1");
}

TEST_F(LogFormatTest, TextAndRefusals) {
  ASSERT_TRUE(SetLogFormat("text").ok());
  Status s = SetLogFormat("yaml");
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_NE(s.message().find("text or json"), std::string::npos) << s.message();
  spdlog::info("plain");
  const std::string line = out_.str();
  EXPECT_NE(line.find(" info ["), std::string::npos) << line;
  EXPECT_EQ(line.front(), '2') << "starts with the year: " << line;
  EXPECT_EQ(line.find('{'), std::string::npos) << line;
}

}  // namespace
}  // namespace nbdcsi
