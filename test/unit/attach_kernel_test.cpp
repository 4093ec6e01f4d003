// The real KernelNbdInterface on the build host. Hosts without nbd.ko (most CI containers) must
// get the clear ENODEV that Attach reports; the netlink paths themselves are exercised by the VM
// scenario (test/vm/attach_restart.sh). Sysfs lookups of devices that do not exist must say
// "not ours" rather than fail, since Recover() relies on that to drop stale records.
#include <gtest/gtest.h>

#include "datapath/attach/kernel_nbd.h"

namespace nbdcsi::datapath {
namespace {

TEST(AttachKernelTest, MissingModuleIsAClearError) {
  auto k = MakeLinuxKernelNbd();
  Status s = k->Available();
  if (s.ok()) GTEST_SKIP() << "the nbd module is loaded here";
  EXPECT_EQ(s.code(), ENODEV);
  EXPECT_NE(s.message().find("kernel NBD unavailable: the nbd module is not loaded"),
            std::string::npos)
      << s.message();
  EXPECT_EQ(k->Connect({}, KernelConnectParams{}).status().code(), ENODEV);
  EXPECT_EQ(k->Reconfigure(0, {}, 120, "c").code(), ENODEV);
  EXPECT_EQ(k->Disconnect(0).code(), ENODEV);
}

TEST(AttachKernelTest, AbsentDevicesAreNotOurs) {
  auto k = MakeLinuxKernelNbd();
  constexpr int kNoSuchDevice = 1 << 20;
  EXPECT_EQ(k->Backend(kNoSuchDevice), "");
  EXPECT_FALSE(k->Connected(kNoSuchDevice));
  EXPECT_EQ(k->FindByBackend("nbd-csi:no-such-volume:0000000000000000"), -1);
  EXPECT_TRUE(k->CheckNotInUse(kNoSuchDevice).ok());
  EXPECT_FALSE(k->SetMaxSectorsKb(kNoSuchDevice, 1024).ok());
  EXPECT_EQ(NbdDevicePath(3), "/dev/nbd3");
}

}  // namespace
}  // namespace nbdcsi::datapath
