#!/usr/bin/env bash
# Host side of vm.csi_alerts: boots the VM with the project's datapath, node plugin and nbdctl,
# Debian's prometheus (a Go binary that needs only libc; the runner ships its libraries) and the
# chart's alert rules exactly as the chart ships them, running csi_alerts.sh.
#
#   csi_alerts_run.sh NBD_DATAPATHD NBDCTL NBD_CSI_NODE
#
# No prometheus on the host: skipped (77), unless CI=true or NBDVM_REQUIRE=1. The VM runner skips
# on its own terms (see vm.cmake).
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 NBD_DATAPATHD NBDCTL NBD_CSI_NODE" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(cd "$here/../.." && pwd)
require=${NBDVM_REQUIRE:-}
[ -n "$require" ] || { [ "${CI:-}" = true ] && require=1 || require=0; }
prometheus=$(command -v prometheus || true)
if [ -z "$prometheus" ]; then
  if [ "$require" = 1 ]; then echo "FAIL: no prometheus (apt-get install prometheus)" >&2; exit 1; fi
  echo "SKIP: no prometheus on this host (apt-get install prometheus)" >&2; exit 77
fi
exec "$here/nbd-kernel-vm" --timeout 420 --mem 1536 \
  --file "$here/lib.sh:/opt/lib/nbdcsi-vm.sh" \
  --file "$src/charts/nbd-csi/files/prometheus-rules.yaml:/opt/etc/prometheus-rules.yaml" \
  --file "$1:/opt/bin/" --file "$2:/opt/bin/" --file "$3:/opt/bin/" --file "$prometheus:/opt/bin/" \
  "$here/csi_alerts.sh"
