#include "datapath/api/logging_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "common/grpc_status.h"
#include "datapath/api/logging.grpc.pb.h"

namespace nbdcsi::datapath {
namespace {

namespace v1 = ::nbdcsi::datapath::v1;

void Fill(const LogLevelControl::State& s, v1::LogLevelResponse* out) {
  out->set_level(LogLevelName(s.level));
  if (s.revert_to) {
    out->set_revert_to(LogLevelName(*s.revert_to));
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        s.revert_at - LogLevelControl::Clock::now());
    out->set_revert_in_ms(static_cast<uint64_t>(std::max<int64_t>(0, left.count())));
  }
}

class LoggingService final : public v1::Logging::Service {
 public:
  explicit LoggingService(LogLevelControl& control) : control_(control) {}

  grpc::Status GetLogLevel(grpc::ServerContext*, const v1::GetLogLevelRequest*,
                           v1::LogLevelResponse* resp) override {
    Fill(control_.Get(), resp);
    return grpc::Status::OK;
  }

  grpc::Status SetLogLevel(grpc::ServerContext*, const v1::SetLogLevelRequest* req,
                           v1::LogLevelResponse* resp) override {
    auto level = ParseLogLevel(req->level());
    if (!level.ok()) return Fail(level.status());
    // Beyond int64 milliseconds is far beyond the week CheckLogLevelDuration allows anyway.
    const uint64_t ms = std::min<uint64_t>(req->duration_ms(), INT64_MAX);
    auto change =
        control_.Set(*level, std::chrono::milliseconds(static_cast<int64_t>(ms)), "management API");
    if (!change.ok()) return Fail(change.status());
    resp->set_previous(LogLevelName(change->previous));
    Fill(change->now, resp);
    return grpc::Status::OK;
  }

 private:
  static grpc::Status Fail(const Status& s) {
    spdlog::warn("api SetLogLevel: {}", s.message());
    return ToGrpc(s);
  }

  LogLevelControl& control_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeLoggingService(LogLevelControl& control) {
  return std::make_unique<LoggingService>(control);
}

}  // namespace nbdcsi::datapath
