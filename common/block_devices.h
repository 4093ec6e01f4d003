// One rule for which device names are whole devices of a driver, and one count of them. The
// datapath (heartbeat: how many /dev/nbdN this node has), the node plugin (NodeGetInfo's default
// max_volumes_per_node) and the kernel attach code (finding a device by its backend in
// /sys/block) all ask the same question; with one rule they cannot disagree about "nbd1p1"
// (a partition) or "loop-control" (not a device of the loop driver's numbered kind).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace nbdcsi {

// N when `name` is `prefix` followed by decimal digits and nothing else ("nbd12" -> 12), else
// nullopt ("nbd", "nbd1p1", "nbd-1", "nbd+1", "loop-control", a number beyond int).
std::optional<int> WholeDeviceIndex(std::string_view name, std::string_view prefix);

// The block devices under `dev_dir` whose names pass WholeDeviceIndex (symlinks followed). Other
// file types do not count. 0 when there are none or the directory cannot be read.
unsigned CountBlockDevices(const std::string& dev_dir, std::string_view prefix);

// How many /dev/nbdN the kernel NBD driver made (its nbds_max), 0 without nbd.ko.
inline unsigned CountNbdDevices(const std::string& dev_dir = "/dev") {
  return CountBlockDevices(dev_dir, "nbd");
}

}  // namespace nbdcsi
