// A directory laid out the way a Kubernetes secret volume is: tls.crt -> ..data/tls.crt (and
// tls.key, ca.crt), ..data -> ..<version>, and an update writes a new ..<version> directory and
// swaps ..data in one rename(2). This is what cert-manager renewals look like to a pod, and what
// the certificate reload code must follow.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>

namespace nbdcsi::test {

inline std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class SecretDir {
 public:
  explicit SecretDir(std::string dir) : dir_(std::move(dir)) {
    std::filesystem::create_directories(dir_);
  }

  // Publishes a new version with these contents.
  void Version(const std::string& name, const std::string& cert, const std::string& key,
               const std::string& ca) {
    namespace fs = std::filesystem;
    const std::string v = dir_ + "/.." + name;
    fs::create_directories(v);
    std::ofstream(v + "/tls.crt") << cert;
    std::ofstream(v + "/tls.key") << key;
    std::ofstream(v + "/ca.crt") << ca;
    fs::permissions(v + "/tls.key", fs::perms::owner_read | fs::perms::owner_write);
    fs::create_directory_symlink(".." + name, dir_ + "/..data_tmp");
    fs::rename(dir_ + "/..data_tmp", dir_ + "/..data");
    for (const char* f : {"tls.crt", "tls.key", "ca.crt"}) {
      if (!fs::is_symlink(dir_ + "/" + f)) {
        fs::create_symlink(std::string("..data/") + f, dir_ + "/" + f);
      }
    }
  }
  // A version made of make-certs.sh files: DIR/WHO.crt, DIR/WHO.key, CA_DIR/ca.crt.
  void VersionFrom(const std::string& name, const std::string& dir, const std::string& who,
                   const std::string& ca_dir) {
    Version(name, ReadWholeFile(dir + "/" + who + ".crt"), ReadWholeFile(dir + "/" + who + ".key"),
            ReadWholeFile(ca_dir + "/ca.crt"));
  }

  const std::string& dir() const { return dir_; }
  std::string cert() const { return dir_ + "/tls.crt"; }
  std::string key() const { return dir_ + "/tls.key"; }
  std::string ca() const { return dir_ + "/ca.crt"; }

 private:
  std::string dir_;
};

}  // namespace nbdcsi::test
