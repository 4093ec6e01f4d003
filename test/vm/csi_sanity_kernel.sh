#!/bin/bash
# The upstream CSI conformance suite (csi-sanity, CSI 1.10) against the three real daemons INSIDE
# the VM, where volumes attach through the kernel's own NBD driver (/dev/nbdN) instead of the
# host's nbdfuse fallback (integration.csi_sanity). The controller and the datapath talk over
# plaintext gRPC on the guest's 127.0.0.1 (--insecure: a loopback-only test; mutual TLS between
# them is tested on the host). Passes only with "0 Failed", and only if volumes really took the
# kernel path.
. /opt/lib/nbdcsi-vm.sh

D=/tmp/sanity POOL=/tmp/sanity/pool
API=$D/api.sock NBD=$D/nbd.sock CTRL=$D/controller.sock NODE_SOCK=$D/node.sock
NODE=vm-node REG=127.0.0.1:9830 ADV=127.0.0.1:9831
PIDS=()
fail() {
  echo "FAIL: $*"
  for l in controller datapath node; do
    echo "---- $l log (last 25 lines) ----"; tail -n 25 "$D/$l.log" 2>/dev/null || true
  done
  exit 1
}
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
mkdir -p "$POOL" "$D/kubelet/sanity"  # csi-sanity makes only the last level of its dirs
[ -b /dev/nbd0 ] || fail "no /dev/nbd0: nbd.ko not loaded in the guest"

nbd-csi-controller --csi-endpoint "unix://$CTRL" --registry-listen "$REG" --insecure \
  --heartbeat-interval 500 >"$D/controller.log" 2>&1 &
PIDS+=($!)
nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$NBD" --workers 2 \
  --overcommit 16 --node-id "$NODE" --advertise "$ADV" --controller "$REG" --insecure \
  --heartbeat-interval 500 --require-kernel-nbd >"$D/datapath.log" 2>&1 &
PIDS+=($!)
# $D/kubelet stands in for /var/lib/kubelet: csi-sanity's directories lie beneath it.
nbd-csi-node --csi-endpoint "unix://$NODE_SOCK" --node-id "$NODE" --datapath "unix://$API" \
  --kubelet-root "$D/kubelet" >"$D/node.log" 2>&1 &
PIDS+=($!)
registered() {
  nbdctl csi --endpoint "unix://$CTRL" -o json controller capacity \
    --topology "topology.nbd.csi.io/node=$NODE" 2>/dev/null | jq -e '(.available_capacity // 0) > 0' >/dev/null
}
for _ in $(seq 300); do
  [ -S "$NODE_SOCK" ] && registered && break
  for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || fail "a daemon exited during start-up"; done
  sleep 0.1
done
registered || fail "the datapath did not register with the controller in 30 s"
step "controller, datapath (kernel NBD required) and node plugin up; datapath registered"

printf 'maxIops: "300"\nmaxBps: "100Mi"\n' >"$D/mutable.yaml"
rc=0
csi-sanity --csi.endpoint "$NODE_SOCK" --csi.controllerendpoint "$CTRL" \
  --csi.mountdir "$D/kubelet/sanity/m" --csi.stagingdir "$D/kubelet/sanity/s" \
  --csi.testvolumesize 67108864 --csi.testvolumemutableparameters "$D/mutable.yaml" \
  --ginkgo.no-color >"$D/sanity.log" 2>&1 || rc=$?
summary=$(grep -E '^(SUCCESS|FAIL)!' "$D/sanity.log" | tail -1)
if [ $rc != 0 ] || ! grep -q ' 0 Failed ' <<<"$summary"; then
  grep -A12 "\[FAIL\]\|Summarizing" "$D/sanity.log" || tail -40 "$D/sanity.log"
  fail "csi-sanity: exit $rc: ${summary:-no summary}"
fi
step "csi-sanity: $summary"
# The stages above went through /dev/nbdN: the datapath logged kernel attachments, never a fuse one.
grep -q "attached as /dev/nbd" "$D/datapath.log" || fail "no volume was attached through /dev/nbdN"
! grep -q "nbdfuse" "$D/node.log" || fail "the node plugin mentions the nbdfuse fallback"
echo "PASS: csi-sanity in the VM on kernel NBD: $summary"
