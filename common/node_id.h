// Node identity on the controller <-> datapath link: the node id a datapath registers under and
// the address it advertises for its Datapath API. Both ends check the same rules, so a
// misconfigured datapath fails at start instead of being refused at every heartbeat.
#pragma once

#include <string_view>

#include "common/status.h"

namespace nbdcsi {

// A Kubernetes node name (it is the topology.nbd.csi.io/node value and part of every volume id):
// 1-253 characters of [a-z0-9.-], starting and ending with a letter or digit. EINVAL naming the
// id and the rule it breaks.
Status ValidateNodeId(std::string_view id);

// "host:port" (no scheme) as a gRPC client dials it: a host name, an IPv4 literal or a bracketed
// IPv6 literal, and a port 1-65535. EINVAL naming the address and what is wrong.
Status ValidateHostPort(std::string_view addr);

// ValidateHostPort plus: the host is not a wildcard (0.0.0.0, ::), which a listener may use but a
// peer cannot dial. For advertised and dialled addresses.
Status ValidateDialAddress(std::string_view addr);

}  // namespace nbdcsi
