#include "datapath/nbd/codec.h"

#include <cerrno>

namespace nbdcsi::nbd {

bool ParseRequestHeader(const uint8_t* in, RequestHeader* out) {
  out->flags = LoadBE16(in + 4);
  out->type = LoadBE16(in + 6);
  out->cookie = LoadBE64(in + 8);
  out->offset = LoadBE64(in + 16);
  out->length = LoadBE32(in + 24);
  return LoadBE32(in) == kRequestMagic;
}

namespace {

uint16_t AllowedFlags(uint16_t type, bool structured) {
  // FUA is accepted on every command: the spec says a server advertising SEND_FUA MUST
  // accept it anywhere, and existing clients do set it on FLUSH and READ.
  switch (type) {
    case kCmdRead:
      return kCmdFlagFua | (structured ? kCmdFlagDf : 0);
    case kCmdWriteZeroes:
      return kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero;
    case kCmdBlockStatus:
      return kCmdFlagFua | kCmdFlagReqOne;
    default:
      return kCmdFlagFua;
  }
}

}  // namespace

RequestCheck CheckRequest(const RequestHeader& h, const TransmissionParams& p) {
  RequestCheck r{0, 0, false};
  if (h.type == kCmdDisc) return r;

  if (h.type == kCmdWrite) {
    // Decide framing first: whatever the verdict, the payload follows the header.
    if (h.length > p.max_payload && h.length > kMaxWriteDrain) {
      return {kErrInval, 0, true};
    }
    r.drain = h.length;
  }

  auto fail = [&r](uint32_t err) {
    r.nbd_error = err;
    return r;
  };

  switch (h.type) {
    case kCmdRead:
    case kCmdWrite:
    case kCmdFlush:
    case kCmdTrim:
    case kCmdWriteZeroes:
    case kCmdBlockStatus:
      break;
    default:  // unknown, or CACHE which we do not advertise
      return fail(kErrInval);
  }
  if ((h.flags & ~AllowedFlags(h.type, p.structured_replies)) != 0) return fail(kErrInval);

  const bool writes = h.type == kCmdWrite || h.type == kCmdTrim || h.type == kCmdWriteZeroes;
  if (writes && p.read_only) return fail(kErrPerm);

  if (h.type == kCmdFlush) {
    if (h.offset != 0 || h.length != 0) return fail(kErrInval);
    return r;
  }
  if (h.type == kCmdBlockStatus && !p.base_allocation) return fail(kErrInval);
  if (h.length == 0) return fail(kErrInval);
  if ((h.type == kCmdRead || h.type == kCmdWrite) && h.length > p.max_payload) {
    return fail(kErrInval);
  }
  // Written as a subtraction so that offset + length cannot wrap.
  if (h.offset > p.export_size || h.length > p.export_size - h.offset) {
    const bool grows = h.type == kCmdWrite || h.type == kCmdWriteZeroes;
    return fail(grows ? kErrNoSpc : kErrInval);
  }
  return r;
}

uint32_t ErrnoToNbd(int err) {
  if (err < 0) err = -err;
  switch (err) {
    case 0:
      return 0;
    case EPERM:
    case EROFS:
      return kErrPerm;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return kErrNoSpc;
    case ENOMEM:
      return kErrNoMem;
    case EINVAL:
      return kErrInval;
    case EOVERFLOW:
      return kErrOverflow;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
      return kErrNotSup;
    case ESHUTDOWN:
      return kErrShutdown;
    default:
      return kErrIo;
  }
}

int NbdToErrno(uint32_t nbd_error) {
  switch (nbd_error) {
    case kErrPerm:
      return EPERM;
    case kErrIo:
      return EIO;
    case kErrNoMem:
      return ENOMEM;
    case kErrInval:
      return EINVAL;
    case kErrNoSpc:
      return ENOSPC;
    case kErrOverflow:
      return EOVERFLOW;
    case kErrNotSup:
      return ENOTSUP;
    case kErrShutdown:
      return ESHUTDOWN;
    default:
      return EIO;
  }
}

const char* CommandName(uint16_t type) {
  switch (type) {
    case kCmdRead:
      return "READ";
    case kCmdWrite:
      return "WRITE";
    case kCmdFlush:
      return "FLUSH";
    case kCmdTrim:
      return "TRIM";
    case kCmdWriteZeroes:
      return "WRITE_ZEROES";
    case kCmdDisc:
      return "DISC";
    case kCmdBlockStatus:
      return "BLOCK_STATUS";
    default:
      return "command";
  }
}

size_t EncodeStructuredHeader(uint8_t* out, uint16_t flags, uint16_t type, uint64_t cookie,
                              uint32_t length) {
  StoreBE32(out, kStructuredReplyMagic);
  StoreBE16(out + 4, flags);
  StoreBE16(out + 6, type);
  StoreBE64(out + 8, cookie);
  StoreBE32(out + 16, length);
  return kStructuredReplyHeaderLen;
}

namespace {

size_t EncodeSimpleReply(uint8_t* out, uint64_t cookie, uint32_t nbd_error) {
  StoreBE32(out, kSimpleReplyMagic);
  StoreBE32(out + 4, nbd_error);
  StoreBE64(out + 8, cookie);
  return kSimpleReplyLen;
}

}  // namespace

size_t EncodeDoneReply(uint8_t* out, bool structured, uint64_t cookie, uint32_t nbd_error) {
  if (!structured) return EncodeSimpleReply(out, cookie, nbd_error);
  if (nbd_error == 0) {
    return EncodeStructuredHeader(out, kReplyFlagDone, kReplyTypeNone, cookie, 0);
  }
  size_t n = EncodeStructuredHeader(out, kReplyFlagDone, kReplyTypeError, cookie,
                                    kErrorChunkPayloadLen);
  StoreBE32(out + n, nbd_error);
  StoreBE16(out + n + 4, 0);  // no message: the engine logs the cause on our side
  return n + kErrorChunkPayloadLen;
}

size_t EncodeReadReplyHeader(uint8_t* out, bool structured, uint64_t cookie, uint64_t offset,
                             uint32_t length) {
  if (!structured) return EncodeSimpleReply(out, cookie, 0);
  // The chunk length field covers the 8-byte offset plus the data and must be at least 9.
  if (length == 0 || length > UINT32_MAX - 8) return 0;
  size_t n = EncodeStructuredHeader(out, kReplyFlagDone, kReplyTypeOffsetData, cookie,
                                    length + 8);
  StoreBE64(out + n, offset);
  return n + 8;
}

size_t EncodeBlockStatusReply(uint8_t* out, size_t cap, uint64_t cookie, uint32_t ctx,
                              const Extent* ext, size_t n) {
  // The payload length must fit the 32-bit chunk length field.
  if (n == 0 || n > (UINT32_MAX - 4) / kBlockStatusExtentLen) return 0;
  const size_t total = BlockStatusReplyLen(n);
  if (cap < total) return 0;
  for (size_t i = 0; i < n; ++i) {
    if (ext[i].length == 0) return 0;
  }
  size_t pos = EncodeStructuredHeader(out, kReplyFlagDone, kReplyTypeBlockStatus, cookie,
                                      static_cast<uint32_t>(total - kStructuredReplyHeaderLen));
  StoreBE32(out + pos, ctx);
  pos += 4;
  for (size_t i = 0; i < n; ++i) {
    StoreBE32(out + pos, ext[i].length);
    StoreBE32(out + pos + 4, ext[i].flags);
    pos += kBlockStatusExtentLen;
  }
  return pos;
}

}  // namespace nbdcsi::nbd
