// NBD TLS plumbing (datapath/engine/nbd_tls.h) without a daemon: what the server context
// accepts as material and when a reload replaces it, and the TlsTerminator between an OpenSSL
// client and the "worker" end of a socketpair: integrity both ways under backpressure, bytes
// already decrypted inside the session at hand-off, half-close in each direction, an abrupt
// client, and Stop. Certificates: test/tls/make-certs.sh into a temp dir.
#include "datapath/engine/nbd_tls.h"
#include "common/openssl_ptr.h"
#include "test/support/certs.h"
#include "test/support/wait.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using namespace nbdcsi;
using namespace nbdcsi::datapath;
using namespace std::chrono_literals;

namespace {

const test::TestCerts& C() {
  static test::TestCerts c("nbd_tls_test");
  return c;
}

NbdTlsFiles ServerFiles(const std::string& set = "") {
  return {C()(set + "server.crt"), C()(set + "server.key"), C()(set + "ca.crt")};
}

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
void Spit(const std::string& path, const std::string& data) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << data;
}

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  std::mt19937 g(seed);
  for (auto& b : v) b = static_cast<uint8_t>(g());
  return v;
}

using SslPtr = CPtr<SSL, SSL_free>;

// An OpenSSL client that trusts `ca` and presents `cert` (none if empty).
SslCtxPtr ClientCtx(const std::string& ca, const std::string& cert) {
  SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  SSL_CTX_load_verify_locations(ctx.get(), ca.c_str(), nullptr);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  if (!cert.empty()) {
    SSL_CTX_use_certificate_chain_file(ctx.get(), C()(cert + ".crt").c_str());
    SSL_CTX_use_PrivateKey_file(ctx.get(), C()(cert + ".key").c_str(), SSL_FILETYPE_PEM);
  }
  return ctx;
}

bool WaitFd(int fd, short events, int ms = 5000) {
  pollfd p{fd, events, 0};
  return poll(&p, 1, ms) == 1;
}

// A TLS connection over a socketpair, handshake done: the client end (blocking, OpenSSL) and
// the server end (non-blocking, a TlsSession from the context), as the frontend leaves it.
struct Conn {
  int client_fd = -1;
  int server_fd = -1;
  SslPtr client;
  TlsSession server;
  std::string server_error;  // why Accept failed, if it did
  bool client_ok = false;

  ~Conn() {
    if (client_fd >= 0) close(client_fd);
    if (server_fd >= 0) close(server_fd);
  }
};

std::unique_ptr<Conn> Handshake(NbdTlsContext& ctx, SSL_CTX* client_ctx) {
  auto c = std::make_unique<Conn>();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return nullptr;
  c->client_fd = sv[0];
  c->server_fd = sv[1];
  fcntl(c->server_fd, F_SETFL, fcntl(c->server_fd, F_GETFL) | O_NONBLOCK);
  auto s = ctx.NewSession(c->server_fd);
  if (!s.ok()) return nullptr;
  c->server = std::move(s.value());
  c->client.reset(SSL_new(client_ctx));
  SSL_set_fd(c->client.get(), c->client_fd);
  auto client = std::async(std::launch::async, [&] { return SSL_connect(c->client.get()) == 1; });
  for (;;) {
    TlsIo r = c->server.Accept();
    if (r.kind == TlsIo::Kind::kDone) break;
    if (r.kind == TlsIo::Kind::kWantRead || r.kind == TlsIo::Kind::kWantWrite) {
      if (!WaitFd(c->server_fd, r.kind == TlsIo::Kind::kWantRead ? POLLIN : POLLOUT)) {
        c->server_error = "timeout";
        break;
      }
      continue;
    }
    c->server_error = r.error.empty() ? "closed" : r.error;
    break;
  }
  if (!c->server_error.empty()) shutdown(c->server_fd, SHUT_RDWR);  // unblock the client
  c->client_ok = client.get();
  return c;
}

// Reads exactly n bytes through the server session (the handshake phase's way of reading).
bool ServerRead(Conn& c, uint8_t* p, size_t n) {
  for (size_t got = 0; got < n;) {
    TlsIo r = c.server.Read({p + got, n - got});
    if (r.kind == TlsIo::Kind::kDone) {
      got += r.bytes;
    } else if (r.kind == TlsIo::Kind::kWantRead || r.kind == TlsIo::Kind::kWantWrite) {
      if (!WaitFd(c.server_fd, r.kind == TlsIo::Kind::kWantRead ? POLLIN : POLLOUT)) return false;
    } else {
      return false;
    }
  }
  return true;
}

bool ReadAll(int fd, std::vector<uint8_t>& out, size_t limit) {
  uint8_t buf[65536];
  while (out.size() < limit) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n == 0;
    out.insert(out.end(), buf, buf + n);
  }
  return true;
}

bool WriteAll(int fd, const uint8_t* p, size_t n) {
  while (n) {
    ssize_t k = write(fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

class NbdTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    BlockSigpipe();  // this thread plays the frontend's handshake thread
    ASSERT_TRUE(C().ok) << "make-certs.sh failed; see " << C().log();
  }
};

// ---- NbdTlsContext ----

TEST_F(NbdTlsTest, LoadRefusesBadMaterialNamingTheFlagAndReason) {
  const std::string dir = C().dir.path();
  Spit(dir + "/half.crt", Slurp(C()("server.crt")).substr(0, 300));
  Spit(dir + "/two-begins.crt", Slurp(C()("server.crt")) + "-----BEGIN CERTIFICATE-----\n");
  const struct {
    const char* what;
    NbdTlsFiles files;
    int code;
    const char* want;
  } kCases[] = {
      {"missing cert",
       {dir + "/nope.crt", C()("server.key"), C()("ca.crt")},
       ENOENT,
       "--nbd-tls-cert"},
      {"missing CA",
       {C()("server.crt"), C()("server.key"), dir + "/nope.crt"},
       ENOENT,
       "--nbd-tls-ca"},
      {"empty path", {C()("server.crt"), "", C()("ca.crt")}, EINVAL, "--nbd-tls-key is empty"},
      {"key of another certificate",
       {C()("server.crt"), C()("client.key"), C()("ca.crt")},
       EINVAL,
       "does not belong to --nbd-tls-cert"},
      {"key file holds a certificate",
       {C()("server.crt"), C()("server.crt"), C()("ca.crt")},
       EINVAL,
       "no readable PEM private key"},
      {"CA file holds a key",
       {C()("server.crt"), C()("server.key"), C()("ca.key")},
       EINVAL,
       "--nbd-tls-ca"},
      {"expired certificate",
       {C()("client-expired.crt"), C()("client-expired.key"), C()("ca.crt")},
       EINVAL,
       "expired on"},
      {"half-written certificate",
       {dir + "/half.crt", C()("server.key"), C()("ca.crt")},
       EINVAL,
       "unreadable certificate"},
      {"a dangling BEGIN line",
       {dir + "/two-begins.crt", C()("server.key"), C()("ca.crt")},
       EINVAL,
       "--nbd-tls-cert"},
  };
  for (const auto& c : kCases) {
    auto r = NbdTlsContext::Load(c.files);
    ASSERT_FALSE(r.ok()) << c.what;
    EXPECT_EQ(r.status().code(), c.code) << c.what << ": " << r.status().message();
    EXPECT_NE(r.status().message().find(c.want), std::string::npos)
        << c.what << ": " << r.status().message();
  }
  auto good = NbdTlsContext::Load(ServerFiles());
  ASSERT_TRUE(good.ok()) << good.status().message();
  EXPECT_NE((*good)->summary().find("nbd-csi test server main"), std::string::npos);
}

TEST_F(NbdTlsTest, HandshakeVerifiesClientCertificates) {
  auto ctx = NbdTlsContext::Load(ServerFiles());
  ASSERT_TRUE(ctx.ok());
  const struct {
    const char* cert;
    const char* server_error;  // "" = accepted
  } kCases[] = {
      {"client", ""},
      {"", "peer did not return a certificate"},
      {"other/client", "unable to get local issuer certificate"},
      {"client-expired", "certificate has expired"},
  };
  for (const auto& c : kCases) {
    auto cctx = ClientCtx(C()("ca.crt"), c.cert);
    auto conn = Handshake(**ctx, cctx.get());
    ASSERT_TRUE(conn) << c.cert;
    if (*c.server_error == 0) {
      EXPECT_EQ(conn->server_error, "") << c.cert;
      EXPECT_TRUE(conn->client_ok) << c.cert;
      EXPECT_NE(conn->server.Describe().find("client /CN=nbd-csi test client main"),
                std::string::npos)
          << conn->server.Describe();
    } else {
      EXPECT_NE(conn->server_error.find(c.server_error), std::string::npos)
          << c.cert << ": " << conn->server_error;
    }
  }
}

TEST_F(NbdTlsTest, ReloadKeepsWorkingMaterialUntilANewSetLoads) {
  const std::string d = C().dir / "reload";
  fs::create_directories(d);
  const NbdTlsFiles files{d + "/tls.crt", d + "/tls.key", d + "/ca.crt"};
  Spit(files.cert, Slurp(C()("server.crt")));
  Spit(files.key, Slurp(C()("server.key")));
  Spit(files.ca, Slurp(C()("ca.crt")));
  auto ctx = NbdTlsContext::Load(files);
  ASSERT_TRUE(ctx.ok()) << ctx.status().message();
  NbdTlsContext& t = **ctx;
  auto main_client = ClientCtx(C()("ca.crt"), "client");
  auto other_client = ClientCtx(C()("other/ca.crt"), "other/client");
  auto serves = [&](SSL_CTX* cc) {
    auto c = Handshake(t, cc);
    return c && c->server_error.empty() && c->client_ok;
  };
  EXPECT_FALSE(t.ReloadIfChanged()) << "nothing changed";
  ASSERT_TRUE(serves(main_client.get()));

  // cert-manager has written the new certificate but not yet the new key.
  Spit(files.cert, Slurp(C()("other/server.crt")));
  Spit(files.ca, Slurp(C()("other/ca.crt")));
  EXPECT_FALSE(t.ReloadIfChanged());
  EXPECT_FALSE(t.ReloadIfChanged()) << "still not loadable";
  EXPECT_NE(t.summary().find("server main"), std::string::npos) << t.summary();
  EXPECT_TRUE(serves(main_client.get())) << "the working material was dropped";
  EXPECT_FALSE(serves(other_client.get()));

  Spit(files.key, Slurp(C()("other/server.key")));
  EXPECT_TRUE(t.ReloadIfChanged());
  EXPECT_NE(t.summary().find("server other"), std::string::npos) << t.summary();
  EXPECT_FALSE(t.ReloadIfChanged()) << "loaded once";
  EXPECT_TRUE(serves(other_client.get()));
  EXPECT_FALSE(serves(main_client.get())) << "the old CA still admits clients";
}

TEST_F(NbdTlsTest, SessionsOutliveAReload) {
  const std::string d = C().dir / "outlive";
  fs::create_directories(d);
  const NbdTlsFiles files{d + "/tls.crt", d + "/tls.key", d + "/ca.crt"};
  for (auto [to, from] : {std::pair{files.cert, "server.crt"}, std::pair{files.key, "server.key"},
                          std::pair{files.ca, "ca.crt"}}) {
    Spit(to, Slurp(C()(from)));
  }
  auto ctx = NbdTlsContext::Load(files);
  ASSERT_TRUE(ctx.ok());
  auto cc = ClientCtx(C()("ca.crt"), "client");
  auto conn = Handshake(**ctx, cc.get());
  ASSERT_TRUE(conn && conn->server_error.empty());
  for (auto [to, from] :
       {std::pair{files.cert, "other/server.crt"}, std::pair{files.key, "other/server.key"},
        std::pair{files.ca, "other/ca.crt"}}) {
    Spit(to, Slurp(C()(from)));
  }
  ASSERT_TRUE((*ctx)->ReloadIfChanged());
  // The session made before the reload still carries data both ways.
  const char kMsg[] = "still here";
  ASSERT_EQ(SSL_write(conn->client.get(), kMsg, sizeof kMsg), static_cast<int>(sizeof kMsg));
  uint8_t got[sizeof kMsg];
  ASSERT_TRUE(ServerRead(*conn, got, sizeof got));
  EXPECT_EQ(std::string(reinterpret_cast<char*>(got)), kMsg);
}

// ---- TlsTerminator ----

class TerminatorTest : public NbdTlsTest {
 protected:
  void SetUp() override {
    NbdTlsTest::SetUp();
    auto ctx = NbdTlsContext::Load(ServerFiles());
    ASSERT_TRUE(ctx.ok());
    ctx_ = std::move(ctx.value());
    client_ctx_ = ClientCtx(C()("ca.crt"), "client");
    ASSERT_TRUE(term_.Start().ok());
  }
  // A handshaken connection handed to the terminator; worker_ is the worker's end (blocking).
  std::unique_ptr<Conn> Hand(std::unique_ptr<Conn> c = nullptr) {
    if (!c) c = Handshake(*ctx_, client_ctx_.get());
    EXPECT_TRUE(c && c->server_error.empty());
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    worker_ = sv[1];
    term_.Add(std::move(c->server), c->server_fd, sv[0], "test client");
    c->server_fd = -1;  // the terminator owns it now
    return c;
  }
  void TearDown() override {
    term_.Stop(1s);
    if (worker_ >= 0) close(worker_);
  }
  bool WaitNoConnections() {
    test::WaitUntil([&] { return term_.connections() == 0; }, 5000ms);
    return term_.connections() == 0;
  }

  std::unique_ptr<NbdTlsContext> ctx_;
  SslCtxPtr client_ctx_;
  TlsTerminator term_{0};
  int worker_ = -1;
};

TEST_F(TerminatorTest, CarriesBytesBothWaysIntactThenClosesCleanly) {
  auto c = Hand();
  const auto up = RandomBytes(6 << 20, 1);    // client -> worker
  const auto down = RandomBytes(5 << 20, 2);  // worker -> client
  // The worker reads late, so the terminator's queue and the socket buffers fill up first.
  auto worker_reader = std::async(std::launch::async, [&] {
    // The stimulus: a reader that is late on purpose, so that the buffers fill up.
    std::this_thread::sleep_for(200ms);
    std::vector<uint8_t> got;
    const bool eof = ReadAll(worker_, got, up.size() + 1);
    return std::pair{eof, got};
  });
  auto worker_writer =
      std::async(std::launch::async, [&] { return WriteAll(worker_, down.data(), down.size()); });

  // One client thread drives both directions of its SSL object, non-blocking.
  SSL* s = c->client.get();
  fcntl(c->client_fd, F_SETFL, fcntl(c->client_fd, F_GETFL) | O_NONBLOCK);
  // A small send buffer, so that the client's writes, its close_notify included, often find it
  // full (as on a loaded machine), and the retries are exercised every run.
  const int sndbuf = 4096;
  setsockopt(c->client_fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  std::vector<uint8_t> got_down;
  size_t sent = 0;
  bool shut = false;
  bool peer_closed = false;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  auto all_moved = [&] { return sent == up.size() && shut && got_down.size() >= down.size(); };
  while (!peer_closed && !all_moved() && std::chrono::steady_clock::now() < deadline) {
    bool progress = false;
    if (sent < up.size()) {
      int n = SSL_write(s, up.data() + sent,
                        static_cast<int>(std::min<size_t>(up.size() - sent, 100000)));
      if (n > 0) {
        sent += static_cast<size_t>(n);
        progress = true;
      }
    } else if (!shut) {
      // close_notify: the worker must see EOF after the last byte. On a full socket buffer (a
      // loaded machine: the terminator reads late) the non-blocking call cannot send it yet and
      // says so (-1, WANT_WRITE): try again, or the worker waits for EOF forever.
      ERR_clear_error();
      if (SSL_shutdown(s) >= 0) {
        shut = true;
        progress = true;
      }
    }
    uint8_t buf[65536];
    int n = SSL_read(s, buf, sizeof buf);
    if (n > 0) {
      got_down.insert(got_down.end(), buf, buf + n);
      progress = true;
    } else if (SSL_get_error(s, n) == SSL_ERROR_ZERO_RETURN) {
      peer_closed = true;
    }
    if (!progress && !peer_closed) WaitFd(c->client_fd, POLLIN | POLLOUT, 50);
  }
  if (!peer_closed && !all_moved()) {
    // Stuck: unblock the worker's threads (their futures would wait forever) and fail.
    shutdown(worker_, SHUT_RDWR);
    worker_writer.wait();
    worker_reader.wait();
    FAIL() << "no progress within 60 s: sent " << sent << " of " << up.size() << ", shutdown "
           << (shut ? "sent" : "not sent") << ", received " << got_down.size() << " of "
           << down.size();
  }
  ASSERT_TRUE(worker_writer.get());
  // The worker is done writing; closing its end is what ends the connection (after the
  // client's stream was read to EOF).
  auto [eof, got_up] = worker_reader.get();
  EXPECT_TRUE(eof) << "the client's close_notify did not reach the worker as EOF";
  EXPECT_TRUE(got_up == up) << "client -> worker bytes differ (" << got_up.size() << " of "
                            << up.size() << ")";
  close(worker_);
  worker_ = -1;
  // Now the terminator flushes and says close_notify.
  while (!peer_closed && std::chrono::steady_clock::now() < deadline) {
    uint8_t buf[65536];
    int n = SSL_read(s, buf, sizeof buf);
    if (n > 0) {
      got_down.insert(got_down.end(), buf, buf + n);
    } else if (SSL_get_error(s, n) == SSL_ERROR_ZERO_RETURN) {
      peer_closed = true;
    } else {
      WaitFd(c->client_fd, POLLIN, 50);
    }
  }
  EXPECT_TRUE(peer_closed) << "no close_notify from the terminator";
  EXPECT_TRUE(got_down == down) << "worker -> client bytes differ (" << got_down.size() << " of "
                                << down.size() << ")";
  EXPECT_TRUE(WaitNoConnections());
}

TEST_F(TerminatorTest, DeliversBytesDecryptedBeforeTheHandOff) {
  auto c = Handshake(*ctx_, client_ctx_.get());
  ASSERT_TRUE(c && c->server_error.empty());
  // One write, one TLS record: a 16-byte "option" the handshake phase reads, and what the
  // client pipelined behind it, which is then decrypted inside the session and nowhere else
  // (the socket is empty; no fd event will announce these bytes).
  auto msg = RandomBytes(16 + 12000, 3);
  ASSERT_EQ(SSL_write(c->client.get(), msg.data(), static_cast<int>(msg.size())),
            static_cast<int>(msg.size()));
  uint8_t first[16];
  ASSERT_TRUE(ServerRead(*c, first, sizeof first));
  ASSERT_TRUE(std::equal(first, first + 16, msg.begin()));
  c = Hand(std::move(c));
  SSL_shutdown(c->client.get());
  std::vector<uint8_t> got;
  EXPECT_TRUE(ReadAll(worker_, got, msg.size()));
  EXPECT_TRUE(std::equal(got.begin(), got.end(), msg.begin() + 16, msg.end()) &&
              got.size() == msg.size() - 16)
      << "got " << got.size() << " bytes";
  close(worker_);
  worker_ = -1;
  EXPECT_TRUE(WaitNoConnections());
}

TEST_F(TerminatorTest, AnAbruptClientEndsTheConnectionTowardsTheWorker) {
  auto c = Hand();
  close(c->client_fd);  // no close_notify
  c->client_fd = -1;
  std::vector<uint8_t> got;
  ASSERT_TRUE(WaitFd(worker_, POLLIN));
  EXPECT_TRUE(ReadAll(worker_, got, 1)) << "the worker did not see EOF";
  EXPECT_TRUE(got.empty());
  close(worker_);
  worker_ = -1;
  EXPECT_TRUE(WaitNoConnections());
}

TEST_F(TerminatorTest, StopClosesConnectionsThatDoNotFinish) {
  auto c = Hand();
  // The worker never closes: Stop must not wait longer than its grace.
  const auto t0 = std::chrono::steady_clock::now();
  term_.Stop(200ms);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  EXPECT_EQ(term_.connections(), 0u);
  std::vector<uint8_t> got;
  EXPECT_TRUE(ReadAll(worker_, got, 1)) << "the worker's end was not closed";
  uint8_t b;
  EXPECT_LE(SSL_read(c->client.get(), &b, 1), 0) << "the client's connection is still open";

  // Added after Stop: closed at once, nothing leaks or hangs.
  auto late = Handshake(*ctx_, client_ctx_.get());
  ASSERT_TRUE(late && late->server_error.empty());
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  term_.Add(std::move(late->server), late->server_fd, sv[0], "late");
  late->server_fd = -1;
  got.clear();
  EXPECT_TRUE(ReadAll(sv[1], got, 1));
  close(sv[1]);
  EXPECT_EQ(term_.connections(), 0u);
}

}  // namespace
