#include "datapath/replica/replica_set.h"

#include <array>
#include <bit>
#include <condition_variable>
#include <deque>
#include <algorithm>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include <spdlog/spdlog.h>

namespace nbdcsi::replica {
namespace {

using datapath::BackendDone;
using datapath::BackendRequest;
using Mask = uint32_t;
static_assert(ReplicaSet::kMaxMembers <= 32, "members are tracked in a 32-bit mask");

Mask Bit(size_t i) { return Mask{1} << i; }

bool Modifies(BackendRequest::Op op) {
  return op == BackendRequest::Op::kWrite || op == BackendRequest::Op::kTrim ||
         op == BackendRequest::Op::kWriteZeroes;
}

bool Overlaps(const BackendRequest& r, uint64_t offset, uint64_t length) {
  return r.offset < offset + length && offset < r.offset + r.length;
}

const char* OpName(BackendRequest::Op op) {
  switch (op) {
    case BackendRequest::Op::kRead:
      return "read";
    case BackendRequest::Op::kWrite:
      return "write";
    case BackendRequest::Op::kFlush:
      return "flush";
    case BackendRequest::Op::kTrim:
      return "trim";
    case BackendRequest::Op::kWriteZeroes:
      return "write-zeroes";
  }
  return "request";
}

}  // namespace

// One request on its way through the set. `pending` counts the replica calls not yet called
// back, plus one held by whoever is sending, so that it cannot resolve half-sent.
struct Op {
  BackendRequest req;
  BackendDone done;
  // The channels it was sent to, taken with the set's lock: a member's channel may be replaced
  // (Readmit) while an older request still uses the old one.
  std::array<std::shared_ptr<ReplicaChannel>, ReplicaSet::kMaxMembers> ch;
  std::mutex mu;
  int pending = 0;
  std::string mark_error;  // the out-of-sync log could not record a range
  Mask sent = 0, ok = 0, failed = 0;
  int first_code = 0;
  bool same_code = true;
  std::string fenced_by;  // a replica that answered EPERM: it has seen a newer epoch
  std::string first_error;
  uint64_t seq = 0;  // its entry in the set's in-flight ranges (reconciling only), 0: none
};

struct ReplicaSet::Impl {
  struct Member {
    std::string node;
    std::shared_ptr<ReplicaChannel> ch;  // replaced only while the member is out (Readmit)
    MemberState state = MemberState::kInSync;
    std::string why;
  };
  // A modifying request or FLUSH that may be acknowledged only once every member in `need_out`
  // is confirmed out of the in-sync set, and the ranges of `mark` are in the log.
  struct Waiter {
    std::shared_ptr<Op> op;
    Mask need_out = 0;
    Mask mark = 0;
  };

  ReplicaSet* self = nullptr;
  ReplicaSetOptions opts;  // opts.size is the size at Create; `size` is the live one
  std::atomic<uint64_t> size{0};
  Membership& membership;
  OutOfSyncLog* log;
  // Slots [0, N()): a slot is filled (node set) before the count grows past it (AddMember), and
  // never emptied, so its node may be read without the lock; its other fields under mu. A
  // removed member (RemoveMember) keeps its slot, out of `all` and in `removed`.
  std::array<Member, ReplicaSet::kMaxMembers> members;
  std::atomic<size_t> count{0};
  size_t N() const { return count.load(std::memory_order_acquire); }
  Mask all = 0;
  Mask removed = 0;

  // Held around every change of the in-sync set in the cluster state (the membership thread's
  // drops, Readmit), so that two of them never compute from the same old set.
  std::mutex membership_mu;
  mutable std::mutex mu;
  std::condition_variable cv;
  // Freeze: modifying requests and flushes sent and not yet answered (the held ones are not).
  int changes_in_flight = 0;
  int freezes = 0;  // Freeze calls not thawed yet
  std::deque<std::pair<BackendRequest, BackendDone>> held;
  std::condition_variable drained;
  Mask failing = 0, out = 0;
  bool stopped = false, closing = false, quit = false;
  std::string stop_reason;
  std::vector<std::string> recorded_in_sync;
  std::vector<Waiter> waiters;
  uint64_t acked_degraded = 0;
  bool may_differ = false;
  // Reconciling (ReplicaSetOptions::reconcile_from until EndReconcile): every read goes to
  // `source`; the ranges of the changes in flight are tracked (by Op::seq) for LockRange; the
  // locked range's later changes wait in range_held.
  bool reconciling = false;
  int source = -1;
  uint64_t reconcile_done = 0;
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> in_flight_ranges;
  uint64_t next_seq = 1;
  std::optional<std::pair<uint64_t, uint64_t>> locked;
  std::deque<std::pair<BackendRequest, BackendDone>> range_held;
  std::thread thread;

  Impl(ReplicaSetOptions o, Membership& m, OutOfSyncLog* l)
      : opts(std::move(o)), membership(m), log(l) {}

  Mask InSyncLocked() const { return all & ~failing & ~out; }

  std::vector<std::string> Nodes(Mask m) const {
    std::vector<std::string> v;
    for (size_t i = 0; i < N(); ++i)
      if (m & Bit(i)) v.push_back(members[i].node);
    return v;
  }

  // The member a read goes to: the preferred node when it is in sync and not tried yet.
  int PickReader(Mask candidates) const {
    if (!candidates) return -1;
    for (size_t i = 0; i < N(); ++i)
      if ((candidates & Bit(i)) && members[i].node == opts.preferred_node)
        return static_cast<int>(i);
    return std::countr_zero(candidates);
  }

  // PickReader, but while reconciling only the source reads; when the source is no candidate
  // (it left the in-sync set), the replica picked becomes the source: what the others get.
  int PickReaderLocked(Mask candidates) {
    if (!reconciling) return PickReader(candidates);
    if (source >= 0 && (candidates & Bit(static_cast<size_t>(source)))) return source;
    const int next = PickReader(candidates);
    if (next >= 0 && next != source) {
      spdlog::warn("replica set {}: reconciling from the replica on {} now ({} left)", opts.volume,
                   members[static_cast<size_t>(next)].node,
                   source >= 0 ? members[static_cast<size_t>(source)].node : "none");
      source = next;
    }
    return next;
  }

  bool InFlightOverlapLocked(uint64_t offset, uint64_t length) const {
    for (const auto& [seq, r] : in_flight_ranges)
      if (r.first < offset + length && offset < r.first + r.second) return true;
    return false;
  }

  // Takes a member out of service after its first failure; the membership thread records it.
  void EnterFailingLocked(size_t i, const std::string& why) {
    if (members[i].state != MemberState::kInSync) return;
    members[i].state = MemberState::kFailing;
    members[i].why = why;
    failing |= Bit(i);
    spdlog::warn("replica set {}: replica on {} failed ({}); dropping it from the in-sync set",
                 opts.volume, members[i].node, why);
    cv.notify_all();
  }

  // Every member that failed `op` leaves service (the first failure names why).
  void EnterFailingLocked(const Op& op) {
    for (size_t i = 0; i < N(); ++i)
      if (op.failed & Bit(i))
        EnterFailingLocked(i, fmt::format("{}: {}", OpName(op.req.op), op.first_error));
  }

  void Send(const std::shared_ptr<Op>& op, size_t i) {
    {
      std::lock_guard<std::mutex> lock(op->mu);
      op->sent |= Bit(i);
      ++op->pending;
    }
    Callback cb = [this, op, i](const Status& s) { Finished(op, i, s); };
    ReplicaChannel& ch = *op->ch[i];
    const BackendRequest& r = op->req;
    Status s;
    switch (r.op) {
      case BackendRequest::Op::kRead:
        s = ch.Read(r.offset, {r.data, r.length}, std::move(cb));
        break;
      case BackendRequest::Op::kWrite:
        s = ch.Write(r.offset, {r.data, r.length}, r.fua, std::move(cb));
        break;
      case BackendRequest::Op::kFlush:
        s = ch.Flush(std::move(cb));
        break;
      case BackendRequest::Op::kTrim:
        s = ch.Trim(r.offset, r.length, r.fua, std::move(cb));
        break;
      case BackendRequest::Op::kWriteZeroes:
        s = ch.WriteZeroes(r.offset, r.length, r.fua, r.no_hole, std::move(cb));
        break;
    }
    if (!s.ok()) Finished(op, i, s);
  }

  // Drops the sender's hold on `op`.
  void Release(const std::shared_ptr<Op>& op) {
    bool last;
    {
      std::lock_guard<std::mutex> lock(op->mu);
      last = --op->pending == 0;
    }
    if (last) Resolve(op);
  }

  void Finished(const std::shared_ptr<Op>& op, size_t i, const Status& s) {
    bool last;
    {
      std::lock_guard<std::mutex> lock(op->mu);
      if (s.ok()) {
        op->ok |= Bit(i);
      } else {
        op->failed |= Bit(i);
        if (s.code() == EPERM && op->fenced_by.empty()) op->fenced_by = members[i].node;
        if (!op->first_code) {
          op->first_code = s.code();
          op->first_error = s.message();
        } else if (op->first_code != s.code()) {
          op->same_code = false;
        }
      }
      last = --op->pending == 0;
    }
    if (last) Resolve(op);
  }

  static int FailureCode(const Op& op) {
    // One errno every replica agreed on (ENOSPC on all of them) says something about the
    // request; a mix says only that the volume could not do it.
    return op.same_code && op.first_code ? op.first_code : EIO;
  }

  void Resolve(const std::shared_ptr<Op>& op) {
    if (!op->fenced_by.empty()) {
      // A newer target has claimed the volume and connected to that replica: this one must
      // not serve anything more, and must not drop anybody (the claim is not ours).
      self->Stop(fmt::format("fenced: the replica on {} has seen a newer epoch ({})",
                             op->fenced_by, op->first_error));
      return op->done(-EIO);
    }
    if (op->req.op == BackendRequest::Op::kRead) return ResolveRead(op);
    ResolveChange(op);
  }

  // Blocking form of the log's mark, for the membership thread.
  Status MarkSync(const std::string& node, uint64_t offset, uint64_t length) {
    std::promise<Status> p;
    auto f = p.get_future();
    log->MarkOutOfSync(node, offset, length, [&p](const Status& s) { p.set_value(s); });
    return f.get();
  }

  void ResolveRead(const std::shared_ptr<Op>& op) {
    if (op->ok) return op->done(0);
    int next;
    bool closed;
    {
      std::lock_guard<std::mutex> lock(mu);
      closed = closing;
      if (!closed) EnterFailingLocked(*op);
      next = closed ? -1 : PickReaderLocked(InSyncLocked() & ~op->sent);
      if (next >= 0) op->ch[static_cast<size_t>(next)] = members[static_cast<size_t>(next)].ch;
    }
    if (closed) return op->done(-ESHUTDOWN);
    if (next < 0) {
      spdlog::error("replica set {}: read at {} length {} failed on every in-sync replica: {}",
                    opts.volume, op->req.offset, op->req.length, op->first_error);
      return op->done(-FailureCode(*op));
    }
    {
      std::lock_guard<std::mutex> lock(op->mu);
      ++op->pending;
    }
    Send(op, static_cast<size_t>(next));
    Release(op);
  }

  void ResolveChange(const std::shared_ptr<Op>& op) {
    int fail = 0;
    bool ack = false;
    std::string why = op->first_error;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (why.empty()) why = stop_reason;
      if (closing) {
        fail = ESHUTDOWN;
      } else if (!op->ok) {
        // Nobody has it: nothing to drop, the request failed.
        fail = FailureCode(*op);
      } else if (!op->mark_error.empty()) {
        // A replica out of sync would miss it and the log cannot say so: not acknowledged.
        EnterFailingLocked(*op);
        fail = EIO;
        why = "cannot record it as missing on an out-of-sync replica: " + op->mark_error;
      } else {
        EnterFailingLocked(*op);
        Waiter w{op, all & ~op->ok & ~out, Modifies(op->req.op) ? op->failed & all : 0};
        if (!w.need_out && !w.mark) {
          ack = true;
          if (op->ok != all) ++acked_degraded;
        } else if (stopped) {
          fail = EIO;
        } else {
          waiters.push_back(std::move(w));
          cv.notify_all();
        }
      }
    }
    if (fail) {
      if (fail != ESHUTDOWN)
        spdlog::error("replica set {}: {} at {} length {} failed: {}", opts.volume,
                      OpName(op->req.op), op->req.offset, op->req.length, why);
      return op->done(-fail);
    }
    if (ack) op->done(0);
  }

  // The membership thread: records failing members as out of sync in the cluster state, writes
  // the out-of-sync log, and acknowledges the requests that waited for either.
  void Loop() {
    for (;;) {
      std::vector<Waiter> batch;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return quit || !waiters.empty() || (failing && !stopped); });
        if (quit) return;
        batch = std::move(waiters);
        waiters.clear();
        // A member removed since its write failed needs no record of what it misses.
        for (auto& w : batch) w.mark &= all;
      }
      std::vector<int> mark_error(batch.size(), 0);
      if (log) {
        for (size_t w = 0; w < batch.size(); ++w) {
          for (size_t i = 0; i < N() && !mark_error[w]; ++i) {
            if (!(batch[w].mark & Bit(i))) continue;
            const BackendRequest& r = batch[w].op->req;
            Status s = MarkSync(members[i].node, r.offset, r.length);
            if (!s.ok()) {
              spdlog::error("replica set {}: cannot record {}+{} as missing on {}: {}",
                            opts.volume, r.offset, r.length, members[i].node, s.message());
              mark_error[w] = EIO;
            }
          }
        }
      }
      std::vector<std::pair<std::shared_ptr<Op>, int>> finish;
      {
        std::lock_guard<std::mutex> serial(membership_mu);
        std::unique_lock<std::mutex> lock(mu);
        // Computed now, under the membership lock: every waiter of the batch needs at most
        // the members failing by now.
        const Mask dropping = stopped ? 0 : failing;
        const Mask keep = all & ~out & ~dropping;
        const std::vector<std::string> in_sync = Nodes(keep);
        Status recorded;
        if (dropping) {
          lock.unlock();
          recorded = keep ? membership.SetInSync(in_sync)
                          : Error(EIO, "no replica of {} would be left in sync", opts.volume);
          lock.lock();
          if (recorded.ok()) {
            out |= dropping;
            failing &= ~dropping;
            for (size_t i = 0; i < N(); ++i)
              if (dropping & Bit(i)) members[i].state = MemberState::kOut;
            recorded_in_sync = in_sync;
            spdlog::warn("replica set {}: in-sync set is now [{}]", opts.volume,
                         fmt::join(in_sync, ", "));
          } else if (!stopped) {
            stopped = true;
            stop_reason = fmt::format("cannot drop [{}] from the in-sync set: {}",
                                      fmt::join(Nodes(dropping), ", "), recorded.message());
            spdlog::error("replica set {}: stopped: {}", opts.volume, stop_reason);
          }
        }
        for (size_t w = 0; w < batch.size(); ++w) {
          Waiter& x = batch[w];
          if (mark_error[w]) {
            finish.emplace_back(x.op, -mark_error[w]);
          } else if (!(x.need_out & ~out)) {
            ++acked_degraded;
            finish.emplace_back(x.op, 0);
          } else if (stopped) {
            finish.emplace_back(x.op, -EIO);
          } else {
            waiters.push_back(std::move(x));  // needs a member that started failing since
          }
        }
      }
      for (auto& [op, res] : finish) op->done(res);
    }
  }

  // A modifying request or flush was answered: Freeze may be waiting for the last one, LockRange
  // for the last one in its range. A modifying one that failed may have reached some replica.
  void ChangeDone(uint64_t seq, bool failed) {
    std::lock_guard<std::mutex> lock(mu);
    if (failed) may_differ = true;
    if (seq) in_flight_ranges.erase(seq);
    if (--changes_in_flight == 0 || seq) drained.notify_all();
  }

  // Submits `r` past the region lock and waits for its answer.
  int DoSync(const BackendRequest& r) {
    std::promise<int> answered;
    auto result = answered.get_future();
    self->Dispatch(r, [&answered](int res) { answered.set_value(res); }, false, true);
    return result.get();
  }
};

ReplicaSet::ReplicaSet(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StatusOr<std::unique_ptr<ReplicaSet>> ReplicaSet::Create(ReplicaSetOptions options,
                                                         std::vector<ReplicaMember> members,
                                                         Membership& membership,
                                                         OutOfSyncLog* log) {
  if (options.volume.empty()) return Error(EINVAL, "a replica set needs a volume name");
  if (options.size == 0) return Error(EINVAL, "replica set {}: size must be > 0", options.volume);
  if (members.empty() || members.size() > kMaxMembers)
    return Error(EINVAL, "replica set {}: {} replicas; 1 to {} are supported", options.volume,
                 members.size(), kMaxMembers);
  std::set<std::string> seen;
  bool any_in_sync = false;
  for (const auto& m : members) {
    if (m.node.empty() || (m.in_sync && !m.channel))
      return Error(EINVAL, "replica set {}: an in-sync replica needs a node and a channel",
                   options.volume);
    any_in_sync = any_in_sync || m.in_sync;
    if (!seen.insert(m.node).second)
      return Error(EINVAL, "replica set {}: two replicas on node {}", options.volume, m.node);
  }
  if (!any_in_sync)
    return Error(EINVAL, "replica set {}: no replica is in sync", options.volume);
  auto impl = std::make_unique<Impl>(std::move(options), membership, log);
  impl->size.store(impl->opts.size);
  for (auto& m : members) {
    Impl::Member member;
    member.node = std::move(m.node);
    member.ch = std::shared_ptr<ReplicaChannel>(std::move(m.channel));
    if (!m.in_sync) {
      member.state = MemberState::kOut;
      member.why = "out of sync when the target opened";
      impl->out |= Bit(impl->N());
    }
    const size_t i = impl->N();
    impl->members[i] = std::move(member);
    impl->all |= Bit(i);
    impl->count.store(i + 1, std::memory_order_release);
  }
  impl->recorded_in_sync = impl->Nodes(impl->all & ~impl->out);
  if (!impl->opts.reconcile_from.empty()) {
    for (size_t i = 0; i < impl->N(); ++i)
      if (impl->members[i].node == impl->opts.reconcile_from &&
          impl->members[i].state == MemberState::kInSync)
        impl->source = static_cast<int>(i);
    if (impl->source < 0)
      return Error(EINVAL, "replica set {}: reconcile source {} is not an in-sync replica",
                   impl->opts.volume, impl->opts.reconcile_from);
    impl->reconciling = true;
  }
  Impl* raw = impl.get();
  std::unique_ptr<ReplicaSet> set(new ReplicaSet(std::move(impl)));
  raw->self = set.get();
  raw->thread = std::thread([raw] { raw->Loop(); });
  return set;
}

ReplicaSet::~ReplicaSet() { Close(); }

const std::string& ReplicaSet::name() const { return impl_->opts.volume; }
uint64_t ReplicaSet::size() const { return impl_->size.load(std::memory_order_acquire); }

Status ReplicaSet::Grow(uint64_t size) {
  Impl& s = *impl_;
  // No drop or readmit computes from the members while they grow.
  std::lock_guard<std::mutex> serial(s.membership_mu);
  std::vector<std::pair<std::string, std::shared_ptr<ReplicaChannel>>> chans;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.stopped) return Error(EIO, "replica set {} is stopped: {}", s.opts.volume, s.stop_reason);
    if (size <= s.size.load()) return Status::Ok();
    if (((s.failing | s.out) & s.all) != 0) {
      return Error(EAGAIN, "replica set {}: cannot grow to {} bytes while replicas are out of "
                   "sync ([{}]); resync them first", s.opts.volume, size,
                   fmt::join(s.Nodes((s.failing | s.out) & s.all), ", "));
    }
    for (size_t i = 0; i < s.N(); ++i)
      if (s.all & Bit(i)) chans.emplace_back(s.members[i].node, s.members[i].ch);
  }
  for (const auto& [node, ch] : chans) {
    if (Status g = ch->Grow(size); !g.ok()) {
      return Error(g.code(), "replica set {}: the replica on {} cannot take {} bytes: {}",
                   s.opts.volume, node, size, g.message());
    }
  }
  const uint64_t was = s.size.exchange(size, std::memory_order_acq_rel);
  spdlog::info("replica set {}: grew from {} to {} bytes on [{}]", s.opts.volume, was, size,
               fmt::join(s.Nodes(s.all), ", "));
  return Status::Ok();
}

void ReplicaSet::Submit(const BackendRequest& request, BackendDone done) {
  Dispatch(request, std::move(done), false);
}

void ReplicaSet::Dispatch(const BackendRequest& request, BackendDone done, bool past_freeze,
                          bool past_lock) {
  Impl& s = *impl_;
  const bool change = request.op != BackendRequest::Op::kRead;
  auto op = std::make_shared<Op>();
  op->req = request;
  Mask targets = 0, missing = 0;
  int refuse = 0;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.stopped || s.closing) {
      refuse = s.closing ? ESHUTDOWN : EIO;
    } else if (change && s.freezes > 0 && !past_freeze) {
      // Resubmitted by Thaw, in order.
      s.held.emplace_back(request, std::move(done));
      return;
    } else if (Modifies(request.op) && s.locked && !past_lock &&
               Overlaps(request, s.locked->first, s.locked->second)) {
      // Its region is being reconciled: it goes on at UnlockRange, after the copy.
      s.range_held.emplace_back(request, std::move(done));
      return;
    } else {
      const Mask in_sync = s.InSyncLocked();
      if (!change) {
        int r = s.PickReaderLocked(in_sync);
        if (r >= 0) targets = Bit(static_cast<size_t>(r));
      } else {
        targets = in_sync;
        missing = s.all & ~in_sync;
      }
      for (size_t i = 0; i < s.N(); ++i)
        if (targets & Bit(i)) op->ch[i] = s.members[i].ch;
      if (change && targets) ++s.changes_in_flight;
      if (Modifies(request.op) && targets && s.reconciling) {
        op->seq = s.next_seq++;
        s.in_flight_ranges[op->seq] = {request.offset, request.length};
      }
    }
  }
  if (refuse) return done(-refuse);
  if (!targets) return done(-EIO);  // only while the last members are being dropped
  if (change) {
    op->done = [&s, d = std::move(done), seq = op->seq, modifies = Modifies(request.op)](int res) {
      d(res);
      s.ChangeDone(seq, modifies && res < 0);
    };
  } else {
    op->done = std::move(done);
  }
  {
    std::lock_guard<std::mutex> lock(op->mu);
    op->pending = 1;
  }
  // While a replica is out of sync, what it misses is recorded (durably) before the ack; the
  // log answers at once when the region is recorded already.
  if (s.log && missing && Modifies(request.op)) {
    for (size_t i = 0; i < s.N(); ++i) {
      if (!(missing & Bit(i))) continue;
      {
        std::lock_guard<std::mutex> lock(op->mu);
        ++op->pending;
      }
      s.log->MarkOutOfSync(s.members[i].node, request.offset, request.length,
                           [&s, op](const Status& st) {
                             if (!st.ok()) {
                               std::lock_guard<std::mutex> lock(op->mu);
                               if (op->mark_error.empty()) op->mark_error = st.message();
                             }
                             s.Release(op);
                           });
    }
  }
  for (size_t i = 0; i < s.N(); ++i)
    if (targets & Bit(i)) s.Send(op, i);
  s.Release(op);
}

void ReplicaSet::Freeze() {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lock(s.mu);
  ++s.freezes;
  s.drained.wait(lock, [&] { return s.changes_in_flight == 0; });
}

Status ReplicaSet::FreezeUntil(std::chrono::steady_clock::time_point drain_by) {
  Impl& s = *impl_;
  {
    std::unique_lock<std::mutex> lock(s.mu);
    if (s.stopped || s.closing)
      return Error(EIO, "replica set {} is stopped: {}", s.opts.volume, s.stop_reason);
    ++s.freezes;
    if (s.drained.wait_until(lock, drain_by, [&] { return s.changes_in_flight == 0; }))
      return Status::Ok();
  }
  const int left = [&] {
    std::lock_guard<std::mutex> lock(s.mu);
    return s.changes_in_flight;
  }();
  Thaw();
  return Error(ETIMEDOUT, "replica set {}: {} changes still in flight at the freeze's deadline",
               s.opts.volume, left);
}

void ReplicaSet::Thaw() {
  Impl& s = *impl_;
  std::deque<std::pair<BackendRequest, BackendDone>> held;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.freezes == 0) return;  // an unmatched Thaw must not lift somebody else's freeze
    if (--s.freezes > 0) return;
    held.swap(s.held);
  }
  for (auto& [r, d] : held) Submit(r, std::move(d));
}

Status ReplicaSet::FlushFrozen() {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.freezes == 0)
      return Error(EINVAL, "replica set {}: a flush past the freeze needs a frozen set",
                   s.opts.volume);
  }
  std::promise<int> answered;
  auto result = answered.get_future();
  BackendRequest flush{BackendRequest::Op::kFlush, 0, 0, nullptr};
  Dispatch(flush, [&answered](int res) { answered.set_value(res); }, true);
  // Bounded: every replica request has the client's timeout, and a drop the membership's retry.
  const int res = result.get();
  if (res < 0)
    return Error(-res, "replica set {}: flush of the in-sync replicas failed", s.opts.volume);
  return Status::Ok();
}

Status ReplicaSet::Readmit(const std::string& node, std::unique_ptr<ReplicaChannel> channel) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> serial(s.membership_mu);
  size_t i = 0;
  std::vector<std::string> in_sync;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.freezes == 0) return Error(EINVAL, "replica set {}: readmit {} needs a frozen set", s.opts.volume, node);
    if (s.stopped) return Error(EIO, "replica set {} is stopped: {}", s.opts.volume, s.stop_reason);
    while (i < s.N() && (s.members[i].node != node || (s.removed & Bit(i)))) ++i;
    if (i == s.N())
      return Error(ENOENT, "replica set {}: no replica on {}", s.opts.volume, node);
    if (s.members[i].state != MemberState::kOut)
      return Error(EINVAL, "replica set {}: the replica on {} is {}, not out of sync",
                   s.opts.volume, node, MemberStateName(s.members[i].state));
    s.members[i].ch = std::shared_ptr<ReplicaChannel>(std::move(channel));
    in_sync = s.Nodes(s.InSyncLocked() | Bit(i));
  }
  if (Status r = s.membership.SetInSync(in_sync); !r.ok()) {
    return Error(r.code(), "replica set {}: cannot record {} as in sync: {}", s.opts.volume, node,
                 r.message());
  }
  std::lock_guard<std::mutex> lock(s.mu);
  s.members[i].state = MemberState::kInSync;
  s.members[i].why.clear();
  s.out &= ~Bit(i);
  s.recorded_in_sync = in_sync;
  spdlog::info("replica set {}: the replica on {} is back in sync; in-sync set [{}]",
               s.opts.volume, node, fmt::join(in_sync, ", "));
  return Status::Ok();
}

Status ReplicaSet::AddMember(const std::string& node) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> serial(s.membership_mu);
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.stopped || s.closing)
    return Error(EIO, "replica set {} is stopped: {}", s.opts.volume, s.stop_reason);
  if (node.empty()) return Error(EINVAL, "replica set {}: a replica needs a node", s.opts.volume);
  for (size_t i = 0; i < s.N(); ++i)
    if (s.members[i].node == node && (s.all & Bit(i)))
      return Error(EEXIST, "replica set {}: node {} holds a replica already", s.opts.volume, node);
  const size_t i = s.N();
  if (i == kMaxMembers)
    return Error(ENOSPC,
                 "replica set {}: this target has used all its {} replica slots (removed "
                 "replicas keep theirs); close and reopen the target to add more",
                 s.opts.volume, kMaxMembers);
  Impl::Member m;
  m.node = node;
  m.state = MemberState::kOut;
  m.why = "added: not copied yet";
  s.members[i] = std::move(m);
  s.out |= Bit(i);
  s.all |= Bit(i);
  s.count.store(i + 1, std::memory_order_release);
  spdlog::info("replica set {}: replica on {} added, out of sync until it is copied",
               s.opts.volume, node);
  return Status::Ok();
}

Status ReplicaSet::RemoveMember(const std::string& node, const std::function<Status()>& record) {
  Impl& s = *impl_;
  std::shared_ptr<ReplicaChannel> ch;
  {
    // No drop nor readmit computes the in-sync set from the members meanwhile.
    std::lock_guard<std::mutex> serial(s.membership_mu);
    size_t i = 0;
    {
      std::lock_guard<std::mutex> lock(s.mu);
      if (s.stopped || s.closing)
        return Error(EIO, "replica set {} is stopped: {}", s.opts.volume, s.stop_reason);
      while (i < s.N() && (s.members[i].node != node || !(s.all & Bit(i)))) ++i;
      if (i == s.N())
        return Error(ENOENT, "replica set {}: no replica on {}", s.opts.volume, node);
      if (s.reconciling)
        return Error(EAGAIN,
                     "replica set {}: the in-sync replicas are being reconciled after an "
                     "unclean takeover; remove a replica once that ended",
                     s.opts.volume);
      if (!(s.InSyncLocked() & ~Bit(i)))
        return Error(EBUSY,
                     "replica set {}: the replica on {} is the last one in sync; removing it "
                     "would lose the volume's data (add and resync another first)",
                     s.opts.volume, node);
    }
    if (Status r = record(); !r.ok()) return r;
    std::lock_guard<std::mutex> lock(s.mu);
    s.all &= ~Bit(i);
    s.failing &= ~Bit(i);
    s.out |= Bit(i);
    s.removed |= Bit(i);
    s.members[i].state = MemberState::kOut;
    s.members[i].why = "removed";
    ch = std::move(s.members[i].ch);
    s.recorded_in_sync = s.Nodes(s.InSyncLocked());
    // Waiters that needed it out of the in-sync set need nothing more.
    s.cv.notify_all();
  }
  spdlog::info("replica set {}: replica on {} removed", s.opts.volume, node);
  // Outside the locks: what is still in flight to it ends (ESHUTDOWN) and resolves without it.
  if (ch) ch->Close();
  return Status::Ok();
}

void ReplicaSet::Stop(const std::string& reason) {
  Impl& s = *impl_;
  std::vector<Impl::Waiter> fail;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.stopped) {
      s.stopped = true;
      s.stop_reason = reason;
      spdlog::warn("replica set {}: stopped: {}", s.opts.volume, reason);
    }
    fail = std::move(s.waiters);
    s.waiters.clear();
    s.cv.notify_all();
    s.drained.notify_all();  // a LockRange waiting gives up
  }
  for (auto& w : fail) w.op->done(-EIO);
}

void ReplicaSet::Close() {
  Impl& s = *impl_;
  Stop("closed");
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.closing = true;
  }
  // What is in flight completes with ESHUTDOWN inside Close, and resolves as such.
  std::vector<std::shared_ptr<ReplicaChannel>> chans;
  std::deque<std::pair<BackendRequest, BackendDone>> held;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    for (size_t i = 0; i < s.N(); ++i) chans.push_back(s.members[i].ch);
    held.swap(s.held);
    for (auto& h : s.range_held) held.push_back(std::move(h));
    s.range_held.clear();
  }
  for (auto& [r, d] : held) d(-ESHUTDOWN);
  for (auto& c : chans)
    if (c) c->Close();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.quit = true;
    s.cv.notify_all();
  }
  if (s.thread.joinable()) s.thread.join();
  // Waiters the thread left behind (none but in a race with quit) fail now.
  std::vector<Impl::Waiter> left;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    left = std::move(s.waiters);
    s.waiters.clear();
  }
  for (auto& w : left) w.op->done(-ESHUTDOWN);
  // A change's done callback touches the set after the engine's (ChangeDone), possibly on a
  // thread of the out-of-sync log: the set must outlive the last of them.
  std::unique_lock<std::mutex> lock(s.mu);
  s.drained.wait(lock, [&] { return s.changes_in_flight == 0; });
}

ReplicaSetHealth ReplicaSet::health() const {
  const Impl& s = *impl_;
  ReplicaSetHealth h;
  // The channels' counters first, outside the set's lock: a channel may hold its own lock while
  // it calls back into the set.
  // Removed members are left out.
  std::vector<std::pair<size_t, std::shared_ptr<ReplicaChannel>>> chans;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    for (size_t i = 0; i < s.N(); ++i)
      if (!(s.removed & Bit(i))) chans.emplace_back(i, s.members[i].ch);
  }
  for (const auto& [i, ch] : chans)
    h.members.push_back(
        MemberHealth{s.members[i].node, {}, {}, ch ? ch->counters() : ClientCounters{}});
  std::lock_guard<std::mutex> lock(s.mu);
  for (size_t k = 0; k < chans.size(); ++k) {
    h.members[k].state = s.members[chans[k].first].state;
    h.members[k].why = s.members[chans[k].first].why;
  }
  h.in_sync = s.recorded_in_sync;
  h.degraded = s.InSyncLocked() != s.all;
  h.stopped = s.stopped && !s.closing;
  h.stop_reason = s.stop_reason;
  h.acked_degraded = s.acked_degraded;
  h.reconciling = s.reconciling;
  if (s.reconciling && s.source >= 0) h.reconcile_source = s.members[s.source].node;
  h.reconcile_done_bytes = s.reconcile_done;
  h.may_differ = s.may_differ;
  return h;
}

Status ReplicaSet::LockRange(uint64_t offset, uint64_t length) {
  Impl& s = *impl_;
  {
    std::unique_lock<std::mutex> lock(s.mu);
    if (s.stopped || s.closing)
      return Error(EIO, "replica set {} is stopped: {}", s.opts.volume, s.stop_reason);
    if (!s.reconciling)
      return Error(EINVAL, "replica set {}: ranges are locked only while reconciling",
                   s.opts.volume);
    if (s.locked) return Error(EBUSY, "replica set {}: a range is locked already", s.opts.volume);
    s.locked.emplace(offset, length);
    s.drained.wait(lock, [&] {
      return s.stopped || s.closing || !s.InFlightOverlapLocked(offset, length);
    });
    if (!s.stopped && !s.closing) return Status::Ok();
  }
  UnlockRange();
  return Error(EIO, "replica set {} stopped while locking {}+{}", s.opts.volume, offset, length);
}

void ReplicaSet::UnlockRange() {
  Impl& s = *impl_;
  std::deque<std::pair<BackendRequest, BackendDone>> held;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.locked.reset();
    held.swap(s.range_held);
  }
  for (auto& [r, d] : held) Dispatch(r, std::move(d), false);
}

Status ReplicaSet::Reconcile(const ReconcileOptions& options, const std::atomic<bool>* cancel) {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.reconciling)
      return Error(EINVAL, "replica set {} is not reconciling", s.opts.volume);
    s.reconcile_done = 0;
  }
  const uint64_t region = std::max<uint32_t>(options.region_bytes, 4096);
  std::vector<uint8_t> buf(region);
  const uint64_t total = s.size.load(std::memory_order_acquire);
  for (uint64_t off = 0; off < total; off += region) {
    if (cancel && cancel->load())
      return Error(ECANCELED, "replica set {}: reconciliation cancelled at {}", s.opts.volume,
                   off);
    const auto len = static_cast<uint32_t>(std::min<uint64_t>(region, total - off));
    if (Status l = LockRange(off, len); !l.ok()) return l;
    BackendRequest read{BackendRequest::Op::kRead, off, len, buf.data()};
    int res = s.DoSync(read);
    const char* step = "read from the source";
    if (res == 0) {
      // What the source holds goes to every in-sync replica (the source too: harmless, and the
      // set's ordinary write path, with its drops and acknowledgement rules). Zeroes as
      // WRITE_ZEROES, which a thin replica keeps (or makes) a hole.
      const bool zero = std::all_of(buf.begin(), buf.begin() + len, [](uint8_t b) { return !b; });
      BackendRequest w{zero ? BackendRequest::Op::kWriteZeroes : BackendRequest::Op::kWrite, off,
                       len, zero ? nullptr : buf.data()};
      res = s.DoSync(w);
      step = zero ? "write-zeroes to the replicas" : "write to the replicas";
    }
    UnlockRange();
    if (res < 0)
      return Error(-res, "replica set {}: reconciliation of {}+{}: {} failed", s.opts.volume, off,
                   len, step);
    {
      std::lock_guard<std::mutex> lock(s.mu);
      s.reconcile_done = off + len;
    }
    if (options.on_progress) options.on_progress(off + len);
  }
  BackendRequest flush{BackendRequest::Op::kFlush, 0, 0, nullptr};
  if (int res = s.DoSync(flush); res < 0)
    return Error(-res, "replica set {}: flush after the reconciliation failed", s.opts.volume);
  return Status::Ok();
}

void ReplicaSet::EndReconcile() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.reconciling)
    spdlog::info("replica set {}: reconciled; reads go to every in-sync replica again",
                 s.opts.volume);
  s.reconciling = false;
  s.source = -1;
  s.in_flight_ranges.clear();
}

}  // namespace nbdcsi::replica
