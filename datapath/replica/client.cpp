#include "datapath/replica/client.h"

#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>

#include <algorithm>

#include "datapath/replica/client_impl.h"
#include "datapath/replica/nbd_errors.h"

namespace nbdcsi::replica {

using namespace client_internal;

StatusOr<std::string> WireExportName(const std::string& export_name, uint64_t epoch) {
  if (export_name.find('\0') != std::string::npos) {
    return Error(EINVAL, "export name contains a NUL byte");
  }
  if (export_name.find("@epoch=") != std::string::npos) {
    return Error(EINVAL, "export name \"{}\" already names an epoch; pass the epoch separately",
                 export_name);
  }
  std::string wire = epoch > 0 ? fmt::format("{}@epoch={}", export_name, epoch) : export_name;
  if (wire.size() > nbd::kMaxStringLen) {
    return Error(EINVAL, "export name of {} bytes (at most {})", wire.size(), nbd::kMaxStringLen);
  }
  return wire;
}

Status ReplicaClient::Impl::Submit(std::unique_ptr<Request> r) {
  if (opts.request_timeout.count() > 0) r->deadline = Clock::now() + opts.request_timeout;
  {
    std::lock_guard lk(mu);
    if (closing) return Error(ESHUTDOWN, "replica {}: the client is closed", name);
    if (healthy.load() == 0) {
      return Error(ENOTCONN, "replica {}: no connection left ({})", name, last_loss);
    }
    incoming.push_back(r.release());
  }
  c_requests.fetch_add(1, std::memory_order_relaxed);
  c_in_flight.fetch_add(1, std::memory_order_relaxed);
  // On the io thread (a callback submitting more) the loop drains incoming before it waits.
  if (tls_io_thread_of != this && !wake_pending.exchange(true)) Wake();
  return Status::Ok();
}

void ReplicaClient::Impl::Wake() {
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t w = write(wake_fd, &one, sizeof one);
}

Status ReplicaClient::Impl::CheckRange(uint16_t type, uint64_t offset, uint64_t length) const {
  const char* what = CommandName(type);
  if (length == 0) return Error(EINVAL, "replica {}: {} of 0 bytes", name, what);
  if ((type == nbd::kCmdRead || type == nbd::kCmdWrite) && length > props.max_block) {
    return Error(EINVAL, "replica {}: {} of {} bytes (the server takes at most {})", name, what,
                 length, props.max_block);
  }
  if (offset % props.min_block != 0 || length % props.min_block != 0) {
    return Error(EINVAL, "replica {}: {} [{}, +{}) not aligned to the server's {}-byte blocks",
                 name, what, offset, length, props.min_block);
  }
  const uint64_t end = size.load(std::memory_order_acquire);
  if (offset > end || length > end - offset) {
    return Error(type == nbd::kCmdRead || type == nbd::kCmdTrim || type == nbd::kCmdBlockStatus
                     ? EINVAL
                     : ENOSPC,
                 "replica {}: {} [{}, +{}) past the end of the {}-byte export", name, what, offset,
                 length, end);
  }
  if (type != nbd::kCmdRead && type != nbd::kCmdBlockStatus && opts.read_only) {
    return Error(EROFS, "replica {}: opened read-only", name);
  }
  return Status::Ok();
}

ReplicaClient::ReplicaClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ReplicaClient::~ReplicaClient() { Close(); }

StatusOr<std::unique_ptr<ReplicaClient>> ReplicaClient::Connect(const ClientOptions& o) {
  if (o.connections < 1 || o.connections > 64) {
    return Error(EINVAL, "replica client: {} connections (1 to 64)", o.connections);
  }
  if (o.max_in_flight_per_connection < 1 || o.max_in_flight_per_connection > 65536) {
    return Error(EINVAL, "replica client: {} requests in flight per connection (1 to 65536)",
                 o.max_in_flight_per_connection);
  }
  auto wire = WireExportName(o.export_name, o.epoch);
  if (!wire.ok()) return wire.status();
  std::unique_ptr<ClientTlsContext> tls;
  if (o.tls.enabled()) {
    auto t = ClientTlsContext::Load(o.tls);
    if (!t.ok()) return t.status();
    tls = std::move(*t);
  }

  auto impl = std::make_unique<Impl>();
  impl->opts = o;
  impl->name =
      o.name.empty() ? fmt::format("{} on {}", o.export_name, o.endpoint.ToString()) : o.name;
  for (int i = 0; i < o.connections; ++i) {
    auto c = OpenConnection(o.endpoint, *wire, tls.get(), o.read_only,
                            Clock::now() + o.handshake_timeout, o.base_allocation);
    if (!c.ok()) {
      return Status(c.status().code(),
                    fmt::format("replica {}: connection {} of {}: {}", impl->name, i + 1,
                                o.connections, c.status().message()));
    }
    auto conn = std::make_unique<Impl::Conn>();
    conn->impl = impl.get();
    conn->index = static_cast<size_t>(i);
    conn->fd = c->fd;
    conn->ssl = std::move(c->ssl);
    conn->slots.resize(o.max_in_flight_per_connection);
    for (uint32_t s = o.max_in_flight_per_connection; s-- > 0;) conn->free_slots.push_back(s);
    if (i == 0) {
      impl->props = c->props;
    } else if (c->props.size != impl->props.size || c->props.flags != impl->props.flags ||
               c->props.min_block != impl->props.min_block ||
               c->props.max_block != impl->props.max_block ||
               c->props.base_allocation != impl->props.base_allocation ||
               c->props.base_allocation_id != impl->props.base_allocation_id) {
      close(conn->fd);
      return Error(EPROTO,
                   "replica {}: connection {} sees another export (size {} flags {:#x}) "
                   "than connection 1 (size {} flags {:#x})",
                   impl->name, i + 1, c->props.size, c->props.flags, impl->props.size,
                   impl->props.flags);
    }
    impl->conns.push_back(std::move(conn));
  }
  impl->size.store(impl->props.size, std::memory_order_release);
  impl->tls = std::move(tls);
  // Enough entries for a recv and a send per connection, their resubmissions and the wake.
  const unsigned entries = std::max(64u, static_cast<unsigned>(o.connections) * 4 + 8);
  int r = io_uring_queue_init(entries, &impl->ring, 0);
  if (r < 0) return Error(-r, "replica {}: io_uring_queue_init: {}", impl->name, strerror(-r));
  impl->ring_ok = true;
  impl->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (impl->wake_fd < 0)
    return Error(errno, "replica {}: eventfd: {}", impl->name, strerror(errno));
  impl->healthy.store(impl->conns.size());
  Impl* m = impl.get();
  impl->thread = std::thread([m] {
    // OpenSSL never writes to the socket here (memory BIOs), but a send to a peer that is gone
    // must come back as EPIPE on any thread.
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &s, nullptr);
    pthread_setname_np(pthread_self(), "nbd-replica");
    m->Loop();
  });
  spdlog::info("replica {}: {} connection(s){}, export {} bytes, flags {:#x}, blocks {}/{}/{}",
               impl->name, o.connections, tls ? " over TLS" : "", impl->props.size,
               impl->props.flags, impl->props.min_block, impl->props.preferred_block,
               impl->props.max_block);
  return std::unique_ptr<ReplicaClient>(new ReplicaClient(std::move(impl)));
}

Status ReplicaClient::Read(uint64_t offset, std::span<uint8_t> buf, Callback cb) {
  Impl& m = *impl_;
  if (Status s = m.CheckRange(nbd::kCmdRead, offset, buf.size()); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdRead;
  r->offset = offset;
  r->length = static_cast<uint32_t>(buf.size());
  r->read_buf = buf.data();
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::Write(uint64_t offset, std::span<const uint8_t> data, bool fua, Callback cb) {
  Impl& m = *impl_;
  if (Status s = m.CheckRange(nbd::kCmdWrite, offset, data.size()); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdWrite;
  r->flags = fua ? nbd::kCmdFlagFua : 0;
  r->offset = offset;
  r->length = static_cast<uint32_t>(data.size());
  r->write_buf = data.data();
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::Flush(Callback cb) {
  Impl& m = *impl_;
  if (m.opts.read_only) return Error(EROFS, "replica {}: opened read-only", m.name);
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdFlush;
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::Trim(uint64_t offset, uint32_t length, bool fua, Callback cb) {
  Impl& m = *impl_;
  if (!m.props.can_trim())
    return Error(ENOTSUP, "replica {}: the server does not accept TRIM", m.name);
  if (Status s = m.CheckRange(nbd::kCmdTrim, offset, length); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdTrim;
  r->flags = fua ? nbd::kCmdFlagFua : 0;
  r->offset = offset;
  r->length = length;
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole,
                                  Callback cb) {
  Impl& m = *impl_;
  if (!m.props.can_write_zeroes()) {
    return Error(ENOTSUP, "replica {}: the server does not accept WRITE_ZEROES", m.name);
  }
  if (Status s = m.CheckRange(nbd::kCmdWriteZeroes, offset, length); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdWriteZeroes;
  r->flags =
      static_cast<uint16_t>((fua ? nbd::kCmdFlagFua : 0) | (no_hole ? nbd::kCmdFlagNoHole : 0));
  r->offset = offset;
  r->length = length;
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::BlockStatus(uint64_t offset, uint32_t length, BlockStatusCallback cb) {
  Impl& m = *impl_;
  if (!m.props.base_allocation) {
    return Error(ENOTSUP, "replica {}: no base:allocation meta context ({})", m.name,
                 m.opts.base_allocation ? "the server has none" : "not asked for at connect");
  }
  if (Status s = m.CheckRange(nbd::kCmdBlockStatus, offset, length); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdBlockStatus;
  r->offset = offset;
  r->length = length;
  r->context_id = m.props.base_allocation_id;
  r->extents = &r->ext;
  r->bs_cb = std::move(cb);
  return m.Submit(std::move(r));
}

void ReplicaClient::Close(milliseconds grace) {
  Impl& m = *impl_;
  if (tls_io_thread_of == &m) {
    // Before close_mu: a Close() in progress on another thread holds it while joining us.
    spdlog::critical("replica {}: Close() called from a callback on its own io thread", m.name);
    std::abort();
  }
  std::lock_guard ck(m.close_mu);
  if (m.joined) return;
  {
    std::lock_guard lk(m.mu);
    if (!m.closing) {
      m.closing = true;
      m.close_deadline = Clock::now() + grace;
    }
  }
  m.Wake();
  if (m.thread.joinable()) m.thread.join();
  m.joined = true;
}

const ExportProperties& ReplicaClient::export_properties() const { return impl_->props; }

uint64_t ReplicaClient::size() const { return impl_->size.load(std::memory_order_acquire); }

StatusOr<uint64_t> ReplicaClient::Grow(uint64_t size) {
  Impl& m = *impl_;
  if (size <= m.size.load(std::memory_order_acquire)) return m.size.load();
  auto wire = WireExportName(m.opts.export_name, m.opts.epoch);
  if (!wire.ok()) return wire.status();
  auto c = OpenConnection(m.opts.endpoint, *wire, m.tls.get(), m.opts.read_only,
                          Clock::now() + m.opts.handshake_timeout, m.opts.base_allocation);
  if (!c.ok()) {
    return Status(c.status().code(), fmt::format("replica {}: a handshake to learn its size: {}",
                                                 m.name, c.status().message()));
  }
  const uint64_t seen = c->props.size;
  // No request was sent: a plain close ends it (the server sees the client go).
  c->ssl.reset();
  close(c->fd);
  if (seen < size) {
    return Error(ENOSPC, "replica {}: its export is {} bytes, less than {}", m.name, seen, size);
  }
  uint64_t now = m.size.load(std::memory_order_acquire);
  while (now < size && !m.size.compare_exchange_weak(now, size, std::memory_order_acq_rel)) {
  }
  spdlog::info("replica {}: requests may now reach {} bytes (its export has {})", m.name, size,
               seen);
  return std::max(now, size);
}
const std::string& ReplicaClient::name() const { return impl_->name; }
size_t ReplicaClient::healthy_connections() const { return impl_->healthy.load(); }

ClientCounters ReplicaClient::counters() const {
  const Impl& m = *impl_;
  ClientCounters c;
  c.requests = m.c_requests.load();
  c.completed_ok = m.c_ok.load();
  c.errors = m.c_errors.load();
  c.timeouts = m.c_timeouts.load();
  c.bytes_read = m.c_bytes_read.load();
  c.bytes_written = m.c_bytes_written.load();
  c.in_flight = m.c_in_flight.load();
  c.connections_lost = m.c_lost.load();
  c.connections_healthy = m.healthy.load();
  return c;
}

}  // namespace nbdcsi::replica
