// `nbdctl csi` end to end: the real nbdctl binary ($NBDCSI_BIN/nbdctl) against an in-test CSI
// server (StartCsiServer + the real Identity + small fake Controller and Node services).
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "csi/csi.grpc.pb.h"
#include "csi/driver.h"
#include "csi/identity.h"
#include "csi/server.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::csi {
namespace {

namespace v1 = ::csi::v1;
using nlohmann::json;

class FakeController final : public v1::Controller::Service {
 public:
  grpc::Status CreateVolume(grpc::ServerContext*, const v1::CreateVolumeRequest* req,
                            v1::CreateVolumeResponse* resp) override {
    std::lock_guard lock(mu);
    create = *req;
    auto* v = resp->mutable_volume();
    v->set_volume_id("v1:n1:" + req->name());
    v->set_capacity_bytes(req->capacity_range().required_bytes());
    (*(v->add_accessible_topology()->mutable_segments()))[kTopologyKey] = "n1";
    (*v->mutable_volume_context())["maxIops"] = "100";
    return grpc::Status::OK;
  }
  grpc::Status DeleteVolume(grpc::ServerContext*, const v1::DeleteVolumeRequest* req,
                            v1::DeleteVolumeResponse*) override {
    if (req->volume_id() == "v1:n1:busy") {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "volume busy is attached");
    }
    return grpc::Status::OK;
  }
  grpc::Status ListVolumes(grpc::ServerContext*, const v1::ListVolumesRequest* req,
                           v1::ListVolumesResponse* resp) override {
    {
      std::lock_guard lock(mu);
      list = *req;
    }
    auto* e = resp->add_entries();
    e->mutable_volume()->set_volume_id("v1:n1:a");
    e->mutable_volume()->set_capacity_bytes(1 << 30);
    (*e->mutable_volume()->add_accessible_topology()->mutable_segments())[kTopologyKey] = "n1";
    e->mutable_status()->add_published_node_ids("n1");
    auto* f = resp->add_entries();
    f->mutable_volume()->set_volume_id("v1:n2:b");
    f->mutable_volume()->set_capacity_bytes(3 << 20);
    f->mutable_status()->mutable_volume_condition()->set_abnormal(true);
    f->mutable_status()->mutable_volume_condition()->set_message("datapath n2 is gone");
    resp->set_next_token("2");
    return grpc::Status::OK;
  }
  grpc::Status ControllerGetCapabilities(grpc::ServerContext*,
                                         const v1::ControllerGetCapabilitiesRequest*,
                                         v1::ControllerGetCapabilitiesResponse* resp) override {
    for (auto t : {v1::ControllerServiceCapability::RPC::CREATE_DELETE_VOLUME,
                   v1::ControllerServiceCapability::RPC::MODIFY_VOLUME}) {
      resp->add_capabilities()->mutable_rpc()->set_type(t);
    }
    return grpc::Status::OK;
  }
  grpc::Status ListSnapshots(grpc::ServerContext*, const v1::ListSnapshotsRequest* req,
                             v1::ListSnapshotsResponse* resp) override {
    auto* s = resp->add_entries()->mutable_snapshot();
    s->set_snapshot_id("s1:n1:snap");
    s->set_source_volume_id(req->source_volume_id());
    s->set_size_bytes(1 << 30);
    s->set_ready_to_use(true);
    s->mutable_creation_time()->set_seconds(1700000000);
    return grpc::Status::OK;
  }
  grpc::Status ControllerModifyVolume(grpc::ServerContext*,
                                      const v1::ControllerModifyVolumeRequest* req,
                                      v1::ControllerModifyVolumeResponse*) override {
    std::lock_guard lock(mu);
    modify = *req;
    return grpc::Status::OK;
  }

  std::mutex mu;
  v1::CreateVolumeRequest create;
  v1::ListVolumesRequest list;
  v1::ControllerModifyVolumeRequest modify;
};

class FakeNode final : public v1::Node::Service {
 public:
  grpc::Status NodeStageVolume(grpc::ServerContext*, const v1::NodeStageVolumeRequest* req,
                               v1::NodeStageVolumeResponse*) override {
    std::lock_guard lock(mu);
    stage = *req;
    return grpc::Status::OK;
  }
  grpc::Status NodeGetInfo(grpc::ServerContext*, const v1::NodeGetInfoRequest*,
                           v1::NodeGetInfoResponse* resp) override {
    resp->set_node_id("n1");
    resp->set_max_volumes_per_node(16);
    (*resp->mutable_accessible_topology()->mutable_segments())[kTopologyKey] = "n1";
    return grpc::Status::OK;
  }
  grpc::Status NodeGetVolumeStats(grpc::ServerContext*, const v1::NodeGetVolumeStatsRequest*,
                                  v1::NodeGetVolumeStatsResponse* resp) override {
    auto* u = resp->add_usage();
    u->set_unit(v1::VolumeUsage::BYTES);
    u->set_total(1 << 30);
    u->set_used(1 << 20);
    u->set_available((1 << 30) - (1 << 20));
    auto* i = resp->add_usage();
    i->set_unit(v1::VolumeUsage::INODES);
    i->set_total(65536);
    i->set_used(11);
    i->set_available(65525);
    return grpc::Status::OK;
  }
  std::mutex mu;
  v1::NodeStageVolumeRequest stage;
};

struct Result {
  int code = -1;
  std::string out, err;
};

class NbdctlCsiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* bin = std::getenv("NBDCSI_BIN");
    if (!bin) GTEST_SKIP() << "NBDCSI_BIN is not set (run through ctest)";
    nbdctl_ = std::string(bin) + "/nbdctl";
    ASSERT_TRUE(std::filesystem::exists(nbdctl_)) << nbdctl_;
    ASSERT_TRUE(tmp_.Create("nbdctl-csi")) << tmp_.error();
    dir_ = tmp_.path();
    endpoint_ = "unix://" + dir_ + "/csi.sock";
    identity_ = MakeIdentityService({.ready = [this]() -> Status {
      if (ready_) return Status::Ok();
      return Error(EAGAIN, "no datapath registered");
    }});
    auto srv = StartCsiServer(
        {.endpoint = endpoint_, .services = {identity_.get(), &controller_, &node_}});
    ASSERT_TRUE(srv.ok()) << srv.status().message();
    server_ = std::move(*srv);
  }
  void TearDown() override {
    server_.reset();
    tmp_.Remove();
  }

  // Runs nbdctl with `args`, stdout and stderr to files (no pipes to drain, no deadlock).
  Result Run(std::vector<std::string> args) {
    args.insert(args.begin(), nbdctl_);
    const std::string out = dir_ + "/out", err = dir_ + "/err";
    pid_t pid = fork();
    if (pid == 0) {
      int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      dup2(o, 1);
      dup2(e, 2);
      unsetenv("CSI_ENDPOINT");
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    Result r;
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    auto slurp = [](const std::string& p) {
      std::ifstream f(p);
      std::stringstream ss;
      ss << f.rdbuf();
      return ss.str();
    };
    r.out = slurp(out);
    r.err = slurp(err);
    return r;
  }
  Result Csi(std::vector<std::string> args) {
    args.insert(args.begin(), {"csi", "--endpoint", endpoint_});
    return Run(std::move(args));
  }
  static json Json(const Result& r) {
    try {
      return json::parse(r.out);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not JSON: " << r.out << " (" << e.what() << ")";
      return {};
    }
  }

  test::TempDir tmp_;
  std::string nbdctl_, dir_, endpoint_;
  bool ready_ = true;
  std::unique_ptr<v1::Identity::Service> identity_;
  FakeController controller_;
  FakeNode node_;
  std::unique_ptr<CsiServer> server_;
};

TEST_F(NbdctlCsiTest, IdentityInfo) {
  Result r = Csi({"identity", "info"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "Name:     nbd.csi.io\nVersion:  " + DriverVersion() + "\n");
  // -o as a global option before `csi`, and after the command.
  for (auto args :
       {std::vector<std::string>{"-o", "json", "csi", "--endpoint", endpoint_, "identity", "info"},
        std::vector<std::string>{"csi", "identity", "info", "--endpoint", endpoint_, "-o",
                                 "json"}}) {
    r = Run(args);
    ASSERT_EQ(r.code, 0) << r.err;
    json j = Json(r);
    EXPECT_EQ(j["name"], "nbd.csi.io");
    EXPECT_EQ(j["vendor_version"], DriverVersion());
    EXPECT_TRUE(j["manifest"].is_object());
  }
}

TEST_F(NbdctlCsiTest, ProbeAndCapabilities) {
  Result r = Csi({"identity", "probe"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "Ready:  yes\n");
  ready_ = false;
  r = Csi({"identity", "probe", "-o", "json"});
  EXPECT_EQ(r.code, 1) << "not ready: exit 1";
  EXPECT_EQ(Json(r), json({{"ready", false}}));

  r = Csi({"identity", "capabilities", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Json(r)["capabilities"], json({"CONTROLLER_SERVICE", "VOLUME_ACCESSIBILITY_CONSTRAINTS",
                                           "VOLUME_EXPANSION_ONLINE"}));
  r = Csi({"controller", "capabilities"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "CAPABILITY\nCREATE_DELETE_VOLUME\nMODIFY_VOLUME\n");
}

TEST_F(NbdctlCsiTest, CreateVolume) {
  Result r = Csi({"controller", "create-volume", "pvc-1", "--size", "1Gi", "--param", "maxIops=100",
                  "--param", "maxBps=10Mi", "--topology", "topology.nbd.csi.io/node=n1",
                  "--fs-type", "xfs", "--mount-flag", "noatime", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  json j = Json(r);
  EXPECT_EQ(j["volume_id"], "v1:n1:pvc-1");
  EXPECT_EQ(j["capacity_bytes"], 1 << 30);
  EXPECT_EQ(j["volume_context"], json({{"maxIops", "100"}}));
  EXPECT_EQ(j["accessible_topology"], json::array({{{"topology.nbd.csi.io/node", "n1"}}}));
  EXPECT_TRUE(j["content_source"].is_null());
  {
    std::lock_guard lock(controller_.mu);
    const auto& req = controller_.create;
    EXPECT_EQ(req.name(), "pvc-1");
    EXPECT_EQ(req.capacity_range().required_bytes(), 1 << 30);
    EXPECT_EQ(req.parameters().at("maxIops"), "100");
    EXPECT_EQ(req.parameters().at("maxBps"), "10Mi");
    ASSERT_EQ(req.accessibility_requirements().requisite_size(), 1);
    EXPECT_EQ(req.accessibility_requirements().requisite(0).segments().at(kTopologyKey), "n1");
    ASSERT_EQ(req.volume_capabilities_size(), 1);
    EXPECT_EQ(req.volume_capabilities(0).mount().fs_type(), "xfs");
    EXPECT_EQ(req.volume_capabilities(0).mount().mount_flags(0), "noatime");
    EXPECT_EQ(req.volume_capabilities(0).access_mode().mode(),
              v1::VolumeCapability::AccessMode::SINGLE_NODE_WRITER);
  }

  r = Csi({"controller", "create-volume", "pvc-2", "--size", "2Mi", "--block", "--access-mode",
           "single-node-single-writer", "--from-snapshot", "s1:n1:snap"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "Volume ID:  v1:n1:pvc-2\n"
            "Capacity:   2Mi\n"
            "Context:    maxIops=100\n"
            "Topology:   topology.nbd.csi.io/node=n1\n"
            "Source:     -\n");
  std::lock_guard lock(controller_.mu);
  EXPECT_TRUE(controller_.create.volume_capabilities(0).has_block());
  EXPECT_EQ(controller_.create.volume_capabilities(0).access_mode().mode(),
            v1::VolumeCapability::AccessMode::SINGLE_NODE_SINGLE_WRITER);
  EXPECT_EQ(controller_.create.volume_content_source().snapshot().snapshot_id(), "s1:n1:snap");
}

TEST_F(NbdctlCsiTest, ListVolumes) {
  Result r = Csi({"controller", "list-volumes", "--max", "2", "--token", "0"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "VOLUME ID  CAPACITY  TOPOLOGY                     PUBLISHED ON  CONDITION\n"
            "v1:n1:a    1Gi       topology.nbd.csi.io/node=n1  n1            -\n"
            "v1:n2:b    3Mi       -                            -             abnormal: "
            "datapath n2 is gone\n"
            "NEXT TOKEN: 2\n");
  {
    std::lock_guard lock(controller_.mu);
    EXPECT_EQ(controller_.list.max_entries(), 2);
    EXPECT_EQ(controller_.list.starting_token(), "0");
  }
  r = Csi({"controller", "list-volumes", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  json j = Json(r);
  EXPECT_EQ(j["next_token"], "2");
  ASSERT_EQ(j["volumes"].size(), 2u);
  EXPECT_EQ(j["volumes"][0]["published_node_ids"], json({"n1"}));
  EXPECT_TRUE(j["volumes"][0]["volume_condition"].is_null());
  EXPECT_EQ(j["volumes"][1]["volume_condition"],
            json({{"abnormal", true}, {"message", "datapath n2 is gone"}}));
}

TEST_F(NbdctlCsiTest, SnapshotsAndModify) {
  Result r = Csi({"controller", "snapshot", "list", "--source", "v1:n1:a", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  json j = Json(r);
  ASSERT_EQ(j["snapshots"].size(), 1u);
  EXPECT_EQ(j["snapshots"][0], json({{"snapshot_id", "s1:n1:snap"},
                                     {"source_volume_id", "v1:n1:a"},
                                     {"size_bytes", 1 << 30},
                                     {"ready_to_use", true},
                                     {"creation_time", "2023-11-14T22:13:20Z"}}));
  r = Csi({"controller", "modify", "v1:n1:a", "--param", "maxIops=500", "--param", "burstMs=10"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "volume v1:n1:a modified\n");
  std::lock_guard lock(controller_.mu);
  EXPECT_EQ(controller_.modify.volume_id(), "v1:n1:a");
  EXPECT_EQ(controller_.modify.mutable_parameters().size(), 2u);
  EXPECT_EQ(controller_.modify.mutable_parameters().at("burstMs"), "10");
}

TEST_F(NbdctlCsiTest, Node) {
  Result r = Csi({"node", "info", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Json(r), json({{"node_id", "n1"},
                           {"max_volumes_per_node", 16},
                           {"accessible_topology", {{"topology.nbd.csi.io/node", "n1"}}}}));

  r = Csi({"node", "stage", "v1:n1:a", "--staging-path", "/staging/a", "--fs-type", "ext4",
           "--param", "k=v=w"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "volume v1:n1:a staged at /staging/a\n");
  {
    std::lock_guard lock(node_.mu);
    EXPECT_EQ(node_.stage.volume_id(), "v1:n1:a");
    EXPECT_EQ(node_.stage.staging_target_path(), "/staging/a");
    EXPECT_EQ(node_.stage.volume_capability().mount().fs_type(), "ext4");
    EXPECT_EQ(node_.stage.volume_context().at("k"), "v=w");
  }

  r = Csi({"node", "stats", "v1:n1:a", "--volume-path", "/target/a"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            "UNIT    TOTAL  USED   AVAILABLE\n"
            "BYTES   1 GiB  1 MiB  1023 MiB\n"
            "INODES  65536  11     65525\n");
  r = Csi({"node", "stats", "v1:n1:a", "--volume-path", "/target/a", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  json j = Json(r);
  EXPECT_EQ(j["usage"][1],
            json({{"unit", "INODES"}, {"total", 65536}, {"used", 11}, {"available", 65525}}));
  EXPECT_TRUE(j["volume_condition"].is_null());
}

TEST_F(NbdctlCsiTest, PluginErrorsExitOne) {
  Result r = Csi({"controller", "delete-volume", "v1:n1:busy"});
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err,
            "nbdctl: cannot delete volume v1:n1:busy: FAILED_PRECONDITION: volume busy is "
            "attached\n");
  r = Csi({"controller", "delete-volume", "v1:n1:x", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Json(r), json({{"deleted", "v1:n1:x"}}));
  // The fake Controller does not implement GetCapacity.
  r = Csi({"controller", "capacity"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("UNIMPLEMENTED"), std::string::npos) << r.err;
}

TEST_F(NbdctlCsiTest, UsageErrorsExitTwo) {
  for (auto args : std::vector<std::vector<std::string>>{
           {"controller", "create-volume", "x", "--size", "lots"},
           {"controller", "create-volume", "x", "--size", "1Gi", "--param", "novalue"},
           {"controller", "create-volume", "x", "--param", "a=1", "--param", "a=2"},
           {"controller", "create-volume", "x", "--block", "--fs-type", "xfs"},
           {"controller", "create-volume", "x", "--access-mode", "everyone"},
           {"controller", "create-volume", "x", "--from-snapshot", "s", "--from-volume", "v"},
           {"controller", "expand", "v1:n1:a"},
           {"node", "stage", "v1:n1:a"},
           {"controller"},
       }) {
    Result r = Csi(args);
    EXPECT_EQ(r.code, 2) << args[1] << ": " << r.out << r.err;
    EXPECT_NE(r.err, "") << args[1];
  }
  // --secret-file: an unreadable file or a line that is not KEY=VALUE is a usage error naming it.
  std::ofstream(dir_ + "/bad-secret") << "AWS_ACCESS_KEY_ID=x\n# a comment\nno equals sign\n";
  for (const std::string& file : {dir_ + "/bad-secret", dir_ + "/missing-secret"}) {
    Result r = Csi(
        {"controller", "snapshot", "create", "s", "--source", "v1:n1:a", "--secret-file", file});
    EXPECT_EQ(r.code, 2) << file << ": " << r.out << r.err;
    EXPECT_NE(
        r.err.find(file == dir_ + "/bad-secret" ? "line 3 is not KEY=VALUE" : "cannot read it"),
        std::string::npos)
        << r.err;
  }
  Result r = Run({"csi", "identity", "info"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--endpoint is required"), std::string::npos) << r.err;
  r = Run({"csi", "--endpoint", "/no/scheme.sock", "identity", "info"});
  EXPECT_EQ(r.code, 2) << r.err;
}

TEST_F(NbdctlCsiTest, Unreachable) {
  Result r = Run({"csi", "--endpoint", "unix://" + dir_ + "/missing.sock", "--timeout", "5",
                  "identity", "info"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("cannot reach the CSI plugin at unix://" + dir_ + "/missing.sock"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("does not exist"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace nbdcsi::csi
