#include "common/grpc_status.h"
#include "csi/logging.h"
#include "common/log_format.h"

#include <atomic>
#include <chrono>
#include <string_view>

#include <fmt/format.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/reflection.h>
#include <grpcpp/support/status.h>
#include <spdlog/spdlog.h>

#include "csi/csi.pb.h"

namespace nbdcsi::csi {
namespace {

namespace pb = google::protobuf;

constexpr std::string_view kStripped = "***stripped***";

thread_local std::string t_request_id;
// The volume the current call names (volume_id, or a snapshot's source_volume_id), for JSON logs.
thread_local std::string t_volume_id;

std::string VolumeIdOf(const pb::Message& m) {
  for (const char* name : {"volume_id", "source_volume_id"}) {
    const pb::FieldDescriptor* f = m.GetDescriptor()->FindFieldByName(name);
    if (f && f->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING && !f->is_repeated()) {
      return m.GetReflection()->GetString(m, f);
    }
  }
  return "";
}

std::vector<std::pair<const char*, std::string>> CallContext() {
  return {{"request_id", t_request_id}, {"volume_id", t_volume_id}};
}

bool IsSecret(const pb::FieldDescriptor* f) {
  return f->options().GetExtension(::csi::v1::csi_secret);
}

void AppendQuoted(std::string* out, std::string_view s) {
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\n': *out += "\\n"; break;
      case '\t': *out += "\\t"; break;
      default:
        // Control bytes would let a field value forge or break log lines.
        if (c < 0x20 || c == 0x7f) *out += fmt::format("\\x{:02x}", c);
        else out->push_back(static_cast<char>(c));
    }
  }
  out->push_back('"');
}

void AppendMessage(std::string* out, const pb::Message& m);

// One value of `f` (index `i` when repeated, -1 otherwise).
void AppendValue(std::string* out, const pb::Message& m, const pb::FieldDescriptor* f, int i) {
  const pb::Reflection* r = m.GetReflection();
  const bool rep = i >= 0;
  using T = pb::FieldDescriptor;
  switch (f->cpp_type()) {
    case T::CPPTYPE_INT32: *out += std::to_string(rep ? r->GetRepeatedInt32(m, f, i) : r->GetInt32(m, f)); break;
    case T::CPPTYPE_INT64: *out += std::to_string(rep ? r->GetRepeatedInt64(m, f, i) : r->GetInt64(m, f)); break;
    case T::CPPTYPE_UINT32: *out += std::to_string(rep ? r->GetRepeatedUInt32(m, f, i) : r->GetUInt32(m, f)); break;
    case T::CPPTYPE_UINT64: *out += std::to_string(rep ? r->GetRepeatedUInt64(m, f, i) : r->GetUInt64(m, f)); break;
    case T::CPPTYPE_DOUBLE: *out += fmt::format("{}", rep ? r->GetRepeatedDouble(m, f, i) : r->GetDouble(m, f)); break;
    case T::CPPTYPE_FLOAT: *out += fmt::format("{}", rep ? r->GetRepeatedFloat(m, f, i) : r->GetFloat(m, f)); break;
    case T::CPPTYPE_BOOL: *out += (rep ? r->GetRepeatedBool(m, f, i) : r->GetBool(m, f)) ? "true" : "false"; break;
    case T::CPPTYPE_ENUM: {
      int v = rep ? r->GetRepeatedEnumValue(m, f, i) : r->GetEnumValue(m, f);
      const pb::EnumValueDescriptor* ev = f->enum_type()->FindValueByNumber(v);
      *out += ev ? ev->name() : std::to_string(v);
      break;
    }
    case T::CPPTYPE_STRING: {
      std::string scratch;
      const std::string& s = rep ? r->GetRepeatedStringReference(m, f, i, &scratch)
                                 : r->GetStringReference(m, f, &scratch);
      AppendQuoted(out, s);
      break;
    }
    case T::CPPTYPE_MESSAGE:
      AppendMessage(out, rep ? r->GetRepeatedMessage(m, f, i) : r->GetMessage(m, f));
      break;
  }
}

// Map entries print as {"key": value, ...}. A map entry's value may itself be a message with
// secret fields: AppendValue recurses through AppendMessage, which redacts them.
void AppendMap(std::string* out, const pb::Message& m, const pb::FieldDescriptor* f) {
  const pb::Reflection* r = m.GetReflection();
  const pb::FieldDescriptor* key = f->message_type()->map_key();
  const pb::FieldDescriptor* val = f->message_type()->map_value();
  *out += '{';
  const int n = r->FieldSize(m, f);
  for (int i = 0; i < n; ++i) {
    const pb::Message& entry = r->GetRepeatedMessage(m, f, i);
    if (i) *out += ", ";
    AppendValue(out, entry, key, -1);
    *out += ": ";
    AppendValue(out, entry, val, -1);
  }
  *out += '}';
}

void AppendMessage(std::string* out, const pb::Message& m) {
  std::vector<const pb::FieldDescriptor*> fields;
  m.GetReflection()->ListFields(m, &fields);
  *out += '{';
  bool first = true;
  for (const pb::FieldDescriptor* f : fields) {
    if (!first) *out += ", ";
    first = false;
    *out += f->name();
    *out += ": ";
    if (IsSecret(f)) {
      // Neither values nor keys: key names can say which credentials a caller holds.
      *out += kStripped;
    } else if (f->is_map()) {
      AppendMap(out, m, f);
    } else if (f->is_repeated()) {
      *out += '[';
      const int n = m.GetReflection()->FieldSize(m, f);
      for (int i = 0; i < n; ++i) {
        if (i) *out += ", ";
        AppendValue(out, m, f, i);
      }
      *out += ']';
    } else {
      AppendValue(out, m, f, -1);
    }
  }
  *out += '}';
}

// Called often by kubelet and the sidecars just to poll: logged at debug unless they fail.
bool IsQuietMethod(std::string_view method) {
  static constexpr std::string_view kQuiet[] = {
      "/csi.v1.Identity/Probe",
      "/csi.v1.Identity/GetPluginInfo",
      "/csi.v1.Identity/GetPluginCapabilities",
      "/csi.v1.Controller/ControllerGetCapabilities",
      "/csi.v1.Controller/GetCapacity",
      "/csi.v1.Controller/ControllerGetVolume",
      "/csi.v1.Node/NodeGetCapabilities",
      "/csi.v1.Node/NodeGetInfo",
      "/csi.v1.Node/NodeGetVolumeStats",
  };
  for (std::string_view q : kQuiet) {
    if (method == q) return true;
  }
  return false;
}

std::string NextRequestId() {
  static std::atomic<uint64_t> next{1};
  return fmt::format("r-{:06d}", next.fetch_add(1, std::memory_order_relaxed));
}

class LoggingInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit LoggingInterceptor(grpc::experimental::ServerRpcInfo* info)
      : method_(info->method() ? info->method() : "?"),
        quiet_(IsQuietMethod(method_)),
        id_(NextRequestId()),
        start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE)) {
      // The sync server runs the handler on this thread right after this hook, so handlers
      // read the id with CurrentRequestId().
      t_request_id = id_;
      auto* msg = static_cast<const pb::Message*>(methods->GetRecvMessage());
      t_volume_id = msg ? VolumeIdOf(*msg) : "";
      std::string text = msg ? RedactedText(*msg) : "(undecodable request)";
      spdlog::log(quiet_ ? spdlog::level::debug : spdlog::level::info, "[{}] {} <- {}", id_,
                  method_, text);
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      grpc::Status s = methods->GetSendStatus();
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() -
                                                            start_)
                      .count();
      auto level = quiet_ && s.ok() ? spdlog::level::debug : spdlog::level::info;
      if (s.ok()) {
        spdlog::log(level, "[{}] -> OK {:.1f} ms", id_, ms);
      } else {
        spdlog::log(level, "[{}] -> {}: {} ({:.1f} ms)", id_, GrpcCodeName(s.error_code()),
                    s.error_message(), ms);
      }
      t_request_id.clear();
      t_volume_id.clear();
    }
    methods->Proceed();
  }

 private:
  std::string method_;
  bool quiet_;
  std::string id_;
  std::chrono::steady_clock::time_point start_;
};

class LoggingInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new LoggingInterceptor(info);
  }
};

}  // namespace

std::string RedactedText(const google::protobuf::Message& msg) {
  std::string out;
  AppendMessage(&out, msg);
  return out;
}

const std::string& CurrentRequestId() { return t_request_id; }

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeLoggingInterceptorFactory() {
  SetLogContextProvider(&CallContext);
  return std::make_unique<LoggingInterceptorFactory>();
}

}  // namespace nbdcsi::csi
