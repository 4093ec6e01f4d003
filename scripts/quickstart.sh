#!/usr/bin/env bash
# The README's first command: installs what is missing, builds, and runs the whole driver on this
# machine with no cluster: nbd-datapathd, nbd-csi-controller and nbd-csi-node, joined the way they
# are in Kubernetes (the datapath registers with the controller over mutual TLS; kubelet and the
# sidecars' calls are made through the real CSI gRPC API with `nbdctl csi`).
#
#   scripts/quickstart.sh [--pool DIR] [--keep] [--no-build]
#   scripts/quickstart.sh --stop
#     --pool DIR    pool directory (default ./.nbd-csi/pool)
#     --keep        leave the daemons and the mounted volumes running at the end, and print how to
#                   poke them and how to stop them
#     --stop        stop what a --keep run left running (unmount, detach, stop the daemons)
#     --no-build    use the binaries already in build/bin (or $NBDCSI_BIN); for the test suite
#
# State lives in ./.nbd-csi (or $NBDCSI_QS_DIR): run/ (sockets, pids, logs), tls/, mnt/. Every run
# first clears what an interrupted or killed earlier run left behind (mounts, devices, daemons).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${NBDCSI_QS_DIR:-$ROOT/.nbd-csi}
POOL=$STATE/pool
KEEP=0
BUILD=1
STOP=0
while [ $# -gt 0 ]; do
  case $1 in
    --pool) POOL=$(realpath -m "$2"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --stop) STOP=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
STATE=$(realpath -m "$STATE")
RUN=$STATE/run
MNT=$STATE/mnt
TLS=$STATE/tls
BIN=${NBDCSI_BIN:-$ROOT/build/bin}
NODE_ID=quickstart-node
TOPO=topology.nbd.csi.io/node=$NODE_ID
CTRL_SOCK=$RUN/controller.sock
NODE_SOCK=$RUN/node.sock
DP_SOCK=$RUN/datapath.sock
NBD_SOCK=$RUN/nbd.sock
SC=$ROOT/examples/storageclass-qos.yaml
TOTAL=11

. "$ROOT/scripts/lib/steps.sh"
say() { echo "      $*"; }
fail() {
  echo >&2
  echo "quickstart: FAILED at step $STEP ($STEP_NAME): $*" >&2
  echo "quickstart: logs: $RUN/*.log (datapath, controller, node)" >&2
  exit 1
}

# --- cleanup: used at the start (leftovers of a killed run) and on every exit -------------------

daemon_pids() {  # pids recorded by this state dir whose process is still ours
  local f pid
  for f in "$RUN"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null) || continue
    [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q -- "$STATE" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
  done
  return 0
}

stop_daemons() {
  local pids pid
  pids=$(daemon_pids)
  [ -z "$pids" ] && { rm -f "$RUN"/*.pid; return 0; }
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 50); do
    local alive=0
    for pid in $pids; do [ -d "/proc/$pid" ] && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  kill -KILL $pids 2>/dev/null || true
  rm -f "$RUN"/*.pid
}

# Unmounts everything below $MNT (deepest first), detaches every loop device whose backing file
# lives under the state or pool directory, and stops nbdfuse processes serving this pool. Kernel
# NBD devices are detached through the datapath before it stops (see teardown_volumes).
# Unmounts everything below $MNT, deepest first (pod binds before their staging mounts).
unmount_pod_paths() {
  local m
  [ -d "$MNT" ] || return 0
  for m in $(findmnt -rn -o TARGET | grep -F -- "$MNT/" | sort -r || true); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

clear_leftovers() {
  local m dev back pid
  unmount_pod_paths
  for m in $(findmnt -rn -o TARGET | grep -F -- "$POOL/" | sort -r || true); do
    losetup -j "$m" -n -O NAME 2>/dev/null | while read -r dev; do losetup -d "$dev" 2>/dev/null || true; done
  done
  losetup -n -O NAME,BACK-FILE 2>/dev/null | while read -r dev back; do
    case $back in "$POOL"/*|"$STATE"/*) losetup -d "$dev" 2>/dev/null || true ;; esac
  done
  for m in $(findmnt -rn -o TARGET | grep -F -- "$POOL/" | sort -r || true); do
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  for pid in $(pgrep -f "nbdfuse.*$RUN" 2>/dev/null || true); do kill -TERM "$pid" 2>/dev/null || true; done
  rm -f "$CTRL_SOCK" "$NODE_SOCK" "$DP_SOCK" "$NBD_SOCK"
}

csi_ctrl() { "$BIN/nbdctl" csi --endpoint "unix://$CTRL_SOCK" "$@"; }
csi_node() { "$BIN/nbdctl" csi --endpoint "unix://$NODE_SOCK" node "$@"; }
nbdctl() { "$BIN/nbdctl" --api "unix://$DP_SOCK" "$@"; }

# Unpublish and unstage every volume this run staged, through the node plugin (as kubelet would),
# so the datapath detaches the devices; then delete what the run created.
VOLUMES=()    # "id staging target" triples of published volumes
CREATED=()    # volume ids
SNAPS=()      # snapshot ids
teardown_volumes() {
  local entry id stg tgt
  for entry in "${VOLUMES[@]}"; do
    read -r id stg tgt <<<"$entry"
    csi_node unpublish "$id" --target-path "$tgt" >/dev/null 2>&1 || true
    csi_node unstage "$id" --staging-path "$stg" >/dev/null 2>&1 || true
  done
  VOLUMES=()
  for id in "${SNAPS[@]}"; do csi_ctrl controller snapshot delete "$id" >/dev/null 2>&1 || true; done
  SNAPS=()
  for id in "${CREATED[@]}"; do csi_ctrl controller delete-volume "$id" >/dev/null 2>&1 || true; done
  CREATED=()
}

on_exit() {
  local rc=$?
  trap - ERR INT TERM
  if [ $KEEP = 1 ] && [ $rc = 0 ]; then exit 0; fi
  if [ -n "$(daemon_pids)" ] && [ ${#VOLUMES[@]} -gt 0 ]; then
    [ $rc = 0 ] || echo "quickstart: cleaning up (unpublish, unstage, stop daemons)" >&2
    teardown_volumes
  fi
  release_all
  exit $rc
}

# What is left when the node plugin could not unpublish/unstage (it died, or --stop after --keep):
# unmount below $MNT, detach every device through the datapath while it runs (the fallback's
# nbdfuse and loop devices go with it), stop the daemons, clear whatever is still there.
release_all() {
  local v
  unmount_pod_paths
  if [ -S "$DP_SOCK" ]; then
    for v in $(nbdctl -o json attachments 2>/dev/null | jq -r '.attachments[].volume' 2>/dev/null); do
      nbdctl detach "$v" >/dev/null 2>&1 || true
    done
  fi
  stop_daemons
  clear_leftovers
}
if [ $STOP = 1 ]; then
  if [ -z "$(daemon_pids)" ]; then echo "quickstart: nothing is running from $STATE"; fi
  release_all
  echo "quickstart: stopped; nothing is left mounted, attached or running from $STATE"
  exit 0
fi
trap on_exit EXIT
trap 'fail "command failed (exit $?): $BASH_COMMAND"' ERR
trap 'echo; echo "quickstart: interrupted at step $STEP ($STEP_NAME)" >&2; exit 130' INT TERM

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2
  shift 2
  for _ in $(seq $((t * 20))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  fail "$what did not happen within ${t}s"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The StorageClass parameters of the example class, as --param k=v flags (csi.storage.k8s.io/
# keys are the provisioner's own and are skipped, as the provisioner itself does).
sc_params() {
  awk '/^parameters:/ { p = 1; next } p && /^[^ ]/ { p = 0 } p && NF >= 2 {
         k = $1; sub(/:$/, "", k); v = $2; gsub(/"/, "", v)
         if (k !~ /^csi\.storage\.k8s\.io\//) printf "--param %s=%s ", k, v }' "$SC"
}

json() { jq -r "$@"; }

# fio IOPS of 4k random writes with O_DIRECT on a file in the mounted volume.
fio_write_iops() {  # fio_write_iops DIR SECONDS
  fio --name=qs --directory="$1" --filename=fio.dat --size=32M --rw=randwrite --bs=4k --direct=1 \
    --ioengine=libaio --iodepth=16 --runtime="$2" --time_based=1 --output-format=json \
    --output="$RUN/fio.json" >/dev/null 2>&1 || fail "fio failed: see $RUN/fio.json"
  jq '.jobs[0].write.iops | floor' "$RUN/fio.json"
}

# ------------------------------------------------------------------------------------------------

step "Install missing packages and build"
if [ $BUILD = 1 ]; then
  ./scripts/deps.sh all
  ./scripts/build.sh >"$STATE.build.log" 2>&1 || { mkdir -p "$RUN"; mv "$STATE.build.log" "$RUN/build.log" 2>/dev/null; fail "build failed: see $RUN/build.log"; }
  rm -f "$STATE.build.log"
else
  say "skipped (--no-build): using $BIN"
fi
for b in nbd-datapathd nbd-csi-controller nbd-csi-node nbdctl; do
  [ -x "$BIN/$b" ] || fail "$BIN/$b is missing: build first (./scripts/build.sh)"
done
done_step

step "Start nbd-datapathd, nbd-csi-controller and nbd-csi-node"
mkdir -p "$RUN" "$MNT" "$POOL"
# A --keep run that is still up, or leftovers of a killed one: clear them first.
if [ -n "$(daemon_pids)" ]; then say "stopping daemons left running by an earlier run"; fi
stop_daemons
clear_leftovers
# Idempotent: a complete set is kept, this node's certificate is added when missing.
"$ROOT/test/tls/make-certs.sh" "$TLS" "$NODE_ID" >/dev/null 2>&1 ||
  fail "could not make certificates in $TLS"
REG_PORT=$(free_port)
API_PORT=$(free_port)
# The datapath's certificate names its node (URI SAN spiffe://nbd.csi.io/node/$NODE_ID): the
# controller takes its heartbeats as that node, and only that certificate when it calls it.
TLS_FLAGS_CTRL=(--tls-cert "$TLS/server.crt" --tls-key "$TLS/server.key" --tls-ca "$TLS/ca.crt")
TLS_FLAGS_NODE=(--tls-cert "$TLS/node-$NODE_ID.crt" --tls-key "$TLS/node-$NODE_ID.key"
                --tls-ca "$TLS/ca.crt")
setsid "$BIN/nbd-csi-controller" --csi-endpoint "unix://$CTRL_SOCK" --registry-listen "127.0.0.1:$REG_PORT" \
  "${TLS_FLAGS_CTRL[@]}" >"$RUN/controller.log" 2>&1 &
echo $! >"$RUN/controller.pid"
setsid "$BIN/nbd-datapathd" --pool "$POOL" --api "unix://$DP_SOCK" --nbd-listen "unix://$NBD_SOCK" \
  --node-id "$NODE_ID" --advertise "127.0.0.1:$API_PORT" --controller "127.0.0.1:$REG_PORT" \
  "${TLS_FLAGS_NODE[@]}" >"$RUN/datapath.log" 2>&1 &
echo $! >"$RUN/datapath.pid"
# Staging and target paths live under $MNT, the stand-in for /var/lib/kubelet.
setsid "$BIN/nbd-csi-node" --csi-endpoint "unix://$NODE_SOCK" --node-id "$NODE_ID" \
  --datapath "unix://$DP_SOCK" --kubelet-root "$MNT" >"$RUN/node.log" 2>&1 &
echo $! >"$RUN/node.pid"
wait_for 10 "the CSI sockets to appear" test -S "$CTRL_SOCK" -a -S "$NODE_SOCK" -a -S "$DP_SOCK"
for d in controller datapath node; do
  [ -d "/proc/$(cat "$RUN/$d.pid")" ] || fail "$d exited: $(tail -3 "$RUN/$d.log")"
done
csi_ctrl identity info | sed 's/^/      /'
# Registration: the datapath heartbeats to the controller over mutual TLS; GetCapacity on the node's
# topology segment is non-zero once the controller knows the node.
capacity() { csi_ctrl -o json controller capacity --topology "$TOPO" | json '.available_capacity // 0'; }
registered() { [ "$(capacity 2>/dev/null || echo 0)" -gt 0 ]; }
wait_for 10 "the datapath's registration with the controller" registered
say "datapath registered: node $NODE_ID, $(( $(capacity) >> 30 )) GiB provisionable (mTLS on 127.0.0.1:$REG_PORT)"
# What an earlier, interrupted run left in the pool is removed, so this run starts from nothing.
for v in $(nbdctl -o json attachments | json '.attachments[].volume'); do nbdctl detach "$v" >/dev/null; done
for s in $(nbdctl -o json snapshot list | json '.snapshots[].name | select(startswith("snapshot-quickstart-"))'); do
  nbdctl snapshot delete "$s" >/dev/null && say "removed snapshot $s left by an earlier run"
done
for v in $(nbdctl -o json volume list | json '.volumes[].name | select(startswith("pvc-quickstart-"))'); do
  nbdctl volume delete "$v" >/dev/null && say "removed volume $v left by an earlier run"
done
BROKEN=$(nbdctl -o json pool info | json '.broken_volumes | length')
[ "$BROKEN" = 0 ] || fail "the pool has broken volumes: $(nbdctl pool info)"
done_step

# ext4 grows online only with CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS); containers often drop it, and
# then xfs (xfs_growfs needs CAP_SYS_ADMIN only) shows the same online expansion.
FS=ext4
if [ $(( (0x$(awk '/^CapEff/ { print $2 }' /proc/self/status) >> 24) & 1 )) = 0 ]; then FS=xfs; fi

step "CreateVolume: 1Gi, QoS from examples/storageclass-qos.yaml, topology"
[ -f "$SC" ] || fail "$SC is missing"
read -r -a PARAMS <<<"$(sc_params)"
say "StorageClass parameters: ${PARAMS[*]}"
VOL1=$(csi_ctrl -o json controller create-volume pvc-quickstart-1 --size 1Gi "${PARAMS[@]}" \
  --topology "$TOPO" --fs-type "$FS" | json '.volume_id') || fail "CreateVolume"
CREATED+=("$VOL1")
csi_ctrl controller get-volume "$VOL1" | sed 's/^/      /'
done_step "$VOL1"

stage_publish() {  # stage_publish ID NAME [--readonly] -> sets TARGET
  local id=$1 name=$2
  shift 2
  local stg=$MNT/staging/$name tgt=$MNT/pods/$name/volume
  mkdir -p "$stg"
  # A restore on a pool without reflink is filled by a background copy; until it is done the node
  # answers UNAVAILABLE and kubelet retries, as this loop does.
  local out i
  for i in $(seq 120); do
    out=$(csi_node stage "$id" --staging-path "$stg" --fs-type "$FS" 2>&1) && break
    grep -q "UNAVAILABLE.*not ready" <<<"$out" || fail "NodeStageVolume $id: $out"
    [ "$i" = 1 ] && say "waiting for the volume to be ready: $out"
    sleep 0.5
  done
  [ "$i" -lt 120 ] || fail "NodeStageVolume $id: still not ready after 60 s: $out"
  VOLUMES+=("$id $stg $tgt")
  csi_node publish "$id" --staging-path "$stg" --target-path "$tgt" "$@" >/dev/null ||
    fail "NodePublishVolume $id"
  TARGET=$tgt
}

step "NodeStageVolume + NodePublishVolume (mkfs, mount, bind into a pod)"
[ $FS = ext4 ] || say "file system: xfs (no CAP_SYS_RESOURCE here, and ext4 needs it to grow online)"
stage_publish "$VOL1" vol1
T1=$TARGET
MODE=$(nbdctl -o json attachments | json --arg v "${VOL1##*:}" '.attachments[] | select(.volume == $v) | .mode')
DEV=$(nbdctl -o json attachments | json --arg v "${VOL1##*:}" '.attachments[] | select(.volume == $v) | .device')
if [ "$MODE" = kernel ]; then
  say "attached through kernel NBD: $DEV"
else
  say "attached through the fallback: nbdfuse + loop device $DEV (this kernel has no nbd.ko)"
fi
findmnt -n -o SOURCE,TARGET,FSTYPE,OPTIONS "$T1" | sed 's/^/      /'
done_step "$MODE $DEV"

step "Write files into the volume and checksum them"
mkdir -p "$T1/data"
for i in 1 2 3 4; do head -c 8M /dev/urandom >"$T1/data/file$i"; done
echo "hello from nbd-csi" >"$T1/data/hello.txt"
sync -f "$T1/data/hello.txt"
SUM1=$(cd "$T1/data" && sha256sum file1 file2 file3 file4 hello.txt | sha256sum | cut -d' ' -f1)
say "5 files, 32 MiB, sha256 of the set: ${SUM1:0:16}..."
done_step

step "CreateSnapshot, then CreateVolume from it (restore)"
SNAP=$(csi_ctrl -o json controller snapshot create snapshot-quickstart-1 --source "$VOL1" |
  json '.snapshot_id') || fail "CreateSnapshot"
SNAPS+=("$SNAP")
snap_ready() { [ "$(csi_ctrl -o json controller snapshot list --id "$SNAP" | json '.snapshots[0].ready_to_use')" = true ]; }
wait_for 60 "the snapshot to become ready" snap_ready
VOL2=$(csi_ctrl -o json controller create-volume pvc-quickstart-restore --size 1Gi "${PARAMS[@]}" \
  --topology "$TOPO" --fs-type "$FS" --from-snapshot "$SNAP" | json '.volume_id') || fail "CreateVolume from snapshot"
CREATED+=("$VOL2")
say "snapshot $SNAP -> volume $VOL2"
done_step

step "Stage and publish the restored volume, verify the checksum"
stage_publish "$VOL2" vol2
T2=$TARGET
SUM2=$(cd "$T2/data" && sha256sum file1 file2 file3 file4 hello.txt | sha256sum | cut -d' ' -f1)
[ "$SUM1" = "$SUM2" ] || fail "checksum mismatch: original ${SUM1:0:16}, restore ${SUM2:0:16}"
say "restore matches: ${SUM2:0:16}..."
done_step "checksums match"

step "Expand the first volume online to 2Gi (Controller + NodeExpandVolume)"
DF_BEFORE=$(df -B1 --output=size "$T1" | tail -1 | tr -d ' ')
csi_ctrl controller expand "$VOL1" --size 2Gi >/dev/null || fail "ControllerExpandVolume"
csi_node expand "$VOL1" --volume-path "$T1" --size 2Gi >/dev/null || fail "NodeExpandVolume"
DF_AFTER=$(df -B1 --output=size "$T1" | tail -1 | tr -d ' ')
say "df size: $((DF_BEFORE >> 20)) MiB -> $((DF_AFTER >> 20)) MiB (still mounted)"
[ "$DF_AFTER" -gt $((DF_BEFORE + (900 << 20))) ] || fail "df did not grow by ~1 GiB: $DF_BEFORE -> $DF_AFTER"
SUM1b=$(cd "$T1/data" && sha256sum file1 file2 file3 file4 hello.txt | sha256sum | cut -d' ' -f1)
[ "$SUM1" = "$SUM1b" ] || fail "data changed across the expansion"
done_step "$((DF_BEFORE >> 20)) -> $((DF_AFTER >> 20)) MiB"

step "Change QoS live (ControllerModifyVolume) and watch the throttle"
CAP1=$(nbdctl -o json volume inspect "${VOL1##*:}" | json '.effective_qos.write_iops')
I1=$(fio_write_iops "$T1" 3)
say "write IOPS cap $CAP1: fio measures $I1"
csi_ctrl controller modify "$VOL1" --param maxWriteIops=1500 >/dev/null ||
  fail "ControllerModifyVolume"
CAP2=$(nbdctl -o json volume inspect "${VOL1##*:}" | json '.effective_qos.write_iops')
I2=$(fio_write_iops "$T1" 3)
say "write IOPS cap $CAP2: fio measures $I2"
rm -f "$T1/fio.dat"
awk -v a="$I1" -v c="$CAP1" 'BEGIN { exit !(a <= c * 1.15) }' || fail "cap $CAP1 not enforced: $I1 IOPS"
awk -v a="$I1" -v b="$I2" 'BEGIN { exit !(b > a * 1.5) }' || fail "raising the cap did not speed writes up: $I1 -> $I2"
done_step "$I1 -> $I2 IOPS"

step "What the operator sees: nbdctl volume list, stats, snapshot list"
nbdctl volume list | sed 's/^/      /'
echo
nbdctl stats "${VOL1##*:}" | sed 's/^/      /'
echo
nbdctl snapshot list | sed 's/^/      /'
echo
csi_ctrl controller list-volumes | sed 's/^/      /'
done_step

if [ $KEEP = 1 ]; then
  TOTAL=$STEP
  printf '\nLeft running (--keep):\n'
  echo "  volumes:     $T1 (vol1), $T2 (restore)"
  echo "  nbdctl:      $BIN/nbdctl --api unix://$DP_SOCK volume list"
  echo "  CSI:         $BIN/nbdctl csi --endpoint unix://$CTRL_SOCK controller list-volumes"
  echo "               $BIN/nbdctl csi --endpoint unix://$NODE_SOCK node stats $VOL1 --volume-path $T1"
  echo "  logs:        $RUN/{datapath,controller,node}.log"
  STOP_CMD="./scripts/quickstart.sh --stop"
  [ -z "${NBDCSI_QS_DIR:-}" ] || STOP_CMD="NBDCSI_QS_DIR=$STATE $STOP_CMD"
  [ "$POOL" = "$STATE/pool" ] || STOP_CMD="$STOP_CMD --pool $POOL"
  echo "  stop:        $STOP_CMD"
else
  step "Tear down: unpublish, unstage, delete all, stop the daemons"
  for entry in "${VOLUMES[@]}"; do
    read -r id stg tgt <<<"$entry"
    csi_node unpublish "$id" --target-path "$tgt" >/dev/null || fail "NodeUnpublishVolume $id"
    csi_node unpublish "$id" --target-path "$tgt" >/dev/null || fail "NodeUnpublishVolume $id (retry)"
    csi_node unstage "$id" --staging-path "$stg" >/dev/null || fail "NodeUnstageVolume $id"
    csi_node unstage "$id" --staging-path "$stg" >/dev/null || fail "NodeUnstageVolume $id (retry)"
  done
  VOLUMES=()
  [ "$(nbdctl -o json attachments | json '.attachments | length')" = 0 ] || fail "devices still attached"
  for id in "${SNAPS[@]}"; do csi_ctrl controller snapshot delete "$id" >/dev/null || fail "DeleteSnapshot"; done
  SNAPS=()
  for id in "${CREATED[@]}"; do
    csi_ctrl controller delete-volume "$id" >/dev/null || fail "DeleteVolume $id"
    csi_ctrl controller delete-volume "$id" >/dev/null || fail "DeleteVolume $id (retry)"
  done
  CREATED=()
  [ "$(nbdctl -o json volume list | json '.volumes | length')" = 0 ] || fail "volumes left in the pool"
  stop_daemons
  if findmnt -rn -o TARGET | grep -qF -- "$MNT/"; then fail "mounts left below $MNT"; fi
  for s in "$CTRL_SOCK" "$NODE_SOCK" "$DP_SOCK" "$NBD_SOCK"; do
    [ ! -e "$s" ] || fail "socket left behind: $s"
  done
  done_step
fi

print_summary
echo "quickstart: OK"
