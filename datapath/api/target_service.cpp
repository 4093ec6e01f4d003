#include "datapath/api/target_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "common/grpc_status.h"
#include "common/node_id.h"
#include "common/volume_rules.h"
#include "datapath/api/target.grpc.pb.h"

namespace nbdcsi::datapath {
namespace {

namespace v1 = ::nbdcsi::datapath::v1;
using replica::ClusterAgent;
using replica::TargetInfo;

grpc::Status Fail(const char* rpc, const Status& s) {
  spdlog::warn("api {}: {} (errno {}: {})", rpc, s.message(), s.code(), std::strerror(s.code()));
  // Another node's live claim is a state the caller must change first, not a busy retry.
  if (s.code() == EBUSY) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, s.message());
  if (s.code() == EHOSTUNREACH || s.code() == ENOLINK)
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, s.message());
  return ToGrpc(s);
}

void Fill(const TargetInfo& t, const std::string& node, v1::Target* out) {
  out->set_volume(t.volume);
  out->set_export_name(t.export_name);
  out->set_epoch(t.epoch);
  out->set_size_bytes(t.size);
  for (const auto& m : t.health.members) {
    auto* r = out->add_replicas();
    r->set_node(m.node);
    r->set_state(replica::MemberStateName(m.state));
    r->set_why(m.why);
    r->set_requests(m.counters.requests);
    r->set_errors(m.counters.errors);
    r->set_bytes_written(m.counters.bytes_written);
    r->set_bytes_read(m.counters.bytes_read);
    r->set_healthy_connections(m.counters.connections_healthy);
    if (auto it = t.out_of_sync_bytes.find(m.node); it != t.out_of_sync_bytes.end())
      r->set_out_of_sync_bytes(it->second);
    r->set_resync_pending(t.resync_pending.count(m.node) > 0);
    if (auto it = t.resync_errors.find(m.node); it != t.resync_errors.end())
      r->set_resync_error(it->second);
  }
  for (const auto& n : t.health.in_sync) out->add_in_sync(n);
  out->set_degraded(t.health.degraded);
  out->set_stopped(t.health.stopped);
  out->set_stop_reason(t.health.stop_reason);
  out->set_acked_degraded(t.health.acked_degraded);
  for (const auto& u : t.unreachable) out->add_unreachable(u);
  out->set_node(node);
  if (t.health.reconciling) {
    auto* r = out->mutable_reconcile();
    r->set_source(t.health.reconcile_source);
    r->set_done_bytes(t.health.reconcile_done_bytes);
    r->set_total_bytes(t.size);
    r->set_percent(t.size ? 100.0 * static_cast<double>(t.health.reconcile_done_bytes) /
                                static_cast<double>(t.size)
                          : 100.0);
  }
  if (t.resync) {
    auto* r = out->mutable_resync();
    r->set_node(t.resync->node);
    r->set_full(t.resync->full);
    r->set_pass(static_cast<uint32_t>(t.resync->pass));
    r->set_pass_done_bytes(t.resync->pass_done_bytes);
    r->set_pass_total_bytes(t.resync->pass_total_bytes);
    r->set_percent(t.resync->percent);
    r->set_eta_seconds(t.resync->eta ? t.resync->eta->count() : -1);
    r->set_copied_bytes(t.resync->copied_bytes);
  }
}

grpc::Status NoCluster() {
  return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                      "this nbd-datapathd runs without a cluster (--cluster-etcd): it serves no "
                      "replicated volumes");
}

grpc::Status Check(const char* rpc, ClusterAgent* agent, const std::string& volume) {
  if (!agent) return NoCluster();
  if (Status s = ValidateObjectName("volume", volume); !s.ok()) return Fail(rpc, s);
  return grpc::Status::OK;
}

// The target as the agent answers `get()`, after the volume's check.
template <typename Get>
grpc::Status AnswerTargetCall(const char* rpc, ClusterAgent* agent, const std::string& volume,
                              v1::TargetResponse* resp, Get get) {
  if (auto s = Check(rpc, agent, volume); !s.ok()) return s;
  auto t = get();
  if (!t.ok()) return Fail(rpc, t.status());
  Fill(*t, agent->node_id(), resp->mutable_target());
  return grpc::Status::OK;
}

grpc::Status AddReplicaCall(ClusterAgent* agent, const v1::AddReplicaRequest& req,
                            v1::TargetResponse* resp) {
  if (Status s = ValidateNodeId(req.node()); agent && !s.ok()) return Fail("AddReplica", s);
  return AnswerTargetCall("AddReplica", agent, req.volume(), resp, [&] {
    return agent->AddReplica(req.volume(), req.node(), req.rate_bytes_per_second());
  });
}

grpc::Status RemoveReplicaCall(ClusterAgent* agent, const v1::RemoveReplicaRequest& req,
                               v1::TargetResponse* resp) {
  if (Status s = ValidateNodeId(req.node()); agent && !s.ok()) return Fail("RemoveReplica", s);
  return AnswerTargetCall("RemoveReplica", agent, req.volume(), resp,
                          [&] { return agent->RemoveReplica(req.volume(), req.node()); });
}

class TargetReplicasService final : public v1::TargetReplicas::Service {
 public:
  explicit TargetReplicasService(ClusterAgent* agent) : agent_(agent) {}
  grpc::Status GetTarget(grpc::ServerContext*, const v1::GetTargetRequest* req,
                         v1::TargetResponse* resp) override {
    return AnswerTargetCall("GetTarget", agent_, req->volume(), resp,
                            [&] { return agent_->GetTarget(req->volume()); });
  }
  grpc::Status AddReplica(grpc::ServerContext*, const v1::AddReplicaRequest* req,
                          v1::TargetResponse* resp) override {
    return AddReplicaCall(agent_, *req, resp);
  }
  grpc::Status RemoveReplica(grpc::ServerContext*, const v1::RemoveReplicaRequest* req,
                             v1::TargetResponse* resp) override {
    return RemoveReplicaCall(agent_, *req, resp);
  }

 private:
  ClusterAgent* agent_;
};

class TargetService final : public v1::Targets::Service {
 public:
  TargetService(ClusterAgent* agent, AttachmentManager* attachments)
      : agent_(agent), attachments_(attachments) {}

  grpc::Status OpenTarget(grpc::ServerContext*, const v1::OpenTargetRequest* req,
                          v1::TargetResponse* resp) override {
    return AnswerTarget("OpenTarget", req->volume(), resp,
                        [&] { return agent_->OpenTarget(req->volume()); });
  }
  grpc::Status CloseTarget(grpc::ServerContext*, const v1::CloseTargetRequest* req,
                           v1::CloseTargetResponse*) override {
    if (auto s = Check("CloseTarget", req->volume()); !s.ok()) return s;
    auto close = [&]() { return agent_->CloseTarget(req->volume()); };
    Status s = attachments_ ? attachments_->CloseTargetUnlessAttached(req->volume(), close)
                            : close();
    if (!s.ok()) return Fail("CloseTarget", s);
    return grpc::Status::OK;
  }
  grpc::Status GetTarget(grpc::ServerContext*, const v1::GetTargetRequest* req,
                         v1::TargetResponse* resp) override {
    return AnswerTarget("GetTarget", req->volume(), resp,
                        [&] { return agent_->GetTarget(req->volume()); });
  }
  grpc::Status ResyncReplica(grpc::ServerContext*, const v1::ResyncReplicaRequest* req,
                             v1::ResyncReplicaResponse* resp) override {
    if (auto s = Check("ResyncReplica", req->volume()); !s.ok()) return s;
    if (Status s = ValidateNodeId(req->node()); !s.ok()) return Fail("ResyncReplica", s);
    if (req->background()) {
      Status s = agent_->StartResync(req->volume(), req->node(), req->rate_bytes_per_second());
      if (!s.ok()) return Fail("ResyncReplica", s);
      resp->set_node(req->node());
      resp->set_started(true);
      if (auto t = agent_->GetTarget(req->volume()); t.ok())
        Fill(*t, agent_->node_id(), resp->mutable_target());
      return grpc::Status::OK;
    }
    auto r = agent_->ResyncReplica(req->volume(), req->node(), req->rate_bytes_per_second());
    if (!r.ok()) return Fail("ResyncReplica", r.status());
    resp->set_node(r->node);
    resp->set_full(r->full);
    resp->set_passes(static_cast<uint32_t>(r->passes));
    resp->set_copied_bytes(r->copied_bytes);
    resp->set_skipped_bytes(r->skipped_bytes);
    resp->set_zeroed_bytes(r->zeroed_bytes);
    resp->set_dirty_bytes_at_start(r->dirty_bytes_at_start);
    resp->set_frozen_ms(static_cast<uint64_t>(r->frozen.count()));
    resp->set_took_ms(static_cast<uint64_t>(r->took.count()));
    if (auto t = agent_->GetTarget(req->volume()); t.ok())
      Fill(*t, agent_->node_id(), resp->mutable_target());
    return grpc::Status::OK;
  }
  grpc::Status GrowTarget(grpc::ServerContext*, const v1::GrowTargetRequest* req,
                          v1::TargetResponse* resp) override {
    if (auto s = Check("GrowTarget", req->volume()); !s.ok()) return s;
    auto g = agent_->GrowTarget(req->volume());
    if (!g.ok()) return Fail("GrowTarget", g.status());
    auto t = agent_->GetTarget(req->volume());
    if (!t.ok()) return Fail("GrowTarget", t.status());
    Fill(*t, agent_->node_id(), resp->mutable_target());
    return grpc::Status::OK;
  }
  grpc::Status AddReplica(grpc::ServerContext*, const v1::AddReplicaRequest* req,
                          v1::TargetResponse* resp) override {
    return AddReplicaCall(agent_, *req, resp);
  }
  grpc::Status RemoveReplica(grpc::ServerContext*, const v1::RemoveReplicaRequest* req,
                             v1::TargetResponse* resp) override {
    return RemoveReplicaCall(agent_, *req, resp);
  }
  grpc::Status ListTargets(grpc::ServerContext*, const v1::ListTargetsRequest*,
                           v1::ListTargetsResponse* resp) override {
    if (!agent_) return NoCluster();
    for (const auto& t : agent_->ListTargets()) Fill(t, agent_->node_id(), resp->add_targets());
    return grpc::Status::OK;
  }

 private:
  grpc::Status Check(const char* rpc, const std::string& volume) {
    return nbdcsi::datapath::Check(rpc, agent_, volume);
  }  // OpenTarget and GetTarget: the volume checked, then the agent's answer `get()` as the Target.
  template <typename Get>
  grpc::Status AnswerTarget(const char* rpc, const std::string& volume, v1::TargetResponse* resp,
                            Get get) {
    if (auto s = Check(rpc, volume); !s.ok()) return s;
    auto t = get();
    if (!t.ok()) return Fail(rpc, t.status());
    Fill(*t, agent_->node_id(), resp->mutable_target());
    return grpc::Status::OK;
  }


  ClusterAgent* agent_;
  AttachmentManager* attachments_;
};

class TargetFreezeService final : public v1::TargetFreeze::Service {
 public:
  explicit TargetFreezeService(ClusterAgent* agent) : agent_(agent) {}

  grpc::Status FreezeTarget(grpc::ServerContext*, const v1::FreezeTargetRequest* req,
                            v1::FreezeTargetResponse* resp) override {
    if (auto s = Check("FreezeTarget", agent_, req->volume()); !s.ok()) return s;
    auto f = agent_->FreezeTarget(req->volume(), std::chrono::milliseconds(req->lift_after_ms()));
    if (!f.ok()) return Fail("FreezeTarget", f.status());
    resp->set_freeze_id(f->id);
    resp->set_epoch(f->epoch);
    std::vector<std::string> in_sync = f->in_sync;
    std::sort(in_sync.begin(), in_sync.end());
    for (const auto& n : in_sync) resp->add_in_sync(n);
    resp->set_drained_ms(static_cast<uint64_t>(f->drained.count()));
    resp->set_lifts_in_ms(static_cast<uint64_t>(std::max<int64_t>(f->lifts_in.count(), 0)));
    resp->set_node(agent_->node_id());
    return grpc::Status::OK;
  }
  grpc::Status ThawTarget(grpc::ServerContext*, const v1::ThawTargetRequest* req,
                          v1::ThawTargetResponse* resp) override {
    if (auto s = Check("ThawTarget", agent_, req->volume()); !s.ok()) return s;
    resp->set_thawed(agent_->ThawTarget(req->volume(), req->freeze_id()));
    return grpc::Status::OK;
  }

 private:
  ClusterAgent* agent_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeTargetReplicasService(replica::ClusterAgent* agent) {
  return std::make_unique<TargetReplicasService>(agent);
}

std::unique_ptr<grpc::Service> MakeTargetFreezeService(replica::ClusterAgent* agent) {
  return std::make_unique<TargetFreezeService>(agent);
}

std::unique_ptr<grpc::Service> MakeTargetService(replica::ClusterAgent* agent,
                                                 AttachmentManager* attachments) {
  return std::make_unique<TargetService>(agent, attachments);
}

}  // namespace nbdcsi::datapath
