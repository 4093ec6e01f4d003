#!/usr/bin/env bash
# Builds the nbd-csi container image without a registry or a container engine: a Debian 12 root
# file system made from Debian's packages (mmdebstrap), the binaries of scripts/build.sh, then an
# OCI image (umoci) and a docker-archive tarball (skopeo) that `podman load`, `docker load` and
# `ctr -n k8s.io images import` accept. The Dockerfile builds the same image where a registry is
# reachable; both take the package list and the finishing steps from this script, so the two
# cannot drift (test/image checks that they list the same files).
#
#   scripts/build-image.sh [--version V] [--revision R] [--source URL] [--licenses SPDX]
#                          [--out DIR] [--bin DIR]
#       -> DIR/oci (OCI layout, tag V), DIR/nbd-csi-V.tar (docker-archive, image nbd-csi:V)
#          defaults: V = the project version, R = git HEAD, URL = git's origin remote (empty
#          without one), SPDX = NOASSERTION (the repository states no license yet),
#          DIR = build/image, binaries from build/bin (scripts/build.sh runs when missing)
#   scripts/build-image.sh base OUT.tar
#       a stand-in for debian:bookworm-slim made the same way, for `podman import` where the
#       registry is out of reach (test/image/image_test.sh builds the Dockerfile against it)
#   scripts/build-image.sh packages BINDIR     the Debian runtime packages, one per line
#   scripts/build-image.sh stage BINDIR OUT    stripped binaries + package list (Dockerfile)
#   scripts/build-image.sh finish ROOT STAGE   user, binaries, clean-up inside ROOT (both paths)
#   scripts/build-image.sh clean [DIR]         remove what a killed build left in DIR/work,
#                                              unmounting the chroot's mounts in it first
#
# Needs root (mmdebstrap --mode=root) and mmdebstrap, umoci, skopeo: scripts/deps.sh image.
# Downloaded .debs are kept in ${NBDCSI_TOOLS_DIR:-/var/cache/nbd-csi-tools}/image-debs.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)

# The four programs in the image, and the tools the node plugin and the datapath run:
# mkfs/resize (e2fsprogs, xfsprogs), blkid/losetup/mount for operators (util-linux, mount),
# modprobe nbd (kmod), the fallback attach path without nbd.ko (nbdfuse, fusermount3), and the
# etcd the chart deploys for replicated volumes (etcd-server: one image to pull, not two).
BINARIES=(nbd-datapathd nbd-csi-controller nbd-csi-node nbdctl)
TOOL_PKGS=(e2fsprogs xfsprogs util-linux mount kmod libnbd-bin fuse3 etcd-server)
# The controller's user (the chart runs the controller pod as this uid, never as root).
IMAGE_UID=10001
IMAGE_USER=nbd-csi
SUITE=bookworm
# Like debian:bookworm-slim: no documentation, manuals or translations, except the copyright
# files. dpkg keeps honouring these for every later package, in both build paths.
DPKG_OPTS=(
  'path-exclude=/usr/share/doc/*'
  'path-include=/usr/share/doc/*/copyright'
  'path-exclude=/usr/share/man/*'
  'path-exclude=/usr/share/groff/*'
  'path-exclude=/usr/share/info/*'
  'path-exclude=/usr/share/lintian/*'
  'path-exclude=/usr/share/linda/*'
  'path-exclude=/usr/share/locale/*'
)

die() { echo "build-image: $*" >&2; exit 1; }

# Unmounts what an interrupted mmdebstrap left mounted under DIR (the chroot's /proc, /sys,
# /dev/pts, /dev/shm): rm -rf would otherwise descend into the host's. DIR must be an existing
# directory inside the output directory (OUT_ROOT, never /): nothing that could cover the host's
# own mounts.
unmount_under() {  # DIR
  local d m
  [ -d "$1" ] || return 0
  d=$(realpath -e -- "$1") || die "unmount_under: cannot resolve $1"
  case $d in
    "${OUT_ROOT:?}"/?*) ;;
    *) die "unmount_under: $d is not inside the output directory $OUT_ROOT: refusing to unmount under it" ;;
  esac
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || die "cannot unmount $m, left mounted in $d"
    echo "build-image: unmounted $m (left by an interrupted build)" >&2
  done < <(awk -v d="$d/" 'substr($5, 1, length(d)) == d {print $5}' /proc/self/mountinfo | sort -r)
}
remove_tree() {  # DIR...
  local d
  for d in "$@"; do
    [ -e "$d" ] || continue
    [ -d "$d" ] && unmount_under "$d"
    rm -rf --one-file-system "$d"
  done
}

project_version() {
  sed -n 's/^project(nbd-csi VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt"
}

# Debian packages that hold the shared libraries the binaries load (ldd, then dpkg -S), plus the
# tools. Computed rather than listed so that a new library dependency cannot be forgotten.
packages() {
  local bindir=$1 b libs=() lib pkg
  for b in "${BINARIES[@]}"; do
    [ -x "$bindir/$b" ] || die "$bindir/$b is missing (scripts/build.sh)"
    ldd "$bindir/$b" | grep -q 'not found' && die "$bindir/$b: $(ldd "$bindir/$b" | grep 'not found')"
    while read -r lib; do libs+=("$lib"); done < <(ldd "$bindir/$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
  done
  {
    for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
      # dpkg knows a library by the path its package installed; with merged /usr that may be
      # /lib/... or /usr/lib/..., and ldd may report either.
      pkg=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$(readlink -f "$lib")" 2>/dev/null ||
            dpkg -S "${lib#/usr}" 2>/dev/null || dpkg -S "/usr$lib" 2>/dev/null) ||
        die "no Debian package holds $lib"
      echo "${pkg%%:*}"
    done
    printf '%s\n' "${TOOL_PKGS[@]}"
  } | sed 's/:[a-z0-9]*$//' | sort -u
}

# The binaries as they go into the image (no debug information) and the package list.
stage() {
  local bindir=$1 out=$2 b
  mkdir -p "$out/bin"
  for b in "${BINARIES[@]}"; do
    strip --strip-unneeded -o "$out/bin/$b" "$bindir/$b"
    chmod 0755 "$out/bin/$b"
  done
  packages "$bindir" >"$out/packages"
  cp "$src/scripts/build-image.sh" "$out/build-image.sh"
}

# The steps after the packages, the same in the Dockerfile (ROOT=/) and under mmdebstrap.
finish() {
  local root=$1 stage=$2 b
  for b in "${BINARIES[@]}"; do
    install -m 0755 "$stage/bin/$b" "$root/usr/local/bin/$b"
  done
  if ! grep -q "^$IMAGE_USER:" "$root/etc/passwd"; then
    # A system account (no lastlog or faillog entry) above the system range, so that it
    # cannot collide with one a package creates.
    useradd --root "$root" --system -K SYS_UID_MAX=$IMAGE_UID -K SYS_GID_MAX=$IMAGE_UID \
      --uid $IMAGE_UID --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$IMAGE_USER"
  fi
  # The controller writes nothing but its socket (an emptyDir); the node plugin and the
  # datapath make their directories on host paths. Nothing else in the image is per-run.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root"/etc/passwd- \
    "$root"/etc/group- "$root"/etc/shadow- "$root"/etc/gshadow- "$root"/var/log/apt/* \
    "$root"/var/log/dpkg.log "$root"/var/log/alternatives.log "$root"/var/cache/ldconfig/aux-cache
}

# The host's own apt sources when they describe this suite: the image gets the same package
# versions as the libraries the binaries were linked against on this machine.
mirror_args() {
  local f
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ] && grep -qw "$SUITE" "$f"; then echo "$f"; return; fi
  done
  echo "deb http://deb.debian.org/debian $SUITE main"
  echo "deb http://deb.debian.org/debian $SUITE-updates main"
  echo "deb http://deb.debian.org/debian-security $SUITE-security main"
}

# mmdebstrap ROOT [--include=...] [extra args]: a minbase Debian 12 with the slim dpkg rules.
debstrap() {
  local target=$1; shift
  local cache=${NBDCSI_TOOLS_DIR:-/var/cache/nbd-csi-tools}/image-debs o args=() m
  mkdir -p "$cache"
  for o in "${DPKG_OPTS[@]}"; do args+=(--dpkgopt="$o"); done
  local mirrors=()
  while read -r m; do mirrors+=("$m"); done < <(mirror_args)
  # The .debs are kept between runs (mmdebstrap's sync-in/sync-out recipe): a rebuild then
  # downloads nothing that did not change. Merged /usr as Debian's own images have it
  # (directory symlinks and usr-is-merged): otherwise apt satisfies init-system-helpers with
  # the usrmerge package, which pulls in perl.
  mmdebstrap --mode=root --variant=minbase --skip=essential/unlink --quiet \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in $cache /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $cache" \
    "${args[@]}" "$@" "$SUITE" "$target" "${mirrors[@]}"
}

need_tools() {
  local t missing=()
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run scripts/deps.sh image"
  [ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root unpacks packages as root)"
}

build() {
  local version revision source licenses=NOASSERTION out bindir
  version=$(project_version); revision=$(git -C "$src" rev-parse HEAD 2>/dev/null || echo unknown)
  source=$(git -C "$src" config --get remote.origin.url 2>/dev/null || true)
  out=$src/build/image; bindir=$src/build/bin
  while [ $# -gt 0 ]; do
    case $1 in
      --version) version=$2; shift 2 ;;
      --revision) revision=$2; shift 2 ;;
      --source) source=$2; shift 2 ;;
      --licenses) licenses=$2; shift 2 ;;
      --out) out=$2; shift 2 ;;
      --bin) bindir=$2; shift 2 ;;
      *) die "unknown argument $1 (see the header of $0)" ;;
    esac
  done
  [[ $version =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--version $version is not a valid image tag"
  need_tools mmdebstrap umoci skopeo strip
  if [ ! -x "$bindir/nbd-datapathd" ] && [ "$bindir" = "$src/build/bin" ]; then
    "$src/scripts/build.sh"
  fi
  mkdir -p "$out"
  OUT_ROOT=$(realpath -e -- "$out")
  [ "$OUT_ROOT" != / ] || die "--out / is not an output directory"
  local work=$out/work
  remove_tree "$work" "$out/oci" "$out/nbd-csi-$version.tar"
  mkdir -p "$work"
  # Also when mmdebstrap is killed (a test's timeout): nothing stays mounted in the build tree.
  # shellcheck disable=SC2064  # $work is local: expanded now
  trap "unmount_under $(printf %q "$work") 2>/dev/null || true" EXIT
  trap 'exit 143' TERM INT
  stage "$bindir" "$work/stage"
  local pkgs
  pkgs=$(paste -sd, "$work/stage/packages")
  echo "build-image: packages: ${pkgs//,/ }" >&2

  umoci init --layout "$out/oci"
  umoci new --image "$out/oci:base"
  umoci unpack --image "$out/oci:base" "$work/bundle"
  rmdir "$work/bundle/rootfs"
  local t0=$SECONDS
  debstrap "$work/bundle/rootfs" --include="$pkgs" \
    --customize-hook="copy-in $work/stage /tmp" \
    --customize-hook='chroot "$1" bash /tmp/stage/build-image.sh finish / /tmp/stage' \
    --customize-hook='rm -rf "$1"/tmp/stage' >"$work/mmdebstrap.log" 2>&1 ||
    { tail -40 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $work/mmdebstrap.log)"; }
  echo "build-image: root file system in $((SECONDS - t0)) s" >&2
  t0=$SECONDS
  umoci repack --image "$out/oci:base" "$work/bundle"
  local c=(--image "$out/oci:base" --tag "$version" --os linux --architecture amd64
    --author "nbd-csi project"
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    --config.cmd nbdctl --config.cmd --help --config.workingdir /
    --config.label org.opencontainers.image.title=nbd-csi
    --config.label "org.opencontainers.image.description=nbd.csi.io CSI driver: nbd-datapathd, nbd-csi-controller, nbd-csi-node, nbdctl"
    --config.label org.opencontainers.image.version="$version"
    --config.label org.opencontainers.image.revision="$revision"
    --config.label org.opencontainers.image.source="$source"
    --config.label org.opencontainers.image.licenses="$licenses")
  umoci config "${c[@]}"
  umoci rm --image "$out/oci:base"
  umoci gc --layout "$out/oci"
  skopeo copy --quiet "oci:$out/oci:$version" "docker-archive:$out/nbd-csi-$version.tar:nbd-csi:$version"
  echo "build-image: OCI image and docker-archive in $((SECONDS - t0)) s" >&2
  remove_tree "$work"
  # Compressed size: what a registry stores and a node downloads (the layout's gzip blobs).
  local bytes
  bytes=$(compressed_size "$out/oci" "$version")
  echo "build-image: nbd-csi:$version: $out/oci (OCI), $out/nbd-csi-$version.tar (docker-archive); compressed $((bytes / 1048576)) MiB ($bytes bytes)"
}

# Sum of the config and layer blobs of TAG in an OCI layout.
compressed_size() {
  python3 - "$1" "$2" <<'PY'
import json, os, sys
lay, tag = sys.argv[1], sys.argv[2]
blob = lambda d: os.path.join(lay, "blobs", *d.split(":"))
idx = json.load(open(os.path.join(lay, "index.json")))
m = next(m for m in idx["manifests"]
         if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
man = json.load(open(blob(m["digest"])))
print(sum(x["size"] for x in [man["config"]] + man["layers"]))
PY
}

# What an interrupted build left in OUT (default build/image): its work tree, unmounting first
# whatever mmdebstrap had mounted in it.
clean() {
  local out=${1:-$src/build/image}
  [ -d "$out" ] || return 0
  OUT_ROOT=$(realpath -e -- "$out")
  [ "$OUT_ROOT" != / ] || die "clean /: not an output directory"
  remove_tree "$out/work"
}

base() {
  local out=${1:?usage: build-image.sh base OUT.tar}
  need_tools mmdebstrap
  debstrap "$out" >"$out.log" 2>&1 \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin "$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log' ||
    { tail -40 "$out.log" >&2; die "mmdebstrap failed (log: $out.log)"; }
  rm -f "$out.log"
}

case ${1:-} in
  packages) packages "${2:?usage: build-image.sh packages BINDIR}" ;;
  stage) stage "${2:?BINDIR}" "${3:?OUT}" ;;
  finish) finish "${2:?ROOT}" "${3:?STAGE}" ;;
  base) base "${2:-}" ;;
  clean) clean "${2:-}" ;;
  ""|--*) build "$@" ;;
  *) die "unknown command $1 (see the header of $0)" ;;
esac
