#!/usr/bin/env bash
# Host side of the VM tests of replicated volumes (vm.target_attach, vm.csi_replicated): makes
# the TLS certificates of the three nodes node-a, node-b and node-t (test/tls/make-certs.sh, which
# needs openssl: /opt/certs in the VM) and boots the VM with etcd (Debian's etcd-server: one static
# Go binary, shipped as a file) and the given binaries in /opt/bin, running SCRIPT.
#
#   cluster_run.sh TIMEOUT SCRIPT BINARY...
#
# No etcd on the host: skipped (77), unless CI=true or NBDVM_REQUIRE=1. The VM runner skips on
# its own terms (see vm.cmake).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 TIMEOUT SCRIPT BINARY..." >&2; exit 2; }
timeout=$1 script=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(cd "$here/../.." && pwd)
require=${NBDVM_REQUIRE:-}
[ -n "$require" ] || { [ "${CI:-}" = true ] && require=1 || require=0; }
etcd=$(command -v etcd || true)
if [ -z "$etcd" ]; then
  if [ "$require" = 1 ]; then echo "FAIL: no etcd (apt-get install etcd-server)" >&2; exit 1; fi
  echo "SKIP: no etcd on this host (apt-get install etcd-server)" >&2; exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$src/test/tls/make-certs.sh" "$tmp/certs" node-a node-b node-t >"$tmp/certs.log" 2>&1 ||
  { cat "$tmp/certs.log" >&2; echo "FAIL: make-certs.sh" >&2; exit 1; }
files=(--file "$tmp/certs/ca.crt:/opt/certs/")
for n in a b t; do
  files+=(--file "$tmp/certs/node-node-$n.crt:/opt/certs/" --file "$tmp/certs/node-node-$n.key:/opt/certs/")
done
for b in "$@" "$etcd"; do files+=(--file "$b:/opt/bin/"); done
exec "$here/nbd-kernel-vm" --timeout "$timeout" --mem 2048 \
  --file "$here/lib.sh:/opt/lib/nbdcsi-vm.sh" "${files[@]}" "$script"
