// RedactedText over CSI messages, and the interceptor's log lines during real calls.
#include "csi/logging.h"

#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <regex>
#include <sstream>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "csi/csi.grpc.pb.h"
#include "csi/identity.h"
#include "csi/server.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::csi {
namespace {

namespace v1 = ::csi::v1;

// Unique enough that finding it anywhere in the output can only mean a leak.
constexpr char kMarker[] = "SECRET-VALUE-7f3a9c1e";
constexpr char kKeyMarker[] = "secret-key-name-d41d8c";

TEST(RedactedText, CreateVolumeSecrets) {
  v1::CreateVolumeRequest req;
  req.set_name("pvc-1");
  req.mutable_capacity_range()->set_required_bytes(1 << 30);
  (*req.mutable_parameters())["maxIops"] = "100";
  (*req.mutable_secrets())[kKeyMarker] = kMarker;
  (*req.mutable_secrets())["password"] = kMarker;
  auto* cap = req.add_volume_capabilities();
  cap->mutable_mount()->set_fs_type("ext4");
  cap->mutable_access_mode()->set_mode(v1::VolumeCapability::AccessMode::SINGLE_NODE_WRITER);
  const std::string text = RedactedText(req);
  EXPECT_EQ(text.find(kMarker), std::string::npos) << text;
  EXPECT_EQ(text.find(kKeyMarker), std::string::npos) << text;
  EXPECT_EQ(text,
            "{name: \"pvc-1\", capacity_range: {required_bytes: 1073741824}, "
            "volume_capabilities: [{mount: {fs_type: \"ext4\"}, access_mode: {mode: "
            "SINGLE_NODE_WRITER}}], parameters: {\"maxIops\": \"100\"}, secrets: ***stripped***}");
}

TEST(RedactedText, NodeStageSecrets) {
  v1::NodeStageVolumeRequest req;
  req.set_volume_id("v1:node:pvc-1");
  req.set_staging_target_path("/var/lib/kubelet/staging");
  (*req.mutable_secrets())["token"] = kMarker;
  (*req.mutable_volume_context())["k"] = "v";
  const std::string text = RedactedText(req);
  EXPECT_EQ(text.find(kMarker), std::string::npos) << text;
  EXPECT_NE(text.find("secrets: ***stripped***"), std::string::npos) << text;
  EXPECT_NE(text.find("volume_context: {\"k\": \"v\"}"), std::string::npos) << text;
  EXPECT_NE(text.find("\"v1:node:pvc-1\""), std::string::npos) << text;
}

TEST(RedactedText, EverySecretFieldInTheProto) {
  // Walks every message of csi.proto: any field marked csi_secret, set to the marker, must not
  // show. Catches a request type the two hand-written cases above do not cover.
  const auto* file = v1::CreateVolumeRequest::descriptor()->file();
  int secret_fields = 0;
  for (int i = 0; i < file->message_type_count(); ++i) {
    const auto* d = file->message_type(i);
    for (int j = 0; j < d->field_count(); ++j) {
      const auto* f = d->field(j);
      if (!f->options().GetExtension(v1::csi_secret)) continue;
      ++secret_fields;
      std::unique_ptr<google::protobuf::Message> m(
          google::protobuf::MessageFactory::generated_factory()->GetPrototype(d)->New());
      ASSERT_TRUE(f->is_map()) << f->full_name();
      auto* entry = m->GetReflection()->AddMessage(m.get(), f);
      entry->GetReflection()->SetString(entry, f->message_type()->map_key(), kKeyMarker);
      entry->GetReflection()->SetString(entry, f->message_type()->map_value(), kMarker);
      const std::string text = RedactedText(*m);
      EXPECT_EQ(text.find(kMarker), std::string::npos) << f->full_name() << ": " << text;
      EXPECT_EQ(text.find(kKeyMarker), std::string::npos) << f->full_name() << ": " << text;
      EXPECT_NE(text.find("***stripped***"), std::string::npos) << f->full_name();
    }
  }
  // CSI v1.9.0 marks 16 secrets maps; another count means the proto drifted from the spec.
  EXPECT_EQ(secret_fields, 16);
}

TEST(RedactedText, NestedRepeatedAndEscapes) {
  v1::ListSnapshotsResponse resp;
  auto* e = resp.add_entries()->mutable_snapshot();
  e->set_snapshot_id("s1:n:a");
  e->set_ready_to_use(true);
  resp.add_entries()->mutable_snapshot()->set_snapshot_id("line\nbreak\"q\x01");
  EXPECT_EQ(RedactedText(resp),
            "{entries: [{snapshot: {snapshot_id: \"s1:n:a\", ready_to_use: true}}, {snapshot: "
            "{snapshot_id: \"line\\nbreak\\\"q\\x01\"}}]}");
  EXPECT_EQ(RedactedText(v1::ProbeRequest()), "{}");
  v1::ProbeResponse probe;
  probe.mutable_ready()->set_value(false);
  EXPECT_EQ(RedactedText(probe), "{ready: {}}");  // false is proto3's default: not set
}

// A Controller whose CreateVolume fails, to see both the request and an error in the log.
class FakeController final : public v1::Controller::Service {
 public:
  grpc::Status CreateVolume(grpc::ServerContext*, const v1::CreateVolumeRequest* req,
                            v1::CreateVolumeResponse*) override {
    seen_id = CurrentRequestId();
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "no node for " + req->name());
  }
  std::string seen_id;
};

class LogCapture {
 public:
  LogCapture() {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    auto logger = std::make_shared<spdlog::logger>("capture", sink);
    logger->set_level(spdlog::level::debug);
    logger->set_pattern("%l %v");
    old_ = spdlog::default_logger();
    spdlog::set_default_logger(logger);
  }
  ~LogCapture() { spdlog::set_default_logger(old_); }
  std::string text() const { return out_.str(); }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> old_;
};

TEST(LoggingInterceptor, RealCallNeverLogsSecrets) {
  LogCapture capture;
  test::TempDir dir("csi-log");
  ASSERT_TRUE(dir.ok()) << dir.error();
  FakeController controller;
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer({.endpoint = "unix://" + dir.path() + "/csi.sock",
                             .services = {identity.get(), &controller}});
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  auto channel = grpc::CreateChannel((*srv)->endpoint().GrpcTarget(),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::Controller::NewStub(channel);

  v1::CreateVolumeRequest req;
  req.set_name("pvc-logged");
  (*req.mutable_secrets())["password"] = kMarker;
  v1::CreateVolumeResponse resp;
  grpc::ClientContext ctx;
  grpc::Status s = stub->CreateVolume(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);

  auto id_stub = v1::Identity::NewStub(channel);
  grpc::ClientContext ctx2;
  v1::ProbeResponse probe;
  ASSERT_TRUE(id_stub->Probe(&ctx2, {}, &probe).ok());
  (*srv)->Shutdown();
  (*srv)->Wait();

  const std::string log = capture.text();
  EXPECT_EQ(log.find(kMarker), std::string::npos) << log;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      log, m,
      std::regex(R"(info \[(r-\d{6})\] /csi\.v1\.Controller/CreateVolume <- \{name: "pvc-logged", secrets: \*\*\*stripped\*\*\*\})")))
      << log;
  const std::string id = m[1];
  EXPECT_EQ(controller.seen_id, id) << "CurrentRequestId() inside the handler";
  EXPECT_TRUE(std::regex_search(
      log, std::regex("info \\[" + id + "\\] -> NOT_FOUND: no node for pvc-logged \\([0-9.]+ ms\\)")))
      << log;
  // Probe is a polling call: debug, and a request id of its own.
  ASSERT_TRUE(std::regex_search(log, m,
                                std::regex(R"(debug \[(r-\d{6})\] /csi\.v1\.Identity/Probe <- \{\})")))
      << log;
  EXPECT_NE(m[1], id);
  EXPECT_TRUE(std::regex_search(log, std::regex("debug \\[" + std::string(m[1]) +
                                                "\\] -> OK [0-9.]+ ms")))
      << log;
  EXPECT_EQ(CurrentRequestId(), "") << "outside a call";
}

}  // namespace
}  // namespace nbdcsi::csi
