#!/usr/bin/env bash
# `nbdctl cluster volumes|snapshots` with replicated volumes: a real etcd, nbd-csi-controller with
# --cluster-etcd and two real nbd-datapathd (n1 on 127.0.0.2, n2 on 127.0.0.3) in the cluster
# state; a replicated volume made through the controller's CSI CreateVolume (replicas=2) shows up
# once under `replicated` (replicas, in sync, healthy) and as a copy on each node (replica_of),
# and its snapshot names the r1 volume as its source. Then n2 is killed -9: the volume turns
# abnormal (its replica node is not registered) once n2 expires. Plaintext on loopback: the
# mutual TLS of the same service is integration.cluster_view's.
. "$(dirname "$0")/lib.sh"
need jq etcd python3
is_datapathd || skip "the cluster view is nbd-csi-controller's"
[ -x "$NBDCSI_BIN/nbd-csi-controller" ] || skip "needs nbd-csi-controller in $NBDCSI_BIN"
lib_init

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
REG=$(free_port) API1=$(free_port) API2=$(free_port) EC=$(free_port) EP=$(free_port)
HB=300 TTL=2500
ETCD=127.0.0.1:$EC

step "etcd, the controller with --cluster-etcd, two datapaths in the cluster state"
bg etcd --name cv --data-dir "$W/etcd" --listen-client-urls "http://$ETCD" \
  --advertise-client-urls "http://$ETCD" --listen-peer-urls "http://127.0.0.1:$EP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$EP" --initial-cluster "cv=http://127.0.0.1:$EP" \
  >"$W/etcd.log" 2>&1
wait_for 30 grep -q 'ready to serve client requests' "$W/etcd.log" || die "etcd not ready: $(tail "$W/etcd.log")"
bg "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$W/ctl.sock" \
  --registry-listen "127.0.0.1:$REG" --insecure --heartbeat-interval $HB --heartbeat-ttl $TTL \
  --cluster-etcd "$ETCD" --cluster-etcd-insecure >>"$W/controller.log" 2>&1
wait_for 15 test -S "$W/ctl.sock" || die "controller did not start: $(cat "$W/controller.log")"
declare -A DP_PID
start_dp() {  # start_dp NODE IP PORT
  local n=$1 ip=$2 port=$3
  mkdir -p "$W/pool-$n"
  bg "$NBDCSI_BIN/nbd-datapathd" --pool "$W/pool-$n" --capacity 1Gi \
    --api "unix://$W/api-$n.sock" --nbd-listen "unix://$W/nbd-$n.sock" \
    --node-id "$n" --advertise "$ip:$port" --controller "127.0.0.1:$REG" --insecure \
    --heartbeat-interval $HB --cluster-etcd "$ETCD" --cluster-etcd-insecure \
    --cluster-lease-ttl 10 >>"$W/datapathd-$n.log" 2>&1
  DP_PID[$n]=$BG_PID
  wait_for 15 test -S "$W/api-$n.sock" || die "datapath $n did not start: $(cat "$W/datapathd-$n.log")"
}
start_dp n1 127.0.0.2 "$API1"
start_dp n2 127.0.0.3 "$API2"
cl() { "$NBDCSI_BIN/nbdctl" --timeout 10 cluster --controller "127.0.0.1:$REG" --insecure "$@"; }
csi() { "$NBDCSI_BIN/nbdctl" csi --timeout 10 --endpoint "unix://$W/ctl.sock" "$@"; }
wait_for 15 sh -c "'$NBDCSI_BIN/nbdctl' -o json cluster --controller 127.0.0.1:$REG --insecure nodes |
  jq -e '[.nodes[] | select(.live)] | length == 2' >/dev/null" || die "both nodes never live"

step "a replicated volume through CSI CreateVolume (replicas=2), a single-node one, a snapshot"
out=
for _ in $(seq 50); do  # UNAVAILABLE until both nodes are alive in the cluster state too
  out=$(csi -o json controller create-volume rv --size 16Mi --param replicas=2 2>&1) && break
  sleep 0.2
done
jq -e '.volume_id == "r1:rv"' <<<"$out" >/dev/null || die "CreateVolume replicas=2: $out"
"$NBDCSI_BIN/nbdctl" --api "unix://$W/api-n1.sock" volume create plain --size 8Mi >/dev/null ||
  die "create plain"
csi -o json controller snapshot create snap --source r1:rv >"$W/snap.out" 2>&1 ||
  die "CreateSnapshot of r1:rv: $(cat "$W/snap.out")"

cl volumes | tee "$W/volumes.txt" || die "cluster volumes failed"
grep -qE "^r1:rv +16Mi +n1,n2 +n1,n2 +- +0 +ok$" "$W/volumes.txt" || die "the replicated row"
grep -qE "^n1 +rv .* r1:rv +ok$" "$W/volumes.txt" || die "n1's copy"
grep -qE "^n2 +rv .* r1:rv +ok$" "$W/volumes.txt" || die "n2's copy"
grep -qE "^n1 +plain .* - +ok$" "$W/volumes.txt" || die "the single-node volume"
cl -o json volumes >"$W/volumes.json" || die "cluster volumes -o json"
jqx '.replicated | length == 1' <"$W/volumes.json"
jqx '.replicated[0] | .volume_id == "r1:rv" and .name == "rv" and .size_bytes == 16777216 and .replicas == ["n1","n2"] and .in_sync == ["n1","n2"] and .target == null and .condition.abnormal == false' <"$W/volumes.json"
jqx '[.volumes[] | select(.name == "rv") | [.node, .replica_of]] == [["n1","r1:rv"],["n2","r1:rv"]]' <"$W/volumes.json"
jqx '[.volumes[] | select(.name == "plain")][0].replica_of == null' <"$W/volumes.json"
jqx '.catalogue_error == null' <"$W/volumes.json"
cl -o json snapshots >"$W/snaps.json" || die "cluster snapshots -o json"
jqx '.snapshots | length == 1' <"$W/snaps.json"
jqx '.snapshots[0] | .name == "snap" and .source_volume_id == "r1:rv" and .source_volume == "rv"' <"$W/snaps.json"

step "n2 killed -9: once it expires the replicated volume is abnormal, n1's copy still listed"
kill -9 "${DP_PID[n2]}"
wait "${DP_PID[n2]}" 2>/dev/null || true
wait_for 15 sh -c "'$NBDCSI_BIN/nbdctl' -o json cluster --controller 127.0.0.1:$REG --insecure volumes |
  jq -e '.nodes[1].live == false and .replicated[0].condition.abnormal' >/dev/null" ||
  die "rv never abnormal: $(cl -o json volumes)"
cl -o json volumes >"$W/down.json"
jq -c '.replicated[0].condition' "$W/down.json"
jqx '.replicated[0].condition.message | contains("replica node n2 is not registered")' <"$W/down.json"
jqx '[.volumes[].node] | unique == ["n1"]' <"$W/down.json"
cl volumes | grep -q "^node n2: not listed: heartbeat expired" || die "the table does not name n2"
step "done"
