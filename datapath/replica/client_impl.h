// The replica client's insides, shared by client.cpp (connect, submission, close, grow) and
// client_io.cpp (the io thread: requests onto connections, sends and receives over io_uring,
// replies parsed, timeouts, connection loss). Not for use outside those two files.
#pragma once

#include <liburing.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/openssl_util.h"
#include "datapath/engine/uring_sqe.h"
#include "datapath/nbd/codec.h"
#include "datapath/replica/client.h"
#include "datapath/replica/reply_parser.h"

namespace nbdcsi::replica {
namespace client_internal {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

inline constexpr size_t kRxBytes = 256 * 1024;  // plaintext replies waiting to be parsed
inline constexpr size_t kNetBytes = 64 * 1024;  // TLS: ciphertext from one recv
inline constexpr size_t kMaxBatch = 64;         // requests per send
inline constexpr size_t kMaxBatchBytes = 8u << 20;
inline constexpr milliseconds kTick(100);  // timeout granularity while requests are in flight

enum Op : uint64_t { kOpRecv = 1, kOpSend = 2, kOpWake = 3 };
inline uint64_t Tag(size_t conn, Op op) { return (uint64_t{conn} << 8) | op; }

// The client whose io thread this is (null elsewhere): a callback that submits more requests
// needs no wake-up, and one that calls Close() is a bug we can name.
extern thread_local const void* tls_io_thread_of;

// One request, from the submit call to its callback. The states are implied by the fields and
// checked where they change: queued (conn < 0) -> assigned to a connection with a cookie
// (slot held) -> its bytes in a send (in_send, plaintext only: the kernel reads the caller's
// buffer) -> reply complete (reply_done, slot freed). It completes when the reply is done and
// no send still holds its buffer, exactly once.
struct Request : ReplyState {
  uint16_t flags = 0;
  const uint8_t* write_buf = nullptr;
  Callback cb;
  BlockStatusCallback bs_cb;     // BLOCK_STATUS: called instead of cb, with the extents
  std::vector<BlockExtent> ext;  // BLOCK_STATUS: filled by the parser (extents points here)
  Clock::time_point deadline = Clock::time_point::max();
  Request* parent = nullptr;  // a FLUSH sent on every connection: the caller's request
  int children = 0;
  int conn = -1;
  bool on_wire = false;  // its header went into a send: only now may a reply name its cookie
  bool reply_done = false;
  bool in_send = false;
  bool completed = false;
  uint8_t hdr[nbd::kRequestHeaderLen];
};

}  // namespace client_internal

struct ReplicaClient::Impl {
  using Clock = client_internal::Clock;
  using Request = client_internal::Request;
  static constexpr size_t kRxBytes = client_internal::kRxBytes;

  struct Conn : ReplyParser::Table {
    struct Slot {
      Request* req = nullptr;
      uint32_t gen = 0;
    };
    Impl* impl = nullptr;
    size_t index = 0;
    int fd = -1;
    SslPtr ssl;
    bool dead = false;
    int ops = 0;  // SQEs in the kernel; the fd and buffers live until it is 0
    bool recv_armed = false;
    bool send_armed = false;
    std::unique_ptr<uint8_t[]> rx = std::make_unique<uint8_t[]>(kRxBytes);
    size_t rbeg = 0, rend = 0;
    std::unique_ptr<uint8_t[]> net;  // TLS only
    ReplyParser parser;
    std::deque<Request*> queue;   // have a cookie, wait for the next send
    std::vector<Request*> batch;  // in the send in flight (plaintext)
    std::vector<iovec> iov;
    size_t iov_at = 0;
    msghdr msg{};
    std::vector<uint8_t> tx;  // TLS: ciphertext of the send in flight
    size_t tx_at = 0;
    std::vector<Slot> slots;
    std::vector<uint32_t> free_slots;
    uint32_t in_flight = 0;

    ReplyState* Find(uint64_t cookie) override {
      const uint32_t i = static_cast<uint32_t>(cookie);
      if (i >= slots.size() || !slots[i].req || slots[i].gen != (cookie >> 32)) return nullptr;
      // A reply to a request we have not sent yet (a server guessing cookies) is no reply.
      return slots[i].req->on_wire ? slots[i].req : nullptr;
    }
    void Done(uint64_t cookie, ReplyState* r) override {
      auto* req = static_cast<Request*>(r);
      Release(static_cast<uint32_t>(cookie));
      req->reply_done = true;
      impl->MaybeComplete(req);
    }
    void Release(uint32_t i) {
      slots[i].req = nullptr;
      ++slots[i].gen;
      free_slots.push_back(i);
      --in_flight;
    }
  };

  ClientOptions opts;
  std::string name;
  ExportProperties props;
  // The end requests are checked against: props.size, raised by Grow once a fresh handshake saw
  // the export grow (the server checks each request against its volume's live size).
  std::atomic<uint64_t> size{0};
  std::unique_ptr<ClientTlsContext> tls;  // for Grow's handshake
  std::vector<std::unique_ptr<Conn>> conns;
  io_uring ring{};
  bool ring_ok = false;
  int wake_fd = -1;
  uint64_t wake_buf = 0;
  bool wake_armed = false;
  std::thread thread;

  std::mutex mu;
  std::vector<Request*> incoming;    // guarded by mu
  bool closing = false;              // guarded by mu
  Clock::time_point close_deadline;  // guarded by mu
  std::string last_loss;             // guarded by mu
  bool joined = false;               // guarded by close_mu
  std::mutex close_mu;
  std::atomic<bool> wake_pending{false};

  // io thread only
  std::deque<Request*> pending;  // accepted, no connection yet
  std::vector<Request*> taken;
  std::vector<std::pair<uint64_t, int>> cqes;
  size_t rr = 0;
  bool shutting_down = false;
  Clock::time_point next_timeout_check;

  std::atomic<uint64_t> c_requests{0}, c_ok{0}, c_errors{0}, c_timeouts{0}, c_bytes_read{0},
      c_bytes_written{0}, c_in_flight{0}, c_lost{0};
  std::atomic<size_t> healthy{0};

  ~Impl() {
    for (auto& c : conns) {
      if (c->fd >= 0) close(c->fd);
    }
    if (ring_ok) io_uring_queue_exit(&ring);
    if (wake_fd >= 0) close(wake_fd);
  }

  // Submission (any thread; client.cpp).
  Status Submit(std::unique_ptr<Request> r);
  void Wake();
  Status CheckRange(uint16_t type, uint64_t offset, uint64_t length) const;

  // The io thread (client_io.cpp).
  void Loop();
  void ArmWake();
  io_uring_sqe* GetSqe() { return datapath::engine::GetSqe(ring); }
  void TakeIncoming();
  Conn* PickConn();
  void Assign(Conn& c, Request* r);
  void Dispatch();
  void KickSend(Conn& c);
  void PrepSendmsg(Conn& c);
  bool TlsWrite(Conn& c, const uint8_t* p, size_t n);
  void ArmRecv(Conn& c);
  void Compact(Conn& c);
  bool Parse(Conn& c);
  void DecryptAndParse(Conn& c);
  void OnRecv(Conn& c, int res);
  void OnSend(Conn& c, int res);
  void WaitAndReap();
  bool closing_now();
  void ReleaseIfIdle(Conn& c);
  std::string LastLoss();
  void Kill(Conn& c, const Status& cause);
  void Fail(Request* r, Status s);
  void MaybeComplete(Request* r);
  void CheckTimeouts();
  // True when the loop may end: closing, everything failed or finished, no SQE outstanding.
  bool CheckClose();
  // NBD_CMD_DISC, best effort and non-blocking, so that the server logs a clean goodbye.
  void SendDisc(Conn& c);
};

}  // namespace nbdcsi::replica
