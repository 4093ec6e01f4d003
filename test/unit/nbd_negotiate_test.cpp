// Option negotiation: full transcripts through the Negotiator, byte-exact where the layout
// matters, plus every rejection path (malformed, oversize, unknown, out of sequence).
#include "datapath/nbd/negotiate.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "datapath/nbd/codec.h"

namespace nbdcsi::nbd {
namespace {

using Bytes = std::vector<uint8_t>;
using Step = Negotiator::Step;
using Action = Negotiator::HeaderAction;

constexpr uint64_t kDiskSize = 1ULL << 30;

class FakeCatalog : public ExportCatalog {
 public:
  FakeCatalog() {
    exports_["disk0"] = {"disk0", kDiskSize, false, "scratch volume"};
    exports_["ro"] = {"ro", 4096, true, ""};
  }
  std::optional<ExportInfo> Lookup(std::string_view name) override {
    ++lookups;
    // "" is the default export, an alias: exercises canonical-name handling.
    auto it = exports_.find(name.empty() ? std::string("disk0") : std::string(name));
    if (it == exports_.end()) return std::nullopt;
    return it->second;
  }
  std::vector<std::string> List() override { return {"disk0", "ro"}; }
  int lookups = 0;

 private:
  std::map<std::string, ExportInfo> exports_;
};

void Append16(Bytes& b, uint16_t v) {
  uint8_t t[2];
  StoreBE16(t, v);
  b.insert(b.end(), t, t + 2);
}
void Append32(Bytes& b, uint32_t v) {
  uint8_t t[4];
  StoreBE32(t, v);
  b.insert(b.end(), t, t + 4);
}
void Append64(Bytes& b, uint64_t v) {
  uint8_t t[8];
  StoreBE64(t, v);
  b.insert(b.end(), t, t + 8);
}
void AppendStr(Bytes& b, std::string_view s) { b.insert(b.end(), s.begin(), s.end()); }

Bytes InfoPayload(std::string_view name, std::vector<uint16_t> infos) {
  Bytes b;
  Append32(b, static_cast<uint32_t>(name.size()));
  AppendStr(b, name);
  Append16(b, static_cast<uint16_t>(infos.size()));
  for (uint16_t i : infos) Append16(b, i);
  return b;
}

Bytes MetaPayload(std::string_view name, std::vector<std::string> queries) {
  Bytes b;
  Append32(b, static_cast<uint32_t>(name.size()));
  AppendStr(b, name);
  Append32(b, static_cast<uint32_t>(queries.size()));
  for (const auto& q : queries) {
    Append32(b, static_cast<uint32_t>(q.size()));
    AppendStr(b, q);
  }
  return b;
}

struct Reply {
  uint32_t option;
  uint32_t type;
  Bytes data;
};

// Splits option replies, failing the test on anything that is not a well-formed sequence.
std::vector<Reply> ParseReplies(const Bytes& out) {
  std::vector<Reply> r;
  size_t pos = 0;
  while (pos < out.size()) {
    EXPECT_GE(out.size() - pos, kOptionReplyHeaderLen);
    if (out.size() - pos < kOptionReplyHeaderLen) break;
    EXPECT_EQ(LoadBE64(&out[pos]), kOptReplyMagic);
    Reply rep{LoadBE32(&out[pos + 8]), LoadBE32(&out[pos + 12]), {}};
    const uint32_t len = LoadBE32(&out[pos + 16]);
    pos += kOptionReplyHeaderLen;
    EXPECT_LE(len, out.size() - pos);
    if (len > out.size() - pos) break;
    rep.data.assign(out.begin() + static_cast<long>(pos), out.begin() + static_cast<long>(pos + len));
    pos += len;
    r.push_back(std::move(rep));
  }
  return r;
}

class NegotiateTest : public ::testing::Test {
 protected:
  void Start(uint32_t client_flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes) {
    ASSERT_TRUE(n_.OnClientFlags(client_flags));
  }
  Step Send(uint32_t option, const Bytes& payload = {}) {
    out_.clear();
    return n_.OnOption(option, payload, false, out_);
  }
  // Sends an option expected to get exactly one reply, and returns its type.
  uint32_t SingleReplyType(uint32_t option, const Bytes& payload = {}) {
    EXPECT_EQ(Send(option, payload), Step::kContinue);
    auto r = ParseReplies(out_);
    EXPECT_EQ(r.size(), 1u);
    if (r.empty()) return 0;
    EXPECT_EQ(r[0].option, option);
    return r[0].type;
  }

  FakeCatalog catalog_;
  Negotiator n_{catalog_};
  Bytes out_;
};

TEST_F(NegotiateTest, GreetingIsFixedNewstyleWithNoZeroes) {
  Bytes g;
  n_.Greeting(g);
  EXPECT_EQ(g, (Bytes{'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C', 'I', 'H', 'A', 'V', 'E', 'O', 'P',
                      'T', 0x00, 0x03}));
  EXPECT_EQ(g.size(), kGreetingLen);
}

TEST(NegotiateClientFlags, RequiresFixedNewstyleAndKnownFlagsOnly) {
  const struct {
    uint32_t flags;
    bool ok;
  } kCases[] = {{0, false}, {kClientFlagNoZeroes, false}, {kClientFlagFixedNewstyle, true},
                {kClientFlagFixedNewstyle | kClientFlagNoZeroes, true},
                {kClientFlagFixedNewstyle | 4, false}, {0x80000001u, false}};
  for (const auto& c : kCases) {
    FakeCatalog cat;
    Negotiator n(cat);
    EXPECT_EQ(n.OnClientFlags(c.flags), c.ok) << std::hex << c.flags;
    // A rejected connection accepts no options.
    Bytes out;
    if (!c.ok) {
      EXPECT_EQ(n.OnOption(kOptStructuredReply, {}, false, out), Step::kClose);
      EXPECT_TRUE(out.empty());
    }
  }
}

TEST_F(NegotiateTest, OptionsBeforeClientFlagsClose) {
  EXPECT_EQ(Send(kOptList), Step::kClose);
  EXPECT_TRUE(out_.empty());
}

TEST_F(NegotiateTest, ClientFlagsOnlyOnce) {
  Start();
  EXPECT_FALSE(n_.OnClientFlags(kClientFlagFixedNewstyle));
}

Bytes OptionHeader(uint64_t magic, uint32_t option, uint32_t length) {
  Bytes b;
  Append64(b, magic);
  Append32(b, option);
  Append32(b, length);
  return b;
}

TEST_F(NegotiateTest, OptionHeaderActions) {
  const struct {
    uint64_t magic;
    uint32_t option;
    uint32_t length;
    Action action;
  } kCases[] = {
      {kIHaveOpt, kOptGo, 0, Action::kReadPayload},
      {kIHaveOpt, kOptGo, kMaxOptionLen, Action::kReadPayload},
      {kIHaveOpt, kOptGo, kMaxOptionLen + 1, Action::kDrainThenReply},
      {kIHaveOpt, 0x1234, kMaxDrainOptionLen, Action::kDrainThenReply},
      {kIHaveOpt, kOptGo, kMaxDrainOptionLen + 1, Action::kClose},
      {kIHaveOpt, kOptGo, UINT32_MAX, Action::kClose},
      {kIHaveOpt, kOptExportName, kMaxOptionLen, Action::kReadPayload},
      {kIHaveOpt, kOptExportName, kMaxOptionLen + 1, Action::kClose},
      {kNbdMagic, kOptGo, 0, Action::kClose},
      {kIHaveOpt ^ 1, kOptGo, 0, Action::kClose},
  };
  for (const auto& c : kCases) {
    Bytes h = OptionHeader(c.magic, c.option, c.length);
    auto r = n_.OnOptionHeader(h.data());
    EXPECT_EQ(r.action, c.action) << c.option << " len " << c.length;
    EXPECT_EQ(r.option, c.option);
    EXPECT_EQ(r.length, c.length);
  }
}

TEST_F(NegotiateTest, DrainedOversizeOptionGetsTooBigAndContinues) {
  Start();
  EXPECT_EQ(n_.OnOption(kOptGo, {}, true, out_), Step::kContinue);
  Bytes want;
  Append64(want, kOptReplyMagic);
  Append32(want, kOptGo);
  Append32(want, kRepErrTooBig);
  Append32(want, 15);
  AppendStr(want, "option too long");
  EXPECT_EQ(out_, want);
  EXPECT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
}

TEST_F(NegotiateTest, DrainedAbortStillAcksAndCloses) {
  Start();
  EXPECT_EQ(n_.OnOption(kOptAbort, {}, true, out_), Step::kClose);
  auto r = ParseReplies(out_);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepAck);
}

TEST_F(NegotiateTest, DrainedExportNameCloses) {
  Start();
  EXPECT_EQ(n_.OnOption(kOptExportName, {}, true, out_), Step::kClose);
  EXPECT_TRUE(out_.empty());
}

TEST_F(NegotiateTest, GoWithInfoRequestsByteExact) {
  Start();
  ASSERT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  // NAME, DESCRIPTION, and an unknown type that must be ignored.
  ASSERT_EQ(Send(kOptGo, InfoPayload("disk0", {kInfoName, kInfoDescription, 0x7777})),
            Step::kTransmission);
  const uint16_t flags = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendTrim |
                         kFlagSendWriteZeroes | kFlagSendDf | kFlagCanMultiConn |
                         kFlagSendFastZero;
  EXPECT_EQ(flags, 0x09ed);
  Bytes want;
  auto hdr = [&](uint32_t type, uint32_t len) {
    Append64(want, kOptReplyMagic);
    Append32(want, kOptGo);
    Append32(want, type);
    Append32(want, len);
  };
  hdr(kRepInfo, 12);
  Append16(want, kInfoExport);
  Append64(want, kDiskSize);
  Append16(want, flags);
  hdr(kRepInfo, 14);
  Append16(want, kInfoBlockSize);
  Append32(want, 1);
  Append32(want, 4096);
  Append32(want, 32u << 20);
  hdr(kRepInfo, 7);
  Append16(want, kInfoName);
  AppendStr(want, "disk0");
  hdr(kRepInfo, 16);
  Append16(want, kInfoDescription);
  AppendStr(want, "scratch volume");
  hdr(kRepAck, 0);
  EXPECT_EQ(out_, want);

  const Negotiated& r = n_.result();
  EXPECT_EQ(r.export_info.name, "disk0");
  EXPECT_EQ(r.export_info.size, kDiskSize);
  EXPECT_TRUE(r.structured_replies);
  EXPECT_FALSE(r.base_allocation);
  EXPECT_EQ(r.transmission_flags, flags);
  // Nothing more is accepted once transmission starts.
  EXPECT_EQ(Send(kOptList), Step::kClose);
  EXPECT_TRUE(out_.empty());
}

TEST_F(NegotiateTest, GoWithoutInfoRequestsSendsExportAndBlockSizeOnly) {
  Start();
  ASSERT_EQ(Send(kOptGo, InfoPayload("ro", {})), Step::kTransmission);
  auto r = ParseReplies(out_);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, kRepInfo);
  EXPECT_EQ(LoadBE16(r[0].data.data()), kInfoExport);
  EXPECT_EQ(LoadBE64(r[0].data.data() + 2), 4096u);
  // Read-only, no structured replies: no TRIM/WRITE_ZEROES/FAST_ZERO and no DF.
  EXPECT_EQ(LoadBE16(r[0].data.data() + 10),
            kFlagHasFlags | kFlagReadOnly | kFlagSendFlush | kFlagSendFua | kFlagCanMultiConn);
  EXPECT_EQ(LoadBE16(r[1].data.data()), kInfoBlockSize);
  EXPECT_EQ(r[2].type, kRepAck);
  EXPECT_TRUE(n_.result().export_info.read_only);
  EXPECT_FALSE(n_.result().structured_replies);
}

TEST_F(NegotiateTest, DescriptionOmittedWhenEmpty) {
  Start();
  ASSERT_EQ(Send(kOptInfo, InfoPayload("ro", {kInfoDescription})), Step::kContinue);
  auto r = ParseReplies(out_);
  ASSERT_EQ(r.size(), 3u);  // EXPORT, BLOCK_SIZE, ACK
  EXPECT_EQ(r[2].type, kRepAck);
}

TEST_F(NegotiateTest, InfoThenGoGiveTheSameAnswer) {
  Start();
  ASSERT_EQ(Send(kOptInfo, InfoPayload("disk0", {kInfoBlockSize})), Step::kContinue);
  Bytes info = out_;
  ASSERT_EQ(Send(kOptGo, InfoPayload("disk0", {kInfoBlockSize})), Step::kTransmission);
  // Same bytes except the option number echoed in each reply header.
  ASSERT_EQ(info.size(), out_.size());
  auto a = ParseReplies(info);
  auto b = ParseReplies(out_);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].option, kOptInfo);
    EXPECT_EQ(b[i].option, kOptGo);
    EXPECT_EQ(a[i].type, b[i].type);
    EXPECT_EQ(a[i].data, b[i].data);
  }
}

TEST_F(NegotiateTest, DefaultExportResolvesToCanonicalName) {
  Start();
  ASSERT_EQ(Send(kOptGo, InfoPayload("", {kInfoName})), Step::kTransmission);
  auto r = ParseReplies(out_);
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(LoadBE16(r[2].data.data()), kInfoName);
  EXPECT_EQ(std::string(r[2].data.begin() + 2, r[2].data.end()), "disk0");
  EXPECT_EQ(n_.result().export_info.name, "disk0");
}

TEST_F(NegotiateTest, GoUnknownExportIsErrUnknownAndNegotiationContinues) {
  Start();
  EXPECT_EQ(SingleReplyType(kOptGo, InfoPayload("nope", {kInfoName})), kRepErrUnknown);
  EXPECT_EQ(SingleReplyType(kOptInfo, InfoPayload("nope", {})), kRepErrUnknown);
  EXPECT_EQ(Send(kOptGo, InfoPayload("disk0", {})), Step::kTransmission);
}

TEST_F(NegotiateTest, MalformedInfoAndGoAreErrInvalid) {
  Start();
  Bytes name_too_long;  // name length claims more than the payload holds
  Append32(name_too_long, 100);
  AppendStr(name_too_long, "disk0");
  Append16(name_too_long, 0);
  Bytes too_many_infos = InfoPayload("disk0", {kInfoName});
  StoreBE16(&too_many_infos[4 + 5], 2);  // says 2 requests, carries 1
  Bytes trailing = InfoPayload("disk0", {kInfoName});
  trailing.push_back(0);
  Bytes odd = InfoPayload("disk0", {});
  odd.push_back(0);  // half an info request
  Bytes nul_name = InfoPayload(std::string_view("dis\0k", 5), {});
  Bytes long_name = InfoPayload(std::string(kMaxStringLen + 1, 'a'), {});
  const std::pair<const char*, Bytes> kCases[] = {
      {"empty", {}},
      {"five_bytes", {0, 0, 0, 0, 0}},
      {"no_info_count", {0, 0, 0, 0}},
      {"name_past_end", name_too_long},
      {"more_infos_than_fit", too_many_infos},
      {"trailing_byte", trailing},
      {"odd_info_bytes", odd},
      {"nul_in_name", nul_name},
      {"name_over_4096", long_name},
  };
  for (uint32_t opt : {kOptInfo, kOptGo}) {
    for (const auto& [name, payload] : kCases) {
      EXPECT_EQ(SingleReplyType(opt, payload), kRepErrInvalid) << name << " opt " << opt;
    }
  }
  EXPECT_EQ(catalog_.lookups, 0) << "malformed requests must not reach the catalog";
  EXPECT_EQ(Send(kOptGo, InfoPayload("disk0", {})), Step::kTransmission);
}

TEST_F(NegotiateTest, ListByteExact) {
  Start();
  ASSERT_EQ(Send(kOptList), Step::kContinue);
  Bytes want;
  for (std::string_view name : {"disk0", "ro"}) {
    Append64(want, kOptReplyMagic);
    Append32(want, kOptList);
    Append32(want, kRepServer);
    Append32(want, static_cast<uint32_t>(4 + name.size()));
    Append32(want, static_cast<uint32_t>(name.size()));
    AppendStr(want, name);
  }
  Append64(want, kOptReplyMagic);
  Append32(want, kOptList);
  Append32(want, kRepAck);
  Append32(want, 0);
  EXPECT_EQ(out_, want);
}

TEST_F(NegotiateTest, ListWithDataIsInvalid) {
  Start();
  EXPECT_EQ(SingleReplyType(kOptList, {0}), kRepErrInvalid);
}

TEST_F(NegotiateTest, StructuredReply) {
  Start();
  EXPECT_EQ(SingleReplyType(kOptStructuredReply, {1, 2}), kRepErrInvalid);
  EXPECT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  EXPECT_EQ(SingleReplyType(kOptStructuredReply), kRepAck) << "repeating is harmless";
}

TEST_F(NegotiateTest, StartTlsIsRefusedByPolicy) {
  Start();
  EXPECT_EQ(SingleReplyType(kOptStartTls), kRepErrPolicy);
  EXPECT_EQ(SingleReplyType(kOptStartTls, {0}), kRepErrInvalid);
}

TEST_F(NegotiateTest, AbortAcksThenCloses) {
  Start();
  ASSERT_EQ(Send(kOptAbort), Step::kClose);
  Bytes want;
  Append64(want, kOptReplyMagic);
  Append32(want, kOptAbort);
  Append32(want, kRepAck);
  Append32(want, 0);
  EXPECT_EQ(out_, want);
  EXPECT_EQ(Send(kOptList), Step::kClose);
  EXPECT_TRUE(out_.empty());
}

TEST_F(NegotiateTest, UnknownOptionsAreUnsupported) {
  Start();
  for (uint32_t opt : {0u, kOptPeekExport, 11u, 12u, 0x8000u, 0xffffffffu}) {
    EXPECT_EQ(SingleReplyType(opt, {1, 2, 3}), kRepErrUnsup) << opt;
  }
  EXPECT_EQ(Send(kOptGo, InfoPayload("disk0", {})), Step::kTransmission);
}

TEST_F(NegotiateTest, ExportNameWithNoZeroes) {
  Start(kClientFlagFixedNewstyle | kClientFlagNoZeroes);
  ASSERT_EQ(Send(kOptExportName, Bytes{'r', 'o'}), Step::kTransmission);
  Bytes want;
  Append64(want, 4096);
  Append16(want, 0x010f);  // HAS_FLAGS|READ_ONLY|FLUSH|FUA|MULTI_CONN
  EXPECT_EQ(out_, want);
}

TEST_F(NegotiateTest, ExportNameWithZeroes) {
  Start(kClientFlagFixedNewstyle);
  ASSERT_EQ(Send(kOptExportName, Bytes{'d', 'i', 's', 'k', '0'}), Step::kTransmission);
  Bytes want;
  Append64(want, kDiskSize);
  Append16(want, 0x096d);  // read-write, no structured replies so no DF
  want.resize(want.size() + 124, 0);
  EXPECT_EQ(out_, want);
  EXPECT_EQ(n_.result().transmission_flags, 0x096d);
}

TEST_F(NegotiateTest, ExportNameAfterStructuredRepliesAdvertisesDf) {
  Start();
  ASSERT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  ASSERT_EQ(Send(kOptExportName, {}), Step::kTransmission);  // default export
  EXPECT_EQ(LoadBE16(out_.data() + 8), 0x09ed);
  EXPECT_TRUE(n_.result().structured_replies);
  EXPECT_EQ(n_.result().export_info.name, "disk0");
}

TEST_F(NegotiateTest, ExportNameUnknownClosesWithoutReply) {
  Start();
  EXPECT_EQ(Send(kOptExportName, Bytes{'x'}), Step::kClose);
  EXPECT_TRUE(out_.empty());
  EXPECT_EQ(Send(kOptGo, InfoPayload("disk0", {})), Step::kClose);
}

TEST_F(NegotiateTest, ExportNameWithNulClosesWithoutLookup) {
  Start();
  EXPECT_EQ(Send(kOptExportName, Bytes{'d', 0}), Step::kClose);
  EXPECT_EQ(catalog_.lookups, 0);
}

// ---- Metadata contexts ----

TEST_F(NegotiateTest, MetaContextRequiresStructuredReplies) {
  Start();
  EXPECT_EQ(SingleReplyType(kOptListMetaContext, MetaPayload("disk0", {})), kRepErrInvalid);
  EXPECT_EQ(SingleReplyType(kOptSetMetaContext, MetaPayload("disk0", {"base:allocation"})),
            kRepErrInvalid);
}

TEST_F(NegotiateTest, ListMetaContextQueries) {
  Start();
  ASSERT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  const struct {
    const char* name;
    std::vector<std::string> queries;
    bool lists_base_allocation;
  } kCases[] = {
      {"no_query_lists_all", {}, true},
      {"namespace_wildcard", {"base:"}, true},
      {"exact", {"base:allocation"}, true},
      {"duplicate_listed_once", {"base:allocation", "base:"}, true},
      {"unknown_leaf_ignored", {"base:other"}, false},
      {"unknown_namespace_ignored", {"qemu:dirty-bitmap:x"}, false},
  };
  for (const auto& c : kCases) {
    ASSERT_EQ(Send(kOptListMetaContext, MetaPayload("disk0", c.queries)), Step::kContinue);
    auto r = ParseReplies(out_);
    ASSERT_EQ(r.size(), c.lists_base_allocation ? 2u : 1u) << c.name;
    if (c.lists_base_allocation) {
      EXPECT_EQ(r[0].type, kRepMetaContext);
      EXPECT_EQ(LoadBE32(r[0].data.data()), 0u) << "LIST ids are reserved: 0";
      EXPECT_EQ(std::string(r[0].data.begin() + 4, r[0].data.end()), "base:allocation");
    }
    EXPECT_EQ(r.back().type, kRepAck) << c.name;
  }
}

TEST_F(NegotiateTest, SetMetaContextThenGoEnablesBlockStatus) {
  Start();
  ASSERT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  ASSERT_EQ(Send(kOptSetMetaContext, MetaPayload("disk0", {"base:allocation"})), Step::kContinue);
  Bytes want;
  Append64(want, kOptReplyMagic);
  Append32(want, kOptSetMetaContext);
  Append32(want, kRepMetaContext);
  Append32(want, 4 + 15);
  Append32(want, kBaseAllocationContextId);
  AppendStr(want, "base:allocation");
  Append64(want, kOptReplyMagic);
  Append32(want, kOptSetMetaContext);
  Append32(want, kRepAck);
  Append32(want, 0);
  EXPECT_EQ(out_, want);
  ASSERT_EQ(Send(kOptGo, InfoPayload("disk0", {})), Step::kTransmission);
  EXPECT_TRUE(n_.result().base_allocation);
  EXPECT_EQ(n_.result().base_allocation_id, kBaseAllocationContextId);
}

TEST_F(NegotiateTest, SetMetaContextViaAliasMatchesCanonicalGo) {
  Start();
  ASSERT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  ASSERT_EQ(Send(kOptSetMetaContext, MetaPayload("", {"base:allocation"})), Step::kContinue);
  ASSERT_EQ(Send(kOptExportName, Bytes{'d', 'i', 's', 'k', '0'}), Step::kTransmission);
  EXPECT_TRUE(n_.result().base_allocation);
}

TEST_F(NegotiateTest, MetaContextForAnotherExportIsVoid) {
  Start();
  ASSERT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  ASSERT_EQ(Send(kOptSetMetaContext, MetaPayload("disk0", {"base:allocation"})), Step::kContinue);
  ASSERT_EQ(Send(kOptGo, InfoPayload("ro", {})), Step::kTransmission);
  EXPECT_FALSE(n_.result().base_allocation);
  EXPECT_EQ(n_.result().base_allocation_id, 0u);
}

TEST_F(NegotiateTest, SetMetaContextWildcardOrNoQuerySelectsNothing) {
  for (const std::vector<std::string>& queries :
       {std::vector<std::string>{"base:"}, std::vector<std::string>{}}) {
    FakeCatalog cat;
    Negotiator n(cat);
    ASSERT_TRUE(n.OnClientFlags(kClientFlagFixedNewstyle));
    Bytes out;
    ASSERT_EQ(n.OnOption(kOptStructuredReply, {}, false, out), Step::kContinue);
    out.clear();
    ASSERT_EQ(n.OnOption(kOptSetMetaContext, MetaPayload("disk0", queries), false, out),
              Step::kContinue);
    auto r = ParseReplies(out);
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].type, kRepAck);
    out.clear();
    ASSERT_EQ(n.OnOption(kOptGo, InfoPayload("disk0", {}), false, out), Step::kTransmission);
    EXPECT_FALSE(n.result().base_allocation);
  }
}

TEST_F(NegotiateTest, FailedSetMetaContextClearsEarlierSelection) {
  Start();
  ASSERT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  ASSERT_EQ(Send(kOptSetMetaContext, MetaPayload("disk0", {"base:allocation"})), Step::kContinue);
  EXPECT_EQ(SingleReplyType(kOptSetMetaContext, MetaPayload("nope", {"base:allocation"})),
            kRepErrUnknown);
  ASSERT_EQ(Send(kOptGo, InfoPayload("disk0", {})), Step::kTransmission);
  EXPECT_FALSE(n_.result().base_allocation);
}

TEST_F(NegotiateTest, MalformedMetaContextRequests) {
  Start();
  ASSERT_EQ(SingleReplyType(kOptStructuredReply), kRepAck);
  Bytes query_past_end = MetaPayload("disk0", {"base:allocation"});
  query_past_end.pop_back();
  Bytes too_many_queries = MetaPayload("disk0", {"base:allocation"});
  StoreBE32(&too_many_queries[4 + 5], 2);
  Bytes huge_count = MetaPayload("disk0", {});
  StoreBE32(&huge_count[4 + 5], 0xffffffffu);
  Bytes trailing = MetaPayload("disk0", {"base:allocation"});
  trailing.push_back('x');
  const std::pair<const char*, Bytes> kCases[] = {
      {"empty", {}},
      {"name_only", {0, 0, 0, 0}},
      {"query_past_end", query_past_end},
      {"more_queries_than_fit", too_many_queries},
      {"huge_query_count", huge_count},
      {"trailing_data", trailing},
      {"query_without_namespace", MetaPayload("disk0", {"allocation"})},
      {"empty_namespace", MetaPayload("disk0", {":allocation"})},
      {"long_query", MetaPayload("disk0", {"base:" + std::string(kMaxStringLen, 'a')})},
  };
  for (uint32_t opt : {kOptListMetaContext, kOptSetMetaContext}) {
    for (const auto& [name, payload] : kCases) {
      EXPECT_EQ(SingleReplyType(opt, payload), kRepErrInvalid) << name << " opt " << opt;
    }
    EXPECT_EQ(SingleReplyType(opt, MetaPayload("nope", {})), kRepErrUnknown);
  }
}

TEST_F(NegotiateTest, TooManyOptionsCloses) {
  Start();
  for (uint32_t i = 0; i < kMaxOptionsPerConnection; ++i) {
    ASSERT_EQ(Send(0x4242), Step::kContinue) << i;
  }
  EXPECT_EQ(Send(kOptGo, InfoPayload("disk0", {})), Step::kClose);
  EXPECT_TRUE(out_.empty());
}

// ---- TLS required (the spec's FORCEDTLS mode, our TCP listener) ----

class NegotiateTlsTest : public NegotiateTest {
 protected:
  // Ends with the STARTTLS ACK sent and TLS running, as the frontend does it.
  void StartTls() {
    ASSERT_EQ(Send(kOptStartTls), Step::kStartTls);
    ASSERT_TRUE(n_.OnTlsEstablished());
  }
  Negotiator t_{catalog_, TlsPolicy::kRequired};
};

// The fixture's Send goes to n_; these tests use their own negotiator through this helper.
Step SendTo(Negotiator& n, uint32_t option, const Bytes& payload, Bytes& out) {
  out.clear();
  return n.OnOption(option, payload, false, out);
}

TEST(NegotiateTls, EveryOptionBeforeStartTlsIsRefused) {
  const struct {
    const char* what;
    uint32_t option;
    Bytes payload;
    Step step;
    uint32_t reply;  // 0: nothing is sent
  } kCases[] = {
      {"LIST", kOptList, {}, Step::kContinue, kRepErrTlsReqd},
      {"INFO", kOptInfo, InfoPayload("disk0", {kInfoName}), Step::kContinue, kRepErrTlsReqd},
      {"GO", kOptGo, InfoPayload("disk0", {}), Step::kContinue, kRepErrTlsReqd},
      {"GO unknown", kOptGo, InfoPayload("nope", {}), Step::kContinue, kRepErrTlsReqd},
      {"STRUCTURED_REPLY", kOptStructuredReply, {}, Step::kContinue, kRepErrTlsReqd},
      {"LIST_META", kOptListMetaContext, MetaPayload("disk0", {}), Step::kContinue,
       kRepErrTlsReqd},
      {"SET_META", kOptSetMetaContext, MetaPayload("disk0", {"base:allocation"}),
       Step::kContinue, kRepErrTlsReqd},
      {"PEEK_EXPORT", kOptPeekExport, {}, Step::kContinue, kRepErrTlsReqd},
      {"unknown", 0x4242, {1, 2, 3}, Step::kContinue, kRepErrTlsReqd},
      {"STARTTLS with data", kOptStartTls, {0}, Step::kContinue, kRepErrInvalid},
      {"EXPORT_NAME", kOptExportName, {'d', 'i', 's', 'k', '0'}, Step::kClose, 0},
      {"ABORT", kOptAbort, {}, Step::kClose, kRepAck},
  };
  for (const auto& c : kCases) {
    FakeCatalog cat;
    Negotiator n(cat, TlsPolicy::kRequired);
    ASSERT_TRUE(n.OnClientFlags(kClientFlagFixedNewstyle | kClientFlagNoZeroes));
    Bytes out;
    EXPECT_EQ(SendTo(n, c.option, c.payload, out), c.step) << c.what;
    auto r = ParseReplies(out);
    if (c.reply == 0) {
      EXPECT_TRUE(out.empty()) << c.what;
    } else {
      ASSERT_EQ(r.size(), 1u) << c.what;
      EXPECT_EQ(r[0].option, c.option) << c.what;
      EXPECT_EQ(r[0].type, c.reply) << c.what;
    }
    // Nothing about the exports may leak to a peer that has not authenticated.
    EXPECT_EQ(cat.lookups, 0) << c.what;
    EXPECT_FALSE(n.tls_active()) << c.what;
  }
}

TEST_F(NegotiateTlsTest, StartTlsAcksByteExactThenWaitsForTheHandshake) {
  ASSERT_TRUE(t_.OnClientFlags(kClientFlagFixedNewstyle));
  EXPECT_EQ(SendTo(t_, kOptList, {}, out_), Step::kContinue);  // refused, and the phase goes on
  ASSERT_EQ(SendTo(t_, kOptStartTls, {}, out_), Step::kStartTls);
  Bytes want;
  Append64(want, kOptReplyMagic);
  Append32(want, kOptStartTls);
  Append32(want, kRepAck);
  Append32(want, 0);
  EXPECT_EQ(out_, want);
  // Until the handshake is done, an option is out of sequence (plaintext after STARTTLS).
  EXPECT_EQ(SendTo(t_, kOptStructuredReply, {}, out_), Step::kClose);
  EXPECT_TRUE(out_.empty());
  EXPECT_FALSE(t_.OnTlsEstablished()) << "the out-of-sequence option ended the negotiation";
}

TEST_F(NegotiateTlsTest, AfterTheHandshakeEverythingWorksAndStartTlsIsInvalid) {
  ASSERT_TRUE(t_.OnClientFlags(kClientFlagFixedNewstyle | kClientFlagNoZeroes));
  EXPECT_FALSE(t_.OnTlsEstablished()) << "no STARTTLS yet";
  ASSERT_EQ(SendTo(t_, kOptStartTls, {}, out_), Step::kStartTls);
  ASSERT_TRUE(t_.OnTlsEstablished());
  EXPECT_TRUE(t_.tls_active());
  EXPECT_FALSE(t_.OnTlsEstablished()) << "only once";

  EXPECT_EQ(SendTo(t_, kOptStartTls, {}, out_), Step::kContinue);
  auto r = ParseReplies(out_);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrInvalid);
  EXPECT_EQ(SendTo(t_, kOptList, {}, out_), Step::kContinue);
  r = ParseReplies(out_);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r.back().type, kRepAck);
  EXPECT_EQ(SendTo(t_, kOptStructuredReply, {}, out_), Step::kContinue);
  EXPECT_EQ(SendTo(t_, kOptSetMetaContext, MetaPayload("disk0", {"base:allocation"}), out_),
            Step::kContinue);
  ASSERT_EQ(SendTo(t_, kOptGo, InfoPayload("disk0", {}), out_), Step::kTransmission);
  EXPECT_EQ(t_.result().export_info.name, "disk0");
  EXPECT_TRUE(t_.result().structured_replies);
  EXPECT_TRUE(t_.result().base_allocation);
}

TEST_F(NegotiateTlsTest, ExportNameInsideTls) {
  ASSERT_TRUE(t_.OnClientFlags(kClientFlagFixedNewstyle | kClientFlagNoZeroes));
  ASSERT_EQ(SendTo(t_, kOptStartTls, {}, out_), Step::kStartTls);
  ASSERT_TRUE(t_.OnTlsEstablished());
  ASSERT_EQ(SendTo(t_, kOptExportName, Bytes{'r', 'o'}, out_), Step::kTransmission);
  EXPECT_EQ(out_.size(), 10u);
  EXPECT_TRUE(t_.result().export_info.read_only);
}

TEST_F(NegotiateTlsTest, OversizeOptionsCloseBeforeTlsAndDrainAfter) {
  ASSERT_TRUE(t_.OnClientFlags(kClientFlagFixedNewstyle));
  const struct {
    uint32_t option;
    uint32_t length;
    Action before;
    Action after;
  } kCases[] = {
      {kOptList, 0, Action::kReadPayload, Action::kReadPayload},
      {kOptGo, kMaxOptionLen, Action::kReadPayload, Action::kReadPayload},
      {kOptGo, kMaxOptionLen + 1, Action::kClose, Action::kDrainThenReply},
      {kOptStartTls, kMaxOptionLen + 1, Action::kClose, Action::kDrainThenReply},
      {kOptGo, kMaxDrainOptionLen + 1, Action::kClose, Action::kClose},
  };
  for (const auto& c : kCases) {
    Bytes h = OptionHeader(kIHaveOpt, c.option, c.length);
    EXPECT_EQ(t_.OnOptionHeader(h.data()).action, c.before) << c.option << " " << c.length;
  }
  ASSERT_EQ(SendTo(t_, kOptStartTls, {}, out_), Step::kStartTls);
  ASSERT_TRUE(t_.OnTlsEstablished());
  for (const auto& c : kCases) {
    Bytes h = OptionHeader(kIHaveOpt, c.option, c.length);
    EXPECT_EQ(t_.OnOptionHeader(h.data()).action, c.after) << c.option << " " << c.length;
  }
}

TEST_F(NegotiateTlsTest, DrainedOptionBeforeTlsCloses) {
  ASSERT_TRUE(t_.OnClientFlags(kClientFlagFixedNewstyle));
  out_.clear();
  EXPECT_EQ(t_.OnOption(kOptList, {}, true, out_), Step::kClose);
  EXPECT_TRUE(out_.empty());
}

TEST_F(NegotiateTlsTest, RefusedOptionsCountTowardsTheLimit) {
  ASSERT_TRUE(t_.OnClientFlags(kClientFlagFixedNewstyle));
  for (uint32_t i = 0; i < kMaxOptionsPerConnection; ++i) {
    ASSERT_EQ(SendTo(t_, kOptList, {}, out_), Step::kContinue) << i;
  }
  EXPECT_EQ(SendTo(t_, kOptStartTls, {}, out_), Step::kClose);
  EXPECT_TRUE(out_.empty());
}

TEST_F(NegotiateTest, WithoutTlsPolicyStartTlsNeverStartsTls) {
  Start();
  EXPECT_EQ(SingleReplyType(kOptStartTls), kRepErrPolicy);
  EXPECT_FALSE(n_.OnTlsEstablished());
  EXPECT_FALSE(n_.tls_active());
  EXPECT_EQ(Send(kOptGo, InfoPayload("disk0", {})), Step::kTransmission);
}

TEST(TransmissionFlags, ReadOnlyAndStructuredCombinations) {
  EXPECT_EQ(TransmissionFlags(false, false), 0x096d);
  EXPECT_EQ(TransmissionFlags(false, true), 0x09ed);
  EXPECT_EQ(TransmissionFlags(true, false), 0x010f);
  EXPECT_EQ(TransmissionFlags(true, true), 0x018f);
}

}  // namespace
}  // namespace nbdcsi::nbd
