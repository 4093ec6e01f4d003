// The S3 client's pure helpers (datapath/backup/s3_store.h): the target URL and the XML text of
// listings. The requests themselves and their SigV4 signatures are checked against a verifying
// proxy in test/integration/backup_sigv4.sh.
#include <gtest/gtest.h>

#include "datapath/backup/s3_store.h"

namespace nbdcsi::datapath::backup {
namespace {

TEST(XmlUnescape, NamedEntities) {
  EXPECT_EQ(XmlUnescape("a&amp;b&lt;c&gt;d&quot;e&apos;f"), "a&b<c>d\"e'f");
  EXPECT_EQ(XmlUnescape("plain/key+=~"), "plain/key+=~");
}

// s3rver lists a key holding ' as &#x27; (found by backup_sigv4.sh: a prefix with ' listed
// keys one byte off, "backup name \"ests/b1\""); S3 writes control characters this way.
TEST(XmlUnescape, CharacterReferences) {
  EXPECT_EQ(XmlUnescape("x!y&#x27;z*@$&amp;;:/manifests/b1.json"), "x!y'z*@$&;:/manifests/b1.json");
  EXPECT_EQ(XmlUnescape("&#39;&#X27;&#x0D;&#13;"), "''\r\r");
  EXPECT_EQ(XmlUnescape("&#xE9;"), "\xC3\xA9");             // U+00E9, 2 bytes
  EXPECT_EQ(XmlUnescape("&#x20AC;"), "\xE2\x82\xAC");       // U+20AC, 3 bytes
  EXPECT_EQ(XmlUnescape("&#128512;"), "\xF0\x9F\x98\x80");  // U+1F600, 4 bytes
}

TEST(XmlUnescape, MalformedReferencesStayAsText) {
  EXPECT_EQ(XmlUnescape("&#;"), "&#;");
  EXPECT_EQ(XmlUnescape("&#x;"), "&#x;");
  EXPECT_EQ(XmlUnescape("&#12"), "&#12");
  EXPECT_EQ(XmlUnescape("&#xZZ;"), "&#xZZ;");
  EXPECT_EQ(XmlUnescape("&#0;"), "&#0;");
  EXPECT_EQ(XmlUnescape("&#xD800;"), "&#xD800;");      // a surrogate is no character
  EXPECT_EQ(XmlUnescape("&#x110000;"), "&#x110000;");  // beyond Unicode
  EXPECT_EQ(XmlUnescape("&#x0000000041;"), "&#x0000000041;");
  EXPECT_EQ(XmlUnescape("a & b &unknown;"), "a & b &unknown;");
}

TEST(ParseS3Url, PrefixWithCharactersToEncode) {
  auto u = ParseS3Url("s3://backups/site a+b/night=ly~(1),x!y'z*@$&;:/");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->bucket, "backups");
  EXPECT_EQ(u->prefix, "site a+b/night=ly~(1),x!y'z*@$&;:");
  EXPECT_FALSE(ParseS3Url("s3://backups//x").ok());
  EXPECT_FALSE(ParseS3Url("s3://Backups/x").ok());
}

}  // namespace
}  // namespace nbdcsi::datapath::backup
