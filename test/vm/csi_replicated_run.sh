#!/usr/bin/env bash
# Host side of vm.csi_replicated: makes the TLS certificates of the three nodes (test/tls/
# make-certs.sh, which needs openssl) and boots the VM with etcd (Debian's etcd-server: one
# static Go binary, shipped as a file) and the project's binaries, running csi_replicated.sh.
#
#   csi_replicated_run.sh NBD_DATAPATHD NBDCTL NBDCSI_CLUSTER_TOOL NBD_CSI_NODE NBD_CSI_CONTROLLER
#
# No etcd on the host: skipped (77), unless CI=true or NBDVM_REQUIRE=1. The VM runner skips on
# its own terms (see vm.cmake).
set -euo pipefail
[ $# -eq 5 ] || { echo "usage: $0 NBD_DATAPATHD NBDCTL NBDCSI_CLUSTER_TOOL NBD_CSI_NODE NBD_CSI_CONTROLLER" >&2; exit 2; }
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
files=()
for n in a b t; do
  files+=(--file "$tmp/certs/node-node-$n.crt:/opt/certs/" --file "$tmp/certs/node-node-$n.key:/opt/certs/")
done
exec "$here/nbd-kernel-vm" --timeout 480 --mem 2048 \
  --file "$here/lib.sh:/opt/lib/nbdcsi-vm.sh" --file "$tmp/certs/ca.crt:/opt/certs/" \
  --file "$1:/opt/bin/" --file "$2:/opt/bin/" --file "$3:/opt/bin/" --file "$4:/opt/bin/" --file "$5:/opt/bin/" \
  --file "$etcd:/opt/bin/" "${files[@]}" "$here/csi_replicated.sh"
