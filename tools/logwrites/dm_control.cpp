#include "tools/logwrites/dm_control.h"

#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

namespace nbdcsi::logwrites {

namespace {

// A dm_ioctl header plus `payload` bytes, 8-aligned as the kernel expects.
class DmRequest {
 public:
  DmRequest(const std::string& name, size_t payload)
      : buf_((sizeof(dm_ioctl) + payload + 7) & ~size_t{7}, 0) {
    io()->version[0] = DM_VERSION_MAJOR;  // any minor the kernel has is newer than 0
    io()->data_size = static_cast<uint32_t>(buf_.size());
    io()->data_start = sizeof(dm_ioctl);
    std::memcpy(io()->name, name.data(), name.size());
  }
  dm_ioctl* io() { return reinterpret_cast<dm_ioctl*>(buf_.data()); }
  uint8_t* payload() { return buf_.data() + sizeof(dm_ioctl); }

  Status Run(unsigned long cmd, const char* what, const std::string& name) {
    int fd = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
    if (fd < 0) return Error(errno, "open /dev/mapper/control: {}", std::strerror(errno));
    int rc = ioctl(fd, cmd, buf_.data());
    int err = errno;
    close(fd);
    if (rc != 0) return Error(err, "device-mapper {} {}: {}", what, name, std::strerror(err));
    return Status::Ok();
  }

 private:
  std::vector<uint8_t> buf_;
};

Status CheckName(const std::string& name) {
  if (name.empty() || name.size() >= DM_NAME_LEN || name.find('/') != std::string::npos) {
    return Error(EINVAL, "device-mapper name '{}': 1..{} bytes, no '/'", name, DM_NAME_LEN - 1);
  }
  return Status::Ok();
}

}  // namespace

StatusOr<dev_t> DmCreate(const std::string& name, const DmTarget& t) {
  if (Status s = CheckName(name); !s.ok()) return s;
  if (t.type.empty() || t.type.size() >= DM_MAX_TYPE_NAME) {
    return Error(EINVAL, "device-mapper target type '{}' is invalid", t.type);
  }
  DmRequest create(name, 0);
  if (Status s = create.Run(DM_DEV_CREATE, "create", name); !s.ok()) return s;

  DmRequest load(name, sizeof(dm_target_spec) + t.params.size() + 1);
  load.io()->target_count = 1;
  auto* spec = reinterpret_cast<dm_target_spec*>(load.payload());
  spec->sector_start = 0;
  spec->length = t.length;
  std::memcpy(spec->target_type, t.type.data(), t.type.size());
  std::memcpy(load.payload() + sizeof(dm_target_spec), t.params.data(), t.params.size());
  Status st = load.Run(DM_TABLE_LOAD, "load table for", name);
  if (st.ok()) {
    DmRequest resume(name, 0);  // DM_DEV_SUSPEND without DM_SUSPEND_FLAG resumes
    st = resume.Run(DM_DEV_SUSPEND, "resume", name);
    if (st.ok()) return static_cast<dev_t>(resume.io()->dev);
  }
  // A device left without a table would block the name: take it away again.
  DmRequest undo(name, 0);
  (void)undo.Run(DM_DEV_REMOVE, "remove", name);
  return st;
}

Status DmRemove(const std::string& name) {
  if (Status s = CheckName(name); !s.ok()) return s;
  for (int i = 0;; ++i) {
    DmRequest rm(name, 0);
    Status s = rm.Run(DM_DEV_REMOVE, "remove", name);
    if (s.ok() || s.code() != EBUSY || i >= 50) return s;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Status DmMessage(const std::string& name, const std::string& msg) {
  if (Status s = CheckName(name); !s.ok()) return s;
  DmRequest req(name, sizeof(dm_target_msg) + msg.size() + 1);
  auto* tm = reinterpret_cast<dm_target_msg*>(req.payload());
  tm->sector = 0;
  std::memcpy(req.payload() + sizeof(dm_target_msg), msg.data(), msg.size());
  return req.Run(DM_TARGET_MSG, "message to", name);
}

}  // namespace nbdcsi::logwrites
