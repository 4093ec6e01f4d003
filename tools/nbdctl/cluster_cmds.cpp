#include "tools/nbdctl/cluster_cmds.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "common/tls.h"
#include "datapath/api/cluster_view.grpc.pb.h"
#include "tools/nbdctl/cluster_render.h"

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
  }
};

ClusterCommands::ClusterCommands(CommandTree& tree, const GlobalOptions& global)
    : impl_(std::make_unique<Impl>(global)) {
  impl_->Register(tree);
}

ClusterCommands::~ClusterCommands() = default;

}  // namespace nbdcsi::nbdctl
