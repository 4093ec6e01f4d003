#!/bin/bash
# The kubelet's view of nbd-csi-node on a real kernel NBD driver. Runs INSIDE the VM
# (test/vm/nbd-kernel-vm ships nbd-datapathd, nbd-csi-node and nbdctl to /opt/bin). Every CSI call
# goes over the node plugin's real gRPC socket, made by `nbdctl csi` exactly as kubelet would make
# it; volumes are created on the datapath directly (no controller in the VM; ids "v1:NODE:NAME").
#
#   1. ext4 and xfs: stage (mkfs only on a blank device), publish, write + checksum, online expand
#      seen by df, read-only publish, unpublish, unstage; every call retried (idempotent); nothing
#      left attached or mounted afterwards
#   2. block mode: the device bind-mounted onto a file, data through it, expand seen by blockdev
#   3. restart scenario: fio with verify on a mounted volume while nbd-datapathd is killed -9 and
#      restarted, then nbd-csi-node is killed -9 and restarted: fio finishes with no error and a
#      clean verify, the kernel log shows the reconnect and no I/O error, and the restarted node
#      plugin serves the staged volume (idempotent stage, stats, condition normal)
. /opt/lib/nbdcsi-vm.sh

D=/tmp/csi POOL=/tmp/csi/pool API=/tmp/csi/api.sock SOCK=/tmp/csi/nbd.sock CSI=/tmp/csi/node.sock
DLOG=/tmp/csi/datapathd.log NLOG=/tmp/csi/node.log FIOLOG=/tmp/csi/fio.log
NODE=vm-node
DPID='' NPID='' FIOPID=''
fail() {
  echo "FAIL: $*"
  echo "---- datapathd log (last 30 lines) ----"; tail -n 30 "$DLOG" 2>/dev/null || true
  echo "---- nbd-csi-node log (last 30 lines) ----"; tail -n 30 "$NLOG" 2>/dev/null || true
  echo "---- fio (last 20 lines) ----"; tail -n 20 "$FIOLOG" 2>/dev/null || true
  echo "---- kernel log, nbd and I/O lines (last 30) ----"
  dmesg | grep -iE 'nbd|I/O error|blk_update|EXT4-fs|XFS' | tail -n 30 || true
  exit 1
}
nbdctl() { command nbdctl --api "unix://$API" --timeout 30 "$@"; }
csi() { command nbdctl csi --endpoint "unix://$CSI" --timeout 120 node "$@"; }

datapath_start() {
  rm -f "$API" "$SOCK"
  nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$SOCK" --workers 2 \
    --overcommit 16 --attach-io-timeout 5 --attach-dead-conn-timeout 120 >>"$DLOG" 2>&1 &
  DPID=$!
  for _ in $(seq 300); do
    [ -S "$API" ] && return 0
    kill -0 "$DPID" 2>/dev/null || fail "nbd-datapathd exited during startup"
    sleep 0.1
  done
  fail "nbd-datapathd did not create $API in 30 s"
}
node_start() {
  # $D stands in for /var/lib/kubelet: every staging and target path lies beneath it.
  nbd-csi-node --csi-endpoint "unix://$CSI" --node-id "$NODE" --datapath "unix://$API" \
    --kubelet-root "$D" >>"$NLOG" 2>&1 &
  NPID=$!
  for _ in $(seq 300); do
    [ -S "$CSI" ] && command nbdctl csi --endpoint "unix://$CSI" identity probe >/dev/null 2>&1 && return 0
    kill -0 "$NPID" 2>/dev/null || fail "nbd-csi-node exited during startup"
    sleep 0.1
  done
  fail "nbd-csi-node not ready in 30 s"
}
# twice CMD...: kubelet retries everything; the second call must succeed and change nothing.
twice() { "$@" >/dev/null || fail "$*"; "$@" >/dev/null || fail "retry of: $*"; }
attached_device() {  # attached_device NAME -> /dev/nbdN or ""
  nbdctl -o json attachments | jq -r --arg v "$1" '.attachments[] | select(.volume == $v) | .device'
}
assert_detached() {  # assert_detached NAME DEV
  [ -z "$(attached_device "$1")" ] || fail "$1 is still attached"
  [ "$(cat "/sys/block/${2#/dev/}/size")" = 0 ] || fail "$2 still has a size after unstage"
  findmnt -rn -S "$2" >/dev/null && fail "$2 is still mounted"
  return 0
}
df_bytes() { df -P -k "$1" | awk 'NR == 2 { print $2 * 1024 }'; }  # busybox df: no --output
sum_dir() { (cd "$1" && find . -type f -name 'f*' | sort | xargs sha256sum | sha256sum | cut -d' ' -f1); }

mkdir -p "$D"
dmesg -c >/dev/null
datapath_start
node_start
command nbdctl csi --endpoint "unix://$CSI" -o json node info | tee /tmp/csi/info.json
[ "$(jq -r .node_id /tmp/csi/info.json)" = "$NODE" ] || fail "NodeGetInfo node_id"
[ "$(jq -r '.max_volumes_per_node' /tmp/csi/info.json)" -ge 1 ] || fail "NodeGetInfo max_volumes_per_node"
step "nbd-datapathd and nbd-csi-node up"

# ---- 1. the kubelet sequence, ext4 then xfs ----
fs_sequence() {
  local fs=$1 name=vol-$1 id="v1:$NODE:vol-$1"
  local stg=$D/staging/$name tgt=$D/pods/$name/mount tro=$D/pods/$name-ro/mount
  nbdctl volume create "$name" --size 1Gi >/dev/null
  mkdir -p "$stg"
  twice csi stage "$id" --staging-path "$stg" --fs-type "$fs"
  local dev; dev=$(attached_device "$name")
  [[ $dev == /dev/nbd* ]] || fail "$fs: not attached through kernel NBD: '$dev'"
  [ "$(nbdctl -o json attachments | jq -r --arg v "$name" '.attachments[] | select(.volume == $v) | .mode')" = kernel ] ||
    fail "$fs: attachment mode is not kernel"
  [ "$(findmnt -n -o FSTYPE "$stg")" = "$fs" ] || fail "$fs: staging is not a $fs mount"
  twice csi publish "$id" --staging-path "$stg" --target-path "$tgt"
  mkdir -p "$tgt/data"
  for i in 1 2 3; do head -c $((4 << 20)) /dev/urandom >"$tgt/data/f$i"; done
  sync
  local sum; sum=$(sum_dir "$tgt/data")
  step "$fs: staged on $dev, published, 12 MiB written"

  # Online expansion: the volume grows in the datapath (what ControllerExpandVolume does), then
  # NodeExpandVolume grows the device and the mounted file system.
  local before after
  before=$(df_bytes "$tgt")
  nbdctl volume resize "$name" --size 2Gi >/dev/null
  twice csi expand "$id" --volume-path "$tgt" --size 2Gi
  after=$(df_bytes "$tgt")
  [ "$after" -gt $((before + (900 << 20))) ] || fail "$fs: df did not grow: $before -> $after"
  [ "$(blockdev --getsize64 "$dev")" = $((2 << 30)) ] || fail "$fs: $dev is $(blockdev --getsize64 "$dev") bytes"
  [ "$(sum_dir "$tgt/data")" = "$sum" ] || fail "$fs: data changed across the expansion"
  step "$fs: expanded online: df $((before >> 20)) -> $((after >> 20)) MiB, still mounted"

  # A second, read-only publish of the same staged volume.
  twice csi publish "$id" --staging-path "$stg" --target-path "$tro" --readonly
  [ "$(sum_dir "$tro/data")" = "$sum" ] || fail "$fs: read-only publish shows other data"
  if touch "$tro/data/nope" 2>/dev/null; then fail "$fs: wrote through a read-only publish"; fi
  twice csi unpublish "$id" --target-path "$tro"
  step "$fs: read-only publish: same data, writes refused"

  twice csi unpublish "$id" --target-path "$tgt"
  findmnt -rn "$tgt" >/dev/null && fail "$fs: target still mounted"
  twice csi unstage "$id" --staging-path "$stg"
  assert_detached "$name" "$dev"
  # Stage again: the file system is kept (no mkfs on a formatted device), the data is there.
  twice csi stage "$id" --staging-path "$stg" --fs-type "$fs"
  twice csi publish "$id" --staging-path "$stg" --target-path "$tgt"
  [ "$(sum_dir "$tgt/data")" = "$sum" ] || fail "$fs: data lost across unstage/stage (reformatted?)"
  twice csi unpublish "$id" --target-path "$tgt"
  twice csi unstage "$id" --staging-path "$stg"
  dev=$(nbdctl volume inspect "$name" >/dev/null && echo ok)
  nbdctl volume delete "$name" >/dev/null || fail "$fs: volume delete after unstage"
  step "$fs: unpublish + unstage leave nothing; restage keeps the data"
}
fs_sequence ext4
fs_sequence xfs

# ---- 2. block mode ----
nbdctl volume create vol-blk --size 256Mi >/dev/null
BID="v1:$NODE:vol-blk" BSTG=$D/staging/vol-blk BTGT=$D/pods/vol-blk/dev
mkdir -p "$BSTG"
twice csi stage "$BID" --staging-path "$BSTG" --block
BDEV=$(attached_device vol-blk)
twice csi publish "$BID" --staging-path "$BSTG" --target-path "$BTGT" --block
[ -b "$BTGT" ] || fail "block: $BTGT is not a block device node"
head -c $((16 << 20)) /dev/urandom >/tmp/csi/blk.bin
dd if=/tmp/csi/blk.bin of="$BTGT" bs=1M oflag=direct status=none
dd if="$BDEV" of=/tmp/csi/blk.back bs=1M count=16 iflag=direct status=none  # no /dev/fd in the VM
cmp /tmp/csi/blk.back /tmp/csi/blk.bin || fail "block: data differs"
nbdctl volume resize vol-blk --size 512Mi >/dev/null
twice csi expand "$BID" --volume-path "$BTGT" --size 512Mi --block
[ "$(blockdev --getsize64 "$BTGT")" = $((512 << 20)) ] || fail "block: size after expand $(blockdev --getsize64 "$BTGT")"
twice csi unpublish "$BID" --target-path "$BTGT"
twice csi unstage "$BID" --staging-path "$BSTG"
assert_detached vol-blk "$BDEV"
nbdctl volume delete vol-blk >/dev/null
step "block: published as a device node, 16 MiB verified, expanded to 512 MiB, cleaned up"

# ---- 3. restarts under live I/O ----
vm_csi_stage_publish vol-live
LDEV=$(attached_device vol-live)
fio --name=live --filename="$LTGT/fio.dat" --size=32M --bs=4k --rw=randwrite --ioengine=libaio \
  --iodepth=8 --rate_iops=,250 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 --output="$FIOLOG" &
FIOPID=$!
step "fio started on $LDEV (randwrite 32M, 250 IOPS so it outlasts both kills, O_DIRECT, crc32c verify)"
sleep 5
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended before the first kill"
n_before=$(grep -c 'attach: reconnected /dev/nbd' "$DLOG" || true)
kill -KILL "$DPID"; wait "$DPID" 2>/dev/null || true
step "nbd-datapathd killed -9 under fio"
datapath_start
[ "$(grep -c 'attach: reconnected /dev/nbd' "$DLOG" || true)" -gt "$n_before" ] ||
  fail "the restarted datapath did not reconnect $LDEV"
step "nbd-datapathd restarted: $(grep 'attach: reconnected /dev/nbd' "$DLOG" | tail -n 1 | sed 's/.*attach: //')"
sleep 3
kill -KILL "$NPID"; wait "$NPID" 2>/dev/null || true
rm -f "$CSI"
step "nbd-csi-node killed -9 under fio"
sleep 2
node_start
# The restarted plugin rebuilds its view from the kernel and the datapath: a kubelet retry of stage
# and publish succeeds without touching the device, and stats see a healthy volume.
csi stage "$LID" --staging-path "$LSTG" --fs-type ext4 >/dev/null || fail "stage after node restart"
csi publish "$LID" --staging-path "$LSTG" --target-path "$LTGT" >/dev/null || fail "publish after node restart"
[ "$(attached_device vol-live)" = "$LDEV" ] || fail "the node restart changed the device"
command nbdctl csi --endpoint "unix://$CSI" -o json node stats "$LID" --volume-path "$LTGT" >/tmp/csi/stats.json ||
  fail "stats after node restart"
jq -e '.volume_condition.abnormal != true' /tmp/csi/stats.json >/dev/null || fail "abnormal condition: $(cat /tmp/csi/stats.json)"
step "nbd-csi-node restarted: stage/publish idempotent, stats normal"
vm_fio_check "$FIOPID" "$FIOLOG"
step "fio done: exit 0, err=0, verify clean"
dmesg | grep -iE 'nbd' | tail -n 20 || true
dmesg | grep -qE 'I/O error|Buffer I/O error|blk_update_request' && fail "the kernel logged I/O errors"
dmesg | grep -q "reconnected socket" || fail "the kernel log shows no reconnect"
step "kernel log: reconnect, no I/O errors"

csi unpublish "$LID" --target-path "$LTGT" >/dev/null || fail "unpublish vol-live"
csi unstage "$LID" --staging-path "$LSTG" >/dev/null || fail "unstage vol-live"
assert_detached vol-live "$LDEV"
kill -TERM "$NPID"; wait "$NPID" || fail "nbd-csi-node exited $? on SIGTERM"
kill -TERM "$DPID"; wait "$DPID" || fail "nbd-datapathd exited $? on SIGTERM"
step "PASS"
