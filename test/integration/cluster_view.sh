#!/usr/bin/env bash
# `nbdctl cluster nodes|volumes|snapshots` end to end: a real nbd-csi-controller and two real
# nbd-datapathd (nodes n1 on 127.0.0.2, n2 on 127.0.0.3) heartbeating to it over mutual TLS with
# node-bound certificates from test/tls/make-certs.sh; nbdctl asks the controller's ClusterView
# over mutual TLS with the client certificate:
#   - nodes: both live, pool capacity as configured, heartbeat age under the ttl (table and JSON);
#   - volumes and snapshots made through each node's own API show up under their node, with
#     size, allocated bytes, QoS, attachment and condition (table and JSON, checked with jq);
#   - refused: a client without a certificate (the TLS handshake fails; the same handshake with
#     the certificate gets HTTP/2 going), a client certificate from another CA, a plaintext
#     client, a datapath's node certificate (PERMISSION_DENIED); an unreachable controller exits
#     1 naming it; usage errors exit 2;
#   - n2 stopped (SIGSTOP): volumes answers within 3/4 of nbdctl's --timeout, n2 "no answer";
#   - n2 killed -9: listed as not answering (volumes still exit 0 with n1's), then as expired.
. "$(dirname "$0")/lib.sh"
need jq openssl python3
is_datapathd || skip "the cluster view is nbd-csi-controller's"
[ -x "$NBDCSI_BIN/nbd-csi-controller" ] || skip "needs nbd-csi-controller in $NBDCSI_BIN"
lib_init

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
REG=$(free_port) API1=$(free_port) API2=$(free_port)
HB=300      # ms between heartbeats
TTL=4000    # ms: long enough to see a killed node as live-but-unreachable first
C=$W/certs
bash "$NBDCSI_SRC/test/tls/make-certs.sh" "$C" n1 n2 >"$W/make-certs.log" 2>&1 ||
  { cat "$W/make-certs.log" >&2; die "make-certs.sh failed"; }

step "controller (mutual TLS, node binding) and two datapaths heartbeating every $HB ms"
bg "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$W/ctl.sock" \
  --registry-listen "127.0.0.1:$REG" --tls-cert "$C/server.crt" --tls-key "$C/server.key" \
  --tls-ca "$C/ca.crt" --heartbeat-interval $HB --heartbeat-ttl $TTL --datapath-timeout 3000 \
  >>"$W/controller.log" 2>&1
wait_for 15 test -S "$W/ctl.sock" || die "controller did not start: $(cat "$W/controller.log")"
declare -A DP_PID
start_dp() {  # start_dp NODE IP PORT CAPACITY
  local n=$1 ip=$2 port=$3 cap=$4
  mkdir -p "$W/pool-$n"
  bg "$NBDCSI_BIN/nbd-datapathd" --pool "$W/pool-$n" --capacity "$cap" \
    --api "unix://$W/api-$n.sock" --nbd-listen "unix://$W/nbd-$n.sock" \
    --node-id "$n" --advertise "$ip:$port" --controller "127.0.0.1:$REG" \
    --tls-cert "$C/node-$n.crt" --tls-key "$C/node-$n.key" --tls-ca "$C/ca.crt" \
    --heartbeat-interval $HB >>"$W/datapathd-$n.log" 2>&1
  DP_PID[$n]=$BG_PID
  wait_for 15 test -S "$W/api-$n.sock" || die "datapath $n did not start: $(cat "$W/datapathd-$n.log")"
}
start_dp n1 127.0.0.2 "$API1" 1Gi
start_dp n2 127.0.0.3 "$API2" 2Gi
dp() { local n=$1; shift; "$NBDCSI_BIN/nbdctl" --api "unix://$W/api-$n.sock" "$@"; }
TLS=(--controller "127.0.0.1:$REG" --tls-cert "$C/client.crt" --tls-key "$C/client.key"
     --tls-ca "$C/ca.crt")
cl() { "$NBDCSI_BIN/nbdctl" --timeout 10 cluster "${TLS[@]}" "$@"; }

wait_for 15 sh -c "'$NBDCSI_BIN/nbdctl' -o json cluster $(printf '%q ' "${TLS[@]}") nodes |
  jq -e '[.nodes[] | select(.live)] | length == 2' >/dev/null" ||
  die "both nodes never live: $(cl nodes 2>&1; tail "$W/controller.log")"

step "cluster nodes: table and JSON"
cl nodes >"$W/nodes.txt" || die "cluster nodes failed"
cat "$W/nodes.txt"
head -1 "$W/nodes.txt" | grep -q "^NODE *ADDRESS *STATE *HEARTBEAT *CAPACITY" || die "nodes header"
grep -qE "^n1 +127\.0\.0\.2:$API1 +live " "$W/nodes.txt" || die "n1 row"
grep -qE "^n2 +127\.0\.0\.3:$API2 +live " "$W/nodes.txt" || die "n2 row"
cl nodes -o json >"$W/nodes.json" || die "cluster nodes -o json failed"
jqx ".heartbeat_ttl_ms == $TTL" <"$W/nodes.json"
jqx '[.nodes[].node] == ["n1","n2"]' <"$W/nodes.json"
jqx '.nodes[0].capacity_bytes == 1073741824 and .nodes[1].capacity_bytes == 2147483648' <"$W/nodes.json"
jqx ".nodes | all(.live and .heartbeat_age_ms < $TTL and .provisionable_bytes > 0 and .free_bytes > 0)" <"$W/nodes.json"
jqx '.nodes | all(.version != "" and (.volumes | type) == "number")' <"$W/nodes.json"

step "volumes and snapshots on each node, seen through the controller"
dp n1 volume create va --size 64Mi --max-iops 500 >/dev/null || die "create va"
dp n1 volume create vb --size 16Mi >/dev/null || die "create vb"
dp n2 volume create vc --size 32Mi --max-bps 10Mi >/dev/null || die "create vc"
nbdsh_ok=0
if command -v nbdsh >/dev/null; then
  nbdsh -u "nbd+unix:///va?socket=$W/nbd-n1.sock" -c 'h.pwrite(b"x" * (1 << 20), 0); h.flush()' &&
    nbdsh_ok=1
fi
dp n2 snapshot create sc --volume vc >/dev/null || die "snapshot sc"
if command -v nbdsh >/dev/null; then
  nbdsh -u "nbd+unix:///va?socket=$W/nbd-n1.sock" -c 'import time; time.sleep(30)' &
  HOLD=$!
  LIB_PIDS+=("$HOLD")
  wait_for 10 sh -c "'$NBDCSI_BIN/nbdctl' --api unix://$W/api-n1.sock -o json volume get va |
    jq -e '.open_connections == 1' >/dev/null" || die "the held connection never showed"
fi
cl volumes >"$W/volumes.txt" || die "cluster volumes failed"
cat "$W/volumes.txt"
head -1 "$W/volumes.txt" | grep -q "^NODE *NAME *SIZE *ALLOCATED *IOPS *BPS *ATTACHED *REPLICA-OF *CONDITION" ||
  die "volumes header"
grep -qE "^n1 +va +64Mi .* 500 .* ok$" "$W/volumes.txt" || die "va row"
grep -qE "^n1 +vb +16Mi .* no +- +ok$" "$W/volumes.txt" || die "vb row"
grep -qE "^n2 +vc +32Mi .* 10Mi/s .* ok$" "$W/volumes.txt" || die "vc row"
grep -q "not listed" "$W/volumes.txt" && die "a node did not answer"
cl volumes -o json >"$W/volumes.json" || die "cluster volumes -o json failed"
jqx '[.volumes[] | [.node, .name]] == [["n1","va"],["n1","vb"],["n2","vc"]]' <"$W/volumes.json"
jqx '.volumes[0] | .volume_id == "v1:n1:va" and .size_bytes == 67108864 and .qos.max_iops == 500' <"$W/volumes.json"
jqx '.volumes[2] | .volume_id == "v1:n2:vc" and .qos.max_bps == 10485760' <"$W/volumes.json"
jqx '.volumes | all(.condition.abnormal == false and .condition.message == "volume is healthy" and .replica_of == null)' <"$W/volumes.json"
jqx '.nodes == [{"node":"n1","live":true,"error":null},{"node":"n2","live":true,"error":null}]' <"$W/volumes.json"
jqx '.replicated == [] and .catalogue_error == null' <"$W/volumes.json"
if [ $nbdsh_ok = 1 ]; then
  jqx '.volumes[0] | .allocated_bytes >= 1048576 and .attached == true and .open_connections == 1' <"$W/volumes.json"
  jqx '.volumes[1].attached == false' <"$W/volumes.json"
  grep -qE "^n1 +va .* yes \(1\) " "$W/volumes.txt" || die "va not shown attached"
  kill "$HOLD" 2>/dev/null || true
fi

cl snapshots >"$W/snaps.txt" || die "cluster snapshots failed"
cat "$W/snaps.txt"
grep -qE "^n2 +sc +v1:n2:vc +32Mi " "$W/snaps.txt" || die "sc row"
cl snapshots -o json >"$W/snaps.json" || die "cluster snapshots -o json failed"
jqx '.snapshots | length == 1' <"$W/snaps.json"
jqx '.snapshots[0] | .node == "n2" and .name == "sc" and .snapshot_id == "s1:n2:sc" and .source_volume_id == "v1:n2:vc" and .size_bytes == 33554432 and .created_unix_ns > 0' <"$W/snaps.json"

step "refused: no client certificate, another CA's, plaintext; errors and usage"
# The raw TLS handshake, as any client would make it: with the CA-signed certificate the server
# speaks HTTP/2 (its SETTINGS frame arrives); without one the controller ends the connection
# (with TLS 1.3 the client's side of the handshake completes first; no frame ever comes).
handshake() {  # handshake CERT KEY (empty: none): prints what the server sent first
  python3 - "127.0.0.1" "$REG" "$C/ca.crt" "$1" "$2" <<'PY'
import socket, ssl, sys
host, port, ca, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["h2"])
if cert:
    ctx.load_cert_chain(cert, key)
s = socket.create_connection((host, port), timeout=5)
try:
    t = ctx.wrap_socket(s, server_hostname=host)
    t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    data = t.recv(9)
    print("frame-type-%d" % data[3] if len(data) >= 4 else "refused: closed without a frame")
except (ssl.SSLError, ConnectionError, OSError) as e:
    print("refused: %s" % e)
PY
}
got=$(handshake "$C/client.crt" "$C/client.key")
[ "$got" = frame-type-4 ] || die "the handshake with the client certificate: $got"
got=$(handshake "" "")
case $got in refused:*) ;; *) die "a client without a certificate got in: $got" ;; esac
echo "no certificate: $got"
expect_fail 1 "ended the connection: is --tls-cert signed by the CA" "$NBDCSI_BIN/nbdctl" \
  --timeout 5 cluster --controller "127.0.0.1:$REG" --tls-cert "$C/other/client.crt" \
  --tls-key "$C/other/client.key" \
  --tls-ca "$C/ca.crt" nodes
echo "another CA's certificate: $(cat "$W/err")"
expect_fail 1 "ended the connection" "$NBDCSI_BIN/nbdctl" --timeout 5 cluster \
  --controller "127.0.0.1:$REG" --insecure nodes
echo "plaintext: $(cat "$W/err")"
# Node binding is on (each datapath its own certificate): a datapath's certificate gets through
# the handshake (the CA signed it) but may not read the whole cluster.
expect_fail 1 "PERMISSION_DENIED: the client certificate is node n1's" "$NBDCSI_BIN/nbdctl" \
  --timeout 5 cluster --controller "127.0.0.1:$REG" --tls-cert "$C/node-n1.crt" \
  --tls-key "$C/node-n1.key" --tls-ca "$C/ca.crt" volumes
grep -q "cluster view: refused a call from node n1's certificate" "$W/controller.log" ||
  die "the controller did not log the refused node certificate"
DEAD=$(free_port)
expect_fail 1 "cannot reach nbd-csi-controller at tcp://127.0.0.1:$DEAD" "$NBDCSI_BIN/nbdctl" \
  --timeout 3 cluster --controller "127.0.0.1:$DEAD" --tls-cert "$C/client.crt" \
  --tls-key "$C/client.key" --tls-ca "$C/ca.crt" nodes
expect_fail 2 "--controller" env -u NBDCTL_CONTROLLER "$NBDCSI_BIN/nbdctl" cluster nodes
expect_fail 2 "--tls-" "$NBDCSI_BIN/nbdctl" cluster --controller "127.0.0.1:$REG" nodes
expect_fail 2 "--tls-key" "$NBDCSI_BIN/nbdctl" cluster --controller "127.0.0.1:$REG" \
  --tls-cert "$C/client.crt" --tls-ca "$C/ca.crt" nodes
expect_fail 2 "--tls-ca $W/missing.crt: cannot read it" "$NBDCSI_BIN/nbdctl" cluster \
  --controller "127.0.0.1:$REG" --tls-cert "$C/client.crt" --tls-key "$C/client.key" \
  --tls-ca "$W/missing.crt" nodes
expect_fail 2 "a subcommand is required" "$NBDCSI_BIN/nbdctl" cluster "${TLS[@]}"
# The same flags from the environment.
NBDCTL_CONTROLLER=127.0.0.1:$REG NBDCTL_TLS_CERT=$C/client.crt NBDCTL_TLS_KEY=$C/client.key \
  NBDCTL_TLS_CA=$C/ca.crt "$NBDCSI_BIN/nbdctl" -o json cluster nodes | jqx '.nodes | length == 2'

step "n2 stopped (SIGSTOP): the listing does not wait for it past 3/4 of --timeout"
kill -STOP "${DP_PID[n2]}"
t0=$(date +%s.%N)
rc=0
"$NBDCSI_BIN/nbdctl" --timeout 4 -o json cluster "${TLS[@]}" volumes >"$W/hung.json" || rc=$?
took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
kill -CONT "${DP_PID[n2]}"
[ $rc = 0 ] || die "cluster volumes with n2 stopped exited $rc"
echo "with n2 stopped: ${took}s, $(jq -c '.nodes[1]' "$W/hung.json")"
jqx '[.volumes[].node] | unique == ["n1"]' <"$W/hung.json"
jqx '.nodes[1] | .node == "n2" and .live and (.error | test("^node n2: no answer within 2[89][0-9][0-9] ms$"))' <"$W/hung.json"
awk -v t="$took" 'BEGIN { exit !(t >= 2.9 && t < 4) }' || die "took ${took}s, want 3-4 s"
wait_for 15 sh -c "'$NBDCSI_BIN/nbdctl' -o json cluster $(printf '%q ' "${TLS[@]}") volumes |
  jq -e '.nodes[1].error == null and ([.volumes[].node] | unique == [\"n1\",\"n2\"])' >/dev/null" ||
  die "n2 never listed again after SIGCONT: $(cl -o json volumes)"

step "n2 killed -9: reported as not answering, then as expired; n1 still listed"
kill -9 "${DP_PID[n2]}"
wait "${DP_PID[n2]}" 2>/dev/null || true
t0=$(date +%s.%N)
cl volumes -o json >"$W/down.json" || die "cluster volumes with n2 down exited $?"
jqx '[.volumes[].node] | unique == ["n1"]' <"$W/down.json"
jqx '.nodes[0].error == null' <"$W/down.json"
# Within the ttl n2 is still live to the registry, but its datapath does not answer.
jq -e '.nodes[1] | .node == "n2" and .error != null' <"$W/down.json" >/dev/null ||
  die "n2 not reported: $(jq -c .nodes "$W/down.json")"
echo "n2 right after the kill: $(jq -c '.nodes[1]' "$W/down.json")"
awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { exit !(b - a < 4) }' ||
  die "listing with a dead node took too long"
cl volumes >"$W/down.txt" || die "table with n2 down"
grep -q "^node n2: not listed: " "$W/down.txt" || die "the table does not name n2: $(cat "$W/down.txt")"
wait_for 15 sh -c "'$NBDCSI_BIN/nbdctl' -o json cluster $(printf '%q ' "${TLS[@]}") nodes |
  jq -e '.nodes[1] | .node == \"n2\" and .live == false and .heartbeat_age_ms > $TTL' >/dev/null" ||
  die "n2 never shown expired: $(cl nodes -o json)"
cl nodes | tee "$W/nodes2.txt"
grep -qE "^n2 .* expired " "$W/nodes2.txt" || die "n2 not expired in the table"
grep -qE "^n1 .* live " "$W/nodes2.txt" || die "n1 not live"
cl snapshots -o json >"$W/snaps2.json" || die "snapshots with n2 expired"
jqx '.snapshots == [] and (.nodes[1].error | startswith("heartbeat expired"))' <"$W/snaps2.json"
step "done"
