// The texts of the wire in the replica client's messages.
#pragma once

#include <cerrno>
#include <cstdint>
#include <string>
#include <string_view>

#include "datapath/nbd/codec.h"
#include "datapath/nbd/proto.h"

namespace nbdcsi::replica {

// NbdToErrno and CommandName live in the codec (datapath/nbd/codec.h), beside ErrnoToNbd.
using nbd::CommandName;
using nbd::NbdToErrno;

// A server's message as it may go into ours: printable ASCII, at most the spec's 4096 bytes.
inline std::string PrintableText(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, nbd::kMaxStringLen)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}

}  // namespace nbdcsi::replica
