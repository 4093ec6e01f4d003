#!/usr/bin/env bash
# The images test/e2e/e2e.sh needs besides nbd-csi itself, made offline with umoci and skopeo as
# docker-archive tarballs (for `ctr -n k8s.io images import`, `kind load image-archive`, ...):
#   - the CSI sidecars, wrapped from the static binaries the bundled cluster ships, under their
#     real names and versions (registry.local/sig-storage/NAME:VERSION);
#   - the workload image: busybox plus fio (with its shared libraries) for the pods of the walk.
#
#   images.sh sidecars OUTDIR K8S_BIN   -> OUTDIR/NAME.tar, one line "NAME IMAGE ARCHIVE" each
#   images.sh workload OUTDIR           -> OUTDIR/workload.tar, one line "workload IMAGE ARCHIVE"
# An archive that exists and is newer than its inputs is reused.
set -euo pipefail

die() { echo "images.sh: $*" >&2; exit 1; }
for t in umoci skopeo; do command -v $t >/dev/null || die "needs $t (scripts/deps.sh image)"; done

# name binary version: the versions are the bundled cluster's (its README); --version confirms
# them where the binary has the flag (livenessprobe has none).
SIDECARS="csi-provisioner v3.4.1
csi-snapshotter v6.2.3
csi-resizer v1.7.0
csi-node-driver-registrar v2.7.0
livenessprobe v2.9.0"

fresh() {  # archive inputs...: the archive exists and is newer than every input
  local a=$1 i; shift
  [ -s "$a" ] || return 1
  for i in "$@"; do [ "$i" -nt "$a" ] && return 1; done
  return 0
}

# mkimage NAME IMAGE ARCHIVE POPULATE-FUNCTION CONFIG-ARGS...
mkimage() {
  local name=$1 image=$2 archive=$3 populate=$4; shift 4
  local w
  w=$(mktemp -d "${archive%.tar}.XXXXXX")
  umoci init --layout "$w/oci" >/dev/null
  umoci new --image "$w/oci:img" >/dev/null
  umoci unpack --image "$w/oci:img" "$w/b" >/dev/null
  "$populate" "$w/b/rootfs"
  umoci repack --image "$w/oci:img" "$w/b" >/dev/null
  umoci config --image "$w/oci:img" --os linux --architecture amd64 "$@" >/dev/null
  skopeo copy --quiet "oci:$w/oci:img" "docker-archive:$archive.tmp:$image"
  mv -f "$archive.tmp" "$archive"
  rm -rf "$w"
  echo "$name $image $archive"
}

sidecars() {
  local out=$1 kbin=$2 name version got
  mkdir -p "$out"
  while read -r name version; do
    [ -x "$kbin/$name" ] || die "$kbin/$name is missing (the bundled cluster's setup.sh unpacks it)"
    got=$("$kbin/$name" --version 2>/dev/null | awk '{print $NF}' || true)
    if [ -n "$got" ] && [ "$got" != "$version" ]; then
      die "$kbin/$name is $got, expected $version (update SIDECARS in $0)"
    fi
    local image=registry.local/sig-storage/$name:$version archive=$out/$name.tar
    if fresh "$archive" "$kbin/$name" "$0"; then echo "$name $image $archive"; continue; fi
    populate() { install -D -m 0755 "$kbin/$name" "$1/$name"; }
    # The sidecars run as the pod says (the controller pod: the image's non-root user).
    mkimage "$name" "$image" "$archive" populate --config.entrypoint "/$name"
  done <<<"$SIDECARS"
}

# busybox (applets as symlinks) and fio with every library ldd names, at the same paths.
populate_workload() {
  local r=$1 a lib fio
  fio=$(command -v fio) || die "needs fio (scripts/deps.sh test)"
  [ -x /bin/busybox ] || die "needs /bin/busybox (busybox-static)"
  mkdir -p "$r/bin" "$r/tmp" "$r/etc" "$r/data"
  chmod 1777 "$r/tmp"
  install -m 0755 /bin/busybox "$r/bin/busybox"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$r/bin/$a"; done
  install -m 0755 "$fio" "$r/bin/fio"
  for lib in $(ldd "$fio" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do
    install -D -m 0755 "$(readlink -f "$lib")" "$r$lib"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
}

workload() {
  local out=$1 fio ver image archive
  mkdir -p "$out"
  fio=$(command -v fio) || die "needs fio (scripts/deps.sh test)"
  ver=$("$fio" --version | tr -c 'A-Za-z0-9_.\n-' '-')
  image=registry.local/nbd-csi-e2e-workload:$ver
  archive=$out/workload.tar
  if fresh "$archive" "$fio" /bin/busybox "$0"; then echo "workload $image $archive"; return; fi
  mkimage workload "$image" "$archive" populate_workload \
    --config.cmd /bin/sh --config.env PATH=/bin
}

case ${1:-} in
  sidecars) sidecars "${2:?OUTDIR}" "${3:?K8S_BIN}" ;;
  workload) workload "${2:?OUTDIR}" ;;
  *) die "usage: images.sh sidecars OUTDIR K8S_BIN | workload OUTDIR" ;;
esac
