#!/usr/bin/env bash
# Prints the path of an s3rver executable (an S3-compatible server in Node.js, from the npm
# registry), installing it once into a cache directory. The backup integration test
# (test/integration/backup_s3.sh) runs it on the loopback as the object store.
#
#   scripts/get-s3rver.sh            prints the path (exit 0), or says why not on stderr (exit 1)
#   scripts/get-s3rver.sh --check    prints the path only if it is installed already (no npm)
#
# Environment: NBDCSI_TOOLS_DIR   cache directory (default /var/cache/nbd-csi-tools when
#                                 writable, else ${XDG_CACHE_HOME:-~/.cache}/nbd-csi-tools)
#              S3RVER             use this s3rver instead (no install)
set -euo pipefail

PKG=s3rver
PKG_VERSION=3.7.1

die() { echo "get-s3rver: $*" >&2; exit 1; }

if [ -n "${S3RVER:-}" ]; then
  [ -x "$S3RVER" ] || die "S3RVER=$S3RVER is not an executable"
  echo "$S3RVER"
  exit 0
fi

. "$(dirname "$0")/lib/tools-dir.sh"
dir=$(nbdcsi_tools_dir)/s3rver-$PKG_VERSION
bin=$dir/node_modules/.bin/s3rver

installed() { [ -x "$bin" ] && [ -f "$dir/.complete" ]; }

if installed; then
  echo "$bin"
  exit 0
fi
[ "${1:-}" = --check ] && die "not installed in $dir (run scripts/get-s3rver.sh)"

mkdir -p "$dir" || die "cannot create $dir"
# Tests run in parallel: one installs, the others wait for it.
exec 9>"$dir/.lock"
flock 9
if installed; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || die "npm is needed to install s3rver (apt-get install npm), or set S3RVER"
command -v node >/dev/null || die "node is needed to run s3rver (apt-get install nodejs)"
# npm checks every tarball against the registry's integrity hashes; the version is pinned.
npm install --prefix "$dir" --no-audit --no-fund --silent "$PKG@$PKG_VERSION" >"$dir/.install.log" 2>&1 ||
  die "npm install $PKG@$PKG_VERSION failed: $(tail -n 5 "$dir/.install.log")"
[ -x "$bin" ] || die "npm installed $PKG but there is no $bin"
touch "$dir/.complete"
echo "$bin"
