// Names and ids can never reach outside the pool: every way in (the Datapath API over its unix
// socket, the Attachments API, nbdctl, and CSI ids and names through nbd-csi-controller) tries
// "../", absolute paths, '/', NUL, control bytes, overlong names and hidden names; and names whose
// data file in the pool is a planted symlink to a file outside. Every try is refused (or, for CSI
// names, mapped to a safe pool name), no file appears outside the pool directory, and the symlinks'
// targets are never written.
//
// Every hostile name carries the marker "esc4pe", so whatever such a name created, anywhere under
// the test's directory or in /tmp, is found.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "test/controller/cluster.h"

namespace nbdcsi::test {
namespace {

namespace v1 = ::csi::v1;
namespace dpv1 = ::nbdcsi::datapath::v1;
namespace fs = std::filesystem;
using grpc::StatusCode;

constexpr char kMarker[] = "esc4pe";

std::vector<std::string> HostileNames() {
  return {
      "../esc4pe",
      "../../esc4pe",
      "../../../../../../../../tmp/esc4pe-up",
      "/tmp/esc4pe-abs",
      "sub/esc4pe",
      "..",
      ".",
      ".esc4pe",
      "-esc4pe",
      std::string("esc4pe\0/../../x", 15),
      "esc4pe\n",
      "esc4pe x",
      "esc4pe%2f..%2fx",
      std::string("esc4pe") + std::string(200, 'a'),
      std::string("esc4pe") + std::string(5000, '/'),
      "",
  };
}

// A Kubernetes node name (csi/ids.h ValidateNodeId), restated here: this test talks to the
// daemons only.
bool IsNodeName(const std::string& s) {
  auto alnum = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
  if (s.empty() || s.size() > 253 || !alnum(s.front()) || !alnum(s.back())) return false;
  return std::all_of(s.begin(), s.end(), [&](char c) { return alnum(c) || c == '.' || c == '-'; });
}

std::string Printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s.substr(0, 40)) {
    out +=
        (c >= 0x20 && c < 0x7f) ? std::string(1, static_cast<char>(c)) : "\\x" + std::to_string(c);
  }
  return out + (s.size() > 40 ? "..." : "");
}

// Every path under `dir` (and at /tmp's top level) whose name holds the marker.
std::vector<std::string> MarkedPaths(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e :
       fs::recursive_directory_iterator(dir, fs::directory_options::skip_permission_denied)) {
    if (e.path().filename().string().find(kMarker) != std::string::npos) {
      out.push_back(e.path().string());
    }
  }
  for (const auto& e : fs::directory_iterator("/tmp")) {
    if (e.path().filename().string().find(kMarker) != std::string::npos) {
      out.push_back(e.path().string());
    }
  }
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class PoolEscapeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ClusterOptions o;
    o.nodes = {"node-a"};
    c_ = std::make_unique<Cluster>(o);
    ASSERT_EQ(c_->Start(), "");
    pool_ = c_->dir() + "/pool-node-a";
    dp_ = &c_->datapath("node-a");
    attach_ = dpv1::Attachments::NewStub(grpc::CreateChannel(
        "unix://" + c_->dir() + "/node-a-api.sock", grpc::InsecureChannelCredentials()));
    dpv1::CreateVolumeRequest req;
    req.set_name("legit");
    req.set_size_bytes(1 << 20);
    dpv1::CreateVolumeResponse resp;
    ASSERT_TRUE(dp_->CreateVolume(Ctx().get(), req, &resp).ok());
    dpv1::CreateSnapshotRequest sreq;
    sreq.set_name("legit-snap");
    sreq.set_source_volume("legit");
    dpv1::CreateSnapshotResponse sresp;
    ASSERT_TRUE(dp_->CreateSnapshot(Ctx().get(), sreq, &sresp).ok());
  }
  void TearDown() override {
    if (c_) {
      auto marked = MarkedPaths(c_->dir());
      EXPECT_TRUE(marked.empty()) << marked.front();
    }
  }

  std::unique_ptr<Cluster> c_;
  std::string pool_;
  dpv1::Datapath::Stub* dp_ = nullptr;
  std::unique_ptr<dpv1::Attachments::Stub> attach_;
};

TEST_F(PoolEscapeTest, DatapathApiRefusesEveryHostileName) {
  for (const std::string& name : HostileNames()) {
    SCOPED_TRACE(Printable(name));
    auto expect_invalid = [&](const grpc::Status& st, const char* call) {
      EXPECT_EQ(st.error_code(), StatusCode::INVALID_ARGUMENT)
          << call << ": " << st.error_message();
    };
    {
      dpv1::CreateVolumeRequest r;
      r.set_name(name);
      r.set_size_bytes(1 << 20);
      dpv1::CreateVolumeResponse resp;
      expect_invalid(dp_->CreateVolume(Ctx().get(), r, &resp), "CreateVolume");
      r.set_name("clone-ok-name");
      r.mutable_source()->set_volume(name);
      expect_invalid(dp_->CreateVolume(Ctx().get(), r, &resp), "CreateVolume from volume");
      r.mutable_source()->set_snapshot(name);
      expect_invalid(dp_->CreateVolume(Ctx().get(), r, &resp), "CreateVolume from snapshot");
    }
    {
      dpv1::CreateSnapshotRequest r;
      r.set_name(name);
      r.set_source_volume("legit");
      dpv1::CreateSnapshotResponse resp;
      expect_invalid(dp_->CreateSnapshot(Ctx().get(), r, &resp), "CreateSnapshot");
      r.set_name("snap-ok-name");
      r.set_source_volume(name);
      expect_invalid(dp_->CreateSnapshot(Ctx().get(), r, &resp), "CreateSnapshot of");
    }
    {
      dpv1::ResizeVolumeRequest r;
      r.set_name(name);
      r.set_size_bytes(2 << 20);
      dpv1::ResizeVolumeResponse resp;
      expect_invalid(dp_->ResizeVolume(Ctx().get(), r, &resp), "ResizeVolume");
      dpv1::GetVolumeRequest g;
      g.set_name(name);
      dpv1::GetVolumeResponse gresp;
      expect_invalid(dp_->GetVolume(Ctx().get(), g, &gresp), "GetVolume");
      dpv1::DeleteVolumeRequest d;
      d.set_name(name);
      dpv1::DeleteVolumeResponse dresp;
      expect_invalid(dp_->DeleteVolume(Ctx().get(), d, &dresp), "DeleteVolume");
    }
    {
      dpv1::AttachVolumeRequest r;
      r.set_volume(name);
      dpv1::AttachVolumeResponse resp;
      grpc::Status st = attach_->AttachVolume(Ctx().get(), r, &resp);
      EXPECT_FALSE(st.ok()) << "AttachVolume";
      EXPECT_NE(st.error_code(), StatusCode::UNAVAILABLE) << st.error_message();
    }
  }
  dpv1::ListVolumesResponse list;
  ASSERT_TRUE(dp_->ListVolumes(Ctx().get(), {}, &list).ok());
  ASSERT_EQ(list.volumes_size(), 1);
  EXPECT_EQ(list.volumes(0).name(), "legit");
}

TEST_F(PoolEscapeTest, NbdctlRefusesEveryHostileName) {
  for (const std::string& name : HostileNames()) {
    // argv cannot carry NUL; everything else goes as given.
    if (name.find('\0') != std::string::npos || name.empty() || name.size() > 1000) continue;
    SCOPED_TRACE(Printable(name));
    for (const std::vector<std::string>& args :
         std::vector<std::vector<std::string>>{{"volume", "create", name, "--size", "1Mi"},
                                               {"volume", "create", "x-ok", "--from-volume", name},
                                               {"volume", "resize", name, "--size", "2Mi"},
                                               {"volume", "delete", name},
                                               {"snapshot", "create", name, "--volume", "legit"},
                                               {"snapshot", "create", "s-ok", "--volume", name},
                                               {"attach", name}}) {
      bool ok = true;
      std::string out = c_->Nbdctl("node-a", args, &ok);
      EXPECT_FALSE(ok) << args[0] << " " << args[1] << ": " << out;
    }
  }
  EXPECT_NE(ReadFile(c_->dir() + "/nbdctl.log").find("invalid"), std::string::npos);
}

// A pool data file name that is a symlink to a file outside (left there by anything): creating that
// volume or snapshot through the API never writes through the link.
TEST_F(PoolEscapeTest, PlantedSymlinksAreNeverWrittenThrough) {
  const std::string outside = c_->dir() + "/outside";
  fs::create_directories(outside);
  const std::string victim = outside + "/victim.img", victim2 = outside + "/victim2.img";
  std::ofstream(victim) << "precious";
  std::ofstream(victim2) << "precious too";
  fs::create_symlink(victim, pool_ + "/volumes/trick.img");
  fs::create_symlink(victim2, pool_ + "/snapshots/strick.img");
  // The temp names the pool writes first, too.
  fs::create_symlink(victim, pool_ + "/volumes/.trick2.img.tmp");

  for (const char* name : {"trick", "trick2"}) {
    dpv1::CreateVolumeRequest r;
    r.set_name(name);
    r.set_size_bytes(1 << 20);
    dpv1::CreateVolumeResponse resp;
    grpc::Status st = dp_->CreateVolume(Ctx().get(), r, &resp);
    if (st.ok()) {
      // Made, then only as a file of its own in the pool.
      EXPECT_FALSE(fs::is_symlink(pool_ + "/volumes/" + name + ".img")) << name;
    }
  }
  dpv1::CreateSnapshotRequest s;
  s.set_name("strick");
  s.set_source_volume("legit");
  dpv1::CreateSnapshotResponse sresp;
  grpc::Status st = dp_->CreateSnapshot(Ctx().get(), s, &sresp);
  if (st.ok()) {
    EXPECT_FALSE(fs::is_symlink(pool_ + "/snapshots/strick.img"));
  }
  dpv1::CreateVolumeRequest clone;
  clone.set_name("trick");
  clone.mutable_source()->set_snapshot("legit-snap");
  dpv1::CreateVolumeResponse cresp;
  (void)dp_->CreateVolume(Ctx().get(), clone, &cresp);

  EXPECT_EQ(ReadFile(victim), "precious");
  EXPECT_EQ(ReadFile(victim2), "precious too");
  EXPECT_EQ(fs::file_size(victim), 8u);
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(outside)) out.insert(e.path().filename().string());
  EXPECT_EQ(out, (std::set<std::string>{"victim.img", "victim2.img"}));
}

// Through nbd-csi-controller: a CSI name is mapped to a pool name only when it fits the pool's
// rules (otherwise a hash), and a volume or snapshot id carries a pool name that is validated
// before any call reaches the datapath.
TEST_F(PoolEscapeTest, CsiNamesAndIdsStayInThePool) {
  for (const std::string& name : HostileNames()) {
    if (name.empty()) continue;
    SCOPED_TRACE(Printable(name));
    auto req = VolumeRequest(name, 1 << 20);
    v1::CreateVolumeResponse resp;
    grpc::Status st = c_->controller().CreateVolume(Ctx().get(), req, &resp);
    if (st.ok()) {
      // Accepted as a hashed pool name, inside the pool.
      EXPECT_EQ(resp.volume().volume_id().find(kMarker), std::string::npos)
          << resp.volume().volume_id();
      v1::CreateSnapshotRequest sreq;
      sreq.set_name(name);
      sreq.set_source_volume_id(resp.volume().volume_id());
      v1::CreateSnapshotResponse sresp;
      grpc::Status ss = c_->controller().CreateSnapshot(Ctx().get(), sreq, &sresp);
      if (ss.ok()) {
        EXPECT_EQ(sresp.snapshot().snapshot_id().find(kMarker), std::string::npos);
      }
    } else {
      EXPECT_EQ(st.error_code(), StatusCode::INVALID_ARGUMENT) << st.error_message();
    }
    for (const std::string& id : {"v1:node-a:" + name, "v1:" + name + ":legit"}) {
      SCOPED_TRACE(Printable(id));
      // A well-formed id of a node nobody registered (the long lower-case name is a valid node
      // name) is UNAVAILABLE: the controller cannot tell whether that node holds the volume.
      const bool unknown_node = id.starts_with("v1:" + name + ":") && IsNodeName(name);
      v1::DeleteVolumeRequest d;
      d.set_volume_id(id);
      v1::DeleteVolumeResponse dresp;
      grpc::Status ds = c_->controller().DeleteVolume(Ctx().get(), d, &dresp);
      // DeleteVolume of an id that names nothing succeeds (CSI); anything else is refused.
      if (unknown_node) {
        EXPECT_EQ(ds.error_code(), StatusCode::UNAVAILABLE) << ds.error_message();
      } else {
        EXPECT_TRUE(ds.ok() || ds.error_code() == StatusCode::INVALID_ARGUMENT)
            << ds.error_message();
      }
      v1::ControllerExpandVolumeRequest e;
      e.set_volume_id(id);
      e.mutable_capacity_range()->set_required_bytes(2 << 20);
      v1::ControllerExpandVolumeResponse eresp;
      grpc::Status es = c_->controller().ControllerExpandVolume(Ctx().get(), e, &eresp);
      if (unknown_node) {
        EXPECT_EQ(es.error_code(), StatusCode::UNAVAILABLE) << es.error_message();
      } else {
        EXPECT_TRUE(es.error_code() == StatusCode::NOT_FOUND ||
                    es.error_code() == StatusCode::INVALID_ARGUMENT)
            << es.error_message();
      }
    }
    v1::DeleteSnapshotRequest ds;
    ds.set_snapshot_id("s1:node-a:" + name);
    v1::DeleteSnapshotResponse dsresp;
    grpc::Status dst = c_->controller().DeleteSnapshot(Ctx().get(), ds, &dsresp);
    EXPECT_TRUE(dst.ok() || dst.error_code() == StatusCode::INVALID_ARGUMENT)
        << dst.error_message();
  }
  // legit and its snapshot survived every delete above.
  dpv1::GetVolumeRequest g;
  g.set_name("legit");
  dpv1::GetVolumeResponse gresp;
  EXPECT_TRUE(dp_->GetVolume(Ctx().get(), g, &gresp).ok());
}

}  // namespace
}  // namespace nbdcsi::test
