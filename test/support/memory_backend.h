// An ExportBackend (datapath/engine/backend.h) that keeps the export in memory, for tests of the
// engine's side of the seam: backend_export_test and the backend_export_server tool behind the
// integration test. It is a stand-in for the replica set, so it obeys the same contract and can
// be told to misbehave the ways a replica set may: complete inline inside Submit, from its own
// thread, or only when the test says so (requests held), and fail chosen operations with an errno.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "datapath/engine/backend.h"

namespace nbdcsi::test {

class MemoryBackend final : public datapath::ExportBackend {
 public:
  using Op = datapath::BackendRequest::Op;
  enum class Mode {
    kInline,  // done is called inside Submit
    kThread,  // done is called from the backend's own thread, in submission order
    kHold,    // requests wait until Release(); done is called from Release's caller
  };

  MemoryBackend(std::string name, uint64_t size, Mode mode = Mode::kInline)
      : name_(std::move(name)), data_(size), mode_(mode) {
    if (mode_ == Mode::kThread) thread_ = std::thread([this] { Loop(); });
  }
  ~MemoryBackend() override {
    {
      std::lock_guard lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  const std::string& name() const override { return name_; }
  uint64_t size() const override { return data_.size(); }

  void Submit(const datapath::BackendRequest& r, datapath::BackendDone done) override {
    {
      std::lock_guard lk(mu_);
      log_.push_back(r);
      if (mode_ != Mode::kInline) {
        queue_.emplace_back(r, std::move(done));
        if (mode_ == Mode::kThread) cv_.notify_one();
        return;
      }
    }
    Run(r, done);
  }

  // Every later request of `op` fails with -err (0: succeeds again).
  void Fail(Op op, int err) {
    std::lock_guard lk(mu_);
    fail_[static_cast<size_t>(op)] = err;
  }
  // kHold: requests submitted and not yet released.
  size_t held() {
    std::lock_guard lk(mu_);
    return queue_.size();
  }
  // kHold: runs the first `n` held requests (all with n = 0) and calls their done, here.
  void Release(size_t n = 0) {
    std::deque<std::pair<datapath::BackendRequest, datapath::BackendDone>> batch;
    {
      std::lock_guard lk(mu_);
      if (n == 0 || n > queue_.size()) n = queue_.size();
      for (size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
    }
    for (auto& [r, done] : batch) Run(r, done);
  }

  std::vector<datapath::BackendRequest> log() {
    std::lock_guard lk(mu_);
    return log_;
  }
  std::vector<uint8_t> Contents(uint64_t offset, size_t n) {
    std::lock_guard lk(mu_);
    return {data_.begin() + offset, data_.begin() + offset + n};
  }
  uint64_t flushes() {
    std::lock_guard lk(mu_);
    return flushes_;
  }

 private:
  void Run(const datapath::BackendRequest& r, const datapath::BackendDone& done) {
    int err = 0;
    {
      std::lock_guard lk(mu_);
      err = fail_[static_cast<size_t>(r.op)];
      if (!err) {
        // The engine checked the range against size() (backend.h): an overrun here is its bug.
        if (r.offset > data_.size() || r.length > data_.size() - r.offset) {
          err = EINVAL;
        } else {
          uint8_t* at = data_.data() + r.offset;
          switch (r.op) {
            case Op::kRead:
              std::memcpy(r.data, at, r.length);
              break;
            case Op::kWrite:
              std::memcpy(at, r.data, r.length);
              break;
            case Op::kFlush:
              ++flushes_;
              break;
            case Op::kTrim:
            case Op::kWriteZeroes:
              std::memset(at, 0, r.length);
              break;
          }
        }
      }
    }
    done(-err);
  }

  void Loop() {
    std::unique_lock lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return quit_ || !queue_.empty(); });
      if (queue_.empty()) return;
      auto [r, done] = std::move(queue_.front());
      queue_.pop_front();
      lk.unlock();
      Run(r, done);
      lk.lock();
    }
  }

  const std::string name_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t> data_;  // guarded by mu_, as everything below
  const Mode mode_;
  std::deque<std::pair<datapath::BackendRequest, datapath::BackendDone>> queue_;
  std::vector<datapath::BackendRequest> log_;
  int fail_[5] = {};
  uint64_t flushes_ = 0;
  bool quit_ = false;
  std::thread thread_;
};

}  // namespace nbdcsi::test
