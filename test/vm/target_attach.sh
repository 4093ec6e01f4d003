#!/bin/bash
# The kernel NBD device on a replicated volume's target (issue 16), INSIDE the VM
# (cluster_run.sh ships nbd-datapathd, nbdctl, nbdcsi-cluster-tool, etcd and the node
# certificates). Everything is on loopback and the guest's tmpfs:
#
#   - etcd on 127.0.0.1:2379; replicas node-a (127.0.0.11) and node-b (127.0.0.12), each
#     nbd-datapathd with its pool, its node certificate (NBD over mutual TLS) and --cluster-etcd;
#     the target node node-t (127.0.0.13) with an empty pool
#   - the pool volume rv on both replicas, its cluster state (nbdcsi-cluster-tool create-volume),
#     nbdctl target open rv on node-t (epoch 1), nbdctl attach rv --target: /dev/nbdN of the
#     volume's size; attachments lists it as rv@target; resize-attachment at the same size changes nothing
#   - mkfs.ext4 + mount, fio randwrite O_DIRECT with crc32c verify on a file; kill -9 of node-b's
#     datapath mid-run: fio ends with no error and a clean verify, no I/O error in the kernel log,
#     the target is degraded with in_sync [node-a] (in etcd too)
#   - a second fio run while node-t's datapath (the target) is killed with -9 and restarted: its
#     recovery reopens the target through the cluster agent and RECONFIGUREs the device; fio ends
#     with no error and a clean verify
#   - umount, e2fsck clean, detach (device size 0, record gone, the target still open), target
#     close (the claim released in etcd), every daemon stopped
# Reported: fio's IOPS and its worst write completion latency (the stall around each kill), the
# time from the replica's kill to the target reporting itself degraded, and from the target's
# kill to its device reconnected.
. /opt/lib/nbdcsi-vm.sh

D=/tmp/ta MNT=/mnt/ta FIOLOG=/tmp/ta/fio.json ETCD=127.0.0.1:2379 CERTS=/opt/certs
SIZE=256Mi SIZE_BYTES=$((256 << 20))
declare -A IP=([a]=127.0.0.11 [b]=127.0.0.12 [t]=127.0.0.13) PID=()
ETCDPID='' FIOPID=''
fail() {
  echo "FAIL: $*"
  for n in a b; do
    echo "---- node-$n datapathd log (last 15 lines) ----"; tail -n 15 "$D/$n/datapathd.log" 2>/dev/null || true
  done
  echo "---- node-t datapathd log (first 40 warnings and errors, last 15 lines) ----"
  grep -E ' (warning|error|critical) ' "$D/t/datapathd.log" 2>/dev/null | head -n 40 || true
  echo ...; tail -n 15 "$D/t/datapathd.log" 2>/dev/null || true
  echo "---- etcd log (last 10 lines) ----"; tail -n 10 "$D/etcd.log" 2>/dev/null || true
  echo "---- fio ----"; tail -n 30 "$D/fio.err" 2>/dev/null || true
  echo "---- kernel log, nbd and I/O lines (last 30) ----"
  dmesg | grep -iE 'nbd|I/O error|blk_update|EXT4-fs' | tail -n 30 || true
  cleanup
  exit 1
}
cleanup() {
  [ -n "$FIOPID" ] && kill -9 "$FIOPID" 2>/dev/null
  mountpoint -q "$MNT" 2>/dev/null && umount -l "$MNT"
  for n in "${!PID[@]}"; do kill -9 "${PID[$n]}" 2>/dev/null || true; done
  [ -n "$ETCDPID" ] && kill -9 "$ETCDPID" 2>/dev/null
  return 0
}
ctl() { local n=$1; shift; nbdctl --api "unix://$D/$n/api.sock" --timeout 20 "$@"; }
ms_now() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }

mkdir -p "$D" "$MNT"
dmesg -c >/dev/null
vm_etcd_start "$D" "$ETCD"
step "etcd up on $ETCD"

# --replica-timeout 20 (default 5), and the kernel's I/O timeout above it: under TCG on a loaded
# host one replica write of mkfs took over 5 s, node-a was dropped as failing, and the kill of
# node-b then took the last in-sync replica: every write failed (EIO), as it must. The test is
# about the kill, not about a slow replica.
node_start() {
  local n=$1
  mkdir -p "$D/$n/pool"
  rm -f "$D/$n/api.sock"
  nbd-datapathd --pool "$D/$n/pool" --api "unix://$D/$n/api.sock" --workers 2 --overcommit 8 \
    --nbd-listen "tcp://${IP[$n]}:10809" --nbd-listen "unix://$D/$n/nbd.sock" \
    --nbd-tls-cert "$CERTS/node-node-$n.crt" --nbd-tls-key "$CERTS/node-node-$n.key" \
    --nbd-tls-ca "$CERTS/ca.crt" --node-id "node-$n" --cluster-etcd "$ETCD" \
    --cluster-etcd-insecure --cluster-lease-ttl 10 --attach-io-timeout 30 --replica-timeout 20 \
    --attach-dead-conn-timeout 120 --log-level info >>"$D/$n/datapathd.log" 2>&1 &
  PID[$n]=$!
}
for n in a b t; do node_start "$n"; done
for n in a b t; do vm_wait_socket "$D/$n/api.sock" "${PID[$n]}" "node-$n: nbd-datapathd"; done
step "three datapaths up (node-a ${IP[a]}, node-b ${IP[b]}, node-t ${IP[t]})"

for n in a b; do ctl "$n" volume create rv --size "$SIZE" >/dev/null || fail "node-$n: volume create"; done
state=$(nbdcsi-cluster-tool --etcd "$ETCD" create-volume rv "$SIZE" node-a node-b) ||
  fail "create-volume: $state"
echo "cluster state: $state"
out=$(ctl t target open rv -o json) || fail "target open: $out"
[ "$(jq -r .epoch <<<"$out")" = 1 ] && [ "$(jq -r .health <<<"$out")" = ok ] ||
  fail "target open: $out"
step "volume rv on node-a and node-b, target open on node-t at epoch 1"

out=$(ctl t attach rv --target -o json) || fail "attach --target: $out"
echo "$out"
DEV=$(jq -r .device <<<"$out") N=${DEV#/dev/}
[ -b "$DEV" ] || fail "attach --target printed no block device"
[ "$(jq -r .target <<<"$out")" = true ] || fail "the attachment is not marked as a target: $out"
[ "$(jq -r .size_bytes <<<"$out")" = "$SIZE_BYTES" ] || fail "attachment size: $out"
[ "$(cat /sys/block/$N/size)" = $((SIZE_BYTES / 512)) ] || fail "$DEV has $(cat /sys/block/$N/size) sectors"
[[ $(cat /sys/block/$N/backend) == nbd-csi:rv:* ]] || fail "/sys/block/$N/backend: $(cat /sys/block/$N/backend)"
[ "$(jq -r .target "$D/t/pool/attachments/rv.json")" = true ] || fail "the record does not say target"
ctl t attachments | grep -E "^rv@target +$DEV " || fail "nbdctl attachments does not list rv@target on $DEV"
again=$(ctl t attach rv --target -o json) || fail "second attach --target: $again"
[ "$(jq -r .device <<<"$again")" = "$DEV" ] || fail "attach --target is not idempotent: $again"
# The catalogue's size has not changed: resizing the attachment grows nothing (vm.csi_replicated
# expands one through CSI).
msg=$(ctl t resize-attachment rv 2>&1) || fail "resize-attachment of a target at its size: $msg"
[ "$(cat /sys/block/$N/size)" = $((SIZE_BYTES / 512)) ] || fail "resize-attachment at the same size changed $DEV: $msg"
step "attached the target as $DEV ($SIZE); resize at the same size is a no-op"

mkfs.ext4 -q -F -E nodiscard "$DEV" || fail "mkfs.ext4"
mount -t ext4 "$DEV" "$MNT" || fail "mount"
step "mkfs.ext4 + mount"

# fio_start FILE: randwrite with crc32c verify on FILE of the mounted ext4, in the background.
# Paced so the kills land mid-run on a fast machine too (TCG is slower than the pace anyway).
FIO_MB=6
fio_start() {
  fio --name=target --filename="$MNT/$1" --size=${FIO_MB}M --bs=4k --rw=randwrite --ioengine=libaio \
    --iodepth=8 --rate_iops=,200 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output-format=json --output="$FIOLOG" 2>"$D/fio.err" &
  FIOPID=$!
  step "fio started on $1 (randwrite ${FIO_MB}M, 4k, iodepth 8, at most 200 IOPS, O_DIRECT, crc32c verify)"
}
# fio_check: waits for fio, which must end with no error and every written byte verified.
fio_check() {
  local rc=0 written verified
  wait "$FIOPID" || rc=$?
  FIOPID=''
  [ "$rc" = 0 ] || fail "fio exited $rc"
  jq -e '.jobs[0].error == 0' "$FIOLOG" >/dev/null || fail "fio reports an error: $(jq -c '.jobs[0].error' "$FIOLOG")"
  written=$(jq '.jobs[0].write.io_bytes' "$FIOLOG") verified=$(jq '.jobs[0].read.io_bytes' "$FIOLOG")
  [ "$written" -ge $((FIO_MB << 20)) ] || fail "fio wrote $written bytes"
  [ "$verified" -ge $((FIO_MB << 20)) ] || fail "fio verified $verified bytes of $written"
  grep -qiE 'verify|bad magic' "$D/fio.err" && fail "fio verify: $(cat "$D/fio.err")"
  echo "fio: write $(jq '.jobs[0].write.iops | floor' "$FIOLOG") IOPS," \
    "clat p50 $(jq '.jobs[0].write.clat_ns.percentile["50.000000"] / 1000 | floor' "$FIOLOG") us," \
    "p99 $(jq '.jobs[0].write.clat_ns.percentile["99.000000"] / 1000 | floor' "$FIOLOG") us," \
    "max $(jq '.jobs[0].write.clat_ns.max / 1000000 | floor' "$FIOLOG") ms;" \
    "verify read $(jq '.jobs[0].read.iops | floor' "$FIOLOG") IOPS; $written bytes written and verified"
  dmesg | grep -qE 'I/O error|Buffer I/O error|blk_update_request' && fail "the kernel logged I/O errors"
  return 0
}

fio_start fio1.dat
sleep 6
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended before the kill: the run is too short to test anything"
t_kill=$(ms_now)
kill -9 "${PID[b]}"
wait "${PID[b]}" 2>/dev/null || true
unset 'PID[b]'
step "node-b's datapath killed (-9) under fio"
t_degraded=''
for _ in $(seq 600); do
  h=$(ctl t target inspect rv -o json 2>/dev/null | jq -r .health) || true
  if [ "$h" = degraded ]; then t_degraded=$(ms_now); break; fi
  sleep 0.05
done
[ -n "$t_degraded" ] || fail "the target did not report itself degraded within 30 s of the kill"
step "target degraded $((t_degraded - t_kill)) ms after the kill"
kill -0 "$FIOPID" 2>/dev/null || echo "note: fio had already finished when the target turned degraded"
fio_check
step "fio done: exit 0, no error, verify clean, no kernel I/O error"

out=$(ctl t target inspect rv -o json) || fail "target inspect: $out"
echo "target: $(jq -c '{health, epoch, in_sync, acked_degraded}' <<<"$out")"
[ "$(jq -c .in_sync <<<"$out")" = '["node-a"]' ] || fail "in_sync after the kill: $out"
[ "$(jq -r .acked_degraded <<<"$out")" -gt 0 ] || fail "no write acknowledged while degraded: $out"
state=$(nbdcsi-cluster-tool --etcd "$ETCD" get-volume rv) || fail "get-volume: $state"
[ "$(jq -c .in_sync <<<"$state")" = '["node-a"]' ] || fail "etcd in_sync: $state"
step "target degraded: in_sync [node-a] in the target and in etcd"

# The target's own datapath dies under I/O: the kernel keeps the device and queues its I/O; the
# restarted daemon reopens the target (its cluster agent starts before the attach recovery) and
# gives the device fresh sockets.
fio_start fio2.dat
sleep 6
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended before the target's kill"
t_kill=$(ms_now)
kill -9 "${PID[t]}"
wait "${PID[t]}" 2>/dev/null || true
node_start t
t_back=''
for _ in $(seq 600); do
  if grep -q 'attach: reconnected /dev/nbd' "$D/t/datapathd.log"; then t_back=$(ms_now); break; fi
  kill -0 "${PID[t]}" 2>/dev/null || fail "node-t: the restarted nbd-datapathd exited"
  sleep 0.05
done
[ -n "$t_back" ] || fail "the restarted target datapath did not reconnect $DEV within 30 s"
grep -E 'reopening the target|attach: reconnected /dev/nbd' "$D/t/datapathd.log" | tail -n 2
step "node-t killed (-9) and restarted under fio: target reopened, $DEV reconnected $((t_back - t_kill)) ms after the kill"
fio_check
step "fio done across the target's restart: exit 0, no error, verify clean, no kernel I/O error"
out=$(ctl t target inspect rv -o json) || fail "target inspect after the restart: $out"
echo "target after the restart: $(jq -c '{health, epoch, in_sync}' <<<"$out")"
[ "$(jq -c .in_sync <<<"$out")" = '["node-a"]' ] || fail "in_sync after the restart: $out"
ctl t attachments | grep -E "^rv@target +$DEV .* ok$" || fail "the attachment is not listed up"

umount "$MNT"
e2fsck -fn "$DEV" >"$D/fsck.log" 2>&1 || { cat "$D/fsck.log"; fail "e2fsck"; }
step "umount, e2fsck clean"

ctl t detach rv || fail "detach rv"
[ "$(cat /sys/block/$N/size)" = 0 ] || fail "$DEV has $(cat /sys/block/$N/size) sectors after detach"
[ ! -e "$D/t/pool/attachments/rv.json" ] || fail "the record survived the detach"
ctl t target inspect rv -o json >/dev/null || fail "the detach closed the target"
ctl t target close rv || fail "target close"
state=$(nbdcsi-cluster-tool --etcd "$ETCD" get-volume rv) || fail "get-volume: $state"
[ "$(jq -r .target <<<"$state")" = "" ] || fail "the claim survived target close: $state"
step "detached (target stayed open), target closed, claim released"

vm_stop_datapaths a t
kill -TERM "$ETCDPID"; wait "$ETCDPID" 2>/dev/null || true; ETCDPID=''
vm_check_datapath_logs "$D"/*/datapathd.log
step "PASS"
