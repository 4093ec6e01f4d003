#include "datapath/api/backup_service.h"

#include <spdlog/spdlog.h>

#include <cstring>

#include "common/grpc_status.h"
#include "datapath/api/backup.grpc.pb.h"

namespace nbdcsi::datapath {
namespace {

namespace v1 = ::nbdcsi::datapath::v1;
using backup::BackupJobs;
using backup::JobInfo;
using backup::Manifest;
using backup::Target;

grpc::Status Fail(const char* rpc, const Status& s) {
  // Messages come from our own code and name keys, buckets and endpoints, never credentials or
  // the encryption key.
  spdlog::warn("api {}: {} (errno {}: {})", rpc, s.message(), s.code(), std::strerror(s.code()));
  return ToGrpc(s);
}

Target FromProto(const v1::BackupTarget& t) {
  Target out;
  out.url = t.url();
  out.endpoint = t.endpoint();
  out.region = t.region();
  out.credentials.access_key_id = t.access_key_id();
  out.credentials.secret_access_key = t.secret_access_key();
  out.credentials.session_token = t.session_token();
  out.encryption_key = t.encryption_key();
  return out;
}

void Fill(const JobInfo& j, v1::BackupJob* out) {
  out->set_id(j.id);
  out->set_kind(j.kind);
  out->set_backup(j.backup);
  out->set_target(j.target);
  out->set_snapshot(j.snapshot);
  out->set_volume(j.volume);
  out->set_state(j.state);
  out->set_error(j.error);
  out->set_error_errno(j.error_code);
  out->set_total_bytes(j.total_bytes);
  out->set_done_bytes(j.done_bytes);
  if (j.data_total_bytes) out->set_data_total_bytes(*j.data_total_bytes);
  out->set_data_done_bytes(j.data_done_bytes);
  out->set_transferred_bytes(j.transferred_bytes);
  out->set_chunks_uploaded(j.chunks_uploaded);
  out->set_chunks_reused(j.chunks_reused);
  out->set_chunks_restored(j.chunks_restored);
  out->set_rate_bytes_per_s(j.rate_bytes_per_s);
  out->set_bandwidth_bytes_per_s(j.bandwidth_bytes_per_s);
  out->set_started_unix_ns(j.started_unix_ns);
  out->set_finished_unix_ns(j.finished_unix_ns);
}

void Fill(const Manifest& m, v1::BackupInfo* out) {
  out->set_name(m.name);
  out->set_source_volume(m.source_volume);
  out->set_source_snapshot(m.source_snapshot);
  out->set_created_unix_ns(m.created_unix_ns);
  out->set_volume_size(m.volume_size);
  out->set_chunk_size(m.chunk_size);
  out->set_chunks(m.chunks.size());
  out->set_data_bytes(m.data_bytes);
  out->set_stored_bytes(m.stored_bytes);
  out->set_uploaded_bytes(m.uploaded_bytes);
  out->set_encrypted(m.encrypted);
}

class BackupService final : public v1::Backups::Service {
 public:
  explicit BackupService(BackupJobs& jobs) : jobs_(jobs) {}

  grpc::Status CreateBackup(grpc::ServerContext*, const v1::CreateBackupRequest* req,
                            v1::BackupJobResponse* resp) override {
    backup::BackupRequest r;
    r.target = FromProto(req->target());
    r.name = req->name();
    r.snapshot = req->snapshot();
    r.volume = req->volume();
    r.bandwidth_bytes_per_s = req->bandwidth_bytes_per_s();
    auto j = jobs_.StartBackup(r);
    if (!j.ok()) return Fail("CreateBackup", j.status());
    Fill(*j, resp->mutable_job());
    return grpc::Status::OK;
  }

  grpc::Status RestoreBackup(grpc::ServerContext*, const v1::RestoreBackupRequest* req,
                             v1::BackupJobResponse* resp) override {
    auto j = jobs_.StartRestore({FromProto(req->target()), req->name(), req->volume()});
    if (!j.ok()) return Fail("RestoreBackup", j.status());
    Fill(*j, resp->mutable_job());
    return grpc::Status::OK;
  }

  grpc::Status CopyVolume(grpc::ServerContext*, const v1::CopyVolumeRequest* req,
                          v1::BackupJobResponse* resp) override {
    backup::CopyRequest r;
    r.volume = req->volume();
    r.size = req->size_bytes();
    r.endpoint = req->endpoint();
    r.export_name = req->export_name();
    r.source_node = req->source_node();
    auto j = jobs_.StartCopy(r);
    if (!j.ok()) return Fail("CopyVolume", j.status());
    Fill(*j, resp->mutable_job());
    return grpc::Status::OK;
  }

  grpc::Status GetBackupJob(grpc::ServerContext*, const v1::GetBackupJobRequest* req,
                            v1::BackupJobResponse* resp) override {
    auto j = jobs_.Get(req->id());
    if (!j.ok()) return ToGrpc(j.status());  // polled: not worth a log line each time
    Fill(*j, resp->mutable_job());
    return grpc::Status::OK;
  }

  grpc::Status ListBackupJobs(grpc::ServerContext*, const v1::ListBackupJobsRequest*,
                              v1::ListBackupJobsResponse* resp) override {
    for (const JobInfo& j : jobs_.List()) Fill(j, resp->add_jobs());
    return grpc::Status::OK;
  }

  grpc::Status ListBackups(grpc::ServerContext*, const v1::ListBackupsRequest* req,
                           v1::ListBackupsResponse* resp) override {
    auto l = jobs_.ListBackups(FromProto(req->target()));
    if (!l.ok()) return Fail("ListBackups", l.status());
    for (const Manifest& m : *l) Fill(m, resp->add_backups());
    return grpc::Status::OK;
  }

  grpc::Status GetBackup(grpc::ServerContext*, const v1::GetBackupRequest* req,
                         v1::GetBackupResponse* resp) override {
    const Target t = FromProto(req->target());
    auto running = jobs_.RunningBackup(t.url, req->name());
    if (running.ok()) Fill(*running, resp->mutable_job());
    auto m = jobs_.Inspect(t, req->name());
    if (m.ok()) {
      Fill(*m, resp->mutable_backup());
    } else if (!(running.ok() && m.status().code() == ENOENT)) {
      return Fail("GetBackup", m.status());
    }
    return grpc::Status::OK;
  }

  grpc::Status DeleteBackup(grpc::ServerContext*, const v1::DeleteBackupRequest* req,
                            v1::DeleteBackupResponse* resp) override {
    auto gc = jobs_.Delete(FromProto(req->target()), req->name());
    if (!gc.ok()) return Fail("DeleteBackup", gc.status());
    spdlog::info("api DeleteBackup: \"{}\" in {} deleted; gc {}: {} chunks ({} bytes) freed",
                 req->name(), req->target().url(), gc->deferred ? "deferred" : "ran",
                 gc->chunks_deleted, gc->bytes_freed);
    resp->set_gc_deferred(gc->deferred);
    resp->set_chunks_deleted(gc->chunks_deleted);
    resp->set_bytes_freed(gc->bytes_freed);
    resp->set_chunks_kept(gc->chunks_kept);
    return grpc::Status::OK;
  }

 private:
  BackupJobs& jobs_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeBackupService(backup::BackupJobs& jobs) {
  return std::make_unique<BackupService>(jobs);
}

}  // namespace nbdcsi::datapath
