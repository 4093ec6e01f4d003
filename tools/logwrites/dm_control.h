// Device-mapper control through the ioctls on /dev/mapper/control (linux/dm-ioctl.h), for tools that
// run where neither libdevmapper's udev sync nor a dmsetup process per call is welcome (the
// power-cut test creates and removes a snapshot device hundreds of times under QEMU TCG).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "common/status.h"

namespace nbdcsi::logwrites {

// One-target table: `length` sectors of 512 bytes mapped by `type` with `params` (as in a
// `dmsetup table` line after the first two numbers).
struct DmTarget {
  uint64_t length = 0;
  std::string type, params;
};

// Creates device `name`, loads the table and activates it. Returns its device number (the
// kernel's encoding is glibc's: usable with mknod, major(), minor()).
StatusOr<dev_t> DmCreate(const std::string& name, const DmTarget& target);
// Removes device `name`; retries for up to a second while it is still busy (a file system's
// last reference goes away asynchronously after umount).
Status DmRemove(const std::string& name);
// Sends a target message to sector 0 (`dmsetup message NAME 0 MSG`).
Status DmMessage(const std::string& name, const std::string& msg);

}  // namespace nbdcsi::logwrites
