// nbdctl's rendering of attachments: the MODE and LINK columns and the JSON keys scripts use.
#include <string>

#include <gtest/gtest.h>

#include "tools/nbdctl/attach_render.h"

namespace nbdcsi::nbdctl {
namespace {

namespace v1 = ::nbdcsi::datapath::v1;

v1::Attachment Make(const std::string& vol, const std::string& dev, const std::string& mode,
                    bool ok, const std::string& why) {
  v1::Attachment a;
  a.set_volume(vol);
  a.set_device(dev);
  a.set_mode(mode);
  a.set_connections(2);
  a.set_cookie("nbd-csi:" + vol + ":1");
  a.set_size(1 << 20);
  a.set_link_ok(ok);
  a.set_link_error(why);
  return a;
}

TEST(AttachRender, TableHasModeAndLinkColumns) {
  v1::ListAttachmentsResponse list;
  *list.add_attachments() = Make("a", "/dev/nbd0", "kernel", true, "");
  *list.add_attachments() =
      Make("b", "/dev/loop3", "fuse", false, "nbdfuse lost its NBD connection");
  *list.add_attachments() = Make("c", "/dev/nbd1", "", true, "");  // an older daemon: no mode
  std::string t = AttachmentListTable(list);
  EXPECT_NE(t.find("VOLUME"), std::string::npos) << t;
  EXPECT_LT(t.find("DEVICE"), t.find("MODE")) << t;
  EXPECT_LT(t.find("BACKEND"), t.find("LINK")) << t;
  EXPECT_NE(t.find("/dev/loop3"), std::string::npos);
  EXPECT_NE(t.find("fuse"), std::string::npos);
  EXPECT_NE(t.find("down: nbdfuse lost its NBD connection"), std::string::npos) << t;
  // Row a ends in "ok", and row c shows the kernel mode it must have had.
  auto row = [&](const std::string& volume) {
    size_t at = t.find("\n" + volume + " ");
    if (at == std::string::npos) return std::string();
    size_t end = t.find('\n', at + 1);
    return t.substr(at + 1, end == std::string::npos ? std::string::npos : end - at - 1);
  };
  std::string a = row("a");
  ASSERT_GE(a.size(), 2u) << t;
  EXPECT_EQ(a.substr(a.size() - 2), "ok") << t;
  EXPECT_NE(row("c").find("kernel"), std::string::npos) << t;
}

TEST(AttachRender, JsonKeysAndDetails) {
  auto j = AttachmentJson(Make("b", "/dev/loop3", "fuse", false, "why"));
  EXPECT_EQ(j.at("mode"), "fuse");
  EXPECT_EQ(j.at("link_ok"), false);
  EXPECT_EQ(j.at("link_error"), "why");
  EXPECT_EQ(j.at("device"), "/dev/loop3");
  EXPECT_EQ(j.at("size_bytes"), 1 << 20);
  std::string d = AttachmentDetails(Make("a", "/dev/nbd0", "kernel", true, ""));
  EXPECT_NE(d.find("Mode:"), std::string::npos) << d;
  EXPECT_NE(d.find("kernel"), std::string::npos) << d;
  EXPECT_NE(d.find("Link:"), std::string::npos) << d;
}

TEST(AttachRender, ATargetsDeviceShowsTheTargetExportName) {
  v1::ListAttachmentsResponse list;
  *list.add_attachments() = Make("rv", "/dev/nbd2", "kernel", true, "");
  list.mutable_attachments(0)->set_target(true);
  *list.add_attachments() = Make("lv", "/dev/nbd3", "kernel", true, "");
  std::string t = AttachmentListTable(list);
  EXPECT_NE(t.find("\nrv@target "), std::string::npos) << t;
  EXPECT_EQ(t.find("lv@target"), std::string::npos) << t;
  auto j = AttachmentJson(list.attachments(0));
  EXPECT_EQ(j.at("volume"), "rv");  // scripts get the volume's name and the flag
  EXPECT_EQ(j.at("target"), true);
  EXPECT_EQ(AttachmentJson(list.attachments(1)).at("target"), false);
  std::string d = AttachmentDetails(list.attachments(0));
  EXPECT_NE(d.find("rv@target"), std::string::npos) << d;
}

}  // namespace
}  // namespace nbdcsi::nbdctl
