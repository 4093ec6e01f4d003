// The replica set's members outside the fan-out: a ReplicaClient as a member's channel, the
// members' states by name, and ClusterMembership, which records the in-sync set in the cluster
// state (retrying an unreachable store for a while).
#include <algorithm>
#include <thread>
#include <utility>

#include "datapath/replica/replica_set.h"

namespace nbdcsi::replica {
namespace {

class ClientChannelImpl final : public ReplicaChannel {
 public:
  explicit ClientChannelImpl(std::unique_ptr<ReplicaClient> c) : c_(std::move(c)) {}
  Status Read(uint64_t offset, std::span<uint8_t> buf, Callback cb) override {
    return c_->Read(offset, buf, std::move(cb));
  }
  Status Write(uint64_t offset, std::span<const uint8_t> data, bool fua, Callback cb) override {
    return c_->Write(offset, data, fua, std::move(cb));
  }
  Status Flush(Callback cb) override { return c_->Flush(std::move(cb)); }
  Status Trim(uint64_t offset, uint32_t length, bool fua, Callback cb) override {
    return c_->Trim(offset, length, fua, std::move(cb));
  }
  Status WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole,
                     Callback cb) override {
    return c_->WriteZeroes(offset, length, fua, no_hole, std::move(cb));
  }
  void Close() override { c_->Close(); }
  ClientCounters counters() const override { return c_->counters(); }
  Status Grow(uint64_t size) override { return c_->Grow(size).status(); }

 private:
  std::unique_ptr<ReplicaClient> c_;
};

}  // namespace

std::unique_ptr<ReplicaChannel> ClientChannel(std::unique_ptr<ReplicaClient> client) {
  return std::make_unique<ClientChannelImpl>(std::move(client));
}

const char* MemberStateName(MemberState s) {
  switch (s) {
    case MemberState::kInSync:
      return "in-sync";
    case MemberState::kFailing:
      return "failing";
    case MemberState::kOut:
      return "out-of-sync";
  }
  return "?";
}

ClusterMembership::ClusterMembership(cluster::ClusterStore& store, std::string volume,
                                     std::string node, uint64_t epoch,
                                     std::chrono::milliseconds retry_for)
    : store_(store),
      volume_(std::move(volume)),
      node_(std::move(node)),
      epoch_(epoch),
      retry_for_(retry_for) {}

Status ClusterMembership::SetInSync(const std::vector<std::string>& in_sync) {
  const auto deadline = std::chrono::steady_clock::now() + retry_for_;
  auto pause = std::chrono::milliseconds(50);
  for (;;) {
    auto r = store_.SetInSync(volume_, node_, epoch_, in_sync);
    if (r.ok()) return Status::Ok();
    const int code = r.status().code();
    if ((code != EAGAIN && code != ETIMEDOUT) || std::chrono::steady_clock::now() >= deadline)
      return r.status();
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(1000));
  }
}

}  // namespace nbdcsi::replica
