#include "datapath/nbdctl/attach_cmds.h"

#include <fmt/format.h>

#include "datapath/nbdctl/render.h"

namespace nbdcsi::nbdctl {

nlohmann::json AttachmentJson(const ::nbdcsi::datapath::v1::Attachment& a) {
  return {{"volume", a.volume()},       {"device", a.device()},
          {"connections", a.connections()}, {"cookie", a.cookie()},
          {"size_bytes", a.size()},     {"read_only", a.read_only()}};
}

std::string AttachmentDetails(const ::nbdcsi::datapath::v1::Attachment& a) {
  return RenderKeyValues({{"Device", a.device()},
                          {"Volume", a.volume()},
                          {"Connections", std::to_string(a.connections())},
                          {"Size", fmt::format("{} bytes", a.size())},
                          {"Read-only", a.read_only() ? "yes" : "no"},
                          {"Backend", a.cookie()}});
}

std::string AttachmentListTable(const ::nbdcsi::datapath::v1::ListAttachmentsResponse& list) {
  Table t{{"VOLUME", "DEVICE", "CONNS", "SIZE", "RO", "BACKEND"}, {}};
  for (const auto& a : list.attachments()) {
    t.rows.push_back({a.volume(), a.device(), std::to_string(a.connections()),
                      std::to_string(a.size()), a.read_only() ? "yes" : "no", a.cookie()});
  }
  return t.Render();
}

}  // namespace nbdcsi::nbdctl
