// Where a gRPC server listens or a client connects: "unix:///abs/path" or "tcp://host:port".
//
// Parsed once at the edge (flags, environment) so that every later layer works with a checked
// value and every bad spelling gets one clear message.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace nbdcsi {

struct Endpoint {
  enum class Kind { kUnix, kTcp };
  Kind kind = Kind::kUnix;
  std::string path;   // kUnix: absolute socket path
  std::string host;   // kTcp: host name, IPv4 literal, or IPv6 literal without brackets
  uint16_t port = 0;  // kTcp: 1..65535

  // The form grpc::CreateChannel and ServerBuilder::AddListeningPort accept.
  std::string GrpcTarget() const;
  // The canonical spelling; ParseEndpoint(ToString()) gives the same endpoint back.
  std::string ToString() const;
};

// EINVAL with a message that quotes the input and shows the accepted forms.
StatusOr<Endpoint> ParseEndpoint(std::string_view s);

// Makes `path` free for bind(): a socket file left behind by a dead process is removed (connect()
// is refused), a live one is EADDRINUSE ("... is in use by a running process"), and anything that
// is not a socket is EEXIST and left alone. A missing path is fine.
Status RemoveStaleUnixSocket(const std::string& path);

}  // namespace nbdcsi
