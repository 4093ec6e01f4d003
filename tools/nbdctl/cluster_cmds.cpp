#include "tools/nbdctl/cluster_cmds.h"

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

#include <unistd.h>

#include <fmt/format.h>

#include "common/quantity.h"
#include "common/tls.h"
#include "datapath/api/cluster_view.grpc.pb.h"
#include "tools/nbdctl/cluster_render.h"
#include "tools/nbdctl/progress.h"

namespace nbdcsi::nbdctl {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// The file's bytes; UsageError naming the flag when it cannot be read.
std::string ReadFlagFile(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError{fmt::format("{} {}: cannot read it", flag, path)};
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

struct ClusterCommands::Impl {
  explicit Impl(const GlobalOptions& g) : global(g) {}

  const GlobalOptions& global;
  std::string volume, node, from, to, rate;
  bool wait = false;
  std::string controller = Env("NBDCTL_CONTROLLER");
  std::string server_name;
  TlsFiles tls{Env("NBDCTL_TLS_CERT"), Env("NBDCTL_TLS_KEY"), Env("NBDCTL_TLS_CA"), false};

  Connection Connect() const {
    if (controller.empty()) {
      throw UsageError{"cluster: --controller HOST:PORT is required (or set $NBDCTL_CONTROLLER): "
                       "nbd-csi-controller's --registry-listen address"};
    }
    if (Status s = tls.Validate(); !s.ok()) throw UsageError{"cluster: " + s.message()};
    if (tls.insecure && !server_name.empty())
      throw UsageError{"cluster: --tls-server-name needs TLS, not --insecure"};
    std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
    if (!tls.insecure) {
      // gRPC's SSL credentials over the files as they are now: a CLI call is short, so no
      // reloading (common/tls's TlsCredentials) is needed.
      grpc::SslCredentialsOptions o;
      o.pem_root_certs = ReadFlagFile("--tls-ca", tls.ca);
      o.pem_cert_chain = ReadFlagFile("--tls-cert", tls.cert);
      o.pem_private_key = ReadFlagFile("--tls-key", tls.key);
      creds = grpc::SslCredentials(o);
    }
    const std::string ep =
        controller.find("://") == std::string::npos ? "tcp://" + controller : controller;
    return Connection(Peer::kController, "--controller", ep, global.timeout_s, std::move(creds),
                      server_name);
  }

  template <typename Req, typename Resp>
  int List(grpc::Status (cv1::ClusterView::Stub::*method)(grpc::ClientContext*, const Req&,
                                                         Resp*),
           const char* what, nlohmann::json (*to_json)(const Resp&),
           std::string (*to_text)(const Resp&)) {
    Connection conn = Connect();
    auto stub = cv1::ClusterView::NewStub(conn.channel());
    Resp resp;
    if (int rc = conn.Call(*stub, method, Req{}, &resp, what); rc != kExitOk) return rc;
    Print(global.output, to_json(resp), to_text(resp));
    return kExitOk;
  }

  int Nodes() {
    return List(&cv1::ClusterView::Stub::ListNodes, "list the cluster's nodes", ClusterNodesJson,
                ClusterNodesTable);
  }
  int Volumes() {
    return List(&cv1::ClusterView::Stub::ListVolumes, "list the cluster's volumes",
                ClusterVolumesJson, ClusterVolumesTable);
  }
  int Snapshots() {
    return List(&cv1::ClusterView::Stub::ListSnapshots, "list the cluster's snapshots",
                ClusterSnapshotsJson, ClusterSnapshotsTable);
  }

  // ClusterReplicas.ChangeReplicas: its progress on stderr (a line rewritten on a terminal, one
  // every 5 s otherwise, nothing with -o json), then the last message as the result. No deadline
  // unless --timeout was given: a copy takes as long as the volume needs.
  int Change(const std::string& add, const std::string& remove, bool wait_in_sync) {
    cv1::ChangeReplicasRequest req;
    req.set_volume(volume);
    req.set_add(add);
    req.set_remove(remove);
    req.set_wait(wait_in_sync);
    if (!rate.empty()) {
      auto r = ParseQuantity(rate);
      if (!r.ok() || *r == 0)
        throw UsageError{
            fmt::format("--rate: {}", r.ok() ? "must be greater than 0" : r.status().message())};
      req.set_rate_bytes_per_second(*r);
    }
    Connection conn = Connect();
    auto stub = cv1::ClusterReplicas::NewStub(conn.channel());
    grpc::ClientContext ctx;
    if (global.timeout_opt && global.timeout_opt->count() > 0)
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(global.timeout_s * 1000)));
    const auto mode = ProgressSink::ModeFor(global.output, STDERR_FILENO);
    auto printed = std::chrono::steady_clock::now() - ProgressSink::kPlainEvery;
    bool open = false;
    std::string last_phase;
    cv1::ChangeReplicasProgress p, last;
    auto reader = stub->ChangeReplicas(&ctx, req);
    while (reader->Read(&p)) {
      last = p;
      std::string line = p.message();
      if (p.has_resync()) {
        const auto& r = p.resync();
        line = fmt::format("copy to {}: pass {}, {:.0f}% ({} of {}){}, {} copied", r.node(),
                           r.pass(), r.percent(), FormatHuman(r.pass_done_bytes()),
                           FormatHuman(r.pass_total_bytes()),
                           r.eta_seconds() < 0 ? "" : fmt::format(", ETA {} s", r.eta_seconds()),
                           FormatHuman(r.copied_bytes()));
      }
      if (p.phase() == "done") break;
      const auto now = std::chrono::steady_clock::now();
      if (mode == ProgressSink::Mode::kTerminal) {
        std::cerr << "\r" << line << "\x1b[K" << std::flush;
        open = true;
      } else if (mode == ProgressSink::Mode::kPlain &&
                 (p.phase() != last_phase || now - printed >= ProgressSink::kPlainEvery)) {
        std::cerr << line << "\n" << std::flush;
        printed = now;
      }
      last_phase = p.phase();
    }
    if (open) std::cerr << "\r\x1b[K" << std::flush;
    grpc::Status st = reader->Finish();
    const std::string what =
        !add.empty() && !remove.empty()
            ? fmt::format("move the replica of \"{}\" from {} to {}", volume, remove, add)
        : !add.empty() ? fmt::format("add a replica of \"{}\" on {}", volume, add)
                       : fmt::format("remove the replica of \"{}\" on {}", volume, remove);
    if (!st.ok()) return conn.Fail(what, st);
    nlohmann::json j = {{"volume_id", last.volume_id()},
                        {"replicas", last.replicas()},
                        {"in_sync", last.in_sync()},
                        {"target", last.target()},
                        {"epoch", last.epoch()},
                        {"took_ms", last.took_ms()},
                        {"copy_ms", last.copy_ms()},
                        {"copy_left", last.copy_left()},
                        {"message", last.message()}};
    if (!add.empty()) j["add"] = add;
    if (!remove.empty()) j["remove"] = remove;
    Print(global.output, j,
          fmt::format("{} ({} ms{}); replicas [{}], in sync [{}]\n", last.message(),
                      last.took_ms(),
                      last.copy_ms() ? fmt::format(", copy {} ms", last.copy_ms()) : "",
                      fmt::join(last.replicas(), ", "), fmt::join(last.in_sync(), ", ")));
    return kExitOk;
  }
  int Move() {
    if (from == to) throw UsageError{"--from and --to name the same node"};
    return Change(to, from, true);
  }
  int ReplicaAdd() { return Change(node, "", wait); }
  int ReplicaRemove() { return Change("", node, false); }

  void Register(CommandTree& tree) {
    tree.Add(Group{{"cluster"},
                   "The whole cluster through nbd-csi-controller (mutual TLS)",
                   "cluster",
                   [this](CLI::App& c) {
                     c.add_option("--controller", controller,
                                  "nbd-csi-controller's registry address, HOST:PORT (default: "
                                  "$NBDCTL_CONTROLLER)");
                     c.add_option("--tls-cert", tls.cert,
                                  "PEM client certificate signed by the controller's CA "
                                  "(default: $NBDCTL_TLS_CERT)");
                     c.add_option("--tls-key", tls.key,
                                  "PEM key of --tls-cert (default: $NBDCTL_TLS_KEY)");
                     c.add_option("--tls-ca", tls.ca,
                                  "PEM CA bundle the controller's certificate must chain to "
                                  "(default: $NBDCTL_TLS_CA)");
                     c.add_option("--tls-server-name", server_name,
                                  "Name the controller's certificate must carry (default: the "
                                  "host of --controller)");
                     c.add_flag("--insecure", tls.insecure,
                                "Plaintext, for a controller started with --insecure");
                   }});
    tree.Add(Bound({"cluster", "nodes"},
                   "Every registered node: live or expired, heartbeat age, pool room", nullptr,
                   this, &Impl::Nodes));
    tree.Add(Bound({"cluster", "volumes"},
                   "Every live node's volumes (size, allocated, QoS, attachment, condition) and "
                   "the replicated volumes",
                   nullptr, this, &Impl::Volumes));
    tree.Add(Bound({"cluster", "snapshots"}, "Every live node's snapshots", nullptr, this,
                   &Impl::Snapshots));
    tree.Add(Group{{"cluster", "volume"}, "Change a replicated volume's replicas", "cluster volume",
                   nullptr});
    tree.Add(Bound({"cluster", "volume", "move"},
                   "Move a replica to another node with the volume in use: its blank copy made "
                   "there, copied by the volume's target (progress on stderr) until in sync, "
                   "then the old replica removed and its copy deleted",
                   Positional("VOLUME", &volume, "Replicated volume (r1:NAME or NAME)",
                              [this](CLI::App& c) {
                                c.add_option("--from", from, "The replica's node now")
                                    ->required();
                                c.add_option("--to", to, "The new replica's node")->required();
                                c.add_option("--rate", rate, "Copy limit in bytes/s (50Mi)");
                              }),
                   this, &Impl::Move));
    tree.Add(Group{{"cluster", "volume", "replica"}, "Add or remove one replica",
                   "cluster volume replica", nullptr});
    tree.Add(Bound({"cluster", "volume", "replica", "add"},
                   "Add a replica on NODE: its blank copy made there, recorded out of sync and "
                   "copied by the volume's target in the background (with no target: by the next "
                   "one)",
                   Positional("VOLUME", &volume, "Replicated volume (r1:NAME or NAME)",
                              [this](CLI::App& c) {
                                c.add_option("NODE", node, "The new replica's node")->required();
                                c.add_option("--rate", rate, "Copy limit in bytes/s (50Mi)");
                                c.add_flag("--wait", wait,
                                           "Wait until it is in sync, with progress on stderr");
                              }),
                   this, &Impl::ReplicaAdd));
    tree.Add(Bound({"cluster", "volume", "replica", "remove"},
                   "Remove the replica on NODE (never the last in-sync one) and delete its copy",
                   Positional("VOLUME", &volume, "Replicated volume (r1:NAME or NAME)",
                              [this](CLI::App& c) {
                                c.add_option("NODE", node, "The replica's node")->required();
                                c.alias("rm");
                              }),
                   this, &Impl::ReplicaRemove));
  }
};

ClusterCommands::ClusterCommands(CommandTree& tree, const GlobalOptions& global)
    : impl_(std::make_unique<Impl>(global)) {
  impl_->Register(tree);
}

ClusterCommands::~ClusterCommands() = default;

}  // namespace nbdcsi::nbdctl
