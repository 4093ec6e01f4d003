#include "common/endpoint.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "test/support/temp_dir.h"

namespace nbdcsi {
namespace {

TEST(ParseEndpoint, Accepts) {
  struct Case {
    const char* in;
    Endpoint::Kind kind;
    const char* path;
    const char* host;
    uint16_t port;
    const char* grpc;
  };
  const Case cases[] = {
      {"unix:///run/nbd-csi/datapath.sock", Endpoint::Kind::kUnix,
       "/run/nbd-csi/datapath.sock", "", 0, "unix:///run/nbd-csi/datapath.sock"},
      {"unix:///a", Endpoint::Kind::kUnix, "/a", "", 0, "unix:///a"},
      {"tcp://127.0.0.1:9000", Endpoint::Kind::kTcp, "", "127.0.0.1", 9000, "127.0.0.1:9000"},
      {"tcp://localhost:1", Endpoint::Kind::kTcp, "", "localhost", 1, "localhost:1"},
      {"tcp://node-1.example.com:65535", Endpoint::Kind::kTcp, "", "node-1.example.com", 65535,
       "node-1.example.com:65535"},
      {"tcp://[::1]:10809", Endpoint::Kind::kTcp, "", "::1", 10809, "[::1]:10809"},
      {"tcp://[fe80::1:2]:80", Endpoint::Kind::kTcp, "", "fe80::1:2", 80, "[fe80::1:2]:80"},
      {"tcp://0.0.0.0:8080", Endpoint::Kind::kTcp, "", "0.0.0.0", 8080, "0.0.0.0:8080"},
  };
  for (const auto& c : cases) {
    auto r = ParseEndpoint(c.in);
    ASSERT_TRUE(r.ok()) << c.in << ": " << r.status().message();
    EXPECT_EQ(r->kind, c.kind) << c.in;
    EXPECT_EQ(r->path, c.path) << c.in;
    EXPECT_EQ(r->host, c.host) << c.in;
    EXPECT_EQ(r->port, c.port) << c.in;
    EXPECT_EQ(r->GrpcTarget(), c.grpc) << c.in;
    EXPECT_EQ(r->ToString(), c.in) << "canonical form";
  }
}

TEST(ParseEndpoint, RejectsWithClearErrors) {
  std::string long_path = "unix:///" + std::string(sizeof(sockaddr_un{}.sun_path), 'x');
  std::string max_path = "unix:///" + std::string(sizeof(sockaddr_un{}.sun_path) - 2, 'x');
  ASSERT_TRUE(ParseEndpoint(max_path).ok()) << "107-byte path fits in sun_path";
  struct Case {
    std::string in;
    const char* says;
  };
  const Case cases[] = {
      {"", "empty"},
      {"/run/x.sock", "no scheme"},
      {"unix:/run/x.sock", "unix:// followed by an absolute path"},
      {"unix://run/x.sock", "must be absolute (three slashes: unix:///run/x.sock)"},
      {"unix://", "no socket path"},
      {"unix:///run/", "names a directory"},
      {long_path, "must be shorter than 108"},
      {std::string("unix:///a\0b", 11), "NUL"},
      {"http://x:1", "unsupported scheme \"http\""},
      {"tcp://", "missing :port"},
      {"tcp://host", "missing :port"},
      {"tcp://:80", "missing host"},
      {"tcp://host:", "missing port"},
      {"tcp://host:0", "out of range"},
      {"tcp://host:65536", "out of range"},
      {"tcp://host:http", "not a number"},
      {"tcp://host:80/path", "not a number"},
      {"tcp://::1:80", "must be in brackets"},
      {"tcp://[::1:80", "missing ']'"},
      {"tcp://[::1]", "missing :port"},
      {"tcp://[zz]:80", "not an IPv6 address"},
      {"tcp://bad host:80", "not a valid host"},
      {"tcp://-x:80", "not a valid host"},
  };
  for (const auto& c : cases) {
    auto r = ParseEndpoint(c.in);
    ASSERT_FALSE(r.ok()) << "accepted " << c.in;
    EXPECT_EQ(r.status().code(), EINVAL) << c.in;
    EXPECT_NE(r.status().message().find(c.says), std::string::npos)
        << c.in << " -> " << r.status().message();
  }
}

class StaleSocket : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("endpoint_test")) << tmp_.error();
    dir_ = tmp_.path();
    path_ = dir_ + "/s.sock";
  }
  void TearDown() override {
    unlink(path_.c_str());
    rmdir(dir_.c_str());
  }
  // A bound socket; listening or not. Returns the fd.
  int Bind(bool listen_too) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    EXPECT_GE(fd, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path_.c_str(), sizeof(a.sun_path) - 1);
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0) << strerror(errno);
    if (listen_too) {
      EXPECT_EQ(listen(fd, 4), 0);
    }
    return fd;
  }
  bool Exists() {
    struct stat st{};
    return lstat(path_.c_str(), &st) == 0;
  }
  test::TempDir tmp_;
  std::string dir_, path_;
};

TEST_F(StaleSocket, MissingPathIsFine) {
  EXPECT_TRUE(RemoveStaleUnixSocket(path_).ok());
}

TEST_F(StaleSocket, RemovesSocketNobodyListensOn) {
  int fd = Bind(false);
  close(fd);  // the file stays behind, as after a crash
  ASSERT_TRUE(Exists());
  Status s = RemoveStaleUnixSocket(path_);
  EXPECT_TRUE(s.ok()) << s.message();
  EXPECT_FALSE(Exists());
}

TEST_F(StaleSocket, BoundButNotListeningIsStale) {
  int fd = Bind(false);
  Status s = RemoveStaleUnixSocket(path_);
  EXPECT_TRUE(s.ok()) << s.message();
  EXPECT_FALSE(Exists());
  close(fd);
}

TEST_F(StaleSocket, LiveListenerIsInUse) {
  int fd = Bind(true);
  Status s = RemoveStaleUnixSocket(path_);
  EXPECT_EQ(s.code(), EADDRINUSE);
  EXPECT_NE(s.message().find("is in use by a running process"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(path_), std::string::npos);
  EXPECT_TRUE(Exists()) << "a live socket must never be removed";
  close(fd);
}

TEST_F(StaleSocket, RegularFileIsNotTouched) {
  { std::ofstream(path_) << "precious"; }
  Status s = RemoveStaleUnixSocket(path_);
  EXPECT_EQ(s.code(), EEXIST);
  EXPECT_NE(s.message().find("not a socket"), std::string::npos) << s.message();
  std::ifstream in(path_);
  std::string content;
  in >> content;
  EXPECT_EQ(content, "precious");
}

TEST_F(StaleSocket, DirectoryIsNotTouched) {
  ASSERT_EQ(mkdir(path_.c_str(), 0700), 0);
  EXPECT_EQ(RemoveStaleUnixSocket(path_).code(), EEXIST);
  EXPECT_EQ(rmdir(path_.c_str()), 0);
}

TEST_F(StaleSocket, RejectsOverlongPath) {
  EXPECT_EQ(RemoveStaleUnixSocket("/" + std::string(200, 'x')).code(), EINVAL);
}

}  // namespace
}  // namespace nbdcsi
