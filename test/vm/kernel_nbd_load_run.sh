#!/usr/bin/env bash
# Host side of vm.kernel_nbd_load: renders the chart's load-nbd init container script (the one
# a datapath pod runs before nbd-datapathd) for datapath.kernelNbd.mode=required, and runs
# kernel_nbd_load.sh in a VM booted WITHOUT nbd loaded (nbd-kernel-vm --no-nbd), as on a stock
# node. Needs helm (scripts/get-helm.sh) to render: without it the test is skipped (77) unless
# CI=true. The VM runner skips on its own terms (see vm.cmake).
set -euo pipefail
src=${NBDCSI_SRC:?NBDCSI_SRC is set by CTest}
bin=${NBDCSI_BIN:?NBDCSI_BIN is set by CTest}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

helm=$("$src/scripts/get-helm.sh" 2>"$tmp/get-helm.err") || {
  if [ "${CI:-}" = true ]; then echo "FAIL: no helm: $(cat "$tmp/get-helm.err")" >&2; exit 1; fi
  echo "SKIP: no helm: $(cat "$tmp/get-helm.err")" >&2; exit 77
}
"$helm" template t "$src/charts/nbd-csi" \
  --set tls.existingSecret.controller=c --set tls.existingSecret.datapath=d \
  --set datapath.kernelNbd.mode=required --set 'datapath.kernelNbd.modprobeArgs[0]=nbds_max=8' |
  python3 -c '
import sys, yaml
for d in yaml.safe_load_all(sys.stdin):
    if d and d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-datapath"):
        spec = d["spec"]["template"]["spec"]
        init = [c for c in spec["initContainers"] if c["name"] == "load-nbd"]
        print(init[0]["command"][2])
        args = next(c for c in spec["containers"] if c["name"] == "nbd-datapathd")["args"]
        assert "--require-kernel-nbd" in args, args
' >"$tmp/load-nbd.sh"
[ -s "$tmp/load-nbd.sh" ] || { echo "FAIL: no load-nbd script rendered" >&2; exit 1; }

exec "$src/test/vm/nbd-kernel-vm" --no-nbd --timeout 400 --mem 1280 \
  --file "$src/test/vm/lib.sh:/opt/lib/nbdcsi-vm.sh" \
  --file "$tmp/load-nbd.sh:/opt/load-nbd.sh" \
  --file "$bin/nbd-datapathd:/opt/bin/" --file "$bin/nbdctl:/opt/bin/" \
  "$src/test/vm/kernel_nbd_load.sh"
