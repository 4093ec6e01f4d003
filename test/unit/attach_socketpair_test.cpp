// NbdFrontend::ServeSocketPairs: what the kernel NBD driver gets. The client ends speak the
// transmission phase at once (no handshake) with simple replies only, across several connections
// of one volume, and an open socketpair keeps the volume from being deleted.
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "datapath/attach/attachments.h"
#include "datapath/engine/frontend.h"
#include "datapath/nbd/codec.h"
#include "datapath/nbd/proto.h"
#include "datapath/pool/pool.h"
#include "test/support/nbd_bytes.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
using test::Bytes;
using test::Pattern;
using test::RecvAll;
constexpr uint64_t kMiB = 1024 * 1024;

bool SendAll(int fd, const Bytes& b) {
  for (size_t off = 0; off < b.size();) {
    ssize_t n = send(fd, b.data() + off, b.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

void SendRequest(int fd, uint16_t type, uint16_t flags, uint64_t cookie, uint64_t offset,
                 uint32_t length, const Bytes& payload = {}) {
  ASSERT_TRUE(SendAll(fd, test::NbdRequest(type, flags, cookie, offset, length, payload)));
}

// A simple reply (16 bytes: magic, error, cookie), then `data_len` bytes for a successful READ.
// The kernel understands nothing else, so a structured reply magic here is a failure.
void ExpectSimpleReply(int fd, uint64_t cookie, uint32_t error, Bytes* data = nullptr,
                       size_t data_len = 0) {
  uint8_t hdr[16];
  ASSERT_TRUE(RecvAll(fd, hdr, sizeof hdr)) << "no reply for cookie " << cookie;
  ASSERT_EQ(nbd::LoadBE32(hdr), nbd::kSimpleReplyMagic);
  EXPECT_EQ(nbd::LoadBE32(hdr + 4), error);
  EXPECT_EQ(nbd::LoadBE64(hdr + 8), cookie);
  if (data && error == 0) {
    data->resize(data_len);
    ASSERT_TRUE(RecvAll(fd, data->data(), data_len));
  }
}

class AttachSocketpairTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("attach_socketpair_test")) << tmp_.error();
    root_ = tmp_.path();
    ASSERT_TRUE(test::OpenPool(test::PoolIn(root_), &pool_));
    frontend_ = std::make_unique<NbdFrontend>(*pool_, FrontendOptions{2, 30});
  }
  void TearDown() override {
    for (int fd : fds_) close(fd);
    frontend_.reset();
    pool_.reset();
    tmp_.Remove();
  }
  std::vector<int> Serve(const std::string& vol, unsigned n) {
    auto r = frontend_->ServeSocketPairs(vol, n);
    EXPECT_TRUE(r.ok()) << r.status().message();
    if (!r.ok()) return {};
    for (int fd : *r) {
      timeval tv{10, 0};
      setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      fds_.push_back(fd);
    }
    return *r;
  }

  test::TempDir tmp_;
  std::string root_;
  std::unique_ptr<Pool> pool_;
  std::unique_ptr<NbdFrontend> frontend_;
  std::vector<int> fds_;
};

TEST_F(AttachSocketpairTest, RefusedBeforeStartAndForMissingVolumes) {
  ASSERT_TRUE(pool_->Create("v", 16 * kMiB, {}).ok());
  EXPECT_EQ(frontend_->ServeSocketPairs("v", 1).status().code(), EINVAL);
  ASSERT_TRUE(frontend_->Start().ok());
  EXPECT_EQ(frontend_->ServeSocketPairs("missing", 2).status().code(), ENOENT);
  EXPECT_EQ(frontend_->ServeSocketPairs("v", 0).status().code(), EINVAL);
}

TEST_F(AttachSocketpairTest, WritesOnOneConnectionAreReadOnAnother) {
  ASSERT_TRUE(pool_->Create("v", 16 * kMiB, {}).ok());
  ASSERT_TRUE(frontend_->Start().ok());
  auto fds = Serve("v", 3);
  ASSERT_EQ(fds.size(), 3u);

  // Several writes in flight on one socket, replies in any order.
  const Bytes a = Pattern(256 * 1024, 1), b = Pattern(4096, 2);
  SendRequest(fds[0], nbd::kCmdWrite, 0, 11, 0, static_cast<uint32_t>(a.size()), a);
  SendRequest(fds[0], nbd::kCmdWrite, nbd::kCmdFlagFua, 12, 8 * kMiB,
              static_cast<uint32_t>(b.size()), b);
  for (int i = 0; i < 2; ++i) {
    uint8_t hdr[16];
    ASSERT_TRUE(RecvAll(fds[0], hdr, sizeof hdr));
    EXPECT_EQ(nbd::LoadBE32(hdr), nbd::kSimpleReplyMagic);
    EXPECT_EQ(nbd::LoadBE32(hdr + 4), 0u);
    uint64_t c = nbd::LoadBE64(hdr + 8);
    EXPECT_TRUE(c == 11 || c == 12) << c;
  }
  SendRequest(fds[1], nbd::kCmdFlush, 0, 13, 0, 0);
  ExpectSimpleReply(fds[1], 13, 0);

  Bytes got;
  SendRequest(fds[2], nbd::kCmdRead, 0, 14, 0, static_cast<uint32_t>(a.size()));
  ExpectSimpleReply(fds[2], 14, 0, &got, a.size());
  EXPECT_EQ(got, a);
  SendRequest(fds[1], nbd::kCmdRead, 0, 15, 8 * kMiB, static_cast<uint32_t>(b.size()));
  ExpectSimpleReply(fds[1], 15, 0, &got, b.size());
  EXPECT_EQ(got, b);

  // Past the end: an error reply, and the connection stays usable.
  SendRequest(fds[0], nbd::kCmdRead, 0, 16, 16 * kMiB - 512, 4096);
  ExpectSimpleReply(fds[0], 16, 22 /* NBD_EINVAL */);
  SendRequest(fds[0], nbd::kCmdRead, 0, 17, 0, 512);
  ExpectSimpleReply(fds[0], 17, 0, &got, 512);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), a.begin()));

  // The data reached the volume's own file.
  std::ifstream img(root_ + "/pool/volumes/v.img", std::ios::binary);
  Bytes on_disk(b.size());
  img.seekg(static_cast<std::streamoff>(8 * kMiB));
  img.read(reinterpret_cast<char*>(on_disk.data()), static_cast<std::streamsize>(on_disk.size()));
  EXPECT_EQ(on_disk, b);
}

TEST_F(AttachSocketpairTest, ReadOnlyVolumeRefusesWrites) {
  ASSERT_TRUE(pool_->Create("ro", 16 * kMiB, {}, true).ok());
  ASSERT_TRUE(frontend_->Start().ok());
  auto fds = Serve("ro", 1);
  ASSERT_EQ(fds.size(), 1u);
  const Bytes b = Pattern(4096, 3);
  SendRequest(fds[0], nbd::kCmdWrite, 0, 1, 0, 4096, b);
  ExpectSimpleReply(fds[0], 1, 1 /* NBD_EPERM */);
  Bytes got;
  SendRequest(fds[0], nbd::kCmdRead, 0, 2, 0, 4096);
  ExpectSimpleReply(fds[0], 2, 0, &got, 4096);
  EXPECT_EQ(got, Bytes(4096, 0));
}

TEST_F(AttachSocketpairTest, OpenSocketpairsKeepTheVolumeFromBeingDeleted) {
  ASSERT_TRUE(pool_->Create("v", 16 * kMiB, {}).ok());
  ASSERT_TRUE(frontend_->Start().ok());
  auto fds = Serve("v", 2);
  ASSERT_EQ(fds.size(), 2u);
  EXPECT_EQ(pool_->Delete("v").code(), EBUSY);

  // The kernel ends a connection with NBD_CMD_DISC; the other one just goes away.
  SendRequest(fds[0], nbd::kCmdDisc, 0, 99, 0, 0);
  for (int fd : fds) close(fd);
  fds_.clear();
  Status s;
  test::WaitUntil([&] { return (s = pool_->Delete("v")).code() != EBUSY; },
                  std::chrono::seconds(5));
  EXPECT_TRUE(s.ok()) << s.message();
}

TEST_F(AttachSocketpairTest, FrontendExportServerReportsSizeAndFlags) {
  ASSERT_TRUE(pool_->Create("v", 32 * kMiB, {}).ok());
  ASSERT_TRUE(frontend_->Start().ok());
  auto server = MakeFrontendExportServer(*pool_, *frontend_);
  auto e = server->Serve("v", 2);
  ASSERT_TRUE(e.ok()) << e.status().message();
  EXPECT_EQ(e->size_bytes, 32 * kMiB);
  EXPECT_FALSE(e->read_only);
  ASSERT_EQ(e->client_fds.size(), 2u);
  for (int fd : e->client_fds) fds_.push_back(fd);
  Bytes got;
  SendRequest(e->client_fds[1], nbd::kCmdRead, 0, 5, 0, 4096);
  ExpectSimpleReply(e->client_fds[1], 5, 0, &got, 4096);
  EXPECT_EQ(server->Serve("nope", 1).status().code(), ENOENT);
}

}  // namespace
}  // namespace nbdcsi::datapath
