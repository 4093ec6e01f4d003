// gRPC's default reconnect backoff grows towards two minutes: a peer that restarts (a datapath
// under the node plugin or the controller, an etcd member) would stay UNAVAILABLE to us long after
// it is back. Between attempts on a local socket or a few endpoints, a second is plenty.
// GRPC_ARG_MIN_RECONNECT_BACKOFF_MS stays at its default (20 s): it is also how long one
// connection attempt may take, and a loaded peer that is just starting can take more than a
// second to answer; each call's deadline bounds the wait anyway.
#pragma once

#include <grpcpp/support/channel_arguments.h>

namespace nbdcsi {

inline void SetPromptReconnect(grpc::ChannelArguments& args) {
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
}

}  // namespace nbdcsi
