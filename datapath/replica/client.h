// ReplicaClient: the datapath's asynchronous NBD client towards one remote replica of a volume
// (another node's nbd-datapathd over TCP with mutual TLS, or any NBD server; Unix sockets for
// local peers and tests). The fan-out target of issue 16 holds one per remote replica.
//
// Threads: Connect() opens every connection on the calling thread (handshake, TLS, GO), then
// starts one io thread that owns an io_uring and every socket; requests may be submitted from
// any thread. Callbacks run on the io thread: they must be short and must not block (they may
// submit more requests; they must not call Close() or destroy the client).
//
// Contract of each request: Read/Write/Flush/Trim/WriteZeroes/BlockStatus either return an error
// (and the callback is never called: invalid arguments, the client is closing, no connection is
// left) or return OK and the callback is called exactly once, with OK or with an errno Status:
//   - an error the server reported for the request (NBD error mapped back to errno: EIO,
//     ENOSPC, EPERM, EINVAL, ENOTSUP, ESHUTDOWN, ...), the connection staying up;
//   - the loss of the connection it was sent on (ECONNRESET: server closed or reset, or fenced
//     the connection by closing it; EPIPE; EPROTO: the server broke the protocol; ETIMEDOUT:
//     no reply within the request timeout; ESHUTDOWN: the client was closed), with the cause
//     in the message. A request is never retried on another connection: whether a write that
//     was in flight on a dead connection reached the disk is unknown, and only the caller (the
//     target, which marks the replica out of sync) can decide what that means.
// Buffers passed to Read and Write must stay valid until the callback.
//
// FLUSH: with CAN_MULTI_CONN (or one connection) one FLUSH on one connection covers every write
// completed before it; otherwise the client sends FLUSH on every live connection and completes
// when all have answered (first error wins).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/endpoint.h"
#include "common/status.h"
#include "datapath/replica/handshake.h"
#include "datapath/replica/reply_parser.h"
#include "datapath/replica/tls_client.h"

namespace nbdcsi::replica {

struct ClientOptions {
  Endpoint endpoint;        // tcp://host:port or unix:///path
  std::string export_name;  // the volume
  // > 0: the export is opened as "NAME@epoch=N" (the fencing contract); the server refuses a
  // stale epoch with ESTALE at connect.
  uint64_t epoch = 0;
  TlsClientFiles tls;  // all empty: plaintext
  int connections = 1;
  bool read_only = false;  // false: the export must be writable and accept FLUSH and FUA
  std::chrono::milliseconds handshake_timeout{10'000};
  // A request with no reply within this time ends its connection with ETIMEDOUT (a silent peer
  // must not hang the target). 0: no timeout.
  std::chrono::milliseconds request_timeout{30'000};
  uint32_t max_in_flight_per_connection = 128;
  std::string name;  // for logs and messages; default: the endpoint and export
  // Select the base:allocation meta context (NBD_OPT_SET_META_CONTEXT) so BlockStatus works. A
  // server without it still connects; BlockStatus then returns ENOTSUP.
  bool base_allocation = false;
};

// The export name sent on the wire for (export, epoch): "NAME" or "NAME@epoch=N". EINVAL for a
// name the protocol cannot carry or that already names an epoch.
StatusOr<std::string> WireExportName(const std::string& export_name, uint64_t epoch);

struct ClientCounters {
  uint64_t requests = 0;  // accepted by a submit call
  uint64_t completed_ok = 0;
  uint64_t errors = 0;         // completed with an error (server error or lost connection)
  uint64_t timeouts = 0;       // requests whose timeout ended their connection
  uint64_t bytes_read = 0;     // by successful READs
  uint64_t bytes_written = 0;  // by successful WRITEs
  uint64_t in_flight = 0;      // accepted, callback not yet called
  uint64_t connections_lost = 0;
  uint64_t connections_healthy = 0;
};

using Callback = std::function<void(const Status&)>;
// BLOCK_STATUS: on success the extents (length, flags) cover [offset, offset + sum of lengths),
// in order, starting at the request's offset: at least one, never past the request's end (a
// server's longer last extent is cut), possibly fewer bytes than asked (ask again from where
// they end). Empty on error.
using BlockStatusCallback = std::function<void(const Status&, std::vector<BlockExtent>)>;

class ReplicaClient {
 public:
  // Opens `connections` connections (all or nothing, within handshake_timeout each) and starts
  // the io thread. Errors as OpenConnection (handshake.h), EINVAL for bad options, EPROTO when
  // the connections disagree about the export.
  static StatusOr<std::unique_ptr<ReplicaClient>> Connect(const ClientOptions& options);
  // Close(0): everything in flight fails with ESHUTDOWN, then the thread is joined.
  ~ReplicaClient();
  ReplicaClient(const ReplicaClient&) = delete;
  ReplicaClient& operator=(const ReplicaClient&) = delete;

  Status Read(uint64_t offset, std::span<uint8_t> buf, Callback cb);
  Status Write(uint64_t offset, std::span<const uint8_t> data, bool fua, Callback cb);
  Status Flush(Callback cb);
  Status Trim(uint64_t offset, uint32_t length, bool fua, Callback cb);
  // no_hole: the zeroes must be allocated (NBD_CMD_FLAG_NO_HOLE), not punched.
  Status WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole, Callback cb);
  // NBD_CMD_BLOCK_STATUS on base:allocation (ClientOptions::base_allocation); ENOTSUP at once
  // when the export has no such context. Same contract as the other requests.
  Status BlockStatus(uint64_t offset, uint32_t length, BlockStatusCallback cb);

  // Stops accepting requests, lets those in flight finish for up to `grace`, fails the rest
  // with ESHUTDOWN, says NBD_CMD_DISC where a connection is idle, and joins the io thread.
  // Idempotent. Not from a callback.
  void Close(std::chrono::milliseconds grace = std::chrono::milliseconds(0));

  // What the first handshake saw (its size stays that; size() is the live bound).
  const ExportProperties& export_properties() const;
  // The end requests are checked against: the handshake's size until Grow raised it.
  uint64_t size() const;
  // The export grew (its volume was resized on the server): a fresh handshake confirms it is at
  // least `size` bytes, then requests up to `size` are accepted. ENOSPC naming both sizes when it
  // is smaller; the handshake's errors as OpenConnection. Never lowers the bound.
  StatusOr<uint64_t> Grow(uint64_t size);
  const std::string& name() const;
  ClientCounters counters() const;
  size_t healthy_connections() const;

  struct Impl;

 private:
  explicit ReplicaClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::replica
