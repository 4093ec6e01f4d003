#!/bin/bash
# Issue 17's failure drill on a real kernel NBD driver: what a cluster's operator sees when the
# node's datapath dies under a mounted, busy volume. Runs INSIDE the VM (csi_alerts_run.sh ships
# nbd-datapathd, nbd-csi-node, nbdctl, Debian's prometheus and the chart's rules file unchanged).
#
#   nbd-datapathd and nbd-csi-node with --metrics-listen, scraped by a real Prometheus (jobs
#   nbd-datapathd and nbd-csi-node, as the rules expect; 2 s scrape and evaluation interval)
#   loading charts/nbd-csi/files/prometheus-rules.yaml; a volume staged + published through the
#   node plugin's CSI socket (the kubelet's calls, made by `nbdctl csi`); fio with verify, paced,
#   on it; then nbd-datapathd is killed -9:
#     - NodeGetVolumeStats reports volume_condition abnormal with the reason;
#     - Prometheus' /api/v1/alerts shows NbdCsiDatapathDown firing (its `for: 1m` runs out);
#     - NbdCsiAttachmentDown does not fire: its series comes from the dead datapath itself, and
#       the restarted one has the link up again at once (asserted: nbdcsi_attachment_up is 1);
#   nbd-datapathd is restarted: the kernel device reconnects, the condition is normal again, the
#   alert resolves (gone from /api/v1/alerts), fio ends with no error and a clean verify.
# FIGURE lines give the times, on the guest's clock. Every wait is bounded; a timeout fails with
# the logs.
. /opt/lib/nbdcsi-vm.sh

D=/tmp/csi POOL=/tmp/csi/pool API=/tmp/csi/api.sock SOCK=/tmp/csi/nbd.sock CSI=/tmp/csi/node.sock
DLOG=/tmp/csi/datapathd.log NLOG=/tmp/csi/node.log FIOLOG=/tmp/csi/fio.log PLOG=/tmp/csi/prometheus.log
NODE=vm-node DMETRICS=127.0.0.1:9101 NMETRICS=127.0.0.1:9102 P=http://127.0.0.1:9090
RULES=/opt/etc/prometheus-rules.yaml
DPID='' NPID='' PPID_='' FIOPID=''
fail() {
  echo "FAIL: $*"
  echo "---- datapathd log (last 30 lines) ----"; tail -n 30 "$DLOG" 2>/dev/null || true
  echo "---- nbd-csi-node log (last 20 lines) ----"; tail -n 20 "$NLOG" 2>/dev/null || true
  echo "---- prometheus log (last 20 lines) ----"; tail -n 20 "$PLOG" 2>/dev/null || true
  echo "---- prometheus alerts and targets ----"
  get /api/v1/alerts 2>/dev/null || true; echo
  get /api/v1/targets 2>/dev/null | jq -c '.data.activeTargets[] | {job: .labels.job, health, lastError}' || true
  echo "---- fio (last 20 lines) ----"; tail -n 20 "$FIOLOG" 2>/dev/null || true
  echo "---- kernel log, nbd and I/O lines (last 30) ----"
  dmesg | grep -iE 'nbd|I/O error|blk_update|EXT4-fs' | tail -n 30 || true
  exit 1
}
nbdctl() { command nbdctl --api "unix://$API" --timeout 30 "$@"; }
csi() { command nbdctl csi --endpoint "unix://$CSI" --timeout 60 node "$@"; }
# busybox wget (the guest has no curl); its -T is not built in, hence timeout.
get() { timeout 10 wget -q -O - "$P$1"; }
# A time difference in seconds, one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# until_ok SECONDS WHAT CMD...: polls CMD every 0.5 s; fails naming WHAT when the time runs out.
until_ok() {
  local secs=$1 what=$2 t
  shift 2
  t=$(now)
  until "$@" >/dev/null 2>&1; do
    awk -v a="$t" -v b="$(now)" -v s="$secs" 'BEGIN { exit !(b - a > s) }' && fail "$what: not within ${secs} s"
    sleep 0.5
  done
}

datapath_start() {
  rm -f "$API" "$SOCK"
  # A dead-connection timeout well beyond the kill (the alert's `for: 1m` plus TCG slack): the
  # kernel must hold the pod's I/O, not fail it, until the datapath is back.
  nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$SOCK" --workers 2 \
    --overcommit 16 --attach-io-timeout 5 --attach-dead-conn-timeout 600 \
    --metrics-listen "$DMETRICS" >>"$DLOG" 2>&1 &
  DPID=$!
  vm_wait_socket "$API" "$DPID" nbd-datapathd
}
node_start() {
  nbd-csi-node --csi-endpoint "unix://$CSI" --node-id "$NODE" --datapath "unix://$API" \
    --kubelet-root "$D" --metrics-listen "$NMETRICS" >>"$NLOG" 2>&1 &
  NPID=$!
  vm_wait_socket "$CSI" "$NPID" nbd-csi-node
  until_ok 30 "nbd-csi-node probe" command nbdctl csi --endpoint "unix://$CSI" identity probe
}
# The state of alert $1 in /api/v1/alerts (pending or firing), "" when it is not active.
alert_state() {
  get /api/v1/alerts | jq -r --arg a "$1" '[.data.alerts[] | select(.labels.alertname == $a) | .state] | first // ""'
}
alert_is() { [ "$(alert_state "$1")" = "$2" ]; }
target_health() {  # target_health JOB -> up / down / unknown
  get /api/v1/targets | jq -r --arg j "$1" '.data.activeTargets[] | select(.labels.job == $j) | .health'
}
target_is() { [ "$(target_health "$1")" = "$2" ]; }
stats() { command nbdctl csi --endpoint "unix://$CSI" --timeout 20 -o json node stats "$LID" --volume-path "$LTGT"; }
condition_is() {  # condition_is true|false: NodeGetVolumeStats' volume_condition.abnormal
  stats >/tmp/csi/stats.json &&
    jq -e --argjson a "$1" '(.volume_condition.abnormal // false) == $a' /tmp/csi/stats.json >/dev/null
}
# One instant query's single value ("" when no series).
query() {
  get "/api/v1/query?query=$1" | jq -r 'if .data.result | length == 1 then .data.result[0].value[1] else "" end'
}
attachment_up_is() { [ "$(query 'nbdcsi_attachment_up')" = "$1" ]; }

mkdir -p "$D" /tmp/prom
dmesg -c >/dev/null
[ -r "$RULES" ] || fail "no rules file $RULES"
datapath_start
node_start
step "nbd-datapathd (metrics $DMETRICS) and nbd-csi-node (metrics $NMETRICS) up"

cat >/tmp/csi/prometheus.yml <<YML
global:
  scrape_interval: 2s
  scrape_timeout: 2s
  evaluation_interval: 2s
rule_files: ['$RULES']
scrape_configs:
  - job_name: nbd-datapathd
    static_configs: [{targets: ['$DMETRICS']}]
  - job_name: nbd-csi-node
    static_configs: [{targets: ['$NMETRICS']}]
YML
prometheus --config.file=/tmp/csi/prometheus.yml --storage.tsdb.path=/tmp/prom \
  --web.listen-address=127.0.0.1:9090 --storage.tsdb.retention.time=1h >"$PLOG" 2>&1 &
PPID_=$!
until_ok 90 "prometheus ready" get /-/ready
until_ok 30 "datapath target up" target_is nbd-datapathd up
until_ok 30 "node target up" target_is nbd-csi-node up
get /api/v1/rules | jq -e '[.data.groups[].rules[].name] | index("NbdCsiDatapathDown") and index("NbdCsiAttachmentDown")' >/dev/null ||
  fail "the rules file's NbdCsiDatapathDown / NbdCsiAttachmentDown are not loaded: $(get /api/v1/rules)"
n_rules=$(get /api/v1/rules | jq '[.data.groups[].rules[]] | length')
step "prometheus up: both targets scraped, $n_rules rules of the chart loaded"

# ---- a volume staged and published the kubelet's way, fio with verify on it ----
vm_csi_stage_publish vol-alert
LDEV=$(nbdctl -o json attachments | jq -r '.attachments[] | select(.volume == "vol-alert") | .device')
[[ $LDEV == /dev/nbd* ]] || fail "not attached through kernel NBD: '$LDEV'"
condition_is false || fail "condition before the kill: $(cat /tmp/csi/stats.json)"
until_ok 30 "nbdcsi_attachment_up = 1 before the kill" attachment_up_is 1
[ -z "$(get /api/v1/alerts | jq -r '.data.alerts[] | select(.state == "firing") | .labels.alertname')" ] ||
  fail "alerts firing before the kill: $(get /api/v1/alerts)"
step "vol-alert staged on $LDEV (ext4), published; condition normal, attachment up, no alert firing"

fio --name=live --filename="$LTGT/fio.dat" --size=16M --bs=4k --rw=randwrite --ioengine=libaio \
  --iodepth=8 --rate_iops=,250 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 \
  --output="$FIOLOG" &
FIOPID=$!
step "fio started (randwrite 16M at 250 IOPS, O_DIRECT, crc32c verify)"
sleep 4
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended before the kill"

# ---- the kill ----
n_before=$(grep -c 'attach: reconnected /dev/nbd' "$DLOG" || true)
T_KILL=$(now)
kill -KILL "$DPID"; wait "$DPID" 2>/dev/null || true
step "nbd-datapathd killed -9 under fio"
until_ok 30 "condition abnormal after the kill" condition_is true
F_ABNORMAL=$(since "$T_KILL")
MSG=$(jq -r '.volume_condition.message // ""' /tmp/csi/stats.json)
[[ $MSG == *datapath* ]] || fail "the abnormal condition does not name the datapath: '$MSG'"
step "NodeGetVolumeStats: abnormal, \"$MSG\""
until_ok 30 "prometheus sees the datapath down" target_is nbd-datapathd down
until_ok 60 "NbdCsiDatapathDown pending" alert_is NbdCsiDatapathDown pending
step "NbdCsiDatapathDown pending"
# for: 1m, then one evaluation (2 s) and TCG slack.
until_ok 120 "NbdCsiDatapathDown firing" alert_is NbdCsiDatapathDown firing
F_FIRING=$(since "$T_KILL")
step "NbdCsiDatapathDown firing"
# Its series (nbdcsi_attachment_up) is exported by the datapath that is down: nothing to alert on.
alert_state NbdCsiAttachmentDown >/tmp/csi/attdown
[ -z "$(cat /tmp/csi/attdown)" ] || fail "NbdCsiAttachmentDown is $(cat /tmp/csi/attdown) while the datapath is down"
kill -0 "$FIOPID" 2>/dev/null || fail "fio ended while the datapath was down (its I/O failed?)"

# ---- the restart ----
# The three recoveries are independent: each is watched by its own poller and timed when first
# seen. Bounds: the reconnect is the datapath's own startup work; the alert needs one good
# scrape and one evaluation; the node plugin's condition waits for its gRPC channel to the
# datapath to connect again, which it retries at least once a second (common/grpc_reconnect.h;
# with gRPC's default backoff, growing towards 120 s, it took 11 to 52 s after a minute's outage).
# watch NAME SECONDS CMD...: in the background, writes to /tmp/csi/t.NAME the seconds since
# T_RESTART at which CMD first succeeds, or "timeout" after SECONDS.
watch() {
  local name=$1 secs=$2
  shift 2
  (
    while :; do
      if "$@" >/dev/null 2>&1; then since "$T_RESTART" >"/tmp/csi/t.$name"; exit 0; fi
      if awk -v e="$(since "$T_RESTART")" -v s="$secs" 'BEGIN { exit !(e > s) }'; then
        echo timeout >"/tmp/csi/t.$name"; exit 0
      fi
      sleep 0.3
    done
  ) &
}
reconnected() { [ "$(grep -c 'attach: reconnected /dev/nbd' "$DLOG" || true)" -gt "$n_before" ]; }
resolved() { [ -z "$(alert_state NbdCsiDatapathDown)" ]; }
T_RESTART=$(now)
watch reconnect 30 reconnected
watch normal 20 condition_is false
watch resolved 60 resolved
datapath_start
for _ in $(seq 400); do
  [ -s /tmp/csi/t.reconnect ] && [ -s /tmp/csi/t.normal ] && [ -s /tmp/csi/t.resolved ] && break
  sleep 0.5
done
F_RECONNECT=$(cat /tmp/csi/t.reconnect 2>/dev/null || echo timeout)
F_NORMAL=$(cat /tmp/csi/t.normal 2>/dev/null || echo timeout)
F_RESOLVED=$(cat /tmp/csi/t.resolved 2>/dev/null || echo timeout)
[ "$F_RECONNECT" != timeout ] || fail "the restarted datapath did not reconnect $LDEV in 30 s"
step "nbd-datapathd restarted, after ${F_RECONNECT} s: $(grep 'attach: reconnected /dev/nbd' "$DLOG" | tail -n 1 | sed 's/.*attach: //')"
[ "$F_RESOLVED" != timeout ] || fail "NbdCsiDatapathDown not resolved 60 s after the restart"
step "NbdCsiDatapathDown resolved, after ${F_RESOLVED} s"
[ "$F_NORMAL" != timeout ] ||
  fail "condition still abnormal 20 s after the restart: $(jq -r '.volume_condition.message' /tmp/csi/stats.json)"
step "NodeGetVolumeStats: normal again after ${F_NORMAL} s, \"$(jq -r '.volume_condition.message // ""' /tmp/csi/stats.json)\""
until_ok 30 "nbdcsi_attachment_up = 1 after the restart" attachment_up_is 1
[ -z "$(alert_state NbdCsiAttachmentDown)" ] || fail "NbdCsiAttachmentDown after the restart: $(get /api/v1/alerts)"
step "nbdcsi_attachment_up 1; no NbdCsiAttachmentDown"

vm_fio_check "$FIOPID" "$FIOLOG"
dmesg | grep -qE 'I/O error|Buffer I/O error|blk_update_request' && fail "the kernel logged I/O errors"
dmesg | grep -q "reconnected socket" || fail "the kernel log shows no reconnect"
step "fio done: exit 0, err=0, verify clean; kernel log: reconnect, no I/O error"
[ -z "$(get /api/v1/alerts | jq -r '.data.alerts[] | select(.state == "firing") | .labels.alertname')" ] ||
  fail "alerts still firing at the end: $(get /api/v1/alerts)"

echo "FIGURE datapath kill -> NodeGetVolumeStats abnormal: ${F_ABNORMAL} s"
echo "FIGURE datapath kill -> NbdCsiDatapathDown firing: ${F_FIRING} s (rule for: 1m, scrape + evaluation every 2 s)"
echo "FIGURE datapath restart -> kernel device reconnected: ${F_RECONNECT} s"
echo "FIGURE datapath restart -> NodeGetVolumeStats normal: ${F_NORMAL} s"
echo "FIGURE datapath restart -> NbdCsiDatapathDown resolved: ${F_RESOLVED} s"

csi unpublish "$LID" --target-path "$LTGT" >/dev/null || fail "unpublish"
csi unstage "$LID" --staging-path "$LSTG" >/dev/null || fail "unstage"
kill -TERM "$PPID_"; wait "$PPID_" || fail "prometheus exited $? on SIGTERM"
kill -TERM "$NPID"; wait "$NPID" || fail "nbd-csi-node exited $? on SIGTERM"
kill -TERM "$DPID"; wait "$DPID" || fail "nbd-datapathd exited $? on SIGTERM"
step "PASS"
