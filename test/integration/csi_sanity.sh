#!/usr/bin/env bash
# The upstream CSI conformance suite (kubernetes-csi/csi-test csi-sanity, CSI 1.10) against the
# three real daemons on this host, as scripts/quickstart.sh --keep runs them (datapath
# registered with the controller over mutual TLS, node plugin on the fallback attach path where
# the kernel has no nbd.ko), with a mutable QoS parameter for ModifyVolume. Passes only with
# "0 Failed". csi-sanity is looked for on PATH, then $CSI_SANITY, then ../shared/tools next to
# the source tree; without it the test is skipped and says how to get it.
. "$(dirname "$0")/lib.sh"
lib_init
need jq fio findmnt losetup nbdfuse fusermount3 openssl python3
[ "$(id -u)" = 0 ] || skip "needs root (mount, loop devices)"
[ -c /dev/fuse ] || skip "no /dev/fuse"

sanity=$(command -v csi-sanity || true)
[ -n "$sanity" ] || sanity=${CSI_SANITY:-}
for d in "$NBDCSI_SRC/../shared/tools" "$NBDCSI_SRC/../../shared/tools"; do
  [ -n "$sanity" ] || { [ -x "$d/csi-sanity" ] && sanity=$d/csi-sanity; } || true
done
[ -n "$sanity" ] && [ -x "$sanity" ] ||
  skip "no csi-sanity: build it from github.com/kubernetes-csi/csi-test (v5.3.1, cmd/csi-sanity) and put it on PATH or in \$CSI_SANITY"

export NBDCSI_QS_DIR=$W/qs
QS=$NBDCSI_SRC/scripts/quickstart.sh
stop_qs() { NBDCSI_BIN=$NBDCSI_BIN "$QS" --stop >"$W/qs-stop.log" 2>&1 || cat "$W/qs-stop.log" >&2; }
on_exit stop_qs
NBDCSI_BIN=$NBDCSI_BIN "$QS" --no-build --keep >"$W/qs.log" 2>&1 || {
  tail -30 "$W/qs.log" >&2; die "quickstart --keep failed"; }
step "controller, datapath and node plugin up (quickstart --keep)"

# csi-sanity's directories must lie under the node plugin's kubelet root (the quickstart's mnt/).
mkdir -p "$NBDCSI_QS_DIR/mnt/sanity"
printf 'maxIops: "300"\nmaxBps: "100Mi"\n' >"$W/mutable.yaml"
rc=0
"$sanity" --csi.endpoint "$NBDCSI_QS_DIR/run/node.sock" \
  --csi.controllerendpoint "$NBDCSI_QS_DIR/run/controller.sock" \
  --csi.mountdir "$NBDCSI_QS_DIR/mnt/sanity/m" --csi.stagingdir "$NBDCSI_QS_DIR/mnt/sanity/s" \
  --csi.testvolumesize 67108864 --csi.testvolumemutableparameters "$W/mutable.yaml" \
  --ginkgo.no-color >"$W/sanity.log" 2>&1 || rc=$?
summary=$(grep -E '^(SUCCESS|FAIL)!' "$W/sanity.log" | tail -1)
if [ $rc != 0 ] || ! grep -q ' 0 Failed ' <<<"$summary"; then
  grep -A12 '\[FAIL\]\|Summarizing' "$W/sanity.log" >&2 || tail -40 "$W/sanity.log" >&2
  die "csi-sanity: exit $rc: ${summary:-no summary}"
fi
step "csi-sanity $("$sanity" --version 2>/dev/null | head -1): $summary"
