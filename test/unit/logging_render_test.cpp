// `nbdctl log-level`'s rendering (tools/nbdctl/logging_render.h): the text line with the
// pending revert rounded up to the second, and the stable JSON keys.
#include "tools/nbdctl/logging_render.h"

#include <gtest/gtest.h>

namespace nbdcsi {
namespace {

TEST(LogLevelRender, TextAndJson) {
  nbdctl::lv1::LogLevelResponse r;
  r.set_level("info");
  EXPECT_EQ(nbdctl::LogLevelText(r), "Log level: info\n");
  EXPECT_EQ(nbdctl::LogLevelJson(r).dump(),
            R"({"level":"info","revert_in_ms":null,"revert_to":null})");
  r.set_previous("info");
  r.set_level("debug");
  r.set_revert_to("info");
  r.set_revert_in_ms(599'990);  // just after --for 10m: shown as 10m, not 9m59s
  EXPECT_EQ(nbdctl::LogLevelText(r), "Log level: info -> debug (back to info in 10m)\n");
  EXPECT_EQ(nbdctl::LogLevelJson(r).dump(),
            R"({"level":"debug","previous":"info","revert_in_ms":599990,"revert_to":"info"})");
  r.set_previous("");
  r.set_revert_in_ms(58'001);
  EXPECT_EQ(nbdctl::LogLevelText(r), "Log level: debug (back to info in 59s)\n");
}

}  // namespace
}  // namespace nbdcsi
