#include "datapath/engine/extents.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "datapath/nbd/proto.h"

namespace nbdcsi::datapath {

int MapExtents(int fd, uint64_t offset, uint32_t length, nbd::Extent* out, size_t max_extents,
               bool req_one) {
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  size_t n = 0;
  while (pos < end && n < max_extents) {
    // Where does the data at or after `pos` start? ENXIO: no data until EOF.
    off_t data = lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0 && errno != ENXIO) return -errno;
    uint64_t next;
    uint32_t flags;
    if (data < 0 || static_cast<uint64_t>(data) > pos) {
      next = data < 0 ? end : std::min<uint64_t>(static_cast<uint64_t>(data), end);
      flags = nbd::kStateHole | nbd::kStateZero;
    } else {
      off_t hole = lseek(fd, static_cast<off_t>(pos), SEEK_HOLE);
      if (hole < 0) return -errno;
      next = std::min<uint64_t>(static_cast<uint64_t>(hole), end);
      flags = 0;
    }
    if (next <= pos) break;  // defensive: the file changed under us; report what we have
    // Merge with the previous extent when the kind repeats (a file system may split a run).
    if (n > 0 && out[n - 1].flags == flags) {
      out[n - 1].length += static_cast<uint32_t>(next - pos);
    } else {
      out[n++] = nbd::Extent{static_cast<uint32_t>(next - pos), flags};
    }
    pos = next;
    if (req_one) break;
  }
  return static_cast<int>(n);
}

}  // namespace nbdcsi::datapath
