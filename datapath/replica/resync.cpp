#include "datapath/replica/resync.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <list>

#include "datapath/nbd/proto.h"

namespace nbdcsi::replica {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

Clock::duration RateLimiter::Acquire(uint64_t bytes, Clock::time_point now) {
  if (rate_ == 0) return Clock::duration::zero();
  // Idle time earns no credit: a job that was slow to start must not burst past the rate.
  if (!next_ || *next_ < now) next_ = now;
  const Clock::time_point start = *next_;
  *next_ += std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(static_cast<double>(bytes) / static_cast<double>(rate_)));
  return start - now;
}

std::optional<std::chrono::seconds> ResyncProgress::eta() const {
  const uint64_t done = done_bytes();
  if (done == 0 || elapsed <= Clock::duration::zero()) return std::nullopt;
  if (done >= total_bytes) return std::chrono::seconds(0);
  const double secs = std::chrono::duration<double>(elapsed).count() *
                      static_cast<double>(total_bytes - done) / static_cast<double>(done);
  return std::chrono::seconds(static_cast<int64_t>(secs + 0.999));
}

// One run. All state belongs to the Run thread except `events` (filled by callbacks).
struct Resync::Job {
  enum class Kind { kCopy, kSkip, kZero };
  // A span is what the bitmap clears at once: region-aligned, BeginCopy'd before anything of it
  // is read (or probed), cleared when every unit of it is flushed.
  struct Span {
    uint64_t off = 0, len = 0;
    uint64_t probed = 0;  // bytes already turned into units
    int units_left = 0;   // units made and not yet done
  };
  struct Unit {
    Span* span = nullptr;
    Kind kind = Kind::kCopy;
    uint64_t off = 0, len = 0;
    uint64_t issued = 0;  // bytes of chunks issued
    int pending = 0;      // chunks issued, not yet written
  };
  struct Chunk {
    Unit* unit = nullptr;
    uint64_t off = 0;
    uint32_t len = 0;
    int buf = -1;
  };
  enum class Ev { kRead, kWrite, kFlush, kStatus };
  struct Event {
    Ev type;
    Chunk* chunk = nullptr;
    Status status;
    std::vector<BlockExtent> extents;
  };

  Resync& r;
  RegionBitmap* bitmap = nullptr;
  bool probe = false;
  HolePolicy holes = HolePolicy::kSkip;
  uint64_t size = 0;
  uint32_t chunk_max = 0;
  uint32_t align = 1;
  uint64_t span_max = 0;
  RateLimiter limiter;
  Clock::time_point start;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<Event> events;  // guarded by mu

  std::deque<ByteRange> todo;  // not yet cut into spans
  std::list<Span> spans;
  Span* probing = nullptr;  // the span whose BLOCK_STATUS is due or in flight
  bool status_in_flight = false;
  bool source_has_status = true;
  std::list<Unit> units;
  std::deque<Unit*> ready;  // units with chunks left to issue
  std::vector<Unit*> written;
  std::vector<Unit*> flushing;
  bool flush_in_flight = false;
  uint64_t unflushed = 0;
  int in_flight = 0;  // chunks
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<int> free_bufs;
  std::optional<Clock::time_point> paced_until;  // a copy chunk's slot from the limiter
  Status failure;

  Job(Resync& owner, uint64_t rate) : r(owner), limiter(rate) {}

  static Clock::time_point Now() { return Clock::now(); }

  void Post(Event e) {
    std::lock_guard lk(mu);
    events.push_back(std::move(e));
    cv.notify_one();
  }

  // `where` empty: the failure has no range (a cancel).
  void Fail(Status s, ByteRange where) {
    if (!failure.ok()) return;
    failure = std::move(s);
    if (where.length == 0) return;
    std::lock_guard lk(r.mu_);
    r.progress_.failed = where;
  }

  bool Cancelled() {
    std::lock_guard lk(r.mu_);
    return r.cancel_;
  }

  // ---- planning ----

  // Cuts the next span off `todo`: region-aligned for the bitmap (the dirty runs are).
  bool NextSpan() {
    if (todo.empty()) return false;
    ByteRange& t = todo.front();
    const uint64_t len = std::min(t.length, span_max);
    spans.push_back(Span{t.offset, len});
    Span* sp = &spans.back();
    t.offset += len;
    t.length -= len;
    if (t.length == 0) todo.pop_front();
    if (bitmap) {
      if (Status s = bitmap->BeginCopy(sp->off, sp->len); !s.ok()) {
        Fail(s, {sp->off, sp->len});
        return false;
      }
    }
    if (probe && source_has_status) {
      probing = sp;
    } else {
      AddUnit(sp, Kind::kCopy, sp->off, sp->len);
      sp->probed = sp->len;
    }
    return true;
  }

  void AddUnit(Span* sp, Kind kind, uint64_t off, uint64_t len) {
    if (kind == Kind::kZero && !r.dst_.props().can_write_zeroes()) kind = Kind::kCopy;
    units.push_back(Unit{sp, kind, off, len});
    ++sp->units_left;
    Unit* u = &units.back();
    if (kind == Kind::kSkip) {
      UnitDone(u);  // nothing to write, so nothing to flush
    } else {
      ready.push_back(u);
    }
  }

  void AskStatus() {
    Span* sp = probing;
    const uint64_t off = sp->off + sp->probed;
    const uint32_t len =
        static_cast<uint32_t>(std::min<uint64_t>(sp->len - sp->probed, r.opts_.block_status_bytes));
    Status s = r.src_.BlockStatus(off, len, [this](const Status& st, std::vector<BlockExtent> e) {
      Post({Ev::kStatus, nullptr, st, std::move(e)});
    });
    if (s.code() == ENOTSUP) {
      // No base:allocation on the source: everything is data.
      spdlog::warn("resync: {}; copying every byte", s.message());
      source_has_status = false;
      probing = nullptr;
      AddUnit(sp, Kind::kCopy, off, sp->len - sp->probed);
      sp->probed = sp->len;
      return;
    }
    if (!s.ok()) return Fail(Prefix(s, "BLOCK_STATUS on the source", off, len), {off, len});
    status_in_flight = true;
  }

  void OnStatus(Event& e) {
    status_in_flight = false;
    Span* sp = probing;
    const uint64_t off = sp->off + sp->probed;
    if (!e.status.ok()) {
      const uint64_t len = std::min<uint64_t>(sp->len - sp->probed, r.opts_.block_status_bytes);
      return Fail(Prefix(e.status, "BLOCK_STATUS on the source", off, len), {off, len});
    }
    uint64_t at = off;
    const uint64_t end = sp->off + sp->len;
    for (BlockExtent x : e.extents) {
      // ReplicaClient's parser already holds a server to the request; another channel might not.
      if (at >= end) break;
      x.length = static_cast<uint32_t>(std::min<uint64_t>(x.length, end - at));
      if (x.length == 0) continue;
      // ZERO: reads return zeroes (a hole or allocated zeroes). A HOLE without ZERO (a backing
      // file shows through) is data to us.
      const bool zero = (x.flags & nbd::kStateZero) != 0;
      const Kind kind = !zero                        ? Kind::kCopy
                        : holes == HolePolicy::kSkip ? Kind::kSkip
                                                     : Kind::kZero;
      // Neighbouring extents of one kind make one unit (fewer, larger writes).
      Unit* last = units.empty() ? nullptr : &units.back();
      if (last && last->span == sp && last->kind == kind && last->off + last->len == at &&
          kind != Kind::kSkip && last->issued < last->len) {
        last->len += x.length;
      } else {
        AddUnit(sp, kind, at, x.length);
      }
      at += x.length;
    }
    if (at == off) {
      return Fail(Status(EPROTO, fmt::format("resync: BLOCK_STATUS on the source [{}, +...) "
                                             "answered no extent",
                                             off)),
                  {off, sp->len - sp->probed});
    }
    sp->probed += at - off;
    if (sp->probed >= sp->len) probing = nullptr;
    MaybeFinishSpan(sp);
  }

  // ---- issuing ----

  void Issue() {
    while (failure.ok() && in_flight < r.opts_.max_in_flight && !ready.empty()) {
      Unit* u = ready.front();
      const uint64_t left = u->len - u->issued;
      auto* c = new Chunk{u, u->off + u->issued, 0, -1};
      Status s;
      if (u->kind == Kind::kZero) {
        // WRITE_ZEROES carries no payload: one request per 1 GiB is plenty.
        c->len = static_cast<uint32_t>(std::min<uint64_t>(left, uint64_t{1} << 30));
        s = r.dst_.WriteZeroes(c->off, c->len, [this, c](const Status& st) {
          Post({Ev::kWrite, c, st, {}});
        });
        if (!s.ok()) s = Prefix(s, "WRITE_ZEROES on the destination", c->off, c->len);
      } else {
        c->len = static_cast<uint32_t>(std::min<uint64_t>(left, chunk_max));
        if (!paced_until) paced_until = Now() + limiter.Acquire(c->len, Now());
        if (Now() < *paced_until) {
          delete c;
          return;  // the Run loop waits until then
        }
        paced_until.reset();
        c->buf = free_bufs.back();
        free_bufs.pop_back();
        s = r.src_.Read(c->off, std::span<uint8_t>(bufs[c->buf].data(), c->len),
                        [this, c](const Status& st) {
                          Post({Ev::kRead, c, st, {}});
                        });
        if (!s.ok()) {
          free_bufs.push_back(c->buf);
          s = Prefix(s, "READ from the source", c->off, c->len);
        }
      }
      if (!s.ok()) {
        Fail(s, {c->off, c->len});
        delete c;
        return;
      }
      ++in_flight;
      ++u->pending;
      u->issued += c->len;
      if (u->issued == u->len) ready.pop_front();
    }
  }

  void OnRead(Event& e) {
    Chunk* c = e.chunk;
    if (e.status.ok() && failure.ok()) {
      Status s = r.dst_.Write(c->off, std::span<const uint8_t>(bufs[c->buf].data(), c->len),
                              [this, c](const Status& st) {
                                Post({Ev::kWrite, c, st, {}});
                              });
      if (s.ok()) return;
      Fail(Prefix(s, "WRITE to the destination", c->off, c->len), {c->off, c->len});
    } else if (!e.status.ok()) {
      Fail(Prefix(e.status, "READ from the source", c->off, c->len), {c->off, c->len});
    }
    Retire(c);
  }

  void OnWrite(Event& e) {
    Chunk* c = e.chunk;
    Unit* u = c->unit;
    if (!e.status.ok()) {
      Fail(Prefix(e.status,
                  u->kind == Kind::kZero ? "WRITE_ZEROES on the destination"
                                         : "WRITE to the destination",
                  c->off, c->len),
           {c->off, c->len});
    }
    const bool ok = e.status.ok();
    Retire(c);
    if (!ok) return;
    if (--u->pending == 0 && u->issued == u->len) {
      written.push_back(u);
      unflushed += u->len;
    }
  }

  void Retire(Chunk* c) {
    --in_flight;
    if (c->buf >= 0) free_bufs.push_back(c->buf);
    delete c;
  }

  bool NothingLeftToIssue() const {
    return todo.empty() && ready.empty() && !probing && !status_in_flight;
  }

  void MaybeFlush() {
    if (flush_in_flight || written.empty() || !failure.ok()) return;
    // Also when the pipeline is idle: at the end, or waiting for the rate limiter (progress
    // must not lag a slow job by a whole flush_every_bytes).
    if (unflushed < r.opts_.flush_every_bytes &&
        !(in_flight == 0 && (NothingLeftToIssue() || paced_until))) {
      return;
    }
    flushing.swap(written);
    unflushed = 0;
    Status s = r.dst_.Flush([this](const Status& st) { Post({Ev::kFlush, nullptr, st, {}}); });
    if (!s.ok()) return Fail(Prefix(s, "FLUSH of the destination", 0, 0), Covering(flushing));
    flush_in_flight = true;
  }

  void OnFlush(Event& e) {
    flush_in_flight = false;
    if (!e.status.ok()) {
      return Fail(Prefix(e.status, "FLUSH of the destination", 0, 0), Covering(flushing));
    }
    for (Unit* u : flushing) UnitDone(u);
    flushing.clear();
    Report();
  }

  // A unit is on the destination's disk (or needed nothing).
  void UnitDone(Unit* u) {
    {
      std::lock_guard lk(r.mu_);
      (u->kind == Kind::kCopy   ? r.progress_.copied_bytes
       : u->kind == Kind::kZero ? r.progress_.zeroed_bytes
                                : r.progress_.skipped_bytes) += u->len;
    }
    Span* sp = u->span;
    --sp->units_left;
    units.remove_if([u](const Unit& x) { return &x == u; });
    MaybeFinishSpan(sp);
  }

  void MaybeFinishSpan(Span* sp) {
    if (sp->units_left > 0 || sp->probed < sp->len || probing == sp) return;
    // Also after a failure: every unit of this span is flushed, so its bits may go.
    if (bitmap) {
      if (Status s = bitmap->ClearCopied(sp->off, sp->len); !s.ok()) Fail(s, {sp->off, sp->len});
    }
    spans.remove_if([sp](const Span& x) { return &x == sp; });
  }

  static ByteRange Covering(const std::vector<Unit*>& us) {
    if (us.empty()) return {};
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const Unit* u : us) {
      lo = std::min(lo, u->off);
      hi = std::max(hi, u->off + u->len);
    }
    return {lo, hi - lo};
  }

  static Status Prefix(const Status& s, const char* step, uint64_t off, uint64_t len) {
    if (len == 0) return Status(s.code(), fmt::format("resync: {}: {}", step, s.message()));
    return Status(s.code(), fmt::format("resync: {} [{}, +{}): {}", step, off, len, s.message()));
  }

  void Report() {
    ResyncProgress p;
    {
      std::lock_guard lk(r.mu_);
      r.progress_.elapsed = Now() - start;
      p = r.progress_;
    }
    if (r.opts_.on_progress) r.opts_.on_progress(p);
  }

  // ---- the loop ----

  Status Run() {
    start = Now();
    for (;;) {
      {
        std::deque<Event> got;
        {
          std::lock_guard lk(mu);
          got.swap(events);
        }
        for (Event& e : got) {
          switch (e.type) {
            case Ev::kRead:
              OnRead(e);
              break;
            case Ev::kWrite:
              OnWrite(e);
              break;
            case Ev::kFlush:
              OnFlush(e);
              break;
            case Ev::kStatus:
              OnStatus(e);
              break;
          }
        }
      }
      if (failure.ok() && Cancelled()) Fail(Status(ECANCELED, "resync: cancelled"), {});
      const bool busy = in_flight > 0 || status_in_flight || flush_in_flight;
      if (!failure.ok()) {
        if (!busy) break;  // every callback has run: the buffers may go
      } else {
        // Keep enough planned to fill the pipeline; probe one span at a time.
        while (failure.ok() && !probing &&
               ready.size() < static_cast<size_t>(r.opts_.max_in_flight) && NextSpan()) {
        }
        if (failure.ok() && probing && !status_in_flight &&
            ready.size() < static_cast<size_t>(r.opts_.max_in_flight)) {
          AskStatus();
        }
        Issue();
        MaybeFlush();
        if (failure.ok() && NothingLeftToIssue() && in_flight == 0 && !flush_in_flight &&
            written.empty()) {
          break;
        }
        if (!failure.ok()) continue;
      }
      std::unique_lock lk(mu);
      if (!events.empty()) continue;
      if (paced_until && failure.ok()) {
        const auto wait = *paced_until - Now();
        cv.wait_for(lk, std::max(wait, Clock::duration(std::chrono::microseconds(100))));
      } else {
        // Cancel() notifies too.
        cv.wait_for(lk, std::chrono::milliseconds(200));
      }
    }
    {
      std::lock_guard lk(r.mu_);
      r.progress_.elapsed = Now() - start;
      r.progress_.finished = true;
    }
    Report();
    return failure;
  }
};

Resync::Resync(BlockChannel& source, BlockChannel& destination, ResyncOptions options)
    : src_(source), dst_(destination), opts_(std::move(options)) {}

Resync::~Resync() = default;

void Resync::Cancel() {
  std::lock_guard lk(mu_);
  cancel_ = true;
  if (job_) {
    std::lock_guard jl(job_->mu);
    job_->cv.notify_all();
  }
}

ResyncProgress Resync::progress() const {
  std::lock_guard lk(mu_);
  ResyncProgress p = progress_;
  if (running_) p.elapsed = Clock::now() - started_;  // live, for the ETA of a running job
  return p;
}

namespace {

Status CheckPeers(const BlockChannel& src, const BlockChannel& dst, const ResyncOptions& o) {
  const ExportProperties& a = src.props();
  const ExportProperties& b = dst.props();
  if (a.size != b.size) {
    return Error(EINVAL, "resync: the source holds {} bytes, the destination {}", a.size, b.size);
  }
  if (b.read_only()) return Error(EROFS, "resync: the destination is read-only");
  if (o.max_in_flight < 1 || o.chunk_bytes == 0 || o.unit_bytes == 0 || o.block_status_bytes == 0) {
    return Error(EINVAL, "resync: max_in_flight, chunk, unit and block-status sizes must be > 0");
  }
  return Status::Ok();
}

}  // namespace

Status Resync::RunDirty(RegionBitmap& bitmap) {
  if (Status s = CheckPeers(src_, dst_, opts_); !s.ok()) return s;
  // A smaller bitmap: the volume was expanded (every copy grew) while this replica was out, and
  // its target kept the old size until it is back (ReplicaSet::Grow waits for every replica in
  // sync), so nothing was written past the bitmap's end: both copies are zeroes there.
  if (bitmap.volume_size() > src_.props().size) {
    return Error(EINVAL, "resync: bitmap {} covers {} bytes, the replicas hold {}", bitmap.path(),
                 bitmap.volume_size(), src_.props().size);
  }
  Job job(*this, opts_.rate_bytes_per_second);
  job.bitmap = &bitmap;
  job.probe = opts_.dirty_uses_block_status;
  for (const ByteRange& d : bitmap.DirtyRanges()) job.todo.push_back(d);
  // Spans are whole regions, so ClearCopied accepts them.
  job.span_max = std::max(
      bitmap.region_size(),
      (std::max<uint64_t>(opts_.unit_bytes, 1) / bitmap.region_size()) * bitmap.region_size());
  return Start(job);
}

Status Resync::RunFull() {
  if (Status s = CheckPeers(src_, dst_, opts_); !s.ok()) return s;
  Job job(*this, opts_.rate_bytes_per_second);
  job.probe = true;
  job.todo.push_back({0, src_.props().size});
  // No bitmap to clear: a span is one BLOCK_STATUS question.
  job.span_max = opts_.block_status_bytes;
  return Start(job);
}

Status Resync::Start(Job& job) {
  const ExportProperties& a = src_.props();
  const ExportProperties& b = dst_.props();
  job.size = a.size;
  job.holes = opts_.holes;
  job.align = std::max(a.min_block, b.min_block);
  uint64_t chunk = std::min<uint64_t>({opts_.chunk_bytes, a.max_block, b.max_block});
  chunk -= chunk % job.align;
  job.chunk_max = static_cast<uint32_t>(std::max<uint64_t>(chunk, job.align));
  job.bufs.resize(static_cast<size_t>(opts_.max_in_flight));
  for (int i = 0; i < opts_.max_in_flight; ++i) {
    job.bufs[static_cast<size_t>(i)].resize(job.chunk_max);
    job.free_bufs.push_back(i);
  }
  uint64_t total = 0;
  for (const ByteRange& t : job.todo) total += t.length;
  {
    std::lock_guard lk(mu_);
    if (running_) return Error(EBUSY, "resync: a job is already running on this object");
    running_ = true;
    job_ = &job;
    progress_ = ResyncProgress{};
    progress_.total_bytes = total;
    started_ = Clock::now();
  }
  Status s = job.Run();
  {
    std::lock_guard lk(mu_);
    running_ = false;
    job_ = nullptr;
  }
  return s;
}

}  // namespace nbdcsi::replica
