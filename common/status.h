// The one result type used inside nbd-csi: an errno value plus a human message.
//
// Every layer speaks errno inside the process. Each boundary converts it exactly once:
// nbd/codec.h (errno_to_nbd) for the NBD wire and common/grpc_status.h for gRPC. The
// message is what an operator reads, so it names the object and the reason.
#pragma once

#include <cerrno>
#include <string>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace nbdcsi {

class Status {
 public:
  Status() = default;
  Status(int err, std::string message) : err_(err), message_(std::move(message)) {}

  static Status Ok() { return {}; }

  bool ok() const { return err_ == 0; }
  explicit operator bool() const { return ok(); }
  int code() const { return err_; }
  const std::string& message() const { return message_; }

 private:
  int err_ = 0;
  std::string message_;
};

template <typename... Args>
Status Error(int err, fmt::format_string<Args...> f, Args&&... args) {
  return Status(err, fmt::format(f, std::forward<Args>(args)...));
}

template <typename T>
class StatusOr {
 public:
  StatusOr(T value) : v_(std::move(value)) {}          // NOLINT: implicit by design
  StatusOr(Status status) : v_(std::move(status)) {}   // NOLINT: implicit by design

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace nbdcsi
