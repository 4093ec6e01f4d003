// A TCP proxy a test puts between two of its own processes on loopback, to make partitions:
// kPass forwards both ways; kSilent stops forwarding and reading in both directions, and leaves
// new connections unanswered, as a network that drops every packet does (the peers see silence,
// and their own timeouts decide; TCP's buffers keep what was sent, so healing the partition
// resumes the streams intact, as retransmission would). Only 127.0.0.0/8 addresses.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace nbdcsi::test {

class TcpProxy {
 public:
  enum class Mode { kPass, kSilent };

  TcpProxy() = default;
  TcpProxy(const TcpProxy&) = delete;
  ~TcpProxy() { Stop(); }

  // Listens on listen_ip:listen_port (0: a free port) and forwards to to_ip:to_port.
  bool Start(const std::string& listen_ip, int listen_port, const std::string& to_ip,
             int to_port) {
    if (listen_ip.rfind("127.", 0) != 0 || to_ip.rfind("127.", 0) != 0) return false;
    to_ = Addr(to_ip, to_port);
    lfd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = Addr(listen_ip, listen_port);
    if (bind(lfd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(lfd_, 64) != 0)
      return false;
    socklen_t len = sizeof a;
    getsockname(lfd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { Loop(); });
    return true;
  }
  int port() const { return port_; }
  // Returns once the proxy's loop has finished any round it began under the old mode: after
  // SetMode(kSilent) returns, not one more byte moves either way (bounded: a round polls 20 ms).
  void SetMode(Mode m) {
    mode_ = m;
    const uint64_t round = rounds_.load();
    for (int i = 0; i < 5000 && rounds_.load() <= round && !stop_; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // the poll of a bounded wait
  }
  // Closes every connection (and those accepted while silent) without forwarding what either
  // side sent and the proxy has not delivered yet: the bytes a partition held are lost, as when
  // the sender dies before its retransmission got through. Returns once done.
  void DropConnections() {
    drop_ = true;
    // The poll of a wait on the loop's thread, which takes at most a round (20 ms) to see drop_.
    while (drop_ && !stop_) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  void Stop() {
    if (stop_.exchange(true)) return;
    if (thread_.joinable()) thread_.join();
    CloseConnections();
    if (lfd_ >= 0) close(lfd_);
  }

 private:
  struct Pair {
    int a, b;            // the client's socket, the upstream socket
    std::string ab, ba;  // bytes read from one side, not yet written to the other
    bool dead = false;
  };

  static sockaddr_in Addr(const std::string& ip, int port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    inet_pton(AF_INET, ip.c_str(), &a.sin_addr);
    return a;
  }

  // Moves what `from` has to `to` through `buf`; false when the connection is over.
  static bool Pump(int from, int to, std::string& buf, short revents_from) {
    if (revents_from & (POLLIN | POLLHUP | POLLERR)) {
      char tmp[65536];
      ssize_t n = read(from, tmp, sizeof tmp);
      if (n == 0 || (n < 0 && errno != EAGAIN)) return false;
      if (n > 0) buf.append(tmp, static_cast<size_t>(n));
    }
    // Writes are tried whenever something waits (non-blocking): cheaper than a second poll.
    if (!buf.empty()) {
      ssize_t n = send(to, buf.data(), buf.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && errno != EAGAIN) return false;
      if (n > 0) buf.erase(0, static_cast<size_t>(n));
    }
    return true;
  }

  void Loop() {
    while (!stop_) {
      ++rounds_;  // before mode_ is read: a round counted after a SetMode sees its mode
      if (drop_) {
        CloseConnections();
        drop_ = false;
      }
      const bool pass = mode_ == Mode::kPass;
      // Connections accepted in silence get their upstream once the partition heals.
      if (pass) {
        for (int fd : waiting_) Connect(fd);
        waiting_.clear();
      }
      std::vector<pollfd> fds;
      fds.push_back({lfd_, POLLIN, 0});
      for (auto& p : pairs_) {
        short ea = pass ? static_cast<short>(POLLIN | (p.ba.empty() ? 0 : POLLOUT)) : 0;
        short eb = pass ? static_cast<short>(POLLIN | (p.ab.empty() ? 0 : POLLOUT)) : 0;
        fds.push_back({p.a, ea, 0});
        fds.push_back({p.b, eb, 0});
      }
      if (poll(fds.data(), fds.size(), 20) < 0) continue;
      if (fds[0].revents & POLLIN) {
        int c = accept4(lfd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (c >= 0) {
          if (pass) Connect(c);
          else waiting_.push_back(c);
        }
      }
      if (!pass) continue;
      for (size_t i = 0; i < pairs_.size(); ++i) {
        Pair& p = pairs_[i];
        const short ra = fds[1 + 2 * i].revents, rb = fds[2 + 2 * i].revents;
        if (!Pump(p.a, p.b, p.ab, ra) || !Pump(p.b, p.a, p.ba, rb)) p.dead = true;
      }
      for (auto it = pairs_.begin(); it != pairs_.end();) {
        if (it->dead) {
          close(it->a);
          close(it->b);
          it = pairs_.erase(it);
        } else {
          ++it;
        }
      }
    }
  }

  // Every forwarded connection and every one accepted while silent.
  void CloseConnections() {
    for (auto& p : pairs_) {
      close(p.a);
      close(p.b);
    }
    pairs_.clear();
    for (int fd : waiting_) close(fd);
    waiting_.clear();
  }

  void Connect(int c) {
    int u = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(u, reinterpret_cast<const sockaddr*>(&to_), sizeof to_) != 0) {
      close(u);
      close(c);
      return;
    }
    fcntl(u, F_SETFL, fcntl(u, F_GETFL) | O_NONBLOCK);
    pairs_.push_back({c, u, {}, {}, false});
  }

  sockaddr_in to_{};
  int lfd_ = -1;
  int port_ = 0;
  std::atomic<Mode> mode_{Mode::kPass};
  std::atomic<bool> stop_{false};
  std::atomic<bool> drop_{false};
  std::atomic<uint64_t> rounds_{0};  // rounds the loop began
  std::vector<Pair> pairs_;   // the loop's thread only (and Stop after the join)
  std::vector<int> waiting_;  // accepted while silent
  std::thread thread_;
};

}  // namespace nbdcsi::test
