#include "controller/controller_service.h"

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/client_context.h>
#include <spdlog/spdlog.h>

#include "common/grpc_status.h"
#include "common/name_locks.h"
#include "csi/driver.h"
#include "csi/ids.h"
#include "csi/logging.h"
#include "csi/params.h"

namespace nbdcsi::controller {
namespace {

namespace v1 = ::csi::v1;
namespace dp = ::nbdcsi::datapath::v1;
using grpc::Status;
using grpc::StatusCode;
using Stub = dp::Datapath::Stub;

constexpr char kCsiParamPrefix[] = "csi.storage.k8s.io/";

Status Err(StatusCode code, std::string msg) {
  // The interceptor logs the code and message of every failed call; this line adds nothing the
  // caller does not see, so it is debug only.
  spdlog::debug("[{}] {}", csi::CurrentRequestId(), msg);
  return Status(code, std::move(msg));
}

template <typename... Args>
Status Err(StatusCode code, fmt::format_string<Args...> f, Args&&... args) {
  return Err(code, fmt::format(f, std::forward<Args>(args)...));
}

// ---- ids (csi/ids.h) ----

struct Ref {
  std::string node;
  std::string name;  // pool volume or snapshot name
};

std::optional<Ref> ParseVolume(const std::string& id, std::string* why) {
  auto r = csi::ParseVolumeId(id);
  if (!r.ok()) {
    *why = r.status().message();
    return std::nullopt;
  }
  return Ref{r->node_id, r->pool_name};
}

std::optional<Ref> ParseSnapshot(const std::string& id, std::string* why) {
  auto r = csi::ParseSnapshotId(id);
  if (!r.ok()) {
    *why = r.status().message();
    return std::nullopt;
  }
  return Ref{r->node_id, r->pool_name};
}

// Parts come from the registry (node ids it validated) and from pools (names they validated),
// so formatting cannot fail short of a bug; an empty id then shows up rather than a crash.
std::string VolumeIdOf(const std::string& node, const std::string& name) {
  auto id = csi::FormatVolumeId(node, name);
  if (!id.ok()) {
    spdlog::error("volume id for node {} volume {}: {}", node, name, id.status().message());
    return "";
  }
  return *id;
}
std::string SnapshotIdOf(const std::string& node, const std::string& name) {
  auto id = csi::FormatSnapshotId(node, name);
  if (!id.ok()) {
    spdlog::error("snapshot id for node {} snapshot {}: {}", node, name, id.status().message());
    return "";
  }
  return *id;
}

// ---- capabilities ----

// Why `cap` cannot be served, or "" when it can. Volumes live on one node's pool and are
// attached on that node only, so every MULTI_NODE mode is refused.
std::string UnsupportedCapability(const v1::VolumeCapability& cap) {
  if (cap.access_type_case() == v1::VolumeCapability::ACCESS_TYPE_NOT_SET) {
    return "volume capability has neither block nor mount access type";
  }
  if (cap.has_mount()) {
    const std::string& fs = cap.mount().fs_type();
    static const std::set<std::string> kFs = {"", "ext4", "ext3", "xfs"};
    if (!kFs.count(fs)) return fmt::format("fs_type \"{}\" is not supported (ext4, ext3, xfs)", fs);
  }
  if (!cap.has_access_mode()) return "volume capability has no access mode";
  using M = v1::VolumeCapability::AccessMode;
  switch (cap.access_mode().mode()) {
    case M::SINGLE_NODE_WRITER:
    case M::SINGLE_NODE_READER_ONLY:
    case M::SINGLE_NODE_SINGLE_WRITER:
    case M::SINGLE_NODE_MULTI_WRITER:
      return "";
    case M::MULTI_NODE_READER_ONLY:
    case M::MULTI_NODE_SINGLE_WRITER:
    case M::MULTI_NODE_MULTI_WRITER:
      return fmt::format("access mode {} is not supported: a volume lives on one node's disk and "
                         "is attached on that node only",
                         M::Mode_Name(cap.access_mode().mode()));
    default:
      return fmt::format("access mode {} is not supported",
                         M::Mode_Name(cap.access_mode().mode()));
  }
}

Status CheckCapabilities(const google::protobuf::RepeatedPtrField<v1::VolumeCapability>& caps) {
  if (caps.empty()) return Err(StatusCode::INVALID_ARGUMENT, "volume_capabilities is required");
  for (const auto& cap : caps) {
    std::string why = UnsupportedCapability(cap);
    if (!why.empty()) return Err(StatusCode::INVALID_ARGUMENT, why);
  }
  return Status::OK;
}

// ---- parameters ----

Status ParseQos(const google::protobuf::Map<std::string, std::string>& params, const char* field,
                csi::QosParameters* out) {
  std::map<std::string, std::string> m(params.begin(), params.end());
  auto q = csi::ParseQosParameters(m);
  if (!q.ok()) return Err(StatusCode::INVALID_ARGUMENT, "{}: {}", field, q.status().message());
  *out = *q;
  return Status::OK;
}

// StorageClass parameters, then the VolumeAttributesClass's on top (they are the newer word).
void ApplyQos(const csi::QosParameters& q, dp::QosLimits* l) {
  if (q.max_iops) l->set_max_iops(*q.max_iops);
  if (q.max_read_iops) l->set_max_read_iops(*q.max_read_iops);
  if (q.max_write_iops) l->set_max_write_iops(*q.max_write_iops);
  if (q.max_bps) l->set_max_bps(*q.max_bps);
  if (q.max_read_bps) l->set_max_read_bps(*q.max_read_bps);
  if (q.max_write_bps) l->set_max_write_bps(*q.max_write_bps);
  if (q.iops_per_gib) l->set_iops_per_gib(*q.iops_per_gib);
  if (q.bps_per_gib) l->set_bps_per_gib(*q.bps_per_gib);
  if (q.burst_ms) l->set_burst_ms(*q.burst_ms);
}

dp::QosPatch ToPatch(const csi::QosParameters& q) {
  dp::QosPatch p;
  if (q.max_iops) p.set_max_iops(*q.max_iops);
  if (q.max_read_iops) p.set_max_read_iops(*q.max_read_iops);
  if (q.max_write_iops) p.set_max_write_iops(*q.max_write_iops);
  if (q.max_bps) p.set_max_bps(*q.max_bps);
  if (q.max_read_bps) p.set_max_read_bps(*q.max_read_bps);
  if (q.max_write_bps) p.set_max_write_bps(*q.max_write_bps);
  if (q.iops_per_gib) p.set_iops_per_gib(*q.iops_per_gib);
  if (q.bps_per_gib) p.set_bps_per_gib(*q.bps_per_gib);
  if (q.burst_ms) p.set_burst_ms(*q.burst_ms);
  return p;
}

// ---- sizes ----

uint64_t RoundUp(uint64_t v) {
  return (v + kVolumeSizeAlignment - 1) / kVolumeSizeAlignment * kVolumeSizeAlignment;
}
uint64_t RoundDown(uint64_t v) { return v / kVolumeSizeAlignment * kVolumeSizeAlignment; }

// The size to provision for `range`: required_bytes rounded up to 4 KiB, or `dflt` when nothing
// is required, never less than `min_size` (a content source's size); within limit_bytes, rounding
// down to it when only the default overshoots. OUT_OF_RANGE when no 4 KiB multiple fits.
StatusOr<uint64_t> SizeFor(const v1::CapacityRange* range, uint64_t dflt, uint64_t min_size) {
  int64_t req = range ? range->required_bytes() : 0;
  int64_t lim = range ? range->limit_bytes() : 0;
  if (req < 0 || lim < 0) {
    return Error(EINVAL, "capacity_range: negative bytes (required {}, limit {})", req, lim);
  }
  if (lim > 0 && lim < req) {
    return Error(EINVAL, "capacity_range: limit_bytes {} is below required_bytes {}", lim, req);
  }
  uint64_t floor = std::max<uint64_t>(static_cast<uint64_t>(req), RoundUp(min_size));
  uint64_t want = req > 0 ? RoundUp(static_cast<uint64_t>(req)) : RoundUp(dflt);
  want = std::max(want, RoundUp(min_size));
  if (lim > 0 && want > static_cast<uint64_t>(lim)) {
    uint64_t down = RoundDown(static_cast<uint64_t>(lim));
    if (down == 0 || down < floor) {
      return Error(ERANGE,
                   "capacity_range [{}, {}] (source size {}) holds no multiple of {} bytes", req,
                   lim, min_size, kVolumeSizeAlignment);
    }
    want = down;
  }
  return want;
}

// ---- topology ----

// The node named by a Topology, or "" with *st set when the segments are not ours.
std::string NodeOfTopology(const v1::Topology& t, Status* st) {
  std::string node;
  for (const auto& [k, v] : t.segments()) {
    if (k != csi::kTopologyKey) {
      *st = Err(StatusCode::INVALID_ARGUMENT, "topology key \"{}\" is not known (only {})", k,
                csi::kTopologyKey);
      return "";
    }
    node = v;
  }
  if (node.empty()) {
    *st = Err(StatusCode::INVALID_ARGUMENT, "topology segment without {}", csi::kTopologyKey);
  }
  return node;
}

void SetTopology(const std::string& node, v1::Volume* vol) {
  (*vol->add_accessible_topology()->mutable_segments())[csi::kTopologyKey] = node;
}

// ---- pagination ----

constexpr char kTokenPrefix[] = "p1.";

template <typename Entry>
Status Paginate(std::vector<std::pair<std::string, Entry>> all, int32_t max_entries,
                const std::string& starting_token,
                google::protobuf::RepeatedPtrField<Entry>* out, std::string* next_token) {
  if (max_entries < 0) {
    return Err(StatusCode::INVALID_ARGUMENT, "max_entries {} is negative", max_entries);
  }
  std::sort(all.begin(), all.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  auto it = all.begin();
  if (!starting_token.empty()) {
    auto last = DecodePageToken(starting_token);
    if (!last) return Err(StatusCode::ABORTED, "starting_token \"{}\" is not valid", starting_token);
    // Ids after the last one returned: a page boundary survives that volume's deletion and
    // volumes created meanwhile show up on a later page when they sort after it.
    it = std::upper_bound(all.begin(), all.end(), *last,
                          [](const std::string& v, const auto& e) { return v < e.first; });
  }
  size_t n = 0;
  for (; it != all.end(); ++it) {
    if (max_entries > 0 && n == static_cast<size_t>(max_entries)) {
      *next_token = EncodePageToken(std::prev(it)->first);
      break;
    }
    *out->Add() = std::move(it->second);
    ++n;
  }
  return Status::OK;
}

// ---- calls to the datapaths ----

class Nodes {
 public:
  Nodes(NodeRegistry& reg, const ControllerOptions& opts) : reg_(reg), opts_(opts) {}

  // UNAVAILABLE when `node` has not registered (or its heartbeats stopped): the sidecar retries,
  // and the node may come (back) within a heartbeat.
  Status Stub(const std::string& node, std::shared_ptr<dp::Datapath::Stub>* out) {
    auto s = reg_.Datapath(node);
    if (!s.ok()) {
      return Err(StatusCode::UNAVAILABLE, "node \"{}\" is not registered with the controller: {}",
                 node, s.status().message());
    }
    *out = *s;
    return Status::OK;
  }

  // One unary call to `node` with the datapath deadline; the message names the node and step.
  template <typename F>
  Status Call(const std::string& node, const char* what, F&& f) {
    std::shared_ptr<dp::Datapath::Stub> stub;
    if (Status s = Stub(node, &stub); !s.ok()) return s;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + opts_.datapath_timeout);
    Status s = f(*stub, &ctx);
    if (s.ok()) return s;
    return Err(s.error_code(), "node {}: {}: {}", node, what, s.error_message());
  }

  std::vector<NodeInfo> List() { return reg_.List(); }
  std::optional<NodeInfo> Get(const std::string& node) { return reg_.Get(node); }

 private:
  NodeRegistry& reg_;
  const ControllerOptions& opts_;
};

// Runs fn(node) for every node at once and returns the results in the nodes' order: lookups
// that must ask every node (idempotency by name) cost one round trip, not one per node. The
// first node is asked on the calling thread.
template <typename T, typename F>
std::vector<T> FanOut(const std::vector<NodeInfo>& live, F fn) {
  std::vector<T> out(live.size());
  std::vector<std::thread> threads;
  for (size_t i = 1; i < live.size(); ++i) {
    threads.emplace_back([&out, &live, &fn, i] { out[i] = fn(live[i]); });
  }
  if (!live.empty()) out[0] = fn(live[0]);
  for (auto& t : threads) t.join();
  return out;
}

Status GetDpVolume(Nodes& nodes, const Ref& ref, dp::Volume* out) {
  dp::GetVolumeRequest req;
  req.set_name(ref.name);
  dp::GetVolumeResponse resp;
  Status s = nodes.Call(ref.node, "GetVolume", [&](dp::Datapath::Stub& st, grpc::ClientContext* c) {
    return st.GetVolume(c, req, &resp);
  });
  if (s.ok()) *out = resp.volume();
  return s;
}

Status GetDpSnapshot(Nodes& nodes, const Ref& ref, dp::Snapshot* out) {
  dp::GetSnapshotRequest req;
  req.set_name(ref.name);
  dp::GetSnapshotResponse resp;
  Status s = nodes.Call(ref.node, "GetSnapshot", [&](dp::Datapath::Stub& st, grpc::ClientContext* c) {
    return st.GetSnapshot(c, req, &resp);
  });
  if (s.ok()) *out = resp.snapshot();
  return s;
}

void FillVolume(const std::string& node, const dp::Volume& dv, v1::Volume* out) {
  out->set_volume_id(VolumeIdOf(node, dv.name()));
  out->set_capacity_bytes(static_cast<int64_t>(dv.size_bytes()));
  SetTopology(node, out);
  const std::string& src = dv.source();
  if (src.rfind("snapshot/", 0) == 0) {
    out->mutable_content_source()->mutable_snapshot()->set_snapshot_id(
        SnapshotIdOf(node, src.substr(9)));
  } else if (src.rfind("volume/", 0) == 0) {
    out->mutable_content_source()->mutable_volume()->set_volume_id(VolumeIdOf(node, src.substr(7)));
  }
}

void FillSnapshot(const std::string& node, const dp::Snapshot& ds, v1::Snapshot* out) {
  out->set_snapshot_id(SnapshotIdOf(node, ds.name()));
  out->set_source_volume_id(VolumeIdOf(node, ds.source_volume()));
  out->set_size_bytes(static_cast<int64_t>(ds.size_bytes()));
  out->mutable_creation_time()->set_seconds(ds.created_unix_ns() / 1000000000);
  out->mutable_creation_time()->set_nanos(static_cast<int32_t>(ds.created_unix_ns() % 1000000000));
  out->set_ready_to_use(ds.ready());
}

// An abnormal condition for a volume the datapath reported, or none.
void FillCondition(const dp::Volume& dv, v1::VolumeCondition* c) {
  if (!dv.ready()) {
    c->set_abnormal(true);
    c->set_message(fmt::format("content is still being copied from {} ({} of {} bytes)",
                               dv.source(), dv.copy_done_bytes(), dv.copy_total_bytes()));
  } else {
    c->set_abnormal(false);
    c->set_message("volume is healthy");
  }
}

std::string DpSourceOf(const dp::VolumeContentSource& s) {
  if (s.has_snapshot()) return "snapshot/" + s.snapshot();
  if (s.has_volume()) return "volume/" + s.volume();
  return "";
}

}  // namespace

StatusOr<uint64_t> VolumeSizeFor(const v1::CapacityRange* range, uint64_t dflt,
                                 uint64_t min_size) {
  return SizeFor(range, dflt, min_size);
}

// ---- tokens ----

std::string EncodePageToken(const std::string& last_id) {
  static const char kHex[] = "0123456789abcdef";
  std::string t = kTokenPrefix;
  for (unsigned char c : last_id) {
    t += kHex[c >> 4];
    t += kHex[c & 15];
  }
  return t;
}

std::optional<std::string> DecodePageToken(const std::string& token) {
  const size_t p = sizeof(kTokenPrefix) - 1;
  if (token.size() <= p || token.compare(0, p, kTokenPrefix) != 0 || (token.size() - p) % 2) {
    return std::nullopt;
  }
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  std::string out;
  for (size_t i = p; i < token.size(); i += 2) {
    int hi = nib(token[i]), lo = nib(token[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi << 4 | lo);
  }
  return out;
}

// ---- ControllerImpl ----

class ControllerImpl::PlacementLedger {
 public:
  // What `n` has taken since the heartbeat that `n` carries (a newer heartbeat resets it).
  uint64_t Pending(const NodeInfo& n) {
    std::lock_guard lock(mu_);
    auto it = placed_.find(n.node_id);
    if (it == placed_.end() || it->second.first != n.last_seen) return 0;
    return it->second.second;
  }
  void Add(const NodeInfo& n, uint64_t bytes) {
    std::lock_guard lock(mu_);
    auto& e = placed_[n.node_id];
    if (e.first != n.last_seen) e = {n.last_seen, 0};
    e.second += bytes;
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::pair<std::chrono::steady_clock::time_point, uint64_t>> placed_;
};

ControllerImpl::ControllerImpl(NodeRegistry& registry, ControllerOptions opts)
    : registry_(registry), opts_(opts), ledger_(std::make_unique<PlacementLedger>()) {}

ControllerImpl::~ControllerImpl() = default;

Status ControllerImpl::CreateVolume(const v1::CreateVolumeRequest& req,
                                    v1::CreateVolumeResponse* resp) {
  if (req.name().empty()) return Err(StatusCode::INVALID_ARGUMENT, "name is required");
  if (Status s = CheckCapabilities(req.volume_capabilities()); !s.ok()) return s;
  csi::QosParameters sc_qos, vac_qos;
  if (Status s = ParseQos(req.parameters(), "parameters", &sc_qos); !s.ok()) return s;
  if (Status s = ParseQos(req.mutable_parameters(), "mutable_parameters", &vac_qos); !s.ok()) {
    return s;
  }
  dp::QosLimits qos;
  ApplyQos(sc_qos, &qos);
  ApplyQos(vac_qos, &qos);
  Nodes nodes(registry_, opts_);
  auto pool_name_or = csi::PoolNameForCsiName(req.name());
  if (!pool_name_or.ok()) {
    return Err(StatusCode::INVALID_ARGUMENT, "name: {}", pool_name_or.status().message());
  }
  const std::string pool_name = *pool_name_or;

  // Where the volume may live. Requisite (when given) bounds it; preferred comes first in its
  // order, then requisite in its order; with no requirement at all, any node, roomiest first.
  Status st;
  std::vector<std::string> order;
  std::set<std::string> allowed;  // empty with any_node
  bool any_node = true;
  if (req.has_accessibility_requirements()) {
    const auto& ar = req.accessibility_requirements();
    for (const auto& t : ar.requisite()) {
      std::string n = NodeOfTopology(t, &st);
      if (!st.ok()) return st;
      allowed.insert(n);
      any_node = false;
    }
    for (const auto& t : ar.preferred()) {
      std::string n = NodeOfTopology(t, &st);
      if (!st.ok()) return st;
      if (any_node || allowed.count(n)) order.push_back(n);
    }
    for (const auto& t : ar.requisite()) order.push_back(NodeOfTopology(t, &st));
  }
  auto is_allowed = [&](const std::string& n) { return any_node || allowed.count(n) > 0; };
  std::vector<NodeInfo> live = nodes.List();
  if (any_node) {
    std::vector<std::pair<uint64_t, std::string>> by_room;
    for (const auto& n : live) {
      uint64_t pending = ledger_->Pending(n);
      by_room.emplace_back(n.provisionable_bytes > pending ? n.provisionable_bytes - pending : 0,
                           n.node_id);
    }
    std::stable_sort(by_room.begin(), by_room.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    for (const auto& n : by_room) order.push_back(n.second);
  }
  {
    std::set<std::string> seen;
    std::vector<std::string> uniq;
    for (auto& n : order) {
      if (seen.insert(n).second) uniq.push_back(n);
    }
    order.swap(uniq);
  }

  // The content source pins the node: restores and clones are local (reflink or local copy).
  // Parsed here; its size is asked for after the idempotency check, so a retry still finds a
  // restored volume whose snapshot was deleted meanwhile.
  dp::VolumeContentSource dsrc;
  std::optional<Ref> src_ref;
  if (req.has_volume_content_source()) {
    const auto& cs = req.volume_content_source();
    std::string why;
    if (cs.has_snapshot()) {
      src_ref = ParseSnapshot(cs.snapshot().snapshot_id(), &why);
      if (!src_ref) {
        return Err(StatusCode::NOT_FOUND, "source snapshot \"{}\" does not exist: {}",
                   cs.snapshot().snapshot_id(), why);
      }
      dsrc.set_snapshot(src_ref->name);
    } else if (cs.has_volume()) {
      src_ref = ParseVolume(cs.volume().volume_id(), &why);
      if (!src_ref) {
        return Err(StatusCode::NOT_FOUND, "source volume \"{}\" does not exist: {}",
                   cs.volume().volume_id(), why);
      }
      dsrc.set_volume(src_ref->name);
    } else {
      return Err(StatusCode::INVALID_ARGUMENT, "volume_content_source names neither a snapshot "
                                               "nor a volume");
    }
    if (!is_allowed(src_ref->node)) {
      return Err(StatusCode::INVALID_ARGUMENT,
                 "the content source lives on node {}, which accessibility_requirements exclude; "
                 "restoring or cloning to another node is not supported",
                 src_ref->node);
    }
    order = {src_ref->node};
  }
  const v1::CapacityRange* range = req.has_capacity_range() ? &req.capacity_range() : nullptr;
  if (range && (range->required_bytes() < 0 || range->limit_bytes() < 0 ||
                (range->limit_bytes() > 0 && range->limit_bytes() < range->required_bytes()))) {
    auto bad = SizeFor(range, opts_.default_volume_bytes, 0);  // for its message
    return Err(StatusCode::INVALID_ARGUMENT, bad.status().message());
  }

  // Idempotency by name: the pool name is a pure function of the CSI name, so asking every live
  // node finds an earlier attempt wherever it landed. A node that cannot answer could hold it:
  // fail (retryable) rather than risk a second copy elsewhere.
  struct Lookup {
    Status st;
    dp::Volume vol;
  };
  auto lookups = FanOut<Lookup>(live, [&](const NodeInfo& n) {
    Lookup l;
    l.st = GetDpVolume(nodes, Ref{n.node_id, pool_name}, &l.vol);
    return l;
  });
  for (size_t i = 0; i < live.size(); ++i) {
    const NodeInfo& n = live[i];
    const Status& s = lookups[i].st;
    const dp::Volume& existing = lookups[i].vol;
    if (s.error_code() == StatusCode::NOT_FOUND) continue;
    if (!s.ok()) return s;
    uint64_t have = existing.size_bytes();
    bool size_ok = (!range || have >= static_cast<uint64_t>(range->required_bytes())) &&
                   (!range || range->limit_bytes() == 0 ||
                    have <= static_cast<uint64_t>(range->limit_bytes()));
    if (!size_ok) {
      return Err(StatusCode::ALREADY_EXISTS,
                 "volume \"{}\" exists on node {} with {} bytes, outside the requested range",
                 req.name(), n.node_id, have);
    }
    if (existing.source() != DpSourceOf(dsrc) || (src_ref && src_ref->node != n.node_id)) {
      return Err(StatusCode::ALREADY_EXISTS,
                 "volume \"{}\" exists on node {} with content source \"{}\", not \"{}\"",
                 req.name(), n.node_id, existing.source(), DpSourceOf(dsrc));
    }
    if (!google::protobuf::util::MessageDifferencer::Equals(existing.qos(), qos)) {
      return Err(StatusCode::ALREADY_EXISTS,
                 "volume \"{}\" exists on node {} with other QoS parameters ({})", req.name(),
                 n.node_id, existing.qos().ShortDebugString());
    }
    if (!is_allowed(n.node_id)) {
      return Err(StatusCode::ALREADY_EXISTS,
                 "volume \"{}\" exists on node {}, which accessibility_requirements exclude",
                 req.name(), n.node_id);
    }
    FillVolume(n.node_id, existing, resp->mutable_volume());
    return Status::OK;
  }

  uint64_t source_size = 0;
  if (src_ref && dsrc.has_snapshot()) {
    dp::Snapshot snap;
    if (Status s = GetDpSnapshot(nodes, *src_ref, &snap); !s.ok()) return s;
    source_size = snap.size_bytes();
  } else if (src_ref) {
    dp::Volume vol;
    if (Status s = GetDpVolume(nodes, *src_ref, &vol); !s.ok()) return s;
    source_size = vol.size_bytes();
  }
  // A restore or clone without a size gets its source's size, not the blank default.
  auto size = SizeFor(range, source_size ? source_size : opts_.default_volume_bytes, source_size);
  if (!size.ok()) return Err(ToGrpc(size.status()).error_code(), size.status().message());

  // Placement: the first candidate that is registered and has room. The datapath checks again
  // (the heartbeat's figure may be a few seconds old): ENOSPC there moves on to the next one.
  bool missing = false;
  std::vector<std::string> why_not;  // per node, for the error an operator reads
  for (const auto& node : order) {
    auto info = nodes.Get(node);
    if (!info) {
      missing = true;
      why_not.push_back(node + ": not registered");
      continue;
    }
    if (info->provisionable_bytes < *size) {
      why_not.push_back(fmt::format("{}: {} bytes provisionable", node, info->provisionable_bytes));
      continue;
    }
    dp::CreateVolumeRequest creq;
    creq.set_name(pool_name);
    creq.set_size_bytes(*size);
    *creq.mutable_qos() = qos;
    if (dsrc.kind_case() != dp::VolumeContentSource::KIND_NOT_SET) *creq.mutable_source() = dsrc;
    dp::CreateVolumeResponse cresp;
    Status s = nodes.Call(node, "CreateVolume", [&](Stub& stub, grpc::ClientContext* c) {
      return stub.CreateVolume(c, creq, &cresp);
    });
    if (s.error_code() == StatusCode::RESOURCE_EXHAUSTED) {
      why_not.push_back(s.error_message());
      spdlog::info("[{}] {}; trying the next node", csi::CurrentRequestId(), s.error_message());
      continue;
    }
    if (!s.ok()) return s;
    ledger_->Add(*info, *size);
    FillVolume(node, cresp.volume(), resp->mutable_volume());
    if (req.has_volume_content_source()) {
      *resp->mutable_volume()->mutable_content_source() = req.volume_content_source();
    }
    spdlog::info("[{}] volume {} ({} bytes) created on node {}", csi::CurrentRequestId(),
                 resp->volume().volume_id(), *size, node);
    return Status::OK;
  }
  // An allowed node that has not registered (yet) may come with room: retry rather than fail.
  if (missing || order.empty()) {
    return Err(StatusCode::UNAVAILABLE,
               "no registered node can take {} bytes now ({}); retry once the node's datapath "
               "heartbeats",
               *size,
               order.empty() ? "no node registered yet"
                             : fmt::format("{}", fmt::join(why_not, "; ")));
  }
  return Err(StatusCode::RESOURCE_EXHAUSTED, "no allowed node has room for {} bytes ({})", *size,
             fmt::join(why_not, "; "));
}

Status ControllerImpl::DeleteVolume(const v1::DeleteVolumeRequest& req) {
  if (req.volume_id().empty()) return Err(StatusCode::INVALID_ARGUMENT, "volume_id is required");
  std::string why;
  auto ref = ParseVolume(req.volume_id(), &why);
  if (!ref) {
    // Never one of ours, so it does not exist: deleting it is done (CSI: idempotent).
    spdlog::info("[{}] DeleteVolume of a malformed id \"{}\" succeeds: {}",
                 csi::CurrentRequestId(), req.volume_id(), why);
    return Status::OK;
  }
  Nodes nodes(registry_, opts_);
  dp::DeleteVolumeRequest dreq;
  dreq.set_name(ref->name);
  dp::DeleteVolumeResponse dresp;
  Status s = nodes.Call(ref->node, "DeleteVolume", [&](Stub& st, grpc::ClientContext* c) {
    return st.DeleteVolume(c, dreq, &dresp);
  });
  if (s.error_code() == StatusCode::NOT_FOUND) return Status::OK;
  return s;
}

Status ControllerImpl::ValidateVolumeCapabilities(
    const v1::ValidateVolumeCapabilitiesRequest& req,
    v1::ValidateVolumeCapabilitiesResponse* resp) {
  if (req.volume_id().empty()) return Err(StatusCode::INVALID_ARGUMENT, "volume_id is required");
  if (req.volume_capabilities().empty()) {
    return Err(StatusCode::INVALID_ARGUMENT, "volume_capabilities is required");
  }
  std::string why;
  auto ref = ParseVolume(req.volume_id(), &why);
  if (!ref) return Err(StatusCode::NOT_FOUND, "volume \"{}\" does not exist: {}", req.volume_id(), why);
  Nodes nodes(registry_, opts_);
  dp::Volume dv;
  if (Status s = GetDpVolume(nodes, *ref, &dv); !s.ok()) return s;
  for (const auto& cap : req.volume_capabilities()) {
    std::string w = UnsupportedCapability(cap);
    if (!w.empty()) {
      resp->set_message(w);
      return Status::OK;
    }
  }
  csi::QosParameters q;
  if (Status s = ParseQos(req.parameters(), "parameters", &q); !s.ok()) {
    resp->set_message(s.error_message());
    return Status::OK;
  }
  if (Status s = ParseQos(req.mutable_parameters(), "mutable_parameters", &q); !s.ok()) {
    resp->set_message(s.error_message());
    return Status::OK;
  }
  auto* c = resp->mutable_confirmed();
  *c->mutable_volume_capabilities() = req.volume_capabilities();
  *c->mutable_volume_context() = req.volume_context();
  *c->mutable_parameters() = req.parameters();
  *c->mutable_mutable_parameters() = req.mutable_parameters();
  return Status::OK;
}

Status ControllerImpl::ListVolumes(const v1::ListVolumesRequest& req,
                                   v1::ListVolumesResponse* resp) {
  if (!req.starting_token().empty() && !DecodePageToken(req.starting_token())) {
    return Err(StatusCode::ABORTED, "starting_token \"{}\" is not valid", req.starting_token());
  }
  Nodes nodes(registry_, opts_);
  std::vector<std::pair<std::string, v1::ListVolumesResponse::Entry>> all;
  for (const auto& n : nodes.List()) {
    dp::ListVolumesRequest lreq;
    dp::ListVolumesResponse lresp;
    Status s = nodes.Call(n.node_id, "ListVolumes", [&](Stub& st, grpc::ClientContext* c) {
      return st.ListVolumes(c, lreq, &lresp);
    });
    if (!s.ok()) {
      // A partial list beats none for the health monitor; the missing node's volumes show up
      // again once it answers.
      spdlog::warn("[{}] ListVolumes skips node {}: {}", csi::CurrentRequestId(), n.node_id,
                   s.error_message());
      continue;
    }
    for (const auto& dv : lresp.volumes()) {
      v1::ListVolumesResponse::Entry e;
      FillVolume(n.node_id, dv, e.mutable_volume());
      FillCondition(dv, e.mutable_status()->mutable_volume_condition());
      std::string id = e.volume().volume_id();
      all.emplace_back(std::move(id), std::move(e));
    }
  }
  return Paginate(std::move(all), req.max_entries(), req.starting_token(),
                  resp->mutable_entries(), resp->mutable_next_token());
}

Status ControllerImpl::GetCapacity(const v1::GetCapacityRequest& req,
                                   v1::GetCapacityResponse* resp) {
  csi::QosParameters q;
  if (Status s = ParseQos(req.parameters(), "parameters", &q); !s.ok()) return s;
  for (const auto& cap : req.volume_capabilities()) {
    std::string why = UnsupportedCapability(cap);
    if (!why.empty()) {
      // Nothing can be provisioned with a capability we refuse.
      spdlog::debug("[{}] GetCapacity: 0 for an unsupported capability: {}",
                    csi::CurrentRequestId(), why);
      resp->set_available_capacity(0);
      resp->mutable_maximum_volume_size()->set_value(0);
      return Status::OK;
    }
  }
  Nodes nodes(registry_, opts_);
  uint64_t avail = 0;
  if (req.has_accessible_topology() && !req.accessible_topology().segments().empty()) {
    Status st;
    std::string node = NodeOfTopology(req.accessible_topology(), &st);
    if (!st.ok()) return st;
    if (auto info = nodes.Get(node)) avail = info->provisionable_bytes;
  } else {
    // No segment: the largest volume one node could take now. A volume never spans nodes, so
    // the sum would promise room that no single CreateVolume can use.
    for (const auto& n : nodes.List()) avail = std::max(avail, n.provisionable_bytes);
  }
  avail = RoundDown(std::min<uint64_t>(avail, std::numeric_limits<int64_t>::max()));
  resp->set_available_capacity(static_cast<int64_t>(avail));
  resp->mutable_maximum_volume_size()->set_value(static_cast<int64_t>(avail));
  return Status::OK;
}

Status ControllerImpl::GetCapabilities(v1::ControllerGetCapabilitiesResponse* resp) {
  using T = v1::ControllerServiceCapability::RPC;
  for (auto t : {T::CREATE_DELETE_VOLUME, T::LIST_VOLUMES, T::GET_CAPACITY,
                 T::CREATE_DELETE_SNAPSHOT, T::LIST_SNAPSHOTS, T::CLONE_VOLUME, T::EXPAND_VOLUME,
                 T::VOLUME_CONDITION, T::GET_VOLUME, T::SINGLE_NODE_MULTI_WRITER,
                 T::MODIFY_VOLUME}) {
    resp->add_capabilities()->mutable_rpc()->set_type(t);
  }
  return Status::OK;
}

Status ControllerImpl::CreateSnapshot(const v1::CreateSnapshotRequest& req,
                                      v1::CreateSnapshotResponse* resp) {
  if (req.name().empty()) return Err(StatusCode::INVALID_ARGUMENT, "name is required");
  if (req.source_volume_id().empty()) {
    return Err(StatusCode::INVALID_ARGUMENT, "source_volume_id is required");
  }
  for (const auto& [k, v] : req.parameters()) {
    if (k.rfind(kCsiParamPrefix, 0) == 0) continue;
    return Err(StatusCode::INVALID_ARGUMENT,
               "unknown snapshot parameter \"{}\" (VolumeSnapshotClass parameters: none are "
               "supported)",
               k);
  }
  std::string why;
  auto src = ParseVolume(req.source_volume_id(), &why);
  if (!src) {
    return Err(StatusCode::NOT_FOUND, "source volume \"{}\" does not exist: {}",
               req.source_volume_id(), why);
  }
  Nodes nodes(registry_, opts_);
  auto snap_name_or = csi::PoolNameForCsiName(req.name());
  if (!snap_name_or.ok()) {
    return Err(StatusCode::INVALID_ARGUMENT, "name: {}", snap_name_or.status().message());
  }
  const std::string snap_name = *snap_name_or;
  // Snapshot names are unique across the cluster: look on every live node, as CreateVolume does.
  std::vector<NodeInfo> live = nodes.List();
  struct Lookup {
    Status st;
    dp::Snapshot snap;
  };
  auto lookups = FanOut<Lookup>(live, [&](const NodeInfo& n) {
    Lookup l;
    l.st = GetDpSnapshot(nodes, Ref{n.node_id, snap_name}, &l.snap);
    return l;
  });
  for (size_t i = 0; i < live.size(); ++i) {
    const NodeInfo& n = live[i];
    const Status& s = lookups[i].st;
    const dp::Snapshot& existing = lookups[i].snap;
    if (s.error_code() == StatusCode::NOT_FOUND) continue;
    if (!s.ok()) return s;
    if (n.node_id != src->node || existing.source_volume() != src->name) {
      return Err(StatusCode::ALREADY_EXISTS,
                 "snapshot \"{}\" exists with another source volume ({})", req.name(),
                 VolumeIdOf(n.node_id, existing.source_volume()));
    }
    FillSnapshot(n.node_id, existing, resp->mutable_snapshot());
    return Status::OK;
  }
  dp::CreateSnapshotRequest creq;
  creq.set_name(snap_name);
  creq.set_source_volume(src->name);
  dp::CreateSnapshotResponse cresp;
  Status s = nodes.Call(src->node, "CreateSnapshot", [&](Stub& st, grpc::ClientContext* c) {
    return st.CreateSnapshot(c, creq, &cresp);
  });
  if (!s.ok()) return s;
  FillSnapshot(src->node, cresp.snapshot(), resp->mutable_snapshot());
  return Status::OK;
}

Status ControllerImpl::DeleteSnapshot(const v1::DeleteSnapshotRequest& req) {
  if (req.snapshot_id().empty()) {
    return Err(StatusCode::INVALID_ARGUMENT, "snapshot_id is required");
  }
  std::string why;
  auto ref = ParseSnapshot(req.snapshot_id(), &why);
  if (!ref) {
    spdlog::info("[{}] DeleteSnapshot of a malformed id \"{}\" succeeds: {}",
                 csi::CurrentRequestId(), req.snapshot_id(), why);
    return Status::OK;
  }
  Nodes nodes(registry_, opts_);
  dp::DeleteSnapshotRequest dreq;
  dreq.set_name(ref->name);
  dp::DeleteSnapshotResponse dresp;
  Status s = nodes.Call(ref->node, "DeleteSnapshot", [&](Stub& st, grpc::ClientContext* c) {
    return st.DeleteSnapshot(c, dreq, &dresp);
  });
  if (s.error_code() == StatusCode::NOT_FOUND) return Status::OK;
  return s;
}

Status ControllerImpl::ListSnapshots(const v1::ListSnapshotsRequest& req,
                                     v1::ListSnapshotsResponse* resp) {
  if (!req.starting_token().empty() && !DecodePageToken(req.starting_token())) {
    return Err(StatusCode::ABORTED, "starting_token \"{}\" is not valid", req.starting_token());
  }
  Nodes nodes(registry_, opts_);
  std::vector<std::pair<std::string, v1::ListSnapshotsResponse::Entry>> all;
  std::string why;
  auto add = [&](const std::string& node, const dp::Snapshot& ds) {
    v1::ListSnapshotsResponse::Entry e;
    FillSnapshot(node, ds, e.mutable_snapshot());
    std::string id = e.snapshot().snapshot_id();
    all.emplace_back(std::move(id), std::move(e));
  };
  std::optional<Ref> src;
  if (!req.source_volume_id().empty()) {
    src = ParseVolume(req.source_volume_id(), &why);
    // A malformed id names no volume, so no snapshot was taken from it: an empty list.
    if (!src) return Paginate(std::move(all), req.max_entries(), req.starting_token(),
                              resp->mutable_entries(), resp->mutable_next_token());
  }
  if (!req.snapshot_id().empty()) {
    auto ref = ParseSnapshot(req.snapshot_id(), &why);
    if (ref && (!src || src->node == ref->node)) {
      dp::Snapshot ds;
      Status s = GetDpSnapshot(nodes, *ref, &ds);
      // A node that cannot answer is UNAVAILABLE, not an empty list: the snapshotter would
      // take "no entry" for a snapshot that is gone.
      if (s.ok() && (!src || ds.source_volume() == src->name)) {
        add(ref->node, ds);
      } else if (!s.ok() && s.error_code() != StatusCode::NOT_FOUND) {
        return s;
      }
    }
  } else {
    std::vector<std::string> which;
    if (src) {
      which.push_back(src->node);
    } else {
      for (const auto& n : nodes.List()) which.push_back(n.node_id);
    }
    for (const auto& node : which) {
      dp::ListSnapshotsRequest lreq;
      if (src) lreq.set_source_volume(src->name);
      dp::ListSnapshotsResponse lresp;
      Status s = nodes.Call(node, "ListSnapshots", [&](Stub& st, grpc::ClientContext* c) {
        return st.ListSnapshots(c, lreq, &lresp);
      });
      if (!s.ok()) {
        if (src) return s;  // the one node asked about: an error, not "no snapshots"
        spdlog::warn("[{}] ListSnapshots skips node {}: {}", csi::CurrentRequestId(), node,
                     s.error_message());
        continue;
      }
      for (const auto& ds : lresp.snapshots()) add(node, ds);
    }
  }
  return Paginate(std::move(all), req.max_entries(), req.starting_token(),
                  resp->mutable_entries(), resp->mutable_next_token());
}

Status ControllerImpl::ExpandVolume(const v1::ControllerExpandVolumeRequest& req,
                                    v1::ControllerExpandVolumeResponse* resp) {
  if (req.volume_id().empty()) return Err(StatusCode::INVALID_ARGUMENT, "volume_id is required");
  if (!req.has_capacity_range()) {
    return Err(StatusCode::INVALID_ARGUMENT, "capacity_range is required");
  }
  if (req.has_volume_capability()) {
    std::string w = UnsupportedCapability(req.volume_capability());
    if (!w.empty()) return Err(StatusCode::INVALID_ARGUMENT, w);
  }
  std::string why;
  auto ref = ParseVolume(req.volume_id(), &why);
  if (!ref) return Err(StatusCode::NOT_FOUND, "volume \"{}\" does not exist: {}", req.volume_id(), why);
  Nodes nodes(registry_, opts_);
  dp::Volume dv;
  if (Status s = GetDpVolume(nodes, *ref, &dv); !s.ok()) return s;
  if (req.capacity_range().required_bytes() <= 0) {
    return Err(StatusCode::INVALID_ARGUMENT, "capacity_range.required_bytes must be positive");
  }
  auto size = SizeFor(&req.capacity_range(), 0, 0);
  if (!size.ok()) return Err(ToGrpc(size.status()).error_code(), size.status().message());
  uint64_t now = dv.size_bytes();
  if (*size > now) {
    dp::ResizeVolumeRequest rreq;
    rreq.set_name(ref->name);
    rreq.set_size_bytes(*size);
    dp::ResizeVolumeResponse rresp;
    Status s = nodes.Call(ref->node, "ResizeVolume", [&](Stub& st, grpc::ClientContext* c) {
      return st.ResizeVolume(c, rreq, &rresp);
    });
    if (!s.ok()) return s;
    now = rresp.volume().size_bytes();
  }
  // Volumes never shrink: a smaller request is already satisfied (CSI: idempotent).
  resp->set_capacity_bytes(static_cast<int64_t>(now));
  // The attached NBD device learns its new size on the node (mount or block alike), so the
  // node's NodeExpandVolume must run in both cases.
  resp->set_node_expansion_required(true);
  return Status::OK;
}

Status ControllerImpl::GetVolume(const v1::ControllerGetVolumeRequest& req,
                                 v1::ControllerGetVolumeResponse* resp) {
  if (req.volume_id().empty()) return Err(StatusCode::INVALID_ARGUMENT, "volume_id is required");
  std::string why;
  auto ref = ParseVolume(req.volume_id(), &why);
  if (!ref) return Err(StatusCode::NOT_FOUND, "volume \"{}\" does not exist: {}", req.volume_id(), why);
  Nodes nodes(registry_, opts_);
  dp::Volume dv;
  Status s = GetDpVolume(nodes, *ref, &dv);
  if (s.error_code() == StatusCode::NOT_FOUND) return s;
  auto* cond = resp->mutable_status()->mutable_volume_condition();
  if (!s.ok()) {
    // The volume's node is gone or its datapath cannot serve it (e.g. a broken volume is
    // INTERNAL): the volume exists as far as we know, and is not usable. That is what the
    // condition is for; the health monitor turns it into an event.
    auto* v = resp->mutable_volume();
    v->set_volume_id(req.volume_id());
    SetTopology(ref->node, v);
    cond->set_abnormal(true);
    cond->set_message(s.error_message());
    return Status::OK;
  }
  FillVolume(ref->node, dv, resp->mutable_volume());
  FillCondition(dv, cond);
  return Status::OK;
}

Status ControllerImpl::ModifyVolume(const v1::ControllerModifyVolumeRequest& req) {
  if (req.volume_id().empty()) return Err(StatusCode::INVALID_ARGUMENT, "volume_id is required");
  csi::QosParameters q;
  if (Status s = ParseQos(req.mutable_parameters(), "mutable_parameters", &q); !s.ok()) return s;
  std::string why;
  auto ref = ParseVolume(req.volume_id(), &why);
  if (!ref) return Err(StatusCode::NOT_FOUND, "volume \"{}\" does not exist: {}", req.volume_id(), why);
  Nodes nodes(registry_, opts_);
  if (q.empty()) {
    dp::Volume dv;
    return GetDpVolume(nodes, *ref, &dv);
  }
  dp::SetQosRequest sreq;
  sreq.set_name(ref->name);
  *sreq.mutable_patch() = ToPatch(q);
  dp::SetQosResponse sresp;
  Status s = nodes.Call(ref->node, "SetQos", [&](Stub& st, grpc::ClientContext* c) {
    return st.SetQos(c, sreq, &sresp);
  });
  if (s.ok()) {
    spdlog::info("[{}] volume {}: QoS now {}", csi::CurrentRequestId(), req.volume_id(),
                 sresp.volume().qos().ShortDebugString());
  }
  return s;
}

// ---- the locking decorator ----

namespace {

class ControllerService final : public v1::Controller::Service {
 public:
  ControllerService(NodeRegistry& reg, ControllerOptions opts) : impl_(reg, opts) {}

  Status CreateVolume(grpc::ServerContext*, const v1::CreateVolumeRequest* req,
                      v1::CreateVolumeResponse* resp) override {
    return Locked("volume-name/" + req->name(), req->name(),
                  [&] { return impl_.CreateVolume(*req, resp); });
  }
  Status DeleteVolume(grpc::ServerContext*, const v1::DeleteVolumeRequest* req,
                      v1::DeleteVolumeResponse*) override {
    return Locked("volume/" + req->volume_id(), req->volume_id(),
                  [&] { return impl_.DeleteVolume(*req); });
  }
  Status ControllerPublishVolume(grpc::ServerContext*, const v1::ControllerPublishVolumeRequest*,
                                 v1::ControllerPublishVolumeResponse*) override {
    return Status(StatusCode::UNIMPLEMENTED,
                  "ControllerPublishVolume is not supported: the node attaches its volumes");
  }
  Status ControllerUnpublishVolume(grpc::ServerContext*,
                                   const v1::ControllerUnpublishVolumeRequest*,
                                   v1::ControllerUnpublishVolumeResponse*) override {
    return Status(StatusCode::UNIMPLEMENTED,
                  "ControllerUnpublishVolume is not supported: the node attaches its volumes");
  }
  Status ValidateVolumeCapabilities(grpc::ServerContext*,
                                    const v1::ValidateVolumeCapabilitiesRequest* req,
                                    v1::ValidateVolumeCapabilitiesResponse* resp) override {
    return impl_.ValidateVolumeCapabilities(*req, resp);
  }
  Status ListVolumes(grpc::ServerContext*, const v1::ListVolumesRequest* req,
                     v1::ListVolumesResponse* resp) override {
    return impl_.ListVolumes(*req, resp);
  }
  Status GetCapacity(grpc::ServerContext*, const v1::GetCapacityRequest* req,
                     v1::GetCapacityResponse* resp) override {
    return impl_.GetCapacity(*req, resp);
  }
  Status ControllerGetCapabilities(grpc::ServerContext*, const v1::ControllerGetCapabilitiesRequest*,
                                   v1::ControllerGetCapabilitiesResponse* resp) override {
    return impl_.GetCapabilities(resp);
  }
  Status CreateSnapshot(grpc::ServerContext*, const v1::CreateSnapshotRequest* req,
                        v1::CreateSnapshotResponse* resp) override {
    return Locked("snapshot-name/" + req->name(), req->name(),
                  [&] { return impl_.CreateSnapshot(*req, resp); });
  }
  Status DeleteSnapshot(grpc::ServerContext*, const v1::DeleteSnapshotRequest* req,
                        v1::DeleteSnapshotResponse*) override {
    return Locked("snapshot/" + req->snapshot_id(), req->snapshot_id(),
                  [&] { return impl_.DeleteSnapshot(*req); });
  }
  Status ListSnapshots(grpc::ServerContext*, const v1::ListSnapshotsRequest* req,
                       v1::ListSnapshotsResponse* resp) override {
    return impl_.ListSnapshots(*req, resp);
  }
  Status ControllerExpandVolume(grpc::ServerContext*, const v1::ControllerExpandVolumeRequest* req,
                                v1::ControllerExpandVolumeResponse* resp) override {
    return Locked("volume/" + req->volume_id(), req->volume_id(),
                  [&] { return impl_.ExpandVolume(*req, resp); });
  }
  Status ControllerGetVolume(grpc::ServerContext*, const v1::ControllerGetVolumeRequest* req,
                             v1::ControllerGetVolumeResponse* resp) override {
    return impl_.GetVolume(*req, resp);
  }
  Status ControllerModifyVolume(grpc::ServerContext*, const v1::ControllerModifyVolumeRequest* req,
                                v1::ControllerModifyVolumeResponse*) override {
    return Locked("volume/" + req->volume_id(), req->volume_id(),
                  [&] { return impl_.ModifyVolume(*req); });
  }

 private:
  template <typename F>
  Status Locked(const std::string& key, const std::string& shown, F&& f) {
    auto guard = inflight_.TryAcquire(key);
    if (!guard) {
      return Err(StatusCode::ABORTED, "an operation on {} is already in progress", shown);
    }
    return f();
  }

  ControllerImpl impl_;
  NameLocks inflight_;
};

}  // namespace

std::unique_ptr<v1::Controller::Service> MakeControllerService(NodeRegistry& registry,
                                                              ControllerOptions opts) {
  return std::make_unique<ControllerService>(registry, opts);
}

}  // namespace nbdcsi::controller
