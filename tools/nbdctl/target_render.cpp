#include "tools/nbdctl/target_render.h"

#include <fmt/format.h>

#include "common/quantity.h"

namespace nbdcsi::nbdctl {

using nlohmann::json;

std::string TargetHealth(const tv1::Target& t) {
  if (t.stopped()) return "stopped";
  return t.degraded() ? "degraded" : "ok";
}

json TargetJson(const tv1::Target& t) {
  json replicas = json::array();
  for (const auto& r : t.replicas()) {
    replicas.push_back({{"node", r.node()},
                        {"state", r.state()},
                        {"why", r.why()},
                        {"requests", r.requests()},
                        {"errors", r.errors()},
                        {"bytes_written", r.bytes_written()},
                        {"bytes_read", r.bytes_read()},
                        {"healthy_connections", r.healthy_connections()},
                        {"out_of_sync_bytes", r.out_of_sync_bytes()},
                        {"resync_pending", r.resync_pending()},
                        {"resync_error", r.resync_error()}});
  }
  json in_sync = json::array();
  for (const auto& n : t.in_sync()) in_sync.push_back(n);
  json unreachable = json::array();
  for (const auto& u : t.unreachable()) unreachable.push_back(u);
  json resync = nullptr;
  if (t.has_resync()) {
    const auto& r = t.resync();
    resync = {{"node", r.node()},
              {"full", r.full()},
              {"pass", r.pass()},
              {"pass_done_bytes", r.pass_done_bytes()},
              {"pass_total_bytes", r.pass_total_bytes()},
              {"percent", r.percent()},
              {"eta_seconds", r.eta_seconds() < 0 ? json(nullptr) : json(r.eta_seconds())},
              {"copied_bytes", r.copied_bytes()}};
  }
  json reconcile = nullptr;
  if (t.has_reconcile()) {
    const auto& r = t.reconcile();
    reconcile = {{"source", r.source()},
                 {"done_bytes", r.done_bytes()},
                 {"total_bytes", r.total_bytes()},
                 {"percent", r.percent()}};
  }
  return {{"volume", t.volume()},
          {"resync", resync},
          {"reconcile", reconcile},
          {"node", t.node()},
          {"export_name", t.export_name()},
          {"epoch", t.epoch()},
          {"size_bytes", t.size_bytes()},
          {"health", TargetHealth(t)},
          {"degraded", t.degraded()},
          {"stopped", t.stopped()},
          {"stop_reason", t.stop_reason()},
          {"in_sync", in_sync},
          {"acked_degraded", t.acked_degraded()},
          {"unreachable", unreachable},
          {"replicas", replicas}};
}

std::string TargetDetails(const tv1::Target& t) {
  std::string in_sync;
  for (const auto& n : t.in_sync()) in_sync += (in_sync.empty() ? "" : ", ") + n;
  std::string out = fmt::format(
      "volume:      {}\nexport:      {} on node {}\nepoch:       {}\nsize:        {} ({} "
      "bytes)\nhealth:      {}\nin sync:     {}\n",
      t.volume(), t.export_name(), t.node(), t.epoch(), FormatHuman(t.size_bytes()),
      t.size_bytes(), TargetHealth(t), in_sync.empty() ? "(none)" : in_sync);
  if (t.stopped()) out += fmt::format("stopped:     {}\n", t.stop_reason());
  if (t.acked_degraded())
    out += fmt::format("degraded writes: {} acknowledged while a replica missed them\n",
                       t.acked_degraded());
  for (const auto& u : t.unreachable()) out += fmt::format("unreachable at open: {}\n", u);
  if (t.has_reconcile()) {
    const auto& r = t.reconcile();
    out += fmt::format("reconciling: after an unclean takeover, from {}: {:.0f}% ({} of {}); "
                       "reads go to {} only until done\n",
                       r.source(), r.percent(), FormatHuman(r.done_bytes()),
                       FormatHuman(r.total_bytes()), r.source());
  }
  if (t.has_resync()) {
    const auto& r = t.resync();
    out += fmt::format("resync:      {}{}: pass {}, {:.0f}% ({} of {}){}, {} copied so far\n",
                       r.node(), r.full() ? " (full copy)" : "", r.pass(), r.percent(),
                       FormatHuman(r.pass_done_bytes()), FormatHuman(r.pass_total_bytes()),
                       r.eta_seconds() < 0 ? "" : fmt::format(", ETA {} s", r.eta_seconds()),
                       FormatHuman(r.copied_bytes()));
  }
  out += fmt::format("{:<24} {:<12} {:>10} {:>8} {:>12} {:>12} {:>6} {:>12}  {}\n", "REPLICA",
                     "STATE", "REQUESTS", "ERRORS", "WRITTEN", "READ", "CONNS", "TO RESYNC",
                     "WHY");
  for (const auto& r : t.replicas()) {
    out += fmt::format("{:<24} {:<12} {:>10} {:>8} {:>12} {:>12} {:>6} {:>12}  {}\n", r.node(),
                       r.state(), r.requests(), r.errors(), FormatHuman(r.bytes_written()),
                       FormatHuman(r.bytes_read()), r.healthy_connections(),
                       r.state() == "in-sync" ? "-" : FormatHuman(r.out_of_sync_bytes()), r.why());
  }
  for (const auto& r : t.replicas()) {
    if (r.resync_pending() && !(t.has_resync() && t.resync().node() == r.node()))
      out += fmt::format("resync of {}: queued\n", r.node());
    if (!r.resync_error().empty())
      out += fmt::format("last resync of {} failed: {}\n", r.node(), r.resync_error());
  }
  return out;
}

std::string TargetsTable(const tv1::ListTargetsResponse& list) {
  std::string out = fmt::format("{:<40} {:>6} {:>10} {:<9} {}\n", "VOLUME", "EPOCH", "SIZE",
                                "HEALTH", "IN SYNC");
  for (const auto& t : list.targets()) {
    std::string in_sync;
    for (const auto& n : t.in_sync()) in_sync += (in_sync.empty() ? "" : ",") + n;
    out += fmt::format("{:<40} {:>6} {:>10} {:<9} {}\n", t.volume(), t.epoch(),
                       FormatHuman(t.size_bytes()), TargetHealth(t), in_sync);
  }
  return out;
}

}  // namespace nbdcsi::nbdctl
