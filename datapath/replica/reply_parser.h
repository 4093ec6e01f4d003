// The transmission-phase reply stream of one connection, parsed strictly: simple replies and
// structured chunks (OFFSET_DATA, OFFSET_HOLE, NONE, ERROR, ERROR_OFFSET, and unknown error
// types as errors, as the spec asks). Pure over bytes: no sockets, no threads, so every
// violation can be tested byte by byte.
//
// Rules (a violation ends the connection, its caller fails everything in flight on it):
//   - every reply starts with the simple or structured magic;
//   - its cookie belongs to a request in flight (the table decides: Find);
//   - a chunk's flags hold nothing but DONE; NONE is empty and carries DONE;
//   - OFFSET_DATA and OFFSET_HOLE only answer READ, lie inside its range, never overlap an
//     earlier chunk of the same reply, and are not empty;
//   - ERROR chunks carry a nonzero error and a message whose length matches the chunk length;
//     ERROR_OFFSET's offset lies inside the request;
//   - a READ that ends (DONE) without an error must have been covered exactly once;
//   - a simple reply to a READ must be an error (the data framing of a simple READ reply cannot
//     be checked, and structured replies were negotiated);
//   - BLOCK_STATUS chunks only answer BLOCK_STATUS, name the context id negotiated for
//     base:allocation, come at most once per request, hold at least one extent, every extent
//     nonzero; the extents start at the request's offset and never reach past its end, except
//     that the last one may (the spec allows it without REQ_ONE): it is cut at the end;
//   - a BLOCK_STATUS that ends (DONE) without an error must have had its status chunk;
//   - no chunk is longer than its type can be (data: the request's length; BLOCK_STATUS:
//     kMaxExtentsPerChunk extents; others: a message of at most 4096 bytes plus fixed fields).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/status.h"

namespace nbdcsi::replica {

// One extent of a base:allocation BLOCK_STATUS reply.
struct BlockExtent {
  uint32_t length = 0;
  uint32_t flags = 0;  // nbd::kStateHole | nbd::kStateZero
  bool operator==(const BlockExtent&) const = default;
};

// A request in flight as the parser sees it, with the progress of its reply.
struct ReplyState {
  uint16_t type = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  uint8_t* read_buf = nullptr;  // READ: where the data goes (length bytes)
  // BLOCK_STATUS: the context id its chunk must name, and where the extents go.
  uint32_t context_id = 0;
  std::vector<BlockExtent>* extents = nullptr;

  // Filled by the parser.
  uint64_t covered = 0;  // READ bytes delivered by data and hole chunks
  Status error;          // the first error the server reported for this request

  void ResetReply() {
    covered = 0;
    error = Status::Ok();
    first_begin_ = first_end_ = 0;
    more_.clear();
    if (extents) extents->clear();
  }

 private:
  friend class ReplyParser;
  // Covered ranges: the first inline (almost every READ is answered by one chunk), more in a
  // map keyed by start.
  uint64_t first_begin_ = 0;
  uint64_t first_end_ = 0;
  std::map<uint64_t, uint64_t> more_;
};

class ReplyParser {
 public:
  class Table {
   public:
    virtual ~Table() = default;
    // The request with this cookie in flight on this connection, else null.
    virtual ReplyState* Find(uint64_t cookie) = 0;
    // Its reply is complete (its error, if any, is in r->error). The cookie is no longer valid.
    virtual void Done(uint64_t cookie, ReplyState* r) = 0;
  };

  // Consumes as much of [p, p + n) as forms whole messages (a data chunk's payload is consumed
  // as it arrives) and returns how much; the rest must be offered again with more bytes behind
  // it. Never needs more than kMaxBuffered bytes at once. A violation returns EPROTO with the
  // reason; the parser is then unusable.
  StatusOr<size_t> Feed(const uint8_t* p, size_t n, Table& table);

  // A server answering one BLOCK_STATUS with more extents than this breaks our limit (EPROTO);
  // callers keep requests small enough (Resync asks 16 MiB at a time).
  static constexpr size_t kMaxExtentsPerChunk = 8192;
  // Bytes the caller must be able to hold unconsumed (the largest non-data chunk).
  static constexpr size_t kMaxBuffered = 20 + 4 + 8 * kMaxExtentsPerChunk;
  static constexpr size_t kMaxOtherChunk = 4 + 2 + 4096 + 8;

  bool idle() const { return data_left_ == 0; }

 private:
  Status Chunk(const uint8_t* h, const uint8_t* payload, ReplyState* r, Table& table);
  Status Cover(ReplyState* r, uint64_t begin, uint64_t len, const char* what);
  Status Finish(uint64_t cookie, ReplyState* r, Table& table);
  Status Extents(const uint8_t* p, uint32_t len, ReplyState* r);

  // Inside an OFFSET_DATA payload.
  ReplyState* data_req_ = nullptr;
  uint64_t data_cookie_ = 0;
  uint64_t data_pos_ = 0;  // offset in the export of the next byte
  uint64_t data_left_ = 0;
  bool data_done_ = false;
};

}  // namespace nbdcsi::replica
