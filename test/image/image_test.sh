#!/usr/bin/env bash
# The container image (ctest -L image): built by scripts/build-image.sh (mmdebstrap + umoci, no
# registry), then checked from the inside, and compared with the Dockerfile's image.
#
#   image_test.sh build       build the image when a binary or the script is newer than it
#   image_test.sh ldd         every binary's libraries resolve inside the image (ldd in a chroot
#                             of the unpacked root file system) and each one starts (--help)
#   image_test.sh tools       the tools the node plugin and the datapath run are on PATH
#   image_test.sh user        the controller's user: non-root, in the image, the chart's runAsUser
#   image_test.sh size        compressed size under IMAGE_SIZE_LIMIT_MIB (default 150)
#   image_test.sh labels      OCI labels; the Dockerfile's default VERSION is the project's
#   image_test.sh cleanup     build-image.sh clean unmounts what a killed build left mounted in
#                             its work tree, and nothing else (in a private mount namespace)
#   image_test.sh dockerfile  podman builds the Dockerfile against a local Debian 12 base (no
#                             registry here) and the two images hold the same files and packages
# Needs root (chroot, mmdebstrap); without it, or without a tool, the test is skipped (77)
# unless CI=true.
set -euo pipefail
src=${NBDCSI_SRC:?NBDCSI_SRC is set by CTest}
bin=${NBDCSI_BIN:?NBDCSI_BIN is set by CTest}
what=${1:?usage: image_test.sh build|ldd|tools|user|size|labels|cleanup|dockerfile}
out=$(dirname "$bin")/image
version=$(sed -n 's/^project(nbd-csi VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
archive=$out/nbd-csi-$version.tar
limit_mib=${IMAGE_SIZE_LIMIT_MIB:-150}
BINARIES=(nbd-datapathd nbd-csi-controller nbd-csi-node nbdctl)

skip_or_fail() {
  if [ "${CI:-}" = true ]; then echo "FAIL: $*" >&2; exit 1; fi
  echo "SKIP: $*" >&2
  exit 77
}
fail() { echo "FAIL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || skip_or_fail "needs root (mmdebstrap, chroot)"
"$src/scripts/deps.sh" image >/dev/null 2>"$out.deps.err" || skip_or_fail "scripts/deps.sh image: $(cat "$out.deps.err")"
rm -f "$out.deps.err"

# The archive must be this tree's: made from the binaries under test.
stale() {
  [ -s "$archive" ] && [ -d "$out/oci" ] || return 0
  local f
  for f in "${BINARIES[@]/#/$bin/}" "$src/scripts/build-image.sh"; do
    [ "$f" -nt "$archive" ] && return 0
  done
  return 1
}

# The image's root file system, unpacked once per archive.
rootfs() {
  local r=$out/rootfs
  if [ ! -d "$r/rootfs/usr" ] || [ "$archive" -nt "$r/.unpacked" ]; then
    rm -rf "$r"
    umoci unpack --image "$out/oci:$version" "$r" >/dev/null
    touch "$r/.unpacked"
  fi
  echo "$r/rootfs"
}

oci_config() {  # prints the image configuration (JSON) of a tag in an OCI layout
  python3 - "$1" "$2" <<'PY'
import json, os, sys
lay, tag = sys.argv[1], sys.argv[2]
blob = lambda d: os.path.join(lay, "blobs", *d.split(":"))
idx = json.load(open(os.path.join(lay, "index.json")))
m = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
print(open(blob(json.load(open(blob(m["digest"])))["config"]["digest"])).read())
PY
}

case $what in
  build)
    if stale || [ "${IMAGE_REBUILD:-}" = 1 ]; then
      "$src/scripts/build-image.sh" --bin "$bin" --out "$out"
    else
      echo "ok: $archive is newer than the binaries and scripts/build-image.sh: kept"
    fi
    [ -s "$archive" ] || fail "no $archive"
    tar -tf "$archive" manifest.json >/dev/null || fail "$archive is not a docker-archive"
    python3 - "$archive" "$version" <<'PY'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
m = json.load(t.extractfile("manifest.json"))
tags = [x for e in m for x in e["RepoTags"]]
want = f"nbd-csi:{sys.argv[2]}"
assert any(x in (want, "docker.io/library/" + want) for x in tags), tags
print(f"ok: docker-archive names {tags}")
PY
    ;;

  ldd)
    stale && fail "the image is older than the binaries: run image.build first"
    r=$(rootfs)
    for b in "${BINARIES[@]}"; do
      [ -x "$r/usr/local/bin/$b" ] || fail "/usr/local/bin/$b is not in the image"
      chroot "$r" ldd "/usr/local/bin/$b" >"$out/ldd.txt" 2>&1 || { cat "$out/ldd.txt"; fail "ldd $b failed in the image"; }
      if grep -q 'not found' "$out/ldd.txt"; then
        grep 'not found' "$out/ldd.txt"; fail "$b: libraries missing in the image"
      fi
      chroot "$r" "/usr/local/bin/$b" --help >/dev/null 2>"$out/help.err" ||
        { cat "$out/help.err"; fail "$b --help fails in the image"; }
      echo "ok: $b: $(grep -c '=>' "$out/ldd.txt") libraries resolve in the image; --help runs"
    done
    # The image's copies are the binaries under test, stripped of their debug information.
    for b in "${BINARIES[@]}"; do
      strip --strip-unneeded -o "$out/$b.stripped" "$bin/$b"
      cmp -s "$out/$b.stripped" "$r/usr/local/bin/$b" ||
        { rm -f "$out/$b.stripped"; fail "/usr/local/bin/$b is not $bin/$b stripped: the image holds another build"; }
      rm -f "$out/$b.stripped"
    done
    echo "ok: the image's binaries are $bin's, stripped" ;;

  tools)
    stale && fail "the image is older than the binaries: run image.build first"
    r=$(rootfs)
    # mkfs and online resize (node plugin), modprobe nbd, nbdfuse + fusermount3 and losetup
    # (datapath fallback without nbd.ko), blkid/mount for operators, etcd (the chart's cluster
    # mode runs it from this image).
    for t in mkfs.ext4 mkfs.xfs resize2fs xfs_growfs e2fsck xfs_repair modprobe nbdfuse fusermount3 \
             losetup blkid mount umount findmnt sh etcd; do
      p=$(chroot "$r" sh -c "command -v $t") || fail "$t is not on the image's PATH"
      echo "ok: $t: $p"
    done
    chroot "$r" nbdfuse --version >/dev/null || fail "nbdfuse does not run in the image"
    chroot "$r" etcd --version >/dev/null || fail "etcd does not run in the image"
    chroot "$r" mkfs.xfs -V >/dev/null || fail "mkfs.xfs does not run in the image"
    # mkfs into a file inside the image proves the tools and their libraries work.
    truncate -s 300M "$r/tmp/fs.img"
    chroot "$r" mkfs.xfs -q /tmp/fs.img && chroot "$r" mkfs.ext4 -q -F /tmp/fs.img ||
      { rm -f "$r/tmp/fs.img"; fail "mkfs in the image failed"; }
    rm -f "$r/tmp/fs.img"
    echo "ok: mkfs.xfs and mkfs.ext4 make file systems inside the image" ;;

  user)
    stale && fail "the image is older than the binaries: run image.build first"
    r=$(rootfs)
    line=$(grep '^nbd-csi:' "$r/etc/passwd") || fail "no nbd-csi user in the image's /etc/passwd"
    uid=$(echo "$line" | cut -d: -f3); gid=$(echo "$line" | cut -d: -f4)
    [ "$uid" -gt 0 ] && [ "$gid" -gt 0 ] || fail "nbd-csi is uid $uid gid $gid: must not be root"
    grep -q "^nbd-csi:x:$gid:" "$r/etc/group" || fail "no group $gid in the image"
    # The chart runs the controller pod as this user.
    python3 - "$src/charts/nbd-csi/values.yaml" "$uid" "$gid" <<'PY' || fail "the chart's controller user is not the image's"
import sys, yaml
v = yaml.safe_load(open(sys.argv[1]))["controller"]
uid, gid = int(sys.argv[2]), int(sys.argv[3])
assert v["runAsUser"] == uid and v["runAsGroup"] == gid, (v["runAsUser"], v["runAsGroup"], uid, gid)
print(f"ok: charts/nbd-csi controller.runAsUser/runAsGroup = {uid}/{gid}, the image's nbd-csi user")
PY
    # As that user, the controller starts and reads a group-readable key (the chart's secret:
    # mode 0440, group fsGroup), and cannot write the image.
    chroot --userspec="$uid:$gid" "$r" nbd-csi-controller --help >/dev/null || fail "nbd-csi-controller does not run as $uid"
    install -m 0440 -o 0 -g "$gid" /dev/null "$r/tmp/tls.key"
    chroot --userspec="$uid:$gid" "$r" cat /tmp/tls.key || { rm -f "$r/tmp/tls.key"; fail "uid $uid cannot read a 0440 file of group $gid"; }
    rm -f "$r/tmp/tls.key"
    if chroot --userspec="$uid:$gid" "$r" sh -c 'touch /usr/local/bin/x' 2>/dev/null; then
      rm -f "$r/usr/local/bin/x"; fail "uid $uid can write /usr/local/bin"
    fi
    user=$(oci_config "$out/oci" "$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"].get("User", ""))')
    case $user in ""|root|0|0:0) ;; *) fail "image user $user: the node plugin and datapath need root (the chart runs only the controller as $uid)";; esac
    echo "ok: user nbd-csi $uid:$gid runs the controller; the image's default user is root (node plugin, datapath)" ;;

  size)
    stale && fail "the image is older than the binaries: run image.build first"
    bytes=$(python3 - "$out/oci" "$version" <<'PY'
import json, os, sys
lay, tag = sys.argv[1], sys.argv[2]
blob = lambda d: os.path.join(lay, "blobs", *d.split(":"))
idx = json.load(open(os.path.join(lay, "index.json")))
m = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
man = json.load(open(blob(m["digest"])))
print(sum(x["size"] for x in [man["config"]] + man["layers"]))
PY
)
    r=$(rootfs)
    echo "image nbd-csi:$version: compressed $((bytes / 1048576)) MiB ($bytes bytes), unpacked $(du -sm "$r" | cut -f1) MiB"
    [ "$bytes" -le $((limit_mib * 1048576)) ] || fail "compressed size $((bytes / 1048576)) MiB is over the limit of $limit_mib MiB"
    echo "ok: under $limit_mib MiB compressed" ;;

  labels)
    stale && fail "the image is older than the binaries: run image.build first"
    oci_config "$out/oci" "$version" | python3 -c '
import json, sys
c = json.load(sys.stdin)["config"]
l = c.get("Labels") or {}
want = ["org.opencontainers.image.title", "org.opencontainers.image.description",
        "org.opencontainers.image.version", "org.opencontainers.image.revision",
        "org.opencontainers.image.source", "org.opencontainers.image.licenses"]
missing = [k for k in want if k not in l]
assert not missing, f"labels missing: {missing}"
assert l["org.opencontainers.image.version"] == sys.argv[1], l
assert l["org.opencontainers.image.title"] == "nbd-csi", l
assert l["org.opencontainers.image.revision"], l
for k in want: print(f"ok: {k}={l[k]}")
' "$version" || fail "OCI labels"
    dv=$(sed -n 's/^ARG VERSION=//p' "$src/Dockerfile")
    [ "$dv" = "$version" ] || fail "Dockerfile ARG VERSION=$dv, project version $version"
    echo "ok: Dockerfile ARG VERSION=$dv" ;;

  cleanup)
    # All of it in a private mount namespace: whatever the script does, the host's mounts stay.
    command -v unshare >/dev/null || skip_or_fail "no unshare (util-linux)"
    t=$(mktemp -d)
    trap 'rm -rf --one-file-system "$t"' EXIT
    NBDCSI_T=$t NBDCSI_SCRIPT=$src/scripts/build-image.sh unshare -m --propagation private bash -euo pipefail -c '
      t=$NBDCSI_T; s=$NBDCSI_SCRIPT
      mounts() { awk "{print \$5}" /proc/self/mountinfo | sort; }
      # A killed build: the chroot of out/work with /proc and /dev/shm still mounted, and a
      # mount beside the output directory that must survive.
      mkdir -p "$t/out/work/bundle/rootfs/proc" "$t/out/work/bundle/rootfs/dev/shm" "$t/beside" "$t/out/oci"
      mount -t proc proc "$t/out/work/bundle/rootfs/proc"
      mount -t tmpfs shm "$t/out/work/bundle/rootfs/dev/shm"
      mount -t tmpfs beside "$t/beside" && touch "$t/beside/keep" "$t/out/oci/keep"
      before=$(mounts)
      # Nothing to clean, or a directory that does not exist: no mount changes.
      "$s" clean "$t/none"
      mkdir -p "$t/empty" && "$s" clean "$t/empty"
      [ "$(mounts)" = "$before" ] || { echo "FAIL: clean of an empty or missing directory changed the mounts"; exit 1; }
      # / is refused, and unmounts nothing.
      if "$s" clean / 2>"$t/err"; then echo "FAIL: clean / succeeded"; exit 1; fi
      grep -q "not an output directory" "$t/err" || { cat "$t/err"; exit 1; }
      [ "$(mounts)" = "$before" ] || { echo "FAIL: clean / changed the mounts"; exit 1; }
      echo "ok: clean of a missing or empty directory, and of /, changes no mount"
      "$s" clean "$t/out" 2>"$t/err"
      cat "$t/err"
      [ "$(grep -c "unmounted $t/out/work" "$t/err")" = 2 ] || { echo "FAIL: the two leftover mounts were not reported"; exit 1; }
      left=$(mounts | grep -F "$t/out" || true)
      [ -z "$left" ] || { echo "FAIL: still mounted: $left"; exit 1; }
      [ ! -e "$t/out/work" ] || { echo "FAIL: out/work not removed"; exit 1; }
      [ -e "$t/out/oci/keep" ] && [ -e "$t/beside/keep" ] || { echo "FAIL: clean removed more than out/work"; exit 1; }
      [ "$(mounts | grep -vF "$t/out")" = "$(echo "$before" | grep -vF "$t/out")" ] ||
        { echo "FAIL: clean changed mounts outside out/work"; exit 1; }
      echo "ok: the two leftover mounts unmounted, out/work removed, the rest untouched"
      umount "$t/beside"' ;;

  dockerfile)
    stale && fail "the image is older than the binaries: run image.build first"
    command -v podman >/dev/null || skip_or_fail "no podman (scripts/deps.sh image)"
    # No registry here: debian:bookworm-slim is replaced by the same kind of root file system
    # made from Debian's packages (scripts/build-image.sh base), imported as a local image.
    base=localhost/nbd-csi-base:bookworm-slim
    stamp=$out/base.stamp
    if ! podman image exists "$base" || [ "$src/scripts/build-image.sh" -nt "$stamp" ]; then
      "$src/scripts/build-image.sh" base "$out/base.tar"
      podman import --quiet "$out/base.tar" "$base" >/dev/null
      rm -f "$out/base.tar"; touch "$stamp"
    fi
    revision=$(oci_config "$out/oci" "$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["Labels"]["org.opencontainers.image.revision"])')
    source=$(oci_config "$out/oci" "$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["Labels"]["org.opencontainers.image.source"])')
    # The build stage compiles the sources of this tree; the compiler cache of this machine,
    # when there is one, is lent to it (the Dockerfile uses a cache mounted at /ccache).
    cache=()
    cdir=$(ccache -k cache_dir 2>/dev/null || true)
    [ -n "$cdir" ] && [ -d "$cdir" ] && cache=(-v "$cdir:/ccache")
    t0=$SECONDS
    # chroot isolation for the RUN steps: they need no cgroups, and crun refuses a host whose
    # cgroups are mounted in hybrid mode (v1 controllers beside cgroup2, as on this build machine).
    podman build --isolation=chroot --network=host --pull=never --build-arg BASE=$base --build-arg VERSION="$version" \
      --build-arg REVISION="$revision" --build-arg SOURCE="$source" "${cache[@]}" \
      -t "localhost/nbd-csi-dockerfile:$version" -f "$src/Dockerfile" "$src" >"$out/podman-build.log" 2>&1 ||
      { tail -30 "$out/podman-build.log"; fail "podman build of the Dockerfile failed ($out/podman-build.log)"; }
    echo "ok: podman build of the Dockerfile in $((SECONDS - t0)) s"
    # The same files (names, types) in both; what an engine or apt leaves behind differently
    # (its own mount points, logs, apt's lists) is set aside.
    ctr=$(podman create "localhost/nbd-csi-dockerfile:$version")
    podman export "$ctr" | tar -tvf - >"$out/dockerfile.list.raw"
    podman rm "$ctr" >/dev/null
    r=$(rootfs)
    (cd "$r" && tar -cf - . | tar -tvf -) >"$out/mmdebstrap.list.raw"
    norm() {  # type and path of every entry, minus the engine's and apt's own files
      awk '{t = substr($1, 1, 1); if (t == "h") t = "-"; p = $6
            for (i = 7; i <= NF && $i != "->" && !($i == "link" && $(i + 1) == "to"); i++) p = p " " $i
            print t " " p}' "$1" |
        sed -e 's#^\(.\) \./#\1 #' -e 's#/$##' |
        grep -vE '^. (\.?|run/.*|tmp/.*|var/log/.*|var/cache/apt/.*|var/lib/apt/lists/.*|etc/(hostname|hosts|resolv\.conf|mtab))$' |
        sort -u
    }
    # podman build -v leaves the mount point of the lent cache in every stage: not the image's.
    if [ ${#cache[@]} -gt 0 ]; then
      norm "$out/dockerfile.list.raw" | grep -vx 'd ccache' >"$out/dockerfile.list"
    else
      norm "$out/dockerfile.list.raw" >"$out/dockerfile.list"
    fi
    norm "$out/mmdebstrap.list.raw" >"$out/mmdebstrap.list"
    if ! diff -u "$out/mmdebstrap.list" "$out/dockerfile.list" >"$out/files.diff"; then
      head -40 "$out/files.diff"
      fail "the Dockerfile's image and scripts/build-image.sh's differ ($(grep -E '^[-+]' "$out/files.diff" | grep -cvE '^(---|\+\+\+) ') entries; $out/files.diff)"
    fi
    echo "ok: both images hold the same $(wc -l <"$out/dockerfile.list") files, directories and links"
    ctr=$(podman create "localhost/nbd-csi-dockerfile:$version")
    # podman's export names members without a leading ./ (mmdebstrap's tar has it): match either.
    podman export "$ctr" | tar -xf - -C "$out" --wildcards --no-anchored 'var/lib/dpkg/status'
    podman rm "$ctr" >/dev/null
    pk() { dpkg-query --admindir="$1" -W -f '${Package} ${Version}\n' | sort; }
    [ -s "$out/var/lib/dpkg/status" ] || fail "no dpkg status in the Dockerfile's image"
    mkdir -p "$out/df-dpkg"
    mv "$out/var/lib/dpkg/status" "$out/df-dpkg/status"
    rm -rf "$out/var"
    diff <(pk "$r/var/lib/dpkg") <(pk "$out/df-dpkg") >"$out/packages.diff" ||
      { cat "$out/packages.diff"; fail "the two images hold different packages"; }
    echo "ok: the same $(pk "$r/var/lib/dpkg" | wc -l) Debian packages and versions"
    # The project's labels; buildah stamps its own version (io.buildah.version) into what it builds.
    labels() { python3 -c 'import json,sys; c=json.load(sys.stdin); c=c[0]["Config"] if isinstance(c, list) else c["config"]; print(json.dumps({k: v for k, v in (c.get("Labels") or {}).items() if not k.startswith("io.buildah.")}, sort_keys=True))'; }
    a=$(oci_config "$out/oci" "$version" | labels)
    b=$(podman image inspect "localhost/nbd-csi-dockerfile:$version" | labels)
    [ "$a" = "$b" ] || fail "labels differ: $a vs $b"
    echo "ok: the same OCI labels"
    size=$(podman image inspect "localhost/nbd-csi-dockerfile:$version" --format '{{.Size}}')
    echo "Dockerfile image: $((size / 1048576)) MiB unpacked" ;;

  *) echo "usage: $0 build|ldd|tools|user|size|labels|dockerfile" >&2; exit 2 ;;
esac
