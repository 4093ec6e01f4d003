#!/bin/bash
# The CSI node plugin on a replicated volume (issue 16, CSI id "r1:NAME"), INSIDE the VM
# (cluster_run.sh ships nbd-datapathd, nbd-csi-node, nbd-csi-controller, nbdctl,
# nbdcsi-cluster-tool, etcd and the node certificates). Every CSI call goes over a real gRPC
# socket, made by `nbdctl csi` as the provisioner and kubelet would make it. Loopback and the
# guest's tmpfs only:
#
#   - etcd; nbd-csi-controller with --cluster-etcd; nbd-datapathd on node-a (127.0.0.11), node-b
#     (127.0.0.12), node-t (127.0.0.13), each with its node certificate and --cluster-etcd,
#     heartbeating to the controller; nbd-csi-node on node-t and on node-b, each on its own
#     datapath and kubelet root
#   - CreateVolume rv with the StorageClass parameter replicas=2 (twice: the same r1 id): the
#     controller places the copies on node-a and node-b (node-t has no room for one) and records
#     the volume in etcd; node-t holds no copy
#   - node-t: NodeStage r1:rv ext4 (its datapath opens the target, claims rv in etcd, attaches
#     /dev/nbdN to it), NodePublish, files written and checksummed; each call twice
#   - node-b's stage meanwhile: refused UNAVAILABLE, naming node-t as the holder; nothing left
#     open or attached on node-b
#   - online expansion to 128Mi: ControllerExpandVolume (twice) grows both copies and etcd's
#     record, NodeExpandVolume on node-t (twice) grows its target, /dev/nbdN and the mounted ext4
#   - fio randwrite with crc32c verify on node-t while node-a's datapath is killed -9: fio ends with
#     no error, no kernel I/O error, and NodeGetVolumeStats reports the volume abnormal (degraded)
#   - node-t: NodeUnpublish + NodeUnstage, twice: device gone, target closed, claim released in etcd
#   - node-b: NodeStage + NodePublish of the same id, twice: every checksum matches (its target
#     runs on its own replica, the only one in sync), stats abnormal (node-a still down); then
#     unpublish + unstage, twice: nothing attached or open anywhere, no claim
#   - DeleteVolume (twice): node-b's copy and the etcd record go; node-a, dead for good by then
#     (no heartbeat, lease expired), is skipped
# Reported: the time from the kill to the degraded condition, and fio's worst write latency.
. /opt/lib/nbdcsi-vm.sh

D=/tmp/cr ETCD=127.0.0.1:2379 CERTS=/opt/certs FIOLOG=/tmp/cr/fio.json
ID=r1:rv SIZE=64Mi
declare -A IP=([a]=127.0.0.11 [b]=127.0.0.12 [t]=127.0.0.13) PID=() NPID=()
ETCDPID='' FIOPID=''
fail() {
  echo "FAIL: $*"
  for n in t b a; do
    echo "---- node-$n nbd-csi-node log (last 15 lines) ----"; tail -n 15 "$D/$n/node.log" 2>/dev/null || true
    echo "---- node-$n datapathd log (first 20 warnings and errors, last 10 lines) ----"
    grep -E ' (warning|error|critical) ' "$D/$n/datapathd.log" 2>/dev/null | head -n 20 || true
    echo ...; tail -n 10 "$D/$n/datapathd.log" 2>/dev/null || true
  done
  echo "---- controller log (last 15 lines) ----"; tail -n 15 "$D/controller.log" 2>/dev/null || true
  echo "---- etcd log (last 5 lines) ----"; tail -n 5 "$D/etcd.log" 2>/dev/null || true
  echo "---- fio ----"; tail -n 20 "$D/fio.err" 2>/dev/null || true
  echo "---- kernel log, nbd and I/O lines (last 20) ----"
  dmesg | grep -iE 'nbd|I/O error|blk_update|EXT4-fs' | tail -n 20 || true
  cleanup
  exit 1
}
cleanup() {
  [ -n "$FIOPID" ] && kill -9 "$FIOPID" 2>/dev/null
  for m in $(findmnt -rn -o TARGET | grep "^$D/" | sort -r); do umount -l "$m" 2>/dev/null; done
  for n in "${!NPID[@]}"; do kill -9 "${NPID[$n]}" 2>/dev/null || true; done
  for n in "${!PID[@]}"; do kill -9 "${PID[$n]}" 2>/dev/null || true; done
  [ -n "$ETCDPID" ] && kill -9 "$ETCDPID" 2>/dev/null
  return 0
}
ctl() { local n=$1; shift; nbdctl --api "unix://$D/$n/api.sock" --timeout 20 "$@"; }
csi() { local n=$1; shift; nbdctl csi --endpoint "unix://$D/$n/csi.sock" --timeout 120 node "$@"; }
ctlr() { nbdctl csi --endpoint "unix://$D/controller.sock" --timeout 60 "$@"; }
# twice NODE CALL ARGS...: kubelet retries everything; the retry must succeed and change nothing.
twice() { csi "$@" >/dev/null || fail "node-$1: $*"; csi "$@" >/dev/null || fail "node-$1: retry of $*"; }
ms_now() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }
stg() { echo "$D/$1/kubelet/plugins/nbd.csi.io/rv/globalmount"; }
tgt() { echo "$D/$1/kubelet/pods/p-$1/volumes/rv/mount"; }
claim() { nbdcsi-cluster-tool --etcd "$ETCD" get-volume rv | jq -r .target; }
target_device() {  # target_device NODE -> /dev/nbdN of rv's target attachment, or ""
  ctl "$1" -o json attachments | jq -r '.attachments[] | select(.volume == "rv" and .target) | .device'
}
sum_all() { (cd "$1" && find . -type f \( -name 'f*' -o -name '*.dat' \) | sort | xargs sha256sum | sha256sum | cut -d' ' -f1); }
# nothing_left NODE DEV: no attachment, no target, DEV has no size and no mount on NODE.
nothing_left() {
  [ "$(ctl "$1" -o json attachments | jq '.attachments | length')" = 0 ] ||
    fail "node-$1: still attached: $(ctl "$1" attachments)"
  [ "$(ctl "$1" -o json target list | jq '.targets | length')" = 0 ] || fail "node-$1: a target is still open: $(ctl "$1" target list)"
  [ "$(cat "/sys/block/${2#/dev/}/size")" = 0 ] || fail "node-$1: $2 still has a size"
  findmnt -rn -S "$2" >/dev/null && fail "node-$1: $2 is still mounted"
  return 0
}

mkdir -p "$D"
dmesg -c >/dev/null
vm_etcd_start "$D" "$ETCD"

# --replica-timeout 20 (default 5) and an attach I/O timeout above it: under TCG on a loaded host
# a 1 MiB replica write of mkfs can take longer than 5 s; one run with the defaults had mkfs fail
# with EIO on the target (its replica writes timing out, it seems; the log was not kept).
nbd-csi-controller --csi-endpoint "unix://$D/controller.sock" --registry-listen 127.0.0.1:9820 \
  --insecure --heartbeat-interval 500 --cluster-etcd "$ETCD" --cluster-etcd-insecure \
  >>"$D/controller.log" 2>&1 &
NPID[controller]=$!
# node-t's pool is too small for a copy of rv (4 MiB times --overcommit 8 < 64 MiB): the
# controller places it on node-a and node-b.
declare -A CAP=([a]=256Mi [b]=256Mi [t]=4Mi)
for n in a b t; do
  mkdir -p "$D/$n/pool" "$D/$n/kubelet"
  nbd-datapathd --pool "$D/$n/pool" --api "unix://$D/$n/api.sock" --workers 2 --overcommit 8 --capacity "${CAP[$n]}" \
    --controller 127.0.0.1:9820 --advertise "${IP[$n]}:9821" --insecure --heartbeat-interval 500 \
    --nbd-listen "tcp://${IP[$n]}:10809" --nbd-listen "unix://$D/$n/nbd.sock" \
    --nbd-tls-cert "$CERTS/node-node-$n.crt" --nbd-tls-key "$CERTS/node-node-$n.key" \
    --nbd-tls-ca "$CERTS/ca.crt" --node-id "node-$n" --cluster-etcd "$ETCD" \
    --cluster-etcd-insecure --cluster-lease-ttl 10 --attach-io-timeout 30 --replica-timeout 20 \
    --attach-dead-conn-timeout 120 --log-level info >>"$D/$n/datapathd.log" 2>&1 &
  PID[$n]=$!
done
for n in a b t; do vm_wait_socket "$D/$n/api.sock" "${PID[$n]}" "node-$n: nbd-datapathd"; done
# The node plugins of the two nodes that stage it; $D/$n/kubelet stands in for /var/lib/kubelet.
for n in t b; do
  nbd-csi-node --csi-endpoint "unix://$D/$n/csi.sock" --node-id "node-$n" \
    --datapath "unix://$D/$n/api.sock" --kubelet-root "$D/$n/kubelet" >>"$D/$n/node.log" 2>&1 &
  NPID[$n]=$!
done
for n in t b; do
  for _ in $(seq 300); do
    [ -S "$D/$n/csi.sock" ] && nbdctl csi --endpoint "unix://$D/$n/csi.sock" identity probe >/dev/null 2>&1 && break
    kill -0 "${NPID[$n]}" 2>/dev/null || fail "node-$n: nbd-csi-node exited during startup"
    sleep 0.1
  done
done
step "etcd, three datapaths (node-a, node-b, node-t) and the node plugins of node-t and node-b up"

# The provisioner's CreateVolume for a StorageClass with replicas: "2"; UNAVAILABLE until every
# datapath has heartbeated, then the r1 id, the same on a retry.
for _ in $(seq 100); do
  out=$(ctlr -o json controller create-volume rv --size "$SIZE" --param replicas=2 --fs-type ext4 2>&1) && break
  grep -q UNAVAILABLE <<<"$out" || fail "CreateVolume: $out"
  sleep 0.3
done
[ "$(jq -r .volume_id <<<"$out")" = "$ID" ] || fail "CreateVolume: not $ID: $out"
again=$(ctlr -o json controller create-volume rv --size "$SIZE" --param replicas=2 --fs-type ext4) ||
  fail "CreateVolume retry: $again"
[ "$(jq -r .volume_id <<<"$again")" = "$ID" ] || fail "CreateVolume retry: $again"
state=$(nbdcsi-cluster-tool --etcd "$ETCD" get-volume rv) || fail "get-volume: $state"
[ "$(jq -c .replicas <<<"$state")" = '["node-a","node-b"]' ] || fail "placement: $state"
for n in a b; do ctl "$n" volume inspect rv >/dev/null || fail "node-$n: no copy of rv"; done
step "CreateVolume replicas=2 (twice): $ID on node-a and node-b: $state"

mkdir -p "$(stg t)" "$(stg b)"
twice t stage "$ID" --staging-path "$(stg t)" --fs-type ext4
DEV=$(target_device t)
[[ $DEV == /dev/nbd* ]] || fail "node-t: the stage attached no target device: $(ctl t attachments)"
[ "$(findmnt -n -o FSTYPE "$(stg t)")" = ext4 ] || fail "node-t: staging is not an ext4 mount"
[ "$(findmnt -n -o SOURCE "$(stg t)")" = "$DEV" ] || fail "node-t: staging is not $DEV"
[ "$(claim)" = node-t ] || fail "etcd: the claim is '$(claim)', not node-t"
[ "$(ctl t -o json target inspect rv | jq -r .epoch)" = 1 ] || fail "node-t: the retry claimed again"
step "node-t: staged $ID on $DEV (target epoch 1, claimed by node-t), stage retried"

# Another node's stage while node-t holds the claim: retryable, and it says who holds it.
if msg=$(csi b stage "$ID" --staging-path "$(stg b)" --fs-type ext4 2>&1); then
  fail "node-b: staged while node-t holds the claim"
fi
grep -q UNAVAILABLE <<<"$msg" && grep -q 'node node-t is its target' <<<"$msg" ||
  fail "node-b: the refusal is not UNAVAILABLE naming node-t: $msg"
[ "$(ctl b -o json target list | jq '.targets | length')" = 0 ] || fail "node-b: the refused stage left a target open"
[ "$(ctl b -o json attachments | jq '.attachments | length')" = 0 ] || fail "node-b: the refused stage left a device"
step "node-b: stage refused while node-t holds it: $(tail -n 1 <<<"$msg" | cut -c1-160)"

twice t publish "$ID" --staging-path "$(stg t)" --target-path "$(tgt t)"
mkdir -p "$(tgt t)/data"
for i in 1 2 3; do head -c $((2 << 20)) /dev/urandom >"$(tgt t)/data/f$i"; done
sync
step "node-t: published, 6 MiB written"

# Online expansion: the controller grows both copies and the catalogue; NodeExpandVolume on
# node-t grows its target (GrowTarget), the device (RECONFIGURE) and ext4, with the fs mounted.
BIG=$((128 << 20))
ctlr controller expand "$ID" --size 128Mi >/dev/null || fail "ControllerExpandVolume"
ctlr controller expand "$ID" --size 128Mi >/dev/null || fail "ControllerExpandVolume retry"
for n in a b; do
  [ "$(ctl $n -o json volume inspect rv | jq .size_bytes)" = $BIG ] || fail "node-$n: the copy did not grow"
done
[ "$(nbdcsi-cluster-tool --etcd "$ETCD" get-volume rv | jq .size_bytes)" = $BIG ] || fail "etcd: the size is not $BIG"
twice t expand "$ID" --volume-path "$(tgt t)" --staging-path "$(stg t)" --size 128Mi
[ "$(ctl t -o json target inspect rv | jq .size_bytes)" = $BIG ] || fail "node-t: the target did not grow"
[ "$(cat "/sys/block/${DEV#/dev/}/size")" = $((BIG >> 9)) ] || fail "node-t: $DEV is $(cat "/sys/block/${DEV#/dev/}/size") sectors"
fs_size=$(df -P -k "$(tgt t)" | awk 'NR == 2 { print $2 * 1024 }')  # busybox df
[ "$fs_size" -gt $((100 << 20)) ] || fail "node-t: ext4 is $fs_size bytes after the expansion"
step "ControllerExpandVolume to 128Mi (twice): both copies and etcd; node-t: NodeExpandVolume (twice) grew the target, $DEV and ext4 ($fs_size bytes) online"

FIO_MB=4
fio --name=rep --filename="$(tgt t)/data/fio.dat" --size=${FIO_MB}M --bs=4k --rw=randwrite \
  --ioengine=libaio --iodepth=8 --rate_iops=,200 --direct=1 --verify=crc32c --verify_fatal=1 \
  --do_verify=1 --output-format=json --output="$FIOLOG" 2>"$D/fio.err" &
FIOPID=$!
sleep 3
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended before the kill: the run is too short to test anything"
t_kill=$(ms_now)
kill -9 "${PID[a]}"
wait "${PID[a]}" 2>/dev/null || true
unset 'PID[a]'
step "node-a's datapath killed (-9) under fio (randwrite ${FIO_MB}M, O_DIRECT, crc32c verify)"
# Polled against the clock: one stats call alone takes a second or more under TCG.
t_abnormal='' cond=''
while [ "$(ms_now)" -lt $((t_kill + 60000)) ]; do
  cond=$(nbdctl csi --endpoint "unix://$D/t/csi.sock" --timeout 20 -o json node stats "$ID" \
    --volume-path "$(tgt t)" | jq -c .volume_condition) || true
  if jq -e '.abnormal == true' <<<"$cond" >/dev/null 2>&1; then t_abnormal=$(ms_now); break; fi
  sleep 0.1
done
[ -n "$t_abnormal" ] || fail "NodeGetVolumeStats did not turn abnormal within 60 s of the kill: $cond"
grep -q 'degraded: 1 of 2 replicas in sync' <<<"$cond" || fail "the condition does not say degraded: $cond"
step "node-t: volume condition abnormal $((t_abnormal - t_kill)) ms after the kill: $cond"

rc=0
wait "$FIOPID" || rc=$?
FIOPID=''
[ "$rc" = 0 ] || fail "fio exited $rc"
jq -e '.jobs[0].error == 0' "$FIOLOG" >/dev/null || fail "fio reports an error"
[ "$(jq '.jobs[0].read.io_bytes' "$FIOLOG")" -ge $((FIO_MB << 20)) ] || fail "fio verified too little"
grep -qiE 'verify|bad magic' "$D/fio.err" && fail "fio verify: $(cat "$D/fio.err")"
dmesg | grep -qE 'I/O error|Buffer I/O error|blk_update_request' && fail "the kernel logged I/O errors"
sync
SUM=$(sum_all "$(tgt t)/data")
step "fio done: exit 0, verify clean, no kernel I/O error, worst write $(jq '.jobs[0].write.clat_ns.max / 1000000 | floor' "$FIOLOG") ms"

twice t unpublish "$ID" --target-path "$(tgt t)"
twice t unstage "$ID" --staging-path "$(stg t)"
nothing_left t "$DEV"
[ "$(claim)" = "" ] || fail "etcd: the claim survived node-t's unstage: $(claim)"
step "node-t: unpublished and unstaged (twice): device gone, target closed, claim released"

twice b stage "$ID" --staging-path "$(stg b)" --fs-type ext4
twice b publish "$ID" --staging-path "$(stg b)" --target-path "$(tgt b)"
BDEV=$(target_device b)
[[ $BDEV == /dev/nbd* ]] || fail "node-b: no target device"
[ "$(claim)" = node-b ] || fail "etcd: the claim is '$(claim)', not node-b"
[ "$(sum_all "$(tgt b)/data")" = "$SUM" ] || fail "node-b sees other data than node-t wrote"
cond=$(nbdctl csi --endpoint "unix://$D/b/csi.sock" --timeout 20 -o json node stats "$ID" \
  --volume-path "$(tgt b)" | jq -c .volume_condition) || fail "node-b: stats"
jq -e '.abnormal == true' <<<"$cond" >/dev/null && grep -q 'degraded: 1 of 2' <<<"$cond" ||
  fail "node-b: node-a is still down, yet the condition is $cond"
step "node-b: staged and published on $BDEV (twice), every checksum matches; $cond"

twice b unpublish "$ID" --target-path "$(tgt b)"
twice b unstage "$ID" --staging-path "$(stg b)"
nothing_left b "$BDEV"
[ "$(claim)" = "" ] || fail "etcd: the claim survived node-b's unstage: $(claim)"
step "node-b: unpublished and unstaged (twice): nothing attached or open, no claim"

# DeleteVolume: node-a is gone for good once its lease (10 s) ran out; until then the delete is
# retried (UNAVAILABLE), as the provisioner would.
for _ in $(seq 100); do
  out=$(ctlr controller delete-volume "$ID" 2>&1) && break
  grep -q UNAVAILABLE <<<"$out" || fail "DeleteVolume: $out"
  sleep 0.5
done
ctlr controller delete-volume "$ID" >/dev/null || fail "DeleteVolume retry"
ctl b volume inspect rv >/dev/null 2>&1 && fail "node-b: the copy survived DeleteVolume"
nbdcsi-cluster-tool --etcd "$ETCD" get-volume rv >/dev/null 2>&1 && fail "etcd: rv survived DeleteVolume"
step "DeleteVolume (twice): node-b's copy and the etcd record gone, node-a skipped"

for n in t b controller; do
  kill -TERM "${NPID[$n]}"
  wait "${NPID[$n]}" || fail "$n exited $? on SIGTERM"
  unset "NPID[$n]"
done
vm_stop_datapaths b t
kill -TERM "$ETCDPID"; wait "$ETCDPID" 2>/dev/null || true; ETCDPID=''
vm_check_datapath_logs "$D"/*/datapathd.log
step "PASS"
