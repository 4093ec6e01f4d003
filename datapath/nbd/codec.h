// The transmission-phase codec: request parsing and validation, reply encoding.
//
// Pure functions over caller-provided bytes: no I/O, no logging, no allocation, no
// dependency beyond the standard library, so the engine can call them on every request and
// the fuzzer can build them alone with clang.
#pragma once

#include <cstddef>
#include <cstdint>

#include "datapath/nbd/proto.h"

namespace nbdcsi::nbd {

// ---- Big-endian helpers (unaligned-safe) ----
inline uint16_t LoadBE16(const uint8_t* p) {
  return static_cast<uint16_t>((uint16_t{p[0]} << 8) | p[1]);
}
inline uint32_t LoadBE32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}
inline uint64_t LoadBE64(const uint8_t* p) {
  return (uint64_t{LoadBE32(p)} << 32) | LoadBE32(p + 4);
}
inline void StoreBE16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
inline void StoreBE32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}
inline void StoreBE64(uint8_t* p, uint64_t v) {
  StoreBE32(p, static_cast<uint32_t>(v >> 32));
  StoreBE32(p + 4, static_cast<uint32_t>(v));
}

// ---- Requests ----
struct RequestHeader {
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;  // the spec's "handle": opaque, echoed in every reply
  uint64_t offset;
  uint32_t length;
};

// Parses the 28-byte request header at `in`. Returns false when the magic is wrong: framing
// is broken and the caller disconnects. `out` is filled either way.
bool ParseRequestHeader(const uint8_t* in, RequestHeader* out);

// What the transmission phase was negotiated with; CheckRequest needs nothing else.
struct TransmissionParams {
  uint64_t export_size;
  bool read_only;
  bool structured_replies;
  bool base_allocation;  // base:allocation meta context negotiated for this export
  uint32_t max_payload = kMaxPayload;
};

struct RequestCheck {
  uint32_t nbd_error;  // 0: valid; else the NBD error to reply with (stream stays in sync)
  uint32_t drain;      // payload bytes following the header that must be read (WRITE data),
                       // whether the request is valid or not
  bool fatal;          // framing broken: reply with nbd_error if possible, then close
};

// Validates a request completely before anything touches storage. Rules, first match wins
// (spec section "Error values" and the per-command text):
//  1. DISC is always accepted: it has no reply, and the only reaction to it, well-formed or
//     not (the spec wants zero offset/length), is to finish in-flight work and close.
//  2. Unknown command, CACHE (not advertised), RESIZE            -> EINVAL
//  3. Flag not documented for the command -> EINVAL. FUA is valid on every command (we
//     advertise SEND_FUA); DF only on READ and only with structured replies (SEND_DF is not
//     advertised otherwise); NO_HOLE and FAST_ZERO only on WRITE_ZEROES; REQ_ONE only on
//     BLOCK_STATUS.
//  4. WRITE / TRIM / WRITE_ZEROES on a read-only export          -> EPERM
//  5. FLUSH with nonzero offset or length (reserved, MUST be 0)  -> EINVAL
//  6. BLOCK_STATUS without base:allocation negotiated            -> EINVAL
//  7. Zero length on READ/WRITE/TRIM/WRITE_ZEROES/BLOCK_STATUS   -> EINVAL (the spec leaves it
//     unspecified; an empty structured READ reply cannot even be encoded as OFFSET_DATA)
//  8. READ/WRITE length > max_payload -> EINVAL, the spec's error for exceeding the
//     advertised maximum block size (EOVERFLOW is reserved for DF reads we cannot send
//     unfragmented, and we never fragment). TRIM, WRITE_ZEROES and BLOCK_STATUS carry no
//     payload and may be as long as the export: the kernel issues large discards.
//  9. offset + length overflows or passes the end: WRITE and WRITE_ZEROES -> ENOSPC;
//     READ, TRIM and BLOCK_STATUS -> EINVAL (both as the spec recommends).
// drain is always the WRITE length, so a rejected WRITE leaves the stream in sync, except a
// WRITE longer than both max_payload and kMaxWriteDrain: that is fatal (drain 0, EINVAL).
RequestCheck CheckRequest(const RequestHeader& h, const TransmissionParams& p);

// The one host errno -> NBD error mapping. Accepts a positive errno or an io_uring style
// negative result. 0 maps to 0. Callers should log the precise errno first: this is lossy.
uint32_t ErrnoToNbd(int err);
// The other direction, for a client reading replies: an NBD error value back to errno. The
// spec's values are Linux errno numbers; one outside the documented set becomes EIO (what a
// block device reports for "the request failed").
int NbdToErrno(uint32_t nbd_error);

// "READ", "WRITE", ... for messages; "command" for a type this codec does not know.
const char* CommandName(uint16_t type);

// ---- Replies (into caller buffers; each returns bytes written, 0 if not encodable) ----

inline constexpr size_t kErrorChunkPayloadLen = 6;  // error (4) + message length (2), no message
inline constexpr size_t kMaxDoneReplyLen = kStructuredReplyHeaderLen + kErrorChunkPayloadLen;

// A complete reply for a command that returns no data, or for any error (including errors of
// READ and BLOCK_STATUS). structured=false: simple reply (16 bytes). structured=true: success
// is an NBD_REPLY_TYPE_NONE chunk with DONE (20 bytes); an error is an NBD_REPLY_TYPE_ERROR
// chunk with DONE and an empty message (26 bytes).
size_t EncodeDoneReply(uint8_t* out, bool structured, uint64_t cookie, uint32_t nbd_error);

// Header to send before `length` bytes of READ data. Simple: the 16-byte simple reply.
// Structured: one NBD_REPLY_TYPE_OFFSET_DATA chunk carrying DONE (20 + 8 bytes). Once
// structured replies are negotiated the spec forbids simple replies to READ, so callers pass
// TransmissionParams::structured_replies. DONE on a content chunk is only legal when no error
// can surface while it is sent: the engine must have the whole buffer read before sending it.
// Returns 0 for a structured reply with length 0 or length > 2^32 - 9 (not representable;
// CheckRequest never lets those through).
inline constexpr size_t kMaxReadReplyHeaderLen = kStructuredReplyHeaderLen + 8;
size_t EncodeReadReplyHeader(uint8_t* out, bool structured, uint64_t cookie, uint64_t offset,
                             uint32_t length);

struct Extent {
  uint32_t length;  // MUST be nonzero
  uint32_t flags;   // kStateHole | kStateZero
};
inline constexpr size_t kBlockStatusExtentLen = 8;
// Bytes EncodeBlockStatusReply needs for n extents.
inline constexpr size_t BlockStatusReplyLen(size_t n) {
  return kStructuredReplyHeaderLen + 4 + n * kBlockStatusExtentLen;
}
// One NBD_REPLY_TYPE_BLOCK_STATUS chunk with DONE for meta context id `ctx`. Returns 0 if
// `cap` is too small, n is 0, or an extent has length 0 (each would be a protocol violation).
size_t EncodeBlockStatusReply(uint8_t* out, size_t cap, uint64_t cookie, uint32_t ctx,
                              const Extent* ext, size_t n);

// The 20-byte header of any structured chunk, for engine code that builds its own chunks
// (e.g. OFFSET_HOLE for sparse reads). `length` is the payload length that follows.
size_t EncodeStructuredHeader(uint8_t* out, uint16_t flags, uint16_t type, uint64_t cookie,
                              uint32_t length);

}  // namespace nbdcsi::nbd
