#!/bin/bash
# Fault matrix, process deaths under live I/O on the real kernel NBD driver (issue 12 part 4,
# case 1, the part the host cannot do: fuse attachments do not survive a datapath restart by
# design). Runs INSIDE the VM (test/vm/nbd-kernel-vm ships nbd-datapathd, nbd-csi-controller,
# nbd-csi-node and nbdctl to /opt/bin; faults_launch.sh picks the seed on the host).
#
# The three daemons run as in a cluster: the datapath registers with the controller (plaintext,
# loopback), volumes are made through the controller's CSI socket and staged/published through
# the node plugin's, all with `nbdctl csi` (what the sidecars and kubelet would send). Two
# volumes are busy the whole time: fio on an ext4 file system (4 KiB random writes) and fio on a
# published block device (16 KiB random writes), both with crc32c verification, in rounds that
# each write their region and read it all back. Meanwhile a seeded schedule kills one of the
# three daemons (each once per three events, in a seeded order) with -9 at random instants
# (FAULTS_KILLS events, default 6, 2 to 7 s apart), restarts it, and retries, as the sidecars
# and kubelet would, a CSI call on the live volumes: a snapshot of the busy file system (and its
# delete), an online expansion (ControllerExpandVolume + NodeExpandVolume, resize2fs under fio),
# a volume created and deleted, a stage and publish.
# What it proves:
#   - every fio round ends with no error and a clean verify: no acknowledged write is lost and
#     no I/O error reaches the file system or the block device (the kernel log says the same);
#   - every datapath restart reconnects both devices (RECONFIGURE) before the io timeout runs out;
#   - every retried CSI call succeeds with the right result (ids, sizes, df after expansion);
#   - afterwards e2fsck is clean, unstage leaves nothing attached, the pool has no broken volume
#     and no stray file, and no daemon log shows an engine invariant violation.
# Prints the seed (FAULTS_SEED=N replays the schedule), the kill points and the verified bytes.
. /opt/lib/nbdcsi-vm.sh

D=/tmp/faults POOL=/tmp/faults/pool API=/tmp/faults/api.sock SOCK=/tmp/faults/nbd.sock
CCSI=/tmp/faults/controller.sock NCSI=/tmp/faults/node.sock
DLOG=$D/datapathd.log CLOG=$D/controller.log NLOG=$D/node.log
NODE=vm-node TOPO=topology.nbd.csi.io/node=vm-node
SEED=$(cat /opt/lib/faults-seed 2>/dev/null || echo $$)
KILLS=$(cat /opt/lib/faults-kills 2>/dev/null || echo 6)
RANDOM=$SEED
DPID='' CPID='' NPID='' FIOLOOP=''
fail() {
  echo "FAIL: $* (seed $SEED)"
  for l in "$DLOG" "$CLOG" "$NLOG"; do echo "---- $l (last 25 lines) ----"; tail -n 25 "$l" 2>/dev/null || true; done
  echo "---- fio rounds ----"; cat "$D"/rounds.* 2>/dev/null | tail -n 20 || true
  echo "---- kernel log, nbd and I/O lines (last 30) ----"
  dmesg | grep -iE 'nbd|I/O error|blk_update|EXT4-fs' | tail -n 30 || true
  exit 1
}
ms() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }
nbdctl() { command nbdctl --api "unix://$API" --timeout 30 "$@"; }
ccsi() { command nbdctl csi --endpoint "unix://$CCSI" --timeout 60 "$@"; }
ncsi() { command nbdctl csi --endpoint "unix://$NCSI" --timeout 120 "$@"; }
wait_sock() {  # wait_sock PATH PID WHAT
  for _ in $(seq 300); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || fail "$3 exited during startup"
    sleep 0.1
  done
  fail "$3 did not create $1 in 30 s"
}
datapath_start() {
  rm -f "$API" "$SOCK"
  nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$SOCK" --workers 2 \
    --overcommit 16 --attach-io-timeout 5 --attach-dead-conn-timeout 120 --node-id "$NODE" \
    --advertise 127.0.0.1:9820 --controller 127.0.0.1:9811 --insecure --heartbeat-interval 200 \
    >>"$DLOG" 2>&1 &
  DPID=$!
  wait_sock "$API" "$DPID" nbd-datapathd
}
controller_start() {
  rm -f "$CCSI"
  nbd-csi-controller --csi-endpoint "unix://$CCSI" --registry-listen 127.0.0.1:9811 \
    --heartbeat-interval 200 --insecure >>"$CLOG" 2>&1 &
  CPID=$!
  wait_sock "$CCSI" "$CPID" nbd-csi-controller
}
node_start() {
  rm -f "$NCSI"
  nbd-csi-node --csi-endpoint "unix://$NCSI" --node-id "$NODE" --datapath "unix://$API" --kubelet-root "$D" >>"$NLOG" 2>&1 &
  NPID=$!
  wait_sock "$NCSI" "$NPID" nbd-csi-node
}
# retry WHAT CMD...: until it succeeds (60 s at most), as a sidecar or kubelet would; counts the
# failed attempts in RETRIES. The output of the successful attempt is in $OUT.
RETRIES=0
retry() {
  local what=$1 t0; shift
  t0=$(ms)
  until OUT=$("$@" 2>&1); do
    RETRIES=$((RETRIES + 1))
    grep -qE 'ALREADY_EXISTS|NOT_FOUND|INVALID_ARGUMENT|OUT_OF_RANGE|FAILED_PRECONDITION' <<<"$OUT" &&
      fail "$what: a retry got an answer that ends a sidecar's retries: $OUT"
    [ $(( $(ms) - t0 )) -lt 60000 ] || fail "$what still failing after 60 s: $OUT"
    sleep 0.2
  done
}
attached_device() {
  nbdctl -o json attachments | jq -r --arg v "$1" '.attachments[] | select(.volume == $v) | .device'
}
reconnects() { grep -c 'attach: reconnected /dev/nbd' "$DLOG" || true; }
df_bytes() { df -P -k "$1" | awk 'NR == 2 { print $2 * 1024 }'; }

mkdir -p "$D"
dmesg -c >/dev/null
echo "seed $SEED, $KILLS kill points (replay: FAULTS_SEED=$SEED ctest -R vm.faults_io_restart)"
controller_start
datapath_start
node_start
registered() { ccsi -o json controller capacity --topology "$TOPO" | jq -e '.available_capacity > 0'; }
retry "registration" registered
step "controller, datapath (registered) and node plugin up"

# ---- two busy volumes: ext4 (mount) and a raw block device ----
retry "create vol-fs" ccsi -o json controller create-volume pvc-fs --size 512Mi --topology "$TOPO"
FSID=$(jq -r .volume_id <<<"$OUT")
[ "$FSID" = "v1:$NODE:pvc-fs" ] || fail "CreateVolume id $FSID"
retry "create vol-blk" ccsi -o json controller create-volume pvc-blk --size 256Mi --topology "$TOPO" --block
BID=$(jq -r .volume_id <<<"$OUT")
FSTG=$D/stage/pvc-fs FTGT=$D/pods/fs/mount BSTG=$D/stage/pvc-blk BTGT=$D/pods/blk/dev
mkdir -p "$FSTG" "$BSTG" "$(dirname "$BTGT")"
retry "stage fs" ncsi node stage "$FSID" --staging-path "$FSTG" --fs-type ext4
retry "publish fs" ncsi node publish "$FSID" --staging-path "$FSTG" --target-path "$FTGT"
retry "stage blk" ncsi node stage "$BID" --staging-path "$BSTG" --block
retry "publish blk" ncsi node publish "$BID" --staging-path "$BSTG" --target-path "$BTGT" --block
FDEV=$(attached_device pvc-fs) BDEV=$(attached_device pvc-blk)
[[ $FDEV == /dev/nbd* && $BDEV == /dev/nbd* ]] || fail "not attached through kernel NBD: '$FDEV' '$BDEV'"
[ -b "$BTGT" ] || fail "$BTGT is not a block device"
step "pvc-fs on $FDEV (ext4 at $FTGT), pvc-blk on $BDEV ($BTGT)"

# fio in rounds until told to stop: each round writes its region with crc32c headers and reads
# it all back (do_verify), so every round is a complete check of what was acknowledged.
fio_rounds() {  # fio_rounds NAME FIO-ARGS...
  local name=$1 r=0 rc; shift
  while [ ! -e "$D/stop" ]; do
    r=$((r + 1)); rc=0
    fio --name="$name" "$@" --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c \
      --verify_fatal=1 --do_verify=1 --randseed=$((SEED + r)) --output="$D/fio.$name.$r.log" || rc=$?
    local err; err=$(grep -oE 'err= *[0-9]+' "$D/fio.$name.$r.log" | head -n 1 | grep -oE '[0-9]+$' || echo '?')
    local bad=0; grep -qiE 'verify: bad|crc32c: verify failed|bad magic' "$D/fio.$name.$r.log" && bad=1
    echo "$name round $r: exit $rc err=$err verify_failed=$bad" >>"$D/rounds.$name"
    [ "$rc" = 0 ] && [ "$err" = 0 ] && [ $bad = 0 ] || break
  done
}
# Rate-limited: the VM's two emulated cores also run the three daemons, the restarts and the CSI
# calls; unlimited fio would starve them and measure TCG, not the driver. (Still a request in
# flight at every instant, so every kill lands on live I/O.)
fio_rounds fs --filename="$FTGT/fio.dat" --size=8M --bs=4k --rw=randwrite --rate_iops=200 &
FIOFS=$!
fio_rounds blk --filename="$BTGT" --offset=64M --size=8M --bs=16k --rw=randwrite --rate_iops=100 &
FIOBLK=$!
step "fio rounds running on both volumes"

# ---- the schedule: kill -9 at random instants, then a CSI call retried to success ----
declare -A KILLED=()
EXPANDS=0 SNAPS=0 SCRATCH=0 RESTAGE=0 FS_SIZE=$((512 << 20))
for k in $(seq "$KILLS"); do
  sleep "$((2 + RANDOM % 5)).$((RANDOM % 10))"
  for p in $FIOFS $FIOBLK; do kill -0 "$p" 2>/dev/null || fail "a fio round failed before kill $k: $(tail -n 2 "$D"/rounds.*)"; done
  # Every three kill points take each daemon once, in a seeded order: a schedule that never kills
  # the datapath would prove little.
  if [ $(((k - 1) % 3)) = 0 ]; then
    ORDER=(datapath node controller)
    for i in 2 1; do j=$((RANDOM % (i + 1))); t=${ORDER[$i]}; ORDER[$i]=${ORDER[$j]}; ORDER[$j]=$t; done
  fi
  victim=${ORDER[$(((k - 1) % 3))]}
  KILLED[$victim]=$(( ${KILLED[$victim]:-0} + 1 ))
  case $victim in
    datapath)
      n0=$(reconnects)
      kill -KILL "$DPID"; wait "$DPID" 2>/dev/null || true
      datapath_start
      [ "$(reconnects)" -ge $((n0 + 2)) ] || fail "kill $k: the restarted datapath did not reconnect both devices"
      ;;
    node)
      kill -KILL "$NPID"; wait "$NPID" 2>/dev/null || true
      node_start
      ;;
    controller)
      kill -KILL "$CPID"; wait "$CPID" 2>/dev/null || true
      controller_start
      ;;
  esac
  # A call on the live volumes, right after the restart, retried to success.
  case $((k % 4)) in
    0) SNAPS=$((SNAPS + 1))
       retry "snapshot $k" ccsi -o json controller snapshot create "snap-$k" --source "$FSID"
       sid=$(jq -r .snapshot_id <<<"$OUT")
       [ "$sid" = "s1:$NODE:snap-$k" ] || fail "snapshot id $sid"
       retry "snapshot delete $k" ccsi controller snapshot delete "$sid" ;;
    1) EXPANDS=$((EXPANDS + 1)) FS_SIZE=$((FS_SIZE + (128 << 20)))
       before=$(df_bytes "$FTGT")
       retry "expand $k" ccsi -o json controller expand "$FSID" --size "$FS_SIZE"
       retry "node expand $k" ncsi node expand "$FSID" --volume-path "$FTGT" --size "$FS_SIZE"
       [ "$(blockdev --getsize64 "$FDEV")" = "$FS_SIZE" ] || fail "kill $k: $FDEV is $(blockdev --getsize64 "$FDEV") bytes, want $FS_SIZE"
       after=$(df_bytes "$FTGT")
       [ "$after" -gt "$before" ] || fail "kill $k: df did not grow ($before -> $after)" ;;
    2) SCRATCH=$((SCRATCH + 1))
       retry "scratch create $k" ccsi -o json controller create-volume "pvc-s$k" --size 64Mi --topology "$TOPO"
       retry "scratch delete $k" ccsi controller delete-volume "v1:$NODE:pvc-s$k" ;;
    3) RESTAGE=$((RESTAGE + 1))
       retry "stage again $k" ncsi node stage "$FSID" --staging-path "$FSTG" --fs-type ext4
       retry "publish again $k" ncsi node publish "$FSID" --staging-path "$FSTG" --target-path "$FTGT"
       [ "$(attached_device pvc-fs)" = "$FDEV" ] || fail "kill $k: a retried stage changed the device" ;;
  esac
  step "kill $k: $victim -9 and back; CSI call after it ok"
done

touch "$D/stop"
wait "$FIOFS" || true
wait "$FIOBLK" || true
cat "$D/rounds.fs" "$D/rounds.blk"
grep -v 'exit 0 err=0 verify_failed=0' "$D/rounds.fs" "$D/rounds.blk" && fail "a fio round failed"
RFS=$(wc -l <"$D/rounds.fs") RBLK=$(wc -l <"$D/rounds.blk")
[ "$RFS" -ge 2 ] && [ "$RBLK" -ge 2 ] || fail "too few fio rounds ($RFS, $RBLK) to mean anything"
VERIFIED_MIB=$(( (RFS + RBLK) * 8 ))
step "fio: $RFS + $RBLK rounds, all exit 0, err=0, verify clean ($VERIFIED_MIB MiB written and read back)"
dmesg | grep -iE 'nbd' | tail -n 12 || true
dmesg | grep -qE 'I/O error|Buffer I/O error|blk_update_request|EXT4-fs error' && fail "the kernel logged I/O errors"
step "kernel log: no I/O error"

# ---- teardown through CSI; then nothing may be left ----
retry "unpublish fs" ncsi node unpublish "$FSID" --target-path "$FTGT"
findmnt -rn "$FSTG" >/dev/null || fail "the staging mount is gone before unstage"
umount "$FSTG"   # e2fsck wants it unmounted; unstage then finds nothing mounted (idempotent)
e2fsck -fn "$FDEV" >"$D/fsck.log" 2>&1 || { cat "$D/fsck.log"; fail "e2fsck after the kills"; }
retry "unstage fs" ncsi node unstage "$FSID" --staging-path "$FSTG"
retry "unpublish blk" ncsi node unpublish "$BID" --target-path "$BTGT"
retry "unstage blk" ncsi node unstage "$BID" --staging-path "$BSTG"
[ -z "$(attached_device pvc-fs)$(attached_device pvc-blk)" ] || fail "still attached after unstage"
for id in "$FSID" "$BID"; do retry "delete $id" ccsi controller delete-volume "$id"; done
nbdctl -o json pool info >"$D/pool.json"
[ "$(jq '.broken_volumes | length' "$D/pool.json")" = 0 ] || fail "broken volumes: $(jq -c .broken_volumes "$D/pool.json")"
left=$(ls -A "$POOL/volumes" "$POOL/snapshots" 2>/dev/null | grep -vE '^$|:$' || true)
[ -z "$left" ] || fail "files left in the pool: $left"
step "e2fsck clean, unstaged, deleted, pool empty"

kill -TERM "$NPID"; wait "$NPID" || fail "nbd-csi-node exited $? on SIGTERM"
kill -TERM "$CPID"; wait "$CPID" || fail "nbd-csi-controller exited $? on SIGTERM"
kill -TERM "$DPID"; wait "$DPID" || fail "nbd-datapathd exited $? on SIGTERM"
vm_check_datapath_logs "$DLOG"
echo "faults_io_restart: seed $SEED; kill points $KILLS (datapath ${KILLED[datapath]:-0}," \
  "node plugin ${KILLED[node]:-0}, controller ${KILLED[controller]:-0}); CSI calls after them:" \
  "$SNAPS snapshots, $EXPANDS online expansions, $SCRATCH create+delete, $RESTAGE restages," \
  "$RETRIES failed attempts retried; fio $((RFS + RBLK)) rounds, $VERIFIED_MIB MiB verified, 0 errors"
step "PASS"
