// Unit tests of the replicated target's fan-out (datapath/replica/replica_set.h) behind its two
// seams: fake replica channels (memory, scripted failures, completions held until the test lets
// them go) and a fake membership whose SetInSync the test can hold or fail; one suite runs the
// real ClusterMembership on the memory cluster store. The rule under test everywhere: nothing is
// acknowledged until every replica the cluster state calls in sync has it.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "datapath/replica/replica_set.h"
#include "test/support/memory_cluster_store.h"
#include "test/support/wait.h"

namespace nbdcsi::replica {
namespace {

using datapath::BackendRequest;
using namespace std::chrono_literals;
using test::WaitUntil;

constexpr uint64_t kSize = 1 << 20;

// One replica in memory. `fail` decides the errno of each call (0: it succeeds); with `hold`
// the completions wait until Release(); Close() fails whatever is held with ESHUTDOWN, as the
// ReplicaClient does.
class FakeChannel final : public ReplicaChannel {
 public:
  std::function<int(BackendRequest::Op, uint64_t offset)> fail;
  int refuse_submit = 0;  // the call itself returns this errno (no callback)
  // The request count, kept apart from the channel: a test can still read it once the set has
  // destroyed the channel (a removed member's).
  std::shared_ptr<std::atomic<uint64_t>> submitted = std::make_shared<std::atomic<uint64_t>>(0);

  FakeChannel() : data_(kSize, 0) {}

  Status Read(uint64_t offset, std::span<uint8_t> buf, Callback cb) override {
    return Start(BackendRequest::Op::kRead, offset, std::move(cb), [=, this] {
      std::memcpy(buf.data(), data_.data() + offset, buf.size());
    });
  }
  Status Write(uint64_t offset, std::span<const uint8_t> d, bool, Callback cb) override {
    return Start(BackendRequest::Op::kWrite, offset, std::move(cb),
                 [=, this] { std::memcpy(data_.data() + offset, d.data(), d.size()); });
  }
  Status Flush(Callback cb) override {
    return Start(BackendRequest::Op::kFlush, 0, std::move(cb), [this] { ++flushes_; });
  }
  Status Trim(uint64_t offset, uint32_t length, bool, Callback cb) override {
    return Start(BackendRequest::Op::kTrim, offset, std::move(cb),
                 [=, this] { std::memset(data_.data() + offset, 0, length); });
  }
  Status WriteZeroes(uint64_t offset, uint32_t length, bool, bool, Callback cb) override {
    return Start(BackendRequest::Op::kWriteZeroes, offset, std::move(cb),
                 [=, this] { std::memset(data_.data() + offset, 0, length); });
  }
  void Close() override {
    std::deque<Held> held;
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      held.swap(held_);
    }
    for (auto& h : held) h.cb(Error(ESHUTDOWN, "closed"));
  }
  // Grow: records the size asked, answers grow_error.
  Status grow_error = Status::Ok();
  std::vector<uint64_t> grows;
  Status Grow(uint64_t size) override {
    grows.push_back(size);
    return grow_error;
  }
  ClientCounters counters() const override {
    std::lock_guard<std::mutex> lock(mu_);
    ClientCounters c;
    c.requests = requests_;
    return c;
  }

  void Hold(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    hold_ = on;
  }
  // Completes the held calls in order (on this thread).
  void Release() {
    std::deque<Held> held;
    {
      std::lock_guard<std::mutex> lock(mu_);
      held.swap(held_);
    }
    for (auto& h : held) Finish(h);
  }
  // Completes the oldest held call only.
  void ReleaseOne() {
    std::optional<Held> h;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_.empty()) return;
      h = std::move(held_.front());
      held_.pop_front();
    }
    Finish(*h);
  }
  size_t held() const {
    std::lock_guard<std::mutex> lock(mu_);
    return held_.size();
  }
  uint64_t requests() const {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }
  int flushes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return flushes_;
  }
  // What the replica holds, set behind the set's back (a write of an earlier target).
  void Poke(uint64_t offset, const std::vector<uint8_t>& bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    std::memcpy(data_.data() + offset, bytes.data(), bytes.size());
  }
  std::vector<uint8_t> Bytes(uint64_t offset, size_t n) const {
    std::lock_guard<std::mutex> lock(mu_);
    return {data_.begin() + static_cast<long>(offset), data_.begin() + static_cast<long>(offset + n)};
  }

 private:
  struct Held {
    BackendRequest::Op op;
    uint64_t offset;
    Callback cb;
    std::function<void()> apply;
  };
  Status Start(BackendRequest::Op op, uint64_t offset, Callback cb, std::function<void()> apply) {
    Held h{op, offset, std::move(cb), std::move(apply)};
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return Error(ESHUTDOWN, "closed");
      if (refuse_submit) return Error(refuse_submit, "refused at submit");
      ++requests_;
      ++*submitted;
      if (hold_) {
        held_.push_back(std::move(h));
        return Status::Ok();
      }
    }
    Finish(h);
    return Status::Ok();
  }
  void Finish(Held& h) {
    int err = fail ? fail(h.op, h.offset) : 0;
    if (!err) {
      std::lock_guard<std::mutex> lock(mu_);
      h.apply();
    }
    h.cb(err ? Error(err, "fake replica error") : Status::Ok());
  }

  mutable std::mutex mu_;
  std::vector<uint8_t> data_;
  std::deque<Held> held_;
  bool hold_ = false, closed_ = false;
  uint64_t requests_ = 0;
  int flushes_ = 0;
};

// Records every SetInSync; the test may hold the calls (to see that acknowledgements wait for
// them) or make them fail (a target that lost its claim).
class FakeMembership final : public Membership {
 public:
  Status SetInSync(const std::vector<std::string>& in_sync) override {
    std::unique_lock<std::mutex> lock(mu_);
    calls_.push_back(in_sync);
    cv_.notify_all();
    cv_.wait(lock, [&] { return !hold_; });
    return fail_ ? Error(fail_, "fake membership refuses") : Status::Ok();
  }
  void Hold(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    hold_ = on;
    cv_.notify_all();
  }
  void Fail(int err) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_ = err;
  }
  bool WaitCalls(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 10s, [&] { return calls_.size() >= n; });
  }
  std::vector<std::vector<std::string>> calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool hold_ = false;
  int fail_ = 0;
  std::vector<std::vector<std::string>> calls_;
};

// Records marks; answers inline, or from another thread when `async` (as a bitmap that has to
// sync does).
class FakeLog final : public OutOfSyncLog {
 public:
  void MarkOutOfSync(const std::string& node, uint64_t offset, uint64_t length,
                     Done done) override {
    Status st;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (fail) st = Error(EIO, "fake log cannot write");
      else marks.push_back({node, offset, length});
    }
    if (!async) return done(st);
    std::thread([done = std::move(done), st] {
      std::this_thread::sleep_for(5ms);  // the stimulus: an answer that comes late, as a sync's
      done(st);
    }).detach();
  }
  struct Mark {
    std::string node;
    uint64_t offset, length;
    bool operator==(const Mark&) const = default;
  };
  std::vector<Mark> Marks() {
    std::lock_guard<std::mutex> lock(mu);
    return marks;
  }
  std::mutex mu;
  std::vector<Mark> marks;
  bool fail = false;
  std::atomic<bool> async{false};
};

// What a request's done callback reported, waited for by the test.
class Result {
 public:
  datapath::BackendDone Done() {
    return [this](int res) {
      std::lock_guard<std::mutex> lock(mu_);
      ++calls_;
      res_ = res;
      cv_.notify_all();
    };
  }
  std::optional<int> Wait(std::chrono::milliseconds t = 10s) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, t, [&] { return calls_ > 0; })) return std::nullopt;
    return res_;
  }
  bool Called() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_ > 0;
  }
  int calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int calls_ = 0;
  int res_ = 1;
};

class ReplicaSetTest : public ::testing::Test {
 protected:
  // Nodes a, b, c (as many as asked), preferred node `pref`.
  void Make(size_t n, std::string pref = "a", bool with_log = false,
            std::string reconcile_from = "") {
    std::vector<ReplicaMember> members;
    for (size_t i = 0; i < n; ++i) {
      auto ch = std::make_unique<FakeChannel>();
      ch_.push_back(ch.get());
      members.push_back({std::string(1, static_cast<char>('a' + i)), std::move(ch)});
    }
    auto r = ReplicaSet::Create({"vol", kSize, pref, reconcile_from}, std::move(members),
                                membership_, with_log ? &log_ : nullptr);
    ASSERT_TRUE(r.ok()) << r.status().message();
    set_ = std::move(r.value());
  }
  BackendRequest Write(uint64_t offset, std::vector<uint8_t>& buf) {
    return {BackendRequest::Op::kWrite, offset, static_cast<uint32_t>(buf.size()), buf.data()};
  }
  BackendRequest Read(uint64_t offset, std::vector<uint8_t>& buf) {
    return {BackendRequest::Op::kRead, offset, static_cast<uint32_t>(buf.size()), buf.data()};
  }
  MemberState StateOf(const std::string& node) {
    for (auto& m : set_->health().members)
      if (m.node == node) return m.state;
    ADD_FAILURE() << "no member " << node;
    return MemberState::kOut;
  }

  FakeMembership membership_;
  FakeLog log_;
  std::vector<FakeChannel*> ch_;
  std::unique_ptr<ReplicaSet> set_;
};

TEST_F(ReplicaSetTest, CreateRefusesBadMembers) {
  FakeMembership m;
  auto none = ReplicaSet::Create({"vol", kSize, ""}, {}, m);
  EXPECT_EQ(none.status().code(), EINVAL);
  std::vector<ReplicaMember> dup;
  dup.push_back({"a", std::make_unique<FakeChannel>()});
  dup.push_back({"a", std::make_unique<FakeChannel>()});
  auto twice = ReplicaSet::Create({"vol", kSize, ""}, std::move(dup), m);
  EXPECT_EQ(twice.status().code(), EINVAL);
  EXPECT_NE(twice.status().message().find("two replicas on node a"), std::string::npos);
  std::vector<ReplicaMember> one;
  one.push_back({"a", std::make_unique<FakeChannel>()});
  EXPECT_EQ(ReplicaSet::Create({"vol", 0, ""}, std::move(one), m).status().code(), EINVAL);
  std::vector<ReplicaMember> nochan;
  nochan.push_back({"a", nullptr});
  EXPECT_EQ(ReplicaSet::Create({"vol", kSize, ""}, std::move(nochan), m).status().code(),
            EINVAL);
}

TEST_F(ReplicaSetTest, WritesReachEveryReplicaAndReadsTheLocalOne) {
  Make(3, "b");
  std::vector<uint8_t> w(4096, 0x5a);
  Result r;
  set_->Submit(Write(8192, w), r.Done());
  ASSERT_EQ(r.Wait(), 0);
  for (auto* c : ch_) EXPECT_EQ(c->Bytes(8192, 4096), w);
  std::vector<uint8_t> got(4096);
  const uint64_t before_a = ch_[0]->requests(), before_c = ch_[2]->requests();
  Result rr;
  set_->Submit(Read(8192, got), rr.Done());
  ASSERT_EQ(rr.Wait(), 0);
  EXPECT_EQ(got, w);
  EXPECT_EQ(ch_[0]->requests(), before_a) << "the read went to a, not the preferred b";
  EXPECT_EQ(ch_[2]->requests(), before_c);
  Result f;
  set_->Submit({BackendRequest::Op::kFlush}, f.Done());
  ASSERT_EQ(f.Wait(), 0);
  for (auto* c : ch_) EXPECT_EQ(c->flushes(), 1);
  EXPECT_TRUE(membership_.calls().empty());
  auto h = set_->health();
  EXPECT_FALSE(h.degraded);
  EXPECT_EQ(h.in_sync, (std::vector<std::string>{"a", "b", "c"}));
}

TEST_F(ReplicaSetTest, AFailedReplicaIsDroppedBeforeTheWriteIsAcknowledged) {
  Make(2);
  ch_[1]->fail = [](BackendRequest::Op, uint64_t) { return ECONNRESET; };
  membership_.Hold(true);
  std::vector<uint8_t> w(512, 1);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  ASSERT_TRUE(membership_.WaitCalls(1));
  EXPECT_EQ(membership_.calls()[0], std::vector<std::string>{"a"});
  // Held in SetInSync: the cluster still lists b in sync, so the write must not be acked.
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(r.Called());
  EXPECT_EQ(StateOf("b"), MemberState::kFailing);
  // A later write goes to a only, and waits for the same confirmation.
  const uint64_t b_before = ch_[1]->requests();
  std::vector<uint8_t> w2(512, 2);
  Result r2;
  set_->Submit(Write(4096, w2), r2.Done());
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(r2.Called());
  EXPECT_EQ(ch_[1]->requests(), b_before);
  membership_.Hold(false);
  EXPECT_EQ(r.Wait(), 0);
  EXPECT_EQ(r2.Wait(), 0);
  EXPECT_EQ(StateOf("b"), MemberState::kOut);
  auto h = set_->health();
  EXPECT_TRUE(h.degraded);
  EXPECT_FALSE(h.stopped);
  EXPECT_EQ(h.in_sync, std::vector<std::string>{"a"});
  EXPECT_EQ(h.acked_degraded, 2u);
  EXPECT_EQ(membership_.calls().size(), 1u) << "one drop, not one per request";
  // Out of the set: b gets nothing more, and writes are acknowledged at once.
  Result r3;
  set_->Submit(Write(0, w2), r3.Done());
  EXPECT_EQ(r3.Wait(), 0);
  EXPECT_EQ(ch_[1]->requests(), b_before);
}

TEST_F(ReplicaSetTest, GrowAsksEveryReplicaFirstThenTakesTheSize) {
  Make(2);
  ASSERT_TRUE(set_->Grow(kSize / 2).ok());
  EXPECT_EQ(set_->size(), kSize) << "never shrinks";
  EXPECT_TRUE(ch_[0]->grows.empty());
  ch_[1]->grow_error = Error(ENOSPC, "its export is smaller");
  Status g = set_->Grow(2 * kSize);
  EXPECT_EQ(g.code(), ENOSPC) << g.message();
  EXPECT_NE(g.message().find("on b"), std::string::npos) << g.message();
  EXPECT_EQ(set_->size(), kSize) << "a replica that cannot take it leaves the size";
  ch_[1]->grow_error = Status::Ok();
  ASSERT_TRUE(set_->Grow(2 * kSize).ok());
  EXPECT_EQ(set_->size(), 2 * kSize);
  EXPECT_EQ(ch_[0]->grows.back(), 2 * kSize);
  EXPECT_EQ(ch_[1]->grows.back(), 2 * kSize);
  EXPECT_TRUE(membership_.calls().empty()) << "growing drops nobody";
}

TEST_F(ReplicaSetTest, GrowWaitsUntilEveryReplicaIsInSync) {
  Make(2);
  ch_[1]->fail = [](BackendRequest::Op, uint64_t) { return ECONNRESET; };
  std::vector<uint8_t> w(512, 1);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  EXPECT_EQ(r.Wait(), 0);
  ASSERT_EQ(StateOf("b"), MemberState::kOut);
  Status g = set_->Grow(2 * kSize);
  EXPECT_EQ(g.code(), EAGAIN) << g.message();
  EXPECT_EQ(set_->size(), kSize);
  EXPECT_TRUE(ch_[0]->grows.empty());
}

TEST_F(ReplicaSetTest, ALostClaimStopsTheSetAndFailsTheWrite) {
  Make(2);
  ch_[0]->fail = [](BackendRequest::Op, uint64_t) { return ETIMEDOUT; };
  membership_.Fail(ESTALE);
  std::vector<uint8_t> w(512, 3);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  EXPECT_EQ(r.Wait(), -EIO);
  auto h = set_->health();
  EXPECT_TRUE(h.stopped);
  EXPECT_NE(h.stop_reason.find("fake membership refuses"), std::string::npos) << h.stop_reason;
  // Every later request fails, reads included: another target may serve the volume now.
  const uint64_t b_before = ch_[1]->requests();
  Result r2, r3;
  set_->Submit(Write(0, w), r2.Done());
  std::vector<uint8_t> got(512);
  set_->Submit(Read(0, got), r3.Done());
  EXPECT_EQ(r2.Wait(), -EIO);
  EXPECT_EQ(r3.Wait(), -EIO);
  EXPECT_EQ(ch_[1]->requests(), b_before);
}

TEST_F(ReplicaSetTest, AFencedReplicaStopsTheSetWithoutDroppingAnybody) {
  Make(2);
  // node b has seen a newer epoch; a has not yet (the new target connects to it next).
  ch_[1]->fail = [](BackendRequest::Op, uint64_t) { return EPERM; };
  std::vector<uint8_t> w(512, 12), got(512);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  EXPECT_EQ(r.Wait(), -EIO) << "a write the new target may not see is never acknowledged";
  auto h = set_->health();
  EXPECT_TRUE(h.stopped);
  EXPECT_NE(h.stop_reason.find("fenced: the replica on b has seen a newer epoch"),
            std::string::npos)
      << h.stop_reason;
  Result rr;
  set_->Submit(Read(0, got), rr.Done());
  EXPECT_EQ(rr.Wait(), -EIO);
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(20ms);
  EXPECT_TRUE(membership_.calls().empty());
  EXPECT_EQ(StateOf("b"), MemberState::kInSync);
}

TEST_F(ReplicaSetTest, AWriteEveryReplicaFailedIsAnErrorAndDropsNobody) {
  Make(2);
  for (auto* c : ch_) c->fail = [](BackendRequest::Op, uint64_t) { return ENOSPC; };
  std::vector<uint8_t> w(512, 4);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  EXPECT_EQ(r.Wait(), -ENOSPC) << "the replicas' common errno";
  ch_[0]->fail = [](BackendRequest::Op, uint64_t) { return EIO; };
  Result r2;
  set_->Submit(Write(0, w), r2.Done());
  EXPECT_EQ(r2.Wait(), -EIO) << "a mix of errnos is EIO";
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(20ms);
  EXPECT_TRUE(membership_.calls().empty());
  EXPECT_EQ(StateOf("a"), MemberState::kInSync);
  EXPECT_EQ(StateOf("b"), MemberState::kInSync);
}

TEST_F(ReplicaSetTest, ASubmitErrorCountsAsAFailure) {
  Make(2);
  ch_[1]->refuse_submit = ENOTCONN;
  std::vector<uint8_t> w(512, 5);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  EXPECT_EQ(r.Wait(), 0);
  ASSERT_EQ(membership_.calls().size(), 1u);
  EXPECT_EQ(membership_.calls()[0], std::vector<std::string>{"a"});
}

TEST_F(ReplicaSetTest, TheLastInSyncReplicaIsNeverDropped) {
  Make(2);
  for (auto* c : ch_) c->Hold(true);
  std::vector<uint8_t> w1(512, 6), w2(512, 7);
  Result r1, r2;
  set_->Submit(Write(0, w1), r1.Done());
  set_->Submit(Write(4096, w2), r2.Done());
  ASSERT_EQ(ch_[0]->held(), 2u);
  // First write: a fails, b has it. Second: a has it, b fails.
  ch_[0]->fail = [](BackendRequest::Op, uint64_t off) { return off == 0 ? EIO : 0; };
  ch_[1]->fail = [](BackendRequest::Op, uint64_t off) { return off == 4096 ? EIO : 0; };
  membership_.Hold(true);
  ch_[0]->Release();
  ch_[1]->ReleaseOne();  // the first write resolves: a is failing, its drop is under way
  ASSERT_TRUE(membership_.WaitCalls(1));
  EXPECT_EQ(membership_.calls()[0], std::vector<std::string>{"b"});
  ch_[1]->ReleaseOne();  // the second: b fails while a's drop is not confirmed yet
  membership_.Hold(false);
  // a is dropped and the first write is acked from b; dropping b as well would leave nobody.
  EXPECT_EQ(r1.Wait(), 0);
  EXPECT_EQ(r2.Wait(), -EIO);
  auto h = set_->health();
  EXPECT_TRUE(h.stopped);
  EXPECT_NE(h.stop_reason.find("no replica of vol would be left in sync"), std::string::npos)
      << h.stop_reason;
  EXPECT_EQ(membership_.calls().size(), 1u);
  EXPECT_EQ(h.in_sync, std::vector<std::string>{"b"});
}

TEST_F(ReplicaSetTest, AFailedReadIsServedByAnotherReplica) {
  Make(2, "a");
  std::vector<uint8_t> w(512, 8);
  Result r;
  set_->Submit(Write(512, w), r.Done());
  ASSERT_EQ(r.Wait(), 0);
  ch_[0]->fail = [](BackendRequest::Op, uint64_t) { return EIO; };
  std::vector<uint8_t> got(512);
  Result rr;
  set_->Submit(Read(512, got), rr.Done());
  ASSERT_EQ(rr.Wait(), 0);
  EXPECT_EQ(got, w);
  ASSERT_TRUE(membership_.WaitCalls(1));
  EXPECT_EQ(membership_.calls()[0], std::vector<std::string>{"b"});
  EXPECT_TRUE(WaitUntil([&] { return StateOf("a") == MemberState::kOut; }));
  // Reads now go to b only.
  ch_[1]->fail = [](BackendRequest::Op, uint64_t) { return EIO; };
  Result rr2;
  set_->Submit(Read(512, got), rr2.Done());
  EXPECT_EQ(rr2.Wait(), -EIO);
}

TEST_F(ReplicaSetTest, FlushFansOutAndAFailedFlushDropsItsReplica) {
  Make(3);
  ch_[2]->fail = [](BackendRequest::Op op, uint64_t) {
    return op == BackendRequest::Op::kFlush ? EIO : 0;
  };
  Result f;
  set_->Submit({BackendRequest::Op::kFlush}, f.Done());
  ASSERT_EQ(f.Wait(), 0);
  EXPECT_EQ(ch_[0]->flushes(), 1);
  EXPECT_EQ(ch_[1]->flushes(), 1);
  ASSERT_EQ(membership_.calls().size(), 1u);
  EXPECT_EQ(membership_.calls()[0], (std::vector<std::string>{"a", "b"}));
}

TEST_F(ReplicaSetTest, WritesMissingFromAReplicaAreLoggedBeforeTheAck) {
  Make(2, "a", /*with_log=*/true);
  ch_[1]->fail = [](BackendRequest::Op, uint64_t) { return ECONNRESET; };
  std::vector<uint8_t> w(1024, 9);
  Result r;
  set_->Submit(Write(65536, w), r.Done());
  ASSERT_EQ(r.Wait(), 0);
  // Logged when the done ran: the mark came first.
  EXPECT_EQ(log_.Marks(), (std::vector<FakeLog::Mark>{{"b", 65536, 1024}}));
  BackendRequest z{BackendRequest::Op::kWriteZeroes, 1 << 19, 8192};
  Result rz;
  set_->Submit(z, rz.Done());
  ASSERT_EQ(rz.Wait(), 0);
  EXPECT_EQ(log_.Marks().back(), (FakeLog::Mark{"b", 1 << 19, 8192}));
  // A flush changes nothing and logs nothing.
  Result f;
  set_->Submit({BackendRequest::Op::kFlush}, f.Done());
  ASSERT_EQ(f.Wait(), 0);
  EXPECT_EQ(log_.Marks().size(), 2u);
  // A range that cannot be logged cannot be acknowledged without b.
  {
    std::lock_guard<std::mutex> lock(log_.mu);
    log_.fail = true;
  }
  Result r2;
  set_->Submit(Write(0, w), r2.Done());
  EXPECT_EQ(r2.Wait(), -EIO);
}

TEST_F(ReplicaSetTest, AsyncLogMarksAreAwaitedBeforeTheAck) {
  Make(2, "a", /*with_log=*/true);
  log_.async = true;
  ch_[1]->fail = [](BackendRequest::Op, uint64_t) { return ECONNRESET; };
  std::vector<uint8_t> w(4096, 13);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  ASSERT_EQ(r.Wait(), 0);
  // b is out now: the next write is marked from Submit, answered from the log's thread.
  Result r2;
  set_->Submit(Write(8192, w), r2.Done());
  ASSERT_EQ(r2.Wait(), 0);
  EXPECT_EQ(log_.Marks(), (std::vector<FakeLog::Mark>{{"b", 0, 4096}, {"b", 8192, 4096}}));
  {
    std::lock_guard<std::mutex> lock(log_.mu);
    log_.fail = true;
  }
  Result r3;
  set_->Submit(Write(0, w), r3.Done());
  EXPECT_EQ(r3.Wait(), -EIO);
}

TEST_F(ReplicaSetTest, FreezeWaitsForChangesInFlightAndHoldsNewOnes) {
  Make(2);
  for (auto* c : ch_) c->Hold(true);
  std::vector<uint8_t> w(512, 14), got(512);
  Result r1;
  set_->Submit(Write(0, w), r1.Done());
  std::atomic<bool> frozen{false};
  std::thread freezer([&] {
    set_->Freeze();
    frozen = true;
  });
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(frozen) << "Freeze returned with a write in flight";
  for (auto* c : ch_) c->Hold(false);
  for (auto* c : ch_) c->Release();
  freezer.join();
  EXPECT_EQ(r1.Wait(), 0);
  // Frozen: a write waits (not even sent), a read goes on.
  const uint64_t before = ch_[0]->requests();
  Result r2, rr;
  set_->Submit(Write(512, w), r2.Done());
  set_->Submit(Read(0, got), rr.Done());
  EXPECT_EQ(rr.Wait(), 0);
  EXPECT_EQ(ch_[0]->requests(), before + 1);
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(r2.Called());
  set_->Thaw();
  EXPECT_EQ(r2.Wait(), 0);
  EXPECT_EQ(ch_[1]->Bytes(512, 512), w);
}

// A snapshot's freeze may overlap a resync's: each Freeze needs its own Thaw, and a Thaw with
// no freeze left lifts nothing (it must not release somebody else's).
TEST_F(ReplicaSetTest, FreezesNestAndOnlyTheLastThawLetsTheWritesGo) {
  Make(2);
  set_->Thaw();  // unmatched: nothing to lift, and it must not count
  set_->Freeze();
  set_->Freeze();
  std::vector<uint8_t> w(512, 21);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  set_->Thaw();
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(r.Called()) << "one freeze is still held";
  EXPECT_EQ(ch_[0]->requests(), 0u);
  set_->Thaw();
  EXPECT_EQ(r.Wait(), 0);
  EXPECT_EQ(ch_[1]->Bytes(0, 512), w);
  set_->Thaw();
  Result r2;
  set_->Submit(Write(512, w), r2.Done());
  EXPECT_EQ(r2.Wait(), 0) << "an extra Thaw left nothing frozen";
}

TEST_F(ReplicaSetTest, FreezeUntilGivesUpWhenAWriteDoesNotFinishAndLeavesNothingFrozen) {
  Make(2);
  ch_[1]->Hold(true);
  std::vector<uint8_t> w(512, 22);
  Result r1;
  set_->Submit(Write(0, w), r1.Done());
  const auto t0 = std::chrono::steady_clock::now();
  Status s = set_->FreezeUntil(t0 + 50ms);
  EXPECT_EQ(s.code(), ETIMEDOUT) << s.message();
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 50ms);
  ch_[1]->Hold(false);
  ch_[1]->Release();
  EXPECT_EQ(r1.Wait(), 0);
  Result r2;
  set_->Submit(Write(512, w), r2.Done());
  EXPECT_EQ(r2.Wait(), 0) << "the failed freeze was undone";
  // Nothing in flight: at once.
  EXPECT_TRUE(set_->FreezeUntil(std::chrono::steady_clock::now() + 1s).ok());
  set_->Thaw();
  set_->Stop("test");
  EXPECT_EQ(set_->FreezeUntil(std::chrono::steady_clock::now() + 1s).code(), EIO);
}

TEST_F(ReplicaSetTest, AFlushPastTheFreezeReachesEveryInSyncReplicaAndDropsOneThatFailsIt) {
  Make(3);
  EXPECT_EQ(set_->FlushFrozen().code(), EINVAL) << "not frozen";
  set_->Freeze();
  std::vector<uint8_t> w(512, 23);
  Result held;
  set_->Submit(Write(0, w), held.Done());
  ASSERT_TRUE(set_->FlushFrozen().ok());
  for (auto* c : ch_) EXPECT_EQ(c->flushes(), 1);
  EXPECT_EQ(ch_[0]->requests(), 1u) << "the held write stays held";
  EXPECT_FALSE(held.Called());
  // A replica that fails the flush is out of the in-sync set (recorded) before it returns.
  ch_[2]->fail = [](BackendRequest::Op op, uint64_t) {
    return op == BackendRequest::Op::kFlush ? EIO : 0;
  };
  ASSERT_TRUE(set_->FlushFrozen().ok());
  EXPECT_EQ(StateOf("c"), MemberState::kOut);
  EXPECT_EQ(set_->health().in_sync, (std::vector<std::string>{"a", "b"}));
  set_->Thaw();
  EXPECT_EQ(held.Wait(), 0);
  EXPECT_EQ(ch_[2]->Bytes(0, 512), std::vector<uint8_t>(512, 0)) << "c is out: not written";
}

TEST_F(ReplicaSetTest, AResyncedReplicaIsReadmitted) {
  Make(2);
  ch_[1]->fail = [](BackendRequest::Op, uint64_t) { return ECONNRESET; };
  std::vector<uint8_t> w(512, 15);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  ASSERT_EQ(r.Wait(), 0);
  ASSERT_EQ(StateOf("b"), MemberState::kOut);
  auto fresh = std::make_unique<FakeChannel>();
  FakeChannel* pf = fresh.get();
  EXPECT_EQ(set_->Readmit("b", std::make_unique<FakeChannel>()).code(), EINVAL) << "not frozen";
  set_->Freeze();
  EXPECT_EQ(set_->Readmit("a", std::make_unique<FakeChannel>()).code(), EINVAL) << "in sync";
  EXPECT_EQ(set_->Readmit("z", std::make_unique<FakeChannel>()).code(), ENOENT);
  ASSERT_TRUE(set_->Readmit("b", std::move(fresh)).ok());
  set_->Thaw();
  ASSERT_EQ(membership_.calls().size(), 2u);
  EXPECT_EQ(membership_.calls()[1], (std::vector<std::string>{"a", "b"}));
  auto h = set_->health();
  EXPECT_FALSE(h.degraded);
  EXPECT_EQ(h.in_sync, (std::vector<std::string>{"a", "b"}));
  Result r2;
  set_->Submit(Write(1024, w), r2.Done());
  ASSERT_EQ(r2.Wait(), 0);
  EXPECT_EQ(pf->Bytes(1024, 512), w) << "the readmitted replica gets the writes";
  // A readmit the cluster refuses leaves the replica out.
  ch_[0]->fail = [](BackendRequest::Op, uint64_t) { return EIO; };
  Result r3;
  set_->Submit(Write(0, w), r3.Done());
  ASSERT_EQ(r3.Wait(), 0);
  ASSERT_EQ(StateOf("a"), MemberState::kOut);
  membership_.Fail(ESTALE);
  set_->Freeze();
  EXPECT_EQ(set_->Readmit("a", std::make_unique<FakeChannel>()).code(), ESTALE);
  set_->Thaw();
  EXPECT_EQ(StateOf("a"), MemberState::kOut);
}

// A replica already out of sync when the target opens (it missed writes under an earlier
// target): a member without a channel, degraded from the start, its misses logged.
TEST(ReplicaSetOutAtOpen, IsAMemberOutOfSyncUntilReadmitted) {
  FakeMembership membership;
  FakeLog log;
  std::vector<ReplicaMember> members;
  auto a = std::make_unique<FakeChannel>();
  FakeChannel* pa = a.get();
  members.push_back({"a", std::move(a)});
  members.push_back({"b", nullptr, /*in_sync=*/false});
  auto set = ReplicaSet::Create({"vol", kSize, "a"}, std::move(members), membership, &log);
  ASSERT_TRUE(set.ok()) << set.status().message();
  auto h = (*set)->health();
  EXPECT_TRUE(h.degraded);
  EXPECT_EQ(h.in_sync, std::vector<std::string>{"a"});
  EXPECT_EQ(h.members[1].state, MemberState::kOut);
  std::vector<uint8_t> w(512, 16);
  Result r;
  (*set)->Submit({BackendRequest::Op::kWrite, 4096, 512, w.data()}, r.Done());
  ASSERT_EQ(r.Wait(), 0);
  EXPECT_EQ(pa->Bytes(4096, 512), w);
  EXPECT_EQ(log.Marks(), (std::vector<FakeLog::Mark>{{"b", 4096, 512}}));
  (*set)->Freeze();
  ASSERT_TRUE((*set)->Readmit("b", std::make_unique<FakeChannel>()).ok());
  (*set)->Thaw();
  EXPECT_FALSE((*set)->health().degraded);
  // Nobody in sync at all is refused.
  std::vector<ReplicaMember> none;
  none.push_back({"a", nullptr, false});
  EXPECT_EQ(ReplicaSet::Create({"vol", kSize, "a"}, std::move(none), membership).status().code(),
            EINVAL);
}

// A replica added to a live set (volume move): out of sync with no channel, its misses logged,
// readmitted by a resync like any other; an old one removed while a write to it is in flight:
// the write is acknowledged without it, nothing goes to it after, and the in-sync set shrinks.
TEST_F(ReplicaSetTest, AReplicaIsAddedThenAnotherRemovedUnderWrites) {
  Make(2, "a", /*with_log=*/true);
  EXPECT_EQ(set_->AddMember("b").code(), EEXIST);
  ASSERT_TRUE(set_->AddMember("c").ok());
  EXPECT_EQ(StateOf("c"), MemberState::kOut);
  EXPECT_TRUE(set_->health().degraded);
  std::vector<uint8_t> w(512, 21);
  Result r1;
  set_->Submit(Write(8192, w), r1.Done());
  ASSERT_EQ(r1.Wait(), 0);
  EXPECT_EQ(log_.Marks(), (std::vector<FakeLog::Mark>{{"c", 8192, 512}}));
  auto fc = std::make_unique<FakeChannel>();
  FakeChannel* pc = fc.get();
  set_->Freeze();
  ASSERT_TRUE(set_->Readmit("c", std::move(fc)).ok());
  set_->Thaw();
  EXPECT_EQ(membership_.calls().back(), (std::vector<std::string>{"a", "b", "c"}));

  // The last in-sync replica is refused; so is a node not in the set, and a failing record.
  int recorded = 0;
  auto record = [&] {
    ++recorded;
    return Status::Ok();
  };
  EXPECT_EQ(set_->RemoveMember("z", record).code(), ENOENT);
  EXPECT_EQ(set_->RemoveMember("b", [] { return Error(ESTALE, "claim gone"); }).code(), ESTALE);
  EXPECT_EQ(StateOf("b"), MemberState::kInSync) << "a refused record changes nothing";

  // A write in flight to b (held there) when b is removed: acknowledged once a and c have it.
  ch_[1]->Hold(true);
  Result r2;
  set_->Submit(Write(0, w), r2.Done());
  ASSERT_TRUE(WaitUntil([&] { return ch_[1]->held() == 1; }));
  EXPECT_FALSE(r2.Called());
  const auto b_submitted = ch_[1]->submitted;
  ASSERT_TRUE(set_->RemoveMember("b", record).ok());  // destroys b's channel: ch_[1] dangles
  ch_[1] = nullptr;
  EXPECT_EQ(recorded, 1);
  ASSERT_EQ(r2.Wait(), 0);
  auto h = set_->health();
  ASSERT_EQ(h.members.size(), 2u);
  EXPECT_EQ(h.members[0].node, "a");
  EXPECT_EQ(h.members[1].node, "c");
  EXPECT_EQ(h.in_sync, (std::vector<std::string>{"a", "c"}));
  EXPECT_FALSE(h.degraded);
  const uint64_t b_requests = b_submitted->load();
  Result r3;
  set_->Submit(Write(4096, w), r3.Done());
  ASSERT_EQ(r3.Wait(), 0);
  EXPECT_EQ(b_submitted->load(), b_requests) << "nothing goes to a removed replica";
  EXPECT_EQ(pc->Bytes(4096, 512), w);
  EXPECT_EQ(log_.Marks().size(), 1u) << "a removed replica's misses are not logged";
  EXPECT_EQ(set_->RemoveMember("b", record).code(), ENOENT);
  // Grow ignores a removed member; a re-added one is a new member, out of sync.
  EXPECT_TRUE(set_->Grow(kSize).ok());
  ASSERT_TRUE(set_->AddMember("b").ok());
  EXPECT_EQ(StateOf("b"), MemberState::kOut);
  // With c failing, a is the last in sync: c fails the next write and is dropped, then a stays.
  pc->fail = [](BackendRequest::Op, uint64_t) { return EIO; };
  Result r4;
  set_->Submit(Write(0, w), r4.Done());
  ASSERT_EQ(r4.Wait(), 0);
  EXPECT_EQ(set_->RemoveMember("a", record).code(), EBUSY);
  EXPECT_EQ(recorded, 1);
}

TEST_F(ReplicaSetTest, CloseFailsWhatIsInFlightWithShutdown) {
  Make(2);
  for (auto* c : ch_) c->Hold(true);
  std::vector<uint8_t> w(512, 10), got(512);
  Result r, rr;
  set_->Submit(Write(0, w), r.Done());
  set_->Submit(Read(0, got), rr.Done());
  set_->Close();
  EXPECT_EQ(r.Wait(), -ESHUTDOWN);
  EXPECT_EQ(rr.Wait(), -ESHUTDOWN);
  Result after;
  set_->Submit(Write(0, w), after.Done());
  EXPECT_EQ(after.Wait(), -ESHUTDOWN);
  EXPECT_TRUE(membership_.calls().empty()) << "closing drops nobody";
  set_.reset();
  EXPECT_EQ(r.calls(), 1);
}

// Many writers, replicas failing at random: every request is answered exactly once, and every
// acknowledged write is on every replica still in sync at the end.
TEST_F(ReplicaSetTest, ConcurrentWritersWithFailingReplicas) {
  Make(3);
  std::atomic<int> budget{40};
  ch_[1]->fail = [&](BackendRequest::Op, uint64_t off) {
    return (off / 4096) % 7 == 3 && budget.fetch_sub(1) > 0 ? EIO : 0;
  };
  constexpr int kThreads = 4, kPerThread = 200;
  std::vector<std::vector<std::vector<uint8_t>>> bufs(kThreads);
  std::vector<std::vector<Result>> results(kThreads);
  for (auto& rs : results) rs = std::vector<Result>(kPerThread);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    bufs[t].resize(kPerThread);
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        // Each thread owns its own blocks (block t + kThreads*j) so the last write wins.
        uint64_t block = static_cast<uint64_t>(t + kThreads * (i % 50));
        bufs[t][i].assign(4096, static_cast<uint8_t>(t * 31 + i));
        set_->Submit(Write(block * 4096, bufs[t][i]), results[t][i].Done());
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t)
    for (int i = 0; i < kPerThread; ++i) {
      ASSERT_EQ(results[t][i].Wait(), 0) << t << "/" << i;
      EXPECT_EQ(results[t][i].calls(), 1);
    }
  auto h = set_->health();
  EXPECT_EQ(h.in_sync, (std::vector<std::string>{"a", "c"}));
  for (int t = 0; t < kThreads; ++t)
    for (int i = kPerThread - 50; i < kPerThread; ++i) {
      uint64_t block = static_cast<uint64_t>(t + kThreads * (i % 50));
      EXPECT_EQ(ch_[0]->Bytes(block * 4096, 4096), bufs[t][i]);
      EXPECT_EQ(ch_[2]->Bytes(block * 4096, 4096), bufs[t][i]);
    }
}

// The real membership on the memory cluster store: the target's claim is what lets it drop a
// replica; once the lease behind the claim is gone, the set stops.
// After an unclean takeover the replicas differ where the dead target's writes were in flight:
// until reconciled, reads come from the source only, and the reconciliation makes every in-sync
// replica hold what the source holds.
TEST_F(ReplicaSetTest, ReconcileMakesTheReplicasIdenticalAndReadsTheSourceOnlyUntilThen) {
  Make(3, "a", false, "b");
  const std::vector<uint8_t> x(4096, 0x11), y(4096, 0x22), z(4096, 0x33);
  ch_[0]->Poke(0, x);  // a applied a write that b never got
  ch_[1]->Poke(0, y);
  ch_[2]->Poke(65536, z);  // c alone has another
  auto h = set_->health();
  EXPECT_TRUE(h.reconciling);
  EXPECT_EQ(h.reconcile_source, "b");
  std::vector<uint8_t> got(4096);
  for (int i = 0; i < 3; ++i) {
    Result r;
    set_->Submit(Read(0, got), r.Done());
    ASSERT_EQ(r.Wait(), 0);
    EXPECT_EQ(got, y) << "a read while reconciling came from a replica other than the source";
  }
  EXPECT_EQ(ch_[0]->requests(), 0u);
  EXPECT_EQ(ch_[2]->requests(), 0u);
  std::vector<uint64_t> progress;
  ReconcileOptions ro;
  ro.region_bytes = 64 << 10;
  ro.on_progress = [&](uint64_t done) { progress.push_back(done); };
  ASSERT_TRUE(set_->Reconcile(ro).ok());
  ASSERT_EQ(progress.size(), kSize / (64 << 10));
  EXPECT_EQ(progress.back(), kSize);
  EXPECT_EQ(set_->health().reconcile_done_bytes, kSize);
  for (auto* c : ch_) {
    EXPECT_EQ(c->Bytes(0, 4096), y);
    EXPECT_EQ(c->Bytes(65536, 4096), std::vector<uint8_t>(4096, 0)) << "c's extra write stays";
    EXPECT_EQ(c->flushes(), 1) << "the reconciled copies are flushed";
  }
  EXPECT_TRUE(membership_.calls().empty()) << "nobody is dropped";
  set_->EndReconcile();
  h = set_->health();
  EXPECT_FALSE(h.reconciling);
  EXPECT_FALSE(h.may_differ);
  const uint64_t before_a = ch_[0]->requests();
  Result r;
  set_->Submit(Read(0, got), r.Done());
  ASSERT_EQ(r.Wait(), 0);
  EXPECT_EQ(ch_[0]->requests(), before_a + 1) << "reads go to the preferred replica again";
  EXPECT_EQ(set_->LockRange(0, 4096).code(), EINVAL) << "ranges lock only while reconciling";
}

TEST_F(ReplicaSetTest, AReconcileSourceMustBeAnInSyncMember) {
  FakeMembership m;
  std::vector<ReplicaMember> members;
  members.push_back({"a", std::make_unique<FakeChannel>()});
  members.push_back({"b", nullptr, false});
  EXPECT_EQ(ReplicaSet::Create({"vol", kSize, "a", "b"}, std::move(members), m).status().code(),
            EINVAL);
}

// A write to the region being copied waits for the copy, so that the copy (of what the source
// held before it) never lands over it.
TEST_F(ReplicaSetTest, AWriteToTheRegionBeingReconciledWaitsForTheCopy) {
  Make(2, "a", false, "a");
  ch_[0]->Poke(0, std::vector<uint8_t>(4096, 0x44));
  for (auto* c : ch_) c->Hold(true);
  ReconcileOptions ro;
  ro.region_bytes = 4096;
  Status reconciled;
  std::thread t([&] { reconciled = set_->Reconcile(ro); });
  ASSERT_TRUE(WaitUntil([&] { return ch_[0]->held() == 1; }));  // the copy's read of region 0
  std::vector<uint8_t> w(4096, 0x55);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(ch_[0]->held(), 1u) << "a write to the locked region was sent";
  EXPECT_EQ(ch_[1]->held(), 0u) << "a write to the locked region was sent";
  // A write elsewhere goes on.
  std::vector<uint8_t> w2(4096, 0x66);
  Result r2;
  set_->Submit(Write(kSize - 4096, w2), r2.Done());
  ASSERT_TRUE(WaitUntil([&] { return ch_[1]->held() == 1; }));
  for (auto* c : ch_) c->Hold(false);
  // Let everything through until the pass ends.
  ASSERT_TRUE(WaitUntil([&] {
    for (auto* c : ch_) c->Release();
    return r.Called() && r2.Called() && set_->health().reconcile_done_bytes == kSize;
  }));
  t.join();
  ASSERT_TRUE(reconciled.ok()) << reconciled.message();
  EXPECT_EQ(r.Wait(), 0);
  EXPECT_EQ(r2.Wait(), 0);
  for (auto* c : ch_) {
    EXPECT_EQ(c->Bytes(0, 4096), w) << "the copy overwrote a newer write";
    EXPECT_EQ(c->Bytes(kSize - 4096, 4096), w2);
  }
}

TEST_F(ReplicaSetTest, LockRangeWaitsForTheWritesInFlightThere) {
  Make(2, "a", false, "a");
  for (auto* c : ch_) c->Hold(true);
  std::vector<uint8_t> w(4096, 0x77);
  Result r;
  set_->Submit(Write(8192, w), r.Done());
  std::atomic<bool> locked{false};
  std::thread t([&] {
    EXPECT_TRUE(set_->LockRange(0, 16384).ok());
    locked = true;
  });
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(locked) << "LockRange returned with a write in flight in its range";
  EXPECT_EQ(set_->LockRange(0, 4096).code(), EBUSY);
  for (auto* c : ch_) c->Hold(false);
  for (auto* c : ch_) c->Release();
  t.join();
  EXPECT_EQ(r.Wait(), 0);
  // Held by the lock: a write there goes on at the unlock; Close fails one still held.
  Result r2;
  set_->Submit(Write(0, w), r2.Done());
  // A window for a wrong outcome (nothing signals that something did not happen).
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(r2.Called());
  set_->UnlockRange();
  EXPECT_EQ(r2.Wait(), 0);
  ASSERT_TRUE(set_->LockRange(0, 4096).ok());
  Result r3;
  set_->Submit(Write(0, w), r3.Done());
  set_->Close();
  EXPECT_EQ(r3.Wait(), -ESHUTDOWN);
}

// The source fails: the replica the read falls over to is the source from then on, and the
// others are made to hold what it holds.
TEST_F(ReplicaSetTest, WhenTheReconcileSourceFailsTheNextReaderBecomesIt) {
  Make(3, "a", false, "a");
  ch_[1]->Poke(0, std::vector<uint8_t>(4096, 0x12));
  ch_[2]->Poke(0, std::vector<uint8_t>(4096, 0x34));
  ch_[0]->fail = [](BackendRequest::Op, uint64_t) { return EIO; };
  std::vector<uint8_t> got(4096);
  Result r;
  set_->Submit(Read(0, got), r.Done());
  ASSERT_EQ(r.Wait(), 0);
  EXPECT_EQ(got, std::vector<uint8_t>(4096, 0x12));
  EXPECT_EQ(set_->health().reconcile_source, "b");
  ASSERT_TRUE(WaitUntil([&] { return StateOf("a") == MemberState::kOut; }));
  ASSERT_TRUE(set_->Reconcile({}).ok());
  EXPECT_EQ(ch_[2]->Bytes(0, 4096), std::vector<uint8_t>(4096, 0x12));
  EXPECT_EQ(membership_.calls(), (std::vector<std::vector<std::string>>{{"b", "c"}}));
}

TEST_F(ReplicaSetTest, AChangeThatFailedEverywhereMeansTheReplicasMayDiffer) {
  Make(2);
  EXPECT_FALSE(set_->health().may_differ);
  for (auto* c : ch_) c->fail = [](BackendRequest::Op, uint64_t) { return ENOSPC; };
  std::vector<uint8_t> w(512, 1);
  Result r;
  set_->Submit(Write(0, w), r.Done());
  EXPECT_EQ(r.Wait(), -ENOSPC);
  EXPECT_TRUE(WaitUntil([&] { return set_->health().may_differ; }));
}

TEST(ClusterMembershipTest, DropsThroughTheClaimAndStopsWithoutIt) {
  test::MemoryClusterStore store;
  cluster::VolumeState v{"vol", kSize, {"a", "b"}, {"a", "b"}, "", 0};
  ASSERT_TRUE(store.CreateVolume(v).ok());
  auto lease = store.GrantLease(10);
  ASSERT_TRUE(lease.ok());
  auto claim = store.ClaimTarget("vol", "t", *lease);
  ASSERT_TRUE(claim.ok()) << claim.status().message();
  ClusterMembership membership(store, "vol", "t", claim->epoch, 200ms);
  std::vector<ReplicaMember> members;
  auto a = std::make_unique<FakeChannel>();
  auto b = std::make_unique<FakeChannel>();
  FakeChannel* pa = a.get();
  FakeChannel* pb = b.get();
  members.push_back({"a", std::move(a)});
  members.push_back({"b", std::move(b)});
  auto set = ReplicaSet::Create({"vol", kSize, "a"}, std::move(members), membership);
  ASSERT_TRUE(set.ok());
  pb->fail = [](BackendRequest::Op, uint64_t) { return ECONNRESET; };
  std::vector<uint8_t> w(512, 11);
  Result r;
  (*set)->Submit({BackendRequest::Op::kWrite, 0, 512, w.data()}, r.Done());
  ASSERT_EQ(r.Wait(), 0);
  auto now = store.GetVolume("vol");
  ASSERT_TRUE(now.ok());
  EXPECT_EQ(now->in_sync, std::vector<std::string>{"a"});
  EXPECT_EQ(now->replicas, (std::vector<std::string>{"a", "b"}));

  // A second set at a new epoch (after the claim's lease expired): the old one cannot drop.
  ASSERT_TRUE(store.CreateVolume({"vol2", kSize, {"a", "b"}, {"a", "b"}, "", 0}).ok());
  auto lease2 = store.GrantLease(10);
  auto claim2 = store.ClaimTarget("vol2", "t", *lease2);
  ASSERT_TRUE(claim2.ok());
  ClusterMembership stale(store, "vol2", "t", claim2->epoch, 200ms);
  ASSERT_TRUE(store.ExpireLease(*lease2));
  std::vector<ReplicaMember> m2;
  auto c = std::make_unique<FakeChannel>();
  auto d = std::make_unique<FakeChannel>();
  d->fail = [](BackendRequest::Op, uint64_t) { return ECONNRESET; };
  m2.push_back({"a", std::move(c)});
  m2.push_back({"b", std::move(d)});
  auto set2 = ReplicaSet::Create({"vol2", kSize, "a"}, std::move(m2), stale);
  ASSERT_TRUE(set2.ok());
  Result r2;
  (*set2)->Submit({BackendRequest::Op::kWrite, 0, 512, w.data()}, r2.Done());
  EXPECT_EQ(r2.Wait(), -EIO);
  EXPECT_TRUE((*set2)->health().stopped);
  auto still = store.GetVolume("vol2");
  EXPECT_EQ(still->in_sync, (std::vector<std::string>{"a", "b"})) << "nothing changed";
  (void)pa;
}

}  // namespace
}  // namespace nbdcsi::replica
