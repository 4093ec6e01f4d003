#include "datapath/attach/kernel_nbd.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <linux/nbd-netlink.h>
#include <netlink/genl/ctrl.h>
#include <netlink/genl/genl.h>
#include <netlink/netlink.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/block_devices.h"
#include "common/c_ptr.h"
#include "common/fs_util.h"

namespace nbdcsi::datapath {
namespace {

using NlSock = CPtr<nl_sock, nl_socket_free>;
using NlMsg = CPtr<nl_msg, nlmsg_free>;
using NlCb = CPtr<nl_cb, nl_cb_put>;

// libnl's own error numbers, for failures that happen before the kernel answers.
int NlToErrno(int nlerr) {
  switch (nlerr < 0 ? -nlerr : nlerr) {
    case NLE_NOMEM: return ENOMEM;
    case NLE_OBJ_NOTFOUND: return ENOENT;
    case NLE_EXIST: return EEXIST;
    case NLE_BUSY: return EBUSY;
    case NLE_PERM: return EPERM;
    case NLE_INVAL: return EINVAL;
    case NLE_OPNOTSUPP: return EOPNOTSUPP;
    case NLE_AGAIN: return EAGAIN;
    default: return EIO;
  }
}

struct Family {
  NlSock sock;
  int id = -1;
};

StatusOr<Family> OpenFamily() {
  Family f;
  f.sock.reset(nl_socket_alloc());
  if (!f.sock) return Error(ENOMEM, "netlink: cannot allocate a socket");
  if (int r = genl_connect(f.sock.get()); r < 0) {
    return Error(NlToErrno(r), "netlink: cannot connect: {}", nl_geterror(r));
  }
  f.id = genl_ctrl_resolve(f.sock.get(), NBD_GENL_FAMILY_NAME);
  if (f.id < 0) {
    return Error(ENODEV,
                 "kernel NBD unavailable: the nbd module is not loaded (no \"{}\" generic "
                 "netlink family; modprobe nbd)",
                 NBD_GENL_FAMILY_NAME);
  }
  return f;
}

// What one request/response exchange produced. The kernel's errno is taken from the NLMSG_ERROR
// itself: libnl's own translation folds many distinct errnos into one code.
struct Exchange {
  int index = -1;
  int kernel_errno = 0;
  bool done = false;
};

int OnValid(nl_msg* msg, void* arg) {
  auto* ex = static_cast<Exchange*>(arg);
  nlattr* attrs[NBD_ATTR_MAX + 1] = {};
  if (genlmsg_parse(nlmsg_hdr(msg), 0, attrs, NBD_ATTR_MAX, nullptr) == 0 &&
      attrs[NBD_ATTR_INDEX]) {
    ex->index = static_cast<int>(nla_get_u32(attrs[NBD_ATTR_INDEX]));
  }
  return NL_OK;
}

int OnError(sockaddr_nl*, nlmsgerr* err, void* arg) {
  auto* ex = static_cast<Exchange*>(arg);
  ex->kernel_errno = err->error < 0 ? -err->error : err->error;
  ex->done = true;
  return NL_STOP;
}

int OnAck(nl_msg*, void* arg) {
  static_cast<Exchange*>(arg)->done = true;
  return NL_STOP;
}

StatusOr<NlMsg> NewMessage(const Family& f, uint8_t cmd) {
  NlMsg msg(nlmsg_alloc());
  if (!msg) return Error(ENOMEM, "netlink: cannot allocate a message");
  if (!genlmsg_put(msg.get(), NL_AUTO_PORT, NL_AUTO_SEQ, f.id, 0, 0, cmd, 0)) {
    return Error(ENOMEM, "netlink: cannot build the message header");
  }
  return msg;
}

// nla_put_* only fail when the message buffer is full; one check at the end covers them all.
struct Builder {
  nl_msg* m;
  bool failed = false;
  void U32(int attr, uint32_t v) { failed |= nla_put_u32(m, attr, v) < 0; }
  void U64(int attr, uint64_t v) { failed |= nla_put_u64(m, attr, v) < 0; }
  void Str(int attr, const std::string& v) { failed |= nla_put_string(m, attr, v.c_str()) < 0; }
  void Sockets(const std::vector<int>& fds) {
    nlattr* socks = nla_nest_start(m, NBD_ATTR_SOCKETS);
    if (!socks) {
      failed = true;
      return;
    }
    for (int fd : fds) {
      nlattr* item = nla_nest_start(m, NBD_SOCK_ITEM);
      if (!item) {
        failed = true;
        return;
      }
      U32(NBD_SOCK_FD, static_cast<uint32_t>(fd));
      nla_nest_end(m, item);
    }
    nla_nest_end(m, socks);
  }
};

StatusOr<Exchange> Send(Family& f, NlMsg msg, const char* what) {
  NlCb cb(nl_cb_alloc(NL_CB_DEFAULT));
  if (!cb) return Error(ENOMEM, "netlink: cannot allocate callbacks");
  Exchange ex;
  nl_cb_set(cb.get(), NL_CB_VALID, NL_CB_CUSTOM, OnValid, &ex);
  nl_cb_set(cb.get(), NL_CB_ACK, NL_CB_CUSTOM, OnAck, &ex);
  nl_cb_err(cb.get(), NL_CB_CUSTOM, OnError, &ex);
  // nl_send_auto asks for an ACK (NLM_F_ACK), so every request ends in exactly one
  // NLMSG_ERROR: error 0 (ACK) or the kernel's -errno.
  if (int r = nl_send_auto(f.sock.get(), msg.get()); r < 0) {
    return Error(NlToErrno(r), "nbd netlink {}: cannot send: {}", what, nl_geterror(r));
  }
  while (!ex.done) {
    int r = nl_recvmsgs(f.sock.get(), cb.get());
    if (r < 0 && !ex.done) {
      return Error(NlToErrno(r), "nbd netlink {}: {}", what, nl_geterror(r));
    }
  }
  if (ex.kernel_errno != 0) {
    return Error(ex.kernel_errno, "nbd netlink {}: the kernel refused: {}", what,
                 std::strerror(ex.kernel_errno));
  }
  return ex;
}

// One request: a fresh family socket, command `cmd` with the attributes `fill` adds, and the
// kernel's answer. `what` names it in errors; the overflow message names the bare command.
StatusOr<Exchange> Request(uint8_t cmd, const char* cmd_name, const char* what,
                           const std::function<void(Builder&)>& fill) {
  auto f = OpenFamily();
  if (!f.ok()) return f.status();
  auto msg = NewMessage(*f, cmd);
  if (!msg.ok()) return msg.status();
  Builder b{msg->get()};
  fill(b);
  if (b.failed) return Error(EMSGSIZE, "nbd netlink {}: message too large", cmd_name);
  return Send(*f, std::move(*msg), what);
}

std::string ReadSysfs(int index, const char* leaf) {
  std::ifstream in(fmt::format("/sys/block/nbd{}/{}", index, leaf));
  std::string s;
  if (in) std::getline(in, s);
  return s;
}

int AcceptAnySeq(nl_msg*, void*) { return NL_OK; }  // multicast events carry no sequence

class LinuxKernelNbd final : public KernelNbdInterface {
 public:
  ~LinuxKernelNbd() override { StopWatching(); }

  Status Available() override {
    auto f = OpenFamily();
    return f.ok() ? Status::Ok() : f.status();
  }

  StatusOr<int> Connect(const std::vector<int>& fds, const KernelConnectParams& p) override {
    auto ex = Request(NBD_CMD_CONNECT, "CONNECT", "CONNECT", [&](Builder& b) {
      if (p.index >= 0) b.U32(NBD_ATTR_INDEX, static_cast<uint32_t>(p.index));
      b.U64(NBD_ATTR_SIZE_BYTES, p.size_bytes);
      b.U64(NBD_ATTR_BLOCK_SIZE_BYTES, p.block_size);
      b.U64(NBD_ATTR_SERVER_FLAGS, p.server_flags);
      b.U64(NBD_ATTR_TIMEOUT, p.io_timeout_s);
      b.U64(NBD_ATTR_DEAD_CONN_TIMEOUT, p.dead_conn_timeout_s);
      if (!p.backend_identifier.empty()) b.Str(NBD_ATTR_BACKEND_IDENTIFIER, p.backend_identifier);
      b.Sockets(fds);
    });
    if (!ex.ok()) return ex.status();
    if (ex->index < 0) return Error(EIO, "nbd netlink CONNECT: the kernel returned no index");
    return ex->index;
  }

  Status Reconfigure(int index, const std::vector<int>& fds, uint64_t dead_conn_timeout_s,
                     const std::string& cookie) override {
    auto ex = Request(NBD_CMD_RECONFIGURE, "RECONFIGURE", "RECONFIGURE", [&](Builder& b) {
      b.U32(NBD_ATTR_INDEX, static_cast<uint32_t>(index));
      b.U64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_s);
      if (!cookie.empty()) b.Str(NBD_ATTR_BACKEND_IDENTIFIER, cookie);
      b.Sockets(fds);
    });
    return ex.ok() ? Status::Ok() : ex.status();
  }

  Status Resize(int index, uint64_t size_bytes, const std::string& cookie) override {
    auto ex = Request(NBD_CMD_RECONFIGURE, "RECONFIGURE", "RECONFIGURE (size)", [&](Builder& b) {
      b.U32(NBD_ATTR_INDEX, static_cast<uint32_t>(index));
      b.U64(NBD_ATTR_SIZE_BYTES, size_bytes);
      if (!cookie.empty()) b.Str(NBD_ATTR_BACKEND_IDENTIFIER, cookie);
    });
    return ex.ok() ? Status::Ok() : ex.status();
  }

  uint64_t SizeBytes(int index) override {
    try {
      return std::stoull(ReadSysfs(index, "size")) * 512;
    } catch (const std::exception&) {
      return 0;
    }
  }

  Status Disconnect(int index) override {
    auto ex = Request(NBD_CMD_DISCONNECT, "DISCONNECT", "DISCONNECT", [&](Builder& b) {
      b.U32(NBD_ATTR_INDEX, static_cast<uint32_t>(index));
    });
    return ex.ok() ? Status::Ok() : ex.status();
  }

  std::string Backend(int index) override { return ReadSysfs(index, "backend"); }

  int FindByBackend(const std::string& cookie) override {
    DIR* d = opendir("/sys/block");
    if (!d) return -1;
    int found = -1;
    while (dirent* e = readdir(d)) {
      std::optional<int> index = WholeDeviceIndex(e->d_name, "nbd");
      if (index && Backend(*index) == cookie) {
        found = *index;
        break;
      }
    }
    closedir(d);
    return found;
  }

  bool Connected(int index) override {
    if (ReadSysfs(index, "pid").empty()) return false;
    std::string size = ReadSysfs(index, "size");
    return !size.empty() && size != "0";
  }

  Status CheckNotInUse(int index) override { return CheckBlockDeviceNotInUse(NbdDevicePath(index)); }

  StatusOr<unsigned> SetMaxSectorsKb(int index, unsigned kb) override {
    unsigned hw = 0;
    try {
      hw = static_cast<unsigned>(std::stoul(ReadSysfs(index, "queue/max_hw_sectors_kb")));
    } catch (const std::exception&) {
      return Error(ENOENT, "/sys/block/nbd{}/queue/max_hw_sectors_kb is unreadable", index);
    }
    unsigned want = std::min(kb, hw);
    std::string path = fmt::format("/sys/block/nbd{}/queue/max_sectors_kb", index);
    int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) return Error(errno, "cannot open {}: {}", path, std::strerror(errno));
    std::string v = std::to_string(want);
    ssize_t n = write(fd, v.data(), v.size());
    int err = errno;
    close(fd);
    if (n != static_cast<ssize_t>(v.size())) {
      return Error(n < 0 ? err : EIO, "cannot write {} to {}: {}", v, path,
                   std::strerror(n < 0 ? err : EIO));
    }
    return want;
  }

  Status WatchLinkDead(std::function<void(int)> on_dead) override {
    if (watcher_.joinable()) return Error(EALREADY, "nbd netlink: already watching LINK_DEAD");
    auto f = OpenFamily();
    if (!f.ok()) return f.status();
    int grp = genl_ctrl_resolve_grp(f->sock.get(), NBD_GENL_FAMILY_NAME, NBD_GENL_MCAST_GROUP_NAME);
    if (grp < 0) {
      return Error(ENOENT, "nbd netlink: no multicast group {}: {}", NBD_GENL_MCAST_GROUP_NAME,
                   nl_geterror(grp));
    }
    if (int r = nl_socket_add_membership(f->sock.get(), grp); r < 0) {
      return Error(NlToErrno(r), "nbd netlink: cannot join {}: {}", NBD_GENL_MCAST_GROUP_NAME,
                   nl_geterror(r));
    }
    if (int r = nl_socket_set_nonblocking(f->sock.get()); r < 0) {
      return Error(NlToErrno(r), "nbd netlink: {}", nl_geterror(r));
    }
    on_dead_ = std::move(on_dead);
    watch_ = std::move(*f);
    stop_ = false;
    watcher_ = std::thread([this] { WatchLoop(); });
    return Status::Ok();
  }

  void StopWatching() override {
    stop_ = true;
    if (watcher_.joinable()) watcher_.join();
    watch_.sock.reset();
  }

 private:
  static int OnEvent(nl_msg* msg, void* arg) {
    auto* self = static_cast<LinuxKernelNbd*>(arg);
    if (genlmsg_hdr(nlmsg_hdr(msg))->cmd != NBD_CMD_LINK_DEAD) return NL_OK;
    nlattr* attrs[NBD_ATTR_MAX + 1] = {};
    if (genlmsg_parse(nlmsg_hdr(msg), 0, attrs, NBD_ATTR_MAX, nullptr) == 0 &&
        attrs[NBD_ATTR_INDEX]) {
      self->on_dead_(static_cast<int>(nla_get_u32(attrs[NBD_ATTR_INDEX])));
    }
    return NL_OK;
  }

  void WatchLoop() {
    pthread_setname_np(pthread_self(), "nbd-linkdead");
    NlCb cb(nl_cb_alloc(NL_CB_DEFAULT));
    if (!cb) {
      spdlog::error("nbd netlink: cannot allocate callbacks; LINK_DEAD events are not watched");
      return;
    }
    nl_cb_set(cb.get(), NL_CB_VALID, NL_CB_CUSTOM, OnEvent, this);
    nl_cb_set(cb.get(), NL_CB_SEQ_CHECK, NL_CB_CUSTOM, AcceptAnySeq, nullptr);
    const int fd = nl_socket_get_fd(watch_.sock.get());
    // A short poll keeps StopWatching prompt without a wake-up pipe.
    while (!stop_) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 200) > 0) {
        int r = nl_recvmsgs(watch_.sock.get(), cb.get());
        if (r < 0 && r != -NLE_AGAIN) {
          // ENOBUFS (events overflowed the socket) loses events; the next one still arrives.
          spdlog::warn("nbd netlink: reading LINK_DEAD events: {}", nl_geterror(r));
        }
      }
    }
  }

  Family watch_;
  std::function<void(int)> on_dead_;
  std::atomic<bool> stop_{false};
  std::thread watcher_;
};

}  // namespace

std::unique_ptr<KernelNbdInterface> MakeLinuxKernelNbd() {
  return std::make_unique<LinuxKernelNbd>();
}

std::string NbdDevicePath(int index) { return fmt::format("/dev/nbd{}", index); }

}  // namespace nbdcsi::datapath
