// NBD error values (from replies) back to host errno, and the names and texts of the wire in our
// messages. The codec has only the other direction
// (nbd::ErrnoToNbd, for the server); a client needs this one. It lives here rather than in
// datapath/nbd because the codec belongs to another owner this session; it is a candidate to
// move next to ErrnoToNbd.
#pragma once

#include <cerrno>
#include <cstdint>
#include <string>
#include <string_view>

#include "datapath/nbd/proto.h"

namespace nbdcsi::replica {

// The spec's error values are Linux errno numbers by definition, but a server may send one
// outside the documented set; those become EIO (the spec says a client SHOULD treat unknown
// values as EINVAL-like failures; EIO is what a block device reports for "the write failed").
inline int NbdToErrno(uint32_t e) {
  switch (e) {
    case nbd::kErrPerm:
      return EPERM;
    case nbd::kErrIo:
      return EIO;
    case nbd::kErrNoMem:
      return ENOMEM;
    case nbd::kErrInval:
      return EINVAL;
    case nbd::kErrNoSpc:
      return ENOSPC;
    case nbd::kErrOverflow:
      return EOVERFLOW;
    case nbd::kErrNotSup:
      return ENOTSUP;
    case nbd::kErrShutdown:
      return ESHUTDOWN;
    default:
      return EIO;
  }
}

// "READ", "WRITE", ... for messages.
inline const char* CommandName(uint16_t type) {
  switch (type) {
    case nbd::kCmdRead:
      return "READ";
    case nbd::kCmdWrite:
      return "WRITE";
    case nbd::kCmdFlush:
      return "FLUSH";
    case nbd::kCmdTrim:
      return "TRIM";
    case nbd::kCmdWriteZeroes:
      return "WRITE_ZEROES";
    case nbd::kCmdDisc:
      return "DISC";
    default:
      return "command";
  }
}

// A server's message as it may go into ours: printable ASCII, at most the spec's 4096 bytes.
inline std::string PrintableText(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, nbd::kMaxStringLen)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}

}  // namespace nbdcsi::replica
