#include "tools/nbdctl/logging_cmds.h"

#include <fmt/format.h>

#include "common/duration.h"
#include "common/log_level.h"
#include "datapath/api/logging.grpc.pb.h"
#include "tools/nbdctl/logging_render.h"

namespace nbdcsi::nbdctl {

struct LoggingCommands::Impl {
  explicit Impl(const GlobalOptions& g) : global(g) {}

  const GlobalOptions& global;
  std::string level, for_text;
  // Whether they were given: `log-level ""` is a bad level, not a question.
  CLI::Option* level_opt = nullptr;
  CLI::Option* for_opt = nullptr;

  int Run() {
    // Checked here with the daemon's own parser, so a typo is a usage error (exit 2) that never
    // reaches the daemon; the daemon checks again for other clients.
    const bool setting = level_opt->count() > 0;
    lv1::SetLogLevelRequest set;
    if (setting) {
      if (auto l = ParseLogLevel(level); !l.ok()) throw UsageError{l.status().message()};
      set.set_level(level);
    }
    if (for_opt->count() > 0) {
      if (!setting) throw UsageError{"--for needs a LEVEL: nbdctl log-level debug --for 10m"};
      auto d = ParseDuration(for_text);
      if (!d.ok()) throw UsageError{"--for: " + d.status().message()};
      if (Status s = CheckLogLevelDuration(*d); !s.ok()) throw UsageError{"--for: " + s.message()};
      set.set_duration_ms(static_cast<uint64_t>(d->count()));
    }
    Connection conn(Peer::kDatapath, "--api", global.api, global.timeout_s);
    auto stub = lv1::Logging::NewStub(conn.channel());
    lv1::LogLevelResponse resp;
    int rc = setting ? conn.Call(*stub, &lv1::Logging::Stub::SetLogLevel, set, &resp,
                                 fmt::format("set the log level to {}", level))
                     : conn.Call(*stub, &lv1::Logging::Stub::GetLogLevel, lv1::GetLogLevelRequest{},
                                 &resp, "get the log level");
    if (rc != kExitOk) return rc;
    Print(global.output, LogLevelJson(resp), LogLevelText(resp));
    return kExitOk;
  }

  void Register(CommandTree& tree) {
    tree.Add(Bound(
        {"log-level"},
        "Show nbd-datapathd's log level, or set it (" + LogLevelChoices() +
            "), for a while with --for",
        [this](CLI::App& c) {
          level_opt = c.add_option("LEVEL", level, "New level: " + LogLevelChoices());
          for_opt = c.add_option("--for", for_text,
                                 "Set LEVEL for this long (90s, 10m, 1h30m; at most 7d), then "
                                 "go back to the level from before");
        },
        this, &Impl::Run));
  }
};

LoggingCommands::LoggingCommands(CommandTree& tree, const GlobalOptions& global)
    : impl_(std::make_unique<Impl>(global)) {
  impl_->Register(tree);
}

LoggingCommands::~LoggingCommands() = default;

}  // namespace nbdcsi::nbdctl
