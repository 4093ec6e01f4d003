#include "tools/nbdctl/target_cmds.h"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <iostream>
#include <mutex>
#include <thread>

#include "common/quantity.h"
#include "datapath/api/target.grpc.pb.h"
#include "tools/nbdctl/progress.h"
#include "tools/nbdctl/target_render.h"

namespace nbdcsi::nbdctl {

using nlohmann::json;

struct TargetCommands::Impl {
  explicit Impl(const GlobalOptions& g) : global(g) {}

  const GlobalOptions& global;
  std::string volume, node, rate, from, to;
  bool wait = false;
  std::unique_ptr<Connection> conn;
  std::unique_ptr<tv1::Targets::Stub> stub;

  void Connect() {
    conn = std::make_unique<Connection>(Peer::kDatapath, "--api", global.api, global.timeout_s);
    stub = tv1::Targets::NewStub(conn->channel());
  }
  // Open and Inspect: one call on `volume` that answers with the target, shown.
  template <typename Req>
  int ShowTarget(grpc::Status (tv1::Targets::Stub::*method)(grpc::ClientContext*, const Req&,
                                                              tv1::TargetResponse*),
                 const char* verb) {
    Req req;
    req.set_volume(volume);
    Connect();
    tv1::TargetResponse resp;
    if (int rc = conn->Call(*stub, method, req, &resp,
                            fmt::format("{} target of \"{}\"", verb, volume)))
      return rc;
    return Show(resp.target());
  }
  int Show(const tv1::Target& t) const {
    Print(global.output, TargetJson(t), TargetDetails(t));
    return kExitOk;
  }

  int Open() { return ShowTarget(&tv1::Targets::Stub::OpenTarget, "open"); }
  int Close() {
    tv1::CloseTargetRequest req;
    req.set_volume(volume);
    Connect();
    tv1::CloseTargetResponse resp;
    if (int rc = conn->Call(*stub, &tv1::Targets::Stub::CloseTarget, req, &resp,
                            fmt::format("close target of \"{}\"", volume)))
      return rc;
    Print(global.output, {{"volume", volume}, {"closed", true}},
          fmt::format("target of \"{}\" closed; its claim is released\n", volume));
    return kExitOk;
  }
  int Inspect() { return ShowTarget(&tv1::Targets::Stub::GetTarget, "inspect"); }
  int Resync() {
    tv1::ResyncReplicaRequest req;
    req.set_volume(volume);
    req.set_node(node);
    if (!rate.empty()) {
      auto r = ParseQuantity(rate);
      if (!r.ok() || *r == 0)
        throw UsageError{fmt::format("--rate: {}", r.ok() ? "must be greater than 0"
                                                          : r.status().message())};
      req.set_rate_bytes_per_second(*r);
    }
    req.set_background(!wait);
    Connect();
    tv1::ResyncReplicaResponse resp;
    const std::string what = fmt::format("resync {} of \"{}\"", node, volume);
    if (wait) {
      // The call returns when the copy is done; meanwhile its progress from GetTarget.
      ResyncProgress progress(*this);
      const int rc = conn->Call(*stub, &tv1::Targets::Stub::ResyncReplica, req, &resp, what);
      progress.Stop(rc == kExitOk);
      if (rc != kExitOk) return rc;
    } else if (int rc = conn->Call(*stub, &tv1::Targets::Stub::ResyncReplica, req, &resp, what)) {
      return rc;
    }
    if (resp.started()) {
      Print(global.output,
            {{"volume", volume},
             {"node", resp.node()},
             {"started", true},
             {"target", TargetJson(resp.target())}},
            fmt::format("resync of the replica on {} of \"{}\" runs in the background; follow "
                        "it with nbdctl target inspect {} (or resync --wait)\n",
                        resp.node(), volume, volume));
      return kExitOk;
    }
    // --wait, or a daemon from before background resyncs, which always waits.
    json j = {{"node", resp.node()},
              {"full", resp.full()},
              {"passes", resp.passes()},
              {"copied_bytes", resp.copied_bytes()},
              {"skipped_bytes", resp.skipped_bytes()},
              {"zeroed_bytes", resp.zeroed_bytes()},
              {"dirty_bytes_at_start", resp.dirty_bytes_at_start()},
              {"frozen_ms", resp.frozen_ms()},
              {"took_ms", resp.took_ms()},
              {"target", TargetJson(resp.target())}};
    Print(global.output, j,
          fmt::format("replica on {} of \"{}\" is in sync again: {} copied{} in {} passes, {} "
                      "ms, writes held {} ms\n",
                      resp.node(), volume, FormatHuman(resp.copied_bytes()),
                      resp.full() ? " (full copy)" : " (dirty regions)", resp.passes(),
                      resp.took_ms(), resp.frozen_ms()));
    return kExitOk;
  }

  // `target resync --wait`: the resync's progress (target inspect's line) on stderr while the
  // call waits, polled from GetTarget on a thread of its own: on a terminal one line rewritten
  // every 250 ms, otherwise a line every 5 s; nothing with -o json (as progress.h).
  class ResyncProgress {
   public:
    explicit ResyncProgress(Impl& impl)
        : mode_(ProgressSink::ModeFor(impl.global.output, STDERR_FILENO)) {
      if (mode_ == ProgressSink::Mode::kOff) return;
      thread_ = std::thread([this, &impl, channel = impl.conn->channel()] {
        auto stub = tv1::Targets::NewStub(channel);
        auto last = std::chrono::steady_clock::now();
        std::unique_lock<std::mutex> lock(mu_);
        while (!cv_.wait_for(lock, std::chrono::milliseconds(250), [&] { return done_; })) {
          lock.unlock();
          tv1::GetTargetRequest req;
          req.set_volume(impl.volume);
          tv1::TargetResponse resp;
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
          std::string line;
          if (stub->GetTarget(&ctx, req, &resp).ok() && resp.target().has_resync() &&
              resp.target().resync().node() == impl.node) {
            const auto& r = resp.target().resync();
            const std::string eta =
                r.eta_seconds() < 0 ? "" : fmt::format(", ETA {} s", r.eta_seconds());
            line = fmt::format("resync {} of {}: pass {}, {:.0f}% ({} of {}){}, {} copied",
                               impl.node, impl.volume, r.pass(), r.percent(),
                               FormatHuman(r.pass_done_bytes()), FormatHuman(r.pass_total_bytes()),
                               eta, FormatHuman(r.copied_bytes()));
          }
          const auto now = std::chrono::steady_clock::now();
          if (!line.empty() && mode_ == ProgressSink::Mode::kTerminal) {
            std::cerr << "\r" << line << "\x1b[K" << std::flush;
            open_ = true;
          } else if (!line.empty() && now - last >= ProgressSink::kPlainEvery) {
            std::cerr << line << "\n" << std::flush;
            last = now;
          }
          lock.lock();
        }
      });
    }
    // The call returned: no more lines; a rewritten one is ended.
    void Stop(bool) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        done_ = true;
      }
      cv_.notify_all();
      if (thread_.joinable()) thread_.join();
      if (open_) std::cerr << "\n";
    }
    ~ResyncProgress() { Stop(false); }

   private:
    ProgressSink::Mode mode_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool done_ = false;  // under mu_
    bool open_ = false;  // the progress thread's until joined
    std::thread thread_;
  };

  uint64_t Rate() const {
    if (rate.empty()) return 0;
    auto r = ParseQuantity(rate);
    if (!r.ok() || *r == 0)
      throw UsageError{
          fmt::format("--rate: {}", r.ok() ? "must be greater than 0" : r.status().message())};
    return *r;
  }
  // AddReplica of `add` (the copy starts in the background); the target after, or the exit code.
  int Add(const std::string& add, tv1::TargetResponse* resp) {
    tv1::AddReplicaRequest req;
    req.set_volume(volume);
    req.set_node(add);
    req.set_rate_bytes_per_second(Rate());
    return conn->Call(*stub, &tv1::Targets::Stub::AddReplica, req, resp,
                      fmt::format("add a replica on {} to \"{}\"", add, volume));
  }
  int Remove(const std::string& drop, tv1::TargetResponse* resp) {
    tv1::RemoveReplicaRequest req;
    req.set_volume(volume);
    req.set_node(drop);
    return conn->Call(*stub, &tv1::Targets::Stub::RemoveReplica, req, resp,
                      fmt::format("remove the replica on {} from \"{}\"", drop, volume));
  }
  static const tv1::TargetReplica* Replica(const tv1::Target& t, const std::string& n) {
    for (const auto& r : t.replicas())
      if (r.node() == n) return &r;
    return nullptr;
  }
  // Follows the copy to `n` (GetTarget every 250 ms, progress on stderr as resync --wait) until
  // it is in sync (kExitOk, `last` the target then, `copied` the bytes the resync reported last),
  // or its resync failed (kExitError, saying so; it stays out of sync and the volume serves).
  int WaitInSync(const std::string& n, tv1::Target* last, uint64_t* copied) {
    const auto mode = ProgressSink::ModeFor(global.output, STDERR_FILENO);
    auto printed = std::chrono::steady_clock::now();
    bool open = false;
    for (;;) {
      tv1::GetTargetRequest req;
      req.set_volume(volume);
      tv1::TargetResponse resp;
      if (int rc = conn->Call(*stub, &tv1::Targets::Stub::GetTarget, req, &resp,
                              fmt::format("inspect target of \"{}\"", volume)))
        return rc;
      *last = resp.target();
      const tv1::TargetReplica* r = Replica(*last, n);
      if (r && r->state() == "in-sync") break;
      if (open && mode == ProgressSink::Mode::kTerminal) std::cerr << "\r\x1b[K";
      if (!r || last->stopped() || (!r->resync_error().empty() && !r->resync_pending())) {
        if (open) std::cerr << "\n";
        std::string why = !r ? "it is no replica of the volume any more"
                          : last->stopped() ? "the target stopped: " + last->stop_reason()
                                            : "its copy failed: " + r->resync_error();
        std::cerr << fmt::format(
            "nbdctl: the replica on {} of \"{}\" is not in sync: {}. It stays out of sync and "
            "the volume keeps serving from [{}]; the automatic resync retries once {} answers "
            "(or: nbdctl target resync {} {})\n",
            n, volume, why, fmt::join(last->in_sync(), ", "), n, volume, n);
        return kExitServer;
      }
      if (last->has_resync() && last->resync().node() == n) {
        const auto& rs = last->resync();
        *copied = std::max<uint64_t>(*copied, rs.copied_bytes());
        const std::string line = fmt::format(
            "copy to {} of {}: pass {}, {:.0f}% ({} of {}){}, {} copied", n, volume, rs.pass(),
            rs.percent(), FormatHuman(rs.pass_done_bytes()), FormatHuman(rs.pass_total_bytes()),
            rs.eta_seconds() < 0 ? "" : fmt::format(", ETA {} s", rs.eta_seconds()),
            FormatHuman(rs.copied_bytes()));
        const auto now = std::chrono::steady_clock::now();
        if (mode == ProgressSink::Mode::kTerminal) {
          std::cerr << "\r" << line << "\x1b[K" << std::flush;
          open = true;
        } else if (mode == ProgressSink::Mode::kPlain &&
                   now - printed >= ProgressSink::kPlainEvery) {
          std::cerr << line << "\n" << std::flush;
          printed = now;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    if (open) std::cerr << "\r\x1b[K" << std::flush;
    return kExitOk;
  }
  int ReplicaAdd() {
    Connect();
    tv1::TargetResponse resp;
    const auto start = std::chrono::steady_clock::now();
    if (int rc = Add(node, &resp)) return rc;
    tv1::Target t = resp.target();
    uint64_t copied = 0;
    if (wait) {
      if (int rc = WaitInSync(node, &t, &copied)) return rc;
    }
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - start)
                        .count();
    Print(global.output,
          {{"volume", volume}, {"node", node}, {"in_sync", wait}, {"took_ms", ms},
           {"target", TargetJson(t)}},
          wait ? fmt::format("replica on {} of \"{}\" added and in sync ({} ms)\n", node, volume,
                             ms)
               : fmt::format("replica on {} of \"{}\" added out of sync; its copy runs in the "
                             "background (nbdctl target inspect {})\n",
                             node, volume, volume));
    return kExitOk;
  }
  int ReplicaRemove() {
    Connect();
    tv1::TargetResponse resp;
    if (int rc = Remove(node, &resp)) return rc;
    Print(global.output, {{"volume", volume}, {"node", node}, {"removed", true},
                          {"target", TargetJson(resp.target())}},
          fmt::format("replica on {} removed from \"{}\"; in sync: [{}]. Its copy stays in {}'s "
                      "pool: delete it there (nbdctl volume delete {})\n",
                      node, volume, fmt::join(resp.target().in_sync(), ", "), node, volume));
    return kExitOk;
  }
  // Add --to, wait until it is in sync, remove --from: the volume is served throughout.
  int Move() {
    if (from == to) throw UsageError{"--from and --to name the same node"};
    Connect();
    const auto start = std::chrono::steady_clock::now();
    tv1::TargetResponse resp;
    {
      // --from must be a replica before anything is added.
      tv1::GetTargetRequest req;
      req.set_volume(volume);
      if (int rc = conn->Call(*stub, &tv1::Targets::Stub::GetTarget, req, &resp,
                              fmt::format("inspect target of \"{}\"", volume)))
        return rc;
      if (!Replica(resp.target(), from)) {
        std::cerr << fmt::format("nbdctl: --from {}: not a replica of \"{}\" (replicas: {})\n",
                                 from, volume, TargetReplicaNodes(resp.target()));
        return kExitServer;
      }
    }
    if (int rc = Add(to, &resp)) return rc;
    tv1::Target t = resp.target();
    uint64_t copied = 0;
    if (int rc = WaitInSync(to, &t, &copied)) return rc;
    const auto synced = std::chrono::steady_clock::now();
    if (int rc = Remove(from, &resp)) {
      std::cerr << fmt::format("nbdctl: the replica on {} is in sync; {} is still a replica of "
                               "\"{}\" (nbdctl target replica remove {} {})\n",
                               to, from, volume, volume, from);
      return rc;
    }
    const auto end = std::chrono::steady_clock::now();
    auto ms = [](auto d) {
      return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
    };
    Print(global.output,
          {{"volume", volume},
           {"from", from},
           {"to", to},
           {"took_ms", ms(end - start)},
           {"copy_ms", ms(synced - start)},
           {"copied_bytes", copied},
           {"target", TargetJson(resp.target())}},
          fmt::format("replica of \"{}\" moved from {} to {} in {} ms (copy {} ms); in sync: "
                      "[{}]. The copy stays in {}'s pool: delete it there (nbdctl volume delete "
                      "{})\n",
                      volume, from, to, ms(end - start), ms(synced - start),
                      fmt::join(resp.target().in_sync(), ", "), from, volume));
    return kExitOk;
  }
  static std::string TargetReplicaNodes(const tv1::Target& t) {
    std::string out;
    for (const auto& r : t.replicas()) out += (out.empty() ? "" : ", ") + r.node();
    return out;
  }

  int List() {
    Connect();
    tv1::ListTargetsResponse resp;
    if (int rc = conn->Call(*stub, &tv1::Targets::Stub::ListTargets, {}, &resp, "list targets"))
      return rc;
    json all = json::array();
    for (const auto& t : resp.targets()) all.push_back(TargetJson(t));
    Print(global.output, {{"targets", all}}, TargetsTable(resp));
    return kExitOk;
  }

  Command Cmd(std::vector<std::string> path, std::string help, Flags flags, int (Impl::*fn)()) {
    return Bound(std::move(path), std::move(help), std::move(flags), this, fn);
  }
  void Register(CommandTree& tree) {
    tree.Add(Group{{"target"},
                   "Targets of replicated volumes on this datapath (needs --cluster-etcd)",
                   "target", nullptr});
    tree.Add(Cmd({"target", "open"},
                 "Claim a replicated volume for this node and serve it as VOLUME@target (the "
                 "epoch rises; older targets are fenced)",
                 Positional("VOLUME", &volume, "Replicated volume"), &Impl::Open));
    tree.Add(Cmd({"target", "close"},
                 "Stop serving VOLUME@target here and release the claim",
                 Positional("VOLUME", &volume, "Replicated volume"), &Impl::Close));
    tree.Add(Cmd({"target", "inspect"},
                 "Show a target: epoch, replicas and their state, in-sync set, degraded writes",
                 Positional("VOLUME", &volume, "Replicated volume"), &Impl::Inspect));
    tree.Add(Cmd({"target", "resync"},
                 "Bring an out-of-sync replica back: copy what it missed while the volume stays "
                 "in use, then record it in sync. Starts it in the background (target inspect "
                 "shows its progress); --wait: until done, with progress (raise --timeout for "
                 "big volumes)",
                 Positional("VOLUME", &volume, "Replicated volume",
                            [this](CLI::App& c) {
                              c.add_option("NODE", node, "The replica's node")->required();
                              c.add_option("--rate", rate, "Copy limit in bytes/s (50Mi) for the passes made while writes go on; "
                                             "the last pass (8 MiB or less) runs unpaced with writes held");
                              c.add_flag("--wait", wait,
                                         "Wait until the replica is in sync, with progress on "
                                         "stderr, and print the resync's report");
                            }),
                 &Impl::Resync));
    tree.Add(Group{{"target", "replica"},
                   "Add or remove a replica of a volume served here (the volume stays in use)",
                   "target replica", nullptr});
    tree.Add(Cmd({"target", "replica", "add"},
                 "Add a replica on NODE, whose pool holds a copy of the volume (blank: nbdctl "
                 "volume create VOLUME --size S there): recorded out of sync, then copied whole "
                 "in the background (holes skipped); it joins the in-sync set when done",
                 Positional("VOLUME", &volume, "Replicated volume",
                            [this](CLI::App& c) {
                              c.add_option("NODE", node, "The new replica's node")->required();
                              c.add_option("--rate", rate, "Copy limit in bytes/s (50Mi)");
                              c.add_flag("--wait", wait,
                                         "Wait until the replica is in sync, with progress on "
                                         "stderr");
                            }),
                 &Impl::ReplicaAdd));
    tree.Add(Cmd({"target", "replica", "remove"},
                 "Remove the replica on NODE (never the last in-sync one): out of the cluster "
                 "state, then its connection closes; its pool copy stays for you to delete",
                 Positional("VOLUME", &volume, "Replicated volume",
                            [this](CLI::App& c) {
                              c.add_option("NODE", node, "The replica's node")->required();
                              c.alias("rm");
                            }),
                 &Impl::ReplicaRemove));
    tree.Add(Cmd({"target", "move"},
                 "Move a replica from one node to another with the volume in use: add --to "
                 "(its pool holds a blank copy), copy it with progress until in sync, remove "
                 "--from",
                 Positional("VOLUME", &volume, "Replicated volume",
                            [this](CLI::App& c) {
                              c.add_option("--from", from, "The replica's node now")->required();
                              c.add_option("--to", to, "The new replica's node")->required();
                              c.add_option("--rate", rate, "Copy limit in bytes/s (50Mi)");
                            }),
                 &Impl::Move));
    tree.Add(Cmd({"target", "list"}, "List the targets open on this datapath",
                 [](CLI::App& c) { c.alias("ls"); }, &Impl::List));
  }
};

TargetCommands::TargetCommands(CommandTree& tree, const GlobalOptions& global)
    : impl_(std::make_unique<Impl>(global)) {
  impl_->Register(tree);
}

TargetCommands::~TargetCommands() = default;

}  // namespace nbdcsi::nbdctl
