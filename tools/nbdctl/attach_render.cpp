#include "tools/nbdctl/attach_render.h"

#include <fmt/format.h>

#include "tools/nbdctl/render.h"

namespace nbdcsi::nbdctl {

namespace {

std::string ModeText(const ::nbdcsi::datapath::v1::Attachment& a) {
  return a.mode().empty() ? "kernel" : a.mode();  // a daemon from before modes existed
}

// "ok", or "down: why" (shown in full: the reason is what the operator acts on).
std::string LinkText(const ::nbdcsi::datapath::v1::Attachment& a) {
  if (a.link_ok()) return "ok";
  return a.link_error().empty() ? "down" : "down: " + a.link_error();
}

// What the device serves: the volume, or "VOLUME@target" (the export name) for a replicated
// volume's target, so a listing tells them apart without another column.
std::string ServedText(const ::nbdcsi::datapath::v1::Attachment& a) {
  return a.target() ? a.volume() + "@target" : a.volume();
}

}  // namespace

nlohmann::json AttachmentJson(const ::nbdcsi::datapath::v1::Attachment& a) {
  return {{"volume", a.volume()},         {"device", a.device()},
          {"mode", ModeText(a)},          {"connections", a.connections()},
          {"cookie", a.cookie()},         {"size_bytes", a.size()},
          {"read_only", a.read_only()},   {"link_ok", a.link_ok()},
          {"link_error", a.link_error()}, {"target", a.target()}};
}

std::string AttachmentDetails(const ::nbdcsi::datapath::v1::Attachment& a) {
  return RenderKeyValues({{"Device", a.device()},
                          {"Volume", ServedText(a)},
                          {"Mode", ModeText(a)},
                          {"Link", LinkText(a)},
                          {"Connections", std::to_string(a.connections())},
                          {"Size", fmt::format("{} bytes", a.size())},
                          {"Read-only", a.read_only() ? "yes" : "no"},
                          {"Backend", a.cookie()}});
}

std::string AttachmentListTable(const ::nbdcsi::datapath::v1::ListAttachmentsResponse& list) {
  // LINK goes last: its reason can be long, and the other columns stay aligned before it.
  Table t{{"VOLUME", "DEVICE", "MODE", "CONNS", "SIZE", "RO", "BACKEND", "LINK"}, {}};
  for (const auto& a : list.attachments()) {
    t.rows.push_back({ServedText(a), a.device(), ModeText(a), std::to_string(a.connections()),
                      std::to_string(a.size()), a.read_only() ? "yes" : "no", a.cookie(),
                      LinkText(a)});
  }
  return t.Render();
}

}  // namespace nbdcsi::nbdctl
