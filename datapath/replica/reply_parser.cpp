#include "datapath/replica/reply_parser.h"

#include <algorithm>
#include <cstring>

#include "datapath/nbd/codec.h"
#include "datapath/replica/nbd_errors.h"

namespace nbdcsi::replica {
namespace {

Status Violation(std::string why) { return Status(EPROTO, "protocol violation: " + why); }

}  // namespace

Status ReplyParser::Cover(ReplyState* r, uint64_t begin, uint64_t len, const char* what) {
  if (r->type != nbd::kCmdRead) {
    return Violation(fmt::format("{} chunk answers a {}", what, CommandName(r->type)));
  }
  if (len == 0) return Violation(fmt::format("empty {} chunk", what));
  const uint64_t end = begin + len;
  if (begin < r->offset || end < begin || end > r->offset + r->length) {
    return Violation(fmt::format("{} chunk [{}, +{}) outside the READ [{}, +{})", what, begin, len,
                                 r->offset, r->length));
  }
  auto overlaps = [&](uint64_t b, uint64_t e) { return begin < e && b < end; };
  if (r->covered > 0) {
    if (overlaps(r->first_begin_, r->first_end_)) {
      return Violation(
          fmt::format("{} chunk [{}, +{}) overlaps an earlier chunk", what, begin, len));
    }
    auto it = r->more_.upper_bound(begin);
    if ((it != r->more_.end() && overlaps(it->first, it->second)) ||
        (it != r->more_.begin() && overlaps(std::prev(it)->first, std::prev(it)->second))) {
      return Violation(
          fmt::format("{} chunk [{}, +{}) overlaps an earlier chunk", what, begin, len));
    }
    r->more_.emplace(begin, end);
  } else {
    r->first_begin_ = begin;
    r->first_end_ = end;
  }
  r->covered += len;
  return Status::Ok();
}

Status ReplyParser::Finish(uint64_t cookie, ReplyState* r, Table& table) {
  if (r->type == nbd::kCmdRead && r->error.ok() && r->covered != r->length) {
    return Violation(fmt::format("READ of {} bytes at {} ended after {} bytes without an error",
                                 r->length, r->offset, r->covered));
  }
  if (r->type == nbd::kCmdBlockStatus && r->error.ok() && r->covered == 0) {
    return Violation(
        fmt::format("BLOCK_STATUS [{}, +{}) ended without extents", r->offset, r->length));
  }
  table.Done(cookie, r);
  return Status::Ok();
}

Status ReplyParser::Extents(const uint8_t* p, uint32_t len, ReplyState* r) {
  if (r->type != nbd::kCmdBlockStatus) {
    return Violation(fmt::format("unexpected chunk type {} (BLOCK_STATUS) for a {}",
                                 nbd::kReplyTypeBlockStatus, CommandName(r->type)));
  }
  if (len < 12 || (len - 4) % 8 != 0) {
    return Violation(fmt::format("BLOCK_STATUS chunk of {} bytes", len));
  }
  const uint32_t id = nbd::LoadBE32(p);
  if (id != r->context_id) {
    return Violation(
        fmt::format("BLOCK_STATUS for context {} (base:allocation is {})", id, r->context_id));
  }
  // One context asked for, so one chunk: `covered` counts its bytes.
  if (r->covered > 0) return Violation("a second BLOCK_STATUS chunk for one context");
  const size_t n = (len - 4) / 8;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t elen = nbd::LoadBE32(p + 4 + 8 * i);
    const uint32_t flags = nbd::LoadBE32(p + 8 + 8 * i);
    if (elen == 0) return Violation(fmt::format("BLOCK_STATUS extent {} of 0 bytes", i));
    if (r->covered >= r->length) {
      return Violation(fmt::format("BLOCK_STATUS extent {} starts past the request [{}, +{})", i,
                                   r->offset, r->length));
    }
    const uint32_t take = static_cast<uint32_t>(std::min<uint64_t>(elen, r->length - r->covered));
    r->covered += take;
    if (r->extents) r->extents->push_back({take, flags});
  }
  return Status::Ok();
}

Status ReplyParser::Chunk(const uint8_t* h, const uint8_t* p, ReplyState* r, Table& table) {
  const uint16_t flags = nbd::LoadBE16(h + 4);
  const uint16_t type = nbd::LoadBE16(h + 6);
  const uint64_t cookie = nbd::LoadBE64(h + 8);
  const uint32_t len = nbd::LoadBE32(h + 16);
  switch (type) {
    case nbd::kReplyTypeNone:
      if (len != 0) return Violation(fmt::format("NONE chunk with {} bytes", len));
      if (!(flags & nbd::kReplyFlagDone)) return Violation("NONE chunk without DONE");
      break;
    case nbd::kReplyTypeBlockStatus:
      if (Status s = Extents(p, len, r); !s.ok()) return s;
      break;
    case nbd::kReplyTypeOffsetHole: {
      if (len != 12) return Violation(fmt::format("OFFSET_HOLE chunk of {} bytes", len));
      const uint64_t off = nbd::LoadBE64(p);
      const uint32_t size = nbd::LoadBE32(p + 8);
      if (Status s = Cover(r, off, size, "OFFSET_HOLE"); !s.ok()) return s;
      std::memset(r->read_buf + (off - r->offset), 0, size);
      break;
    }
    default: {
      if (!(type & 0x8000)) {
        return Violation(
            fmt::format("unexpected chunk type {} for a {}", type, CommandName(r->type)));
      }
      // ERROR, ERROR_OFFSET, and error types the spec may add: error (32), message length
      // (16), message, then type-specific fields (ERROR_OFFSET: the offset).
      if (len < 6) return Violation(fmt::format("error chunk of {} bytes", len));
      const uint32_t err = nbd::LoadBE32(p);
      const uint16_t mlen = nbd::LoadBE16(p + 4);
      if (err == 0) return Violation("error chunk with error 0");
      if (mlen > nbd::kMaxStringLen || size_t{6} + mlen > len) {
        return Violation(
            fmt::format("error chunk message of {} bytes in a {}-byte chunk", mlen, len));
      }
      if (type == nbd::kReplyTypeError && len != 6u + mlen) {
        return Violation(fmt::format("ERROR chunk of {} bytes with a {}-byte message", len, mlen));
      }
      if (type == nbd::kReplyTypeErrorOffset) {
        if (len != 14u + mlen) {
          return Violation(
              fmt::format("ERROR_OFFSET chunk of {} bytes with a {}-byte message", len, mlen));
        }
        const uint64_t off = nbd::LoadBE64(p + 6 + mlen);
        if (off < r->offset || off >= r->offset + r->length) {
          return Violation(fmt::format("ERROR_OFFSET {} outside the {} [{}, +{})", off,
                                       CommandName(r->type), r->offset, r->length));
        }
      }
      if (r->error.ok()) {
        const std::string msg =
            PrintableText(std::string_view(reinterpret_cast<const char*>(p + 6), mlen));
        r->error =
            Status(NbdToErrno(err),
                   fmt::format("the server failed the {}: {} (NBD error {})", CommandName(r->type),
                               msg.empty() ? strerror(NbdToErrno(err)) : msg, err));
      }
      break;
    }
  }
  if (flags & nbd::kReplyFlagDone) return Finish(cookie, r, table);
  return Status::Ok();
}

StatusOr<size_t> ReplyParser::Feed(const uint8_t* p, size_t n, Table& table) {
  size_t used = 0;
  for (;;) {
    const uint8_t* at = p + used;
    const size_t avail = n - used;
    if (data_left_ > 0) {
      const size_t take = static_cast<size_t>(std::min<uint64_t>(avail, data_left_));
      if (take == 0) return used;
      std::memcpy(data_req_->read_buf + (data_pos_ - data_req_->offset), at, take);
      data_pos_ += take;
      data_left_ -= take;
      used += take;
      if (data_left_ > 0) return used;
      ReplyState* r = data_req_;
      data_req_ = nullptr;
      if (data_done_) {
        if (Status s = Finish(data_cookie_, r, table); !s.ok()) return s;
      }
      continue;
    }
    if (avail < 4) return used;
    const uint32_t magic = nbd::LoadBE32(at);
    if (magic == nbd::kSimpleReplyMagic) {
      if (avail < nbd::kSimpleReplyLen) return used;
      const uint32_t err = nbd::LoadBE32(at + 4);
      const uint64_t cookie = nbd::LoadBE64(at + 8);
      ReplyState* r = table.Find(cookie);
      if (!r) return Violation(fmt::format("simple reply for unknown cookie {:#x}", cookie));
      if (r->type == nbd::kCmdRead && err == 0) {
        return Violation("simple reply to a READ although structured replies were negotiated");
      }
      if (r->covered > 0) return Violation("simple reply to a READ whose chunks have begun");
      if (err != 0) {
        r->error = Status(NbdToErrno(err),
                          fmt::format("the server failed the {}: {} (NBD error {})",
                                      CommandName(r->type), strerror(NbdToErrno(err)), err));
      }
      used += nbd::kSimpleReplyLen;
      if (Status s = Finish(cookie, r, table); !s.ok()) return s;
      continue;
    }
    if (magic != nbd::kStructuredReplyMagic) {
      return Violation(fmt::format("bad reply magic {:#010x}", magic));
    }
    if (avail < nbd::kStructuredReplyHeaderLen) return used;
    const uint16_t flags = nbd::LoadBE16(at + 4);
    const uint16_t type = nbd::LoadBE16(at + 6);
    const uint64_t cookie = nbd::LoadBE64(at + 8);
    const uint32_t len = nbd::LoadBE32(at + 16);
    if (flags & ~nbd::kReplyFlagDone) return Violation(fmt::format("chunk flags {:#x}", flags));
    ReplyState* r = table.Find(cookie);
    if (!r) return Violation(fmt::format("chunk for unknown cookie {:#x}", cookie));
    if (type == nbd::kReplyTypeOffsetData) {
      if (len < 9) return Violation(fmt::format("OFFSET_DATA chunk of {} bytes", len));
      if (avail < nbd::kStructuredReplyHeaderLen + 8) return used;
      const uint64_t off = nbd::LoadBE64(at + nbd::kStructuredReplyHeaderLen);
      if (Status s = Cover(r, off, len - 8, "OFFSET_DATA"); !s.ok()) return s;
      used += nbd::kStructuredReplyHeaderLen + 8;
      data_req_ = r;
      data_cookie_ = cookie;
      data_pos_ = off;
      data_left_ = len - 8;
      data_done_ = (flags & nbd::kReplyFlagDone) != 0;
      continue;
    }
    if (len > (type == nbd::kReplyTypeBlockStatus ? kMaxBuffered - nbd::kStructuredReplyHeaderLen
                                                  : kMaxOtherChunk)) {
      return Violation(fmt::format("chunk type {} of {} bytes", type, len));
    }
    if (avail < nbd::kStructuredReplyHeaderLen + len) return used;
    if (Status s = Chunk(at, at + nbd::kStructuredReplyHeaderLen, r, table); !s.ok()) return s;
    used += nbd::kStructuredReplyHeaderLen + len;
  }
}

}  // namespace nbdcsi::replica
