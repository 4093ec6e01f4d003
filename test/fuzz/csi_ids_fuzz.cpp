// libFuzzer target for CSI volume and snapshot ids (csi/ids.h): every id the controller and the
// node plugin get from the CO goes through ParseVolumeId / ParseSnapshotId before it picks a node
// and a pool name, and every CSI name through PoolNameForCsiName before it becomes a file name.
//
// The input is one string (an id, a CSI name, or "node:name" to format). Checked:
//  - a parsed id formats back to exactly the same bytes, and its parts pass the validators;
//  - the pool name in an accepted id, and every name PoolNameForCsiName makes, is one the pool
//    itself accepts (datapath/pool/rules.h) and whose files stay inside the pool directory;
//  - a volume id is never a snapshot id and the other way round; a backup snapshot id
//    ("b1:s3://...#NAME") parses to a URL and a pool-safe name and formats back (within 128 bytes);
//  - formatting succeeds exactly when both parts are valid, and parses back to them;
//  - PoolNameForCsiName is deterministic, keeps valid names and hashes the others to "h-<32 hex>";
//  - refusals are EINVAL and their messages carry no control bytes (they quote untrusted input
//    into logs).
#include <cerrno>
#include <filesystem>
#include <string>
#include <string_view>

#include "csi/ids.h"
#include "datapath/pool/rules.h"
#include "test/fuzz/fuzz_check.h"

namespace csi = nbdcsi::csi;
namespace dp = nbdcsi::datapath;

namespace {

void CheckMessage(const nbdcsi::Status& s) {
  FUZZ_CHECK(s.code() == EINVAL);
  FUZZ_CHECK(!s.message().empty());
  for (unsigned char c : s.message()) FUZZ_CHECK_MSG(c >= 0x20 && c != 0x7f, s.message());
}

bool NodeChar(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-'; }

// The files a pool name becomes stay directly inside DIR/volumes (or snapshots).
void CheckInsidePool(const std::string& name) {
  FUZZ_CHECK_MSG(dp::ValidateVolumeName(name).ok(), name);
  FUZZ_CHECK_MSG(dp::ValidateSnapshotName(name).ok(), name);
  const std::filesystem::path dir = "/pool/volumes";
  for (const char* ext : {".json", ".img", ".json.tmp"}) {
    const std::filesystem::path p = (dir / (name + ext)).lexically_normal();
    FUZZ_CHECK_MSG(p.parent_path() == dir, p.string());
  }
}

template <typename Ref>
void CheckParsed(const nbdcsi::StatusOr<Ref>& r, std::string_view id, bool volume) {
  if (!r.ok()) return CheckMessage(r.status());
  FUZZ_CHECK(csi::ValidateNodeId(r->node_id).ok());
  FUZZ_CHECK(!r->node_id.empty() && r->node_id.size() <= csi::kMaxNodeIdLen);
  for (char c : r->node_id) FUZZ_CHECK(NodeChar(c));
  FUZZ_CHECK(csi::ValidatePoolName(volume ? "volume" : "snapshot", r->pool_name).ok());
  FUZZ_CHECK(r->pool_name.size() <= csi::kMaxPoolNameLen);
  CheckInsidePool(r->pool_name);
  auto again = volume ? csi::FormatVolumeId(r->node_id, r->pool_name)
                      : csi::FormatSnapshotId(r->node_id, r->pool_name);
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK_MSG(*again == id, *again);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string s(reinterpret_cast<const char*>(data), size);

  auto vol = csi::ParseVolumeId(s);
  auto snap = csi::ParseSnapshotId(s);
  CheckParsed(vol, s, true);
  CheckParsed(snap, s, false);
  FUZZ_CHECK(!(vol.ok() && snap.ok()));

  // "node:name" -> the two ids.
  const size_t colon = s.find(':');
  const std::string node = s.substr(0, colon);
  const std::string name = colon == std::string::npos ? "" : s.substr(colon + 1);
  const bool parts_ok =
      csi::ValidateNodeId(node).ok() && csi::ValidatePoolName("volume", name).ok();
  auto vid = csi::FormatVolumeId(node, name);
  auto sid = csi::FormatSnapshotId(node, name);
  FUZZ_CHECK(vid.ok() == parts_ok && sid.ok() == parts_ok);
  if (parts_ok) {
    auto v = csi::ParseVolumeId(*vid);
    auto sn = csi::ParseSnapshotId(*sid);
    FUZZ_CHECK(v.ok() && v->node_id == node && v->pool_name == name);
    FUZZ_CHECK(sn.ok() && sn->node_id == node && sn->pool_name == name);
    FUZZ_CHECK(!csi::ParseSnapshotId(*vid).ok() && !csi::ParseVolumeId(*sid).ok());
  } else {
    CheckMessage(vid.status());
    CheckMessage(sid.status());
  }

  // Backup snapshot ids (issue 18; a pre-provisioned VolumeSnapshotContent's handle is the CO's
  // input): "b1:s3://BUCKET[/PREFIX]#NAME". An accepted one has a name the pool accepts (it
  // becomes a local snapshot's name) and a URL without '#', spaces or control bytes; it formats
  // back to the same bytes when it fits CSI's 128, and is none of the other kinds.
  auto bk = csi::ParseBackupSnapshotId(s);
  if (bk.ok()) {
    FUZZ_CHECK(csi::IsBackupSnapshotId(s));
    FUZZ_CHECK(!vol.ok() && !snap.ok() && !csi::ParseReplicatedVolumeId(s).ok());
    FUZZ_CHECK(bk->url.starts_with("s3://") && bk->url.size() > 5 && bk->url[5] != '/');
    for (unsigned char c : bk->url) FUZZ_CHECK(c > 0x20 && c != 0x7f && c != '#');
    FUZZ_CHECK(csi::ValidatePoolName("backup", bk->name).ok());
    CheckInsidePool(bk->name);
    auto again = csi::FormatBackupSnapshotId(bk->url, bk->name);
    if (s.size() <= csi::kMaxIdLen) {
      FUZZ_CHECK(again.ok());
      FUZZ_CHECK_MSG(*again == s, *again);
    } else {
      FUZZ_CHECK(!again.ok());
      CheckMessage(again.status());
    }
  } else {
    CheckMessage(bk.status());
  }

  // A CSI name as CreateVolume / CreateSnapshot get it.
  auto pn = csi::PoolNameForCsiName(s);
  if (s.empty()) {
    FUZZ_CHECK(!pn.ok());
    CheckMessage(pn.status());
    return 0;
  }
  FUZZ_CHECK_MSG(pn.ok(), pn.status().message());
  auto pn2 = csi::PoolNameForCsiName(s);
  FUZZ_CHECK(pn2.ok() && *pn2 == *pn);
  FUZZ_CHECK(csi::ValidatePoolName("volume", *pn).ok());
  CheckInsidePool(*pn);
  if (csi::ValidatePoolName("volume", s).ok()) {
    FUZZ_CHECK(*pn == s);
  } else {
    FUZZ_CHECK(pn->size() == 34 && pn->rfind("h-", 0) == 0);
    for (char c : pn->substr(2)) FUZZ_CHECK((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  }
  return 0;
}
