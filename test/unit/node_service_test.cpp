// The CSI Node service against the fake OS and the fake datapath: every RPC's first call,
// idempotent retry, bad arguments, and the state it leaves behind.
#include <sys/sysmacros.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include "csi/driver.h"
#include "node/node_service.h"
#include "test/unit/node_fakes.h"

namespace nbdcsi::node {
namespace {

namespace v1 = ::csi::v1;
using ::testing::ElementsAre;
using testing::FakeDatapath;
using testing::FakeOs;
using ::testing::HasSubstr;
using AccessMode = v1::VolumeCapability::AccessMode;

constexpr char kNode[] = "node-a";
constexpr char kVol[] = "v1:node-a:pvc-1";
constexpr char kStaging[] = "/var/lib/kubelet/plugins/kubernetes.io/csi/nbd.csi.io/abc/globalmount";
constexpr char kTarget[] = "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pvc-1/mount";
constexpr char kDevice[] = "/dev/loop3";
constexpr uint64_t kGiB = uint64_t{1} << 30;

v1::VolumeCapability MountCap(const std::string& fs = "",
                              AccessMode::Mode mode = AccessMode::SINGLE_NODE_WRITER) {
  v1::VolumeCapability c;
  c.mutable_mount()->set_fs_type(fs);
  c.mutable_access_mode()->set_mode(mode);
  return c;
}

v1::VolumeCapability BlockCap(AccessMode::Mode mode = AccessMode::SINGLE_NODE_WRITER) {
  v1::VolumeCapability c;
  c.mutable_block();
  c.mutable_access_mode()->set_mode(mode);
  return c;
}

class NodeServiceTest : public ::testing::Test {
 protected:
  NodeServiceTest() : dp_(os_) {
    spdlog::set_level(spdlog::level::warn);  // the warnings say why a call failed
    dp_.AddVolume("pvc-1", kGiB, kDevice, makedev(7, 3));
    dp_.AddVolume("pvc-2", kGiB, "/dev/loop4", makedev(7, 4));
    // kubelet creates the staging directory and the target's parent.
    os_.paths[kStaging] = PathKind::kDirectory;
    svc_ = MakeLockedNodeService(MakeNodeService({.node_id = kNode}, os_, dp_));
  }

  grpc::Status Stage(const v1::VolumeCapability& cap, const std::string& id = kVol,
                     const std::string& staging = kStaging) {
    v1::NodeStageVolumeRequest req;
    req.set_volume_id(id);
    req.set_staging_target_path(staging);
    *req.mutable_volume_capability() = cap;
    v1::NodeStageVolumeResponse resp;
    return svc_->NodeStageVolume(nullptr, &req, &resp);
  }
  grpc::Status Unstage(const std::string& id = kVol, const std::string& staging = kStaging) {
    v1::NodeUnstageVolumeRequest req;
    req.set_volume_id(id);
    req.set_staging_target_path(staging);
    v1::NodeUnstageVolumeResponse resp;
    return svc_->NodeUnstageVolume(nullptr, &req, &resp);
  }
  grpc::Status Publish(const v1::VolumeCapability& cap, bool readonly = false,
                       const std::string& target = kTarget, const std::string& id = kVol,
                       const std::string& staging = kStaging) {
    v1::NodePublishVolumeRequest req;
    req.set_volume_id(id);
    req.set_staging_target_path(staging);
    req.set_target_path(target);
    req.set_readonly(readonly);
    *req.mutable_volume_capability() = cap;
    v1::NodePublishVolumeResponse resp;
    return svc_->NodePublishVolume(nullptr, &req, &resp);
  }
  grpc::Status Unpublish(const std::string& id = kVol, const std::string& target = kTarget) {
    v1::NodeUnpublishVolumeRequest req;
    req.set_volume_id(id);
    req.set_target_path(target);
    v1::NodeUnpublishVolumeResponse resp;
    return svc_->NodeUnpublishVolume(nullptr, &req, &resp);
  }
  grpc::Status Expand(const std::string& path, int64_t required, v1::NodeExpandVolumeResponse* resp,
                      const std::string& id = kVol) {
    v1::NodeExpandVolumeRequest req;
    req.set_volume_id(id);
    req.set_volume_path(path);
    req.mutable_capacity_range()->set_required_bytes(required);
    return svc_->NodeExpandVolume(nullptr, &req, resp);
  }
  grpc::Status Stats(const std::string& path, v1::NodeGetVolumeStatsResponse* resp,
                     const std::string& id = kVol) {
    v1::NodeGetVolumeStatsRequest req;
    req.set_volume_id(id);
    req.set_volume_path(path);
    return svc_->NodeGetVolumeStats(nullptr, &req, resp);
  }

  FakeOs os_;
  FakeDatapath dp_;
  std::unique_ptr<v1::Node::Service> svc_;
};

// ---- NodeGetInfo / NodeGetCapabilities ----

TEST_F(NodeServiceTest, GetInfoReportsNodeTopologyAndMaxVolumes) {
  struct Case {
    unsigned flag, nbd_devices;
    int64_t want;
  } cases[] = {{10, 16, 10}, {0, 16, 16}, {0, 0, kFuseMaxVolumes}};
  for (const auto& c : cases) {
    os_.nbd_devices = c.nbd_devices;
    auto svc = MakeNodeService({.node_id = kNode, .max_volumes = c.flag}, os_, dp_);
    v1::NodeGetInfoRequest req;
    v1::NodeGetInfoResponse resp;
    ASSERT_TRUE(svc->NodeGetInfo(nullptr, &req, &resp).ok());
    EXPECT_EQ(resp.node_id(), kNode);
    EXPECT_EQ(resp.max_volumes_per_node(), c.want) << "flag " << c.flag << " nbd " << c.nbd_devices;
    ASSERT_EQ(resp.accessible_topology().segments().size(), 1u);
    EXPECT_EQ(resp.accessible_topology().segments().at(csi::kTopologyKey), kNode);
  }
}

TEST_F(NodeServiceTest, Capabilities) {
  v1::NodeGetCapabilitiesRequest req;
  v1::NodeGetCapabilitiesResponse resp;
  ASSERT_TRUE(svc_->NodeGetCapabilities(nullptr, &req, &resp).ok());
  std::vector<int> types;
  for (const auto& c : resp.capabilities()) types.push_back(c.rpc().type());
  using R = v1::NodeServiceCapability::RPC;
  EXPECT_THAT(types, ElementsAre(R::STAGE_UNSTAGE_VOLUME, R::EXPAND_VOLUME, R::GET_VOLUME_STATS,
                                 R::VOLUME_CONDITION, R::SINGLE_NODE_MULTI_WRITER));
}

// ---- NodeStageVolume ----

TEST_F(NodeServiceTest, StageFormatsBlankDeviceOnceAndMounts) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  EXPECT_EQ(os_.Count("mkfs"), 1);
  EXPECT_EQ(os_.Count("mkfs /dev/loop3 ext4"), 1);  // default fsType
  ASSERT_NE(os_.Top(kStaging), nullptr);
  EXPECT_EQ(os_.Top(kStaging)->source, kDevice);
  EXPECT_EQ(os_.Top(kStaging)->fstype, "ext4");

  // ext4 stops writing after a metadata error instead of carrying on (its built-in default).
  EXPECT_EQ(os_.Count("mount /dev/loop3 " + std::string(kStaging) + " ext4 errors=remount-ro"), 1);

  // kubelet's retry: already staged, nothing is done again.
  ASSERT_TRUE(Stage(MountCap("ext4")).ok());
  EXPECT_EQ(os_.Count("mkfs"), 1);
  EXPECT_EQ(os_.Count("mount"), 1);
  EXPECT_EQ(os_.mounts.size(), 1u);
}

TEST_F(NodeServiceTest, StageMountsFormattedDeviceWithoutMkfs) {
  // An unstaged, formatted volume (a second stage after unstage, or a restore) keeps its data.
  os_.devices[kDevice].content = {DeviceContent::Kind::kFilesystem, "xfs"};
  v1::VolumeCapability cap = MountCap("xfs");
  cap.mutable_mount()->add_mount_flags("noatime");
  ASSERT_TRUE(Stage(cap).ok());
  EXPECT_EQ(os_.Count("mkfs"), 0);
  EXPECT_THAT(os_.calls, ::testing::Contains(std::string("mount /dev/loop3 ") + kStaging +
                                             " xfs noatime,nouuid"));
}

TEST_F(NodeServiceTest, StageGrowsAFileSystemSmallerThanItsDevice) {
  // A restore or clone into a larger PVC: the file system is the source's size. The kubelet never
  // calls NodeExpandVolume for it, so the stage grows it, once, after mounting.
  const uint64_t dev = os_.devices[kDevice].size;
  for (const char* fs : {"ext4", "xfs"}) {
    SCOPED_TRACE(fs);
    os_.devices[kDevice].content = {DeviceContent::Kind::kFilesystem, fs, dev / 3};
    os_.calls.clear();
    ASSERT_TRUE(Stage(MountCap(fs)).ok());
    const std::string grow = "grow /dev/loop3 " + std::string(kStaging) + " " + fs;
    ASSERT_EQ(os_.Count("grow"), 1);
    EXPECT_EQ(os_.calls.back(), grow);  // after the mount
    ASSERT_TRUE(Unstage().ok());
  }
  // A file system that fills its device (within the slack growth tools leave) is left alone, as
  // is one just made, and one of unknown size.
  for (uint64_t fs_bytes : {dev, dev - (512u << 10), uint64_t{0}}) {
    os_.devices[kDevice].content = {DeviceContent::Kind::kFilesystem, "ext4", fs_bytes};
    os_.calls.clear();
    ASSERT_TRUE(Stage(MountCap("ext4")).ok());
    EXPECT_EQ(os_.Count("grow"), 0) << fs_bytes;
    ASSERT_TRUE(Unstage().ok());
  }
  os_.devices[kDevice].content = {};
  os_.calls.clear();
  ASSERT_TRUE(Stage(MountCap("ext4")).ok());
  EXPECT_EQ(os_.Count("mkfs"), 1);
  EXPECT_EQ(os_.Count("grow"), 0);
}

TEST_F(NodeServiceTest, StageReadOnlyDoesNotGrow) {
  os_.devices[kDevice].content = {DeviceContent::Kind::kFilesystem, "ext4",
                                  os_.devices[kDevice].size / 2};
  ASSERT_TRUE(Stage(MountCap("ext4", AccessMode::SINGLE_NODE_READER_ONLY)).ok());
  EXPECT_EQ(os_.Count("grow"), 0);
}

TEST_F(NodeServiceTest, StageWhoseGrowthFailsLeavesNothingMounted) {
  os_.devices[kDevice].content = {DeviceContent::Kind::kFilesystem, "ext4",
                                  os_.devices[kDevice].size / 2};
  os_.fail_next["grow"] = Error(EPERM, "resize2fs /dev/loop3: Permission denied");
  grpc::Status st = Stage(MountCap("ext4"));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(st.error_message(), HasSubstr("growing its ext4 file system"));
  EXPECT_THAT(st.error_message(), HasSubstr("Permission denied"));
  EXPECT_EQ(os_.Top(kStaging), nullptr) << "a stage smaller than asked must not stay mounted";
  // The kubelet's retry grows it.
  ASSERT_TRUE(Stage(MountCap("ext4")).ok());
  EXPECT_EQ(os_.Count("grow"), 2);
  EXPECT_NE(os_.Top(kStaging), nullptr);
}

TEST_F(NodeServiceTest, StageKeepsTheUsersErrorsBehaviour) {
  v1::VolumeCapability cap = MountCap("ext4");
  cap.mutable_mount()->add_mount_flags("errors=continue");
  ASSERT_TRUE(Stage(cap).ok());
  EXPECT_EQ(os_.Count("mount /dev/loop3 " + std::string(kStaging) + " ext4 errors=continue"), 1);
}

TEST_F(NodeServiceTest, StageReaderOnlyMountsReadOnly) {
  os_.devices[kDevice].content = {DeviceContent::Kind::kFilesystem, "ext4"};
  ASSERT_TRUE(Stage(MountCap("ext4", AccessMode::SINGLE_NODE_READER_ONLY)).ok());
  ASSERT_NE(os_.Top(kStaging), nullptr);
  EXPECT_TRUE(os_.Top(kStaging)->vfs_read_only);
  ASSERT_TRUE(Stage(MountCap("ext4", AccessMode::SINGLE_NODE_READER_ONLY)).ok());
  // Staged read-only, now asked read-write: not what is mounted there.
  EXPECT_EQ(Stage(MountCap("ext4")).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(os_.Count("mount"), 1);
}

TEST_F(NodeServiceTest, StageWithRoMountFlagIsIdempotent) {
  os_.devices[kDevice].content = {DeviceContent::Kind::kFilesystem, "ext4"};
  v1::VolumeCapability cap = MountCap("ext4");
  cap.mutable_mount()->add_mount_flags("ro");
  ASSERT_TRUE(Stage(cap).ok());
  ASSERT_TRUE(Stage(cap).ok());
  EXPECT_TRUE(os_.Top(kStaging)->vfs_read_only);
  EXPECT_EQ(os_.Count("mount /dev/loop3 " + std::string(kStaging) + " ext4 ro,errors=remount-ro"),
            1);
}

TEST_F(NodeServiceTest, StageNeverFormatsANonBlankDevice) {
  struct Case {
    const char* name;
    DeviceContent content;
    AccessMode::Mode mode;
  } cases[] = {
      {"other fs", {DeviceContent::Kind::kFilesystem, "xfs"}, AccessMode::SINGLE_NODE_WRITER},
      {"partition table", {DeviceContent::Kind::kOther, "dos"}, AccessMode::SINGLE_NODE_WRITER},
      {"lvm member", {DeviceContent::Kind::kOther, "LVM2_member"}, AccessMode::SINGLE_NODE_WRITER},
      {"blank but read-only", {}, AccessMode::SINGLE_NODE_READER_ONLY},
  };
  for (const auto& c : cases) {
    os_.devices[kDevice].content = c.content;
    os_.calls.clear();
    grpc::Status st = Stage(MountCap("ext4", c.mode));
    EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << c.name;
    EXPECT_EQ(os_.Count("mkfs"), 0) << c.name;
    EXPECT_EQ(os_.Count("mount"), 0) << c.name;
  }
}

TEST_F(NodeServiceTest, StageAfterMkfsFailureRetriesCleanly) {
  os_.fail_next["mkfs"] = Error(EIO, "mkfs.ext4 /dev/loop3: exit status 1: boom");
  grpc::Status st = Stage(MountCap());
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(st.error_message(), HasSubstr("boom"));
  EXPECT_EQ(os_.mounts.size(), 0u);
  ASSERT_TRUE(Stage(MountCap()).ok());
  EXPECT_EQ(os_.Count("mkfs"), 2);  // the failed one and the retry
}

TEST_F(NodeServiceTest, StageOverSomethingElseIsAlreadyExists) {
  // Another volume's device is mounted at this staging path.
  ASSERT_TRUE(Stage(MountCap(), "v1:node-a:pvc-2").ok());
  EXPECT_EQ(Stage(MountCap()).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  // Same device, other file system type than now asked for.
  ASSERT_TRUE(Unstage("v1:node-a:pvc-2").ok());
  ASSERT_TRUE(Stage(MountCap("ext4")).ok());
  EXPECT_EQ(Stage(MountCap("xfs")).error_code(), grpc::StatusCode::ALREADY_EXISTS);
}

TEST_F(NodeServiceTest, StageBlockAttachesOnly) {
  ASSERT_TRUE(Stage(BlockCap()).ok());
  ASSERT_TRUE(Stage(BlockCap()).ok());
  EXPECT_TRUE(dp_.volumes["pvc-1"].attached);
  EXPECT_EQ(os_.Count("mkfs"), 0);
  EXPECT_EQ(os_.Count("mount"), 0);
}

TEST_F(NodeServiceTest, StageBadArguments) {
  v1::VolumeCapability no_access_type;
  no_access_type.mutable_access_mode()->set_mode(AccessMode::SINGLE_NODE_WRITER);
  v1::VolumeCapability no_mode;
  no_mode.mutable_mount();
  struct Case {
    const char* name;
    std::string id, staging;
    std::optional<v1::VolumeCapability> cap;
    grpc::StatusCode want;
  } cases[] = {
      {"no volume id", "", kStaging, MountCap(), grpc::StatusCode::INVALID_ARGUMENT},
      {"no staging path", kVol, "", MountCap(), grpc::StatusCode::INVALID_ARGUMENT},
      {"relative staging path", kVol, "var/lib/x", MountCap(), grpc::StatusCode::INVALID_ARGUMENT},
      {"root staging path", kVol, "/", MountCap(), grpc::StatusCode::INVALID_ARGUMENT},
      {"dotdot staging path", kVol, "/var/../etc", MountCap(), grpc::StatusCode::INVALID_ARGUMENT},
      {"no capability", kVol, kStaging, std::nullopt, grpc::StatusCode::INVALID_ARGUMENT},
      {"no access type", kVol, kStaging, no_access_type, grpc::StatusCode::INVALID_ARGUMENT},
      {"no access mode", kVol, kStaging, no_mode, grpc::StatusCode::INVALID_ARGUMENT},
      {"btrfs", kVol, kStaging, MountCap("btrfs"), grpc::StatusCode::INVALID_ARGUMENT},
      {"multi node", kVol, kStaging, MountCap("", AccessMode::MULTI_NODE_MULTI_WRITER),
       grpc::StatusCode::INVALID_ARGUMENT},
      {"malformed id", "pvc-1", kStaging, MountCap(), grpc::StatusCode::NOT_FOUND},
      {"other node", "v1:node-b:pvc-1", kStaging, MountCap(), grpc::StatusCode::NOT_FOUND},
      {"no such volume", "v1:node-a:pvc-9", kStaging, MountCap(), grpc::StatusCode::NOT_FOUND},
  };
  for (const auto& c : cases) {
    v1::NodeStageVolumeRequest req;
    req.set_volume_id(c.id);
    req.set_staging_target_path(c.staging);
    if (c.cap) *req.mutable_volume_capability() = *c.cap;
    v1::NodeStageVolumeResponse resp;
    grpc::Status st = svc_->NodeStageVolume(nullptr, &req, &resp);
    EXPECT_EQ(st.error_code(), c.want) << c.name << ": " << st.error_message();
    EXPECT_FALSE(st.error_message().empty()) << c.name;
  }
  EXPECT_EQ(os_.mounts.size(), 0u);
  EXPECT_EQ(os_.Count("mkfs"), 0);
}

// ---- NodePublishVolume / NodeUnpublishVolume ----

TEST_F(NodeServiceTest, PublishBindsStagingOntoTarget) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Publish(MountCap()).ok());
  const MountInfo* m = os_.Top(kTarget);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->source, kDevice);
  EXPECT_FALSE(m->vfs_read_only);
  EXPECT_EQ(os_.paths[kTarget], PathKind::kDirectory);  // the plugin creates the target
  ASSERT_TRUE(Publish(MountCap()).ok());                // retry
  EXPECT_EQ(os_.mounts.size(), 2u);
  // The same target read-only now: incompatible with what is there.
  EXPECT_EQ(Publish(MountCap(), true).error_code(), grpc::StatusCode::ALREADY_EXISTS);
}

TEST_F(NodeServiceTest, SingleWriterIsPublishedAtOneTargetAtATime) {
  const v1::VolumeCapability rwop = MountCap("ext4", AccessMode::SINGLE_NODE_SINGLE_WRITER);
  const std::string second = "/var/lib/kubelet/pods/uid-2/volumes/kubernetes.io~csi/pvc-1/mount";
  ASSERT_TRUE(Stage(rwop).ok());
  ASSERT_TRUE(Publish(rwop).ok());
  ASSERT_TRUE(Publish(rwop).ok());  // the kubelet's retry of the same target
  grpc::Status st = Publish(rwop, false, second);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(st.error_message(), HasSubstr("already published at " + std::string(kTarget)));
  EXPECT_EQ(os_.Top(second), nullptr);
  EXPECT_EQ(Publish(rwop, true, second).error_code(), grpc::StatusCode::FAILED_PRECONDITION)
      << "read-only does not make a second target acceptable";
  // Once the first pod is gone, the next one may have it.
  ASSERT_TRUE(Unpublish().ok());
  ASSERT_TRUE(Publish(rwop, false, second).ok());
  EXPECT_NE(os_.Top(second), nullptr);
}

TEST_F(NodeServiceTest, OtherWriterModesMayBePublishedAtSeveralTargets) {
  const std::string second = "/var/lib/kubelet/pods/uid-2/volumes/kubernetes.io~csi/pvc-1/mount";
  for (auto mode : {AccessMode::SINGLE_NODE_WRITER, AccessMode::SINGLE_NODE_MULTI_WRITER}) {
    SCOPED_TRACE(AccessMode::Mode_Name(mode));
    ASSERT_TRUE(Stage(MountCap("ext4", mode)).ok());
    ASSERT_TRUE(Publish(MountCap("ext4", mode)).ok());
    ASSERT_TRUE(Publish(MountCap("ext4", mode), false, second).ok());
    ASSERT_TRUE(Unpublish(kVol, second).ok());
    ASSERT_TRUE(Unpublish().ok());
    ASSERT_TRUE(Unstage().ok());
  }
}

TEST_F(NodeServiceTest, PublishReadOnly) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  struct Case {
    const char* target;
    bool readonly;
    AccessMode::Mode mode;
  } cases[] = {{"/var/lib/kubelet/t/ro-flag/mount", true, AccessMode::SINGLE_NODE_WRITER},
               {"/var/lib/kubelet/t/ro-mode/mount", false, AccessMode::SINGLE_NODE_READER_ONLY}};
  for (const auto& c : cases) {
    ASSERT_TRUE(Publish(MountCap("", c.mode), c.readonly, c.target).ok()) << c.target;
    ASSERT_NE(os_.Top(c.target), nullptr);
    EXPECT_TRUE(os_.Top(c.target)->vfs_read_only) << c.target;
    ASSERT_TRUE(Publish(MountCap("", c.mode), c.readonly, c.target).ok()) << c.target;
    EXPECT_EQ(Publish(MountCap(), false, c.target).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  }
}

TEST_F(NodeServiceTest, PublishBeforeStageIsFailedPrecondition) {
  EXPECT_EQ(Publish(MountCap()).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Publish(BlockCap()).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Publish(MountCap(), false, kTarget, kVol, "").error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(os_.Count("mount"), 0);
}

TEST_F(NodeServiceTest, PublishOverAnotherVolumeIsAlreadyExists) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Stage(MountCap(), "v1:node-a:pvc-2", "/var/lib/kubelet/stage/2").ok());
  ASSERT_TRUE(
      Publish(MountCap(), false, kTarget, "v1:node-a:pvc-2", "/var/lib/kubelet/stage/2").ok());
  EXPECT_EQ(Publish(MountCap()).error_code(), grpc::StatusCode::ALREADY_EXISTS);
}

TEST_F(NodeServiceTest, PublishBlockBindsDeviceNodeOntoFile) {
  const std::string target =
      "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-1/uid";
  ASSERT_TRUE(Stage(BlockCap()).ok());
  ASSERT_TRUE(Publish(BlockCap(), false, target).ok());
  EXPECT_EQ(os_.paths[target], PathKind::kFile);
  EXPECT_EQ(os_.bound_devices[target], kDevice);
  ASSERT_TRUE(Publish(BlockCap(), false, target).ok());
  EXPECT_EQ(os_.Count("mount"), 1);
  ASSERT_TRUE(Unpublish(kVol, target).ok());
  EXPECT_EQ(os_.paths.count(target), 0u);
  EXPECT_TRUE(os_.bound_devices.empty());
  ASSERT_TRUE(Unstage().ok());
  EXPECT_FALSE(dp_.volumes["pvc-1"].attached);
}

TEST_F(NodeServiceTest, PublishBadArguments) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  struct Case {
    const char* name;
    std::string id, target, staging;
    grpc::StatusCode want;
  } cases[] = {
      {"no volume id", "", kTarget, kStaging, grpc::StatusCode::INVALID_ARGUMENT},
      {"no target", kVol, "", kStaging, grpc::StatusCode::INVALID_ARGUMENT},
      {"relative target", kVol, "pods/x", kStaging, grpc::StatusCode::INVALID_ARGUMENT},
      {"root target", kVol, "/", kStaging, grpc::StatusCode::INVALID_ARGUMENT},
      {"trailing slash", kVol, "/var/lib/kubelet/pods/x/", kStaging,
       grpc::StatusCode::INVALID_ARGUMENT},
      {"double slash", kVol, "/var/lib/kubelet/pods//x", kStaging,
       grpc::StatusCode::INVALID_ARGUMENT},
      {"dot", kVol, "/var/lib/kubelet/pods/./x", kStaging, grpc::StatusCode::INVALID_ARGUMENT},
      {"target is staging", kVol, kStaging, kStaging, grpc::StatusCode::INVALID_ARGUMENT},
      {"relative staging", kVol, kTarget, "stage", grpc::StatusCode::INVALID_ARGUMENT},
      {"other node", "v1:node-b:pvc-1", kTarget, kStaging, grpc::StatusCode::NOT_FOUND},
  };
  for (const auto& c : cases) {
    grpc::Status st = Publish(MountCap(), false, c.target, c.id, c.staging);
    EXPECT_EQ(st.error_code(), c.want) << c.name << ": " << st.error_message();
  }
  v1::NodePublishVolumeRequest req;  // no capability
  req.set_volume_id(kVol);
  req.set_target_path(kTarget);
  req.set_staging_target_path(kStaging);
  v1::NodePublishVolumeResponse resp;
  EXPECT_EQ(svc_->NodePublishVolume(nullptr, &req, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(os_.Top(kTarget), nullptr);
}

TEST_F(NodeServiceTest, UnpublishIsIdempotentAndRemovesTarget) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Publish(MountCap()).ok());
  ASSERT_TRUE(Unpublish().ok());
  EXPECT_EQ(os_.Top(kTarget), nullptr);
  EXPECT_EQ(os_.paths.count(kTarget), 0u);
  ASSERT_TRUE(Unpublish().ok());  // retry: nothing mounted, nothing there
  EXPECT_EQ(os_.Count("umount"), 1);
  // A never-published target, and one whose volume id is not ours: still fine.
  EXPECT_TRUE(Unpublish(kVol, "/var/lib/kubelet/never/published").ok());
  EXPECT_TRUE(Unpublish("v1:node-b:pvc-1", kTarget).ok());
  EXPECT_EQ(Unpublish("", kTarget).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Unpublish(kVol, "").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Unpublish(kVol, "/").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(NodeServiceTest, UnpublishUnmountFailureIsReported) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Publish(MountCap()).ok());
  os_.fail_next["umount"] = Error(EBUSY, "unmount {}: device or resource busy", kTarget);
  EXPECT_EQ(Unpublish().error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_NE(os_.Top(kTarget), nullptr);  // still there: the target was not removed under it
  EXPECT_EQ(os_.paths.count(kTarget), 1u);
  ASSERT_TRUE(Unpublish().ok());
}

// ---- NodeUnstageVolume ----

TEST_F(NodeServiceTest, UnstageUnmountsAndDetaches) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Unstage().ok());
  EXPECT_TRUE(os_.mounts.empty());
  EXPECT_FALSE(dp_.volumes["pvc-1"].attached);
  ASSERT_TRUE(Unstage().ok());  // retry
  EXPECT_EQ(os_.Count("umount"), 1);
}

TEST_F(NodeServiceTest, UnstageWhenAlreadyUnmountedStillDetaches) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(os_.Unmount(kStaging).ok());  // e.g. a node reboot lost the mount
  ASSERT_TRUE(dp_.volumes["pvc-1"].attached);
  ASSERT_TRUE(Unstage().ok());
  EXPECT_FALSE(dp_.volumes["pvc-1"].attached);
}

TEST_F(NodeServiceTest, UnstageWhilePublishedFailsAndKeepsTheAttachment) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Publish(MountCap()).ok());
  EXPECT_EQ(Unstage().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(dp_.volumes["pvc-1"].attached);
  ASSERT_TRUE(Unpublish().ok());
  ASSERT_TRUE(Unstage().ok());
  EXPECT_FALSE(dp_.volumes["pvc-1"].attached);
}

TEST_F(NodeServiceTest, UnstageArguments) {
  EXPECT_EQ(Unstage("", kStaging).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Unstage(kVol, "").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Unstage(kVol, "relative").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  dp_.calls.clear();
  EXPECT_TRUE(Unstage("v1:node-b:pvc-1").ok());  // not ours: nothing attached here
  EXPECT_TRUE(Unstage("garbage").ok());
  EXPECT_TRUE(dp_.calls.empty());
}

// ---- NodeExpandVolume ----

TEST_F(NodeServiceTest, ExpandGrowsDeviceThenFileSystem) {
  ASSERT_TRUE(Stage(MountCap("xfs")).ok());
  ASSERT_TRUE(Publish(MountCap("xfs")).ok());
  dp_.volumes["pvc-1"].size = 2 * kGiB;  // ControllerExpandVolume grew the pool volume
  v1::NodeExpandVolumeResponse resp;
  ASSERT_TRUE(Expand(kTarget, 2 * kGiB, &resp).ok());
  EXPECT_EQ(resp.capacity_bytes(), int64_t(2 * kGiB));
  EXPECT_EQ(os_.Count("grow /dev/loop3 " + std::string(kTarget) + " xfs"), 1);
  ASSERT_TRUE(Expand(kTarget, 2 * kGiB, &resp).ok());  // retry
  EXPECT_EQ(resp.capacity_bytes(), int64_t(2 * kGiB));
  EXPECT_THAT(dp_.calls, ::testing::Contains("resize pvc-1"));
}

TEST_F(NodeServiceTest, ExpandBlockOnlyResizesTheDevice) {
  const std::string target = "/var/lib/kubelet/dev-publish/pvc-1";
  ASSERT_TRUE(Stage(BlockCap()).ok());
  ASSERT_TRUE(Publish(BlockCap(), false, target).ok());
  dp_.volumes["pvc-1"].size = 3 * kGiB;
  v1::NodeExpandVolumeResponse resp;
  ASSERT_TRUE(Expand(target, 0, &resp).ok());
  EXPECT_EQ(resp.capacity_bytes(), int64_t(3 * kGiB));
  EXPECT_EQ(os_.Count("grow"), 0);
}

TEST_F(NodeServiceTest, ExpandErrors) {
  v1::NodeExpandVolumeResponse resp;
  EXPECT_EQ(Expand(kTarget, 0, &resp, "").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Expand("", 0, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Expand(kTarget, -1, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Expand(kTarget, 0, &resp).error_code(), grpc::StatusCode::NOT_FOUND);  // no path
  EXPECT_EQ(Expand(kTarget, 0, &resp, "v1:node-b:pvc-1").error_code(), grpc::StatusCode::NOT_FOUND);
  // An unknown volume is NOT_FOUND before the path's form is looked at (csi-sanity).
  EXPECT_EQ(Expand("some/path", 0, &resp, "v1:node-a:nope").error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Expand("some/path", 0, &resp, "id").error_code(), grpc::StatusCode::NOT_FOUND);
  // A volume that exists, with a malformed path: that is the request's fault.
  EXPECT_EQ(Expand("some/path", 0, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Publish(MountCap()).ok());
  // The controller did not grow the volume: the device cannot satisfy the request.
  EXPECT_EQ(Expand(kTarget, 2 * kGiB, &resp).error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_EQ(os_.Count("grow"), 0);
  os_.fail_next["grow"] = Error(EIO, "resize2fs /dev/loop3: exit status 1: bad");
  EXPECT_EQ(Expand(kTarget, kGiB, &resp).error_code(), grpc::StatusCode::INTERNAL);
  ASSERT_TRUE(Unpublish().ok());
  ASSERT_TRUE(Unstage().ok());
  os_.paths[kTarget] = PathKind::kDirectory;
  EXPECT_EQ(Expand(kTarget, 0, &resp).error_code(), grpc::StatusCode::NOT_FOUND);  // not attached
}

// ---- NodeGetVolumeStats ----

TEST_F(NodeServiceTest, StatsOfMountVolume) {
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Publish(MountCap()).ok());
  os_.fs_stats = {.total_bytes = 1000,
                  .available_bytes = 600,
                  .used_bytes = 400,
                  .total_inodes = 100,
                  .available_inodes = 90,
                  .used_inodes = 10};
  v1::NodeGetVolumeStatsResponse resp;
  ASSERT_TRUE(Stats(kTarget, &resp).ok());
  ASSERT_EQ(resp.usage_size(), 2);
  EXPECT_EQ(resp.usage(0).unit(), v1::VolumeUsage::BYTES);
  EXPECT_EQ(resp.usage(0).total(), 1000);
  EXPECT_EQ(resp.usage(0).available(), 600);
  EXPECT_EQ(resp.usage(0).used(), 400);
  EXPECT_EQ(resp.usage(1).unit(), v1::VolumeUsage::INODES);
  EXPECT_EQ(resp.usage(1).total(), 100);
  EXPECT_EQ(resp.usage(1).available(), 90);
  EXPECT_EQ(resp.usage(1).used(), 10);
  EXPECT_FALSE(resp.volume_condition().abnormal()) << resp.volume_condition().message();
}

TEST_F(NodeServiceTest, StatsOfBlockVolume) {
  const std::string target = "/var/lib/kubelet/dev-publish/pvc-1";
  ASSERT_TRUE(Stage(BlockCap()).ok());
  ASSERT_TRUE(Publish(BlockCap(), false, target).ok());
  v1::NodeGetVolumeStatsResponse resp;
  ASSERT_TRUE(Stats(target, &resp).ok());
  ASSERT_EQ(resp.usage_size(), 1);
  EXPECT_EQ(resp.usage(0).unit(), v1::VolumeUsage::BYTES);
  EXPECT_EQ(resp.usage(0).total(), int64_t(kGiB));
  EXPECT_FALSE(resp.volume_condition().abnormal());
}

TEST_F(NodeServiceTest, StatsVolumeCondition) {
  // Each case gets its own volume, staged and published, then broken one way.
  struct Case {
    const char* name;
    std::function<void(FakeDatapath::Vol&, const std::string& device)> break_it;
    const char* want;  // "" = normal
  } cases[] = {
      {"healthy", [](FakeDatapath::Vol&, const std::string&) {}, ""},
      {"link down", [](FakeDatapath::Vol& v, const std::string&) { v.link_ok = false; },
       "nbdfuse exited"},
      {"read errors", [](FakeDatapath::Vol& v, const std::string&) { v.read_errors = 3; },
       "read 3"},
      {"write errors", [](FakeDatapath::Vol& v, const std::string&) { v.write_errors = 1; },
       "write 1"},
      {"fs went read-only",
       [this](FakeDatapath::Vol&, const std::string& device) {
         for (auto& m : os_.mounts) m.super_read_only = m.super_read_only || m.source == device;
       },
       "read-only"},
      {"datapath down", [this](FakeDatapath::Vol&, const std::string&) { dp_.unreachable = true; },
       "unreachable"},
      {"fs shut down",
       [this](FakeDatapath::Vol&, const std::string& device) {
         for (auto& m : os_.mounts) {
           if (m.source == device) {
             os_.unopenable[m.target] = Error(EIO, "open {}: I/O error", m.target);
           }
         }
       },
       "shut down"},
      {"fs shut down, root unstatable",
       [this](FakeDatapath::Vol&, const std::string& device) {
         for (auto& m : os_.mounts) {
           if (m.source == device) {
             os_.unstatable[m.target] = Error(EIO, "stat {}: I/O error", m.target);
           }
         }
       },
       "stat"},
      {"detached under us", [](FakeDatapath::Vol& v, const std::string&) { v.attached = false; },
       "not attached"},
  };
  int i = 0;
  for (const auto& c : cases) {
    ++i;
    std::string name = "cond-" + std::to_string(i);
    std::string id = "v1:node-a:" + name, device = "/dev/loop" + std::to_string(10 + i);
    std::string staging = "/var/lib/kubelet/stage/" + name,
                target = "/var/lib/kubelet/pods/" + name + "/mount";
    dp_.AddVolume(name, kGiB, device, makedev(7, 10 + i));
    ASSERT_TRUE(Stage(MountCap(), id, staging).ok()) << c.name;
    ASSERT_TRUE(Publish(MountCap(), false, target, id, staging).ok()) << c.name;
    c.break_it(dp_.volumes[name], device);
    v1::NodeGetVolumeStatsResponse resp;
    ASSERT_TRUE(Stats(target, &resp, id).ok()) << c.name;
    EXPECT_EQ(resp.volume_condition().abnormal(), std::string(c.want) != "") << c.name;
    EXPECT_THAT(resp.volume_condition().message(), HasSubstr(c.want)) << c.name;
    dp_.unreachable = false;
  }
}

TEST_F(NodeServiceTest, StatsNameTheFuseFallbackWithoutCallingItAbnormal) {
  // The fallback serves I/O until the datapath restarts: normal, but the message must say so,
  // because the volume condition is where a pod's owner sees it. A kernel attachment says "ok".
  for (const std::string mode : {"fuse", "kernel"}) {
    const std::string name = "mode-" + mode, id = "v1:node-a:" + name;
    const std::string staging = "/var/lib/kubelet/stage/" + name,
                      target = "/var/lib/kubelet/pods/" + name + "/mount";
    const std::string device = mode == "fuse" ? "/dev/loop20" : "/dev/nbd20";
    dp_.AddVolume(name, kGiB, device, makedev(mode == "fuse" ? 7 : 43, 20));
    dp_.volumes[name].mode = mode;
    ASSERT_TRUE(Stage(MountCap(), id, staging).ok()) << mode;
    ASSERT_TRUE(Publish(MountCap(), false, target, id, staging).ok()) << mode;
    v1::NodeGetVolumeStatsResponse resp;
    ASSERT_TRUE(Stats(target, &resp, id).ok()) << mode;
    EXPECT_FALSE(resp.volume_condition().abnormal()) << mode;
    if (mode == "fuse") {
      EXPECT_THAT(resp.volume_condition().message(), HasSubstr("nbdfuse fallback"));
      EXPECT_THAT(resp.volume_condition().message(), HasSubstr("datapath restart breaks"));
    } else {
      EXPECT_EQ(resp.volume_condition().message(), "ok");
    }
  }
  // A broken fuse link is abnormal and still names the fallback.
  dp_.volumes["mode-fuse"].link_ok = false;
  v1::NodeGetVolumeStatsResponse resp;
  ASSERT_TRUE(Stats("/var/lib/kubelet/pods/mode-fuse/mount", &resp, "v1:node-a:mode-fuse").ok());
  EXPECT_TRUE(resp.volume_condition().abnormal());
  EXPECT_THAT(resp.volume_condition().message(), HasSubstr("nbdfuse fallback"));
}

TEST_F(NodeServiceTest, StatsReadOnlyPublishIsNormal) {
  // A read-only bind of a read-write file system is what was asked for, not a failure.
  ASSERT_TRUE(Stage(MountCap()).ok());
  ASSERT_TRUE(Publish(MountCap(), true).ok());
  v1::NodeGetVolumeStatsResponse resp;
  ASSERT_TRUE(Stats(kTarget, &resp).ok());
  EXPECT_FALSE(resp.volume_condition().abnormal()) << resp.volume_condition().message();
}

TEST_F(NodeServiceTest, StatsErrors) {
  v1::NodeGetVolumeStatsResponse resp;
  EXPECT_EQ(Stats(kTarget, &resp, "").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Stats("", &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Stats(kTarget, &resp).error_code(), grpc::StatusCode::NOT_FOUND);  // no such path
  os_.paths[kTarget] = PathKind::kDirectory;
  EXPECT_EQ(Stats(kTarget, &resp).error_code(), grpc::StatusCode::NOT_FOUND);  // nothing mounted
  ASSERT_TRUE(Stage(MountCap()).ok());
  EXPECT_EQ(Stats(kStaging, &resp, "v1:node-b:pvc-1").error_code(), grpc::StatusCode::NOT_FOUND);
  // CSI 1.10 (and csi-sanity): an unknown volume is NOT_FOUND even with a malformed path, and
  // a known volume cannot be on a path where no volume can be: NOT_FOUND too.
  EXPECT_EQ(Stats("some/path", &resp, "v1:node-a:nope").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Stats("some/path", &resp, "id").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Stats("some/path", &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Stats("/etc", &resp).error_code(), grpc::StatusCode::NOT_FOUND) << "outside the root";
}

// ---- the whole sequence, and concurrency ----

TEST_F(NodeServiceTest, FullSequenceLeavesNothingBehind) {
  ASSERT_TRUE(Stage(MountCap("xfs")).ok());
  ASSERT_TRUE(Publish(MountCap("xfs")).ok());
  ASSERT_TRUE(Publish(MountCap("xfs"), true, "/var/lib/kubelet/pods/2/mount").ok());
  ASSERT_TRUE(Unpublish().ok());
  ASSERT_TRUE(Unpublish(kVol, "/var/lib/kubelet/pods/2/mount").ok());
  ASSERT_TRUE(Unstage().ok());
  EXPECT_TRUE(os_.mounts.empty());
  EXPECT_FALSE(dp_.volumes["pvc-1"].attached);
  // Staged again later: the file system is kept, not reformatted.
  ASSERT_TRUE(Stage(MountCap("xfs")).ok());
  EXPECT_EQ(os_.Count("mkfs"), 1);
}

TEST_F(NodeServiceTest, ConcurrentCallOnSameVolumeIsAborted) {
  std::promise<void> entered, release;
  std::shared_future<void> release_f = release.get_future().share();
  bool first = true;
  dp_.on_attach = [&](const std::string& v) {
    if (v == "pvc-1" && first) {
      first = false;
      entered.set_value();
      release_f.wait();
    }
  };
  auto slow = std::async(std::launch::async, [&] { return Stage(MountCap()); });
  entered.get_future().wait();
  // Same volume, any RPC: ABORTED at once, without touching anything.
  size_t calls_before = os_.calls.size();
  EXPECT_EQ(Stage(MountCap()).error_code(), grpc::StatusCode::ABORTED);
  EXPECT_EQ(Unstage().error_code(), grpc::StatusCode::ABORTED);
  EXPECT_EQ(Publish(MountCap()).error_code(), grpc::StatusCode::ABORTED);
  v1::NodeGetVolumeStatsResponse sresp;
  EXPECT_EQ(Stats(kTarget, &sresp).error_code(), grpc::StatusCode::ABORTED);
  EXPECT_EQ(os_.calls.size(), calls_before);
  // Another volume is not held up.
  EXPECT_TRUE(Stage(BlockCap(), "v1:node-a:pvc-2", "/var/lib/kubelet/stage/2").ok());
  release.set_value();
  ASSERT_TRUE(slow.get().ok());
  // Released: the next call goes through.
  EXPECT_TRUE(Stage(MountCap()).ok());
  EXPECT_EQ(os_.Count("mkfs"), 1);
}

// ---- path rules ----

TEST(NodePathTest, ValidateNodePath) {
  for (const char* ok : {"/a", "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/p/mount",
                         "/a/b.c/..d/e..", "/with space/x"}) {
    EXPECT_TRUE(ValidateNodePath("p", ok).ok()) << ok;
  }
  for (const char* bad : {"", "/", "a", "./a", "/a/", "/a//b", "/a/./b", "/a/../b", "/..", "/."}) {
    Status s = ValidateNodePath("target_path", bad);
    EXPECT_EQ(s.code(), EINVAL) << bad;
    EXPECT_THAT(s.message(), HasSubstr("target_path")) << bad;
  }
  EXPECT_EQ(ValidateNodePath("p", "/" + std::string(5000, 'a')).code(), EINVAL);
  EXPECT_EQ(ValidateNodePath("p", std::string("/a\0b", 4)).code(), EINVAL);
}

TEST(NodePathTest, PathsMustLieStrictlyBeneathTheRoot) {
  const std::string root = "/var/lib/kubelet";
  EXPECT_TRUE(ValidatePathUnderRoot("p", root + "/pods/x/mount", root).ok());
  EXPECT_TRUE(ValidatePathUnderRoot("p", root + "/a", root).ok());
  for (const std::string& bad :
       std::vector<std::string>{root, "/var/lib/kubeletX/a", "/var/lib/kube", "/tmp/a", "/var/lib",
                                "/var/lib/kubelet/../../etc"}) {
    Status s = ValidatePathUnderRoot("target_path", bad, root);
    EXPECT_EQ(s.code(), EINVAL) << bad;
    EXPECT_THAT(s.message(), HasSubstr("target_path")) << bad;
  }
  EXPECT_THAT(ValidatePathUnderRoot("p", "/tmp/a", root).message(),
              HasSubstr("not beneath the kubelet root /var/lib/kubelet"));
  EXPECT_TRUE(ValidatePathUnderRoot("p", "/anything", "/").ok());
  EXPECT_TRUE(ValidateKubeletRoot("/").ok());
  EXPECT_TRUE(ValidateKubeletRoot("/var/lib/kubelet").ok());
  for (const char* bad : {"", "var/lib/kubelet", "/var/lib/kubelet/", "/var/../lib"}) {
    EXPECT_EQ(ValidateKubeletRoot(bad).code(), EINVAL) << bad;
  }
}

// Every call that takes a path refuses one outside the root, or one that a symlink takes out of it,
// with INVALID_ARGUMENT (NodeGetVolumeStats: NOT_FOUND) and without touching the OS.
TEST_F(NodeServiceTest, PathsOutsideTheKubeletRootAreRefusedUntouched) {
  const std::string outside = "/tmp/pvc-1/mount";
  const std::string sibling = "/var/lib/kubelet-evil/pods/uid/mount";
  os_.escapes = {"/var/lib/kubelet/pods/evil"};  // a symlink to / on the real system
  const std::string escaped = "/var/lib/kubelet/pods/evil/volumes/kubernetes.io~csi/p/mount";
  os_.paths[outside] = PathKind::kDirectory;
  for (const std::string& bad : std::vector<std::string>{outside, sibling, escaped}) {
    SCOPED_TRACE(bad);
    os_.calls.clear();
    grpc::Status st = Stage(MountCap(), kVol, bad);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr("staging_target_path"));
    EXPECT_EQ(Unstage(kVol, bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(Publish(MountCap(), false, bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(Publish(MountCap(), false, kTarget, kVol, bad).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(Unpublish(kVol, bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    v1::NodeExpandVolumeRequest ex;
    ex.set_volume_id(kVol);
    ex.set_volume_path(bad);
    v1::NodeExpandVolumeResponse ex_resp;
    EXPECT_EQ(svc_->NodeExpandVolume(nullptr, &ex, &ex_resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
    v1::NodeGetVolumeStatsRequest stats;
    stats.set_volume_id(kVol);
    stats.set_volume_path(bad);
    v1::NodeGetVolumeStatsResponse stats_resp;
    // NodeGetVolumeStats is the exception: CSI 1.10 answers NOT_FOUND for "the volume does not
    // exist on the specified volume_path", and no volume can be on such a path (csi-sanity
    // checks this with a relative path).
    EXPECT_EQ(svc_->NodeGetVolumeStats(nullptr, &stats, &stats_resp).error_code(),
              grpc::StatusCode::NOT_FOUND);
    EXPECT_TRUE(os_.calls.empty()) << os_.calls.front();
  }
  EXPECT_TRUE(os_.mounts.empty());
  EXPECT_TRUE(dp_.calls.empty());
}

TEST_F(NodeServiceTest, ARootOfItsOwnIsHonoured) {
  svc_ = MakeLockedNodeService(
      MakeNodeService({.node_id = kNode, .kubelet_root = "/srv/kubelet"}, os_, dp_));
  EXPECT_EQ(Stage(MountCap()).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const std::string staging = "/srv/kubelet/plugins/x/globalmount";
  os_.paths[staging] = PathKind::kDirectory;
  ASSERT_TRUE(Stage(MountCap(), kVol, staging).ok());
  EXPECT_TRUE(Publish(MountCap(), false, "/srv/kubelet/pods/uid/mount", kVol, staging).ok());
}

// ---- Replicated volumes (r1:NAME): through a target opened on this node's datapath ----

constexpr char kRid[] = "r1:rv";
constexpr char kNbd[] = "/dev/nbd5";

class ReplicatedNodeTest : public NodeServiceTest {
 protected:
  ReplicatedNodeTest() { dp_.AddReplicated("rv", 2 * kGiB, kNbd, makedev(43, 5)); }
  FakeDatapath::Replicated& rv() { return dp_.replicated["rv"]; }
  int DpCount(const std::string& call) {
    return static_cast<int>(std::count(dp_.calls.begin(), dp_.calls.end(), call));
  }
  void TearDown() override {
    EXPECT_FALSE(dp_.closed_under_device) << "a target was closed under its attached device";
  }
};

TEST_F(ReplicatedNodeTest, StageOpensTheTargetAttachesItAndUnstageTakesBothBack) {
  ASSERT_TRUE(Stage(MountCap("ext4"), kRid).ok());
  EXPECT_THAT(dp_.calls, ElementsAre("open rv", "attach-target rv"));
  EXPECT_TRUE(rv().open);
  EXPECT_TRUE(rv().attached);
  EXPECT_EQ(os_.Count("mkfs /dev/nbd5 ext4"), 1);
  ASSERT_NE(os_.Top(kStaging), nullptr);
  EXPECT_EQ(os_.Top(kStaging)->source, kNbd);

  // kubelet's retry: the target open here is kept (no new claim, same epoch), nothing remade.
  ASSERT_TRUE(Stage(MountCap("ext4"), kRid).ok());
  EXPECT_EQ(DpCount("open rv"), 1);
  EXPECT_EQ(rv().epoch, 1u);
  EXPECT_EQ(os_.Count("mkfs"), 1);
  EXPECT_EQ(os_.Count("mount"), 1);

  ASSERT_TRUE(Publish(MountCap("ext4"), false, kTarget, kRid).ok());
  ASSERT_NE(os_.Top(kTarget), nullptr);
  EXPECT_EQ(os_.Top(kTarget)->source, kNbd);
  ASSERT_TRUE(Unpublish(kRid).ok());

  dp_.calls.clear();
  ASSERT_TRUE(Unstage(kRid).ok());
  EXPECT_THAT(dp_.calls, ElementsAre("detach rv", "close rv"));
  EXPECT_FALSE(rv().attached);
  EXPECT_FALSE(rv().open) << "the claim must be released for another node";
  EXPECT_TRUE(os_.mounts.empty());
  // Retried: nothing attached, no target open, still OK.
  dp_.calls.clear();
  ASSERT_TRUE(Unstage(kRid).ok());
  EXPECT_TRUE(dp_.calls.empty()) << dp_.calls.front();

  // Staged again: the file system is kept, the target reopened at the next epoch.
  ASSERT_TRUE(Stage(MountCap("ext4"), kRid).ok());
  EXPECT_EQ(os_.Count("mkfs"), 1);
  EXPECT_EQ(rv().epoch, 2u);
}

TEST_F(ReplicatedNodeTest, BlockStagePublishesTheTargetsDevice) {
  const std::string target = "/var/lib/kubelet/dev-publish/rv";
  ASSERT_TRUE(Stage(BlockCap(), kRid).ok());
  ASSERT_TRUE(Publish(BlockCap(), false, target, kRid).ok());
  EXPECT_EQ(os_.bound_devices[target], kNbd);
  ASSERT_TRUE(Unpublish(kRid, target).ok());
  ASSERT_TRUE(Unstage(kRid).ok());
  EXPECT_FALSE(rv().attached);
  EXPECT_FALSE(rv().open);
}

TEST_F(ReplicatedNodeTest, PublishBeforeStageOfABlockVolumeIsRefused) {
  // Opened but not attached (a stage that died half-way): no device of the target to bind.
  rv().open = true;
  EXPECT_EQ(Publish(BlockCap(), false, "/var/lib/kubelet/dev-publish/rv", kRid).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(ReplicatedNodeTest, AnotherNodesClaimIsARetryableErrorNamingIt) {
  rv().holder = "node-z";
  rv().epoch = 4;
  grpc::Status st = Stage(MountCap("ext4"), kRid);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(st.error_message(), HasSubstr("node-z is its target at epoch 4"));
  EXPECT_THAT(st.error_message(), HasSubstr("r1:rv is still in use on another node"));
  EXPECT_FALSE(rv().open);
  EXPECT_FALSE(rv().attached);
  EXPECT_TRUE(os_.mounts.empty());
  EXPECT_EQ(DpCount("attach-target rv"), 0);
  // The holder let go (unstaged there, or its lease lapsed): kubelet's retry stages it.
  rv().holder.clear();
  ASSERT_TRUE(Stage(MountCap("ext4"), kRid).ok());
  EXPECT_EQ(rv().epoch, 5u);
}

TEST_F(ReplicatedNodeTest, ADatapathWithoutAClusterIsAFailedPrecondition) {
  dp_.cluster = false;
  grpc::Status st = Stage(MountCap("ext4"), kRid);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(st.error_message(), HasSubstr("runs without a cluster (--cluster-etcd)"));
  EXPECT_THAT(st.error_message(), HasSubstr("node-a"));
  EXPECT_EQ(DpCount("open rv"), 0);
  EXPECT_EQ(DpCount("attach-target rv"), 0);
  // Unstage there has nothing to undo: OK, so a pod's deletion is never stuck on it.
  EXPECT_TRUE(Unstage(kRid).ok());
  EXPECT_EQ(DpCount("close rv"), 0);
}

TEST_F(ReplicatedNodeTest, NotInTheClusterStateIsNotFound) {
  grpc::Status st = Stage(MountCap("ext4"), "r1:pvc-gone");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(st.error_message(), HasSubstr("pvc-gone"));
}

TEST_F(ReplicatedNodeTest, AFailedStageClosesTheTargetItOpened) {
  struct Case {
    const char* name;
    std::function<void()> break_it;
    grpc::StatusCode want;
  } cases[] = {
      {"attach fails",
       [&] { rv().fail_attach = Error(ENODEV, "kernel NBD is not available on this node"); },
       grpc::StatusCode::FAILED_PRECONDITION},
      {"mkfs fails", [&] { os_.fail_next["mkfs"] = Error(EIO, "mkfs.ext4: I/O error"); },
       grpc::StatusCode::INTERNAL},
      {"mount fails", [&] { os_.fail_next["mount"] = Error(EIO, "mount: bad superblock"); },
       grpc::StatusCode::INTERNAL},
      {"not the asked file system",
       [&] {
         os_.devices[kNbd].content = {DeviceContent::Kind::kFilesystem, "xfs"};
       },
       grpc::StatusCode::FAILED_PRECONDITION},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    os_.devices[kNbd].content = {};
    rv().fail_attach = Status::Ok();
    c.break_it();
    dp_.calls.clear();
    EXPECT_EQ(Stage(MountCap("ext4"), kRid).error_code(), c.want);
    EXPECT_FALSE(rv().attached) << "the device this call attached stays";
    EXPECT_FALSE(rv().open) << "the target this call opened stays open, holding the claim";
    EXPECT_EQ(DpCount("close rv"), 1);
    EXPECT_EQ(os_.Top(kStaging), nullptr);
  }
}

TEST_F(ReplicatedNodeTest, AFailedStageKeepsWhatItDidNotMake) {
  // Open and attached by an earlier stage (or a datapath restart's recovery): a failing retry
  // must not pull the device or the claim from under it.
  rv().open = true;
  rv().attached = true;
  rv().epoch = 1;
  os_.fail_next["mkfs"] = Error(EIO, "mkfs.ext4: I/O error");
  EXPECT_EQ(Stage(MountCap("ext4"), kRid).error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_TRUE(rv().open);
  EXPECT_TRUE(rv().attached);
  EXPECT_EQ(DpCount("detach rv"), 0);
  EXPECT_EQ(DpCount("close rv"), 0);

  // A device still recorded on a target that is not open any more (its reopen after a datapath
  // restart failed): this call opens the target, and must not close it under that device.
  rv().open = false;
  os_.fail_next["mkfs"] = Error(EIO, "mkfs.ext4: I/O error");
  EXPECT_EQ(Stage(MountCap("ext4"), kRid).error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_EQ(DpCount("open rv"), 1);
  EXPECT_TRUE(rv().open);
  EXPECT_TRUE(rv().attached);
  EXPECT_EQ(DpCount("close rv"), 0);
}

TEST_F(ReplicatedNodeTest, TheLocalReplicaAttachedAsAPlainVolumeIsNotStagedThrough) {
  // This node holds a replica of rv under the same pool name, attached directly (v1 id).
  dp_.AddVolume("rv", 2 * kGiB, "/dev/loop9", makedev(7, 9));
  ASSERT_TRUE(Stage(BlockCap(), "v1:node-a:rv").ok());
  grpc::Status st = Stage(MountCap("ext4"), kRid, "/var/lib/kubelet/plugins/x/globalmount");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(st.error_message(), HasSubstr("local replica rv is attached here as a plain"));
  EXPECT_FALSE(rv().open);
  EXPECT_FALSE(rv().attached);
  // And an r1 unstage leaves that plain attachment alone.
  ASSERT_TRUE(Unstage(kRid).ok());
  EXPECT_TRUE(dp_.volumes["rv"].attached);
  EXPECT_EQ(DpCount("detach rv"), 0);
}

TEST_F(ReplicatedNodeTest, UnstageWhileStillPublishedKeepsTheTarget) {
  const std::string target = "/var/lib/kubelet/dev-publish/rv";
  ASSERT_TRUE(Stage(BlockCap(), kRid).ok());
  ASSERT_TRUE(Publish(BlockCap(), false, target, kRid).ok());
  // The device is still bound into a pod: the datapath refuses the detach, so the target (and
  // the claim) must stay for the device.
  EXPECT_EQ(Unstage(kRid).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(rv().attached);
  EXPECT_TRUE(rv().open);
  EXPECT_EQ(DpCount("close rv"), 0);
  ASSERT_TRUE(Unpublish(kRid, target).ok());
  ASSERT_TRUE(Unstage(kRid).ok());
  EXPECT_FALSE(rv().open);
}

TEST_F(ReplicatedNodeTest, StatsReportTheTargetsHealth) {
  ASSERT_TRUE(Stage(MountCap("ext4"), kRid).ok());
  ASSERT_TRUE(Publish(MountCap("ext4"), false, kTarget, kRid).ok());
  os_.fs_stats = {.total_bytes = 1000, .available_bytes = 600, .used_bytes = 400};
  struct Case {
    const char* name;
    std::function<void()> break_it;
    std::vector<std::string> want;  // empty: normal
  } cases[] = {
      {"healthy", [] {}, {}},
      {"a replica out of sync",
       [&] { rv().replicas[0].second = "out-of-sync"; },
       {"degraded: 1 of 2 replicas in sync", "node-a out-of-sync (connection reset by peer)"}},
      {"a replica unreachable at open",
       [&] {
         rv().replicas = {{"node-b", "in-sync"}, {"node-a", "out-of-sync"}};
         rv().unreachable = {"node-a: connection refused"};
       },
       {"degraded: 1 of 2 replicas in sync", "unreachable at open: node-a: connection refused"}},
      {"stopped",
       [&] {
         rv().stopped = true;
         rv().stop_reason = "node node-a lost its cluster lease";
       },
       {"stopped serving (epoch 1): node node-a lost its cluster lease"}},
      {"not open here", [&] { rv().open = false; }, {"not open on this node"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    FakeDatapath::Replicated keep = rv();
    c.break_it();
    v1::NodeGetVolumeStatsResponse resp;
    ASSERT_TRUE(Stats(kTarget, &resp, kRid).ok());
    ASSERT_EQ(resp.usage_size(), 2);
    EXPECT_EQ(resp.usage(0).used(), 400);
    EXPECT_EQ(resp.volume_condition().abnormal(), !c.want.empty())
        << resp.volume_condition().message();
    for (const auto& w : c.want) EXPECT_THAT(resp.volume_condition().message(), HasSubstr(w));
    rv() = keep;
  }
  // Its datapath stats are not asked: this node may hold no replica of the volume at all.
  v1::NodeGetVolumeStatsResponse resp;
  ASSERT_TRUE(Stats(kTarget, &resp, kRid).ok());
  EXPECT_EQ(resp.volume_condition().message(), "ok");
}

TEST_F(ReplicatedNodeTest, ExpandGrowsTheTargetsDeviceThenTheFileSystem) {
  ASSERT_TRUE(Stage(MountCap("ext4"), kRid).ok());
  ASSERT_TRUE(Publish(MountCap("ext4"), false, kTarget, kRid).ok());
  rv().catalogue_size = 4 * kGiB;  // ControllerExpandVolume grew the copies and the entry
  v1::NodeExpandVolumeResponse resp;
  grpc::Status st = Expand(kTarget, 4 * kGiB, &resp, kRid);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.capacity_bytes(), static_cast<int64_t>(4 * kGiB));
  EXPECT_EQ(DpCount("resize rv"), 1);
  EXPECT_EQ(os_.Count("grow"), 1);
  // Its arguments are still checked first.
  EXPECT_EQ(Expand("", 4 * kGiB, &resp, kRid).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ReplicatedNodeTest, ATargetThatCannotGrowFailsTheExpandAndTheFileSystemStays) {
  ASSERT_TRUE(Stage(MountCap("ext4"), kRid).ok());
  ASSERT_TRUE(Publish(MountCap("ext4"), false, kTarget, kRid).ok());
  rv().catalogue_size = 4 * kGiB;
  rv().fail_grow = Error(EAGAIN, "replica set rv: replicas out of sync; resync them first");
  v1::NodeExpandVolumeResponse resp;
  grpc::Status st = Expand(kTarget, 4 * kGiB, &resp, kRid);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_EQ(os_.Count("grow"), 0);
  // The controller has not grown it yet: the device is smaller than required.
  rv().fail_grow = Status::Ok();
  rv().catalogue_size = 0;
  st = Expand(kTarget, 4 * kGiB, &resp, kRid);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::OUT_OF_RANGE) << st.error_message();
  EXPECT_EQ(os_.Count("grow"), 0);
}

TEST_F(ReplicatedNodeTest, BadReplicatedIds) {
  for (const char* id : {"r1:", "r1:bad name", "r1:.hidden", "r1:a/b", "r1:rv:extra", "r2:rv"}) {
    SCOPED_TRACE(id);
    EXPECT_EQ(Stage(MountCap("ext4"), id).error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(Publish(MountCap("ext4"), false, kTarget, id).error_code(),
              grpc::StatusCode::NOT_FOUND);
    v1::NodeGetVolumeStatsResponse stats;
    EXPECT_EQ(Stats(kTarget, &stats, id).error_code(), grpc::StatusCode::NOT_FOUND);
    v1::NodeExpandVolumeResponse ex;
    EXPECT_EQ(Expand(kTarget, kGiB, &ex, id).error_code(), grpc::StatusCode::NOT_FOUND);
    // Unstage and unpublish clean kubelet's paths and succeed: nothing of that id is here.
    EXPECT_TRUE(Unstage(id).ok());
    EXPECT_TRUE(Unpublish(id).ok());
  }
  EXPECT_TRUE(dp_.calls.empty()) << dp_.calls.front();
  // Invalid arguments stay INVALID_ARGUMENT for r1 ids as for v1 ones.
  EXPECT_EQ(Stage(MountCap("ext4"), kRid, "relative/path").error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Stage(MountCap("btrfs"), kRid).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(dp_.calls.empty()) << dp_.calls.front();
}

}  // namespace
}  // namespace nbdcsi::node
