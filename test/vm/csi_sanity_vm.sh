#!/usr/bin/env bash
# Host side of vm.csi_sanity_kernel: finds csi-sanity (PATH, $CSI_SANITY, then ../shared/tools
# beside the source tree, as integration.csi_sanity does) and runs csi_sanity_kernel.sh in the VM
# with the three daemons, nbdctl and csi-sanity shipped in. Without csi-sanity: skipped (77).
#   csi_sanity_vm.sh SRC_DIR BIN_DIR
set -euo pipefail
src=$1 bin=$2
sanity=$(command -v csi-sanity || true)
[ -n "$sanity" ] || sanity=${CSI_SANITY:-}
for d in "$src/../shared/tools" "$src/../../shared/tools"; do
  [ -n "$sanity" ] || { [ -x "$d/csi-sanity" ] && sanity=$d/csi-sanity; } || true
done
if [ -z "$sanity" ] || [ ! -x "$sanity" ]; then
  echo "SKIP: no csi-sanity: build it from github.com/kubernetes-csi/csi-test (v5.3.1, cmd/csi-sanity) and put it on PATH or in \$CSI_SANITY"
  exit 77
fi
vm=$src/test/vm
exec "$vm/nbd-kernel-vm" --timeout 540 --mem 1536 \
  --file "$vm/lib.sh:/opt/lib/nbdcsi-vm.sh" \
  --file "$bin/nbd-datapathd:/opt/bin/" --file "$bin/nbd-csi-controller:/opt/bin/" \
  --file "$bin/nbd-csi-node:/opt/bin/" --file "$bin/nbdctl:/opt/bin/" \
  --file "$sanity:/opt/bin/" \
  "$vm/csi_sanity_kernel.sh"
