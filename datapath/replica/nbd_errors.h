// NBD error values (from replies) back to host errno. The codec has only the other direction
// (nbd::ErrnoToNbd, for the server); a client needs this one. It lives here rather than in
// datapath/nbd because the codec belongs to another owner this session; it is a candidate to
// move next to ErrnoToNbd.
#pragma once

#include <cerrno>
#include <cstdint>

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

}  // namespace nbdcsi::replica
