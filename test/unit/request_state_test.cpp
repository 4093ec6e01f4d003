// The request and connection life cycles of the io_uring workers as tables
// (datapath/engine/request_state.h), and the identity every SQE carries.
#include "datapath/engine/request_state.h"

#include <set>
#include <utility>

#include <gtest/gtest.h>

namespace nbdcsi::datapath::engine {
namespace {

using S = SlotState;

constexpr S kAll[] = {S::kFree,      S::kNew,    S::kRecvPayload, S::kDraining, S::kThrottled,
                      S::kParked,    S::kExec,   S::kReplyQueued, S::kSending};

// Every allowed move of the normal path, spelled out once more from the NBD request's point of
// view; everything else must be refused.
const std::set<std::pair<S, S>> kAllowed = {
    {S::kFree, S::kNew},
    {S::kNew, S::kRecvPayload},       {S::kNew, S::kDraining},     {S::kNew, S::kThrottled},
    {S::kNew, S::kParked},            {S::kNew, S::kExec},         {S::kNew, S::kReplyQueued},
    {S::kRecvPayload, S::kThrottled}, {S::kRecvPayload, S::kParked}, {S::kRecvPayload, S::kExec},
    {S::kDraining, S::kReplyQueued},
    {S::kThrottled, S::kThrottled},   {S::kThrottled, S::kParked}, {S::kThrottled, S::kExec},
    {S::kThrottled, S::kReplyQueued},
    {S::kParked, S::kParked},         {S::kParked, S::kExec},      {S::kParked, S::kReplyQueued},
    {S::kExec, S::kExec},             {S::kExec, S::kReplyQueued},
    {S::kReplyQueued, S::kSending},
    {S::kSending, S::kFree},
};

TEST(RequestState, SlotTransitionsAreExactlyTheDocumentedOnes) {
  static_assert(sizeof(kAll) / sizeof(kAll[0]) == kSlotStateCount);
  for (S from : kAll) {
    for (S to : kAll) {
      EXPECT_EQ(SlotTransitionAllowed(from, to), kAllowed.count({from, to}) == 1)
          << SlotStateName(from) << " -> " << SlotStateName(to);
    }
  }
}

TEST(RequestState, NothingLeavesFreeExceptThroughNewAndNothingIsReleasedTwice) {
  for (S to : kAll) EXPECT_EQ(SlotTransitionAllowed(S::kFree, to), to == S::kNew);
  EXPECT_FALSE(SlotMayAbortTo(S::kFree));
  for (S s : kAll) {
    if (s != S::kFree) {
      EXPECT_TRUE(SlotMayAbortTo(s)) << SlotStateName(s);
    }
  }
}

TEST(RequestState, OnlyExecutingAndSendingSlotsHoldAnSqe) {
  for (S s : kAll) EXPECT_EQ(SlotHoldsSqe(s), s == S::kExec || s == S::kSending);
}

TEST(RequestState, ConnectionLifeOnlyMovesForward) {
  using L = ConnLife;
  const L all[] = {L::kOpen, L::kClosing, L::kAborted};
  const std::set<std::pair<L, L>> ok = {
      {L::kOpen, L::kClosing}, {L::kOpen, L::kAborted}, {L::kClosing, L::kAborted}};
  for (L from : all) {
    for (L to : all) {
      EXPECT_EQ(ConnTransitionAllowed(from, to), ok.count({from, to}) == 1)
          << ConnLifeName(from) << " -> " << ConnLifeName(to);
    }
  }
}

TEST(RequestState, TagsRoundTripAndKeepTheirFieldsApart) {
  const Tag cases[] = {
      {TagKind::kIo, 0, 0, 1},
      {TagKind::kIo, 255, Tag::kMaxConnId - 1, 0xffffffffu},
      {TagKind::kRecv, 0, 12345, 0x80000000u},
      {TagKind::kSend, 7, 1, 42},
      {TagKind::kWake, 0, 0, 0},
      {TagKind::kCancel, 0, 0, 0},
  };
  for (const Tag& t : cases) {
    EXPECT_EQ(Tag::Decode(t.Encode()), t)
        << "kind " << int(t.kind) << " slot " << int(t.slot) << " conn " << t.conn;
  }
  // A slot or connection reused with a new generation never matches the old tag.
  Tag old{TagKind::kIo, 3, 9, 100};
  Tag reused = old;
  reused.gen = 101;
  EXPECT_NE(old.Encode(), reused.Encode());
  // Different kinds of the same owner are different user_data values.
  Tag recv{TagKind::kRecv, 0, 9, 100}, send{TagKind::kSend, 0, 9, 100};
  EXPECT_NE(recv.Encode(), send.Encode());
  // No encoded tag is 0 (liburing's "no data") or all ones (liburing's internal timeout).
  for (const Tag& t : cases) {
    EXPECT_NE(t.Encode(), 0u);
    EXPECT_NE(t.Encode(), ~uint64_t{0});
  }
}

}  // namespace
}  // namespace nbdcsi::datapath::engine
