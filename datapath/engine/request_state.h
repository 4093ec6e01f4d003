// The life of one NBD request (a Slot) and of one connection in the io_uring workers, as data:
// the states, the transitions that are allowed between them, and the identity every io_uring
// submission carries. Pure and header-only so the rules are unit-tested on their own
// (test/unit/request_state_test.cpp) and the worker (worker.cpp) checks every move against them.
//
// Why the identity matters: a completion names its request by what was put in the SQE's
// user_data. If that were a raw pointer, a completion that arrives after its connection was
// freed (or after its slot was recycled for another request) would be delivered to whoever reuses
// the memory: a reply with another request's cookie, a misrouted read or write. So user_data is a
// Tag: (kind, connection id, slot index, generation). The worker looks the connection up in its
// table by id and compares generations; a stale tag is counted and dropped, never delivered.
#pragma once

#include <cstdint>

namespace nbdcsi::datapath::engine {

// ---- one request ------------------------------------------------------------------------------
//
//   kFree -> kNew (header parsed, slot taken)
//   kNew -> kRecvPayload (WRITE payload arriving) | kDraining (rejected WRITE, payload discarded)
//        | kThrottled | kParked | kExec | kReplyQueued (error reply at once)
//   kRecvPayload -> kThrottled | kParked | kExec
//   kDraining -> kReplyQueued
//   kThrottled -> kThrottled (asked again, still no tokens) | kParked | kExec | kReplyQueued
//   kParked -> kParked | kExec | kReplyQueued
//   kExec -> kExec (next step, short I/O, retry) | kReplyQueued
//   kReplyQueued -> kSending
//   kSending -> kFree (reply sent)
// and, when the connection is aborted, any state that holds no SQE goes straight to kFree; a
// slot in kExec or kSending goes to kFree when its completion arrives. Nothing leaves kFree
// except through kNew, so a slot can never be released twice or run twice.
enum class SlotState : uint8_t {
  kFree,
  kNew,
  kRecvPayload,
  kDraining,
  kThrottled,
  kParked,
  kExec,
  kReplyQueued,
  kSending,
};
inline constexpr int kSlotStateCount = 9;

constexpr const char* SlotStateName(SlotState s) {
  switch (s) {
    case SlotState::kFree: return "free";
    case SlotState::kNew: return "new";
    case SlotState::kRecvPayload: return "recv-payload";
    case SlotState::kDraining: return "draining";
    case SlotState::kThrottled: return "throttled";
    case SlotState::kParked: return "parked";
    case SlotState::kExec: return "exec";
    case SlotState::kReplyQueued: return "reply-queued";
    case SlotState::kSending: return "sending";
  }
  return "?";
}

// Whether the slot holds an SQE in the ring in this state (its completion is still to come).
constexpr bool SlotHoldsSqe(SlotState s) {
  return s == SlotState::kExec || s == SlotState::kSending;
}

// The normal request path (without connection aborts; see SlotMayAbortTo for those).
constexpr bool SlotTransitionAllowed(SlotState from, SlotState to) {
  using S = SlotState;
  switch (from) {
    case S::kFree: return to == S::kNew;
    case S::kNew:
      return to == S::kRecvPayload || to == S::kDraining || to == S::kThrottled ||
             to == S::kParked || to == S::kExec || to == S::kReplyQueued;
    case S::kRecvPayload: return to == S::kThrottled || to == S::kParked || to == S::kExec;
    case S::kDraining: return to == S::kReplyQueued;
    case S::kThrottled:
      return to == S::kThrottled || to == S::kParked || to == S::kExec || to == S::kReplyQueued;
    case S::kParked: return to == S::kParked || to == S::kExec || to == S::kReplyQueued;
    case S::kExec: return to == S::kExec || to == S::kReplyQueued;
    case S::kReplyQueued: return to == S::kSending;
    case S::kSending: return to == S::kFree;
  }
  return false;
}

// Release to kFree because the connection is aborted: allowed from every busy state. A slot that
// holds an SQE is released only from its completion (the worker checks that separately).
constexpr bool SlotMayAbortTo(SlotState from) { return from != SlotState::kFree; }

// ---- one connection ---------------------------------------------------------------------------
//
//   kOpen -> kClosing: NBD_CMD_DISC, or an error the stream cannot be resynchronised after (the
//            error reply still goes out). No request is read any more; those in flight finish
//            and their replies are sent. Freed when no slot is busy and no SQE is in flight.
//   kOpen | kClosing -> kAborted: the client went away, the socket failed, bad framing, or the
//            daemon shuts down. Nothing more is sent; queued requests are dropped at once, SQEs
//            in flight are cancelled where io_uring can and drained. Freed when none is left.
enum class ConnLife : uint8_t { kOpen, kClosing, kAborted };

constexpr const char* ConnLifeName(ConnLife l) {
  switch (l) {
    case ConnLife::kOpen: return "open";
    case ConnLife::kClosing: return "closing";
    case ConnLife::kAborted: return "aborted";
  }
  return "?";
}

constexpr bool ConnTransitionAllowed(ConnLife from, ConnLife to) {
  return (from == ConnLife::kOpen && (to == ConnLife::kClosing || to == ConnLife::kAborted)) ||
         (from == ConnLife::kClosing && to == ConnLife::kAborted);
}

// ---- what every SQE carries ---------------------------------------------------------------------
//
// 64 bits of user_data: kind (3 bits) | slot index (8) | connection id (21) | generation (32).
// The connection id indexes the worker's connection table; the generation is the connection's
// (for its recv and send) or the slot's (for a request's I/O), both drawn from one per-worker
// counter that never repeats within 2^32 uses, so an id or slot reused for a new connection or a
// new request never matches a tag minted for the old one.
enum class TagKind : uint8_t { kWake = 1, kRecv = 2, kSend = 3, kIo = 4, kCancel = 5 };

struct Tag {
  TagKind kind{};
  uint8_t slot = 0;
  uint32_t conn = 0;  // < kMaxConnId
  uint32_t gen = 0;

  static constexpr uint32_t kMaxConnId = 1u << 21;

  constexpr uint64_t Encode() const {
    return static_cast<uint64_t>(kind) | (static_cast<uint64_t>(slot) << 3) |
           (static_cast<uint64_t>(conn & (kMaxConnId - 1)) << 11) |
           (static_cast<uint64_t>(gen) << 32);
  }
  static constexpr Tag Decode(uint64_t v) {
    Tag t;
    t.kind = static_cast<TagKind>(v & 7);
    t.slot = static_cast<uint8_t>((v >> 3) & 0xff);
    t.conn = static_cast<uint32_t>((v >> 11) & (kMaxConnId - 1));
    t.gen = static_cast<uint32_t>(v >> 32);
    return t;
  }
  constexpr bool operator==(const Tag&) const = default;
};

}  // namespace nbdcsi::datapath::engine
