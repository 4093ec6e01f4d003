#include "controller/replica_changes.h"

#include <algorithm>
#include <thread>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "common/grpc_status.h"
#include "common/node_id.h"
#include "common/tls.h"
#include "csi/ids.h"

namespace nbdcsi::controller {
namespace {

using Clock = std::chrono::steady_clock;

bool Contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::vector<std::string> Without(std::vector<std::string> v, const std::string& x) {
  std::erase(v, x);
  return v;
}

uint64_t Ms(Clock::duration d) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}

void Fill(const cluster::VolumeState& v, dpv1::ChangeReplicasProgress* p) {
  auto id = csi::FormatReplicatedVolumeId(v.name);
  p->set_volume_id(id.ok() ? *id : v.name);
  p->clear_replicas();
  for (const auto& n : v.replicas) p->add_replicas(n);
  p->clear_in_sync();
  for (const auto& n : v.in_sync) p->add_in_sync(n);
  p->set_target(v.target);
  p->set_epoch(v.epoch);
}

}  // namespace

StatusOr<cluster::VolumeState> ReplicaChanges::Check(const Request& r, std::string* name_out) {
  if (!store_)
    return Error(EINVAL, "replica changes need the cluster catalogue: nbd-csi-controller runs "
                         "without --cluster-etcd");
  std::string& name = *name_out;
  name = r.volume;
  if (csi::IsReplicatedVolumeId(name)) {
    auto n = csi::ParseReplicatedVolumeId(name);
    if (!n.ok()) return n.status();
    name = *n;
  }
  if (Status s = cluster::ValidateClusterVolumeName(name); !s.ok()) return s;
  if (r.add.empty() && r.remove.empty())
    return Error(EINVAL, "volume {}: name a node to add, to remove, or both (a move)", name);
  if (r.add == r.remove) return Error(EINVAL, "volume {}: add and remove name the same node", name);
  for (const auto* n : {&r.add, &r.remove})
    if (!n->empty())
      if (Status s = ValidateNodeId(*n); !s.ok()) return s;
  auto v = store_->GetVolume(name);
  if (!v.ok()) return v.status();
  if (!r.remove.empty() && !Contains(v->replicas, r.remove))
    return Error(ENOENT, "volume {}: node {} holds no replica of it (replicas: {})", name,
                 r.remove, fmt::join(v->replicas, ", "));
  if (!r.add.empty()) {
    if (Contains(v->replicas, r.add))
      return Error(EEXIST, "volume {}: node {} holds a replica of it already (replicas: {})",
                   name, r.add, fmt::join(v->replicas, ", "));
    if (!nodes_.Get(r.add))
      return Error(ENOENT, "volume {}: node {} is not registered with the controller", name,
                   r.add);
    auto live = store_->LiveNodes();
    if (!live.ok()) return live.status();
    if (!Contains(*live, r.add))
      return Error(EAGAIN, "volume {}: node {} is not alive in the cluster state", name, r.add);
  }
  const bool move = !r.add.empty() && !r.remove.empty();
  if (move && v->target.empty())
    return Error(EBUSY,
                 "volume {}: no node serves it, and a move copies through the volume's target: "
                 "open one (nbdctl target open {} on any node) and move again, or add the "
                 "replica alone (the next target copies it) and remove {} once it is in sync",
                 name, name, r.remove);
  return v;
}

namespace {

// The log line and the final report's message of a change that succeeded.
std::string DoneMessage(const ReplicaChanges::Request& r, const std::string& name,
                        const cluster::VolumeState& after, const std::string& copy_left) {
  const bool move = !r.add.empty() && !r.remove.empty();
  std::string what =
      move ? fmt::format("replica of {} moved from {} to {}", name, r.remove, r.add)
      : !r.add.empty()
          ? fmt::format("replica of {} added on {}{}", name, r.add,
                        Contains(after.in_sync, r.add)
                            ? " and in sync"
                            : after.target.empty()
                                  ? ", out of sync: no node serves the volume; the next target "
                                    "copies it"
                                  : ", out of sync: its copy runs in the background")
          : fmt::format("replica of {} on {} removed", name, r.remove);
  if (!copy_left.empty())
    what += fmt::format("; its copy stays in {}'s pool (that node did not answer): delete it "
                        "there (nbdctl volume delete {})",
                        copy_left, name);
  return what;
}

}  // namespace

Status ReplicaChanges::Change(const Request& r, const Report& report_in) {
  const auto began = Clock::now();
  auto report = [&](dpv1::ChangeReplicasProgress p) {
    p.set_took_ms(Ms(Clock::now() - began));
    report_in(p);
  };
  std::string name;
  auto v = Check(r, &name);
  if (!v.ok()) return v.status();
  const bool move = !r.add.empty() && !r.remove.empty();
  dpv1::ChangeReplicasProgress done;
  Clock::time_point added_at;
  if (!r.add.empty()) {
    added_at = Clock::now();
    if (Status s = Add(name, r, report); !s.ok()) return s;
    if (move || r.wait) {
      if (Status s = WaitInSync(name, r, report); !s.ok()) return s;
      done.set_copy_ms(Ms(Clock::now() - added_at));
    }
  }
  std::string copy_left;
  if (!r.remove.empty()) {
    dpv1::ChangeReplicasProgress p;
    p.set_phase("removing");
    p.set_message(fmt::format("removing the replica on {}", r.remove));
    if (auto now = store_->GetVolume(name); now.ok()) Fill(*now, &p);
    report(p);
    if (Status s = Remove(name, r, &copy_left); !s.ok()) return s;
  }
  auto after = store_->GetVolume(name);
  if (!after.ok()) return after.status();
  Fill(*after, &done);
  done.set_phase("done");
  done.set_copy_left(copy_left);
  const std::string what = DoneMessage(r, name, *after, copy_left);
  done.set_message(what);
  spdlog::info("cluster: {}; replicas [{}], in sync [{}]", what, fmt::join(after->replicas, ","),
               fmt::join(after->in_sync, ","));
  report(done);
  return Status::Ok();
}

Status ReplicaChanges::Add(const std::string& name, const Request& r, const Report& report) {
  auto v = store_->GetVolume(name);
  if (!v.ok()) return v.status();
  dpv1::ChangeReplicasProgress p;
  p.set_phase("adding");
  p.set_message(fmt::format("creating the copy of {} on {}", name, r.add));
  Fill(*v, &p);
  report(p);
  // The blank copy: the volume's size, with the QoS an existing copy has.
  dpv1::CreateVolumeRequest req;
  req.set_name(name);
  req.set_size_bytes(v->size_bytes);
  for (const auto& n : v->in_sync) {
    if (auto have = nodes_.GetVolume(n, name); have.ok()) {
      *req.mutable_qos() = have->qos();
      break;
    }
  }
  auto made = nodes_.On(r.add, [&](NodeDatapath& d) { return d.CreateVolume(req); });
  if (!made.ok())
    return Error(made.status().code(), "volume {}: the new copy on {}: {}", name, r.add,
                 made.status().message());
  auto undo = [&](Status why) {
    // Not in the catalogue: nothing refers to the copy.
    if (Status d = nodes_.On(r.add, [&](NodeDatapath& dp) { return dp.DeleteVolume(name); });
        !d.ok() && d.code() != ENOENT)
      spdlog::warn("cluster: volume {}: the copy made on {} stays there: {}", name, r.add,
                   d.message());
    return why;
  };
  // Recorded by the target when a node serves the volume (it must connect the new replica),
  // by the controller otherwise; the catalogue refuses the latter while a claim lives, so a
  // target that appears in between is asked on the next round.
  for (int round = 0; round < 5; ++round) {
    v = store_->GetVolume(name);
    if (!v.ok()) return undo(v.status());
    if (!v->target.empty()) {
      auto t = nodes_.On(v->target, [&](NodeDatapath& d) {
        return d.AddTargetReplica(name, r.add, r.rate);
      });
      if (t.ok()) return Status::Ok();
      if (t.status().code() != ENOENT || t.status().message().find("no target") ==
                                             std::string::npos)
        return undo(Error(t.status().code(), "volume {}: its target on {}: {}", name, v->target,
                          t.status().message()));
      continue;  // the target closed meanwhile
    }
    std::vector<std::string> replicas = v->replicas;
    replicas.push_back(r.add);
    auto set = store_->SetReplicas(name, replicas);
    if (set.ok()) return Status::Ok();
    if (set.status().code() != EBUSY) return undo(set.status());
  }
  return undo(Error(EAGAIN, "volume {}: its target kept changing; retry", name));
}

Status ReplicaChanges::WaitInSync(const std::string& name, const Request& r,
                                  const Report& report) {
  for (;;) {
    auto v = store_->GetVolume(name);
    if (!v.ok()) return v.status();
    if (Contains(v->in_sync, r.add)) return Status::Ok();
    const std::string keeps =
        r.remove.empty() ? "" : fmt::format("; {} is still a replica", r.remove);
    if (!Contains(v->replicas, r.add))
      return Error(EIO, "volume {}: node {} is no replica any more (removed meanwhile)", name,
                   r.add);
    if (v->target.empty())
      return Error(EAGAIN,
                   "volume {}: its target closed before the copy to {} ended: {} stays out of "
                   "sync (the next target copies it){}",
                   name, r.add, r.add, keeps);
    auto t = nodes_.On(v->target, [&](NodeDatapath& d) { return d.GetTarget(name); });
    dpv1::ChangeReplicasProgress p;
    p.set_phase("copying");
    Fill(*v, &p);
    if (t.ok()) {
      for (const auto& m : t->replicas()) {
        if (m.node() != r.add || m.resync_error().empty() || m.resync_pending()) continue;
        if (t->has_resync() && t->resync().node() == r.add) continue;
        return Error(EAGAIN,
                     "volume {}: the copy to {} failed: {}. {} stays out of sync and the volume "
                     "keeps serving from [{}]{}; the target's automatic resync retries once {} "
                     "answers",
                     name, r.add, m.resync_error(), r.add, fmt::join(v->in_sync, ", "), keeps,
                     r.add);
      }
      if (t->has_resync() && t->resync().node() == r.add) *p.mutable_resync() = t->resync();
      if (t->stopped())
        return Error(EIO, "volume {}: its target on {} stopped: {}{}", name, v->target,
                     t->stop_reason(), keeps);
    }
    p.set_message(fmt::format("copying {} to {}", name, r.add));
    report(p);
    std::this_thread::sleep_for(r.poll);
  }
}

Status ReplicaChanges::Remove(const std::string& name, const Request& r, std::string* copy_left) {
  for (int round = 0;; ++round) {
    auto v = store_->GetVolume(name);
    if (!v.ok()) return v.status();
    if (!Contains(v->replicas, r.remove)) break;  // gone already (a retry)
    if (!v->target.empty()) {
      auto t = nodes_.On(v->target, [&](NodeDatapath& d) {
        return d.RemoveTargetReplica(name, r.remove);
      });
      if (t.ok()) break;
      const bool closed = t.status().code() == ENOENT &&
                          t.status().message().find("no target") != std::string::npos;
      if (!closed || round >= 4)
        return Error(t.status().code(), "volume {}: its target on {}: {}", name, v->target,
                     t.status().message());
      continue;
    }
    if (Without(v->in_sync, r.remove).empty())
      return Error(EBUSY,
                   "volume {}: the replica on {} is the last one in sync; removing it would "
                   "lose the volume's data (add and copy another first)",
                   name, r.remove);
    auto set = store_->SetReplicas(name, Without(v->replicas, r.remove));
    if (set.ok()) break;
    if (set.status().code() != EBUSY || round >= 4) return set.status();
  }
  // Nothing refers to the copy any more (the target closed its connection, or none had one).
  Status d = nodes_.On(r.remove, [&](NodeDatapath& dp) { return dp.DeleteVolume(name); });
  if (!d.ok() && d.code() != ENOENT) {
    spdlog::warn("cluster: volume {}: the removed replica's copy on {} stays: {}", name, r.remove,
                 d.message());
    *copy_left = r.remove;
  }
  return Status::Ok();
}

namespace {

class Service final : public dpv1::ClusterReplicas::Service {
 public:
  Service(ReplicaChanges& changes, ReplicaChangesServiceOptions opts)
      : changes_(changes), opts_(opts) {}

  grpc::Status ChangeReplicas(grpc::ServerContext* ctx, const dpv1::ChangeReplicasRequest* req,
                              grpc::ServerWriter<dpv1::ChangeReplicasProgress>* w) override {
    if (opts_.refuse_node_certificates) {
      std::vector<std::string> ids = PeerNodeIds(*ctx->auth_context());
      if (!ids.empty())
        return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                            fmt::format("the client certificate is node {}'s: a datapath's "
                                        "certificate cannot change replicas",
                                        fmt::join(ids, ",")));
    }
    ReplicaChanges::Request r;
    r.volume = req->volume();
    r.add = req->add();
    r.remove = req->remove();
    r.rate = req->rate_bytes_per_second();
    r.wait = req->wait();
    spdlog::info("cluster: replica change of {}: add \"{}\", remove \"{}\"", r.volume, r.add,
                 r.remove);
    // A client that went away does not stop the change: it goes on to a consistent end.
    bool gone = false;
    Status s = changes_.Change(r, [&](const dpv1::ChangeReplicasProgress& p) {
      if (!gone && !w->Write(p)) gone = true;
    });
    if (!s.ok()) {
      spdlog::warn("cluster: replica change of {}: {}", r.volume, s.message());
      if (s.code() == EBUSY)
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, s.message());
      return ToGrpc(s);
    }
    return grpc::Status::OK;
  }

 private:
  ReplicaChanges& changes_;
  ReplicaChangesServiceOptions opts_;
};

}  // namespace

std::unique_ptr<dpv1::ClusterReplicas::Service> MakeReplicaChangesService(
    ReplicaChanges& changes, ReplicaChangesServiceOptions opts) {
  return std::make_unique<Service>(changes, opts);
}

}  // namespace nbdcsi::controller
