// The replica client against real NBD servers, each started by the test and stopped by it:
//   qemu-nbd (raw file) and nbdkit (memory plugin), plaintext on a Unix socket and mutual TLS
//   on 127.0.0.1 TCP with certificates from test/tls/make-certs.sh; nbd-datapathd, a volume of
//   its pool, on its Unix socket and on its TLS TCP listener.
// For each: rounds of random writes (some with FUA), trims and write-zeroes at queue depth up
// to 32 over 4 connections, flushes; then the whole export read back through the client and,
// independently, through nbdcopy (libnbd), both compared with the test's model of the disk.
// Then the server is killed with SIGKILL under load: every request in flight completes once,
// with an error, and nothing hangs. For TLS: a CA that did not sign the server, and (datapathd)
// a certificate that does not name the expected node, are refused with clear errors.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "datapath/replica/client.h"
#include "test/support/child_proc.h"
#include "test/support/free_port.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::replica {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using test::Bin;
using test::CanConnect;
using test::Have;
using test::Proc;
using test::ReadFile;
using test::Src;

constexpr uint64_t kSize = 64ull << 20;

enum class Server { kQemuNbd, kNbdkit, kDatapathd };
struct Variant {
  Server server;
  bool tls;
  const char* name;
};

// Certificates shared by the suite: make-certs.sh once, with a node certificate for "node-a",
// laid out for each consumer (qemu and nbdkit want ca-cert.pem/server-cert.pem/server-key.pem,
// libnbd ca-cert.pem/client-cert.pem/client-key.pem).
class Certs {
 public:
  static Certs& Get() {
    static Certs c;
    return c;
  }
  bool ok = false;
  std::string dir() const { return tmp.path() + "/c"; }
  std::string server_dir() const { return tmp.path() + "/server"; }
  std::string client_dir() const { return tmp.path() + "/client"; }
  test::TempDir tmp{"replica-certs"};

 private:
  Certs() {
    const std::string cmd = Src() + "/test/tls/make-certs.sh " + dir() + " node-a >" + tmp.path() +
                            "/make-certs.log 2>&1";
    if (std::system(cmd.c_str()) != 0) return;
    fs::create_directories(server_dir());
    fs::create_directories(client_dir());
    fs::copy_file(dir() + "/ca.crt", server_dir() + "/ca-cert.pem");
    fs::copy_file(dir() + "/server.crt", server_dir() + "/server-cert.pem");
    fs::copy_file(dir() + "/server.key", server_dir() + "/server-key.pem");
    fs::copy_file(dir() + "/ca.crt", client_dir() + "/ca-cert.pem");
    fs::copy_file(dir() + "/client.crt", client_dir() + "/client-cert.pem");
    fs::copy_file(dir() + "/client.key", client_dir() + "/client-key.pem");
    ok = true;
  }
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

class ReplicaClientReal : public ::testing::TestWithParam<Variant> {
 protected:
  void SetUp() override {
    const Variant v = GetParam();
    for (const char* t : {"nbdcopy", v.server == Server::kQemuNbd ? "qemu-nbd" : "nbdkit"}) {
      if (v.server == Server::kDatapathd && std::string(t) != "nbdcopy") continue;
      if (!Have(t)) {
        GTEST_SKIP() << "needs " << t << " (scripts/deps.sh test installs it)";
      }
    }
    ASSERT_TRUE(dir_.ok()) << dir_.error();
    if (v.tls) {
      ASSERT_TRUE(Certs::Get().ok) << "make-certs.sh failed";
    }
    StartServer();
  }

  void StartServer() {
    const Variant v = GetParam();
    const Certs& c = Certs::Get();
    port_ = test::FreeLoopbackPort();
    ep_ = {};
    if (v.tls) {
      ep_.kind = Endpoint::Kind::kTcp;
      ep_.host = "127.0.0.1";
      ep_.port = static_cast<uint16_t>(port_);
    } else {
      ep_.kind = Endpoint::Kind::kUnix;
      ep_.path = dir_ / "nbd.sock";
    }
    const std::string log = dir_ / "server.log";
    const std::string port = std::to_string(port_);
    std::vector<std::string> argv;
    switch (v.server) {
      case Server::kQemuNbd: {
        const std::string img = dir_ / "disk.img";
        if (!fs::exists(img)) {
          std::ofstream(img).close();
          fs::resize_file(img, kSize);
        }
        argv = {"qemu-nbd",    "--format=raw",   "-x", "vol", "--persistent",
                "--shared=16", "--discard=unmap"};
        if (v.tls) {
          argv.insert(argv.end(), {"--object",
                                   "tls-creds-x509,id=tls0,dir=" + c.server_dir() +
                                       ",endpoint=server,verify-peer=on",
                                   "--tls-creds=tls0", "--bind=127.0.0.1", "--port=" + port});
        } else {
          argv.push_back("--socket=" + ep_.path);
        }
        argv.push_back(img);
        break;
      }
      case Server::kNbdkit:
        argv = {"nbdkit", "-f", "--exportname=vol"};
        if (v.tls) {
          argv.insert(argv.end(), {"-i", "127.0.0.1", "-p", port, "--tls=require",
                                   "--tls-certificates=" + c.server_dir(), "--tls-verify-peer"});
        } else {
          argv.insert(argv.end(), {"-U", ep_.path});
        }
        argv.insert(argv.end(), {"memory", "size=" + std::to_string(kSize)});
        break;
      case Server::kDatapathd: {
        const std::string pool = dir_ / "pool";
        fs::create_directories(pool);
        api_ = dir_ / "api.sock";
        const std::string unix_nbd = dir_ / "nbd.sock";
        argv = {Bin("nbd-datapathd"), "--pool", pool, "--api", "unix://" + api_, "--nbd-listen",
                "unix://" + unix_nbd};
        if (v.tls) {
          // The node certificate: its URI SAN names node-a, its IP SAN 127.0.0.1.
          argv.insert(argv.end(),
                      {"--nbd-listen", "tcp://127.0.0.1:" + port, "--nbd-tls-cert",
                       c.dir() + "/node-node-a.crt", "--nbd-tls-key", c.dir() + "/node-node-a.key",
                       "--nbd-tls-ca", c.dir() + "/ca.crt"});
        }
        break;
      }
    }
    ASSERT_TRUE(server_.Start(argv, log));
    if (v.server == Server::kDatapathd) {
      Endpoint api;
      api.kind = Endpoint::Kind::kUnix;
      api.path = api_;
      ASSERT_TRUE(test::WaitUntil([&] { return CanConnect(api) && CanConnect(ep_); }, 20s))
          << ReadFile(log);
      if (!volume_made_) {
        const std::string cmd = Bin("nbdctl") + " --api unix://" + api_ +
                                " volume create vol --size 64Mi >>" + log + " 2>&1";
        ASSERT_EQ(std::system(cmd.c_str()), 0) << ReadFile(log);
        volume_made_ = true;
      }
    } else {
      ASSERT_TRUE(test::WaitUntil([&] { return CanConnect(ep_); }, 20s)) << ReadFile(log);
    }
  }

  ClientOptions Options() {
    ClientOptions o;
    o.endpoint = ep_;
    o.export_name = "vol";
    o.connections = 4;
    o.request_timeout = 20s;
    if (GetParam().tls) {
      const Certs& c = Certs::Get();
      o.tls.cert = c.dir() + "/client.crt";
      o.tls.key = c.dir() + "/client.key";
      o.tls.ca = c.dir() + "/ca.crt";
    }
    return o;
  }

  // The export through an independent client: libnbd's nbdcopy.
  std::string NbdcopyAll() {
    std::string uri;
    if (GetParam().tls) {
      uri = "nbds://127.0.0.1:" + std::to_string(port_) +
            "/vol?tls-certificates=" + Certs::Get().client_dir();
    } else {
      uri = "nbd+unix:///vol?socket=" + ep_.path;
    }
    const std::string out = dir_ / "nbdcopy.raw";
    auto bytes = test::NbdcopyRead(uri, out, dir_ / "nbdcopy.log");
    if (!bytes) ADD_FAILURE() << "nbdcopy failed: " << ReadFile(dir_ / "nbdcopy.log");
    return bytes.value_or("");
  }

  test::TempDir dir_{"replica-it"};
  Proc server_;
  Endpoint ep_;
  int port_ = 0;
  std::string api_;
  bool volume_made_ = false;
};

// Waits for n callbacks; records the first error.
struct Batch {
  std::mutex mu;
  size_t done = 0;
  std::vector<Status> errors;
  Callback Cb() {
    return [this](const Status& s) {
      std::lock_guard lk(mu);
      ++done;
      if (!s.ok()) errors.push_back(s);
    };
  }
  bool Wait(size_t n) {
    return test::WaitUntil(
        [&] {
          std::lock_guard lk(mu);
          return done >= n;
        },
        60s);
  }
};

TEST_P(ReplicaClientReal, RandomWritesTrimsZeroesReadBackThroughTwoClients) {
  auto client = ReplicaClient::Connect(Options());
  ASSERT_TRUE(client.ok()) << client.status().message();
  ReplicaClient& c = **client;
  const ExportProperties& p = c.export_properties();
  ASSERT_EQ(p.size, kSize);
  EXPECT_EQ(c.healthy_connections(), 4u);
  std::vector<uint8_t> model(kSize, 0);
  // The export may hold old bytes (qemu-nbd: a fresh sparse file, nbdkit: memory, datapathd: a
  // fresh volume): all zero at the start, which the first read-back below also proves.
  std::mt19937_64 rng(20261206);
  constexpr uint64_t kRegion = 1 << 20;  // one request per region per round: none overlap
  std::vector<std::vector<uint8_t>> bufs(32);
  uint64_t writes = 0, trims = 0, zeroes = 0, fuas = 0;
  for (int round = 0; round < 12; ++round) {
    std::vector<uint64_t> regions(kSize / kRegion);
    for (uint64_t i = 0; i < regions.size(); ++i) regions[i] = i;
    std::shuffle(regions.begin(), regions.end(), rng);
    Batch b;
    for (int k = 0; k < 32; ++k) {
      const uint64_t len = 4096 * (1 + rng() % 64);
      const uint64_t off = regions[k] * kRegion + 4096 * (rng() % ((kRegion - len) / 4096 + 1));
      const int kind = static_cast<int>(rng() % 10);
      Status st;
      if (kind < 7) {
        bufs[k].resize(len);
        for (auto& x : bufs[k]) x = static_cast<uint8_t>(rng());
        std::copy(bufs[k].begin(), bufs[k].end(), model.begin() + static_cast<long>(off));
        const bool fua = kind == 0;
        fuas += fua;
        ++writes;
        st = c.Write(off, bufs[k], fua, b.Cb());
      } else if (kind < 9) {
        std::fill_n(model.begin() + static_cast<long>(off), len, 0);
        ++zeroes;
        st = c.WriteZeroes(off, static_cast<uint32_t>(len), false, kind == 8, b.Cb());
      } else {
        std::fill_n(model.begin() + static_cast<long>(off), len, 0);
        ++trims;
        st = c.Trim(off, static_cast<uint32_t>(len), false, b.Cb());
      }
      ASSERT_TRUE(st.ok()) << st.message();
    }
    ASSERT_TRUE(b.Wait(32));
    ASSERT_TRUE(b.errors.empty()) << b.errors[0].message();
    if (round % 4 == 3) {
      Batch f;
      ASSERT_TRUE(c.Flush(f.Cb()).ok());
      ASSERT_TRUE(f.Wait(1));
      ASSERT_TRUE(f.errors.empty()) << f.errors[0].message();
    }
  }
  EXPECT_GT(fuas, 0u);
  EXPECT_GT(trims, 0u);
  EXPECT_GT(zeroes, 0u);

  // Back through the client: 1 MiB reads, 16 at a time.
  std::vector<uint8_t> back(kSize, 0xee);
  for (uint64_t off = 0; off < kSize; off += 16 * kRegion) {
    Batch r;
    for (int k = 0; k < 16; ++k) {
      ASSERT_TRUE(
          c.Read(off + k * kRegion, std::span(back).subspan(off + k * kRegion, kRegion), r.Cb())
              .ok());
    }
    ASSERT_TRUE(r.Wait(16));
    ASSERT_TRUE(r.errors.empty()) << r.errors[0].message();
  }
  for (uint64_t off = 0; off < kSize; off += 4096) {
    ASSERT_TRUE(std::equal(back.begin() + off, back.begin() + off + 4096, model.begin() + off))
        << "the client reads other bytes than were written at " << off;
  }
  auto k = c.counters();
  EXPECT_EQ(k.errors, 0u);
  EXPECT_EQ(k.bytes_read, kSize);
  EXPECT_EQ(k.in_flight, 0u);
  c.Close(5s);

  // And through libnbd, which shares no code with us.
  const std::string copy = NbdcopyAll();
  ASSERT_EQ(copy.size(), kSize);
  for (uint64_t off = 0; off < kSize; off += 4096) {
    ASSERT_EQ(std::memcmp(copy.data() + off, model.data() + off, 4096), 0)
        << "nbdcopy reads other bytes than the client wrote at " << off;
  }
  std::printf("%s: %llu writes (%llu FUA), %llu write-zeroes, %llu trims verified by two clients\n",
              GetParam().name, (unsigned long long)writes, (unsigned long long)fuas,
              (unsigned long long)zeroes, (unsigned long long)trims);
}

TEST_P(ReplicaClientReal, ServerKilledMidIoFailsEveryPendingRequestOnce) {
  auto client = ReplicaClient::Connect(Options());
  ASSERT_TRUE(client.ok()) << client.status().message();
  ReplicaClient& c = **client;
  std::vector<uint8_t> data(65536, 0x5a);
  std::vector<std::vector<uint8_t>> rbufs(32, std::vector<uint8_t>(65536));
  std::atomic<uint64_t> ok{0}, failed{0}, calls{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<Status> errors;
  // 32 loops, each resubmitting from its own callback until the first error.
  std::function<void(int)> go = [&](int slot) {
    Callback cb = [&, slot](const Status& s) {
      calls++;
      if (s.ok()) {
        ok++;
        if (!stop) go(slot);
      } else {
        failed++;
        std::lock_guard lk(mu);
        errors.push_back(s);
      }
    };
    const uint64_t off = uint64_t(slot) << 20;
    Status st = slot % 2 ? c.Read(off, rbufs[slot], cb) : c.Write(off, data, slot % 4 == 0, cb);
    if (!st.ok()) {
      // Refused at submit (the last connection died meanwhile): counted, no callback to come.
      failed++;
      calls++;
      std::lock_guard lk(mu);
      errors.push_back(st);
    }
  };
  for (int s = 0; s < 32; ++s) go(s);
  ASSERT_TRUE(test::WaitUntil([&] { return ok.load() > 200; }, 30s)) << "no progress";
  server_.Kill(SIGKILL);
  // Every one of the 32 loops ends with exactly one failure, and promptly.
  ASSERT_TRUE(test::WaitUntil([&] { return failed.load() == 32; }, 15s))
      << failed.load() << " of 32 loops ended";
  // A window for a wrong outcome: no loop fails a second time.
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(failed.load(), 32u);
  EXPECT_EQ(calls.load(), ok.load() + 32);
  for (auto& e : errors) {
    EXPECT_TRUE(e.code() == ECONNRESET || e.code() == EPIPE || e.code() == ENOTCONN)
        << e.code() << ": " << e.message();
  }
  EXPECT_EQ(c.healthy_connections(), 0u);
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(c.Read(0, buf, [](const Status&) { ADD_FAILURE() << "callback after refusal"; }).code(),
            ENOTCONN);
  EXPECT_EQ(c.counters().in_flight, 0u);
  std::printf("%s: %llu requests ok before the kill, then 32 failures: %s\n", GetParam().name,
              (unsigned long long)ok.load(), errors.empty() ? "" : errors[0].message().c_str());
}

TEST_P(ReplicaClientReal, WrongCaIsAClearTlsError) {
  if (!GetParam().tls) {
    GTEST_SKIP() << "plaintext";
  }
  auto o = Options();
  o.tls.ca = Certs::Get().dir() + "/other/ca.crt";
  o.connections = 1;
  auto c = ReplicaClient::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), EACCES) << c.status().message();
  EXPECT_NE(c.status().message().find("certificate is refused"), std::string::npos)
      << c.status().message();
  // Our certificate from another CA: the server refuses it.
  o = Options();
  o.tls.cert = Certs::Get().dir() + "/other/client.crt";
  o.tls.key = Certs::Get().dir() + "/other/client.key";
  o.connections = 1;
  c = ReplicaClient::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), EACCES) << c.status().message();
  EXPECT_NE(c.status().message().find("TLS"), std::string::npos) << c.status().message();
  std::printf("%s: refused: %s\n", GetParam().name, c.status().message().c_str());
}

TEST_P(ReplicaClientReal, ServerNodeIdentityIsChecked) {
  if (!GetParam().tls || GetParam().server != Server::kDatapathd) {
    GTEST_SKIP() << "datapathd TLS";
  }
  auto o = Options();
  o.connections = 1;
  o.tls.server_node = "node-a";
  auto c = ReplicaClient::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().message();
  (*c)->Close();
  o.tls.server_node = "node-b";
  c = ReplicaClient::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), EACCES) << c.status().message();
  EXPECT_NE(c.status().message().find("does not name node node-b"), std::string::npos)
      << c.status().message();
}

TEST_P(ReplicaClientReal, UnknownExportIsEnoent) {
  if (GetParam().server == Server::kNbdkit) {
    GTEST_SKIP() << "nbdkit's memory plugin serves any name";
  }
  auto o = Options();
  o.export_name = "nope";
  o.connections = 1;
  auto c = ReplicaClient::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ENOENT) << c.status().message();
}

// The fencing contract end to end, client and server both ours: a client at epoch 3 writes; a
// client at epoch 4 opens the volume (fencing it); the epoch-3 client's next write fails with
// EPERM and does not land; a new connection at 3 is ESTALE; one without an epoch is refused.
TEST_P(ReplicaClientReal, NewerEpochFencesAnOlderClient) {
  if (GetParam().server != Server::kDatapathd) {
    GTEST_SKIP() << "fencing is nbd-datapathd's";
  }
  auto sync = [](ReplicaClient& c, auto submit) {
    std::promise<Status> p;
    auto f = p.get_future();
    Status st = submit(c, [&p](const Status& s) { p.set_value(s); });
    if (!st.ok()) return st;
    if (f.wait_for(20s) != std::future_status::ready) return Error(ETIMEDOUT, "no callback");
    return f.get();
  };
  auto write = [&](ReplicaClient& c, uint64_t off, const std::vector<uint8_t>& d) {
    return sync(c, [&](ReplicaClient& cc, Callback cb) { return cc.Write(off, d, true, cb); });
  };
  const std::vector<uint8_t> a(65536, 0xa3), stale(65536, 0x5e);
  auto o = Options();
  o.connections = 2;
  o.epoch = 3;
  auto old_target = ReplicaClient::Connect(o);
  ASSERT_TRUE(old_target.ok()) << old_target.status().message();
  ASSERT_TRUE(write(**old_target, 0, a).ok());

  o.epoch = 4;
  auto new_target = ReplicaClient::Connect(o);
  ASSERT_TRUE(new_target.ok()) << new_target.status().message();
  Status refused = write(**old_target, 0, stale);
  EXPECT_EQ(refused.code(), EPERM) << refused.message();
  std::vector<uint8_t> back(65536);
  Status r = sync(**new_target, [&](ReplicaClient& c, Callback cb) { return c.Read(0, back, cb); });
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(back, a) << "the fenced client's write landed";

  o.epoch = 3;
  o.connections = 1;
  auto again = ReplicaClient::Connect(o);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), ESTALE) << again.status().message();
  EXPECT_NE(again.status().message().find("stale epoch 3"), std::string::npos)
      << again.status().message();
  o.epoch = 0;
  auto none = ReplicaClient::Connect(o);
  ASSERT_FALSE(none.ok()) << "a client without an epoch opened a fenced volume";
  EXPECT_NE(none.status().message().find("fenced at epoch 4"), std::string::npos)
      << none.status().message();
  std::printf("%s: old target refused (%s); stale reconnect: %s; no epoch: %s\n", GetParam().name,
              refused.message().c_str(), again.status().message().c_str(),
              none.status().message().c_str());
}

INSTANTIATE_TEST_SUITE_P(Servers, ReplicaClientReal,
                         ::testing::Values(Variant{Server::kQemuNbd, false, "qemu_nbd_unix"},
                                           Variant{Server::kQemuNbd, true, "qemu_nbd_tls"},
                                           Variant{Server::kNbdkit, false, "nbdkit_unix"},
                                           Variant{Server::kNbdkit, true, "nbdkit_tls"},
                                           Variant{Server::kDatapathd, false, "datapathd_unix"},
                                           Variant{Server::kDatapathd, true, "datapathd_tls"}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace nbdcsi::replica
