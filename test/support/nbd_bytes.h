// NBD requests as raw bytes, for tests that play a client (or the kernel) on a socket. The
// header is laid out field by field at the spec's offsets, not by the codec's encoder under test,
// so an encoder bug cannot hide itself.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "datapath/nbd/codec.h"
#include "datapath/nbd/proto.h"

namespace nbdcsi::test {

using Bytes = std::vector<uint8_t>;

// `n` bytes that depend on `seed`: what a write put there can be told from anything else.
inline Bytes Pattern(size_t n, uint32_t seed) {
  Bytes b(n);
  std::mt19937 rng(seed);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

// One request: the 28-byte header, then `payload` (a WRITE's data; or none).
inline Bytes NbdRequest(uint16_t type, uint16_t flags, uint64_t cookie, uint64_t offset,
                        uint32_t length, const Bytes& payload = {}) {
  Bytes b(nbd::kRequestHeaderLen);
  nbd::StoreBE32(&b[0], nbd::kRequestMagic);
  nbd::StoreBE16(&b[4], flags);
  nbd::StoreBE16(&b[6], type);
  nbd::StoreBE64(&b[8], cookie);
  nbd::StoreBE64(&b[16], offset);
  nbd::StoreBE32(&b[24], length);
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

// Exactly `n` bytes from `fd`; false on EOF, timeout or error.
inline bool RecvAll(int fd, void* p, size_t n) {
  auto* c = static_cast<uint8_t*>(p);
  while (n) {
    ssize_t r = recv(fd, c, n, 0);
    // A signal to this process (a test's threads share it) is not the peer's doing: go on.
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace nbdcsi::test
