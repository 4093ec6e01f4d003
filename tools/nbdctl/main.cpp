// nbdctl: the operator CLI of nbd-datapathd's management API, and a CSI client (`nbdctl csi`).
// See README.md for commands, exit codes and the JSON keys. The commands themselves are entries
// of a CommandTree (datapath_cmds.cpp, csi_cmds.cpp); main only parses and runs the chosen one.
#include <cstdlib>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "tools/nbdctl/backup_cmds.h"
#include "tools/nbdctl/cluster_cmds.h"
#include "tools/nbdctl/target_cmds.h"
#include "tools/nbdctl/command_tree.h"
#include "tools/nbdctl/connection.h"
#include "tools/nbdctl/csi_cmds.h"
#include "tools/nbdctl/datapath_cmds.h"
#include "tools/nbdctl/logging_cmds.h"

namespace nbdcsi::nbdctl {
namespace {

constexpr const char* kDefaultApi = "unix:///run/nbd-csi/datapath.sock";

void AddGlobalOptions(CLI::App& app, GlobalOptions& g) {
  const char* env_api = std::getenv("NBDCTL_API");
  g.api = env_api && *env_api ? env_api : kDefaultApi;
  app.add_option(
      "--api", g.api,
      "Management API endpoint (default: $NBDCTL_API, else " + std::string(kDefaultApi) + ")");
  app.add_option("-o,--output", g.output, "Output format")->check(CLI::IsMember({"table", "json"}));
  g.timeout_opt = app.add_option("--timeout", g.timeout_s, "Seconds to wait for the daemon")
                      ->check(CLI::Range(0.001, 86400.0));
  // Global options also after the command (`nbdctl volume list -o json`), as in kubectl and
  // pxctl. Subcommands inherit this setting, so it must be set before they are added; a
  // subcommand that defines an option of the same name would shadow the global one.
  app.fallthrough();
  app.footer("Global options (--api, -o/--output, --timeout) go before or after the command.");
}

int Run(int argc, char** argv) {
  CLI::App app{"nbdctl: manage the volumes and snapshots of nbd-datapathd"};
  GlobalOptions global;
  AddGlobalOptions(app, global);
  CommandTree tree(app);
  DatapathCommands datapath(tree, global);
  CsiCommands csi(tree, global);
  BackupCommands backups(tree, global);
  TargetCommands targets(tree, global);
  LoggingCommands logging(tree, global);
  ClusterCommands cluster(tree, global);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "nbdctl: " << e.what() << "\n(run with --help for usage)\n";
    return kExitUsage;
  }
  try {
    return tree.Chosen().run();
  } catch (const UsageError& e) {
    std::cerr << "nbdctl: " << e.message << "\n";
    return kExitUsage;
  }
}

}  // namespace
}  // namespace nbdcsi::nbdctl

int main(int argc, char** argv) {
  // Not a server: gRPC's own chatter would only repeat what our error messages say.
  setenv("GRPC_VERBOSITY", "NONE", 0);
  try {
    return nbdcsi::nbdctl::Run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "nbdctl: internal error: " << e.what() << "\n";
    return 1;
  }
}
