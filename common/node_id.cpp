#include "common/node_id.h"

#include <string>

#include <fmt/format.h>

#include "common/endpoint.h"

namespace nbdcsi {
namespace {

bool LowerAlnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

// Messages quote the id, which comes from flags, heartbeats and CSI ids: a control byte in it
// would forge or garble a log line, so those are shown as \xNN (found by test/fuzz csi_ids).
std::string Printable(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += static_cast<char>(c);
  }
  return out;
}

}  // namespace

Status ValidateNodeId(std::string_view id) {
  if (id.empty()) return Error(EINVAL, "node id is empty");
  if (id.size() > 253) {
    return Error(EINVAL, "node id \"{}...\" is {} characters; at most 253 are allowed",
                 Printable(id.substr(0, 32)), id.size());
  }
  for (char c : id) {
    if (!LowerAlnum(c) && c != '-' && c != '.') {
      return Error(EINVAL, "node id \"{}\": character '{}' is not allowed (a Kubernetes node name "
                           "uses a-z, 0-9, '-' and '.')",
                   Printable(id), Printable(std::string_view(&c, 1)));
    }
  }
  if (!LowerAlnum(id.front()) || !LowerAlnum(id.back())) {
    return Error(EINVAL, "node id \"{}\" must start and end with a letter or digit", id);
  }
  return Status::Ok();
}

Status ValidateHostPort(std::string_view addr) {
  if (addr.find("://") != std::string_view::npos) {
    return Error(EINVAL, "address \"{}\": write host:port without a scheme", addr);
  }
  // The endpoint parser already knows host names, IPv6 brackets and port ranges.
  auto ep = ParseEndpoint("tcp://" + std::string(addr));
  if (!ep.ok()) return Error(EINVAL, "address \"{}\": expected host:port ({})", addr,
                             ep.status().message());
  return Status::Ok();
}

Status ValidateDialAddress(std::string_view addr) {
  if (Status s = ValidateHostPort(addr); !s.ok()) return s;
  auto ep = ParseEndpoint("tcp://" + std::string(addr));
  if (ep->host == "0.0.0.0" || ep->host == "::" || ep->host == "0:0:0:0:0:0:0:0") {
    return Error(EINVAL, "address \"{}\": {} is a wildcard for listening, not an address a peer "
                         "can dial", addr, ep->host);
  }
  return Status::Ok();
}

}  // namespace nbdcsi
