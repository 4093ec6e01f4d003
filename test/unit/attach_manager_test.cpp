// AttachmentManager against a fake kernel (no nbd.ko needed) and a fake export server that hands
// out real socketpair ends, so descriptor ownership is checked too: every fd the manager gets must
// be closed by it, and the fake kernel records what it was given.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <deque>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/fs_util.h"

#include "datapath/attach/attachments.h"
#include "datapath/attach/fuse_attach.h"
#include "datapath/attach/kernel_nbd.h"
#include "datapath/engine/frontend.h"
#include "datapath/nbd/negotiate.h"
#include "test/support/temp_dir.h"
#include "test/unit/attach_fakes.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;

class AttachManagerTest : public AttachFixture {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(SetUpAttach("attach_manager_test"));
    server_.volumes["vol-a"] = {64 << 20, false};
    server_.volumes["vol-b"] = {128 << 20, true};
  }
  void WriteFile(const std::string& p, const std::string& content) {
    std::ofstream(p) << content;
  }
};

TEST_F(AttachManagerTest, AttachWritesDurableRecordAndPassesKernelParameters) {
  auto m = NewManager();
  auto r = m->Attach("vol-a", 3);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->index, 0);
  EXPECT_EQ(r->device(), "/dev/nbd0");
  EXPECT_EQ(r->connections, 3u);
  EXPECT_EQ(r->cookie.rfind("nbd-csi:vol-a:", 0), 0u) << r->cookie;

  ASSERT_EQ(kernel_.connects.size(), 1u);
  const KernelConnectParams& p = kernel_.connects[0];
  EXPECT_EQ(p.size_bytes, 64u << 20);
  EXPECT_EQ(p.block_size, 4096u);
  EXPECT_EQ(p.server_flags, nbd::TransmissionFlags(false, false));
  EXPECT_EQ(p.backend_identifier, r->cookie);
  EXPECT_EQ(p.dead_conn_timeout_s, opts_.dead_conn_timeout_s);
  EXPECT_GT(p.io_timeout_s, 0u);
  EXPECT_EQ(kernel_.fds_seen.size(), 3u);
  EXPECT_EQ(kernel_.max_sectors[0], opts_.max_sectors_kb);
  ExpectAllClientFdsClosed();

  auto rec = AttachmentRecord::FromJson(ReadFile(dir_ + "/vol-a.json"));
  ASSERT_TRUE(rec.ok()) << rec.status().message();
  EXPECT_EQ(rec->index, 0);
  EXPECT_EQ(rec->cookie, r->cookie);
  EXPECT_EQ(rec->connections, 3u);
  EXPECT_FALSE(fs::exists(AtomicTempPath(dir_, "vol-a.json")));
  struct stat st;
  ASSERT_EQ(stat(dir_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
}

TEST_F(AttachManagerTest, ReadOnlyVolumeGetsReadOnlyFlags) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-b").ok());
  EXPECT_EQ(kernel_.connects.at(0).server_flags, nbd::TransmissionFlags(true, false));
  EXPECT_EQ(kernel_.connects.at(0).size_bytes, 128u << 20);
  EXPECT_EQ(kernel_.fds_seen.size(), 2u);  // the default from the options
}

TEST_F(AttachManagerTest, AttachIsIdempotentWhileTheDeviceIsOurs) {
  auto m = NewManager();
  auto a = m->Attach("vol-a");
  ASSERT_TRUE(a.ok());
  auto b = m->Attach("vol-a", 4);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->index, a->index);
  EXPECT_EQ(b->cookie, a->cookie);
  EXPECT_EQ(kernel_.connects.size(), 1u);
  EXPECT_EQ(server_.calls.size(), 1u);

  // The device went away behind our back (dead-connection timeout, or someone detached it):
  // a new Attach makes a new device instead of returning a stale path.
  kernel_.devices.clear();
  auto c = m->Attach("vol-a");
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_NE(c->cookie, a->cookie);
  EXPECT_EQ(kernel_.connects.size(), 2u);
}

TEST_F(AttachManagerTest, BadRequestsAreRefusedWithoutSideEffects) {
  auto m = NewManager();
  auto r = m->Attach("vol-a", AttachmentManager::kMaxConnections + 1);
  EXPECT_EQ(r.status().code(), EINVAL);
  r = m->Attach("missing");
  EXPECT_EQ(r.status().code(), ENOENT);
  kernel_.available = Error(ENODEV, "kernel NBD unavailable: the nbd module is not loaded");
  r = m->Attach("vol-a");
  EXPECT_EQ(r.status().code(), ENODEV);
  EXPECT_NE(r.status().message().find("nbd module is not loaded"), std::string::npos);
  EXPECT_TRUE(kernel_.connects.empty());
  EXPECT_TRUE(fs::is_empty(dir_));
  EXPECT_TRUE(m->List().empty());
}

TEST_F(AttachManagerTest, FailedConnectLeavesNoRecordAndClosesSockets) {
  auto m = NewManager();
  kernel_.connect_error = Error(EBUSY, "nbd netlink CONNECT: the kernel refused: busy");
  auto r = m->Attach("vol-a", 2);
  EXPECT_EQ(r.status().code(), EBUSY);
  EXPECT_TRUE(fs::is_empty(dir_));
  EXPECT_TRUE(m->List().empty());
  ExpectAllClientFdsClosed();
}

TEST_F(AttachManagerTest, RecoverReconfiguresLiveDevicesAndDropsGoneOnes) {
  std::string cookie_a, cookie_b;
  {
    auto m = NewManager();
    auto a = m->Attach("vol-a", 3);
    auto b = m->Attach("vol-b", 1);
    ASSERT_TRUE(a.ok() && b.ok());
    cookie_a = a->cookie;
    EXPECT_EQ(b->index, 1);
  }
  // The daemon died; the kernel kept nbd0 waiting for us but nbd1 timed out and was reused by
  // someone else.
  kernel_.devices[1] = "someone-else";
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  EXPECT_EQ(rep.reconnected.size(), 1u);
  EXPECT_EQ(rep.dropped.size(), 1u);
  EXPECT_TRUE(rep.failed.empty());
  ASSERT_EQ(kernel_.reconfigures.size(), 1u);
  EXPECT_EQ(kernel_.reconfigures[0], std::make_pair(0, size_t{3}));
  EXPECT_TRUE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_FALSE(fs::exists(dir_ + "/vol-b.json"));
  ASSERT_EQ(m->List().size(), 1u);
  EXPECT_EQ(m->Get("vol-a")->cookie, cookie_a);
  ExpectAllClientFdsClosed();
  // And the reconnected attachment is idempotent like any other.
  auto again = m->Attach("vol-a");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->index, 0);
  EXPECT_EQ(kernel_.connects.size(), 2u);
}

TEST_F(AttachManagerTest, RecoverFindsADeviceWhoseConnectWasNotRecordedYet) {
  // A crash between CONNECT and the second record write leaves index -1 with the cookie.
  auto m0 = NewManager();
  kernel_.devices[5] = "nbd-csi:vol-a:00000000000000aa";
  AttachmentRecord r;
  r.volume = "vol-a";
  r.index = -1;
  r.cookie = "nbd-csi:vol-a:00000000000000aa";
  r.connections = 2;
  WriteFile(dir_ + "/vol-a.json", r.ToJson());
  // ...and one whose CONNECT never happened at all.
  r.volume = "vol-b";
  r.cookie = "nbd-csi:vol-b:00000000000000bb";
  WriteFile(dir_ + "/vol-b.json", r.ToJson());
  WriteFile(AtomicTempPath(dir_, "vol-c.json"), "{ torn");

  auto m = NewManager();
  RecoverReport rep = m->Recover();
  EXPECT_EQ(rep.reconnected.size(), 1u);
  EXPECT_EQ(rep.dropped.size(), 1u);
  ASSERT_EQ(kernel_.reconfigures.size(), 1u);
  EXPECT_EQ(kernel_.reconfigures[0].first, 5);
  auto rec = AttachmentRecord::FromJson(ReadFile(dir_ + "/vol-a.json"));
  ASSERT_TRUE(rec.ok());
  EXPECT_EQ(rec->index, 5);
  EXPECT_FALSE(fs::exists(dir_ + "/vol-b.json"));
  EXPECT_FALSE(fs::exists(AtomicTempPath(dir_, "vol-c.json")));
}

TEST_F(AttachManagerTest, RecoverKeepsWhatItCannotJudge) {
  auto m0 = NewManager();
  ASSERT_TRUE(m0->Attach("vol-a").ok());
  WriteFile(dir_ + "/junk.json", "not json");
  AttachmentRecord other;
  other.volume = "vol-x";  // file name and content disagree
  other.index = 3;
  other.cookie = "c";
  other.connections = 1;
  WriteFile(dir_ + "/vol-y.json", other.ToJson());

  // No nbd module right now: nothing can be told apart, so nothing is dropped.
  kernel_.available = Error(ENODEV, "no nbd");
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  EXPECT_TRUE(rep.reconnected.empty());
  EXPECT_TRUE(rep.dropped.empty());
  EXPECT_EQ(rep.failed.size(), 3u);
  EXPECT_TRUE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_TRUE(fs::exists(dir_ + "/junk.json"));
  EXPECT_TRUE(fs::exists(dir_ + "/vol-y.json"));
  EXPECT_TRUE(kernel_.reconfigures.empty());
}

TEST_F(AttachManagerTest, RecoverReportsAFailedReconfigureAndKeepsTheRecord) {
  {
    auto m = NewManager();
    ASSERT_TRUE(m->Attach("vol-a").ok());
  }
  kernel_.reconfigure_error = Error(EINVAL, "nbd netlink RECONFIGURE: the kernel refused");
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  EXPECT_EQ(rep.failed.size(), 1u);
  EXPECT_TRUE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_TRUE(m->Get("vol-a").has_value());
  ExpectAllClientFdsClosed();
}

TEST_F(AttachManagerTest, DetachWaitsForTheDeviceThenRemovesTheRecord) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-a").ok());
  kernel_.connected_polls_before_gone = 3;
  Status s = m->Detach("vol-a");
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(kernel_.disconnects, std::vector<int>{0});
  EXPECT_FALSE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_FALSE(m->Get("vol-a").has_value());
  // Idempotent.
  EXPECT_TRUE(m->Detach("vol-a").ok());
  EXPECT_EQ(kernel_.disconnects.size(), 1u);
}

// The engine sees the device's sockets close a little after the kernel lets them go; a detach
// returns once it has (here: 3 open before, another client's 1 left), so that a DeleteVolume
// right after the unstage does not find the volume busy.
TEST_F(AttachManagerTest, DetachReturnsOnceTheEngineHasClosedTheDevicesConnections) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-a").ok());  // 2 connections
  server_.open_script = {3, 3, 3, 2, 1};
  ASSERT_TRUE(m->Detach("vol-a").ok());
  EXPECT_EQ(server_.open_calls, 5u) << "returned before the engine closed the connections";
  EXPECT_FALSE(m->Get("vol-a").has_value());
}

// A count that never drops (someone else connected meanwhile) delays the detach by the bound,
// never fails it.
TEST_F(AttachManagerTest, DetachWaitsForTheEngineOnlyUpToItsBound) {
  opts_.engine_close_wait = std::chrono::milliseconds(50);
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-a").ok());
  server_.open_script = {2, 2};
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(m->Detach("vol-a").ok());
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(50));
  EXPECT_FALSE(fs::exists(dir_ + "/vol-a.json"));
}

TEST_F(AttachManagerTest, DetachRefusesAMountedDeviceAndKeepsTheRecordOnTimeout) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-a").ok());
  kernel_.in_use = Error(EBUSY, "/dev/nbd0 is in use");
  EXPECT_EQ(m->Detach("vol-a").code(), EBUSY);
  EXPECT_TRUE(kernel_.disconnects.empty());
  EXPECT_TRUE(fs::exists(dir_ + "/vol-a.json"));

  kernel_.in_use = Status::Ok();
  kernel_.connected_polls_before_gone = 1 << 30;  // never lets go
  EXPECT_EQ(m->Detach("vol-a").code(), ETIMEDOUT);
  EXPECT_TRUE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_TRUE(m->Get("vol-a").has_value());
}

TEST_F(AttachManagerTest, DetachOfADeviceNoLongerOursOnlyForgetsIt) {
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-a").ok());
  kernel_.devices[0] = "someone-else";
  EXPECT_TRUE(m->Detach("vol-a").ok());
  EXPECT_TRUE(kernel_.disconnects.empty());
  EXPECT_FALSE(fs::exists(dir_ + "/vol-a.json"));
}

TEST_F(AttachManagerTest, ConcurrentCallsOnOneVolumeAreAborted) {
  auto m = NewManager();
  kernel_.block_connect = true;
  std::thread t([&] { EXPECT_TRUE(m->Attach("vol-a").ok()); });
  {
    std::unique_lock lk(kernel_.mu);
    kernel_.cv.wait(lk, [&] { return kernel_.connect_entered; });
  }
  EXPECT_EQ(m->Attach("vol-a").status().code(), EALREADY);
  EXPECT_EQ(m->Detach("vol-a").code(), EALREADY);
  {
    std::lock_guard lk(kernel_.mu);
    kernel_.connect_release = true;
  }
  kernel_.cv.notify_all();
  t.join();
  EXPECT_TRUE(m->Get("vol-a").has_value());
}

TEST_F(AttachManagerTest, LinkDeadOfOurDeviceIsRepairedOthersAreIgnored) {
  auto m = NewManager();
  auto a = m->Attach("vol-a", 2);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(m->OnLinkDead(a->index).ok());
  ASSERT_EQ(kernel_.reconfigures.size(), 1u);
  EXPECT_EQ(kernel_.reconfigures[0], std::make_pair(a->index, size_t{2}));
  ExpectAllClientFdsClosed();

  EXPECT_TRUE(m->OnLinkDead(7).ok());  // not ours
  kernel_.devices[a->index] = "someone-else";
  EXPECT_TRUE(m->OnLinkDead(a->index).ok());  // no longer ours
  EXPECT_EQ(kernel_.reconfigures.size(), 1u);

  kernel_.devices[a->index] = a->cookie;
  server_.volumes.erase("vol-a");  // cannot be served: the error is reported, nothing else
  EXPECT_EQ(m->OnLinkDead(a->index).code(), ENOENT);
  EXPECT_EQ(kernel_.reconfigures.size(), 1u);
}

// /metrics' nbdcsi_attachment_reconnects_total: repaired links count, failed repairs and
// devices that are not ours do not.
TEST_F(AttachManagerTest, ReconnectsAreCountedPerAttachment) {
  auto m = NewManager();
  auto a = m->Attach("vol-a", 2);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(m->Get("vol-a")->reconnects, 0u);
  ASSERT_TRUE(m->OnLinkDead(a->index).ok());
  ASSERT_TRUE(m->OnLinkDead(a->index).ok());
  EXPECT_TRUE(m->OnLinkDead(7).ok());  // not ours
  EXPECT_EQ(m->Get("vol-a")->reconnects, 2u);
  ASSERT_EQ(m->List().size(), 1u);
  EXPECT_EQ(m->List()[0].reconnects, 2u);
  server_.volumes.erase("vol-a");  // cannot be served: no reconnect
  EXPECT_NE(m->OnLinkDead(a->index).code(), 0);
  EXPECT_EQ(m->Get("vol-a")->reconnects, 2u);
}

TEST(AttachmentRecordTest, JsonRoundTripAndValidation) {
  AttachmentRecord r;
  r.volume = "v";
  r.index = 7;
  r.cookie = "nbd-csi:v:1";
  r.connections = 4;
  r.size_bytes = 1 << 30;
  r.read_only = true;
  auto back = AttachmentRecord::FromJson(r.ToJson());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->volume, "v");
  EXPECT_EQ(back->index, 7);
  EXPECT_EQ(back->cookie, r.cookie);
  EXPECT_EQ(back->connections, 4u);
  EXPECT_EQ(back->size_bytes, 1u << 30);
  EXPECT_TRUE(back->read_only);

  for (const char* bad : {"", "{}", "[1]", R"({"volume":"v","index":0,"cookie":"c"})",
                          R"({"volume":"v","index":0,"cookie":"c","connections":0})",
                          R"({"volume":"v","index":0,"cookie":"c","connections":17})",
                          R"({"volume":"v","index":-2,"cookie":"c","connections":1})",
                          R"({"volume":"","index":0,"cookie":"c","connections":1})",
                          R"({"volume":"v","index":"0","cookie":"c","connections":1})",
                          // Numbers of another JSON type are refused, not converted.
                          R"({"volume":"v","index":1.5,"cookie":"c","connections":1})",
                          R"({"volume":"v","index":0,"cookie":"c","connections":-4294967295})",
                          R"({"volume":"v","index":0,"cookie":"c","connections":1,"size_bytes":-1})",
                          R"({"volume":"v","index":0,"cookie":"c","connections":1,"read_only":1})"}) {
    EXPECT_EQ(AttachmentRecord::FromJson(bad).status().code(), EINVAL) << bad;
  }
}

// ---- Mode choice and the fuse fallback ----

TEST_F(AttachManagerTest, KernelModeWhenTheKernelHasNbdEvenIfFuseWorks) {
  fuse_.available = Status::Ok();
  auto m = NewManager();
  auto r = m->Attach("vol-a");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->mode, kModeKernel);
  EXPECT_EQ(r->device(), "/dev/nbd0");
  EXPECT_TRUE(r->link_ok);
  EXPECT_TRUE(fuse_.attaches.empty());
  auto j = nlohmann::json::parse(ReadFile(dir_ + "/vol-a.json"));
  EXPECT_EQ(j.at("mode"), "kernel");
  EXPECT_FALSE(j.contains("fuse_mount"));
}

TEST_F(AttachManagerTest, FuseModeWhenTheKernelHasNoNbd) {
  kernel_.available = Error(ENODEV, "kernel NBD unavailable: the nbd module is not loaded");
  fuse_.available = Status::Ok();
  server_.socket = "/run/nbd csi/nbd.sock";  // escaped in the URI
  auto m = NewManager();
  auto r = m->Attach("vol-a", 3);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->mode, kModeFuse);
  EXPECT_EQ(r->device(), "/dev/loop0");
  EXPECT_EQ(r->fuse_pid, 1000);
  EXPECT_EQ(r->fuse_mount, dir_ + "/fuse/vol-a");
  EXPECT_EQ(r->size_bytes, uint64_t{64} << 20);
  EXPECT_TRUE(r->link_ok) << r->link_error;
  EXPECT_TRUE(kernel_.connects.empty());
  EXPECT_TRUE(server_.calls.empty());  // nbdfuse connects by itself: no socketpairs
  ASSERT_EQ(fuse_.attaches.size(), 1u);
  const FuseAttachParams& p = fuse_.attaches[0];
  EXPECT_EQ(p.uri, "nbd+unix:///vol-a@grow?socket=/run/nbd%20csi/nbd.sock");
  EXPECT_EQ(p.window_bytes, kGrowableWindow);
  EXPECT_EQ(p.size_bytes, uint64_t{64} << 20);
  EXPECT_EQ(p.connections, 3u);
  EXPECT_EQ(p.mount_dir, dir_ + "/fuse/vol-a");
  EXPECT_EQ(p.log_path, dir_ + "/fuse/vol-a.log");
  // The loop device's identity: the cookie's random part, short enough for lo_file_name.
  EXPECT_EQ(p.loop_tag, "nbd-csi:" + r->cookie.substr(r->cookie.find_last_of(':') + 1));
  EXPECT_LE(p.loop_tag.size(), 63u);
  EXPECT_TRUE(fs::is_directory(dir_ + "/fuse"));

  auto j = nlohmann::json::parse(ReadFile(dir_ + "/vol-a.json"));
  EXPECT_EQ(j.at("mode"), "fuse");
  EXPECT_EQ(j.at("index"), 0);
  EXPECT_EQ(j.at("fuse_pid"), 1000);
  EXPECT_EQ(j.at("fuse_mount"), dir_ + "/fuse/vol-a");
  auto parsed = AttachmentRecord::FromJson(ReadFile(dir_ + "/vol-a.json"));
  ASSERT_TRUE(parsed.ok()) << parsed.status().message();
  EXPECT_EQ(parsed->device(), "/dev/loop0");

  // Idempotent while healthy; the same device comes back.
  auto again = m->Attach("vol-a");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->device(), "/dev/loop0");
  EXPECT_EQ(fuse_.attaches.size(), 1u);

  auto list = m->List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].mode, kModeFuse);
  EXPECT_TRUE(list[0].link_ok);
  fuse_.link_problem = "nbdfuse (pid 1000) exited (exit status 1)";
  list = m->List();
  EXPECT_FALSE(list[0].link_ok);
  EXPECT_EQ(list[0].link_error, fuse_.link_problem);
}

TEST_F(AttachManagerTest, NeitherPathGivesENODEVNamingBoth) {
  kernel_.available = Error(ENODEV, "kernel NBD unavailable: the nbd module is not loaded");
  auto m = NewManager();
  auto r = m->Attach("vol-a");
  EXPECT_EQ(r.status().code(), ENODEV);
  EXPECT_NE(r.status().message().find("nbd module is not loaded"), std::string::npos);
  EXPECT_NE(r.status().message().find("missing nbdfuse"), std::string::npos);
  EXPECT_TRUE(fuse_.attaches.empty());
  EXPECT_TRUE(fs::is_empty(dir_));

  // Fuse works, but the daemon has no Unix NBD socket for nbdfuse to connect to.
  fuse_.available = Status::Ok();
  server_.socket.clear();
  r = m->Attach("vol-a");
  EXPECT_EQ(r.status().code(), ENODEV);
  EXPECT_NE(r.status().message().find("--nbd-listen"), std::string::npos) << r.status().message();
  // ... unless the options name one.
  opts_.nbd_socket = "/run/other.sock";
  auto m2 = NewManager();
  r = m2->Attach("vol-a");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_NE(fuse_.attaches.back().uri.find("socket=/run/other.sock"), std::string::npos);
}

TEST_F(AttachManagerTest, FuseFallbackCanBeTurnedOff) {
  kernel_.available = Error(ENODEV, "kernel NBD unavailable: the nbd module is not loaded");
  fuse_.available = Status::Ok();
  opts_.fuse_fallback = false;
  auto m = NewManager();
  auto r = m->Attach("vol-a");
  EXPECT_EQ(r.status().code(), ENODEV);
  EXPECT_NE(r.status().message().find("--require-kernel-nbd"), std::string::npos)
      << "the error names why there is no fallback: " << r.status().message();
  EXPECT_TRUE(fuse_.attaches.empty());
}

TEST_F(AttachManagerTest, FuseRecordHoldsThePidBeforeTheLoopDeviceExists) {
  kernel_.available = Error(ENODEV, "no nbd");
  fuse_.available = Status::Ok();
  auto m = NewManager();
  std::string at_start;
  fuse_.after_started = [&] { at_start = ReadFile(dir_ + "/vol-a.json"); };
  ASSERT_TRUE(m->Attach("vol-a").ok());
  auto j = nlohmann::json::parse(at_start);
  EXPECT_EQ(j.at("index"), -1);
  EXPECT_EQ(j.at("fuse_pid"), 1000);
  EXPECT_EQ(j.at("fuse_mount"), dir_ + "/fuse/vol-a");
}

TEST_F(AttachManagerTest, FailedFuseAttachLeavesNoRecord) {
  kernel_.available = Error(ENODEV, "no nbd");
  fuse_.available = Status::Ok();
  fuse_.attach_error = Error(ETIMEDOUT, "nbdfuse did not present the file");
  auto m = NewManager();
  auto r = m->Attach("vol-a");
  EXPECT_EQ(r.status().code(), ETIMEDOUT);
  EXPECT_FALSE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_TRUE(m->List().empty());
  EXPECT_EQ(m->Attach("missing").status().code(), ENOENT);
}

TEST_F(AttachManagerTest, FuseDetachIsRefusedWhileMountedThenCleansUp) {
  kernel_.available = Error(ENODEV, "no nbd");
  fuse_.available = Status::Ok();
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-a").ok());
  fuse_.in_use = Error(EBUSY, "/dev/loop0 is in use (mounted or held open exclusively)");
  Status s = m->Detach("vol-a");
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_NE(s.message().find("vol-a"), std::string::npos);
  EXPECT_TRUE(fuse_.detaches.empty());
  EXPECT_TRUE(fs::exists(dir_ + "/vol-a.json"));

  fuse_.in_use = Status::Ok();
  ASSERT_TRUE(m->Detach("vol-a").ok());
  ASSERT_EQ(fuse_.detaches.size(), 1u);
  EXPECT_EQ(fuse_.detaches[0], std::make_pair(dir_ + "/fuse/vol-a", 1000));
  EXPECT_EQ(fuse_.detach_refs[0].loop_index, 0);
  EXPECT_EQ(fuse_.detach_refs[0].loop_tag, fuse_.attaches[0].loop_tag);
  EXPECT_FALSE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_TRUE(fuse_.loops.empty());
  EXPECT_TRUE(m->List().empty());
  EXPECT_TRUE(m->Detach("vol-a").ok());  // idempotent
  EXPECT_EQ(fuse_.detaches.size(), 1u);
}

TEST_F(AttachManagerTest, FuseAttachmentAfterARestartIsReportedDownAndCleanedUpByDetach) {
  kernel_.available = Error(ENODEV, "no nbd");
  fuse_.available = Status::Ok();
  {
    auto m = NewManager();
    ASSERT_TRUE(m->Attach("vol-a").ok());
  }
  auto m = NewManager();  // the restarted daemon
  RecoverReport rep = m->Recover();
  ASSERT_EQ(rep.failed.size(), 1u);
  EXPECT_NE(rep.failed[0].find("cannot be reconnected"), std::string::npos) << rep.failed[0];
  EXPECT_TRUE(fuse_.detaches.empty());  // it may still be mounted: nothing is torn down
  auto list = m->List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].device(), "/dev/loop0");
  EXPECT_FALSE(list[0].link_ok);
  EXPECT_NE(list[0].link_error.find("restart"), std::string::npos) << list[0].link_error;
  EXPECT_EQ(m->Resize("vol-a").status().code(), ENODEV);

  // Attach over it: refused while mounted (its data would be cut off), replaced once it is not.
  fuse_.in_use = Error(EBUSY, "mounted");
  auto r = m->Attach("vol-a");
  EXPECT_EQ(r.status().code(), EBUSY);
  EXPECT_NE(r.status().message().find("unmount"), std::string::npos);
  fuse_.in_use = Status::Ok();
  r = m->Attach("vol-a");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->link_ok);
  EXPECT_EQ(fuse_.detaches.size(), 1u);
  EXPECT_EQ(fuse_.attaches.size(), 2u);

  // Restart again; this time detach: everything is cleaned up and the record goes.
  m = NewManager();
  m->Recover();
  ASSERT_TRUE(m->Detach("vol-a").ok());
  EXPECT_EQ(fuse_.detaches.size(), 2u);
  EXPECT_FALSE(fs::exists(dir_ + "/vol-a.json"));
}

TEST_F(AttachManagerTest, ALoopDeviceReusedBySomeoneElseIsNeitherCheckedNorCleared) {
  kernel_.available = Error(ENODEV, "no nbd");
  fuse_.available = Status::Ok();
  {
    auto m = NewManager();
    ASSERT_TRUE(m->Attach("vol-a").ok());
  }
  // While we were down, /dev/loop0 was freed and taken (and mounted) by something else.
  fuse_.loops[0] = "someone-else";
  fuse_.in_use = Error(EBUSY, "/dev/loop0 is in use");
  auto m = NewManager();
  m->Recover();
  auto list = m->List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_FALSE(list[0].link_ok);
  ASSERT_TRUE(m->Detach("vol-a").ok());  // its busy device is not ours: no EBUSY
  EXPECT_EQ(fuse_.loops.at(0), "someone-else");
  EXPECT_FALSE(fs::exists(dir_ + "/vol-a.json"));
}

TEST_F(AttachManagerTest, RecoverCleansUpAnUnfinishedFuseAttachment) {
  AttachmentRecord r;
  r.volume = "vol-a";
  r.mode = kModeFuse;
  r.cookie = "nbd-csi:vol-a:0";
  r.connections = 2;
  r.fuse_pid = 4242;
  r.fuse_mount = dir_ + "/fuse/vol-a";
  fs::create_directories(dir_);
  WriteFile(dir_ + "/vol-a.json", r.ToJson());
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  ASSERT_EQ(rep.dropped.size(), 1u);
  ASSERT_EQ(fuse_.detaches.size(), 1u);
  EXPECT_EQ(fuse_.detaches[0], std::make_pair(dir_ + "/fuse/vol-a", 4242));
  EXPECT_FALSE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_TRUE(m->List().empty());
}

TEST_F(AttachManagerTest, BadFuseRecordsAreKept) {
  fs::create_directories(dir_);
  WriteFile(dir_ + "/vol-a.json",
            R"({"volume":"vol-a","mode":"fuse","index":0,"cookie":"c","connections":1,)"
            R"("fuse_pid":7,"fuse_mount":"relative/dir"})");
  WriteFile(dir_ + "/vol-b.json",
            R"({"volume":"vol-b","mode":"ublk","index":0,"cookie":"c","connections":1})");
  auto m = NewManager();
  RecoverReport rep = m->Recover();
  EXPECT_EQ(rep.failed.size(), 2u);
  EXPECT_TRUE(fs::exists(dir_ + "/vol-a.json"));
  EXPECT_TRUE(fs::exists(dir_ + "/vol-b.json"));
  EXPECT_TRUE(fuse_.detaches.empty());
}

// ---- Resize ----

TEST_F(AttachManagerTest, ResizeTellsTheDeviceAndRecordsTheNewSize) {
  auto m = NewManager();
  EXPECT_EQ(m->Resize("vol-a").status().code(), ENOENT);
  ASSERT_TRUE(m->Attach("vol-a").ok());
  server_.volumes["vol-a"].first = 96 << 20;
  auto r = m->Resize("vol-a");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->size_bytes, uint64_t{96} << 20);
  ASSERT_EQ(kernel_.resizes.size(), 1u);
  EXPECT_EQ(std::get<0>(kernel_.resizes[0]), 0);
  EXPECT_EQ(std::get<1>(kernel_.resizes[0]), uint64_t{96} << 20);
  EXPECT_EQ(std::get<2>(kernel_.resizes[0]), kernel_.devices[0]);  // the cookie goes along
  auto j = nlohmann::json::parse(ReadFile(dir_ + "/vol-a.json"));
  EXPECT_EQ(j.at("size_bytes"), uint64_t{96} << 20);
  EXPECT_TRUE(m->Resize("vol-a").ok());  // idempotent

  server_.volumes["vol-a"].first = 32 << 20;  // not something a pool does, but refused
  EXPECT_EQ(m->Resize("vol-a").status().code(), EINVAL);
}

TEST_F(AttachManagerTest, FuseResizeRaisesTheLoopLimit) {
  kernel_.available = Error(ENODEV, "no nbd");
  fuse_.available = Status::Ok();
  auto m = NewManager();
  ASSERT_TRUE(m->Attach("vol-a").ok());
  server_.volumes["vol-a"].first = 200 << 20;
  auto r = m->Resize("vol-a");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->size_bytes, uint64_t{200} << 20);
  EXPECT_EQ(fuse_.sizes[0], uint64_t{200} << 20);
  EXPECT_TRUE(kernel_.resizes.empty());
  auto j = nlohmann::json::parse(ReadFile(dir_ + "/vol-a.json"));
  EXPECT_EQ(j.at("size_bytes"), uint64_t{200} << 20);
  EXPECT_EQ(m->Get("vol-a")->size_bytes, uint64_t{200} << 20);

  server_.volumes["vol-a"].first = kGrowableWindow + 4096;
  EXPECT_EQ(m->Resize("vol-a").status().code(), EFBIG);
}

}  // namespace
}  // namespace nbdcsi::datapath
