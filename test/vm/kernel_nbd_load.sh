#!/bin/bash
# Kernel NBD on a node that does not load nbd.ko at boot (test/vm/kernel_nbd_load_run.sh boots
# the VM with --no-nbd and ships the chart's rendered load-nbd script as /opt/load-nbd.sh).
# Runs INSIDE the VM:
#   - nbd is not loaded: nbd-datapathd --require-kernel-nbd refuses to start (the datapath pod
#     fails instead of falling back); without the flag it starts and logs the fallback once
#   - the chart's init container script loads nbd.ko with its module arguments
#   - nbd-datapathd --require-kernel-nbd then starts, attaches a volume as /dev/nbdN (mode
#     kernel in nbdctl attachments), data goes through the kernel device, detach
. /opt/lib/nbdcsi-vm.sh
D=/tmp/kload POOL=/tmp/kload/pool API=/tmp/kload/api.sock SOCK=/tmp/kload/nbd.sock
LOG=/tmp/kload/datapathd.log
fail() {
  echo "FAIL: $*"
  echo "---- datapathd log (last 30 lines) ----"; tail -n 30 "$LOG" 2>/dev/null || true
  exit 1
}
nbdctl() { command nbdctl --api "unix://$API" --timeout 20 "$@"; }
start_datapath() {  # extra args...; sets DPID once the API socket is up
  rm -f "$API" "$SOCK"
  nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$SOCK" --workers 2 \
    --log-level info "$@" >>"$LOG" 2>&1 &
  DPID=$!
  for _ in $(seq 300); do [ -S "$API" ] && return 0; kill -0 $DPID 2>/dev/null || break; sleep 0.1; done
  fail "nbd-datapathd $* did not start"
}
stop_datapath() {
  kill -TERM "$DPID"; wait "$DPID" || fail "nbd-datapathd exited $? on SIGTERM"
}
mkdir -p "$D"

[ ! -d /sys/module/nbd ] || fail "nbd is loaded at boot: the runner's --no-nbd did not take"
step "booted without nbd ($(uname -r))"

rc=0; nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$SOCK" \
  --require-kernel-nbd >"$D/refused.log" 2>&1 || rc=$?
[ $rc != 0 ] || fail "nbd-datapathd --require-kernel-nbd started without nbd"
grep -q "require-kernel-nbd refuses the nbdfuse fallback" "$D/refused.log" || {
  cat "$D/refused.log"; fail "the refusal does not say why"; }
[ ! -S "$API" ] || fail "the refused datapath left its API socket"
step "--require-kernel-nbd without nbd: exit $rc, $(grep -o 'kernel NBD unavailable[^:]*' "$D/refused.log" | head -1)"

start_datapath
grep -q "FALLBACK: slower, and a datapath restart breaks their I/O" "$LOG" ||
  fail "the start-up log does not announce the fallback"
stop_datapath
[ "$(grep -c 'FALLBACK' "$LOG")" = 1 ] || fail "the fallback is announced more than once"
step "without the flag: starts, fallback announced once in the log"

out=$(sh /opt/load-nbd.sh 2>&1) || { echo "$out"; fail "the chart's load-nbd script failed"; }
echo "$out"
[ -d /sys/module/nbd ] || fail "load-nbd succeeded but nbd is not loaded"
[ "$(cat /sys/module/nbd/parameters/nbds_max)" = 8 ] ||
  fail "nbds_max is $(cat /sys/module/nbd/parameters/nbds_max), want 8 (the chart's modprobeArgs)"
grep -q "loaded nbd.ko (modprobe nbd nbds_max=8)" <<<"$out" || fail "load-nbd does not say it loaded nbd"
step "chart load-nbd script: nbd.ko loaded, nbds_max=8"

start_datapath --require-kernel-nbd
grep -q "kernel NBD available: volumes attach as /dev/nbdN (--require-kernel-nbd" "$LOG" ||
  fail "the start-up log does not say kernel NBD is used"
nbdctl volume create k1 --size 64Mi >/dev/null || fail "volume create"
out=$(nbdctl -o json attach k1) || fail "attach k1: $out"
DEV=$(jq -r .device <<<"$out")
[ "$(jq -r .mode <<<"$out")" = kernel ] || fail "attach k1: mode $(jq -r .mode <<<"$out"), want kernel"
[[ $DEV == /dev/nbd* ]] || fail "attach k1: device $DEV, want /dev/nbdN"
nbdctl attachments | tee "$D/att.txt"
grep -E "^k1 +$DEV .*kernel" "$D/att.txt" >/dev/null || fail "nbdctl attachments does not show k1 as kernel"
head -c $((8 << 20)) /dev/urandom >"$D/data"
dd if="$D/data" of="$DEV" bs=1M oflag=direct status=none || fail "write to $DEV"
cmp -n $((8 << 20)) "$D/data" "$DEV" || fail "read back from $DEV differs"
nbdctl detach k1 >/dev/null || fail "detach k1"
stop_datapath
step "--require-kernel-nbd with nbd: k1 attached as $DEV (kernel), 8 MiB written and read back"
