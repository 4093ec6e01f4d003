// Pieces of the controller on their own: CreateVolume's size rules and the pagination tokens
// (table-driven), and the gRPC NodeDatapath against an in-process Datapath server (codes to errno,
// deadline, unreachable node). The decisions built on them: controller_decisions_test.cpp.
#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "common/grpc_status.h"
#include "common/volume_rules.h"
#include "controller/csi_request.h"
#include "controller/last_listings.h"
#include "controller/node_datapath.h"
#include "controller/paging.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "test/controller/gate.h"
#include "test/support/free_port.h"

namespace nbdcsi::controller {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

struct SizeCase {
  int64_t required, limit;  // -2: no capacity_range at all
  uint64_t min_size;
  uint64_t want;  // 0: an error
  int err;
};

TEST(VolumeSizeFor, Table) {
  const SizeCase cases[] = {
      {-2, 0, 0, kGiB, 0},                  // nothing given: the default
      {0, 0, 0, kGiB, 0},                   // an empty range: the default too
      {1, 0, 0, 4096, 0},                   // rounded up to 4 KiB
      {4096, 0, 0, 4096, 0},                // aligned stays
      {5000, 0, 0, 8192, 0},
      {0, 3 * 1048576 + 100, 0, 3 * 1048576, 0},  // only a limit: default brought down
      {0, 100, 0, 0, ERANGE},               // a limit below one block
      {5000, 6000, 0, 0, ERANGE},           // no 4 KiB multiple in the range
      {8192, 8192, 0, 8192, 0},
      {2 * 1048576, 1048576, 0, 0, EINVAL},  // limit < required
      {-1, 0, 0, 0, EINVAL},
      {0, -1, 0, 0, EINVAL},
      {-2, 0, 4 * 1048576, 4 * 1048576, 0},  // a source: never smaller than it
      {1048576, 0, 4 * 1048576, 4 * 1048576, 0},
      {8 * 1048576, 0, 4 * 1048576, 8 * 1048576, 0},  // bigger than the source grows it
      {0, 1048576, 4 * 1048576, 0, ERANGE},           // the source does not fit the limit
      {INT64_MAX, 0, 0, 0x8000000000000000ull, 0},    // rounding near the top does not wrap
  };
  for (const auto& c : cases) {
    ::csi::v1::CapacityRange r;
    if (c.required != -2) {
      r.set_required_bytes(c.required);
      r.set_limit_bytes(c.limit);
    }
    // As CreateVolume calls it: a source's size is also the default.
    auto got = VolumeSizeFor(c.required == -2 ? nullptr : &r, c.min_size ? c.min_size : kGiB,
                             c.min_size);
    SCOPED_TRACE(::testing::Message() << "required " << c.required << " limit " << c.limit
                                      << " min " << c.min_size);
    if (c.err) {
      ASSERT_FALSE(got.ok());
      EXPECT_EQ(got.status().code(), c.err) << got.status().message();
      EXPECT_FALSE(got.status().message().empty());
    } else {
      ASSERT_TRUE(got.ok()) << got.status().message();
      EXPECT_EQ(*got, c.want);
      EXPECT_EQ(*got % kVolumeSizeAlignment, 0u);
    }
  }
}

std::vector<std::string> Names(const std::optional<std::vector<dpv1::Volume>>& vs) {
  std::vector<std::string> out;
  for (const auto& v : vs.value_or(std::vector<dpv1::Volume>{})) out.push_back(v.name());
  return out;
}

dpv1::Volume Named(const std::string& name) {
  dpv1::Volume v;
  v.set_name(name);
  return v;
}

// A deletion between a question and the publishing of its answer wins; the tombstone it leaves
// lives only as long as an older question is in flight.
TEST(LastListings, AnAnswerAskedBeforeADeletionDoesNotBringTheVolumeBack) {
  LastListings l;
  l.Put(l.Begin(), "n", {Named("a"), Named("b")});
  l.Forget("n", "b");
  EXPECT_EQ(l.Tombstones(), 0u) << "no question in flight: nothing to keep";
  {
    const LastListings::Ticket before = l.Begin();
    l.Forget("n", "a");
    EXPECT_EQ(l.Tombstones(), 1u);
    {
      const LastListings::Ticket after = l.Begin();  // asked after the deletion: "a" is new
      l.PutVolume(after, "n", Named("a"));
      EXPECT_EQ(Names(l.Of("n")), (std::vector<std::string>{"a"}));
    }
    EXPECT_EQ(l.Tombstones(), 1u) << "an older question is still in flight";
    l.Forget("n", "a");
    l.Put(before, "n", {Named("a"), Named("c")});
    EXPECT_EQ(Names(l.Of("n")), (std::vector<std::string>{"c"}));
    l.PutVolume(before, "n", Named("a"));
    EXPECT_FALSE(l.Volume("n", "a"));
    // A node never listed before gets its first listing without what was deleted meanwhile.
    l.Forget("m", "x");
    l.Put(before, "m", {Named("x"), Named("y")});
    EXPECT_EQ(Names(l.Of("m")), (std::vector<std::string>{"y"}));
  }
  EXPECT_EQ(l.Tombstones(), 0u) << "no question in flight any more";
  l.Put(l.Begin(), "n", {Named("a")});
  EXPECT_EQ(Names(l.Of("n")), (std::vector<std::string>{"a"}));
}

TEST(PageToken, RoundTripsAndRejectsForeignTokens) {
  const std::vector<std::string> ids = {"v1:node-a:pvc-1", "s1:n:x", std::string("\x00\xff:", 3)};
  for (const std::string& id : ids) {
    auto t = EncodePageToken(id);
    auto back = DecodePageToken(t);
    ASSERT_TRUE(back.has_value()) << t;
    EXPECT_EQ(*back, id);
  }
  for (const char* bad : {"", "invalid-token", "p1.", "p1.a", "p1.zz", "p1.AB", "p2.6162",
                          "6162"}) {
    EXPECT_FALSE(DecodePageToken(bad).has_value()) << bad;
  }
  // Ordering of tokens follows the ids (the controller compares decoded ids, not tokens).
  EXPECT_EQ(*DecodePageToken(EncodePageToken("a")), "a");
}

// ---- the gRPC NodeDatapath ----

// A Datapath server that answers GetVolume and ListVolumes with `code` (and a message naming the
// volume); GetVolume waits while `gate` is closed.
class ScriptedDatapath final : public dpv1::Datapath::Service {
 public:
  grpc::Status GetVolume(grpc::ServerContext*, const dpv1::GetVolumeRequest* req,
                         dpv1::GetVolumeResponse* resp) override {
    gate.Pass();
    if (grpc::StatusCode c = code_.load(); c != grpc::StatusCode::OK) {
      return grpc::Status(c, "the pool says no about " + req->name());
    }
    resp->mutable_volume()->set_name(req->name());
    resp->mutable_volume()->set_size_bytes(8192);
    return grpc::Status::OK;
  }
  grpc::Status ListVolumes(grpc::ServerContext*, const dpv1::ListVolumesRequest*,
                           dpv1::ListVolumesResponse* resp) override {
    if (grpc::StatusCode c = code_.load(); c != grpc::StatusCode::OK) {
      return grpc::Status(c, "the pool says no");
    }
    for (const char* n : {"a", "b"}) resp->add_volumes()->set_name(n);
    return grpc::Status::OK;
  }
  void Answer(grpc::StatusCode c) { code_ = c; }

  test::Gate gate;

 private:
  std::atomic<grpc::StatusCode> code_{grpc::StatusCode::OK};
};

class GrpcNodeDatapathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(&service_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
  }
  void TearDown() override {
    service_.gate.Open();
    if (server_) server_->Shutdown();
  }
  // The client as the registry gets it: through the factory, by address.
  std::shared_ptr<NodeDatapath> Client(std::chrono::milliseconds timeout, int port = 0) {
    GrpcDatapathOptions o;
    o.creds = grpc::InsecureChannelCredentials();
    o.timeout = timeout;
    return MakeGrpcDatapathFactory(o)("node-x", "127.0.0.1:" + std::to_string(port ? port : port_));
  }

  ScriptedDatapath service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(GrpcNodeDatapathTest, AnswersArriveAsValues) {
  auto dp = Client(std::chrono::seconds(10));
  auto v = dp->GetVolume("pvc-1");
  ASSERT_TRUE(v.ok()) << v.status().message();
  EXPECT_EQ(v->name(), "pvc-1");
  EXPECT_EQ(v->size_bytes(), 8192u);
  auto all = dp->ListVolumes();
  ASSERT_TRUE(all.ok()) << all.status().message();
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[1].name(), "b");
}

TEST_F(GrpcNodeDatapathTest, EachDatapathCodeBecomesItsErrnoOnceWithTheNodeAndCallNamed) {
  auto dp = Client(std::chrono::seconds(10));
  for (auto code : {grpc::StatusCode::NOT_FOUND, grpc::StatusCode::ALREADY_EXISTS,
                    grpc::StatusCode::INVALID_ARGUMENT, grpc::StatusCode::RESOURCE_EXHAUSTED,
                    grpc::StatusCode::FAILED_PRECONDITION, grpc::StatusCode::ABORTED,
                    grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::OUT_OF_RANGE,
                    grpc::StatusCode::INTERNAL, grpc::StatusCode::PERMISSION_DENIED}) {
    SCOPED_TRACE(GrpcCodeName(code));
    service_.Answer(code);
    auto v = dp->GetVolume("pvc-1");
    ASSERT_FALSE(v.ok());
    EXPECT_EQ(v.status().code(), GrpcCodeToErrno(code));
    // Back at the CSI edge it is the same code again: nothing is lost on the way through.
    EXPECT_EQ(ErrnoToGrpcCode(v.status().code()), code);
    EXPECT_EQ(v.status().message(), "node node-x: GetVolume: the pool says no about pvc-1");
  }
  EXPECT_EQ(dp->ListVolumes().status().code(),
            GrpcCodeToErrno(grpc::StatusCode::PERMISSION_DENIED));
}

TEST_F(GrpcNodeDatapathTest, ANodeThatDoesNotAnswerWithinTheDeadlineIsETIMEDOUT) {
  service_.gate.Close();
  auto v = Client(std::chrono::milliseconds(200))->GetVolume("pvc-1");
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), ETIMEDOUT) << v.status().message();
  EXPECT_NE(v.status().message().find("node node-x: GetVolume"), std::string::npos);
}

TEST_F(GrpcNodeDatapathTest, ANodeNobodyListensForIsEAGAIN) {
  const int closed = test::FreeLoopbackPort();
  ASSERT_GT(closed, 0);
  auto v = Client(std::chrono::seconds(10), closed)->GetVolume("pvc-1");
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), EAGAIN) << v.status().message();
}

}  // namespace
}  // namespace nbdcsi::controller
