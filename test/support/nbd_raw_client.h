// A blocking raw NBD client for in-process engine tests (engine_test, backend_export_test): the
// handshake by hand (structured replies and base:allocation on request, OPT_GO), then requests
// as raw bytes, so a test can pipeline, split and break them at will. Every receive has a
// timeout so a server bug fails the test instead of hanging it.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "datapath/nbd/codec.h"
#include "datapath/nbd/proto.h"
#include "test/support/nbd_bytes.h"

namespace nbdcsi::test {

inline void Append(Bytes& to, const Bytes& b) { to.insert(to.end(), b.begin(), b.end()); }

struct Reply {
  uint64_t cookie = 0;
  uint32_t error = 0;
  Bytes data;                        // READ data
  std::vector<nbd::Extent> extents;  // BLOCK_STATUS
};

class Client {
 public:
  ~Client() {
    if (fd_ >= 0) close(fd_);
  }

  static std::unique_ptr<Client> Connect(const std::string& path, const std::string& name,
                                         bool structured, bool meta) {
    auto c = std::unique_ptr<Client>(new Client());
    c->structured_ = structured;
    c->fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    EXPECT_GE(c->fd_, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path.c_str());
    if (connect(c->fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      ADD_FAILURE() << "connect " << path << ": " << strerror(errno);
      return nullptr;
    }
    timeval tv{10, 0};
    setsockopt(c->fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (!c->Handshake(name, meta)) return nullptr;
    return c;
  }

  // A socket already in the transmission phase (NbdFrontend::ServeSocketPairs: the kernel's
  // side, simple replies only). Takes ownership of `fd`.
  static std::unique_ptr<Client> Adopt(int fd) {
    auto c = std::unique_ptr<Client>(new Client());
    c->fd_ = fd;
    timeval tv{10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return c;
  }

  // Greeting only: leaves the connection in the handshake phase.
  static int ConnectRaw(const std::string& path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path.c_str());
    if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      close(fd);
      return -1;
    }
    timeval tv{5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
  }

  int fd() const { return fd_; }
  bool structured() const { return structured_; }
  uint64_t export_size() const { return size_; }
  uint16_t transmission_flags() const { return tflags_; }

  void Send(const Bytes& b) { SendRaw(b.data(), b.size()); }
  void SendRaw(const void* p, size_t n) {
    auto* c = static_cast<const uint8_t*>(p);
    while (n) {
      ssize_t r = send(fd_, c, n, MSG_NOSIGNAL);
      if (r < 0 && errno == EINTR) continue;  // a signal to the test process, not the peer
      ASSERT_GT(r, 0) << "send: " << strerror(errno);
      c += r;
      n -= static_cast<size_t>(r);
    }
  }
  // False on EOF, timeout or error.
  bool Recv(void* p, size_t n) { return RecvAll(fd_, p, n); }
  // True when the server has closed (EOF or reset) within `ms`.
  bool ClosedWithin(int ms) {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    uint8_t sink[4096];
    while (std::chrono::steady_clock::now() < until) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      ssize_t r = recv(fd_, sink, sizeof sink, MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno != EAGAIN)) return true;
    }
    return false;
  }

  // Reads one complete reply. `read_len` gives the length of every outstanding READ by cookie
  // (simple replies do not carry it); an answered cookie is removed from it.
  bool ReadReply(Reply* out, std::map<uint64_t, uint32_t>& read_len) {
    *out = Reply{};
    if (!structured_) {
      uint8_t h[nbd::kSimpleReplyLen];
      if (!Recv(h, sizeof h)) return false;
      EXPECT_EQ(nbd::LoadBE32(h), nbd::kSimpleReplyMagic);
      if (nbd::LoadBE32(h) != nbd::kSimpleReplyMagic) return false;
      out->error = nbd::LoadBE32(h + 4);
      out->cookie = nbd::LoadBE64(h + 8);
      auto it = read_len.find(out->cookie);
      if (it != read_len.end()) {
        if (!out->error) {
          out->data.resize(it->second);
          if (!Recv(out->data.data(), out->data.size())) return false;
        }
        read_len.erase(it);
      }
      return true;
    }
    for (;;) {
      uint8_t h[nbd::kStructuredReplyHeaderLen];
      if (!Recv(h, sizeof h)) return false;
      EXPECT_EQ(nbd::LoadBE32(h), nbd::kStructuredReplyMagic);
      if (nbd::LoadBE32(h) != nbd::kStructuredReplyMagic) return false;
      uint16_t flags = nbd::LoadBE16(h + 4);
      uint16_t type = nbd::LoadBE16(h + 6);
      out->cookie = nbd::LoadBE64(h + 8);
      uint32_t len = nbd::LoadBE32(h + 16);
      Bytes payload(len);
      if (len && !Recv(payload.data(), len)) return false;
      switch (type) {
        case nbd::kReplyTypeNone:
          EXPECT_EQ(len, 0u);
          break;
        case nbd::kReplyTypeOffsetData:
          EXPECT_GE(len, 8u);
          out->data.assign(payload.begin() + 8, payload.end());
          break;
        case nbd::kReplyTypeError:
          EXPECT_GE(len, 6u);
          out->error = nbd::LoadBE32(payload.data());
          break;
        case nbd::kReplyTypeBlockStatus:
          EXPECT_EQ((len - 4) % 8, 0u);
          EXPECT_EQ(nbd::LoadBE32(payload.data()), ctx_id_);
          for (size_t i = 4; i + 8 <= len; i += 8)
            out->extents.push_back({nbd::LoadBE32(&payload[i]), nbd::LoadBE32(&payload[i + 4])});
          break;
        default:
          ADD_FAILURE() << "unexpected structured reply type " << type;
          return false;
      }
      if (flags & nbd::kReplyFlagDone) break;
    }
    read_len.erase(out->cookie);
    return true;
  }

  // One request, one reply (nothing else outstanding).
  Reply Call(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length,
             const Bytes& payload = {}) {
    uint64_t cookie = ++next_cookie_;
    Send(NbdRequest(type, flags, cookie, offset, length, payload));
    std::map<uint64_t, uint32_t> rl;
    if (type == nbd::kCmdRead) rl[cookie] = length;
    Reply r;
    EXPECT_TRUE(ReadReply(&r, rl)) << "no reply to request type " << type;
    EXPECT_EQ(r.cookie, cookie);
    return r;
  }
  Bytes Read(uint64_t offset, uint32_t length) {
    Reply r = Call(nbd::kCmdRead, 0, offset, length);
    EXPECT_EQ(r.error, 0u);
    EXPECT_EQ(r.data.size(), length);
    return r.data;
  }
  void Write(uint64_t offset, const Bytes& data, uint16_t flags = 0) {
    Reply r = Call(nbd::kCmdWrite, flags, offset, static_cast<uint32_t>(data.size()), data);
    EXPECT_EQ(r.error, 0u) << "write at " << offset;
  }

 private:
  Client() = default;

  void Option(uint32_t opt, const Bytes& data) {
    Bytes b(16);
    nbd::StoreBE64(&b[0], nbd::kIHaveOpt);
    nbd::StoreBE32(&b[8], opt);
    nbd::StoreBE32(&b[12], static_cast<uint32_t>(data.size()));
    Append(b, data);
    Send(b);
  }
  // Reads one option reply; returns its type, fills `data`.
  uint32_t OptionReply(uint32_t opt, Bytes* data) {
    uint8_t h[20];
    if (!Recv(h, sizeof h)) return 0;
    EXPECT_EQ(nbd::LoadBE64(h), nbd::kOptReplyMagic);
    EXPECT_EQ(nbd::LoadBE32(h + 8), opt);
    data->resize(nbd::LoadBE32(h + 16));
    if (!data->empty() && !Recv(data->data(), data->size())) return 0;
    return nbd::LoadBE32(h + 12);
  }
  static Bytes NameField(const std::string& name) {
    Bytes b(4);
    nbd::StoreBE32(&b[0], static_cast<uint32_t>(name.size()));
    b.insert(b.end(), name.begin(), name.end());
    return b;
  }

  bool Handshake(const std::string& name, bool meta) {
    uint8_t greet[18];
    if (!Recv(greet, sizeof greet)) return false;
    EXPECT_EQ(nbd::LoadBE64(greet), nbd::kNbdMagic);
    EXPECT_EQ(nbd::LoadBE64(greet + 8), nbd::kIHaveOpt);
    uint8_t cflags[4];
    nbd::StoreBE32(cflags, nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes);
    SendRaw(cflags, 4);
    Bytes d;
    if (structured_) {
      Option(nbd::kOptStructuredReply, {});
      EXPECT_EQ(OptionReply(nbd::kOptStructuredReply, &d), nbd::kRepAck);
    }
    if (meta) {
      Bytes q = NameField(name);
      Bytes n(4);
      nbd::StoreBE32(&n[0], 1);
      Append(q, n);
      Append(q, NameField(std::string(nbd::kMetaBaseAllocation)));
      Option(nbd::kOptSetMetaContext, q);
      uint32_t t;
      while ((t = OptionReply(nbd::kOptSetMetaContext, &d)) == nbd::kRepMetaContext) {
        ctx_id_ = nbd::LoadBE32(d.data());
      }
      EXPECT_EQ(t, nbd::kRepAck);
    }
    Bytes go = NameField(name);
    go.push_back(0);
    go.push_back(0);  // no information requests
    Option(nbd::kOptGo, go);
    for (;;) {
      uint32_t t = OptionReply(nbd::kOptGo, &d);
      if (t == nbd::kRepAck) return true;
      if (t != nbd::kRepInfo) {
        ADD_FAILURE() << "OPT_GO for " << name << " answered with " << std::hex << t;
        return false;
      }
      if (nbd::LoadBE16(d.data()) == nbd::kInfoExport) {
        size_ = nbd::LoadBE64(&d[2]);
        tflags_ = nbd::LoadBE16(&d[10]);
      }
    }
  }

  int fd_ = -1;
  bool structured_ = false;
  uint32_t ctx_id_ = 0;
  uint64_t size_ = 0;
  uint16_t tflags_ = 0;
  uint64_t next_cookie_ = 1u << 20;
};

}  // namespace nbdcsi::test
