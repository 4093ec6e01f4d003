// nbdctl output for the Attachments service (datapath/api/attach.proto): attach, detach,
// attachments. Pure functions over the messages, like render.h, so tests need no server.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "datapath/api/attach.pb.h"

namespace nbdcsi::nbdctl {

// JSON keys: volume, device, mode, connections, cookie, size_bytes, read_only, link_ok,
// link_error, target (the device serves the replicated volume's target; the text forms then show
// the volume as VOLUME@target).
nlohmann::json AttachmentJson(const ::nbdcsi::datapath::v1::Attachment& a);
// What `nbdctl attach` prints (the device first).
std::string AttachmentDetails(const ::nbdcsi::datapath::v1::Attachment& a);
// Columns VOLUME DEVICE MODE CONNS SIZE RO BACKEND LINK; LINK is "ok" or "down: <why>".
std::string AttachmentListTable(const ::nbdcsi::datapath::v1::ListAttachmentsResponse& list);

}  // namespace nbdcsi::nbdctl
