// Unit tests of the replica client (datapath/replica). The fake server is a real Unix socket
// server in a thread: its handshake is nbd::Negotiator (the datapath's own option phase), its
// transmission phase a script per test, so the client's parser and failure rules meet replies
// no well-behaved server would send.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "datapath/nbd/codec.h"
#include "datapath/nbd/negotiate.h"
#include "datapath/replica/client.h"
#include "datapath/replica/reply_parser.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::replica {
namespace {

using namespace std::chrono_literals;
using test::Event;
using test::TempDir;
using test::WaitUntil;

constexpr uint64_t kExportSize = 1 << 20;

// ---- reply bytes -------------------------------------------------------------------------------

std::vector<uint8_t> Header(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t len) {
  std::vector<uint8_t> v(nbd::kStructuredReplyHeaderLen);
  nbd::EncodeStructuredHeader(v.data(), flags, type, cookie, len);
  return v;
}
void Put32(std::vector<uint8_t>& v, uint32_t x) {
  uint8_t b[4];
  nbd::StoreBE32(b, x);
  v.insert(v.end(), b, b + 4);
}
void Put64(std::vector<uint8_t>& v, uint64_t x) {
  uint8_t b[8];
  nbd::StoreBE64(b, x);
  v.insert(v.end(), b, b + 8);
}
std::vector<uint8_t> DataChunk(uint64_t cookie, uint64_t off, const std::vector<uint8_t>& data,
                               bool done) {
  auto v = Header(done ? nbd::kReplyFlagDone : 0, nbd::kReplyTypeOffsetData, cookie,
                  static_cast<uint32_t>(8 + data.size()));
  Put64(v, off);
  v.insert(v.end(), data.begin(), data.end());
  return v;
}
std::vector<uint8_t> HoleChunk(uint64_t cookie, uint64_t off, uint32_t len, bool done) {
  auto v = Header(done ? nbd::kReplyFlagDone : 0, nbd::kReplyTypeOffsetHole, cookie, 12);
  Put64(v, off);
  Put32(v, len);
  return v;
}
std::vector<uint8_t> ErrorChunk(uint64_t cookie, uint32_t err, std::string msg, bool done,
                                std::optional<uint64_t> offset = std::nullopt) {
  auto v = Header(done ? nbd::kReplyFlagDone : 0,
                  offset ? nbd::kReplyTypeErrorOffset : nbd::kReplyTypeError, cookie,
                  static_cast<uint32_t>(6 + msg.size() + (offset ? 8 : 0)));
  Put32(v, err);
  v.push_back(static_cast<uint8_t>(msg.size() >> 8));
  v.push_back(static_cast<uint8_t>(msg.size()));
  v.insert(v.end(), msg.begin(), msg.end());
  if (offset) Put64(v, *offset);
  return v;
}
std::vector<uint8_t> BsChunk(uint64_t cookie, uint32_t ctx,
                             std::initializer_list<std::pair<uint32_t, uint32_t>> extents,
                             bool done = true) {
  auto v = Header(done ? nbd::kReplyFlagDone : 0, nbd::kReplyTypeBlockStatus, cookie,
                  static_cast<uint32_t>(4 + 8 * extents.size()));
  Put32(v, ctx);
  for (auto [len, flags] : extents) {
    Put32(v, len);
    Put32(v, flags);
  }
  return v;
}
std::vector<uint8_t> NoneChunk(uint64_t cookie) {
  return Header(nbd::kReplyFlagDone, nbd::kReplyTypeNone, cookie, 0);
}
std::vector<uint8_t> Simple(uint64_t cookie, uint32_t err) {
  std::vector<uint8_t> v;
  Put32(v, nbd::kSimpleReplyMagic);
  Put32(v, err);
  Put64(v, cookie);
  return v;
}
std::vector<uint8_t> Cat(std::initializer_list<std::vector<uint8_t>> parts) {
  std::vector<uint8_t> v;
  for (auto& p : parts) v.insert(v.end(), p.begin(), p.end());
  return v;
}
std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7);
  return v;
}

// ---- the parser alone --------------------------------------------------------------------------

struct OneTable : ReplyParser::Table {
  std::map<uint64_t, ReplyState*> live;
  std::vector<uint64_t> done;
  ReplyState* Find(uint64_t c) override {
    auto it = live.find(c);
    return it == live.end() ? nullptr : it->second;
  }
  void Done(uint64_t c, ReplyState*) override {
    live.erase(c);
    done.push_back(c);
  }
};

struct ParseCase {
  const char* name;
  uint16_t type;  // of the request with cookie 1 (offset 4096, length 4096)
  std::vector<uint8_t> bytes;
  const char* want;  // substring of the violation, "" when the bytes are valid
};

void PrintTo(const ParseCase& c, std::ostream* os) { *os << c.name; }

class ReplyParserTest : public ::testing::TestWithParam<ParseCase> {};

TEST_P(ReplyParserTest, Case) {
  const ParseCase& c = GetParam();
  std::vector<uint8_t> buf(4096, 0xee);
  ReplyState r;
  r.type = c.type;
  r.offset = 4096;
  r.length = 4096;
  r.read_buf = c.type == nbd::kCmdRead ? buf.data() : nullptr;
  OneTable t;
  t.live[1] = &r;
  ReplyParser p;
  // Fed one byte at a time: every partial state must wait, never misparse.
  Status err;
  size_t at = 0;
  std::vector<uint8_t> pendingb;
  for (uint8_t b : c.bytes) {
    pendingb.push_back(b);
    auto used = p.Feed(pendingb.data(), pendingb.size(), t);
    if (!used.ok()) {
      err = used.status();
      break;
    }
    pendingb.erase(pendingb.begin(), pendingb.begin() + static_cast<long>(*used));
    at += *used;
  }
  if (std::string(c.want).empty()) {
    EXPECT_TRUE(err.ok()) << err.message();
    EXPECT_EQ(t.done, std::vector<uint64_t>{1});
    EXPECT_TRUE(pendingb.empty());
  } else {
    ASSERT_FALSE(err.ok()) << "accepted";
    EXPECT_EQ(err.code(), EPROTO);
    EXPECT_NE(err.message().find(c.want), std::string::npos) << err.message();
  }
}

std::vector<uint8_t> Bytes(size_t n, uint8_t v) { return std::vector<uint8_t>(n, v); }

INSTANTIATE_TEST_SUITE_P(
    Replies, ReplyParserTest,
    ::testing::Values(
        ParseCase{"one_data_chunk", nbd::kCmdRead, DataChunk(1, 4096, Bytes(4096, 1), true), ""},
        ParseCase{"data_then_hole_out_of_order", nbd::kCmdRead,
                  Cat({DataChunk(1, 6144, Bytes(2048, 1), false), HoleChunk(1, 4096, 2048, false),
                       NoneChunk(1)}),
                  ""},
        ParseCase{"error_then_done", nbd::kCmdRead,
                  Cat({ErrorChunk(1, nbd::kErrIo, "bad sector", false, 5000), NoneChunk(1)}), ""},
        ParseCase{"partial_data_then_error", nbd::kCmdRead,
                  Cat({DataChunk(1, 4096, Bytes(512, 1), false),
                       ErrorChunk(1, nbd::kErrIo, "", true)}),
                  ""},
        ParseCase{"simple_error_to_read", nbd::kCmdRead, Simple(1, nbd::kErrIo), ""},
        ParseCase{"simple_ok_to_write", nbd::kCmdWrite, Simple(1, 0), ""},
        ParseCase{"unknown_error_type_is_an_error", nbd::kCmdWrite,
                  [] {
                    auto v = Header(nbd::kReplyFlagDone, 0x8000 | 77, 1, 6 + 3);
                    Put32(v, nbd::kErrNoSpc);
                    v.push_back(0);
                    v.push_back(1);
                    v.push_back('x');
                    v.push_back(0);  // a type-specific tail we do not know
                    v.push_back(0);
                    return v;
                  }(),
                  ""},
        ParseCase{"bad_magic", nbd::kCmdRead, Bytes(20, 0x41), "bad reply magic"},
        ParseCase{"unknown_cookie", nbd::kCmdRead, DataChunk(2, 4096, Bytes(4096, 1), true),
                  "unknown cookie"},
        ParseCase{"simple_unknown_cookie", nbd::kCmdWrite, Simple(9, 0), "unknown cookie"},
        ParseCase{"overlap", nbd::kCmdRead,
                  Cat({DataChunk(1, 4096, Bytes(2048, 1), false),
                       HoleChunk(1, 5120, 2048, true)}),
                  "overlaps"},
        ParseCase{"overlap_third_chunk", nbd::kCmdRead,
                  Cat({DataChunk(1, 4096, Bytes(1024, 1), false),
                       DataChunk(1, 6144, Bytes(1024, 1), false),
                       DataChunk(1, 5900, Bytes(300, 1), true)}),
                  "overlaps"},
        ParseCase{"same_chunk_twice", nbd::kCmdRead,
                  Cat({DataChunk(1, 4096, Bytes(4096, 1), false),
                       DataChunk(1, 4096, Bytes(4096, 1), true)}),
                  "overlaps"},
        ParseCase{"before_range", nbd::kCmdRead, DataChunk(1, 0, Bytes(4096, 1), true), "outside"},
        ParseCase{"past_range", nbd::kCmdRead, HoleChunk(1, 6144, 4096, true), "outside"},
        ParseCase{"offset_wraps", nbd::kCmdRead, HoleChunk(1, ~uint64_t{0} - 10, 4096, true),
                  "outside"},
        ParseCase{"oversized_data", nbd::kCmdRead,
                  [] {
                    auto v = Header(nbd::kReplyFlagDone, nbd::kReplyTypeOffsetData, 1, 0xfffffff0);
                    Put64(v, 4096);
                    return v;
                  }(),
                  "outside"},
        ParseCase{"oversized_error", nbd::kCmdWrite,
                  Header(nbd::kReplyFlagDone, nbd::kReplyTypeError, 1, 1 << 20), "bytes"},
        ParseCase{"short_read", nbd::kCmdRead, DataChunk(1, 4096, Bytes(2048, 1), true),
                  "ended after 2048"},
        ParseCase{"data_for_write", nbd::kCmdWrite, DataChunk(1, 4096, Bytes(16, 1), true),
                  "answers a WRITE"},
        ParseCase{"empty_hole", nbd::kCmdRead, HoleChunk(1, 4096, 0, true), "empty"},
        ParseCase{"none_without_done", nbd::kCmdWrite,
                  Header(0, nbd::kReplyTypeNone, 1, 0), "without DONE"},
        ParseCase{"none_with_payload", nbd::kCmdWrite,
                  Cat({Header(nbd::kReplyFlagDone, nbd::kReplyTypeNone, 1, 4), Bytes(4, 0)}),
                  "NONE chunk with 4"},
        ParseCase{"error_zero", nbd::kCmdWrite, ErrorChunk(1, 0, "", true), "error 0"},
        ParseCase{"error_message_too_long_for_chunk", nbd::kCmdWrite,
                  [] {
                    auto v = ErrorChunk(1, nbd::kErrIo, "abc", true);
                    v[nbd::kStructuredReplyHeaderLen + 5] = 9;  // claims 9 message bytes
                    return v;
                  }(),
                  "message of 9"},
        ParseCase{"error_offset_outside", nbd::kCmdWrite,
                  ErrorChunk(1, nbd::kErrIo, "", true, 100), "ERROR_OFFSET 100 outside"},
        ParseCase{"unknown_flags", nbd::kCmdWrite,
                  Header(nbd::kReplyFlagDone | 4, nbd::kReplyTypeNone, 1, 0), "chunk flags"},
        ParseCase{"block_status_unasked", nbd::kCmdRead,
                  Cat({Header(nbd::kReplyFlagDone, nbd::kReplyTypeBlockStatus, 1, 12),
                       Bytes(12, 0)}),
                  "unexpected chunk type"},
        ParseCase{"simple_ok_to_read", nbd::kCmdRead, Simple(1, 0), "simple reply to a READ"},
        // BLOCK_STATUS (the request's context id is 0 here).
        ParseCase{"bs_one_extent", nbd::kCmdBlockStatus, BsChunk(1, 0, {{4096, 3}}), ""},
        ParseCase{"bs_short_then_none", nbd::kCmdBlockStatus,
                  Cat({BsChunk(1, 0, {{512, 0}, {1024, 3}}, false), NoneChunk(1)}), ""},
        ParseCase{"bs_last_extent_longer_is_cut", nbd::kCmdBlockStatus,
                  BsChunk(1, 0, {{512, 0}, {1 << 30, 3}}), ""},
        ParseCase{"bs_error", nbd::kCmdBlockStatus, ErrorChunk(1, nbd::kErrIo, "x", true), ""},
        ParseCase{"bs_wrong_context", nbd::kCmdBlockStatus, BsChunk(1, 7, {{4096, 0}}),
                  "context 7"},
        ParseCase{"bs_zero_extent", nbd::kCmdBlockStatus, BsChunk(1, 0, {{512, 0}, {0, 0}}),
                  "extent 1 of 0 bytes"},
        ParseCase{"bs_extent_past_the_end", nbd::kCmdBlockStatus,
                  BsChunk(1, 0, {{4096, 0}, {512, 0}}), "starts past"},
        ParseCase{"bs_two_chunks", nbd::kCmdBlockStatus,
                  Cat({BsChunk(1, 0, {{512, 0}}, false), BsChunk(1, 0, {{512, 0}})}),
                  "second BLOCK_STATUS"},
        ParseCase{"bs_no_extents", nbd::kCmdBlockStatus, BsChunk(1, 0, {}), "chunk of 4 bytes"},
        ParseCase{"bs_odd_length", nbd::kCmdBlockStatus,
                  Cat({Header(nbd::kReplyFlagDone, nbd::kReplyTypeBlockStatus, 1, 14),
                       Bytes(14, 0)}),
                  "chunk of 14 bytes"},
        ParseCase{"bs_done_without_status", nbd::kCmdBlockStatus, NoneChunk(1), "without extents"},
        ParseCase{"bs_simple_ok", nbd::kCmdBlockStatus, Simple(1, 0), "without extents"},
        ParseCase{"bs_too_many_extents", nbd::kCmdBlockStatus,
                  Cat({Header(nbd::kReplyFlagDone, nbd::kReplyTypeBlockStatus, 1,
                              4 + 8 * (ReplyParser::kMaxExtentsPerChunk + 1)),
                       Bytes(4 + 8 * (ReplyParser::kMaxExtentsPerChunk + 1), 0)}),
                  "chunk type 5 of"},
        ParseCase{"bs_for_write", nbd::kCmdWrite, BsChunk(1, 0, {{4096, 0}}),
                  "unexpected chunk type"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(ReplyParserData, HoleZeroesAndDataLandWhereTheySay) {
  std::vector<uint8_t> buf(8192, 0xee);
  ReplyState r;
  r.type = nbd::kCmdRead;
  r.offset = 1 << 20;
  r.length = 8192;
  r.read_buf = buf.data();
  OneTable t;
  t.live[5] = &r;
  auto d = Pattern(4096, 3);
  auto bytes = Cat({DataChunk(5, (1 << 20) + 4096, d, false), HoleChunk(5, 1 << 20, 4096, true)});
  ReplyParser p;
  auto used = p.Feed(bytes.data(), bytes.size(), t);
  ASSERT_TRUE(used.ok()) << used.status().message();
  EXPECT_EQ(*used, bytes.size());
  EXPECT_EQ(std::vector<uint8_t>(buf.begin(), buf.begin() + 4096), std::vector<uint8_t>(4096, 0));
  EXPECT_EQ(std::vector<uint8_t>(buf.begin() + 4096, buf.end()), d);
  EXPECT_TRUE(r.error.ok());
}

TEST(ReplyParserData, ErrorChunkMapsToErrnoWithMessage) {
  ReplyState r;
  r.type = nbd::kCmdWrite;
  r.offset = 0;
  r.length = 512;
  OneTable t;
  t.live[1] = &r;
  auto bytes = ErrorChunk(1, nbd::kErrNoSpc, "pool full", true);
  ReplyParser p;
  ASSERT_TRUE(p.Feed(bytes.data(), bytes.size(), t).ok());
  EXPECT_EQ(r.error.code(), ENOSPC);
  EXPECT_NE(r.error.message().find("pool full"), std::string::npos) << r.error.message();
}

TEST(ReplyParserData, BlockStatusExtentsInOrderAndTheLastCut) {
  std::vector<BlockExtent> ext{{1, 1}};  // stale content from an earlier use goes
  ReplyState r;
  r.type = nbd::kCmdBlockStatus;
  r.offset = 0;
  r.length = 1 << 20;
  r.context_id = 3;
  r.extents = &ext;
  r.ResetReply();
  OneTable t;
  t.live[4] = &r;
  auto bytes = BsChunk(4, 3, {{65536, 0}, {4096, nbd::kStateHole | nbd::kStateZero}, {1 << 21, 0}});
  ReplyParser p;
  auto used = p.Feed(bytes.data(), bytes.size(), t);
  ASSERT_TRUE(used.ok()) << used.status().message();
  EXPECT_EQ(t.done, std::vector<uint64_t>{4});
  const std::vector<BlockExtent> want = {
      {65536, 0}, {4096, nbd::kStateHole | nbd::kStateZero}, {(1 << 20) - 65536 - 4096, 0}};
  EXPECT_EQ(ext, want);
}

// ---- the fake server ---------------------------------------------------------------------------

class Catalog : public nbd::ExportCatalog {
 public:
  std::optional<nbd::ExportInfo> Lookup(std::string_view name) override {
    std::lock_guard lk(mu);
    seen.emplace_back(name);
    if (!known.empty() && name != known) return std::nullopt;
    return nbd::ExportInfo{std::string(name), size, false, ""};
  }
  std::vector<std::string> List() override { return {}; }
  uint64_t size = kExportSize;  // under mu: what the next handshake says (a resized volume)
  std::mutex mu;
  std::vector<std::string> seen;
  std::string known;  // empty: every name exists
};

// One accepted connection in the transmission phase, blocking I/O with a 10 s limit.
class FakeConn {
 public:
  FakeConn(int fd, int index) : fd_(fd), index_(index) {}
  int index() const { return index_; }
  bool ReadAll(uint8_t* p, size_t n) {
    while (n > 0) {
      ssize_t r = recv(fd_, p, n, 0);
      if (r <= 0) return false;
      p += r;
      n -= static_cast<size_t>(r);
    }
    return true;
  }
  // A request, its WRITE payload in *payload. False at EOF or DISC.
  bool Next(nbd::RequestHeader* h, std::vector<uint8_t>* payload = nullptr) {
    uint8_t b[nbd::kRequestHeaderLen];
    if (!ReadAll(b, sizeof b)) return false;
    if (!nbd::ParseRequestHeader(b, h)) return false;
    if (h->type == nbd::kCmdDisc) return false;
    std::vector<uint8_t> tmp;
    if (!payload) payload = &tmp;
    payload->assign(h->type == nbd::kCmdWrite ? h->length : 0, 0);
    return payload->empty() || ReadAll(payload->data(), payload->size());
  }
  void Send(const std::vector<uint8_t>& v) {
    size_t at = 0;
    while (at < v.size()) {
      ssize_t w = send(fd_, v.data() + at, v.size() - at, MSG_NOSIGNAL);
      if (w <= 0) return;
      at += static_cast<size_t>(w);
    }
  }
  void Close() { shutdown(fd_, SHUT_RDWR); }
  bool Readable(int ms) {
    pollfd p{fd_, POLLIN, 0};
    return poll(&p, 1, ms) > 0;
  }

 private:
  int fd_;
  int index_;
};

class FakeServer {
 public:
  using Script = std::function<void(FakeConn&)>;
  // With `raw_go`: instead of nbd::Negotiator, a handshake that acks STRUCTURED_REPLY and answers
  // NBD_OPT_GO with that error reply (type, message), for refusals the Negotiator cannot make.
  explicit FakeServer(Script script,
                      std::optional<std::pair<uint32_t, std::string>> raw_go = std::nullopt)
      : dir_("replica-fake"), script_(std::move(script)), raw_go_(std::move(raw_go)) {
    path_ = dir_ / "nbd.sock";
    lfd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path_.c_str(), sizeof sa.sun_path - 1);
    EXPECT_EQ(bind(lfd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0) << strerror(errno);
    EXPECT_EQ(listen(lfd_, 16), 0);
    accept_ = std::thread([this] { AcceptLoop(); });
  }
  ~FakeServer() {
    stop_ = true;
    shutdown(lfd_, SHUT_RDWR);
    accept_.join();
    {
      std::lock_guard lk(mu_);
      for (int fd : fds_) shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : conns_) t.join();
    for (int fd : fds_) close(fd);
    close(lfd_);
  }
  Endpoint endpoint() const {
    Endpoint e;
    e.kind = Endpoint::Kind::kUnix;
    e.path = path_;
    return e;
  }
  Catalog catalog;
  std::atomic<int> accepted{0};

 private:
  void AcceptLoop() {
    while (!stop_) {
      int fd = accept4(lfd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return;
      timeval tv{10, 0};
      setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      const int index = accepted++;
      std::lock_guard lk(mu_);
      fds_.push_back(fd);
      conns_.emplace_back([this, fd, index] {
        FakeConn c(fd, index);
        if (raw_go_ ? RawHandshake(c) : Handshake(fd)) script_(c);
      });
    }
  }
  bool Handshake(int fd) {
    nbd::Negotiator neg(catalog);
    FakeConn c(fd, 0);
    std::vector<uint8_t> out;
    neg.Greeting(out);
    c.Send(out);
    uint8_t flags[4];
    if (!c.ReadAll(flags, 4) || !neg.OnClientFlags(nbd::LoadBE32(flags))) return false;
    for (;;) {
      uint8_t h[nbd::kOptionHeaderLen];
      if (!c.ReadAll(h, sizeof h)) return false;
      auto oh = neg.OnOptionHeader(h);
      std::vector<uint8_t> payload(oh.length);
      if (oh.length && !c.ReadAll(payload.data(), payload.size())) return false;
      out.clear();
      auto step = neg.OnOption(oh.option, payload, false, out);
      c.Send(out);
      if (step == nbd::Negotiator::Step::kTransmission) return true;
      if (step != nbd::Negotiator::Step::kContinue) return false;
    }
  }
  bool RawHandshake(FakeConn& c) {
    std::vector<uint8_t> out;
    Put64(out, nbd::kNbdMagic);
    Put64(out, nbd::kIHaveOpt);
    out.push_back(0);
    out.push_back(nbd::kHandshakeFlagFixedNewstyle);
    c.Send(out);
    uint8_t flags[4];
    if (!c.ReadAll(flags, 4)) return false;
    for (;;) {
      uint8_t h[nbd::kOptionHeaderLen];
      if (!c.ReadAll(h, sizeof h)) return false;
      const uint32_t opt = nbd::LoadBE32(h + 8);
      std::vector<uint8_t> payload(nbd::LoadBE32(h + 12));
      if (!payload.empty() && !c.ReadAll(payload.data(), payload.size())) return false;
      if (opt == nbd::kOptGo) {
        std::lock_guard lk(catalog.mu);
        catalog.seen.emplace_back(payload.begin() + 4,
                                  payload.begin() + 4 + nbd::LoadBE32(payload.data()));
      }
      const bool go = opt == nbd::kOptGo;
      const std::string msg = go ? raw_go_->second : "";
      out.clear();
      if (go && raw_go_->first == nbd::kRepAck) {
        // Success with the flags of our choosing: the size, then the ACK.
        Put64(out, nbd::kOptReplyMagic);
        Put32(out, opt);
        Put32(out, nbd::kRepInfo);
        Put32(out, 12);
        out.push_back(0);
        out.push_back(nbd::kInfoExport);
        Put64(out, kExportSize);
        out.push_back(static_cast<uint8_t>(raw_flags >> 8));
        out.push_back(static_cast<uint8_t>(raw_flags));
      }
      Put64(out, nbd::kOptReplyMagic);
      Put32(out, opt);
      Put32(out, go ? raw_go_->first : nbd::kRepAck);
      Put32(out, static_cast<uint32_t>(msg.size()));
      out.insert(out.end(), msg.begin(), msg.end());
      c.Send(out);
      if (go) return raw_go_->first == nbd::kRepAck;
    }
  }

 public:
  uint16_t raw_flags = 0;  // transmission flags of a raw GO that succeeds

 private:
  TempDir dir_;
  std::string path_;
  Script script_;
  std::optional<std::pair<uint32_t, std::string>> raw_go_;
  int lfd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread accept_;
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> conns_;
};

ClientOptions Options(const FakeServer& s, int connections = 1) {
  ClientOptions o;
  o.endpoint = s.endpoint();
  o.export_name = "vol";
  o.connections = connections;
  o.handshake_timeout = 5s;
  o.request_timeout = 10s;
  return o;
}

// Callbacks counted per request: each must fire exactly once.
struct Results {
  std::mutex mu;
  std::map<int, std::vector<Status>> got;
  Callback Cb(int id) {
    return [this, id](const Status& s) {
      std::lock_guard lk(mu);
      got[id].push_back(s);
    };
  }
  size_t Count() {
    std::lock_guard lk(mu);
    return got.size();
  }
  bool WaitFor(size_t n, std::chrono::milliseconds t = 10s) {
    return WaitUntil([&] { return Count() >= n; }, t);
  }
  Status Of(int id) {
    std::lock_guard lk(mu);
    EXPECT_EQ(got[id].size(), 1u) << "request " << id << " completed " << got[id].size()
                                  << " times";
    return got[id].empty() ? Status(-1, "never") : got[id][0];
  }
};

TEST(ReplicaClient, WireNameCarriesTheEpoch) {
  EXPECT_EQ(WireExportName("vol", 0).value(), "vol");
  EXPECT_EQ(WireExportName("vol", 12).value(), "vol@epoch=12");
  EXPECT_EQ(WireExportName("vol@epoch=3", 4).status().code(), EINVAL);
  EXPECT_EQ(WireExportName(std::string("a\0b", 3), 0).status().code(), EINVAL);
  EXPECT_EQ(WireExportName(std::string(5000, 'x'), 0).status().code(), EINVAL);
}

TEST(ReplicaClient, ConnectSendsTheEpochNameVerbatimOnEveryConnection) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    while (c.Next(&h)) {
    }
  });
  auto o = Options(s, 3);
  o.epoch = 7;
  auto c = ReplicaClient::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ((*c)->export_properties().size, kExportSize);
  EXPECT_EQ((*c)->healthy_connections(), 3u);
  std::lock_guard lk(s.catalog.mu);
  EXPECT_EQ(s.catalog.seen,
            (std::vector<std::string>{"vol@epoch=7", "vol@epoch=7", "vol@epoch=7"}));
}

// An expanded volume: Grow's fresh handshake must see the export at least that big before the
// bound moves; the connections in use stay (the server checks their requests live).
TEST(ReplicaClient, GrowTakesANewEndOnlyOnceAHandshakeConfirmsIt) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    std::vector<uint8_t> p;
    while (c.Next(&h, &p)) c.Send(NoneChunk(h.cookie));
  });
  auto o = Options(s, 2);
  o.epoch = 7;
  auto c = ReplicaClient::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ((*c)->size(), kExportSize);
  auto data = Pattern(4096, 9);
  Results res;
  EXPECT_EQ((*c)->Write(kExportSize, data, false, res.Cb(0)).code(), ENOSPC);
  auto g = (*c)->Grow(2 * kExportSize);
  EXPECT_EQ(g.status().code(), ENOSPC) << "the export has not grown yet";
  EXPECT_NE(g.status().message().find(std::to_string(kExportSize)), std::string::npos)
      << g.status().message();
  EXPECT_EQ((*c)->size(), kExportSize);
  {
    std::lock_guard lk(s.catalog.mu);
    s.catalog.size = 2 * kExportSize;
    s.catalog.seen.clear();
  }
  g = (*c)->Grow(2 * kExportSize);
  ASSERT_TRUE(g.ok()) << g.status().message();
  EXPECT_EQ(*g, 2 * kExportSize);
  EXPECT_EQ((*c)->size(), 2 * kExportSize);
  {
    std::lock_guard lk(s.catalog.mu);
    EXPECT_EQ(s.catalog.seen, std::vector<std::string>{"vol@epoch=7"}) << "one handshake, same epoch";
  }
  ASSERT_TRUE((*c)->Write(kExportSize, data, false, res.Cb(1)).ok());
  ASSERT_TRUE(res.WaitFor(1));
  EXPECT_TRUE(res.Of(1).ok()) << res.Of(1).message();
  EXPECT_EQ((*c)->healthy_connections(), 2u);
  EXPECT_EQ((*c)->export_properties().size, kExportSize) << "what the first handshake saw";
  // Smaller or equal: nothing to confirm.
  EXPECT_EQ((*c)->Grow(kExportSize).value(), 2 * kExportSize);
}

TEST(ReplicaClient, StaleEpochRefusalIsEstale) {
  FakeServer s([](FakeConn&) {},
               std::pair{nbd::kRepErrPolicy, std::string("stale epoch 3: volume is at 5")});
  auto o = Options(s);
  o.epoch = 3;
  auto c = ReplicaClient::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ESTALE) << c.status().message();
  EXPECT_NE(c.status().message().find("stale epoch 3"), std::string::npos) << c.status().message();
}

TEST(ReplicaClient, UnknownExportIsEnoentAndOtherRefusalsAreNotEstale) {
  FakeServer s([](FakeConn&) {});
  s.catalog.known = "other";
  auto c = ReplicaClient::Connect(Options(s));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ENOENT) << c.status().message();
  FakeServer p([](FakeConn&) {}, std::pair{nbd::kRepErrPolicy, std::string("not for you")});
  auto d = ReplicaClient::Connect(Options(p));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), EACCES) << d.status().message();
}

TEST(ReplicaClient, NothingListeningIsAClearConnectError) {
  TempDir dir("replica-none");
  ClientOptions o;
  o.endpoint.kind = Endpoint::Kind::kUnix;
  o.endpoint.path = dir / "absent.sock";
  o.export_name = "vol";
  auto c = ReplicaClient::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ENOENT) << c.status().message();
}

TEST(ReplicaClient, HandshakeDeadlineBoundsASilentServer) {
  TempDir dir("replica-silent");
  const std::string path = dir / "s.sock";
  int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
  ASSERT_EQ(bind(lfd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  ASSERT_EQ(listen(lfd, 4), 0);  // accepted by the kernel, never greeted
  ClientOptions o;
  o.endpoint.kind = Endpoint::Kind::kUnix;
  o.endpoint.path = path;
  o.export_name = "vol";
  o.handshake_timeout = 300ms;
  const auto t0 = std::chrono::steady_clock::now();
  auto c = ReplicaClient::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ETIMEDOUT) << c.status().message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  close(lfd);
}

// Three READs answered in reverse order, each in several chunks (data, hole, error).
TEST(ReplicaClient, ChunksOutOfOrderHolesAndErrorsReachTheRightRequests) {
  const auto a = Pattern(4096, 1), b = Pattern(2048, 50);
  FakeServer s([&](FakeConn& c) {
    nbd::RequestHeader h[4];
    for (auto& x : h) ASSERT_TRUE(c.Next(&x));
    // h[0..2]: READs at 0, 8192, 16384; h[3]: a WRITE.
    c.Send(Cat({HoleChunk(h[2].cookie, h[2].offset, 2048, false),
                DataChunk(h[1].cookie, h[1].offset, a, true),
                ErrorChunk(h[3].cookie, nbd::kErrNoSpc, "no room", true),
                DataChunk(h[2].cookie, h[2].offset + 2048, b, false),
                ErrorChunk(h[0].cookie, nbd::kErrIo, "bad sector", false, h[0].offset + 512),
                NoneChunk(h[2].cookie), NoneChunk(h[0].cookie)}));
    while (c.Next(&h[0])) {
    }
  });
  auto c = ReplicaClient::Connect(Options(s));
  ASSERT_TRUE(c.ok()) << c.status().message();
  std::vector<uint8_t> r0(4096), r1(4096), r2(4096, 0xee), w(4096, 9);
  Results res;
  ASSERT_TRUE((*c)->Read(0, r0, res.Cb(0)).ok());
  ASSERT_TRUE((*c)->Read(8192, r1, res.Cb(1)).ok());
  ASSERT_TRUE((*c)->Read(16384, r2, res.Cb(2)).ok());
  ASSERT_TRUE((*c)->Write(65536, w, true, res.Cb(3)).ok());
  ASSERT_TRUE(res.WaitFor(4));
  Status s0 = res.Of(0);
  EXPECT_EQ(s0.code(), EIO);
  EXPECT_NE(s0.message().find("bad sector"), std::string::npos) << s0.message();
  EXPECT_TRUE(res.Of(1).ok()) << res.Of(1).message();
  EXPECT_EQ(r1, a);
  EXPECT_TRUE(res.Of(2).ok()) << res.Of(2).message();
  EXPECT_EQ(std::vector<uint8_t>(r2.begin(), r2.begin() + 2048), std::vector<uint8_t>(2048, 0));
  EXPECT_EQ(std::vector<uint8_t>(r2.begin() + 2048, r2.end()), b);
  EXPECT_EQ(res.Of(3).code(), ENOSPC);
  // Server errors leave the connection up.
  EXPECT_EQ((*c)->healthy_connections(), 1u);
  auto k = (*c)->counters();
  EXPECT_EQ(k.requests, 4u);
  EXPECT_EQ(k.completed_ok, 2u);
  EXPECT_EQ(k.errors, 2u);
  EXPECT_EQ(k.bytes_read, 8192u);
  EXPECT_EQ(k.in_flight, 0u);
}

TEST(ReplicaClient, WritesCarryTheirBytesAndFlags) {
  std::mutex mu;
  std::vector<std::pair<nbd::RequestHeader, std::vector<uint8_t>>> seen;
  FakeServer s([&](FakeConn& c) {
    nbd::RequestHeader h;
    std::vector<uint8_t> p;
    while (c.Next(&h, &p)) {
      {
        std::lock_guard lk(mu);
        seen.emplace_back(h, p);
      }
      c.Send(h.type == nbd::kCmdFlush ? Simple(h.cookie, 0) : NoneChunk(h.cookie));
    }
  });
  auto c = ReplicaClient::Connect(Options(s));
  ASSERT_TRUE(c.ok()) << c.status().message();
  auto data = Pattern(65536, 77);
  Results res;
  ASSERT_TRUE((*c)->Write(4096, data, true, res.Cb(0)).ok());
  ASSERT_TRUE((*c)->Write(131072, std::span(data).subspan(0, 512), false, res.Cb(1)).ok());
  ASSERT_TRUE((*c)->WriteZeroes(8192, 4096, false, true, res.Cb(2)).ok());
  ASSERT_TRUE((*c)->Trim(12288, 4096, true, res.Cb(3)).ok());
  ASSERT_TRUE((*c)->Flush(res.Cb(4)).ok());
  ASSERT_TRUE(res.WaitFor(5));
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(res.Of(i).ok()) << i << ": " << res.Of(i).message();
  std::lock_guard lk(mu);
  ASSERT_EQ(seen.size(), 5u);
  std::map<uint16_t, std::vector<std::pair<nbd::RequestHeader, std::vector<uint8_t>>>> by;
  for (auto& x : seen) by[x.first.type].push_back(x);
  ASSERT_EQ(by[nbd::kCmdWrite].size(), 2u);
  for (auto& [h, p] : by[nbd::kCmdWrite]) {
    if (h.offset == 4096) {
      EXPECT_EQ(h.flags, nbd::kCmdFlagFua);
      EXPECT_EQ(p, data);
    } else {
      EXPECT_EQ(h.offset, 131072u);
      EXPECT_EQ(h.flags, 0);
      EXPECT_EQ(p, std::vector<uint8_t>(data.begin(), data.begin() + 512));
    }
  }
  EXPECT_EQ(by[nbd::kCmdWriteZeroes].at(0).first.flags, nbd::kCmdFlagNoHole);
  EXPECT_EQ(by[nbd::kCmdTrim].at(0).first.flags, nbd::kCmdFlagFua);
  EXPECT_EQ(by[nbd::kCmdFlush].at(0).first.length, 0u);
}

// Without CAN_MULTI_CONN a FLUSH covers only its own connection's writes: it goes to every
// connection, and the caller hears once, after the last (with the first error).
TEST(ReplicaClient, FlushGoesToEveryConnectionWithoutMultiConn) {
  std::atomic<int> flushes{0};
  FakeServer s(
      [&](FakeConn& c) {
        nbd::RequestHeader h;
        while (c.Next(&h)) {
          if (h.type != nbd::kCmdFlush) continue;
          ++flushes;
          // The stimulus: connection i answers 20*i ms late, so the replies come one after
          // another and the failing one (1) is neither the first nor the last.
          std::this_thread::sleep_for(std::chrono::milliseconds(20 * c.index()));
          c.Send(c.index() == 1 ? ErrorChunk(h.cookie, nbd::kErrIo, "disk gone", true)
                                : NoneChunk(h.cookie));
        }
      },
      std::pair{nbd::kRepAck, std::string()});
  s.raw_flags = nbd::kFlagHasFlags | nbd::kFlagSendFlush | nbd::kFlagSendFua;
  auto c = ReplicaClient::Connect(Options(s, 3));
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_FALSE((*c)->export_properties().can_multi_conn());
  Results res;
  ASSERT_TRUE((*c)->Flush(res.Cb(0)).ok());
  ASSERT_TRUE(res.WaitFor(1));
  EXPECT_EQ(flushes.load(), 3);
  Status st = res.Of(0);
  EXPECT_EQ(st.code(), EIO) << st.message();
  EXPECT_NE(st.message().find("disk gone"), std::string::npos) << st.message();
  // No TRIM or WRITE_ZEROES advertised: refused at submit.
  EXPECT_EQ((*c)->Trim(0, 4096, false, res.Cb(1)).code(), ENOTSUP);
  EXPECT_EQ((*c)->WriteZeroes(0, 4096, false, false, res.Cb(2)).code(), ENOTSUP);
  // A window for a wrong outcome: a refused submit must never call back later.
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(res.Count(), 1u);
  EXPECT_EQ((*c)->counters().in_flight, 0u);
}

TEST(ReplicaClient, AReadOnlyExportIsRefusedForWriting) {
  FakeServer s([](FakeConn&) {}, std::pair{nbd::kRepAck, std::string()});
  s.raw_flags = nbd::kFlagHasFlags | nbd::kFlagReadOnly | nbd::kFlagSendFlush | nbd::kFlagSendFua;
  auto c = ReplicaClient::Connect(Options(s));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), EROFS) << c.status().message();
  FakeServer n([](FakeConn&) {}, std::pair{nbd::kRepAck, std::string()});
  n.raw_flags = nbd::kFlagHasFlags | nbd::kFlagSendFlush;  // no FUA
  c = ReplicaClient::Connect(Options(n));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ENOTSUP) << c.status().message();
}

TEST(ReplicaClient, BlockStatusNegotiatesBaseAllocationAndDeliversExtents) {
  std::atomic<uint32_t> seen_len{0};
  std::atomic<uint16_t> seen_type{0};
  FakeServer s([&](FakeConn& c) {
    nbd::RequestHeader h;
    ASSERT_TRUE(c.Next(&h));
    seen_type = h.type;
    seen_len = h.length;
    // The context id the project's own Negotiator handed out at SET_META_CONTEXT.
    c.Send(BsChunk(h.cookie, nbd::kBaseAllocationContextId,
                   {{8192, 0}, {4096, nbd::kStateHole | nbd::kStateZero}}, false));
    c.Send(NoneChunk(h.cookie));
    ASSERT_TRUE(c.Next(&h));
    c.Send(ErrorChunk(h.cookie, nbd::kErrIo, "map failed", true));
    while (c.Next(&h)) {
    }
  });
  auto o = Options(s);
  o.base_allocation = true;
  auto c = ReplicaClient::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_TRUE((*c)->export_properties().base_allocation);
  std::mutex mu;
  std::vector<std::pair<Status, std::vector<BlockExtent>>> got;
  auto cb = [&](const Status& st, std::vector<BlockExtent> e) {
    std::lock_guard lk(mu);
    got.emplace_back(st, std::move(e));
  };
  ASSERT_TRUE((*c)->BlockStatus(4096, 65536, cb).ok());
  ASSERT_TRUE(WaitUntil([&] {
    std::lock_guard lk(mu);
    return got.size() == 1;
  }));
  ASSERT_TRUE((*c)->BlockStatus(0, 4096, cb).ok());
  ASSERT_TRUE(WaitUntil([&] {
    std::lock_guard lk(mu);
    return got.size() == 2;
  }));
  EXPECT_EQ(seen_type.load(), nbd::kCmdBlockStatus);
  EXPECT_EQ(seen_len.load(), 65536u);
  std::lock_guard lk(mu);
  ASSERT_TRUE(got[0].first.ok()) << got[0].first.message();
  const std::vector<BlockExtent> want = {{8192, 0}, {4096, nbd::kStateHole | nbd::kStateZero}};
  EXPECT_EQ(got[0].second, want);
  EXPECT_EQ(got[1].first.code(), EIO);
  EXPECT_NE(got[1].first.message().find("map failed"), std::string::npos);
  EXPECT_TRUE(got[1].second.empty());
  // Past the end: refused at submit, no callback.
  EXPECT_EQ((*c)->BlockStatus(kExportSize, 4096, cb).code(), EINVAL);
}

TEST(ReplicaClient, BlockStatusWithoutTheContextIsEnotsupAtSubmit) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    while (c.Next(&h)) {
    }
  });
  auto c = ReplicaClient::Connect(Options(s));  // base_allocation not asked for
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_FALSE((*c)->export_properties().base_allocation);
  bool called = false;
  Status st =
      (*c)->BlockStatus(0, 4096, [&](const Status&, std::vector<BlockExtent>) { called = true; });
  EXPECT_EQ(st.code(), ENOTSUP);
  EXPECT_FALSE(called);
}

TEST(ReplicaClient, BadRequestsAreRefusedAtSubmitWithoutACallback) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    while (c.Next(&h)) {
    }
  });
  auto c = ReplicaClient::Connect(Options(s));
  ASSERT_TRUE(c.ok()) << c.status().message();
  std::vector<uint8_t> buf(4096);
  bool called = false;
  auto cb = [&](const Status&) { called = true; };
  EXPECT_EQ((*c)->Read(kExportSize, buf, cb).code(), EINVAL);
  EXPECT_EQ((*c)->Write(kExportSize - 512, buf, false, cb).code(), ENOSPC);
  EXPECT_EQ((*c)->Read(0, std::span<uint8_t>(), cb).code(), EINVAL);
  std::vector<uint8_t> huge(nbd::kMaxPayload + 4096);
  EXPECT_EQ((*c)->Read(0, huge, cb).code(), EINVAL);
  (*c)->Close();
  EXPECT_EQ((*c)->Read(0, buf, cb).code(), ESHUTDOWN);
  EXPECT_FALSE(called);
}

// A violation ends the connection: every request in flight on it fails once with EPROTO, later
// ones fail fast, and nothing is misrouted to another request's buffer.
TEST(ReplicaClient, ProtocolViolationFailsEverythingInFlightOnce) {
  Event got_all;
  FakeServer s([&](FakeConn& c) {
    nbd::RequestHeader h[5];
    for (auto& x : h) ASSERT_TRUE(c.Next(&x));
    got_all.Notify();
    c.Send(DataChunk(h[0].cookie ^ (uint64_t{1} << 40), h[0].offset, Pattern(4096, 1), true));
    while (c.Next(&h[0])) {
    }
  });
  auto c = ReplicaClient::Connect(Options(s));
  ASSERT_TRUE(c.ok()) << c.status().message();
  std::vector<std::vector<uint8_t>> bufs(5, std::vector<uint8_t>(4096, 0xee));
  Results res;
  for (int i = 0; i < 5; ++i) ASSERT_TRUE((*c)->Read(i * 4096, bufs[i], res.Cb(i)).ok());
  ASSERT_TRUE(res.WaitFor(5));
  for (int i = 0; i < 5; ++i) {
    Status st = res.Of(i);
    EXPECT_EQ(st.code(), EPROTO) << st.message();
    EXPECT_NE(st.message().find("unknown cookie"), std::string::npos) << st.message();
    EXPECT_EQ(bufs[i], std::vector<uint8_t>(4096, 0xee)) << "request " << i << " was written to";
  }
  EXPECT_EQ((*c)->healthy_connections(), 0u);
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ((*c)->Read(0, buf, [](const Status&) {}).code(), ENOTCONN);
  EXPECT_EQ((*c)->counters().connections_lost, 1u);
  std::this_thread::sleep_for(50ms);  // no late second callback
  for (int i = 0; i < 5; ++i) res.Of(i);
}

TEST(ReplicaClient, PeerClosingMidRequestFailsEachPendingRequestOnce) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    std::vector<uint8_t> p;
    ASSERT_TRUE(c.Next(&h, &p));
    c.Send(NoneChunk(h.cookie));  // the first one succeeds
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(c.Next(&h, &p));
    // Half a data chunk, then gone.
    auto d = DataChunk(h.cookie, h.offset, Pattern(4096, 2), true);
    d.resize(d.size() / 2);
    c.Send(d);
    c.Close();
  });
  auto c = ReplicaClient::Connect(Options(s));
  ASSERT_TRUE(c.ok()) << c.status().message();
  auto w = Pattern(4096, 5);
  std::vector<uint8_t> r(4096);
  Results res;
  ASSERT_TRUE((*c)->Write(0, w, false, res.Cb(0)).ok());
  ASSERT_TRUE(res.WaitFor(1));
  ASSERT_TRUE((*c)->Write(4096, w, true, res.Cb(1)).ok());
  ASSERT_TRUE((*c)->Flush(res.Cb(2)).ok());
  ASSERT_TRUE((*c)->Read(8192, r, res.Cb(3)).ok());
  ASSERT_TRUE(res.WaitFor(4));
  EXPECT_TRUE(res.Of(0).ok());
  for (int i = 1; i < 4; ++i) {
    Status st = res.Of(i);
    EXPECT_EQ(st.code(), ECONNRESET) << st.message();
    EXPECT_NE(st.message().find("closed the connection"), std::string::npos) << st.message();
  }
}

TEST(ReplicaClient, ASilentPeerTimesOutInsteadOfHanging) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    while (c.Next(&h)) {
    }  // reads everything, answers nothing
  });
  auto o = Options(s);
  o.request_timeout = 300ms;
  auto c = ReplicaClient::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().message();
  std::vector<uint8_t> r(4096);
  Results res;
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE((*c)->Read(0, r, res.Cb(0)).ok());
  ASSERT_TRUE((*c)->Flush(res.Cb(1)).ok());
  ASSERT_TRUE(res.WaitFor(2, 5s));
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 300ms);
  for (int i = 0; i < 2; ++i) {
    Status st = res.Of(i);
    EXPECT_EQ(st.code(), ETIMEDOUT) << st.message();
    EXPECT_NE(st.message().find("within 300 ms"), std::string::npos) << st.message();
  }
  EXPECT_GE((*c)->counters().timeouts, 1u);
}

TEST(ReplicaClient, OtherConnectionsCarryOnAfterOneIsLost) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    while (c.Next(&h)) {
      if (c.index() == 0) {
        c.Close();  // the first connection dies at its first request
        return;
      }
      c.Send(h.type == nbd::kCmdRead ? DataChunk(h.cookie, h.offset, Pattern(h.length, 4), true)
                                     : NoneChunk(h.cookie));
    }
  });
  auto c = ReplicaClient::Connect(Options(s, 2));
  ASSERT_TRUE(c.ok()) << c.status().message();
  Results res;
  std::vector<std::vector<uint8_t>> bufs(8, std::vector<uint8_t>(4096));
  for (int i = 0; i < 8; ++i) ASSERT_TRUE((*c)->Read(i * 4096, bufs[i], res.Cb(i)).ok());
  ASSERT_TRUE(res.WaitFor(8));
  int failed = 0;
  for (int i = 0; i < 8; ++i) failed += res.Of(i).ok() ? 0 : 1;
  EXPECT_GE(failed, 1);
  EXPECT_LT(failed, 8);
  ASSERT_TRUE(WaitUntil([&] { return (*c)->healthy_connections() == 1; }));
  // New requests go to the survivor.
  for (int i = 10; i < 20; ++i) ASSERT_TRUE((*c)->Read(0, bufs[0], res.Cb(i)).ok());
  ASSERT_TRUE(res.WaitFor(18));
  for (int i = 10; i < 20; ++i) EXPECT_TRUE(res.Of(i).ok()) << res.Of(i).message();
  EXPECT_EQ(bufs[0], Pattern(4096, 4));
}

TEST(ReplicaClient, DestroyingWithRequestsInFlightFailsThemOnce) {
  Event got;
  std::atomic<int> n{0};
  FakeServer s([&](FakeConn& c) {
    nbd::RequestHeader h;
    while (c.Next(&h)) {
      if (++n == 20) got.Notify();
    }
  });
  Results res;
  std::vector<uint8_t> r(4096);
  {
    auto c = ReplicaClient::Connect(Options(s, 2));
    ASSERT_TRUE(c.ok()) << c.status().message();
    for (int i = 0; i < 20; ++i) ASSERT_TRUE((*c)->Read(0, r, res.Cb(i)).ok());
    ASSERT_TRUE(got.Wait());
  }
  ASSERT_EQ(res.Count(), 20u);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(res.Of(i).code(), ESHUTDOWN) << res.Of(i).message();
}

// Submitters racing Close(): every accepted request has had its one callback when Close returns.
TEST(ReplicaClient, CloseRacingSubmittersLosesNoCallback) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    while (c.Next(&h)) c.Send(NoneChunk(h.cookie));
  });
  for (int round = 0; round < 20; ++round) {
    auto c = ReplicaClient::Connect(Options(s, 2));
    ASSERT_TRUE(c.ok()) << c.status().message();
    std::atomic<uint64_t> accepted{0}, called{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 3; ++t) {
      ts.emplace_back([&] {
        for (;;) {
          Status st = (*c)->Flush([&](const Status&) { ++called; });
          if (!st.ok()) {
            EXPECT_EQ(st.code(), ESHUTDOWN) << st.message();
            return;
          }
          ++accepted;
        }
      });
    }
    // The stimulus: the submitters race for a different time each round before Close.
    std::this_thread::sleep_for(std::chrono::milliseconds(2 + round % 5));
    (*c)->Close();
    const uint64_t at_close = called.load();
    for (auto& t : ts) t.join();
    EXPECT_EQ(called.load(), at_close) << "a callback after Close returned, round " << round;
    EXPECT_EQ(called.load(), accepted.load())
        << "an accepted request without its callback, round " << round;
    EXPECT_EQ(called.load(), accepted.load()) << "round " << round;
    EXPECT_EQ((*c)->counters().in_flight, 0u);
  }
}

TEST(ReplicaClient, CloseWithGraceLetsRepliesArrive) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    while (c.Next(&h)) {
      std::this_thread::sleep_for(50ms);  // the stimulus: a reply late, within Close's grace
      c.Send(NoneChunk(h.cookie));
    }
  });
  auto c = ReplicaClient::Connect(Options(s));
  ASSERT_TRUE(c.ok()) << c.status().message();
  Results res;
  ASSERT_TRUE((*c)->Flush(res.Cb(0)).ok());
  (*c)->Close(5s);
  ASSERT_EQ(res.Count(), 1u);
  EXPECT_TRUE(res.Of(0).ok()) << res.Of(0).message();
}

// Many requests from several threads, deep queues: every callback once, every read its bytes.
TEST(ReplicaClient, ConcurrentSubmittersAcrossConnections) {
  FakeServer s([](FakeConn& c) {
    nbd::RequestHeader h;
    std::vector<uint8_t> p;
    std::vector<nbd::RequestHeader> held;
    while (c.Next(&h, &p)) {
      held.push_back(h);
      // Hold up to 7, then answer them backwards; also when the client has nothing more to say.
      if (held.size() < 7 && c.Readable(20)) continue;
      // Answer in reverse order, reads as two chunks each.
      for (auto it = held.rbegin(); it != held.rend(); ++it) {
        if (it->type == nbd::kCmdRead) {
          const uint32_t half = it->length / 2;
          c.Send(Cat(
              {DataChunk(it->cookie, it->offset + half,
                         Pattern(it->length - half, static_cast<uint8_t>(it->offset >> 11) + half),
                         false),
               DataChunk(it->cookie, it->offset,
                         Pattern(half, static_cast<uint8_t>(it->offset >> 11)), true)}));
        } else {
          c.Send(NoneChunk(it->cookie));
        }
      }
      held.clear();
    }
  });
  auto o = Options(s, 3);
  o.max_in_flight_per_connection = 8;  // fewer slots than requests: the rest queue
  auto c = ReplicaClient::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().message();
  constexpr int kThreads = 4, kEach = 70;
  Results res;
  std::vector<std::vector<uint8_t>> bufs(kThreads * kEach, std::vector<uint8_t>(1024));
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        const int id = t * kEach + i;
        Status st = (i % 2) ? (*c)->Read(uint64_t(id) * 2048, bufs[id], res.Cb(id))
                            : (*c)->Write(uint64_t(id) * 2048, bufs[id], false, res.Cb(id));
        ASSERT_TRUE(st.ok()) << st.message();
      }
    });
  }
  for (auto& t : ts) t.join();
  ASSERT_TRUE(res.WaitFor(kThreads * kEach));
  for (int id = 0; id < kThreads * kEach; ++id) {
    ASSERT_TRUE(res.Of(id).ok()) << id << ": " << res.Of(id).message();
    if (id % kEach % 2) {
      std::vector<uint8_t> want = Pattern(512, static_cast<uint8_t>(id));
      auto second = Pattern(512, static_cast<uint8_t>(id + 512));
      want.insert(want.end(), second.begin(), second.end());
      ASSERT_EQ(bufs[id], want) << "read " << id;
    }
  }
  EXPECT_EQ((*c)->counters().in_flight, 0u);
}

}  // namespace
}  // namespace nbdcsi::replica
