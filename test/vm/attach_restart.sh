#!/bin/bash
# Kernel NBD attachment through nbd-datapathd (generic netlink CONNECT over socketpairs) surviving
# kill -9 of the daemon under live I/O. Runs INSIDE the VM (test/vm/nbd-kernel-vm ships
# nbd-datapathd and nbdctl to /opt/bin); the pool is on the guest's /tmp tmpfs
# (overcommitted: the 1 GiB volume is thin and the VM has about 0.5 GiB of tmpfs).
#
#   - nbdctl attach: /dev/nbdN with the volume's size, the backend cookie in sysfs, max_sectors_kb
#     raised above 64; attach again is idempotent (same device)
#   - mkfs.ext4 + mount, then fio randwrite O_DIRECT iodepth 8 with crc32c verify on a file
#   - while fio runs: kill -9 the daemon, restart it on the same pool: it must RECONFIGURE the device
#     (its log says so, the kernel says "reconnected socket"); then a graceful SIGTERM restart (exit
#     0, device still attached), then kill -9 once more
#   - fio ends with no error and a clean verify; no I/O error in the kernel log; e2fsck clean
#   - a live daemon behind a tight QoS limit: reads outlive the io timeout, the kernel drops the
#     sockets (LINK_DEAD), the daemon reconnects them without a restart; the reads succeed
#   - umount, nbdctl detach: device size 0, no record left, the volume can be deleted (fails if a
#     daemon-side connection outlives the detach)
#   - the daemon's log shows no engine invariant violation and no sanitizer report
. /opt/lib/nbdcsi-vm.sh

D=/tmp/att POOL=/tmp/att/pool API=/tmp/att/api.sock SOCK=/tmp/att/nbd.sock LOG=/tmp/att/datapathd.log
MNT=/mnt/att FIOLOG=/tmp/att/fio.log
IO_TIMEOUT=5   # in-flight requests of a killed daemon are requeued after this (see kernel_nbd.h)
DPID='' FIOPID=''
fail() {
  echo "FAIL: $*"
  echo "---- datapathd log (last 40 lines) ----"; tail -n 40 "$LOG" 2>/dev/null || true
  echo "---- fio (last 30 lines) ----"; tail -n 30 "$FIOLOG" 2>/dev/null || true
  echo "---- kernel log, nbd and I/O lines (last 40) ----"
  dmesg | grep -iE 'nbd|I/O error|blk_update|EXT4-fs' | tail -n 40 || true
  exit 1
}
nbdctl() { command nbdctl --api "unix://$API" --timeout 20 "$@"; }

daemon_start() {
  rm -f "$API" "$SOCK"
  nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$SOCK" --workers 2 \
    --overcommit 8 --attach-io-timeout "$IO_TIMEOUT" --attach-dead-conn-timeout 120 \
    --log-level info >>"$LOG" 2>&1 &
  DPID=$!
  for _ in $(seq 300); do
    [ -S "$API" ] && return 0
    kill -0 "$DPID" 2>/dev/null || fail "nbd-datapathd exited during startup"
    sleep 0.1
  done
  fail "nbd-datapathd did not create $API in 30 s"
}
# crash_restart WHAT [SIGNAL]: stop the daemon (kill -9 by default) and start it again; the new
# one must reconnect the device before it serves the API. With TERM the daemon must exit 0 and
# leave the device attached (its shutdown must not detach, nor "repair" its own closing sockets).
crash_restart() {
  local n_before sig=${2:-KILL} rc=0
  n_before=$(grep -c 'attach: reconnected /dev/nbd' "$LOG" || true)
  kill -"$sig" "$DPID"
  wait "$DPID" 2>/dev/null || rc=$?
  if [ "$sig" = TERM ]; then
    [ "$rc" = 0 ] || fail "$1: nbd-datapathd exited $rc on SIGTERM"
    [ "$(cat /sys/block/$N/backend 2>/dev/null)" = "$COOKIE" ] || fail "$1: SIGTERM detached $DEV"
  fi
  step "$1: nbd-datapathd stopped (SIG$sig) under fio"
  daemon_start
  [ "$(grep -c 'attach: reconnected /dev/nbd' "$LOG" || true)" -gt "$n_before" ] ||
    fail "$1: the restarted daemon did not reconnect the device"
  grep 'attach: reconnected /dev/nbd' "$LOG" | tail -n 1
  step "$1: restarted, device reconfigured"
}

mkdir -p "$D" "$MNT"
dmesg -c >/dev/null
daemon_start
grep -q "connections the kernel drops stay dropped" "$LOG" && fail "the LINK_DEAD watcher did not start"
step "nbd-datapathd up (LINK_DEAD watcher running)"

nbdctl volume create v1 --size 1Gi >/dev/null
out=$(nbdctl attach v1 --connections 2) || fail "nbdctl attach v1: $out"
echo "$out"
DEV=$(grep -o '/dev/nbd[0-9]*' <<<"$out" | head -n 1)
[ -n "$DEV" ] && [ -b "$DEV" ] || fail "nbdctl attach printed no block device"
N=${DEV#/dev/}
[ "$(cat /sys/block/$N/size)" = $((1024 * 1024 * 2)) ] || fail "$DEV size $(cat /sys/block/$N/size) sectors"
COOKIE=$(cat /sys/block/$N/backend)
[[ $COOKIE == nbd-csi:v1:* ]] || fail "/sys/block/$N/backend is '$COOKIE'"
[ "$(cat /sys/block/$N/queue/max_sectors_kb)" -gt 64 ] || fail "max_sectors_kb still $(cat /sys/block/$N/queue/max_sectors_kb)"
[ -f "$POOL/attachments/v1.json" ] || fail "no durable record $POOL/attachments/v1.json"
again=$(nbdctl attach v1) || fail "second attach: $again"
grep -q "$DEV" <<<"$again" || fail "attach is not idempotent: $again"
[ "$(cat /sys/block/$N/backend)" = "$COOKIE" ] || fail "second attach changed the device"
nbdctl attachments | grep -q "$DEV" || fail "nbdctl attachments does not list $DEV"
step "attached $DEV (backend $COOKIE, max_sectors_kb $(cat /sys/block/$N/queue/max_sectors_kb), 2 connections)"

mkfs.ext4 -q -F -E nodiscard "$DEV"
mount -t ext4 "$DEV" "$MNT"
step "mkfs.ext4 + mount"

# A file on the file system, so metadata I/O (journal commits) goes through the restarts too.
# Writes are paced (250 IOPS: 8192 writes take at least 33 s) so the run spans all three restarts
# on a fast machine too; unpaced, a quick CI runner finished the 32M in 4 s, before the first kill.
fio --name=attach --filename="$MNT/fio.dat" --size=32M --bs=4k --rw=randwrite --ioengine=libaio \
  --iodepth=8 --rate_iops=,250 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 --output="$FIOLOG" &
FIOPID=$!
step "fio started (randwrite 32M, 4k, iodepth 8, 250 IOPS, O_DIRECT, crc32c verify)"
sleep 6
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended before the first kill: the run is too short to test anything"
crash_restart "kill 1"
sleep 5
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended before the graceful restart"
crash_restart "term" TERM
sleep 5
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended before the second kill"
crash_restart "kill 2"
vm_fio_check "$FIOPID" "$FIOLOG"
step "fio done: exit 0, err=0, verify clean"

echo "---- kernel log (nbd) ----"
dmesg | grep -iE 'nbd' | tail -n 40 || true
dmesg | grep -qE 'I/O error|Buffer I/O error|blk_update_request' && fail "the kernel logged I/O errors"
dmesg | grep -q "$N: reconnected socket\|reconnected socket" || fail "the kernel log shows no reconnect"
step "kernel log: reconnects, no I/O errors"

umount "$MNT"
e2fsck -fn "$DEV" >/tmp/att/fsck.log 2>&1 || { cat /tmp/att/fsck.log; fail "e2fsck after the restarts"; }
step "umount, e2fsck clean"

# A live daemon whose requests outlive the kernel's io timeout (a tight QoS limit): the kernel
# shuts those sockets down itself and multicasts LINK_DEAD; the daemon must hand over fresh
# sockets at once, or the device would sit on its dead-connection timeout and then fail I/O.
# Reads only: a request the kernel gave up on may still run in the daemon once, harmless for reads.
nbdctl volume qos v1 --max-iops 4 >/dev/null || fail "nbdctl volume qos"
n_dead=$(grep -c 'the kernel dropped a connection' "$LOG" || true)
rc=0
fio --name=slow --filename="$DEV" --rw=randread --bs=4k --ioengine=libaio --iodepth=32 --direct=1 \
  --size=64M --number_ios=48 --output=/tmp/att/fio-slow.log || rc=$?
nbdctl volume qos v1 --clear >/dev/null || fail "nbdctl volume qos --clear"
[ "$rc" = 0 ] || { cat /tmp/att/fio-slow.log; fail "fio reads behind QoS exited $rc"; }
grep -qE 'err= *0' /tmp/att/fio-slow.log || { cat /tmp/att/fio-slow.log; fail "fio reads behind QoS had errors"; }
[ "$(grep -c 'the kernel dropped a connection' "$LOG" || true)" -gt "$n_dead" ] ||
  fail "no LINK_DEAD repair logged (the reads did not outlive the ${IO_TIMEOUT}s io timeout?)"
grep 'the kernel dropped a connection' "$LOG" | tail -n 2
dmesg | grep nbd | tail -n 8
dmesg | grep -qE 'I/O error|Buffer I/O error|blk_update_request' && fail "I/O errors after LINK_DEAD"
step "io timeout under QoS: kernel dropped sockets, daemon reconnected them live, reads ok"

nbdctl detach v1 || fail "nbdctl detach v1"
[ "$(cat /sys/block/$N/size)" = 0 ] || fail "$DEV size is $(cat /sys/block/$N/size) after detach"
[ ! -e "$POOL/attachments/v1.json" ] || fail "the record survived the detach"
nbdctl detach v1 || fail "detach is not idempotent"
# The delete waits for the daemon's side of the sockets to close. A socket the kernel gave up on
# under the QoS limit may still have reads queued behind it (up to number_ios / 4 IOPS = 12 s),
# so allow 20 s: 5 s was flaky. A connection that never closes (the engine bug of issue 12: a
# busy-slot count gone wrong) fails here.
ms_now() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }
t_del=$(ms_now)
tries=0
until nbdctl volume delete v1 >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ $(( $(ms_now) - t_del )) -gt 20000 ]; then
    nbdctl volume inspect v1 || true
    fail "volume v1 could not be deleted within 20 s of the detach: a daemon-side connection outlived it"
  fi
  sleep 0.1
done
echo "volume v1 deleted $(( $(ms_now) - t_del )) ms after the detach ($tries refused attempts)"
step "detached: size 0, record gone, volume deleted"

kill -TERM "$DPID"
wait "$DPID" || fail "nbd-datapathd exited $? on SIGTERM"
# Across every daemon run: no broken engine invariant, no stale completion, and (for a sanitizer
# build) no ASan/UBSan report.
if grep -E 'engine invariant violated|stale completions dropped|AddressSanitizer|LeakSanitizer|runtime error:' "$LOG"; then
  fail "the daemon log reports an engine or sanitizer error"
fi
step "daemon logs clean (no invariant violation, no sanitizer report)"
step "PASS"
