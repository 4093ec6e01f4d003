// Opening one connection to an NBD server, up to the transmission phase: dial (TCP or Unix),
// the fixed-newstyle handshake, NBD_OPT_STARTTLS and the TLS handshake when TLS is configured,
// NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT (base:allocation, when asked), NBD_OPT_GO with
// an NBD_INFO_BLOCK_SIZE request. Blocking, bounded by one deadline, on the calling thread; the
// connection is then handed to the client's io thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "common/endpoint.h"
#include "common/status.h"
#include "datapath/nbd/proto.h"
#include "datapath/replica/tls_client.h"

namespace nbdcsi::replica {

// What NBD_OPT_GO said about the export.
struct ExportProperties {
  uint64_t size = 0;
  uint16_t flags = 0;  // transmission flags (nbd::kFlag*)
  uint32_t min_block = 1;
  uint32_t preferred_block = 4096;
  uint32_t max_block = nbd::kMaxPayload;  // largest READ/WRITE payload, at most kMaxPayload
  // The base:allocation meta context was selected (asked for, and the server knows it): the
  // export answers NBD_CMD_BLOCK_STATUS, and its replies name this context id.
  bool base_allocation = false;
  uint32_t base_allocation_id = 0;

  bool read_only() const { return (flags & nbd::kFlagReadOnly) != 0; }
  bool can_trim() const { return (flags & nbd::kFlagSendTrim) != 0; }
  bool can_write_zeroes() const { return (flags & nbd::kFlagSendWriteZeroes) != 0; }
  bool can_multi_conn() const { return (flags & nbd::kFlagCanMultiConn) != 0; }
};

struct OpenedConnection {
  int fd = -1;  // non-blocking, close-on-exec; the caller owns it
  SslPtr ssl;   // null for plaintext
  ExportProperties props;
};

// The errors, each with the endpoint and the reason in the message:
//   ECONNREFUSED, ENOENT, ... (errno of connect), ETIMEDOUT (deadline passed),
//   ECONNRESET (the server hung up mid-handshake), EPROTO (not an NBD server, a malformed or
//   out-of-sequence reply), ENOTSUP (no fixed newstyle, no structured replies, no NBD_OPT_GO,
//   no TLS offered), EACCES (the server's certificate is refused, it refused ours, it wants
//   TLS we do not have, or policy), ENOENT (no such export), ESTALE (the server refused the
//   export name's epoch as stale), EROFS (a read-only export opened for writing).
// base_allocation: also NBD_OPT_SET_META_CONTEXT "base:allocation" before GO; a server without
// it is no error (props.base_allocation stays false).
StatusOr<OpenedConnection> OpenConnection(const Endpoint& ep, const std::string& wire_name,
                                          const ClientTlsContext* tls, bool read_only,
                                          std::chrono::steady_clock::time_point deadline,
                                          bool base_allocation = false);

// The text a server puts at the start of its NBD_OPT_GO error message when it refuses the
// epoch in `VOLUME@epoch=N` as older than the volume's current one (the fencing contract).
inline constexpr std::string_view kStaleEpochMessage = "stale epoch";

}  // namespace nbdcsi::replica
