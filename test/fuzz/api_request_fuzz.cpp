// libFuzzer target for the datapath's management API (datapath/api/service.cpp): the request
// messages a controller or nbdctl sends, decoded from raw bytes by protobuf as gRPC would, handed
// to the real Datapath service handlers (MakeDatapathService, no socket), over a real Pool in a
// temporary directory (tmpfs when /dev/shm is there). The handlers convert and forward; the
// pool's rules (datapath/pool/rules.h) decide, so this fuzzes the one validator through the
// boundary that untrusted callers reach.
//
// Input: up to 8 calls, each 1 byte (which RPC), 2 bytes big-endian length, then that many bytes
// of the serialized request message (a message protobuf cannot decode is skipped, as gRPC would
// refuse it before the handler). The pool is emptied before each input, so inputs are independent.
// Checked after every call:
//  - the status is one a caller can act on (never UNKNOWN, INTERNAL, DATA_LOSS or UNIMPLEMENTED),
//    and never ABORTED (calls here never overlap);
//  - a name, size or QoS the pool's rules refuse gives INVALID_ARGUMENT, whatever the call;
//  - what a successful call returns obeys the rules, says what was asked (name, size, source,
//    flags, limits), and its data path lies directly inside the pool's own directory;
//  - a created volume or snapshot can be inspected, a deleted one is NOT_FOUND;
//  - nothing appears outside the pool directory, and every file in volumes/ and snapshots/ is
//    named after a valid name (no id or name reaches outside the pool).
#include <dirent.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <memory>
#include <set>
#include <string>

#include <google/protobuf/stubs/logging.h>
#include <grpcpp/grpcpp.h>

#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/qos_proto.h"
#include "datapath/api/schedule_proto.h"
#include "datapath/api/service.h"
#include "datapath/pool/pool.h"
#include "datapath/pool/rules.h"
#include "test/fuzz/fuzz_check.h"

namespace dp = nbdcsi::datapath;
namespace v1 = nbdcsi::datapath::v1;
namespace fs = std::filesystem;
using grpc::StatusCode;

namespace {

struct World {
  std::string root;  // holds the pool directory and nothing else
  std::string dir;   // the pool
  std::unique_ptr<dp::Pool> pool;
  std::unique_ptr<grpc::Service> owner;
  v1::Datapath::Service* svc = nullptr;
  std::set<std::string> top;  // the pool directory's entries after Open
};

std::set<std::string> Entries(const std::string& dir) {
  std::set<std::string> out;
  DIR* d = opendir(dir.c_str());
  FUZZ_CHECK_MSG(d != nullptr, dir);
  while (dirent* e = readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
      out.insert(e->d_name);
    }
  }
  closedir(d);
  return out;
}

World& W() {
  static World* w = [] {
    auto* w = new World;
    spdlog::set_level(spdlog::level::off);  // every refusal logs a warning
    // protobuf logs every string field that is not UTF-8 (the message is then refused).
    google::protobuf::SetLogHandler(nullptr);
    const char* base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    std::string tmpl = std::string(base) + "/nbdcsi-fuzz-api-XXXXXX";
    FUZZ_CHECK(mkdtemp(tmpl.data()) != nullptr);
    w->root = tmpl;
    w->dir = w->root + "/pool";
    dp::PoolOptions opts;
    opts.dir = w->dir;
    opts.capacity_bytes = uint64_t{1} << 30;  // bounded: big sizes meet ENOSPC, not the disk
    opts.disable_reflink = true;              // the copy path exists on every file system
    auto p = dp::Pool::Open(opts);
    FUZZ_CHECK_MSG(p.ok(), p.status().message());
    w->pool = std::move(*p);
    w->owner = dp::MakeDatapathService(*w->pool);
    w->svc = dynamic_cast<v1::Datapath::Service*>(w->owner.get());
    FUZZ_CHECK(w->svc != nullptr);
    w->top = Entries(w->dir);
    std::atexit([] {
      World& w = W();
      w.owner.reset();
      w.pool.reset();
      std::error_code ec;
      fs::remove_all(w.root, ec);
    });
    return w;
  }();
  return *w;
}

bool VolumeNameOk(const std::string& n) { return dp::ValidateVolumeName(n).ok(); }
bool SnapshotNameOk(const std::string& n) { return dp::ValidateSnapshotName(n).ok(); }

void CheckCode(const grpc::Status& s, const char* rpc) {
  const StatusCode c = s.error_code();
  const std::string what = std::string(rpc) + ": " + std::to_string(c) + " " + s.error_message();
  FUZZ_CHECK_MSG(c != StatusCode::UNKNOWN && c != StatusCode::INTERNAL &&
                     c != StatusCode::DATA_LOSS && c != StatusCode::UNIMPLEMENTED &&
                     c != StatusCode::ABORTED,
                 what);
  if (!s.ok()) FUZZ_CHECK_MSG(!s.error_message().empty(), what);
}

void CheckRefused(const grpc::Status& s, const char* rpc, const std::string& why) {
  FUZZ_CHECK_MSG(s.error_code() == StatusCode::INVALID_ARGUMENT,
                 std::string(rpc) + " accepted or misreported (" + std::to_string(s.error_code()) +
                     " " + s.error_message() + "): " + why);
}

// A data file the API reports lies directly in DIR/<sub>.
void CheckPath(const std::string& path, const char* sub, const std::string& name) {
  const fs::path p = fs::path(path).lexically_normal();
  FUZZ_CHECK_MSG(p.parent_path() == fs::path(W().dir) / sub, path);
  FUZZ_CHECK_MSG(p.filename() == name + ".img", path);
}

void CheckVolume(const v1::Volume& v) {
  FUZZ_CHECK_MSG(VolumeNameOk(v.name()), v.name());
  FUZZ_CHECK(dp::ValidateVolumeSize(v.size_bytes()).ok());
  FUZZ_CHECK(dp::ValidateQos(dp::FromProto(v.qos()), v.size_bytes()).ok());
  CheckPath(v.data_path(), "volumes", v.name());
}

// Nothing beside the pool, nothing in it but what names make.
void CheckTree() {
  World& w = W();
  FUZZ_CHECK(Entries(w.root) == std::set<std::string>{"pool"});
  FUZZ_CHECK(Entries(w.dir) == w.top);
  for (const char* sub : {"volumes", "snapshots"}) {
    for (std::string f : Entries(w.dir + "/" + sub)) {
      std::string name = f;
      // Metadata is committed through ".NAME.json.tmp" (a background copy may be doing so now).
      if (name.size() > 5 && name[0] == '.' && name.compare(name.size() - 4, 4, ".tmp") == 0) {
        name.erase(0, 1);
      }
      for (const char* ext : {".tmp", ".json", ".img"}) {
        const size_t n = std::strlen(ext);
        if (name.size() > n && name.compare(name.size() - n, n, ext) == 0) {
          name.resize(name.size() - n);
        }
      }
      FUZZ_CHECK_MSG(VolumeNameOk(name), std::string(sub) + "/" + f);
    }
  }
}

// Empties the pool. Background copies (snapshots, restores and clones without reflink) refuse
// deletion until done, so this waits for them, boundedly.
void Reset() {
  World& w = W();
  for (int attempt = 0; attempt < 2000; ++attempt) {
    auto snaps = w.pool->ListSnapshots();
    FUZZ_CHECK(snaps.ok());
    auto vols = w.pool->List();
    if (snaps->empty() && vols.empty()) return;
    for (const auto& s : *snaps) (void)w.pool->DeleteSnapshot(s.name);
    for (const auto& v : vols) (void)w.pool->Delete(v.name);
    if (attempt > 0) usleep(1000);  // the poll of a bounded wait for background copies
  }
  FUZZ_CHECK_MSG(false, "the pool cannot be emptied");
}

template <typename Req>
bool Decode(std::string_view bytes, Req* req) {
  return req->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()));
}

void CreateVolume(std::string_view b) {
  v1::CreateVolumeRequest req;
  if (!Decode(b, &req)) return;
  v1::CreateVolumeResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->CreateVolume(&ctx, &req, &resp);
  CheckCode(s, "CreateVolume");
  const bool blank = !req.has_source();
  std::string source_name;
  std::string label;
  if (req.has_source()) {
    if (req.source().has_snapshot()) {
      source_name = req.source().snapshot();
      label = "snapshot/" + source_name;
    } else if (req.source().has_volume()) {
      source_name = req.source().volume();
      label = "volume/" + source_name;
    }
  }
  if (!VolumeNameOk(req.name())) return CheckRefused(s, "CreateVolume", "bad name");
  if (req.has_source() && label.empty()) return CheckRefused(s, "CreateVolume", "empty source");
  if (req.has_source() && req.source().has_snapshot() && !SnapshotNameOk(source_name)) {
    return CheckRefused(s, "CreateVolume", "bad snapshot name");
  }
  if (req.has_source() && req.source().has_volume() && !VolumeNameOk(source_name)) {
    return CheckRefused(s, "CreateVolume", "bad source volume name");
  }
  if ((blank || req.size_bytes() != 0) && !dp::ValidateVolumeSize(req.size_bytes()).ok()) {
    return CheckRefused(s, "CreateVolume", "bad size");
  }
  if (blank && !dp::ValidateQos(dp::FromProto(req.qos()), req.size_bytes()).ok()) {
    return CheckRefused(s, "CreateVolume", "bad QoS");
  }
  if (dp::FromProto(req.qos()).burst_ms > dp::kMaxBurstMs) {
    return CheckRefused(s, "CreateVolume", "burst_ms too large");
  }
  if (req.has_schedule() && !nbdcsi::ValidateSchedule(dp::FromProto(req.schedule())).ok()) {
    return CheckRefused(s, "CreateVolume", "bad schedule");
  }
  if (!s.ok()) return;
  const v1::Volume& v = resp.volume();
  {
    const nbdcsi::VolumeSchedule want =
        req.has_schedule() ? dp::FromProto(req.schedule()) : nbdcsi::VolumeSchedule{};
    const nbdcsi::VolumeSchedule got =
        v.has_schedule() ? dp::FromProto(v.schedule()) : nbdcsi::VolumeSchedule{};
    FUZZ_CHECK(got == want || (got.empty() && want.empty()));
  }
  CheckVolume(v);
  FUZZ_CHECK(v.name() == req.name());
  if (blank || req.size_bytes() != 0) FUZZ_CHECK(v.size_bytes() == req.size_bytes());
  FUZZ_CHECK(v.read_only() == req.read_only());
  FUZZ_CHECK(dp::FromProto(v.qos()) == dp::FromProto(req.qos()));
  FUZZ_CHECK_MSG(v.source() == label, v.source());
  FUZZ_CHECK(W().pool->Inspect(req.name()).ok());
}

void DeleteVolume(std::string_view b) {
  v1::DeleteVolumeRequest req;
  if (!Decode(b, &req)) return;
  v1::DeleteVolumeResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->DeleteVolume(&ctx, &req, &resp);
  CheckCode(s, "DeleteVolume");
  if (!VolumeNameOk(req.name())) return CheckRefused(s, "DeleteVolume", "bad name");
  if (s.ok()) FUZZ_CHECK(W().pool->Inspect(req.name()).status().code() == ENOENT);
}

void ResizeVolume(std::string_view b) {
  v1::ResizeVolumeRequest req;
  if (!Decode(b, &req)) return;
  auto before = VolumeNameOk(req.name()) ? W().pool->Inspect(req.name())
                                         : nbdcsi::StatusOr<dp::VolumeInfo>(
                                               nbdcsi::Error(EINVAL, "bad name"));
  v1::ResizeVolumeResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->ResizeVolume(&ctx, &req, &resp);
  CheckCode(s, "ResizeVolume");
  if (!VolumeNameOk(req.name())) return CheckRefused(s, "ResizeVolume", "bad name");
  if (!dp::ValidateVolumeSize(req.size_bytes()).ok()) {
    return CheckRefused(s, "ResizeVolume", "bad size");
  }
  if (before.ok() && req.size_bytes() < before->size) {
    return CheckRefused(s, "ResizeVolume", "shrink");
  }
  if (!s.ok()) return;
  CheckVolume(resp.volume());
  FUZZ_CHECK(resp.volume().name() == req.name());
  FUZZ_CHECK(resp.volume().size_bytes() == req.size_bytes());
}

void GetVolume(std::string_view b) {
  v1::GetVolumeRequest req;
  if (!Decode(b, &req)) return;
  v1::GetVolumeResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->GetVolume(&ctx, &req, &resp);
  CheckCode(s, "GetVolume");
  if (!VolumeNameOk(req.name())) return CheckRefused(s, "GetVolume", "bad name");
  if (s.ok()) {
    CheckVolume(resp.volume());
    FUZZ_CHECK(resp.volume().name() == req.name());
  }
}

void GetVolumeStats(std::string_view b) {
  v1::GetVolumeStatsRequest req;
  if (!Decode(b, &req)) return;
  v1::GetVolumeStatsResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->GetVolumeStats(&ctx, &req, &resp);
  CheckCode(s, "GetVolumeStats");
  if (!VolumeNameOk(req.name())) return CheckRefused(s, "GetVolumeStats", "bad name");
  if (s.ok()) FUZZ_CHECK(resp.name() == req.name());
}

void SetQos(std::string_view b) {
  v1::SetQosRequest req;
  if (!Decode(b, &req)) return;
  // The QoS rules depend on the volume's size, so a missing volume is NOT_FOUND first.
  const bool exists = VolumeNameOk(req.name()) && W().pool->Inspect(req.name()).ok();
  v1::SetQosResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->SetQos(&ctx, &req, &resp);
  CheckCode(s, "SetQos");
  if (req.change_case() == v1::SetQosRequest::CHANGE_NOT_SET) {
    return CheckRefused(s, "SetQos", "no change");
  }
  if (!VolumeNameOk(req.name())) return CheckRefused(s, "SetQos", "bad name");
  if (exists && req.has_replace() && req.replace().burst_ms() > dp::kMaxBurstMs) {
    return CheckRefused(s, "SetQos", "burst_ms too large");
  }
  if (exists && req.has_patch() && req.patch().has_burst_ms() &&
      req.patch().burst_ms() > dp::kMaxBurstMs) {
    return CheckRefused(s, "SetQos", "burst_ms too large");
  }
  if (!s.ok()) return;
  const v1::Volume& v = resp.volume();
  CheckVolume(v);
  FUZZ_CHECK(v.name() == req.name());
  if (req.has_replace()) {
    FUZZ_CHECK(dp::FromProto(v.qos()) == dp::FromProto(req.replace()));
  } else {
    const v1::QosPatch& p = req.patch();
    const v1::QosLimits& q = v.qos();
    FUZZ_CHECK(!p.has_max_iops() || q.max_iops() == p.max_iops());
    FUZZ_CHECK(!p.has_max_read_iops() || q.max_read_iops() == p.max_read_iops());
    FUZZ_CHECK(!p.has_max_write_iops() || q.max_write_iops() == p.max_write_iops());
    FUZZ_CHECK(!p.has_max_bps() || q.max_bps() == p.max_bps());
    FUZZ_CHECK(!p.has_max_read_bps() || q.max_read_bps() == p.max_read_bps());
    FUZZ_CHECK(!p.has_max_write_bps() || q.max_write_bps() == p.max_write_bps());
    FUZZ_CHECK(!p.has_iops_per_gib() || q.iops_per_gib() == p.iops_per_gib());
    FUZZ_CHECK(!p.has_bps_per_gib() || q.bps_per_gib() == p.bps_per_gib());
    FUZZ_CHECK(!p.has_burst_ms() || q.burst_ms() == p.burst_ms());
  }
}

void CreateSnapshot(std::string_view b) {
  v1::CreateSnapshotRequest req;
  if (!Decode(b, &req)) return;
  v1::CreateSnapshotResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->CreateSnapshot(&ctx, &req, &resp);
  CheckCode(s, "CreateSnapshot");
  if (!SnapshotNameOk(req.name())) return CheckRefused(s, "CreateSnapshot", "bad name");
  if (!VolumeNameOk(req.source_volume())) {
    return CheckRefused(s, "CreateSnapshot", "bad source volume name");
  }
  if (!s.ok()) return;
  const v1::Snapshot& sn = resp.snapshot();
  FUZZ_CHECK(sn.name() == req.name() && sn.source_volume() == req.source_volume());
  FUZZ_CHECK(sn.method() == "reflink" || sn.method() == "copy");
  FUZZ_CHECK(dp::ValidateVolumeSize(sn.size_bytes()).ok());
  CheckPath(sn.data_path(), "snapshots", sn.name());
  FUZZ_CHECK(W().pool->InspectSnapshot(req.name()).ok());
}

void DeleteSnapshot(std::string_view b) {
  v1::DeleteSnapshotRequest req;
  if (!Decode(b, &req)) return;
  v1::DeleteSnapshotResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->DeleteSnapshot(&ctx, &req, &resp);
  CheckCode(s, "DeleteSnapshot");
  if (!SnapshotNameOk(req.name())) return CheckRefused(s, "DeleteSnapshot", "bad name");
  if (s.ok()) FUZZ_CHECK(W().pool->InspectSnapshot(req.name()).status().code() == ENOENT);
}

void GetSnapshot(std::string_view b) {
  v1::GetSnapshotRequest req;
  if (!Decode(b, &req)) return;
  v1::GetSnapshotResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->GetSnapshot(&ctx, &req, &resp);
  CheckCode(s, "GetSnapshot");
  if (!SnapshotNameOk(req.name())) return CheckRefused(s, "GetSnapshot", "bad name");
  if (s.ok()) {
    FUZZ_CHECK(resp.snapshot().name() == req.name());
    CheckPath(resp.snapshot().data_path(), "snapshots", req.name());
  }
}

void ListSnapshots(std::string_view b) {
  v1::ListSnapshotsRequest req;
  if (!Decode(b, &req)) return;
  v1::ListSnapshotsResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->ListSnapshots(&ctx, &req, &resp);
  CheckCode(s, "ListSnapshots");
  if (!req.source_volume().empty() && !VolumeNameOk(req.source_volume())) {
    return CheckRefused(s, "ListSnapshots", "bad volume name");
  }
  FUZZ_CHECK(s.ok());
  for (const auto& sn : resp.snapshots()) {
    FUZZ_CHECK(req.source_volume().empty() || sn.source_volume() == req.source_volume());
  }
}

void ListVolumes(std::string_view) {
  v1::ListVolumesRequest req;
  v1::ListVolumesResponse resp;
  grpc::ServerContext ctx;
  const grpc::Status s = W().svc->ListVolumes(&ctx, &req, &resp);
  FUZZ_CHECK(s.ok());
  for (const auto& v : resp.volumes()) CheckVolume(v);
}

using Call = void (*)(std::string_view);
constexpr Call kCalls[] = {CreateVolume,   DeleteVolume,   ResizeVolume, GetVolume,
                           GetVolumeStats, SetQos,         CreateSnapshot, DeleteSnapshot,
                           GetSnapshot,    ListSnapshots,  ListVolumes};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reset();
  nbdcsi::fuzz::Bytes in(data, size);
  for (int i = 0; i < 8 && !in.empty(); ++i) {
    const uint8_t op = in.U8();
    const size_t len = (size_t{in.U8()} << 8) | in.U8();
    std::string msg;
    for (size_t k = 0; k < len && !in.empty(); ++k) msg.push_back(static_cast<char>(in.U8()));
    kCalls[op % std::size(kCalls)](msg);
    CheckTree();
  }
  return 0;
}
