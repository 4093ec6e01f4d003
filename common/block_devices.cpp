#include "common/block_devices.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>

#include <charconv>

namespace nbdcsi {

std::optional<int> WholeDeviceIndex(std::string_view name, std::string_view prefix) {
  if (name.size() <= prefix.size() || name.substr(0, prefix.size()) != prefix) return std::nullopt;
  std::string_view digits = name.substr(prefix.size());
  // from_chars alone would take a sign; only digits make a device number.
  if (digits.find_first_not_of("0123456789") != std::string_view::npos) return std::nullopt;
  int index = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return index;
}

unsigned CountBlockDevices(const std::string& dev_dir, std::string_view prefix) {
  DIR* d = opendir(dev_dir.c_str());
  if (!d) return 0;
  unsigned n = 0;
  while (dirent* e = readdir(d)) {
    if (!WholeDeviceIndex(e->d_name, prefix)) continue;
    struct stat st{};
    if (fstatat(dirfd(d), e->d_name, &st, 0) == 0 && S_ISBLK(st.st_mode)) ++n;
  }
  closedir(d);
  return n;
}

}  // namespace nbdcsi
