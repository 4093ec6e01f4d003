#!/usr/bin/env bash
# The three daemons' /metrics, /healthz and /readyz together, as an operator's Prometheus sees
# them: nbd-csi-controller, nbd-csi-node and nbd-datapathd on loopback (plaintext registry, no
# root), a real Prometheus server (Debian's package) scraping all three every second with the
# chart's alerting rules loaded, and CSI calls made with `nbdctl csi`:
#   - the node's /readyz is 503 (saying why) while its datapath is not there, 200 once it is, and
#     503 again when the datapath stops; /healthz stays 200 throughout; the controller's is 200
#     once it serves;
#   - each CSI call appears in nbdcsi_csi_rpcs_total under its method and gRPC code (a refused
#     CreateVolume under RESOURCE_EXHAUSTED, and as a placement refusal), and in the histogram;
#   - the controller shows the node's heartbeat age while it heartbeats, and the node as down
#     (nbdcsi_controller_node_up 0, age past the ttl) once its datapath stops;
#   - the node plugin logs in JSON (--log-format json): every line parses, and the lines of a
#     call carry its request_id and volume_id; the datapath's JSON lines parse too;
#   - `promtool check metrics` accepts each endpoint; every nbdcsi_ name that the dashboard and
#     the alerting rules query is one of the names the three daemons export.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/prometheus_lib.sh"
need jq curl prometheus promtool
is_datapathd || skip "metrics are the daemons' feature"
[ -x "$NBDCSI_BIN/nbd-csi-controller" ] && [ -x "$NBDCSI_BIN/nbd-csi-node" ] ||
  skip "needs nbd-csi-controller and nbd-csi-node in $NBDCSI_BIN"
lib_init

free_ports 6
REG=${PORTS[0]} API=${PORTS[1]} MC=${PORTS[2]} MN=${PORTS[3]} MD=${PORTS[4]} PP=${PORTS[5]}
HB=300  # ms: the controller's ttl is 3 intervals, so a stopped datapath is out within a second

code() { curl -s -o /dev/null -w '%{http_code}' "$1"; }
csi() { "$NBDCSI_BIN/nbdctl" csi --timeout 10 "$@"; }

step "bad --metrics-listen values are refused with the flag's name (exit 2)"
mkdir -p "$W/kubelet"
for bad in localhost:9 127.0.0.1 http://127.0.0.1:9; do
  rc=0
  "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$W/bad.sock" --insecure \
    --registry-listen "127.0.0.1:$REG" --metrics-listen "$bad" >"$W/bad.log" 2>&1 || rc=$?
  [ $rc = 2 ] && grep -q -- "--metrics-listen" "$W/bad.log" ||
    die "controller --metrics-listen $bad: exit $rc: $(cat "$W/bad.log")"
  rc=0
  "$NBDCSI_BIN/nbd-csi-node" --csi-endpoint "unix://$W/bad.sock" --node-id n1 \
    --kubelet-root "$W/kubelet" --metrics-listen "$bad" >"$W/bad.log" 2>&1 || rc=$?
  [ $rc = 2 ] && grep -q -- "--metrics-listen" "$W/bad.log" ||
    die "node --metrics-listen $bad: exit $rc: $(cat "$W/bad.log")"
done

step "the node plugin first: alive, not ready while no datapath answers"
bg "$NBDCSI_BIN/nbd-csi-node" --csi-endpoint "unix://$W/node.sock" --node-id n1 \
  --datapath "unix://$W/api.sock" --kubelet-root "$W/kubelet" \
  --metrics-listen "127.0.0.1:$MN" --log-format json --log-level debug >>"$W/node.log" 2>&1
NODE_PID=$BG_PID
wait_for 15 test -S "$W/node.sock" || die "the node plugin did not serve: $(cat "$W/node.log")"
wait_for 10 curl -s "http://127.0.0.1:$MN/healthz" || die "node /healthz does not answer"
[ "$(code "http://127.0.0.1:$MN/healthz")" = 200 ] || die "node /healthz not 200"
[ "$(code "http://127.0.0.1:$MN/readyz")" = 503 ] || die "node /readyz not 503 without a datapath"
curl -s "http://127.0.0.1:$MN/readyz" | grep -q "datapath" ||
  die "node /readyz does not say why: $(curl -s "http://127.0.0.1:$MN/readyz")"

step "controller and datapath: the datapath heartbeats every $HB ms"
bg "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$W/ctl.sock" --insecure \
  --registry-listen "127.0.0.1:$REG" --heartbeat-interval $HB \
  --metrics-listen "127.0.0.1:$MC" >>"$W/controller.log" 2>&1
CTL_PID=$BG_PID
wait_for 15 curl -sf "http://127.0.0.1:$MC/readyz" ||
  die "controller /readyz never 200: $(curl -s "http://127.0.0.1:$MC/readyz"; tail "$W/controller.log")"
[ "$(code "http://127.0.0.1:$MC/healthz")" = 200 ] || die "controller /healthz not 200"
daemon_start -- --capacity 1Gi --node-id n1 --advertise "127.0.0.1:$API" \
  --controller "127.0.0.1:$REG" --insecure --heartbeat-interval $HB \
  --metrics-listen "127.0.0.1:$MD" --log-format json
wait_for 15 curl -sf "http://127.0.0.1:$MN/readyz" ||
  die "node /readyz not 200 with its datapath up: $(curl -s "http://127.0.0.1:$MN/readyz")"
wait_for 15 curl -sf "http://127.0.0.1:$MD/readyz" || die "datapath /readyz not 200"

step "a real Prometheus scrapes the three every second, with the chart's rules"
cat >"$W/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $NBDCSI_SRC/charts/nbd-csi/files/prometheus-rules.yaml
scrape_configs:
  - job_name: nbd-csi-controller
    static_configs: [{targets: ['127.0.0.1:$MC']}]
  - job_name: nbd-csi-node
    static_configs: [{targets: ['127.0.0.1:$MN']}]
  - job_name: nbd-datapathd
    static_configs: [{targets: ['127.0.0.1:$MD']}]
YML
prom_start "$W/prometheus.yml" "$PP"
for job in nbd-csi-controller nbd-csi-node nbd-datapathd; do
  until_eq 30 "up{job=\"$job\"}" 1 ||
    die "Prometheus never scraped $job: $(curl -s "$P/api/v1/targets" | jq -c '[.data.activeTargets[] | {job: .labels.job, err: .lastError}]')"
done
rules=$(curl -sf "$P/api/v1/rules" | jq '[.data.groups[].rules[]] | length')
[ "$rules" -ge 10 ] || die "Prometheus loaded $rules rules from the chart's file"
# Declared at zero before any call (GrpcServerMetrics::Declare).
until_eq 10 'nbdcsi_csi_rpcs_total{job="nbd-csi-controller",method="CreateVolume",code="OK"}' 0 ||
  die "no zero baseline for CreateVolume"

step "CSI calls: counted under their method and code"
C=(--endpoint "unix://$W/ctl.sock")
N=(--endpoint "unix://$W/node.sock")
csi "${C[@]}" controller create-volume pvc-a --size 64Mi >/dev/null || die "CreateVolume failed"
rc=0; csi "${C[@]}" controller create-volume pvc-huge --size 1Ti >"$W/huge.out" 2>&1 || rc=$?
[ $rc != 0 ] || die "a 1Ti volume on a 1Gi pool was created"
grep -q RESOURCE_EXHAUSTED "$W/huge.out" || die "the refusal is not RESOURCE_EXHAUSTED: $(cat "$W/huge.out")"
for _ in 1 2 3; do csi "${N[@]}" identity probe >/dev/null || die "node Probe failed"; done
rc=0; csi "${N[@]}" node stats v1:n1:pvc-a --volume-path "$W/kubelet/nowhere" >"$W/stats.out" 2>&1 || rc=$?
[ $rc != 0 ] || die "NodeGetVolumeStats of a path that is not mounted succeeded"
# --log-format json: every line of the node's log is one JSON object, and the lines of that call
# carry its request id and the volume id it named.
jq -e . "$W/node.log" >/dev/null || die "the node's JSON log does not parse: $(head -5 "$W/node.log")"
jq -e -s '[.[] | select(.volume_id == "v1:n1:pvc-a" and (.request_id | test("^r-[0-9]+$")))]
          | length >= 2' "$W/node.log" >/dev/null ||
  die "no JSON lines with the call's request_id and volume_id: $(tail -5 "$W/node.log")"
# The datapath too: every line is one object, and its API lines made it (CreateVolume of pvc-a).
jq -e . "$W/datapathd.log" >/dev/null ||
  die "the datapath's JSON log does not parse: $(head -5 "$W/datapathd.log")"
jq -e -s '[.[] | select(.level == "info" and (.msg | test("api CreateVolume")))] | length >= 1' \
  "$W/datapathd.log" >/dev/null || die "no JSON CreateVolume line in the datapath's log"
STATS_CODE=$(grep -oE 'NOT_FOUND|INVALID_ARGUMENT|FAILED_PRECONDITION|INTERNAL|UNAVAILABLE' "$W/stats.out" | head -1)
[ -n "$STATS_CODE" ] || die "no gRPC code in the failed NodeGetVolumeStats: $(cat "$W/stats.out")"

CJ='job="nbd-csi-controller"'
NJ='job="nbd-csi-node"'
until_eq 15 "nbdcsi_csi_rpcs_total{$CJ,method=\"CreateVolume\",code=\"OK\"}" 1 || die "CreateVolume OK"
until_eq 10 "nbdcsi_csi_rpcs_total{$CJ,method=\"CreateVolume\",code=\"RESOURCE_EXHAUSTED\"}" 1 ||
  die "the refused CreateVolume is not counted under RESOURCE_EXHAUSTED"
until_eq 10 "nbdcsi_csi_rpc_duration_seconds_count{$CJ,method=\"CreateVolume\"}" 2 ||
  die "CreateVolume histogram count"
until_eq 10 "nbdcsi_controller_placement_refusals_total{reason=\"no_room\"}" 1 ||
  die "placement refusal not counted"
until_eq 10 "nbdcsi_controller_placement_refusals_total{reason=\"node_missing\"}" 0 ||
  die "node_missing refusal counted"
until_eq 10 "nbdcsi_csi_rpcs_total{$NJ,method=\"Probe\",code=\"OK\"}" 3 || die "node Probe count"
until_eq 10 "nbdcsi_csi_rpcs_total{$NJ,method=\"NodeGetVolumeStats\",code=\"$STATS_CODE\"}" 1 ||
  die "NodeGetVolumeStats not counted under $STATS_CODE"
until_eq 10 "sum(nbdcsi_csi_rpcs_in_flight)" 0 || die "calls left in flight"
# The datapath saw the create: its pool has the volume.
until_eq 10 'nbdcsi_pool_volumes{job="nbd-datapathd"}' 1 || die "the datapath's pool volumes"

step "the controller's registry: one live node, heartbeat age under the ttl"
until_eq 10 'nbdcsi_controller_nodes{state="live"}' 1 || die "live nodes"
age=$(q 'nbdcsi_controller_node_heartbeat_age_seconds{node="n1"}')
[ -n "$age" ] || die "no heartbeat age for n1"
awk -v a="$age" 'BEGIN { exit !(a >= 0 && a < 0.9) }' || die "heartbeat age $age s, interval 0.3 s"
until_eq 10 'nbdcsi_controller_node_up{node="n1"}' 1 || die "n1 not up"

step "promtool check metrics on each endpoint; dashboard and rules name only exported metrics"
for m in "$MC" "$MN" "$MD"; do
  curl -sf "http://127.0.0.1:$m/metrics" >"$W/metrics-$m.txt" || die "GET /metrics on $m"
  promtool check metrics <"$W/metrics-$m.txt" >"$W/promtool-$m.out" 2>&1 ||
    die "promtool check metrics ($m): $(cat "$W/promtool-$m.out")"
done
$PY "$NBDCSI_SRC/test/monitoring/check_monitoring.py" \
  --dashboard "$NBDCSI_SRC/charts/nbd-csi/files/grafana-dashboard.json" \
  --rules "$NBDCSI_SRC/charts/nbd-csi/files/prometheus-rules.yaml" --self-test \
  --scrape "$W/metrics-$MC.txt" --scrape "$W/metrics-$MN.txt" --scrape "$W/metrics-$MD.txt" ||
  die "the dashboard or the rules name a metric no daemon exports"

step "the datapath stops: the node is not ready, the controller sees the heartbeat go stale"
daemon_stop
wait_for 10 test "$(code "http://127.0.0.1:$MN/readyz")" = 503 || die "node /readyz still 200"
[ "$(code "http://127.0.0.1:$MN/healthz")" = 200 ] || die "node /healthz failed with its datapath"
wait_for 10 sh -c "curl -s http://127.0.0.1:$MC/metrics | grep -q '^nbdcsi_controller_node_up{node=\"n1\"} 0'" ||
  die "the controller still shows n1 up: $(curl -s "http://127.0.0.1:$MC/metrics" | grep node_up)"
until_eq 15 'nbdcsi_controller_node_heartbeat_age_seconds{node="n1"} > bool 0.9' 1 ||
  die "heartbeat age did not pass the ttl"
[ "$(code "http://127.0.0.1:$MC/readyz")" = 200 ] || die "controller not ready without nodes"

kill -TERM "$PROM_PID" "$NODE_PID" "$CTL_PID"
for pid in "$NODE_PID" "$CTL_PID"; do
  rc=0; wait "$pid" || rc=$?
  [ $rc = 0 ] || die "a CSI daemon exited $rc on SIGTERM"
done
curl -s "http://127.0.0.1:$MC/healthz" >/dev/null 2>&1 && die "controller metrics port open after exit"
curl -s "http://127.0.0.1:$MN/healthz" >/dev/null 2>&1 && die "node metrics port open after exit"
step "done"
