// nbdctl's command table (tools/nbdctl/command_tree.h): the command line picks exactly one entry,
// and a group named without a subcommand is a usage error that lists its subcommands in --help
// order.
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tools/nbdctl/command_tree.h"
#include "tools/nbdctl/connection.h"

namespace nbdcsi::nbdctl {
namespace {

class CommandTreeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    app_.fallthrough();
    app_.add_option("-o", output_);
    tree_.Add(Group{{"volume"}, "Volumes", "volume", nullptr});
    tree_.Add(Command{{"volume", "create"},
                      "Create",
                      [this](CLI::App& c) { c.add_option("NAME", name_)->required(); },
                      [] { return 11; }});
    tree_.Add(
        Command{{"volume", "list"}, "List", [](CLI::App& c) { c.alias("ls"); }, [] { return 12; }});
    tree_.Add(Command{{"stats"}, "Stats", nullptr, [] { return 13; }});
    tree_.Add(Group{
        {"csi"}, "CSI", "csi csi", [this](CLI::App& c) { c.add_option("--endpoint", endpoint_); }});
    tree_.Add(Group{{"csi", "node"}, "Node", "csi node", nullptr});
    tree_.Add(Command{{"csi", "node", "info"}, "Info", nullptr, [] { return 14; }});
    tree_.Add(Command{{"csi", "node", "stats"}, "Stats", nullptr, [] { return 15; }});
  }
  // The exit code of the chosen command, or the usage error's message.
  std::string Pick(std::vector<std::string> args) {
    args.insert(args.begin(), "nbdctl");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    app_.parse(static_cast<int>(argv.size()), argv.data());
    try {
      return std::to_string(tree_.Chosen().run());
    } catch (const UsageError& e) {
      return e.message;
    }
  }

  CLI::App app_{"test"};
  CommandTree tree_{app_};
  std::string output_, name_, endpoint_;
};

TEST_F(CommandTreeTest, PicksTheNamedCommand) {
  EXPECT_EQ(Pick({"volume", "create", "a"}), "11");
  EXPECT_EQ(name_, "a");
  EXPECT_EQ(Pick({"volume", "ls", "-o", "json"}), "12");
  EXPECT_EQ(output_, "json");
  EXPECT_EQ(Pick({"stats"}), "13");
  EXPECT_EQ(Pick({"csi", "--endpoint", "e", "node", "stats"}), "15");
  EXPECT_EQ(endpoint_, "e");
}

TEST_F(CommandTreeTest, NoCommandListsTheTopLevel) {
  EXPECT_EQ(Pick({}), "a command is required: volume, stats, csi (see --help)");
}

TEST_F(CommandTreeTest, AGroupAloneListsItsSubcommands) {
  EXPECT_EQ(Pick({"volume"}), "volume: a subcommand is required: create, list");
}

TEST_F(CommandTreeTest, NestedGroupsUseTheirOwnLabel) {
  EXPECT_EQ(Pick({"csi"}), "csi csi: a subcommand is required: node");
  EXPECT_EQ(Pick({"csi", "node"}), "csi node: a subcommand is required: info, stats");
}

TEST_F(CommandTreeTest, UnknownCommandIsAParseError) {
  EXPECT_THROW(Pick({"bogus"}), CLI::ParseError);
  EXPECT_THROW(Pick({"volume", "create"}), CLI::ParseError);  // NAME is required
}

}  // namespace
}  // namespace nbdcsi::nbdctl
