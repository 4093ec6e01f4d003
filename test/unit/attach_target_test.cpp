// Attachments of replicated volumes' targets (VOLUME@target, issue 16) against the fakes of the
// kernel, the export server and the cluster agent: what is served and with which size, the
// record's `target` field (and records written before it), the refusals (resize, the nbdfuse
// fallback, the other kind already attached, no cluster), detach leaving the target open, and the
// reopen of the target when a restarted daemon recovers its devices.
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <string>
#include <string_view>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "datapath/attach/attachments.h"
#include "datapath/nbd/negotiate.h"
#include "test/support/temp_dir.h"
#include "test/unit/attach_fakes.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kTargetSize = 48ull << 20;

class AttachTargetTest : public AttachFixture {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(SetUpAttach("attach_target_test"));
    // A pool volume of the same name and another size: a local replica of "rv" must never be
    // what the target's device serves.
    server_.volumes["rv"] = {64 << 20, false};
    server_.volumes["vol-a"] = {64 << 20, false};
    targets_.Open("rv", kTargetSize);
    opts_.targets = &targets_;
  }

  // The attachment of "rv" is reported with its link down, for a reason that says each of `why`.
  static void ExpectLinkDown(const AttachmentManager& m,
                             std::initializer_list<std::string_view> why) {
    auto a = m.Get("rv");
    ASSERT_TRUE(a);
    EXPECT_FALSE(a->link_ok);
    for (std::string_view w : why)
      EXPECT_NE(a->link_error.find(w), std::string::npos) << a->link_error;
  }

  FakeTargets targets_{server_};
};

TEST_F(AttachTargetTest, AttachServesTheTargetExportWithTheTargetsSize) {
  auto m = NewManager();
  auto r = m->Attach("rv", 3, /*target=*/true);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->target);
  EXPECT_EQ(r->device(), "/dev/nbd0");
  EXPECT_EQ(r->size_bytes, kTargetSize);
  EXPECT_FALSE(r->read_only);
  EXPECT_TRUE(r->link_ok) << r->link_error;

  EXPECT_TRUE(server_.calls.empty()) << "the pool volume was served";
  ASSERT_EQ(server_.target_calls.size(), 1u);
  EXPECT_EQ(server_.target_calls[0], std::make_pair(std::string("rv"), 3u));
  ASSERT_EQ(kernel_.connects.size(), 1u);
  EXPECT_EQ(kernel_.connects[0].size_bytes, kTargetSize);
  EXPECT_EQ(kernel_.connects[0].server_flags, nbd::TransmissionFlags(false, false));
  EXPECT_EQ(kernel_.fds_seen.size(), 3u);
  ExpectAllClientFdsClosed();

  auto j = nlohmann::json::parse(ReadFile(dir_ + "/rv.json"));
  EXPECT_EQ(j.at("target"), true);
  EXPECT_EQ(j.at("mode"), "kernel");
  ASSERT_EQ(m->List().size(), 1u);
  EXPECT_TRUE(m->List()[0].target);

  // Idempotent like any attachment, and of its kind only.
  auto again = m->Attach("rv", 1, true);
  ASSERT_TRUE(again.ok()) << again.status().message();
  EXPECT_EQ(again->index, r->index);
  EXPECT_EQ(kernel_.connects.size(), 1u);
}

TEST_F(AttachTargetTest, DetachRemovesTheDeviceAndLeavesTheTargetOpen) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  server_.open_script = {5};  // the pool volume "rv" serving another node's target: not ours
  ASSERT_TRUE(m->Detach("rv").ok());
  EXPECT_EQ(kernel_.disconnects, std::vector<int>{0});
  EXPECT_FALSE(fs::exists(dir_ + "/rv.json"));
  EXPECT_TRUE(m->List().empty());
  // The pool volume's connections were neither counted nor waited for.
  EXPECT_EQ(server_.open_calls, 0u);
  EXPECT_EQ(targets_.open.count("rv"), 1u);
  EXPECT_TRUE(targets_.reopens.empty());
  EXPECT_TRUE(m->Detach("rv").ok());  // idempotent
}

// CloseTarget while a device is attached to the target would take its export away under it
// (issue 16): refused, naming the device, without calling the agent; after the detach it runs.
TEST_F(AttachTargetTest, CloseOfATargetWithADeviceIsRefusedUntilItIsDetached) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  int closes = 0;
  auto close = [&]() {
    ++closes;
    targets_.open.erase("rv");
    return Status::Ok();
  };
  Status s = m->CloseTargetUnlessAttached("rv", close);
  EXPECT_EQ(s.code(), EBUSY) << s.message();
  EXPECT_NE(s.message().find("/dev/nbd0"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("nbdctl detach rv"), std::string::npos) << s.message();
  EXPECT_EQ(closes, 0);
  EXPECT_EQ(targets_.open.count("rv"), 1u);
  EXPECT_EQ(m->List().size(), 1u) << "the attachment is untouched";
  EXPECT_TRUE(kernel_.disconnects.empty());

  // The pool volume of the same name (a local replica) attached does not hold the close back.
  ASSERT_TRUE(m->Attach("vol-a").ok());
  targets_.Open("vol-a", kTargetSize);
  EXPECT_TRUE(m->CloseTargetUnlessAttached("vol-a", [&]() { return Status::Ok(); }).ok());

  // What NodeUnstage does: detach, then close.
  ASSERT_TRUE(m->Detach("rv").ok());
  s = m->CloseTargetUnlessAttached("rv", close);
  EXPECT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(closes, 1);
  EXPECT_EQ(targets_.open.count("rv"), 0u);
  // The agent's own refusal comes back as it is.
  s = m->CloseTargetUnlessAttached("rv", [] { return Error(ENOENT, "no target of rv here"); });
  EXPECT_EQ(s.code(), ENOENT);
}

TEST_F(AttachTargetTest, ATargetThatIsNotOpenHereIsNotFoundAndLeavesNothing) {
  auto m = NewManager();
  auto r = m->Attach("other", 2, true);
  EXPECT_EQ(r.status().code(), ENOENT) << r.status().message();
  EXPECT_NE(r.status().message().find("other"), std::string::npos) << r.status().message();
  EXPECT_TRUE(kernel_.connects.empty());
  EXPECT_TRUE(targets_.reopens.empty()) << "an attach must not claim the volume by itself";
  EXPECT_FALSE(fs::exists(dir_ + "/other.json"));
}

TEST_F(AttachTargetTest, WithoutTheClusterATargetCannotBeAttached) {
  opts_.targets = nullptr;
  auto m = NewManager();
  auto r = m->Attach("rv", 2, true);
  EXPECT_EQ(r.status().code(), ENODEV);
  EXPECT_NE(r.status().message().find("--cluster-etcd"), std::string::npos) << r.status().message();
  EXPECT_TRUE(kernel_.connects.empty());
  EXPECT_TRUE(server_.target_calls.empty());
  EXPECT_FALSE(fs::exists(dir_ + "/rv.json"));
}

TEST_F(AttachTargetTest, TheOtherKindAlreadyAttachedIsRefused) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-a").ok());
  targets_.Open("vol-a", kTargetSize);
  auto t = m->Attach("vol-a", 2, true);
  EXPECT_EQ(t.status().code(), EBUSY) << t.status().message();
  EXPECT_NE(t.status().message().find("/dev/nbd0"), std::string::npos) << t.status().message();

  ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  auto local = m->Attach("rv");
  EXPECT_EQ(local.status().code(), EBUSY) << local.status().message();
  EXPECT_EQ(kernel_.connects.size(), 2u);
  EXPECT_FALSE(nlohmann::json::parse(ReadFile(dir_ + "/vol-a.json")).contains("target"));
  EXPECT_EQ(nlohmann::json::parse(ReadFile(dir_ + "/rv.json")).at("target"), true);
}

TEST_F(AttachTargetTest, ResizeGrowsTheTargetThenItsDevice) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  // Not expanded: the device keeps its size (a RECONFIGURE with the same size is harmless).
  auto same = m->Resize("rv");
  ASSERT_TRUE(same.ok()) << same.status().message();
  EXPECT_EQ(same->size_bytes, kTargetSize);
  // The controller recorded twice the size: the target takes it, then the device.
  targets_.cluster["rv"] = 2 * kTargetSize;
  auto r = m->Resize("rv");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->size_bytes, 2 * kTargetSize);
  EXPECT_EQ(targets_.open["rv"], 2 * kTargetSize);
  ASSERT_FALSE(kernel_.resizes.empty());
  EXPECT_EQ(std::get<1>(kernel_.resizes.back()), 2 * kTargetSize);
  EXPECT_EQ(m->Get("rv")->size_bytes, 2 * kTargetSize);
  EXPECT_EQ(nlohmann::json::parse(ReadFile(dir_ + "/rv.json")).at("size_bytes"), 2 * kTargetSize);
}

TEST_F(AttachTargetTest, ATargetThatCannotGrowLeavesTheDevice) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  targets_.cluster["rv"] = 2 * kTargetSize;
  targets_.grow_error = Error(EAGAIN, "replica set rv: replicas out of sync");
  const size_t resizes = kernel_.resizes.size();
  auto r = m->Resize("rv");
  EXPECT_EQ(r.status().code(), EAGAIN) << r.status().message();
  EXPECT_EQ(kernel_.resizes.size(), resizes);
  EXPECT_EQ(m->Get("rv")->size_bytes, kTargetSize);
}

TEST_F(AttachTargetTest, TheNbdfuseFallbackIsRefusedForATarget) {
  kernel_.available = Error(ENODEV, "kernel NBD unavailable: no nbd module");
  fuse_.available = Status::Ok();
  auto m = NewManager();
  auto r = m->Attach("rv", 2, true);
  EXPECT_EQ(r.status().code(), ENODEV);
  EXPECT_NE(r.status().message().find("only through kernel NBD"), std::string::npos)
      << r.status().message();
  EXPECT_TRUE(fuse_.attaches.empty());
  EXPECT_TRUE(server_.target_calls.empty());
  EXPECT_FALSE(fs::exists(dir_ + "/rv.json"));
  // A local volume still takes the fallback on the same daemon.
  auto local = m->Attach("vol-a");
  ASSERT_TRUE(local.ok()) << local.status().message();
  EXPECT_EQ(local->mode, kModeFuse);
}

TEST_F(AttachTargetTest, ALostSocketIsReplacedFromTheTarget) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  ASSERT_TRUE(m->OnLinkDead(0).ok());
  ASSERT_EQ(kernel_.reconfigures.size(), 1u);
  EXPECT_EQ(server_.target_calls.size(), 2u);
  EXPECT_TRUE(server_.calls.empty());
  // The target was closed under the device: the link is reported down with why.
  targets_.open.clear();
  server_.target_exports.clear();
  EXPECT_EQ(m->OnLinkDead(0).code(), ENOENT);
  EXPECT_TRUE(targets_.reopens.empty());
  ASSERT_NO_FATAL_FAILURE(ExpectLinkDown(*m, {"no target of volume rv"}));
  ExpectAllClientFdsClosed();
}

// ---- After a restart ----

TEST_F(AttachTargetTest, RecoverReopensTheTargetThenReconnectsTheDevice) {
  std::string cookie;
  {
    auto m = NewManager();
    auto r = m->Attach("rv", 3, true);
    ASSERT_TRUE(r.ok());
    cookie = r->cookie;
  }
  targets_.Restart();
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  EXPECT_EQ(rep.reconnected.size(), 1u);
  EXPECT_TRUE(rep.failed.empty()) << rep.failed[0];
  EXPECT_EQ(targets_.reopens, std::vector<std::string>{"rv"});
  ASSERT_EQ(kernel_.reconfigures.size(), 1u);
  EXPECT_EQ(kernel_.reconfigures[0], std::make_pair(0, size_t{3}));
  EXPECT_TRUE(server_.calls.empty());
  auto a = m->Get("rv");
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->target);
  EXPECT_TRUE(a->link_ok) << a->link_error;
  EXPECT_EQ(a->cookie, cookie);
  ExpectAllClientFdsClosed();
}

TEST_F(AttachTargetTest, RecoverKeepsTheDeviceDownWithTheReasonWhenTheTargetCannotReopen) {
  {
    auto m = NewManager();
    ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  }
  targets_.Restart();
  targets_.reopen_error = Error(EBUSY, "node-x holds a live claim on volume rv");
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  EXPECT_TRUE(rep.reconnected.empty());
  ASSERT_EQ(rep.failed.size(), 1u);
  EXPECT_TRUE(kernel_.reconfigures.empty());
  EXPECT_TRUE(fs::exists(dir_ + "/rv.json"));
  EXPECT_EQ(kernel_.Backend(0).rfind("nbd-csi:rv:", 0), 0u) << "the device must be kept";
  ASSERT_NO_FATAL_FAILURE(ExpectLinkDown(*m, {"node-x holds a live claim", "target"}));
  // It can still be detached, which is how the node plugin's unstage cleans it up.
  EXPECT_TRUE(m->Detach("rv").ok());
  EXPECT_FALSE(fs::exists(dir_ + "/rv.json"));
}

TEST_F(AttachTargetTest, RecoverWithoutTheClusterReportsWhy) {
  {
    auto m = NewManager();
    ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  }
  targets_.Restart();
  opts_.targets = nullptr;
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  ASSERT_EQ(rep.failed.size(), 1u);
  EXPECT_TRUE(kernel_.reconfigures.empty());
  ASSERT_NO_FATAL_FAILURE(ExpectLinkDown(*m, {"--cluster-etcd"}));
}

TEST_F(AttachTargetTest, RecoverRefusesATargetReopenedAtAnotherSize) {
  {
    auto m = NewManager();
    ASSERT_TRUE(m->Attach("rv", 2, true).ok());
  }
  targets_.Restart();
  targets_.cluster["rv"] = kTargetSize * 2;
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  ASSERT_EQ(rep.failed.size(), 1u);
  EXPECT_TRUE(kernel_.reconfigures.empty());
  ASSERT_NO_FATAL_FAILURE(ExpectLinkDown(*m, {"reopened with"}));
  ExpectAllClientFdsClosed();
}

// ---- The record ----

TEST(AttachmentRecordTargetTest, TheTargetFieldRoundTripsAndOldRecordsLoadAsLocal) {
  AttachmentRecord r;
  r.volume = "rv";
  r.index = 3;
  r.cookie = "nbd-csi:rv:1";
  r.connections = 2;
  r.size_bytes = kTargetSize;
  r.target = true;
  auto back = AttachmentRecord::FromJson(r.ToJson());
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_TRUE(back->target);
  EXPECT_EQ(back->size_bytes, kTargetSize);

  r.target = false;
  EXPECT_FALSE(nlohmann::json::parse(r.ToJson()).contains("target"))
      << "a local volume's record keeps its old form";
  // A record written before targets existed.
  auto old = AttachmentRecord::FromJson(
      R"({"volume":"v","mode":"kernel","index":0,"cookie":"c","connections":1,)"
      R"("size_bytes":4096,"read_only":false})");
  ASSERT_TRUE(old.ok()) << old.status().message();
  EXPECT_FALSE(old->target);

  for (const char* bad :
       {R"({"volume":"v","index":0,"cookie":"c","connections":1,"target":"yes"})",
        R"({"volume":"v","index":0,"cookie":"c","connections":1,"target":1})",
        R"({"volume":"v","mode":"fuse","index":0,"cookie":"c","connections":1,"target":true,)"
        R"("fuse_pid":5,"fuse_mount":"/m"})"}) {
    EXPECT_EQ(AttachmentRecord::FromJson(bad).status().code(), EINVAL) << bad;
  }
}

}  // namespace
}  // namespace nbdcsi::datapath
